"""The figures' outputs: one JSON record and one PNG per figure, and the gallery ``README.md`` rebuilt from the
JSONs. :func:`regenerate` runs a figure and writes both; :func:`redraw` draws a figure's PNG again from its saved
JSON (the ``draw`` numbers) without training; :func:`write_gallery` rebuilds the README from the JSONs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from figures import frozen, registry
from figures.framework import (
    Context,
    Result,
    Spec,
    claim_verdict,
    holds_count,
    jsonable,
    run_figure,
    stated_verdict,
)
from figures.style import save_png, title
from toymodels.cache import atomic_write_bytes

DEFAULT_OUT = Path(__file__).resolve().parent
OVERVIEW_PNG = "verdicts.png"  # the gallery's picture at the top: claims x protocols, coloured by verdict


def _headline(record: dict) -> str | None:
    for p in record.get("protocols") or []:
        if p.get("primary"):
            return p["name"]
    return None


def _run(spec: Spec, ctx: Context) -> tuple[Result, float]:
    """``run_figure`` on ``ctx`` and its wall time; a crashing figure is reported (an unavailable Result), not
    hidden."""
    start = time.perf_counter()
    try:
        result = run_figure(spec, ctx)
    except Exception as exc:
        traceback.print_exc()
        result = Result(verdict="unavailable", summary=f"error while regenerating: {type(exc).__name__}: {exc}")
        result.measured = {"error": True}
    return result, time.perf_counter() - start


def _verdicts(protocols: list[dict]) -> dict[str, str]:
    return {p["name"]: p["verdict"] for p in protocols}


def regenerate(fig_id: str, ctx: Context, out: Path, *, confirmatory: tuple[int, ...] | None = None,
               commit: str | None = None) -> dict:
    """Run one figure and write its PNG and JSON into ``out``; returns the JSON record (as written).

    The figure is measured on ``ctx.seeds`` (the exploratory seeds). With ``confirmatory`` seeds (disjoint from
    them) it is measured again on those, after the criteria were frozen: the JSON's top level (verdict, summary,
    measured, protocols, draw numbers, PNG) is then the confirmatory run, the headline; ``exploratory`` beside it
    holds the exploratory run (seeds, verdict, per-protocol records); ``confirmation`` records the seeds, the
    SHA-256 of the figure's declaration (:func:`figures.frozen.criteria_sha256`, checked against the frozen
    registry by the tests), ``commit`` (the git HEAD of the run, default :func:`figures.frozen.head_commit`), the
    registry's commit, and the verdicts. Without ``confirmatory`` (a first look) the top level is the exploratory
    run and there is no ``confirmation``."""
    spec = registry.specs()[fig_id]
    ctx = dataclasses.replace(ctx, seed_set="exploratory")
    if confirmatory is not None:
        confirmatory = tuple(int(s) for s in confirmatory)
        overlap = sorted(set(confirmatory) & set(ctx.seeds))
        if not confirmatory or overlap:
            raise ValueError(f"confirmatory seeds must be non-empty and disjoint from the exploratory seeds "
                             f"{list(ctx.seeds)}, got {list(confirmatory)} (overlap {overlap})")
    explo, explo_s = _run(spec, ctx)
    head, head_ctx, conf_s = explo, ctx, 0.0
    if confirmatory is not None:
        head_ctx = dataclasses.replace(ctx, seeds=confirmatory, seed_set="confirmatory")
        head, conf_s = _run(spec, head_ctx)
    record = {
        "id": fig_id,
        "paper": spec.paper,
        "claim": spec.claim,
        **_kind_fields(spec, head.verdict),
        "verdict": head.verdict,
        "summary": head.summary,
        "measured": head.measured,
        "datasets": head.datasets,
        "seeds": list(head_ctx.seeds),
        "seed_set": head_ctx.seed_set,
        "fidelity": ctx.fidelity,
        "device": str(ctx.device),
        "config": head.config,
        "runtime_s": round(explo_s + conf_s, 2),
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "image": f"{fig_id}.png" if head.figure is not None else None,
        "robustness": bool(ctx.robustness),
        "criterion": head.criterion,
        "protocols": head.protocols or [],
        "headline_protocols": head.headline_protocols,  # whose verdicts made `verdict` (framework.HEADLINE_POLICY)
        "headline_complete": head.headline_complete,
    }
    record["holds"] = holds_count(record["protocols"])
    if confirmatory is not None:
        record["exploratory"] = {
            "seeds": list(ctx.seeds), "verdict": explo.verdict,
            "stated_verdict": stated_verdict(spec.kind, explo.verdict), "headline": explo.headline,
            "headline_protocols": explo.headline_protocols, "headline_complete": explo.headline_complete,
            "summary": explo.summary, "runtime_s": round(explo_s, 2), "measured": explo.measured,
            "protocols": explo.protocols or [], "holds": holds_count(explo.protocols or [])}
        record["confirmation"] = {
            "seeds": list(confirmatory), "criteria_sha256": frozen.criteria_sha256(spec),
            "commit": commit or frozen.head_commit(), "registry_commit": frozen.registry_commit(),
            "verdict": head.verdict, "stated_verdict": record["stated_verdict"], "headline": head.headline,
            "headline_protocols": head.headline_protocols, "protocols": _verdicts(head.protocols or []), "runtime_s": round(conf_s, 2)}
    if head.draw is not None:
        record["draw"] = head.draw
    out.mkdir(parents=True, exist_ok=True)
    if head.figure is not None:
        save_png(head.figure, out / f"{fig_id}.png",
                 title(spec.paper, fig_id, record["stated_verdict"], _headline(record)))
    if explo.figure is not None and head is not explo:
        import matplotlib.pyplot as plt

        plt.close(explo.figure)
    record = jsonable(record)
    atomic_write_bytes(out / f"{fig_id}.json", json.dumps(record, indent=2).encode())
    return record


def _kind_fields(spec: Spec, verdict: str) -> dict:
    """The JSON's claim-kind fields (issue 16 item 1): ``kind``, ``claim_id`` and ``stated_verdict`` (the verdict
    as read for the kind: :func:`figures.framework.stated_verdict`)."""
    return {"kind": spec.kind, "claim_id": spec.claim_id, "stated_verdict": stated_verdict(spec.kind, verdict)}


def _with_kind(record: dict, spec: Spec) -> dict:
    """``record`` with its kind fields set from ``spec`` (placed after ``claim``), everything else unchanged."""
    fields = _kind_fields(spec, record["verdict"])
    out = {}
    for k, v in record.items():
        if k in fields:
            continue
        out[k] = v
        if k == "claim":
            out.update(fields)
    out.update({k: v for k, v in fields.items() if k not in out})
    return out


def redraw(spec: Spec, out: Path) -> str | None:
    """Draw ``<out>/<id>.png`` again from ``<out>/<id>.json`` (its ``draw`` numbers), without training. Returns
    None when done, else why it cannot be redrawn."""
    path = out / f"{spec.id}.json"
    if not path.exists():
        return f"no {path.name} in {out} (run the figure first)"
    record = json.loads(path.read_text())
    with_kind = _with_kind(record, spec)
    if with_kind != record or list(with_kind) != list(record):  # the kind is declared in the figure file
        record = with_kind
        atomic_write_bytes(path, json.dumps(jsonable(record), indent=2).encode())
    if record.get("draw") is None:
        return f"{path.name} holds no draw numbers (written before --redraw existed, or unavailable): regenerate it"
    fig = spec.draw(record["draw"])
    save_png(fig, out / f"{spec.id}.png", title(spec.paper, spec.id, record["stated_verdict"], _headline(record)))
    return None


def _robustness_cell(r: dict) -> str:
    h = r.get("holds") or holds_count(r.get("protocols") or [])
    if not r.get("criterion"):
        return "not declared"
    if h["n"] <= 1:
        return "primary protocol only"
    return f"{h['reproduced']}/{h['n']} (partially {h['partially reproduced']})"


def _cell(text) -> str:
    """Text safe inside a markdown table cell (a literal | would split the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _settings_text(settings: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in settings.items()) or "(figure's defaults)"


def _key_text(key: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "; ".join(f"{k} {fmt(v)}" for k, v in key.items())


def _protocol_map(r: dict) -> list[str]:
    """The claim x protocol map of one figure (one row per protocol run)."""
    lines = ["| protocol | settings | paper's | verdict | key numbers |", "|---|---|---|---|---|"]
    for p in r["protocols"]:
        name = f"**{p['name']}** (primary)" if p.get("primary") else p["name"]
        lines.append(f"| {_cell(name)} | {_cell(_settings_text(p.get('protocol') or {}))} | "
                     f"{'yes' if p.get('paper') else ''} | {p['verdict']} | {_cell(_key_text(p.get('key') or {}))} |")
    return lines


_METHODS_INTRO = [
    "## Methods",
    "",
    "Every declared figure states its criterion as data (`figures/criteria.py`): the quantity measured per seed,",
    "the direction and margin of the test (and why that margin), the test (one-sample t over seeds, bootstrap of",
    "the mean, z on a known-error estimate, exact comparison, or sign test), the family-wise level, and the rule",
    "mapping the tests to a verdict. The prose of each criterion is rendered from that declaration. Claims of",
    "\"no change\" or \"same order\" are tested for equivalence with a margin declared up front (two one-sided",
    "tests), never by \"the interval includes 0\". Several claim tests of one figure are corrected with Holm's",
    "step-down procedure. Rows marked *sanity* are reported but do not count. Intervals are two-sided at 1 - 2",
    "alpha (90% for alpha = 0.05), so a one-sided test passes exactly when its interval clears the margin before",
    "the multiplicity correction. The headline verdict is the one at the paper's protocol where the paper states",
    "it, otherwise at the figure's declared primary protocol; the robustness column counts the protocols where the",
    "claim is reproduced (`lora-theory figures --robustness` runs the grid).",
    "",
    "Claim kinds (issue 16 item 1): each figure file declares `KIND` and `CLAIM_ID`. A *check* cannot fail for a",
    "correct implementation (a closed-form identity, a proposition's algebra): it is listed in its own table and",
    "never counted. A *claim* is an empirical statement of the paper (reproduced / partially / not reproduced). A",
    "*hypothesis* is the paper's own conjecture, read from the same criterion as supported (the rule's full set of",
    "tests passes), inconclusive (only a partial set passes) or not supported (neither). The tally counts claims and",
    "hypotheses once per `claim_id`; a claim tested by several figures gets the weakest of their verdicts.",
]


def _stated(r: dict) -> str:
    return r.get("stated_verdict") or stated_verdict(r.get("kind", "claim"), r["verdict"])


def claim_tally(records: list[dict]) -> dict[str, dict]:
    """One verdict per paper claim: the records of kind claim / hypothesis grouped by ``claim_id``; a claim tested
    by several figures gets the WEAKEST of their verdicts (:func:`figures.framework.claim_verdict`). Checks are
    left out. Returns claim_id -> {"kind", "verdict", "stated_verdict", "figures"}."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind", "claim") != "check":
            groups.setdefault(r.get("claim_id") or r["id"], []).append(r)
    out = {}
    for cid, rs in groups.items():
        kinds = {r.get("kind", "claim") for r in rs}
        if len(kinds) != 1:
            raise ValueError(f"claim_id {cid!r} joins figures of different kinds {sorted(kinds)}")
        kind = kinds.pop()
        v = claim_verdict([r["verdict"] for r in rs])
        out[cid] = {"kind": kind, "verdict": v, "stated_verdict": stated_verdict(kind, v),
                    "figures": [r["id"] for r in rs]}
    return out


def _tally(records: list[dict]) -> list[str]:
    claims = claim_tally(records)
    counts: dict[str, int] = {}
    for c in claims.values():
        counts[c["stated_verdict"]] = counts.get(c["stated_verdict"], 0) + 1
    n_checks = sum(r.get("kind", "claim") == "check" for r in records)
    joined = [f"{cid} ({' + '.join(c['figures'])})" for cid, c in claims.items() if len(c["figures"]) > 1]
    return [f"**Tally: {len(claims)} paper claims** (claims and hypotheses, once per claim id): "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ". "
            f"{n_checks} checks are listed apart and not counted. A claim tested by several figures gets the weakest "
            "of their verdicts (reproduced > partially reproduced > not reproduced)"
            + (f": {'; '.join(joined)}." if joined else ".")]


# Statistics fixes (issue 16 item 6): old rule, new rule, why, and what the numbers were (regenerated from the run
# cache with the fixed code; every verdict / test outcome that changed is named).
STATISTICS_FIXES = (
    ("a single number (allora-fig5-escape `step1_closed_form`, declared with the default method t) went to a "
     "t-test: n = 1, uncomputable, shown as \"fail\"",
     "a single number is refused by the t / bootstrap tests (ValueError naming the row); closed-form rows are "
     "declared `exact`",
     "a t-test needs one value per seed; the row's value passes its margin 0.01",
     "allora-fig5-escape `step1_closed_form` (sanity) fail -> PASS in all 6 protocols (sgd lr x1 / x1/3 / x3: "
     "1.2e-08, 1.3e-07, 2.1e-08; adam lr x1 / x1/3 / x3: 2.6e-05 each, < 0.01); no verdict changed"),
    ("`exact` claim rows (p 0 or 1) were members of the Holm family",
     "`exact` rows are decided alone (p_adjusted = p), outside the Holm family of the sampled tests",
     "a row without sampling error took a place in the family and inflated the other tests' adjusted p",
     "allora-fig4-expected-vs-empirical (4 exact rows per protocol): Holm p of its t-tests fell, e.g. lr x1/3 "
     "`top_minus_bottom` 0.038 -> 0.025, lr x3 `decline_p=0.3` 0.88 -> 0.44, long horizon `decline_p=0.5` "
     "0.25 -> 0.15; no test outcome and no verdict changed"),
    ("all seeds equal (sd = 0): the inequality decided the test with p = 0 or 1 (a pass from two equal seeds)",
     "sd = 0 gives no test statistic and so no evidence: p = 1, the row never passes (TOST likewise)",
     "zero spread over a handful of seeds is not evidence; a deterministic quantity is declared `exact`",
     "only allora-fig4-expected-vs-empirical long horizon `decline_p=0.1` / `decline_p=0.3` (peak at the "
     "horizon: 0 in every seed) hit it; they failed before (0 is not > 0) and fail now: unchanged"),
)


def _statistics_fixes() -> list[str]:
    lines = ["", "### Statistics fixes (issue 16 item 6)", "", "| old rule | new rule | why | what the numbers were |",
             "|---|---|---|---|"]
    return lines + [f"| {_cell(o)} | {_cell(n)} | {_cell(w)} | {_cell(x)} |" for o, n, w, x in STATISTICS_FIXES]


def write_gallery(out: Path) -> Path:
    """Rebuild ``<out>/README.md`` from every ``<id>.json`` in ``out`` (contract order): the top table (with a
    robustness column), per figure its criterion (rendered from the declaration), "holds in k of n protocols"
    and the claim x protocol map, and a Methods section with every recalibrated rule."""
    records = []
    for fig_id in registry.FIGURE_IDS:
        path = out / f"{fig_id}.json"
        if path.exists():
            r = json.loads(path.read_text())
            r.setdefault("protocols", [])
            r.setdefault("criterion", None)
            r["holds"] = holds_count(r["protocols"])
            records.append(r)
    lines = [
        "# Figure gallery",
        "",
        "Regenerated by `lora-theory figures` (the README's main command); every number below comes from the run",
        "that drew the figure (see each `<id>.json` for seeds, configuration, the declared criterion, per-protocol",
        "verdicts and measured values). Runtime is this figure's wall time in that regeneration: training runs",
        "shared between figures are paid by the first figure that needs them and come from the run cache",
        "afterwards. Each figure is one file, `figures/<paper>/<name>.py`; its plot is drawn from the numbers saved in",
        "its JSON, so `lora-theory figures --redraw` rebuilds every PNG and this page without training. How verdicts",
        "are decided: see [Methods](#methods).",
        "",
    ]
    lines += _tally(records) + [
        "",
        "### Claims and hypotheses",
        "",
        "| figure | kind | claim id | paper | verdict | robustness (reproduced in k/n protocols) | seeds | fidelity "
        "| runtime (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = [r for r in records if r.get("kind", "claim") != "check"]
    checks = [r for r in records if r.get("kind", "claim") == "check"]
    for r in table:
        lines.append(f"| [{r['id']}](#{r['id']}) | {r.get('kind', 'claim')} | {r.get('claim_id', r['id'])} | "
                     f"{r['paper']} | **{_stated(r)}** | {_robustness_cell(r)} | {len(r['seeds'])} | "
                     f"{r['fidelity']} | {r['runtime_s']} |")
    lines += ["", "### Checks (cannot fail for a correct implementation: not evidence, never in the tally)", "",
              "| figure | paper | result | seeds | runtime (s) |", "|---|---|---|---|---|"]
    lines += [f"| [{r['id']}](#{r['id']}) | {r['paper']} | **{_stated(r)}** | {len(r['seeds'])} | {r['runtime_s']} |"
              for r in checks]
    for r in records:
        lines += ["", f"## {r['id']}", "", f"**{r['paper']}.** Claim: {r['claim']}", "",
                  f"**Kind: {r.get('kind', 'claim')}** (claim id {r.get('claim_id', r['id'])}). "
                  f"**Verdict: {_stated(r)}.** {r['summary']}", ""]
        crit = r.get("criterion")
        if crit:
            lines += ["**Criterion.** " + crit["description"].replace("\n", "  \n"), ""]
            h = r["holds"]
            lines += [f"**Holds in {h['reproduced']} of {h['n']} protocol{'s' if h['n'] != 1 else ''}** "
                      f"(partially in {h['partially reproduced']}, not in {h['not reproduced']}, unavailable in "
                      f"{h['unavailable']}).", ""]
            lines += _protocol_map(r) + [""]
        if r.get("image"):
            lines += [f"![{r['id']}]({r['image']})", ""]
        lines.append(f"Data: {', '.join(r['datasets']) or 'none (closed form / synthetic)'}; seeds "
                     f"{r['seeds']}; fidelity {r['fidelity']}; {r['runtime_s']} s on {r['device']}.")
    lines += [""] + _METHODS_INTRO + ["", "### Recalibrated rules", ""]
    recal = [(r["id"], c) for r in records for c in ((r.get("criterion") or {}).get("recalibrations") or [])]
    if recal:
        lines += ["| figure | old rule | new rule | why |", "|---|---|---|---|"]
        lines += [f"| [{fid}](#{fid}) | {_cell(c['old'])} | {_cell(c['new'])} | {_cell(c['why'])} |"
                  for fid, c in recal]
    else:
        lines.append("None recorded in these JSONs.")
    lines += _statistics_fixes()
    undeclared = [r["id"] for r in records if not r.get("criterion")]
    if undeclared:
        lines += ["", "Figures without a declared criterion in their JSON (a crashed regeneration): "
                  + ", ".join(undeclared) + "."]
    path = out / "README.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path

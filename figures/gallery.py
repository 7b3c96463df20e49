"""The figures' outputs: one JSON record and one PNG per figure, and the gallery ``README.md`` rebuilt from the
JSONs. :func:`regenerate` runs a figure and writes both; :func:`redraw` draws a figure's PNG again from its saved
JSON (the ``draw`` numbers) without training; :func:`write_gallery` rebuilds the README from the JSONs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from figures import frozen, registry
from figures.criteria import CONFIDENCE_STATEMENT
from figures.framework import (
    CONFIRMATORY_SEEDS,
    EXPLORATORY_SEEDS,
    HEADLINE_POLICY,
    Context,
    Result,
    Spec,
    claim_verdict,
    holds_count,
    jsonable,
    run_figure,
    stated_verdict,
)
from figures.style import DPI, save_png, title
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
    commit that froze that declaration (:func:`figures.frozen.freeze_commit`), and the verdicts. Without ``confirmatory`` (a first look) the top level is the exploratory
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
        sha = frozen.criteria_sha256(spec)
        record["confirmation"] = {
            "seeds": list(confirmatory), "criteria_sha256": sha,
            "commit": commit or frozen.head_commit(), "registry_commit": frozen.freeze_commit(sha),
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
    None when done, else why it cannot be redrawn; the title states the verdict only of a confirmed JSON
    (:func:`confirmation_state`), else that it awaits confirmation. The JSON's kind fields are set from the figure
    file, and its ``confirmation.registry_commit`` to the commit that froze the hash it records
    (:func:`figures.frozen.freeze_commit`; runs before that function existed wrote the registry's last commit)."""
    path = out / f"{spec.id}.json"
    if not path.exists():
        return f"no {path.name} in {out} (run the figure first)"
    record = json.loads(path.read_text())
    with_kind = _with_kind(record, spec)
    changed = with_kind != record or list(with_kind) != list(record)  # the kind is declared in the figure file
    record = with_kind
    conf = record.get("confirmation") or {}
    if conf.get("criteria_sha256"):  # the commit that froze the declaration the run used (git knows it from the hash)
        froze = frozen.freeze_commit(conf["criteria_sha256"])
        if froze not in ("unknown", "uncommitted") and froze != conf.get("registry_commit"):
            print(f"{spec.id}: confirmation.registry_commit {conf.get('registry_commit')} -> {froze} (the commit "
                  "that froze its declaration)")
            conf["registry_commit"], changed = froze, True
    if changed:
        atomic_write_bytes(path, json.dumps(jsonable(record), indent=2).encode())
    if record.get("draw") is None:
        return f"{path.name} holds no draw numbers (written before --redraw existed, or unavailable): regenerate it"
    fig = spec.draw(record["draw"])
    save_png(fig, out / f"{spec.id}.png", title(spec.paper, spec.id, _title_verdict(record, frozen_entries(out)),
                                                _headline(record)))
    return None


def _title_verdict(record: dict, entries: dict[str, dict]) -> str:
    """The verdict a redrawn PNG's title states: the confirmed verdict, or that the figure awaits confirmation
    (with its old verdict marked superseded, or its exploratory verdict)."""
    state = confirmation_state(record, entries)
    if state["state"] == CONFIRMED:
        return record["stated_verdict"]
    return (f"awaiting confirmation (superseded verdict: {record['stated_verdict']})" if state["superseded"] else
            f"awaiting confirmation (exploratory: {record['stated_verdict']})")


# A figure's JSON against the frozen registry (figures/FROZEN.json, issue 16 item 7). Only a "confirmed" JSON counts:
# it holds a confirmatory run (``confirmation``) under exactly the frozen declaration. Every other state is awaiting
# confirmation, and its verdicts are never counted; "predates" and "other criterion" verdicts were reached under a
# declaration the freeze replaced (superseded), an "exploratory only" one under the frozen declaration but only on the
# seeds the criteria were written on.
CONFIRMED = "confirmed"
AWAITING = {
    "predates": "awaiting confirmation: JSON predates the frozen criteria",
    "other criterion": "awaiting confirmation: confirmed under a declaration other than the frozen one (a changed "
                       "criterion needs a new confirmation on new seeds)",
    "exploratory only": "awaiting confirmation: exploratory run only, under the frozen criteria",
    "not frozen": "awaiting confirmation: not in the frozen registry (figures/FROZEN.json)",
}
SUPERSEDED = ("predates", "other criterion")  # states whose verdict was reached under a declaration the freeze replaced


def frozen_entries(out: Path | None = None) -> dict[str, dict]:
    """The frozen registry's entries (id -> {"sha256", "declaration"}) the JSONs of ``out`` are judged against:
    ``<out>/FROZEN.json`` when there is one, else the package's ``figures/FROZEN.json``; {} when neither exists."""
    for path in ([Path(out) / "FROZEN.json"] if out is not None else []) + [frozen.REGISTRY]:
        if path.exists():
            return frozen.load(path)["figures"]
    return {}


def declaration_differences(record: dict, decl: dict) -> list[str]:
    """The fields of a frozen declaration (:func:`figures.frozen.declaration`) that ``record`` (a figure JSON)
    states otherwise: ``claim``, ``kind``, ``claim_id``, ``criterion`` (its ``description`` is a rendering, left
    out), ``protocols`` (names, settings, primary / paper / plausible marks, notes) and ``headline`` (the headline
    protocols). Empty when the JSON was made under exactly that declaration."""
    out = [k for k in ("claim", "kind", "claim_id") if record.get(k) != decl.get(k)]
    crit = {k: v for k, v in (record.get("criterion") or {}).items() if k != "description"}
    if crit != decl.get("criterion"):
        out.append("criterion")
    mine = {p.get("name"): p for p in record.get("protocols") or []}
    declared = decl.get("protocols") or []
    if list(mine) != [p["name"] for p in declared] or any(
            {"name": p["name"], "settings": mine[p["name"]].get("protocol") or {},
             "primary": bool(mine[p["name"]].get("primary")), "paper": bool(mine[p["name"]].get("paper")),
             "plausible": bool(mine[p["name"]].get("plausible")), "note": mine[p["name"]].get("note", "")} != p
            for p in declared):
        out.append("protocols")
    if list(record.get("headline_protocols") or []) != list((decl.get("headline") or {}).get("protocols") or []):
        out.append("headline")
    return out


def confirmation_state(record: dict, entries: dict[str, dict]) -> dict:
    """Where ``record`` (a figure JSON) stands against the frozen registry ``entries`` (:func:`frozen_entries`):
    ``{"state", "text", "superseded", "differences"}``. ``state`` is :data:`CONFIRMED` (a ``confirmation`` whose
    hash is the frozen one, made under the frozen declaration: the only state that counts) or a key of
    :data:`AWAITING` ("predates": no confirmation and a declaration other than the frozen one; "other criterion": a
    confirmation under another hash or declaration; "exploratory only": no confirmation, the frozen declaration;
    "not frozen": the figure is not in the registry); ``superseded`` says whether its verdicts were reached under a
    declaration the freeze replaced."""
    entry = entries.get(record.get("id"))
    if entry is None:
        state, diffs = "not frozen", []
    else:
        diffs = declaration_differences(record, entry.get("declaration") or {})
        conf = record.get("confirmation")
        if conf:
            if conf.get("criteria_sha256") != entry.get("sha256"):
                diffs = ["hash", *diffs]
            state = "other criterion" if diffs else CONFIRMED
        else:
            state = "predates" if diffs else "exploratory only"
    return {"state": state, "text": "confirmed" if state == CONFIRMED else AWAITING[state],
            "superseded": state in SUPERSEDED, "differences": diffs}


def _states(records: list[dict], entries: dict[str, dict] | None) -> dict[str, dict]:
    entries = frozen_entries() if entries is None else entries
    return {r["id"]: confirmation_state(r, entries) for r in records}


SEED_SETS = ("confirmatory", "exploratory")  # the gallery's order: the headline first


def runs_of(record: dict) -> dict[str, dict | None]:
    """The record's run on each seed set: {"confirmatory": ..., "exploratory": ...}, each a dict with ``seeds``,
    ``verdict``, ``stated_verdict``, ``summary``, ``protocols`` and ``holds``, or None where that set was not run. A
    JSON with a ``confirmation`` holds the confirmatory run at its top level and the exploratory one in
    ``exploratory``; a JSON without one (a first look, or written before the confirmation existed) holds the
    exploratory run at its top level."""
    def view(d: dict) -> dict:
        protocols = d.get("protocols") or []
        verdict = d["verdict"]
        return {"seeds": list(d.get("seeds") or []), "verdict": verdict,
                "stated_verdict": d.get("stated_verdict") or stated_verdict(record.get("kind", "claim"), verdict),
                "summary": d.get("summary", ""), "protocols": protocols, "holds": holds_count(protocols)}

    if "confirmation" in record:
        return {"confirmatory": view(record),
                "exploratory": view(record["exploratory"]) if record.get("exploratory") else None}
    return {"confirmatory": None, "exploratory": view(record)}


def _robustness_cell(run: dict | None, criterion) -> str:
    if run is None:
        return "not run"
    h = run["holds"]
    if not criterion:
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


def _strike(text: str) -> str:
    return f"~~{text}~~"


def _protocol_map(r: dict, superseded: bool = False) -> list[str]:
    """The claim x protocol map of one figure: one row per protocol, its verdict on each seed set that ran and the
    headline run's key numbers; ``superseded`` verdicts (reached under a declaration the freeze replaced) struck
    through."""
    runs = runs_of(r)
    mark_v = _strike if superseded else str
    explo = {p["name"]: mark_v(p["verdict"]) for p in (runs["exploratory"] or {}).get("protocols", [])}
    marks = set(r.get("headline_protocols") or [])
    head = ["| protocol | settings | paper's / plausible | verdict (confirmatory) | verdict (exploratory) | "
            "key numbers |", "|---|---|---|---|---|---|"]
    lines = head
    for p in r["protocols"]:
        name = f"**{p['name']}** (primary)" if p.get("primary") else p["name"]
        mark = "paper's" if p.get("paper") else "plausible" if p.get("plausible") else ""
        mark += " (headline)" if p["name"] in marks and mark else ""
        conf = mark_v(p["verdict"]) if runs["confirmatory"] is not None else "not run"
        lines.append(f"| {_cell(name)} | {_cell(_settings_text(p.get('protocol') or {}))} | {mark} | {conf} | "
                     f"{explo.get(p['name'], 'not run')} | {_cell(_key_text(p.get('key') or {}))} |")
    return lines


_METHODS_INTRO = [
    "## Methods",
    "",
    "Every declared figure states its criterion as data (`figures/criteria.py`): the quantity measured per seed,",
    "the direction and margin of the test (the smallest effect that counts, and where it comes from: the paper or",
    "theory, never our data), the test (one-sample t over seeds, bootstrap of the mean, z on a known-error estimate,",
    "exact comparison, or sign test), the family-wise level, and the rule mapping the tests to a verdict. The prose",
    "of each criterion is rendered from that declaration. Claims of \"no change\" or \"same order\" are tested for",
    "equivalence with a margin declared up front (two one-sided tests), never by \"the interval includes 0\".",
    "Several claim tests of one figure are corrected with Holm's step-down procedure. Rows marked *sanity* are",
    "reported but do not count. The robustness column counts the protocols where the claim is reproduced.",
    "",
]
_KINDS_TEXT = [
    "Claim kinds (issue 16 item 1): each figure file declares `KIND` and `CLAIM_ID`. A *check* cannot fail for a",
    "correct implementation (a closed-form identity, a proposition's algebra): it is listed in its own table and",
    "never counted. A *claim* is an empirical statement of the paper (reproduced / partially / not reproduced). A",
    "*hypothesis* is the paper's own conjecture, read from the same criterion as supported (the rule's full set of",
    "tests passes), inconclusive (only a partial set passes) or not supported (neither). The tally counts claims and",
    "hypotheses once per `claim_id`; a claim tested by several figures gets the weakest of their verdicts.",
]


def _stated(r: dict) -> str:
    return r.get("stated_verdict") or stated_verdict(r.get("kind", "claim"), r["verdict"])


def _claim_groups(records: list[dict]) -> dict[str, list[dict]]:
    """claim_id -> the records of kind claim / hypothesis that test it (checks left out), in gallery order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind", "claim") != "check":
            groups.setdefault(r.get("claim_id") or r["id"], []).append(r)
    for cid, rs in groups.items():
        kinds = {r.get("kind", "claim") for r in rs}
        if len(kinds) != 1:
            raise ValueError(f"claim_id {cid!r} joins figures of different kinds {sorted(kinds)}")
    return groups


def claim_tally(records: list[dict], seed_set: str | None = None,
                entries: dict[str, dict] | None = None) -> dict[str, dict]:
    """One verdict per paper claim: the records of kind claim / hypothesis grouped by ``claim_id``; a claim tested
    by several figures gets the WEAKEST of their verdicts (:func:`figures.framework.claim_verdict`). Checks are
    left out. ``seed_set`` "confirmatory" / "exploratory": only the claims CONFIRMED so far (every figure of the
    claim :data:`CONFIRMED` against the frozen registry ``entries``, default :func:`frozen_entries`), with that seed
    set's verdicts (:func:`runs_of`); the other claims are :func:`awaiting_claims`. None: each record's headline
    ``verdict``, whatever its state. Returns claim_id -> {"kind", "verdict", "stated_verdict", "figures"}."""
    if seed_set is not None and seed_set not in SEED_SETS:
        raise ValueError(f"seed_set must be one of {SEED_SETS} or None, got {seed_set!r}")
    groups = _claim_groups(records)
    if seed_set is not None:
        states = _states(records, entries)
        groups = {cid: rs for cid, rs in groups.items() if all(states[r["id"]]["state"] == CONFIRMED for r in rs)}
    out = {}
    for cid, rs in groups.items():
        runs = [runs_of(r)[seed_set] if seed_set is not None else r for r in rs]
        verdicts = [run["verdict"] for run in runs if run is not None]
        if not verdicts:
            continue
        kind = rs[0].get("kind", "claim")
        v = claim_verdict(verdicts)
        out[cid] = {"kind": kind, "verdict": v, "stated_verdict": stated_verdict(kind, v),
                    "figures": [r["id"] for r in rs]}
    return out


def awaiting_claims(records: list[dict], entries: dict[str, dict] | None = None) -> dict[str, dict]:
    """The paper claims not confirmed yet: claim_id -> {"kind", "figures", "awaiting": the figures not
    :data:`CONFIRMED` with their state ({id: state}), "superseded": whether one of them holds a verdict reached under
    a declaration the freeze replaced}. A claim tested by several figures awaits until every one is confirmed."""
    states = _states(records, entries)
    out = {}
    for cid, rs in _claim_groups(records).items():
        waiting = {r["id"]: states[r["id"]]["state"] for r in rs if states[r["id"]]["state"] != CONFIRMED}
        if waiting:
            out[cid] = {"kind": rs[0].get("kind", "claim"), "figures": [r["id"] for r in rs], "awaiting": waiting,
                        "superseded": any(s in SUPERSEDED for s in waiting.values())}
    return out


_STATED_ORDER = ("reproduced", "partially reproduced", "not reproduced", "supported", "inconclusive", "not supported",
                 "unavailable")


def _counts_text(claims: dict[str, dict]) -> str:
    counts: dict[str, int] = {}
    for c in claims.values():
        counts[c["stated_verdict"]] = counts.get(c["stated_verdict"], 0) + 1
    return ", ".join(f"{k} {counts[k]}" for k in _STATED_ORDER if k in counts)


def seed_text(seeds) -> str:
    """Seeds as text: a run of consecutive seeds as "first-last" (``0-9``), else listed."""
    seeds = sorted(set(seeds))
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds)) or "none"


def _set_seeds(records: list[dict], seed_set: str, ids=None) -> str:
    """The seeds of the ``seed_set`` runs of ``records`` (only the figures ``ids`` when given)."""
    runs = [runs_of(r)[seed_set] for r in records if ids is None or r["id"] in ids]
    return seed_text(s for run in runs if run is not None for s in run["seeds"])


def _checks(n: int) -> str:
    return f"{n} check{'s' if n != 1 else ''}"


def _awaiting_text(waiting: dict[str, dict], link) -> str:
    """The awaiting claims grouped by why they wait: "<why>: a, b; <why>: c" (``link(cid, claim)`` names one)."""
    by: dict[str, list[str]] = {}
    for cid, c in waiting.items():
        for state in dict.fromkeys(c["awaiting"].values()):
            by.setdefault(state, []).append(link(cid, c))
    return "; ".join(f"{AWAITING[state].removeprefix('awaiting confirmation: ')}: {', '.join(dict.fromkeys(names))}"
                     for state, names in by.items())


def _confirmed_text(records: list[dict], conf: dict, explo: dict) -> str:
    ids = {f for c in conf.values() for f in c["figures"]}
    return (f"on the confirmatory seeds ({_set_seeds(records, 'confirmatory', ids)}, run after the criteria were "
            f"frozen): {_counts_text(conf)}; the same claims on the exploratory seeds "
            f"({_set_seeds(records, 'exploratory', ids)}, the seeds the criteria were written on), beside it: "
            f"{_counts_text(explo)}")


def _confirmed_count(confirmed: int, claims: int, waiting: int) -> str:
    """'N of M paper claims confirmed so far; K awaiting confirmation', or 'all M paper claims confirmed' when none
    awaits."""
    if waiting == 0 and confirmed == claims:
        return f"all {claims} paper claims confirmed"
    return f"{confirmed} of {claims} paper claims confirmed so far; {waiting} awaiting confirmation"


def _tally(records: list[dict], entries: dict[str, dict] | None = None) -> list[str]:
    """The gallery's top line: how many paper claims are confirmed so far and their verdicts (confirmatory, the
    exploratory beside); the claims awaiting confirmation are named and never counted (their JSONs' verdicts were
    reached under criteria the freeze superseded, or on the exploratory seeds only)."""
    entries = frozen_entries() if entries is None else entries
    n_checks = sum(r.get("kind", "claim") == "check" for r in records)
    conf = claim_tally(records, "confirmatory", entries)
    explo = claim_tally(records, "exploratory", entries)
    waiting = awaiting_claims(records, entries)
    n = len(_claim_groups(records))
    head = (f"**Tally: {_confirmed_count(len(conf), n, len(waiting))}** "
            "(claims and hypotheses, once per claim id; a claim tested by several figures is confirmed when every "
            "one of its figures is, and gets the weakest of their verdicts: reproduced > partially reproduced > not "
            "reproduced). ")
    head += (f"Confirmed claims, {_confirmed_text(records, conf, explo)}." if conf else
             "No claim is confirmed yet: no JSON here holds a confirmatory run under the frozen criteria.")
    if waiting:
        def link(cid: str, c: dict) -> str:
            return f"[{cid}](#{next(iter(c['awaiting']))})"

        head += (" Awaiting confirmation, not counted (the verdicts their JSONs show are not findings): "
                 f"{_awaiting_text(waiting, link)}.")
    joined = [f"{cid} ({' + '.join(figs)})" for cid, figs in
              ((cid, [r["id"] for r in rs]) for cid, rs in _claim_groups(records).items()) if len(figs) > 1]
    return [head + f" {_checks(n_checks)} listed apart and not counted."
            + (f" Claims tested by several figures: {'; '.join(joined)}." if joined else "")]


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


# the verdict colours of the overview picture (Okabe-Ito: colour-blind safe); a hypothesis's reading shares its colour
VERDICT_COLOURS = {"reproduced": "#009E73", "partially reproduced": "#E69F00", "not reproduced": "#D55E00",
                   "unavailable": "#999999"}


def overview_rows(records: list[dict], entries: dict[str, dict] | None = None) -> list[dict]:
    """The overview picture's numbers: one row per claim / hypothesis figure (checks are left out), in gallery
    order: ``label``, ``state`` (:func:`confirmation_state` against ``entries``, default :func:`frozen_entries`),
    the ``headline`` verdict of each seed set ({"confirmatory": v | None, "exploratory": v | None}), ``protocols``:
    [(name, {seed set: verdict | None})] in the figure's declared order, and ``headline_protocols`` (the names the
    headline verdict is taken from). A JSON whose verdicts were reached under a declaration the freeze superseded
    has no verdict here (None everywhere: it is not evidence for the frozen claim)."""
    states = _states(records, entries)
    rows = []
    for r in records:
        if r.get("kind", "claim") == "check":
            continue
        state = states[r["id"]]
        runs = runs_of(r)
        if state["superseded"]:
            runs = {ss: None for ss in runs}
        names = [p["name"] for p in r.get("protocols") or []]
        for run in runs.values():
            names += [p["name"] for p in (run or {}).get("protocols", []) if p["name"] not in names]
        per = {ss: {p["name"]: p["verdict"] for p in run["protocols"]} if run else {} for ss, run in runs.items()}
        label = r["id"] + (" (hypothesis)" if r.get("kind") == "hypothesis" else "")
        if state["state"] != CONFIRMED:
            label += " (awaiting: superseded JSON)" if state["superseded"] else " (awaiting)"
        rows.append({"id": r["id"], "label": label, "state": state["state"],
                     "headline_protocols": list(r.get("headline_protocols") or []),
                     "headline": {ss: run["verdict"] if run else None for ss, run in runs.items()},
                     "protocols": [(n, {ss: per[ss].get(n) for ss in SEED_SETS}) for n in names]})
    return rows


def draw_overview(records: list[dict], path: Path, entries: dict[str, dict] | None = None) -> Path | None:
    """The picture at the top of the gallery: claims x protocols, each cell coloured by the verdict, its upper half
    on the confirmatory seeds and its lower half on the exploratory seeds (white: not run, or a verdict reached under a
    superseded declaration); the first column is the headline verdict (:data:`figures.framework.HEADLINE_POLICY`). Drawn from the JSONs alone; None when there is no
    claim to draw."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows = overview_rows(records, entries)
    if not rows:
        return None
    ncols = 1 + max(len(r["protocols"]) for r in rows)
    fig, ax = plt.subplots(figsize=(2.6 + 1.25 * ncols, 1.2 + 0.32 * len(rows)), layout="constrained")

    def cell(x, y, verdicts, text, bold=False):
        for ss, y0 in (("confirmatory", y + 0.5), ("exploratory", y)):
            v = verdicts.get(ss)
            ax.add_patch(Rectangle((x, y0), 1, 0.5, facecolor=VERDICT_COLOURS.get(v, "white"), edgecolor="none"))
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="black", linewidth=1.6 if bold else 0.5))
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=5.5, fontweight="bold" if bold else None,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 0.8})

    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        cell(0, y, row["headline"], "headline" if row["state"] == CONFIRMED else "awaiting\nconfirmation",
             bold=True)
        for j, (name, verdicts) in enumerate(row["protocols"], 1):
            text = name if len(name) <= 18 else name[:17] + "…"
            cell(j, y, verdicts, text + (" *" if name in row["headline_protocols"] else ""))
    ax.set_xlim(0, ncols)
    ax.set_ylim(0, len(rows))
    ax.set_yticks([len(rows) - 1 - i + 0.5 for i in range(len(rows))], [r["label"] for r in rows], fontsize=6.5)
    ax.set_xticks([0.5 + j for j in range(ncols)], ["headline"] + [f"protocol {j}" for j in range(1, ncols)],
                  fontsize=6.5)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.grid(False)
    fig.legend(handles=[Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=v)
                        for v, c in VERDICT_COLOURS.items()] + [Patch(facecolor="white", edgecolor="black",
                                                                      linewidth=0.5, label="not run")],
               loc="outside lower center", ncol=5, fontsize=6.5, frameon=False)
    ax.set_title("Verdict per claim and protocol: upper half of a cell on the confirmatory seeds, lower half on the "
                 "exploratory seeds;\n* the headline verdict's protocols; hypotheses: reproduced = supported, "
                 "partially = inconclusive, not = not supported; checks not drawn\nawaiting "
                 "confirmation: no confirmatory run under the frozen criteria yet (a superseded JSON's old verdicts "
                 "are left white)", fontsize=7.5)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    plt.close(fig)
    return path


def _commits_text(records: list[dict], key: str) -> str:
    """The distinct ``confirmation[key]`` commits of the records, each with how many figures name it."""
    counts: dict[str, int] = {}
    for r in records:
        c = (r.get("confirmation") or {}).get(key)
        if c:
            counts[c] = counts.get(c, 0) + 1
    return "; ".join(f"`{c}` ({n} figure{'s' if n != 1 else ''})" for c, n in counts.items()) or "none"


def _preregistration(records: list[dict], states: dict[str, dict]) -> list[str]:
    confirmed = [r for r in records if states[r["id"]]["state"] == CONFIRMED]
    lines = ["", "### Pre-registration: exploratory and confirmatory seeds (issue 16 item 7)", "",
             f"Exploratory seeds ({seed_text(EXPLORATORY_SEEDS)}): the seeds the criteria were written, and for the "
             "figures of the first gallery revised, on, after their numbers had been seen; their verdicts are "
             f"exploratory. Confirmatory seeds ({seed_text(CONFIRMATORY_SEEDS)}): never used before the freeze. "
             "Before any confirmatory seed was run, each figure's declaration (claim, kind, claim id, criterion, "
             "protocols and headline policy: everything that decides its verdict) was frozen with its SHA-256 in "
             "[`figures/FROZEN.json`](FROZEN.json) (`lora-theory figures --freeze`, `figures/frozen.py`) and "
             "committed on its own. The headline verdict of each figure is its confirmatory verdict; the exploratory "
             "one stands beside it. Each JSON's `confirmation` records the seeds, the hash of the declaration the run "
             "used (a test checks it equals the registry's), the registry's commit and the commit of the run. A "
             "criterion changed after the freeze needs a new confirmation on seeds never used, logged here.",
             "",
             "A figure counts only once *confirmed*: its JSON holds a confirmatory run whose hash is the frozen one and "
             "whose declaration (claim, kind, criterion, protocols, headline protocols) equals the frozen declaration. "
             "Every other figure is *awaiting confirmation* and counts nowhere: a JSON that predates the frozen "
             "criteria shows verdicts reached under rules the freeze superseded (marked superseded, kept only as the "
             "record of what was run); an exploratory-only JSON was judged by the frozen rules but only on the seeds "
             "they were written on."]
    waiting = [r for r in records if states[r["id"]]["state"] != CONFIRMED]
    if not confirmed:
        lines += ["", "No confirmatory run under the frozen criteria in these JSONs yet: every figure awaits "
                  "confirmation."]
    else:
        lines += ["", f"Confirmed {len(confirmed)} of {len(records)} figures. Registry commit(s): "
                  f"{_commits_text(confirmed, 'registry_commit')}. Run at commit(s): "
                  f"{_commits_text(confirmed, 'commit')}."]
    if waiting:
        by: dict[str, list[str]] = {}
        for r in waiting:
            by.setdefault(states[r["id"]]["state"], []).append(f"[{r['id']}](#{r['id']})")
        lines += ["", f"Awaiting confirmation ({len(waiting)} figure{'s' if len(waiting) != 1 else ''}): "
                  + "; ".join(f"{AWAITING[k].removeprefix('awaiting confirmation: ')}: {', '.join(v)}"
                              for k, v in by.items()) + "."]
    if not confirmed:
        return lines
    moved = [(r["id"], runs_of(r)) for r in confirmed]
    moved = [(i, rs) for i, rs in moved if rs["exploratory"] and rs["exploratory"]["verdict"] != rs["confirmatory"][
        "verdict"]]
    if moved:
        lines += ["", "Verdicts that differ between the seed sets (exploratory -> confirmatory): " + "; ".join(
            f"[{i}](#{i}) {rs['exploratory']['stated_verdict']} -> {rs['confirmatory']['stated_verdict']}"
            for i, rs in moved) + "."]
    else:
        lines += ["", "Every confirmed figure's verdict equals its exploratory verdict."]
    return lines


def _load_records(out: Path) -> list[dict]:
    records = []
    for fig_id in registry.FIGURE_IDS:
        path = out / f"{fig_id}.json"
        if path.exists():
            r = json.loads(path.read_text())
            r.setdefault("protocols", [])
            r.setdefault("criterion", None)
            r["holds"] = holds_count(r["protocols"])
            records.append(r)
    return records


def write_gallery(out: Path) -> Path:
    """Rebuild ``<out>/README.md`` and the overview picture ``<out>/verdicts.png`` from every ``<id>.json`` in
    ``out`` (contract order): the tally (claims once, confirmatory verdicts with the exploratory ones beside), the
    claims x protocols picture, the tables of claims and of checks, per figure its criterion (rendered from the
    declaration), "holds in k of n protocols" and the claim x protocol map, and Methods (the headline policy, the
    confidence level, the pre-registration, every recalibrated rule, the statistics fixes)."""
    records = _load_records(out)
    entries = frozen_entries(out)
    states = _states(records, entries)
    lines = [
        "# Figure gallery",
        "",
        "Regenerated by `lora-theory figures` (the README's main command: every protocol of every figure, on the",
        "exploratory seeds and then on the confirmatory seeds); every number below comes from the run that drew the",
        "figure (see each `<id>.json` for seeds, configuration, the declared criterion, per-protocol verdicts and",
        "measured values). Runtime is this figure's wall time in that regeneration (both seed sets): training runs",
        "shared between figures are paid by the first figure that needs them and come from the run cache",
        "afterwards. Each figure is one file, `figures/<paper>/<name>.py`; its plot is drawn from the numbers saved in",
        "its JSON, so `lora-theory figures --redraw` rebuilds every PNG and this page without training. How verdicts",
        "are decided: see [Methods](#methods).",
        "",
    ]
    lines += _tally(records, entries) + [""]
    out.mkdir(parents=True, exist_ok=True)
    if draw_overview(records, out / OVERVIEW_PNG, entries) is not None:
        lines += [f"![verdict per claim and protocol]({OVERVIEW_PNG})", ""]
    lines += [
        "### Claims and hypotheses",
        "",
        "| figure | kind | claim id | paper | verdict (confirmatory) | exploratory | robustness (reproduced in k/n "
        "protocols, confirmatory) | seeds | fidelity | runtime (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = [r for r in records if r.get("kind", "claim") != "check"]
    checks = [r for r in records if r.get("kind", "claim") == "check"]

    def verdicts(r):
        """(confirmatory cell, exploratory cell, robustness cell) of the tables."""
        runs, state = runs_of(r), states[r["id"]]
        conf, explo = runs["confirmatory"], runs["exploratory"]
        if state["state"] == CONFIRMED:
            return (f"**{conf['stated_verdict']}**", explo["stated_verdict"] if explo else "not run",
                    _robustness_cell(conf, r.get("criterion")))
        old = ", ".join(f"{_strike(run['stated_verdict'])} ({ss})" for ss, run in runs.items() if run)
        return (_cell(state["text"]), f"{old} superseded" if state["superseded"] else
                explo["stated_verdict"] if explo else "not run", "superseded" if state["superseded"] else "not run")

    for r in table:
        conf, explo, robust = verdicts(r)
        lines.append(f"| [{r['id']}](#{r['id']}) | {r.get('kind', 'claim')} | {r.get('claim_id', r['id'])} | "
                     f"{r['paper']} | {conf} | {explo} | {robust} | {len(r['seeds'])} | {r['fidelity']} | "
                     f"{r['runtime_s']} |")
    lines += ["", "### Checks (cannot fail for a correct implementation: not evidence, never in the tally)", "",
              "| figure | paper | result (confirmatory) | exploratory | seeds | runtime (s) |",
              "|---|---|---|---|---|---|"]
    for r in checks:
        conf, explo, _ = verdicts(r)
        lines.append(f"| [{r['id']}](#{r['id']}) | {r['paper']} | {conf} | {explo} | {len(r['seeds'])} | "
                     f"{r['runtime_s']} |")
    for r in records:
        runs, state = runs_of(r), states[r["id"]]
        conf, explo = runs["confirmatory"], runs["exploratory"]
        if state["state"] == CONFIRMED:
            text = (f"**Verdict (confirmatory, seeds {seed_text(conf['seeds'])}): {conf['stated_verdict']}.** "
                    f"{conf['summary']}")
        elif state["superseded"]:
            why = f" (differs in: {', '.join(state['differences'])})" if state["differences"] else ""
            text = (f"**{state['text'][0].upper()}{state['text'][1:]}**{why}. Its old verdict (seeds "
                    f"{seed_text(r.get('seeds') or [])}, under criteria the freeze superseded; not counted): "
                    f"{_strike(_stated(r))} (superseded). {r['summary']}")
        else:
            text = (f"**{state['text'][0].upper()}{state['text'][1:]}.** Exploratory verdict (seeds "
                    f"{seed_text(r.get('seeds') or [])}; not counted): {_stated(r)}. {r['summary']}")
        lines += ["", f"## {r['id']}", "", f"**{r['paper']}.** Claim: {r['claim']}", "",
                  f"**Kind: {r.get('kind', 'claim')}** (claim id {r.get('claim_id', r['id'])}). {text}", ""]
        if conf and explo:
            lines += [f"**Exploratory (seeds {seed_text(explo['seeds'])}): "
                      f"{_strike(explo['stated_verdict']) if state['superseded'] else explo['stated_verdict']}.** "
                      f"{explo['summary']}", ""]
        crit = r.get("criterion")
        if crit:
            head = ("**Criterion in this JSON (superseded by the frozen declaration in "
                    "[`FROZEN.json`](FROZEN.json)).** " if state["superseded"] else "**Criterion.** ")
            lines += [head + crit["description"].replace("\n", "  \n"), ""]
            h = r["holds"]
            where = (" on the confirmatory seeds" if conf and not state["superseded"] else
                     " under the superseded criteria (not counted)" if state["superseded"] else "")
            lines += [f"**Holds in {h['reproduced']} of {h['n']} protocol{'s' if h['n'] != 1 else ''}** "
                      f"(partially in {h['partially reproduced']}, not in {h['not reproduced']}, unavailable in "
                      f"{h['unavailable']}){where}.", ""]
            lines += _protocol_map(r, state["superseded"]) + [""]
        if r.get("image"):
            lines += [f"![{r['id']}]({r['image']})", ""]
            if state["superseded"]:
                lines += ["(The picture of the JSON awaiting confirmation: any verdict in its title is superseded.)",
                          ""]
        lines.append(f"Data: {', '.join(r['datasets']) or 'none (closed form / synthetic)'}; seeds "
                     f"{r['seeds']}; fidelity {r['fidelity']}; {r['runtime_s']} s on {r['device']}.")
    lines += ["", *_METHODS_INTRO, HEADLINE_POLICY, "",
              "**Confidence level.** " + CONFIDENCE_STATEMENT, "", *_KINDS_TEXT]
    lines += _preregistration(records, states)
    lines += ["", "### Recalibrated rules", ""]

    def logged(r: dict) -> list[dict]:  # the JSON's log, then the frozen declaration's entries it lacks (a JSON
        # that predates the freeze misses the recalibrations made up to the freeze)
        mine = list((r.get("criterion") or {}).get("recalibrations") or [])
        decl = ((entries.get(r["id"]) or {}).get("declaration") or {}).get("criterion") or {}
        return mine + [c for c in decl.get("recalibrations") or [] if c not in mine]

    recal = [(r["id"], c) for r in records for c in logged(r)]
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


# README.md's "What the toolkit found": the block between these markers is generated from the JSONs (write_findings)
FINDINGS_BEGIN = ("<!-- figures:findings:begin (generated from figures/*.json by `lora-theory figures`: "
                  "figures.gallery.write_findings; do not edit by hand) -->")
FINDINGS_END = "<!-- figures:findings:end -->"
README = DEFAULT_OUT.parent / "README.md"


def _under(run: dict, names: list[str]) -> str:
    """"holds under a, b; partially under c; not under d" over the protocols ``names`` of a run."""
    by = {p["name"]: p["verdict"] for p in run["protocols"]}
    parts = []
    for verdict, word in (("reproduced", "holds"), ("partially reproduced", "partially"),
                          ("not reproduced", "not"), ("unavailable", "unavailable")):
        got = [n for n in names if by.get(n) == verdict]
        if got:
            parts.append(f"{word} under {', '.join(got)}")
    return "; ".join(parts)


def findings(records: list[dict], gallery_link: str = "figures/README.md",
             entries: dict[str, dict] | None = None) -> str:
    """The README's findings, from the JSONs alone (no hand-typed number): how many paper claims are confirmed so
    far and their tally (confirmatory, the exploratory beside it), then per paper its confirmed claims grouped by
    verdict, each linked to its gallery section (a claim whose headline combines several protocols that disagree says
    under which it holds), and the claims awaiting confirmation, named without a verdict: a verdict reached under
    superseded criteria, or on the exploratory seeds alone, is not a finding. ``entries``: the frozen registry
    (default :func:`frozen_entries`)."""
    entries = frozen_entries() if entries is None else entries
    conf, explo = claim_tally(records, "confirmatory", entries), claim_tally(records, "exploratory", entries)
    waiting = awaiting_claims(records, entries)
    n_checks = sum(r.get("kind", "claim") == "check" for r in records)
    n = len(_claim_groups(records))
    count = _confirmed_count(len(conf), n, len(waiting))
    lines = [f"**{count[0].upper()}{count[1:]}** (each "
             f"claim counted once; {_checks(n_checks)} that cannot fail listed apart). "
             + (f"Confirmed claims, {_confirmed_text(records, conf, explo)}." if conf else
                "No claim is confirmed yet: no JSON holds a confirmatory run under the frozen criteria.")
             + (" The claims awaiting confirmation have no verdict here: their JSONs predate the frozen criteria "
                "(or hold only an exploratory run), so what they show is not a finding." if waiting else "")]
    by_id = {r["id"]: r for r in records}
    papers: dict[str, dict[str, list[str]]] = {}
    for rs in _claim_groups(records).values():  # every paper with a claim, in gallery order
        papers.setdefault(rs[0]["paper"].split()[0], {})
    for cid, c in conf.items():
        notes = []
        for fid in c["figures"]:
            run = runs_of(by_id[fid])["confirmatory"]
            names = list(by_id[fid].get("headline_protocols") or [])
            verdicts = {p["name"]: p["verdict"] for p in run["protocols"]} if run else {}
            if len(names) > 1 and len({verdicts.get(n) for n in names}) > 1:
                notes.append((f"{fid}: " if len(c["figures"]) > 1 else "") + _under(run, names))
        link = f"[{cid}]({gallery_link}#{c['figures'][0]})"
        paper = by_id[c["figures"][0]]["paper"].split()[0]
        papers[paper].setdefault(c["stated_verdict"], []).append(link + (f" ({'; '.join(notes)})" if notes else ""))
    for cid, c in waiting.items():
        paper = by_id[c["figures"][0]]["paper"].split()[0]
        papers[paper].setdefault("awaiting confirmation", []).append(
            f"[{cid}]({gallery_link}#{next(iter(c['awaiting']))})")
    lines.append("")
    for paper, groups in papers.items():
        order = [v for v in (*_STATED_ORDER, "awaiting confirmation") if v in groups]
        lines.append(f"- **{paper}**: " + "; ".join(f"{v}: {', '.join(groups[v])}" for v in order) + ".")
    return "\n".join(lines)


def findings_block(records: list[dict], entries: dict[str, dict] | None = None) -> str:
    """:func:`findings` between the README's markers."""
    return f"{FINDINGS_BEGIN}\n{findings(records, entries=entries)}\n{FINDINGS_END}"


def write_findings(out: Path = DEFAULT_OUT, readme: Path | None = None) -> Path:
    """Replace the block between the markers of ``readme`` (default: the repository's README.md) by the findings of
    the JSONs in ``out`` (judged against :func:`frozen_entries` of ``out``). ValueError when the markers are
    missing."""
    readme = readme if readme is not None else README
    text = readme.read_text()
    i, j = text.find(FINDINGS_BEGIN), text.find(FINDINGS_END)
    if i < 0 or j < i:
        raise ValueError(f"readme: {readme} lacks the findings markers {FINDINGS_BEGIN!r} ... {FINDINGS_END!r}")
    new = text[:i] + findings_block(_load_records(out), frozen_entries(out)) + text[j + len(FINDINGS_END):]
    if new != text:
        atomic_write_bytes(readme, new.encode())
    return readme

"""``lora-theory figures``: regenerate figures, write ``<id>.png`` + ``<id>.json``, rebuild the gallery."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import figures
from figures import FIDELITIES, Context, Result, holds_count
from toymodels.cache import atomic_write_bytes


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, torch.device | Path):
        return str(obj)
    return obj


def _legacy_protocol(result: Result) -> dict:
    """The one protocol record of a figure not yet declared with a criterion (rule still in its code)."""
    return {"name": "as run", "protocol": {}, "primary": True, "paper": False, "verdict": result.verdict,
            "summary": result.summary, "key": {},
            "note": "not yet declared: one protocol, the rule is in the figure's code (see the summary)"}


def regenerate(fig_id: str, ctx: Context, out: Path) -> dict:
    """Run one figure and write its PNG and JSON into ``out``; returns the JSON record."""
    spec = figures.specs()[fig_id]
    start = time.perf_counter()
    try:
        result = spec.run(ctx)
    except Exception as exc:  # a crashing figure is reported, not hidden
        traceback.print_exc()
        result = Result(verdict="unavailable", summary=f"error while regenerating: {type(exc).__name__}: {exc}")
        result.measured = {"error": True}
    runtime = time.perf_counter() - start
    record = {
        "id": fig_id,
        "paper": spec.paper,
        "claim": spec.claim,
        "verdict": result.verdict,
        "summary": result.summary,
        "measured": result.measured,
        "datasets": result.datasets,
        "seeds": list(ctx.seeds),
        "fidelity": ctx.fidelity,
        "device": str(ctx.device),
        "config": result.config,
        "runtime_s": round(runtime, 2),
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "image": f"{fig_id}.png" if result.figure is not None else None,
        "robustness": bool(ctx.robustness),
        "criterion": result.criterion,
        "protocols": result.protocols if result.protocols is not None else [_legacy_protocol(result)],
    }
    record["holds"] = holds_count(record["protocols"])
    out.mkdir(parents=True, exist_ok=True)
    if result.figure is not None:
        import matplotlib.pyplot as plt

        result.figure.suptitle(f"{spec.paper}: {fig_id}", fontsize=9)
        result.figure.tight_layout()
        tmp = out / f".{fig_id}.png.tmp"
        result.figure.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out / f"{fig_id}.png")
        plt.close(result.figure)
    atomic_write_bytes(out / f"{fig_id}.json", json.dumps(_jsonable(record), indent=2).encode())
    return record


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
]


def write_gallery(out: Path) -> Path:
    """Rebuild ``<out>/README.md`` from every ``<id>.json`` in ``out`` (contract order): the top table (with a
    robustness column), per figure its criterion (rendered from the declaration), "holds in k of n protocols"
    and the claim x protocol map, and a Methods section with every recalibrated rule."""
    records = []
    for fig_id in figures.FIGURE_MODULES:
        path = out / f"{fig_id}.json"
        if path.exists():
            r = json.loads(path.read_text())
            r.setdefault("protocols", [_legacy_protocol(Result(r["verdict"], r["summary"]))])
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
        "afterwards. How verdicts are decided: see [Methods](#methods).",
        "",
        "| figure | paper | verdict | robustness (reproduced in k/n protocols) | seeds | fidelity | runtime (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| [{r['id']}](#{r['id']}) | {r['paper']} | **{r['verdict']}** | {_robustness_cell(r)} | "
                     f"{len(r['seeds'])} | {r['fidelity']} | {r['runtime_s']} |")
    for r in records:
        lines += ["", f"## {r['id']}", "", f"**{r['paper']}.** Claim: {r['claim']}", "",
                  f"**Verdict: {r['verdict']}.** {r['summary']}", ""]
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
    legacy = [r["id"] for r in records if not r.get("criterion")]
    if legacy:
        lines += ["", "Figures whose rule is not yet declared as data (the rule is stated in their summary): "
                  + ", ".join(legacy) + "."]
    path = out / "README.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-theory figures", description=__doc__)
    parser.add_argument("ids", nargs="*", help="figure ids (default: all)")
    parser.add_argument("--list", action="store_true", help="list every figure id with its claim")
    fid = parser.add_mutually_exclusive_group()
    fid.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few steps")
    fid.add_argument("--large", action="store_true", help="closer to the papers' sizes (slow)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 10, quick: 2)")
    parser.add_argument("--robustness", action="store_true",
                        help="run every declared protocol of each figure (the robustness grid), not only the "
                             "primary one")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--out", type=Path, default=figures.DEFAULT_OUT, help="output directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small models train fastest on one thread per "
                             "process, and a run's last bits depend on the thread count, which the cache records)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel workers for the training sweeps (default: one per CPU core; 1: in-process)")
    parser.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                        help="where sweeps run: local processes (default), Ray (the cluster of $RAY_ADDRESS, else "
                             "a local one), or SLURM through submitit; results are the same bits on each")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)

    all_specs = figures.specs()
    if args.list:
        for spec in all_specs.values():
            print(f"{spec.id:<36} {spec.paper:<22} {spec.claim}")
        return 0
    unknown = [i for i in args.ids if i not in all_specs]
    if unknown:
        parser.error(f"unknown figure ids {unknown}; see --list")
    fidelity = "quick" if args.quick else "large" if args.large else "default"
    assert fidelity in FIDELITIES
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    if n_seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = Context(fidelity=fidelity, seeds=tuple(range(n_seeds)), device=device, workers=args.workers,
                  executor=args.executor, robustness=args.robustness)
    ids = args.ids or list(all_specs)
    total = time.perf_counter()
    for i, fig_id in enumerate(ids, 1):
        print(f"[{i}/{len(ids)}] {fig_id} ({fidelity}) ...", flush=True)
        rec = regenerate(fig_id, ctx, args.out)
        print(f"    {rec['verdict']}: {rec['summary']} ({rec['runtime_s']} s)", flush=True)
    gallery = write_gallery(args.out)
    print(f"wrote {len(ids)} figure(s) and {gallery} in {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

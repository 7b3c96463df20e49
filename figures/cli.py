"""``lora-theory figures``: regenerate figures (``<id>.png`` + ``<id>.json``) and the gallery, or redraw them from
their JSONs. The command's parts follow the command-line contract: :data:`HELP`, :data:`DESCRIPTION`,
:func:`add_arguments`, :func:`run`."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from figures import frozen
from figures.framework import CONFIRMATORY_SEEDS, EXPLORATORY_SEEDS, FIDELITIES, Context

HELP = "regenerate the papers' figures with their claim checks, or redraw them from the saved numbers"
DESCRIPTION = (
    "Regenerate the papers' figures: each figure trains its runs (cached in the run cache, in parallel) under every "
    "declared protocol, first on the exploratory seeds (0-9) and then on the confirmatory seeds (100-109, never used "
    "to write a criterion), judges its claim by its frozen criterion and writes ID.png and ID.json (the confirmatory "
    "verdict is the headline, the exploratory one stands beside it) into the output directory; then the gallery "
    "README.md is rebuilt from every JSON there. Without ids, every figure. --primary is a faster first look (the "
    "primary protocol on the exploratory seeds) that never replaces a fuller JSON. With --redraw, nothing is "
    "trained: the PNGs are drawn again from the numbers saved in the JSONs, and the gallery is rebuilt. --freeze "
    "writes the registry of the frozen criteria (figures/FROZEN.json), which is committed before a confirmatory run."
)
FIRST_LOOK = "first-look"  # where --primary writes a figure whose JSON in --out holds a fuller run
_FIDELITY_RANK = {"quick": 0, "default": 1, "large": 2}
_GUESS_S = {"quick": 2.0, "default": 30.0, "large": 120.0}  # seconds per protocol and seed set, where no JSON says


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", help="figure ids (default: all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="list every figure id with its paper and claim")
    parser.add_argument("--redraw", action="store_true",
                        help="redraw the PNGs of the given figures (default: all) from their JSONs in --out and "
                             "rebuild the gallery, without training anything")
    parser.add_argument("--freeze", action="store_true",
                        help="write the registry of the declared criterion, protocols and headline policy of the "
                             "given figures (default: all; others keep their entries) with their SHA-256 "
                             "(figures/FROZEN.json) and say what changed; commit it on its own before a "
                             "confirmatory run")
    fid = parser.add_mutually_exclusive_group()
    fid.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few steps, 2 seeds of each set")
    fid.add_argument("--large", action="store_true", help="closer to the papers' sizes (slow)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--primary", action="store_true",
                       help="a faster first look: only the primary protocol, only the exploratory seeds, no "
                            f"confirmation; a figure whose JSON in --out holds a fuller run is written to "
                            f"OUT/{FIRST_LOOK}/ instead (never replaced by a thinner one)")
    scope.add_argument("--robustness", action="store_true",
                       help="every declared protocol on both seed sets: the default (kept as an alias)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds of each set: exploratory 0, 1, ... and confirmatory 100, 101, ... "
                             "(default: 10, quick: 2)")
    parser.add_argument("--allow-unfrozen", action="store_true",
                        help="run the confirmatory seeds although the code's criteria differ from the committed "
                             "registry (figures/FROZEN.json); the JSONs' confirmations will then fail the tests")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the figures/ folder of the package, the gallery)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small models train fastest on one thread per "
                             "process, and a run's last bits depend on the thread count, which the cache records)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel workers for the training sweeps (default: one per CPU core; 1: in-process)")
    parser.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                        help="where sweeps run: local processes (default), Ray (the cluster of $RAY_ADDRESS, else "
                             "a local one), or SLURM through submitit; results are the same bits on each")


def _error(message: str) -> int:
    print(f"lora-theory figures: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from figures import gallery, registry

    out = args.out if args.out is not None else gallery.DEFAULT_OUT
    all_specs = registry.specs()
    if args.list:
        for spec in all_specs.values():
            print(f"{spec.id:<36} {spec.paper:<22} {spec.claim}")
        return 0
    unknown = [i for i in args.ids if i not in all_specs]
    if unknown:
        return _error(f"argument ids: unknown figure ids {unknown}; see --list")
    if args.freeze:
        if args.redraw:
            return _error("argument --freeze: not with --redraw")
        return _freeze(all_specs, args.ids or None)
    ids = args.ids or list(all_specs)
    if args.redraw:
        return _redraw(ids, all_specs, out)
    if args.workers is not None and args.workers < 1:
        return _error("argument --workers: must be >= 1")
    if args.threads < 1:
        return _error("argument --threads: must be >= 1")
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    if not 1 <= n_seeds <= len(EXPLORATORY_SEEDS):
        return _error(f"argument --seeds: must be in 1..{len(EXPLORATORY_SEEDS)} (the size of each seed set)")
    fidelity = "quick" if args.quick else "large" if args.large else "default"
    assert fidelity in FIDELITIES
    confirm = not args.primary
    if confirm and fidelity != "quick" and not args.allow_unfrozen:
        why = _not_frozen(ids, all_specs)
        if why:
            return _error(f"{why}. The confirmatory seeds are run only against criteria frozen and committed "
                          "before: `lora-theory figures --freeze` (or `make freeze`), commit figures/FROZEN.json "
                          "on its own, then run again (or --primary for a first look on the exploratory seeds; "
                          "--allow-unfrozen to run anyway)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("argument --device: cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = Context(fidelity=fidelity, seeds=EXPLORATORY_SEEDS[:n_seeds], device=device, workers=args.workers,
                  executor=args.executor, robustness=confirm, seed_set="exploratory")
    confirmatory = CONFIRMATORY_SEEDS[:n_seeds] if confirm else None
    plan = {fig_id: _target(out, fig_id, fidelity, confirm) for fig_id in ids}
    for fig_id, where in plan.items():
        if where != out:
            print(f"{fig_id}: {out / (fig_id + '.json')} holds a fuller run (more protocols, a confirmation or a "
                  f"higher fidelity) than this one, which goes to {where / (fig_id + '.json')}", flush=True)
    estimates = _estimates(ids, all_specs, out, fidelity, n_seeds, confirm)
    seeds = gallery.seed_text
    what = ("every protocol, exploratory seeds " + seeds(ctx.seeds) + " then confirmatory seeds "
            + seeds(confirmatory) if confirm else "primary protocol, exploratory seeds " + seeds(ctx.seeds))
    print(f"{len(ids)} figure(s) at {fidelity} fidelity ({what}); estimated {sum(estimates.values()) / 60:.1f} min "
          "from the runtimes in the JSONs there (cached runs take less)", flush=True)
    commit = frozen.head_commit()
    total = time.perf_counter()
    with tqdm(total=max(1e-3, sum(estimates.values())), unit="s", file=sys.stderr, dynamic_ncols=True,
              bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left") as bar:
        for i, fig_id in enumerate(ids, 1):
            bar.set_description(f"[{i}/{len(ids)}] {fig_id}")
            rec = gallery.regenerate(fig_id, ctx, plan[fig_id], confirmatory=confirmatory, commit=commit)
            explo = f" (exploratory: {rec['exploratory']['verdict']})" if "exploratory" in rec else ""
            bar.write(f"[{i}/{len(ids)}] {fig_id}: {rec['verdict']}{explo}: {rec['summary']} ({rec['runtime_s']} s)")
            bar.update(estimates[fig_id])
    paths = [gallery.write_gallery(d) for d in sorted(set(plan.values()))] + _findings(out)
    print(f"wrote {len(ids)} figure(s) and {', '.join(map(str, paths))} in {time.perf_counter() - total:.1f} s")
    return 0


def _findings(out: Path) -> list[Path]:
    """The README's "What the toolkit found" block, regenerated when ``out`` is the package's gallery."""
    from figures import gallery

    if out.resolve() != gallery.DEFAULT_OUT or not gallery.README.exists():
        return []
    return [gallery.write_findings(out)]


def _not_frozen(ids: list[str], all_specs: dict) -> str | None:
    """Why the confirmatory run of ``ids`` is not pre-registered (None when it is): no registry, a registry not
    committed, or criteria that differ from it."""
    if not frozen.REGISTRY.exists():
        return f"no frozen registry {frozen.REGISTRY}"
    if frozen.registry_commit() == "uncommitted":
        return f"the frozen registry {frozen.REGISTRY} has changes that are not committed"
    diffs = frozen.differences({i: all_specs[i] for i in ids})
    diffs = [d for d in diffs if "not a registered figure" not in d]
    if diffs:
        return "the code's criteria differ from the frozen registry: " + "; ".join(diffs)
    return None


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _target(out: Path, fig_id: str, fidelity: str, complete: bool) -> Path:
    """Where a run writes ``fig_id``: ``out``, unless the run is thinner than the JSON there (a first look over a
    run with more protocols or a confirmation, or a lower fidelity): then ``out/first-look`` (never a fuller JSON
    replaced by a thinner one)."""
    old = _load(out / f"{fig_id}.json")
    if old is None:
        return out
    old_complete = "confirmation" in old
    thinner = (_FIDELITY_RANK.get(fidelity, 1) < _FIDELITY_RANK.get(old.get("fidelity"), 1)
               or (old_complete and not complete)
               or (not complete and len(old.get("protocols") or []) > 1))
    return out / FIRST_LOOK if thinner else out


def _estimates(ids: list[str], all_specs: dict, out: Path, fidelity: str, n_seeds: int, confirm: bool) -> dict:
    """Seconds each figure should take, from the runtimes its JSON in ``out`` records (scaled to the protocols, seed
    sets and seeds of this run); the median per-unit cost of the others where a JSON is missing or of another
    fidelity; where none is known, a guess per protocol and seed set (:data:`_GUESS_S`)."""
    unit = {}
    for fig_id in ids:
        old = _load(out / f"{fig_id}.json")
        if old is None or old.get("fidelity") != fidelity or not old.get("runtime_s"):
            continue
        runs = max(1, len(old.get("protocols") or [])) * (2 if "confirmation" in old else 1) * max(1, len(
            old.get("seeds") or [1]))
        unit[fig_id] = float(old["runtime_s"]) / runs
    default = float(np.median(list(unit.values()))) if unit else _GUESS_S.get(fidelity, 30.0) / n_seeds
    out_est = {}
    for fig_id in ids:
        protocols = len(all_specs[fig_id].protocols) if confirm else 1
        out_est[fig_id] = unit.get(fig_id, default) * protocols * (2 if confirm else 1) * n_seeds
    return out_est


def _freeze(all_specs: dict, ids: list[str] | None) -> int:
    before = frozen.hashes() if frozen.REGISTRY.exists() else {}
    path = frozen.write(all_specs, ids=ids)
    after = frozen.hashes(path)
    changed = sorted(i for i in after if before.get(i) != after[i])
    missing = [i for i in all_specs if i not in after]
    print(f"froze {len(ids) if ids else len(after)} figure(s) into {path} ({len(after)} of {len(all_specs)} frozen): "
          + (f"{len(changed)} new or changed ({', '.join(changed)})" if changed else "nothing changed")
          + (f"; not frozen yet: {', '.join(missing)}" if missing else "")
          + ". Commit it on its own before the confirmatory run (git add figures/FROZEN.json && git commit).")
    return 0


def _redraw(ids: list[str], all_specs: dict, out: Path) -> int:
    from figures import gallery

    start = time.perf_counter()
    failed = []
    for fig_id in ids:
        try:
            why = gallery.redraw(all_specs[fig_id], out)
        except Exception as exc:  # one figure's broken draw must not stop the others
            traceback.print_exc()
            why = f"draw failed: {type(exc).__name__}: {exc}"
        if why is not None:
            failed.append(fig_id)
            print(f"{fig_id}: not redrawn: {why}", file=sys.stderr)
    path = ", ".join(map(str, [gallery.write_gallery(out), *_findings(out)]))
    print(f"redrew {len(ids) - len(failed)} of {len(ids)} figure(s) and {path} from their JSONs in "
          f"{time.perf_counter() - start:.1f} s (no training)")
    return 1 if failed else 0

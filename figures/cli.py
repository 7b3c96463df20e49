"""``lora-theory figures``: regenerate figures (``<id>.png`` + ``<id>.json``) and the gallery, or redraw them from
their JSONs. The command's parts follow the command-line contract: :data:`HELP`, :data:`DESCRIPTION`,
:func:`add_arguments`, :func:`run`."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from figures.framework import FIDELITIES, Context

HELP = "regenerate the papers' figures with their claim checks, or redraw them from the saved numbers"
DESCRIPTION = (
    "Regenerate the papers' figures: each figure trains its runs (cached in the run cache, in parallel), judges "
    "its claim by its declared criterion and writes ID.png and ID.json into the output directory, then the "
    "gallery README.md is rebuilt from every JSON there. Without ids, every figure. With --redraw, nothing is "
    "trained: the PNGs are drawn again from the numbers saved in the JSONs, and the gallery is rebuilt."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", help="figure ids (default: all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="list every figure id with its paper and claim")
    parser.add_argument("--redraw", action="store_true",
                        help="redraw the PNGs of the given figures (default: all) from their JSONs in --out and "
                             "rebuild the gallery, without training anything")
    fid = parser.add_mutually_exclusive_group()
    fid.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few steps")
    fid.add_argument("--large", action="store_true", help="closer to the papers' sizes (slow)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 10, quick: 2)")
    parser.add_argument("--robustness", action="store_true",
                        help="run every declared protocol of each figure (the robustness grid), not only the "
                             "primary one")
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
    ids = args.ids or list(all_specs)
    if args.redraw:
        return _redraw(ids, all_specs, out)
    if args.workers is not None and args.workers < 1:
        return _error("argument --workers: must be >= 1")
    if args.threads < 1:
        return _error("argument --threads: must be >= 1")
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    if n_seeds < 1:
        return _error("argument --seeds: must be >= 1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("argument --device: cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    fidelity = "quick" if args.quick else "large" if args.large else "default"
    assert fidelity in FIDELITIES
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = Context(fidelity=fidelity, seeds=tuple(range(n_seeds)), device=device, workers=args.workers,
                  executor=args.executor, robustness=args.robustness)
    total = time.perf_counter()
    for i, fig_id in enumerate(ids, 1):
        print(f"[{i}/{len(ids)}] {fig_id} ({fidelity}) ...", flush=True)
        rec = gallery.regenerate(fig_id, ctx, out)
        print(f"    {rec['verdict']}: {rec['summary']} ({rec['runtime_s']} s)", flush=True)
    path = gallery.write_gallery(out)
    print(f"wrote {len(ids)} figure(s) and {path} in {time.perf_counter() - total:.1f} s")
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
    path = gallery.write_gallery(out)
    print(f"redrew {len(ids) - len(failed)} of {len(ids)} figure(s) and {path} from their JSONs in "
          f"{time.perf_counter() - start:.1f} s (no training)")
    return 1 if failed else 0

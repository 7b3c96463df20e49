"""Benchmark: the main job, ``lora-theory figures`` (every figure, every protocol, both seed sets), timed per figure
and per sweep, with a projection to more workers.

It runs the command in-process (``lora_theory.cli.main(["figures", ...])``, what ``make figures`` runs after
``verify``) with timing hooks that change nothing the command computes: each sweep of a figure
(``toymodels.run_sweep``, one per figure x seed set x protocol) is timed, and the tasks it had to compute (not
cached) are counted by route (batched engine, training loop, pretraining: ``toymodels.sweep.pretrain_tasks``
sees them, so the counts need 2 or more workers). ``--cold`` (or ``LORA_THEORY_CACHE=<empty dir>``, which keeps
the runs) measures from an empty run cache; ``--out`` keeps the JSONs, to compare with the committed gallery.

Projection to W workers (a model, not a measurement; the same for local processes, Ray or SLURM once their
workers are started): the figures and their sweeps run one after another (a figure's protocols are separate
sweeps), so per sweep T_W = ceil(pretrain tasks / W) x t_pre + ceil(fine-tuning tasks / W) x t_task, with t_task
the sweep's own mean task cost (its measured wall time x the workers used, minus its pretrainings, over its
tasks) and t_pre the pretraining cost measured in-process here; plus the time outside sweeps (measure, criteria,
drawing, JSON), which does not parallelise. A sweep's longest task bounds it from below and is not modelled
(a batched task of 16 runs costs more than the mean), so the projection is optimistic where tasks are unequal.

``--quick``: two small figures at the quick fidelity into a temporary folder and cache (the test suite's smoke
run). BENCHMARKS.md records the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

QUICK_IDS = ("allora-prop1-ripple", "lowr-fig3-with-without")
PROJECT_WORKERS = (2, 8, 32)


@contextlib.contextmanager
def _timed_sweeps(log: list[dict]):
    """Record every sweep of the command: figure, seed set, protocol, runs, tasks computed by route, wall time."""
    import toymodels
    from figures import framework, gallery
    from toymodels import sweep as sweep_mod

    real_sweep, real_pre, real_regen = toymodels.run_sweep, sweep_mod.pretrain_tasks, gallery.regenerate
    state: dict = {"figure": None, "pending": None}

    def pretrain_tasks(tasks, threads):
        pre, needs = real_pre(tasks, threads)
        state["pending"] = {"batched": sum(t.kind == "batched" for t in tasks),
                            "batched_runs": sum(len(t.configs) for t in tasks if t.kind == "batched"),
                            "sequential": sum(t.kind == "sequential" for t in tasks), "pretrain": len(pre)}
        return pre, needs

    def run_sweep(configs, **kwargs):
        state["pending"] = None
        start = time.perf_counter()
        try:
            return real_sweep(configs, **kwargs)
        finally:
            wall = time.perf_counter() - start
            pending = state["pending"] or {"batched": 0, "batched_runs": 0, "sequential": 0, "pretrain": 0}
            ctx = state.get("ctx")
            log.append({"figure": state["figure"], "seed_set": getattr(ctx, "seed_set", None),
                        "protocol": getattr(getattr(ctx, "protocol", None), "name", None), "runs": len(configs),
                        "workers": kwargs.get("workers"), "wall_s": wall, **pending})

    def regenerate(fig_id, *args, **kwargs):
        state["figure"] = fig_id
        start = time.perf_counter()
        try:
            return real_regen(fig_id, *args, **kwargs)
        finally:
            log.append({"figure": fig_id, "figure_wall_s": time.perf_counter() - start})

    real_fsweep = framework.sweep

    def fsweep(ctx, runs):
        state["ctx"] = ctx
        return real_fsweep(ctx, runs)

    toymodels.run_sweep, sweep_mod.pretrain_tasks, gallery.regenerate, framework.sweep = (
        run_sweep, pretrain_tasks, regenerate, fsweep)
    try:
        yield
    finally:
        toymodels.run_sweep, sweep_mod.pretrain_tasks, gallery.regenerate, framework.sweep = (
            real_sweep, real_pre, real_regen, real_fsweep)


def pretrain_cost(quick: bool) -> float:
    """Seconds of one pretraining of the toy protocol's base model (MNIST 784-256-256-10 at the default fidelity;
    the quick fidelity's small one with --quick), in this process, on one thread, not cached."""
    import torch

    from figures.framework import Context
    from toymodels import setup
    from toymodels.protocol import base_config

    cfg = base_config(Context(fidelity="quick" if quick else "default"), "mnist").replace(seed=987_654)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        setup.pretrain(cfg, use_cache=False)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def project(log: list[dict], workers: int, t_pre: float) -> float:
    """Projected wall time (s) of the logged command on ``workers`` workers (the model in the module docstring)."""
    sweeps = [e for e in log if "wall_s" in e]
    figures = [e for e in log if "figure_wall_s" in e]
    outside = sum(f["figure_wall_s"] for f in figures) - sum(s["wall_s"] for s in sweeps)
    total = max(0.0, outside)
    for s in sweeps:
        n_tasks = s["batched"] + s["sequential"]
        if n_tasks == 0:
            total += s["wall_s"]  # all cached: loading, not training
            continue
        used = max(1, min(s["workers"] or os.cpu_count() or 1, max(n_tasks, s["pretrain"])))
        t_task = max(0.0, s["wall_s"] * used - s["pretrain"] * t_pre) / n_tasks
        total += math.ceil(s["pretrain"] / workers) * t_pre + math.ceil(n_tasks / workers) * t_task
    return total


def run(ids: list[str] | None = None, quick: bool = False, workers: int | None = None,
        out: Path | None = None, executor: str = "local", primary: bool = False, cold: bool = False) -> dict:
    from benchmarks.bench_finetune import machine
    from benchmarks.bench_sweep import fresh_cache
    from lora_theory import cli

    log: list[dict] = []
    with contextlib.ExitStack() as stack:
        if quick or cold:
            stack.enter_context(fresh_cache())
        if quick:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "out"
            ids = list(QUICK_IDS)
        argv = ["figures", *(ids or [])] + (["--quick"] if quick else []) + (["--out", str(out)] if out else [])
        argv += ["--workers", str(workers)] if workers else []
        argv += ["--executor", executor] if executor != "local" else []
        argv += ["--primary"] if primary else []
        res: dict = {"machine": machine(), "argv": argv, "load_before": os.getloadavg()[0]}
        start = time.perf_counter()
        with _timed_sweeps(log):
            res["rc"] = cli.main(argv)
        res["wall_s"] = time.perf_counter() - start
        res["load_after"] = os.getloadavg()[0]
        res["t_pretrain_s"] = pretrain_cost(quick)
    res["log"] = log
    res["projection_s"] = {w: project(log, w, res["t_pretrain_s"]) for w in PROJECT_WORKERS}
    return res


def report(res: dict) -> str:
    sweeps = [e for e in res["log"] if "wall_s" in e]
    figures = [e for e in res["log"] if "figure_wall_s" in e]
    tot = {k: sum(s[k] for s in sweeps) for k in ("batched", "batched_runs", "sequential", "pretrain", "runs")}
    lines = [f"gallery benchmark: lora-theory {' '.join(res['argv'][1:]) or 'figures'} on {res['machine']} (load "
             f"{res['load_before']:.2f} -> {res['load_after']:.2f}); exit {res['rc']}",
             f"  wall {res['wall_s']:.1f} s ({res['wall_s'] / 60:.1f} min): {len(figures)} figures, {len(sweeps)} "
             f"sweeps of {tot['runs']} runs; computed (not cached): {tot['sequential']} loop runs, "
             f"{tot['batched_runs']} runs in {tot['batched']} batched tasks, {tot['pretrain']} pretrainings",
             f"  time in sweeps {sum(s['wall_s'] for s in sweeps):.1f} s, outside them (measure, criteria, draw, "
             f"JSON) {sum(f['figure_wall_s'] for f in figures) - sum(s['wall_s'] for s in sweeps):.1f} s; "
             f"one pretraining {res['t_pretrain_s']:.2f} s",
             "  per figure (s, runs computed: loop / batched / pretrain):"]
    for f in sorted(figures, key=lambda f: -f["figure_wall_s"]):
        own = [s for s in sweeps if s["figure"] == f["figure"]]
        lines.append(f"    {f['figure']:<38} {f['figure_wall_s']:8.1f}   {sum(s['sequential'] for s in own):5d} / "
                     f"{sum(s['batched_runs'] for s in own):5d} / {sum(s['pretrain'] for s in own):3d}")
    proj = ", ".join(f"{w} workers {t / 60:.1f} min" for w, t in res["projection_s"].items())
    lines.append(f"  projection (model: per sweep ceil(tasks / W) x its mean task cost; see the docstring): {proj}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="figure ids (default: all)")
    parser.add_argument("--quick", action="store_true", help="two small figures at the quick fidelity (smoke run)")
    parser.add_argument("--workers", type=int, default=None, help="as lora-theory figures --workers")
    parser.add_argument("--out", type=Path, default=None, help="as lora-theory figures --out (default: figures/)")
    parser.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                        help="as lora-theory figures --executor (ray: a local cluster on every core unless $RAY_ADDRESS)")
    parser.add_argument("--cold", action="store_true",
                        help="an empty run cache in a temporary folder (deleted afterwards): every run is computed")
    parser.add_argument("--primary", action="store_true", help="as lora-theory figures --primary (the first look)")
    parser.add_argument("--log", type=Path, default=None, help="write the per-sweep log as JSON here")
    args = parser.parse_args(argv)
    res = run(args.ids or None, quick=args.quick, workers=args.workers, out=args.out, executor=args.executor,
              primary=args.primary, cold=args.cold)
    if args.log:
        args.log.write_text(json.dumps(res, indent=1, default=str))
    print(report(res), flush=True)
    return res["rc"]


if __name__ == "__main__":
    sys.exit(main())

"""Sweep benchmark, the user's case (issue 18 item 1): a small sweep on a laptop, 1 worker against 2.

12 MNIST runs: 6 seeds x dropout 0 / 0.1, 300 steps, every other setting at FinetuneConfig's defaults (4096
pretraining images, 500 pretraining steps, 512 fine-tuning images, the full 10000-image test set recorded every
10 steps), on a fresh run cache each time (the 6 pretrainings are part of the sweep), as a new user runs it:

- (1) ``run_sweep(configs, workers=1)``: in-process;
- (2) ``run_sweep(configs, workers=2)``: the calling process and one local worker process (started inside the
  time; ``sweep.CALLER_RUNS_TASKS``): the 6 pretrainings as tasks of their own first, then the batched group of 12
  split at a seed boundary into 2 tasks of 6, each started once its seeds' bases are cached;
- with ``--before``, also (2') the same with ``sweep.CALLER_RUNS_TASKS = False``: two worker processes, the caller
  only coordinating (the scheduling before issue 18's second step);

in interleaved rounds (a change of load hits both alike), with the bit-for-bit check of (2) against (1). Each
time comes with the CPU seconds the sweep used (user + system, the caller and its worker processes): what the
worker processes' start-up adds, less sensitive to other processes on a shared machine than the wall time (on a
quiet 2-core machine, 2 workers take at least half of their CPU seconds). Then the
batched engine's cost per run against its group size (pretrained models cached, in-process, one thread): where a
split stops paying.

Run: ``.venv/bin/python -m benchmarks.bench_sweep_small [--rounds 2] [--before] [--quick]`` (~1.5 min on a quiet
2-core machine, ~2 min with ``--before``; ``--quick``: tiny synthetic protocol, a smoke run in seconds).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from benchmarks.bench_finetune import QUICK_SIZES, machine
from benchmarks.bench_sweep import fresh_cache, load, same_bits
from toymodels import FinetuneConfig, batched, setup, sweep


def configs(quick: bool) -> list[FinetuneConfig]:
    sizes = dict(steps=20, record_every=5, **QUICK_SIZES) if quick else dict(steps=300)
    return [FinetuneConfig(seed=s, dropout=p, **sizes) for s in range(6) for p in (0.0, 0.1)]


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children (the stopped worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_sweep(cfgs, workers: int, caller_runs_tasks: bool = True):
    """(wall seconds, CPU seconds of the caller and its worker processes, histories) of one sweep on a fresh cache,
    its worker processes started inside the time (as in a fresh session) and stopped after it (to count their
    CPU time: a process's time is counted once it is reaped)."""
    sweep.shutdown_workers()
    before = sweep.CALLER_RUNS_TASKS
    sweep.CALLER_RUNS_TASKS = caller_runs_tasks
    try:
        with fresh_cache():
            cpu = cpu_seconds()
            start = time.perf_counter()
            hists = sweep.run_sweep(cfgs, workers=workers, progress=False)
            wall = time.perf_counter() - start
            sweep.shutdown_workers()
            return wall, cpu_seconds() - cpu, hists
    finally:
        sweep.CALLER_RUNS_TASKS = before


def cost_per_run(quick: bool) -> list[tuple[int, float]]:
    """(group size K, seconds per run) of the batched engine, pretrained models cached, in-process."""
    base = configs(quick)
    out = []
    with fresh_cache():
        for c in base[::2]:
            setup.pretrain(c)
        for k in (2, 4, 6, 12):
            group = base[:k]
            start = time.perf_counter()
            batched.finetune_many(group, use_cache=False)
            out.append((k, (time.perf_counter() - start) / k))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sweep_small", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny synthetic protocol, 1 round (smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (1) and (2) (default 2)")
    parser.add_argument("--before", action="store_true",
                        help="also time (2') 2 worker processes with the caller only coordinating, in every round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfgs = configs(args.quick)
    rounds = 1 if args.quick else args.rounds
    print(f"small-sweep benchmark: {len(cfgs)} runs ({'QUICK smoke run, synthetic' if args.quick else 'MNIST, 300 steps'})"
          f", fresh cache, 1 vs 2 workers, {rounds} interleaved round(s) | {machine()}")
    print(f"  plan on 2 workers: {len(sweep.fill_workers(sweep.plan(cfgs), 2))} fine-tuning tasks after the split, "
          f"{len({c.seed for c in cfgs})} pretraining tasks; load average at start: {load()}")
    t1, t2, t2b, bits = [], [], [], []
    for r in range(rounds):
        a, cpu_a, h1 = timed_sweep(cfgs, 1)
        b, cpu_b, h2 = timed_sweep(cfgs, 2)
        t1.append(a)
        t2.append(b)
        bits.append(same_bits(h1, h2))
        extra = ""
        if args.before:
            c, cpu_c, h3 = timed_sweep(cfgs, 2, caller_runs_tasks=False)
            t2b.append(c)
            bits.append(same_bits(h1, h3))
            extra = f"; (2') 2 worker processes {c:6.1f} s: {a / c:.2f}x [{cpu_c:.1f} CPU s]"
        print(f"  round {r + 1}: 1 worker {a:6.1f} s [{cpu_a:.1f} CPU s], 2 workers {b:6.1f} s [{cpu_b:.1f} CPU s]: "
              f"{a / b:.2f}x{extra} (bits equal: {all(bits[-2:] if args.before else bits[-1:])}; load {load()})",
              flush=True)
    print(f"  best: 1 worker {min(t1):.1f} s, 2 workers {min(t2):.1f} s: {min(t1) / min(t2):.2f}x; median ratio "
          f"{float(np.median(np.array(t1) / np.array(t2))):.2f}x"
          + (f"; (2') best {min(t2b):.1f} s: {min(t1) / min(t2b):.2f}x, median ratio "
             f"{float(np.median(np.array(t1) / np.array(t2b))):.2f}x" if t2b else ""))
    costs = cost_per_run(args.quick)
    print("  batched engine, seconds per run by group size (pretrained cached, 1 process): "
          + ", ".join(f"K={k}: {c:.2f}" for k, c in costs))
    sweep.shutdown_workers()
    return 0 if all(bits) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Sweep benchmark, the user's case (issue 18 item 1): a small sweep on a laptop, 1 worker against 2.

12 MNIST runs: 6 seeds x dropout 0 / 0.1, 300 steps, every other setting at FinetuneConfig's defaults (4096
pretraining images, 500 pretraining steps, 512 fine-tuning images, the full 10000-image test set recorded every
10 steps), on a fresh run cache each time (the 6 pretrainings are part of the sweep), as a new user runs it:

- (1) ``run_sweep(configs, workers=1)``: in-process;
- (2) ``run_sweep(configs, workers=2)``: local worker processes (started inside the time): the 6 pretrainings as
  tasks of their own first, then the batched group of 12 split at a seed boundary into 2 tasks of 6;

in interleaved rounds (a change of load hits both alike), with the bit-for-bit check of (2) against (1). Then the
batched engine's cost per run against its group size (pretrained models cached, in-process, one thread): where a
split stops paying.

Run: ``.venv/bin/python -m benchmarks.bench_sweep_small [--rounds 2] [--quick]`` (``--quick``: tiny synthetic
protocol, a smoke run in seconds).
"""

from __future__ import annotations

import argparse
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


def timed_sweep(cfgs, workers: int):
    sweep.shutdown_workers()  # the workers start inside the time, as in a fresh session
    with fresh_cache():
        start = time.perf_counter()
        hists = sweep.run_sweep(cfgs, workers=workers, progress=False)
        return time.perf_counter() - start, hists


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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfgs = configs(args.quick)
    rounds = 1 if args.quick else args.rounds
    print(f"small-sweep benchmark: {len(cfgs)} runs ({'QUICK smoke run, synthetic' if args.quick else 'MNIST, 300 steps'})"
          f", fresh cache, 1 vs 2 workers, {rounds} interleaved round(s) | {machine()}")
    print(f"  plan on 2 workers: {len(sweep.fill_workers(sweep.plan(cfgs), 2))} fine-tuning tasks after the split, "
          f"{len({c.seed for c in cfgs})} pretraining tasks; load average at start: {load()}")
    t1, t2, bits = [], [], []
    for r in range(rounds):
        a, h1 = timed_sweep(cfgs, 1)
        b, h2 = timed_sweep(cfgs, 2)
        t1.append(a)
        t2.append(b)
        bits.append(same_bits(h1, h2))
        print(f"  round {r + 1}: 1 worker {a:6.1f} s, 2 workers {b:6.1f} s: {a / b:.2f}x (bits equal: {bits[-1]}; "
              f"load {load()})", flush=True)
    print(f"  best: 1 worker {min(t1):.1f} s, 2 workers {min(t2):.1f} s: {min(t1) / min(t2):.2f}x; median ratio "
          f"{float(np.median(np.array(t1) / np.array(t2))):.2f}x")
    costs = cost_per_run(args.quick)
    print("  batched engine, seconds per run by group size (pretrained cached, 1 process): "
          + ", ".join(f"K={k}: {c:.2f}" for k, c in costs))
    sweep.shutdown_workers()
    return 0 if all(bits) else 1


if __name__ == "__main__":
    sys.exit(main())

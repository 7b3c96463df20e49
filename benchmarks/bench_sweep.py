"""Sweep benchmark (issue 8): 64 default-protocol MNIST fine-tuning runs (4 dropout rates x 16 seeds), cold cache.

Side by side in one process, each mode with its own empty run cache, in two variants: "cold" (nothing cached:
each mode pays the 16 pretrainings too) and "pretrained" (the 16 pretrained base models copied into the empty
cache beforehand: the sweep of fine-tuning runs proper, as in a figure run after the first, whose base models
are shared by every figure):

- (a) today's sequential ``run_sweep``: one run after another through the loop, in-process, 1 torch thread;
- (b) ``run_sweep(workers=W, batched=False)``: the loop in W local worker processes;
- (c) ``run_sweep(workers=W)``: batched routing (groups of <= 16 runs to ``finetune_many``) + W workers;
  (c') the same sweep again on the workers of (c), which a process keeps for its next sweep (pretrained only);
- (d) ``run_sweep(executor="ray", workers=W)``: (c) on a local Ray cluster (``ray.init(num_cpus=W)``; its
  start-up is timed apart).

Then the Ray overhead per task (tiny runs, 1 and 2 workers, against the same tasks in-process) and a projection
of a sweep to 8, 32 and 128 workers from the measured per-run cost and overhead::

    T(W) = start-up + ceil(tasks / W) * (cost per task + overhead per task)

The 16 pretrainings alone are timed too (in-process, one after the other). (b) runs only cold. The local
modes (b), (c) start their workers inside their time (spawn, imports), except (c').

Run: ``.venv/bin/python -m benchmarks.bench_sweep [--quick] [--workers 2] [--json out.json]`` (``--quick``: 2
rates x 2 seeds, 10 steps of a tiny synthetic protocol: a smoke run). The bit-for-bit check at the end compares (b), (c), (d) with the
in-process result of the same routing (np.array_equal on every history array), cold and pretrained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_finetune import QUICK_SIZES, machine  # one machine description, one quick protocol
from toymodels import setup, sweep
from toymodels.config import FinetuneConfig


def sweep_configs(quick: bool) -> list[FinetuneConfig]:
    """toymodels.protocol.base_config's default sizes (784-256-256-10, 4096 pretraining images / 500 steps, 512
    fine-tuning images with a pixel permutation, 2000 test images, 300 steps, records every 25), LoRA r = 8 on
    all layers, input dropout p in (0, 0.1, 0.2, 0.3), seeds 0..15. Quick: a smoke run in seconds (2 rates x 2
    seeds, 10 steps, the quick sizes of bench_finetune: synthetic data, a 64-32-32-10 MLP)."""
    if quick:
        return [FinetuneConfig(dropout=p, seed=s, steps=10, record_every=5, **QUICK_SIZES)
                for p in (0.0, 0.1) for s in range(2)]
    from toymodels.protocol import base_config

    return [base_config("default", dropout=p, seed=s) for p in (0.0, 0.1, 0.2, 0.3) for s in range(16)]


@contextmanager
def fresh_cache(pretrained: str | None = None):
    """An empty run cache for the block; with ``pretrained`` (a cache directory) its pretrained models copied in."""
    before = os.environ.get("LORA_THEORY_CACHE")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as root:
        if pretrained is not None:
            shutil.copytree(Path(pretrained) / "pretrain", Path(root) / "pretrain")
        os.environ["LORA_THEORY_CACHE"] = root
        try:
            yield root
        finally:
            if before is None:
                del os.environ["LORA_THEORY_CACHE"]
            else:
                os.environ["LORA_THEORY_CACHE"] = before


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def same_bits(a, b) -> bool:
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)
               for x, y in zip(a, b, strict=True))


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rates x 2 seeds, 10 steps, tiny synthetic protocol (smoke run)")
    parser.add_argument("--workers", type=int, default=2, help="workers of (b), (c), (d) (default 2)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out (d) and the Ray overhead")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    W = args.workers
    configs = sweep_configs(args.quick)
    n = len(configs)
    print(f"sweep benchmark: {n} runs ({'QUICK smoke run, synthetic' if args.quick else 'MNIST, default protocol'}), "
          f"cold cache per mode, "
          f"{W} workers | {machine()}")
    print(f"  1-min/5-min/15-min load average at start: {load()}")
    rows, out = [], {"runs": n, "workers": W, "machine": machine(), "load_start": load()}
    with fresh_cache() as models:  # the 16 pretrained models, once, into a cache the "pretrained" variants copy
        seeds = {c.seed: c for c in configs}
        t_pre, _ = timed(lambda: [setup.pretrain(c) for c in seeds.values()])
        print(f"  {len(seeds)} pretrainings, in-process, one after the other: {t_pre:.1f} s "
              f"({t_pre / len(seeds):.2f} s each)", flush=True)
        out["pretraining_s"] = t_pre
        return _modes(configs, W, args, rows, out, models)


def _modes(configs, W, args, rows, out, models) -> int:
    n = len(configs)

    def mode(key, label, variant, warm=False, **kwargs):
        if not warm:
            sweep.shutdown_workers()  # every local mode starts its workers (spawn + imports) inside its time
        with fresh_cache(models if variant == "pretrained" else None):
            t, hists = timed(lambda: sweep.run_sweep(configs, progress=False, **kwargs))
        rows.append((key, label, variant, t))
        print(f"  {key} {label:<46} {variant:<10} {t:8.1f} s   {n / t:6.2f} runs/s   load {load()}", flush=True)
        return t, hists

    h, bits = {}, {}
    for variant in ("cold", "pretrained"):
        _, h["a", variant] = mode("(a)", "sequential run_sweep (loop, in-process)", variant, workers=1, batched=False)
        if variant == "cold":
            _, h["b", variant] = mode("(b)", f"workers={W}, loop", variant, workers=W, batched=False)
            bits["(b) == (a)"] = same_bits(h["b", variant], h["a", variant])
        _, h["c", variant] = mode("(c)", f"workers={W}, batched routing", variant, workers=W)
        if variant == "pretrained":  # the same sweep again on the idle workers of the previous one
            _, h["cw", variant] = mode("(c')", "as (c), workers already started", variant, warm=True, workers=W)
            bits["(c') == (c)"] = same_bits(h["cw", variant], h["c", variant])
        _, h["ref", variant] = mode("(r)", "batched routing in-process (the bit reference)", variant, workers=1)
        bits[f"(c) == batched in-process, {variant}"] = same_bits(h["c", variant], h["ref", variant])
    ray_numbers = {}
    if not args.skip_ray:
        import ray

        t_start, _ = timed(lambda: ray.init(num_cpus=W, include_dashboard=False, log_to_driver=False))
        print(f"  Ray start-up (ray.init(num_cpus={W})): {t_start:.1f} s")
        for variant in ("cold", "pretrained"):
            _, h_d = mode("(d)", f"Ray, {W} workers, batched routing", variant, executor="ray", workers=W)
            bits[f"(d) == batched in-process, {variant}"] = same_bits(h_d, h["ref", variant])
        ray_numbers = ray_overhead(ray)
        ray_numbers["startup_s"] = t_start
        ray.shutdown()
        out["ray"] = ray_numbers
    times = {(key, variant): t for key, _, variant, t in rows}
    for variant in ("cold", "pretrained"):
        t_seq = times["(a)", variant]
        print(f"  speed-up over (a), {variant}: " + ", ".join(
            f"{m} {t_seq / t:.2f}x" for (m, v), t in times.items() if v == variant and m != "(a)"))
    print("  bit for bit: " + ", ".join(f"{k} {v}" for k, v in bits.items()))
    per_run_loop = times["(a)", "cold"] / n
    per_run_batched = times["(r)", "cold"] / n
    print(f"  measured cost per run on 1 core (cold: pretraining included): loop {per_run_loop:.2f} s, batched "
          f"(groups of 16) {per_run_batched:.2f} s; pretrained: loop {times['(a)', 'pretrained'] / n:.2f} s, "
          f"batched {times['(r)', 'pretrained'] / n:.2f} s")
    if ray_numbers:
        projection(n, per_run_loop, per_run_batched, ray_numbers)
    out.update(modes={f"{key} {label} [{variant}]": t for key, label, variant, t in rows}, bit_for_bit=bits,
               cost_per_run_loop_s=per_run_loop, cost_per_run_batched_s=per_run_batched, load_end=load())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def ray_overhead(ray) -> dict:
    """Overhead per task of Ray: tiny runs (synthetic 8-16-16-4, 1 step, pretraining cached) as 1-config tasks,
    on Ray with 1 and 2 workers against the same tasks in-process."""
    tiny = [FinetuneConfig(dataset="synthetic", widths=(8, 16, 16, 4), n_pretrain=64, n_finetune=32, n_test=64,
                           pretrain_steps=5, steps=1, batch_size=8, method="dora", seed=0, lr=1e-3 * (1 + i))
            for i in range(24)]
    res = {}
    with fresh_cache():
        sweep.run_sweep(tiny[:1], workers=1, progress=False, use_cache=True)  # the pretrained model, cached
        t_in, _ = timed(lambda: sweep.run_sweep(tiny, workers=1, progress=False, use_cache=False))
        for w in (1, 2):
            sweep.run_sweep(tiny[:2], executor="ray", workers=w, progress=False, use_cache=False)  # warm workers
            t_ray, _ = timed(lambda w=w: sweep.run_sweep(tiny, executor="ray", workers=w, progress=False,
                                                         use_cache=False))
            res[f"overhead_per_task_s_{w}w"] = (t_ray * w - t_in) / len(tiny)
            print(f"  Ray overhead per task, {w} worker(s): {1e3 * res[f'overhead_per_task_s_{w}w']:.0f} ms "
                  f"({len(tiny)} tiny tasks: Ray {t_ray:.2f} s, in-process {t_in:.2f} s)")
    return res


def projection(n: int, per_run_loop: float, per_run_batched: float, ray_numbers: dict) -> None:
    """T(W) = start-up + ceil(tasks / W) * (cost per task + overhead per task), for this sweep and for a
    robustness sweep 30x larger (10 seeds x ~4 protocols per claim over ~20 claims, ~2000 runs)."""
    overhead = max(ray_numbers.get("overhead_per_task_s_1w", 0.0), 0.0)
    start = ray_numbers.get("startup_s", 0.0)
    print("  projection on Ray (ideal cluster: no contention, one worker per core), "
          "T(W) = start-up + ceil(tasks/W) * (cost + overhead):")
    for runs in (n, 30 * n):
        for label, tasks, cost in (("loop, 1 run/task", runs, per_run_loop),
                                   ("batched, 16 runs/task", math.ceil(runs / 16), 16 * per_run_batched)):
            cells = []
            for w in (8, 32, 128):
                cells.append(f"W={w}: {start + math.ceil(tasks / w) * (cost + overhead):7.1f} s")
            print(f"    {runs:5d} runs, {label:<22} " + "  ".join(cells))


if __name__ == "__main__":
    sys.exit(main())

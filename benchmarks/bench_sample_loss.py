"""Benchmark: ``analysis.dropout.sample_loss`` vs the straightforward per-realisation loop.

The loop is what a user would write: for each realisation, a full forward pass with torch dropout
(``x W^T + dropout(x A^T) B^T``) and the squared error. ``sample_loss`` computes the frozen path once and
draws chunks of masks at a time. Both run in the same process on the same problem
(N=512, d_in=784, r=8, d_out=10, p=0.1), and the ratio of realisations per second is reported.
"""

from __future__ import annotations

import platform
import resource
import time

import numpy as np
import torch

from analysis import dropout as dr


def _problem(N=512, d_in=784, r=8, d_out=10, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((N, d_in))
    Y = rng.normal(size=(N, d_out))
    W = rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)
    A = rng.uniform(-1, 1, size=(r, d_in)) / np.sqrt(d_in)
    B = rng.normal(size=(d_out, r)) * 0.1
    return X, Y, W, A, B


def naive_loop(X, Y, W, A, B, p, n, placement="bottleneck", seed=0) -> np.ndarray:
    """n realisations with torch dropout and a full forward pass each (float64)."""
    torch.manual_seed(seed)
    Xt, Yt, Wt, At, Bt = (torch.tensor(v) for v in (X, Y, W, A, B))
    drop = torch.nn.Dropout(p)
    out = np.empty(n)
    with torch.no_grad():
        for i in range(n):
            if placement == "bottleneck":
                pred = Xt @ Wt.T + drop(Xt @ At.T) @ Bt.T
            else:
                pred = Xt @ Wt.T + (drop(Xt) @ At.T) @ Bt.T
            out[i] = ((Yt - pred) ** 2).sum().item()
    return out


def _rate(fn, n) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    values = fn(n)
    return n / (time.perf_counter() - start), values


def run(quick: bool = False) -> dict:
    X, Y, W, A, B = _problem()
    p = 0.1
    n_loop, n_fast = (8, 400) if quick else (2_000, 200_000)
    results = {}
    for placement in ("bottleneck", "input"):
        nf = n_fast if placement == "bottleneck" else n_fast // 20
        loop_rate, loop_vals = _rate(lambda n, pl=placement: naive_loop(X, Y, W, A, B, p, n, pl), n_loop)
        fast_rate, fast_vals = _rate(lambda n, pl=placement: dr.sample_loss(X, Y, W, A, B, p, n, placement=pl), nf)
        mu = dr.expected_loss(X, Y, W, A, B, p, placement=placement)
        sd = dr.loss_variance(X, Y, W, A, B, p, placement=placement) ** 0.5
        results[placement] = dict(
            loop_per_s=loop_rate, fast_per_s=fast_rate, ratio=fast_rate / loop_rate,
            z_loop=(loop_vals.mean() - mu) / (sd / np.sqrt(len(loop_vals))),
            z_fast=(fast_vals.mean() - mu) / (sd / np.sqrt(len(fast_vals))),
        )
    results["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def main(quick: bool = False) -> int:
    print(f"sample_loss benchmark: N=512, d_in=784, r=8, d_out=10, p=0.1 | {platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    res = run(quick)
    for placement in ("bottleneck", "input"):
        r = res[placement]
        print(f"  {placement:<10}  loop {r['loop_per_s']:10.0f}/s   sample_loss {r['fast_per_s']:10.0f}/s   "
              f"ratio {r['ratio']:6.1f}x   (sanity: z of means vs exact E[L]: loop {r['z_loop']:+.2f}, "
              f"fast {r['z_fast']:+.2f})")
    print(f"  peak RSS {res['max_rss_MiB']:.0f} MiB (sample_loss chunks are capped at 4 MiB by default)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``lora-theory diagnose`` on a Llama-shaped model (issue 17 item 1): adapter only, --base, --base --calibration.

The model of the issue: hidden 1024, intermediate 2816, 16 layers, 16 heads (8 key-value heads), vocabulary 32000,
254 M parameters, random weights built from a config (no download), saved as safetensors; an all-linear r = 16
adapter (112 layers) with a trained-like B (Gaussian, so that m is a few percent); a calibration batch of 8 x 512
random token ids. Each run is a fresh ``python -m diagnose.cli`` process (imports included), timed wall-clock,
with its peak RSS (``ru_maxrss`` of the child). Then the per-layer costs (and which path ``base_quantities`` took:
truncated, exact, or exact after an undetermined truncated verdict) at the shapes of a 7B Llama
(4096 x 4096 and 11008 x 4096 / 4096 x 11008, r = 16) and a projection to a 7B all-linear adapter (32 layers x 7
modules) from them; the calibration forward pass is projected from the measured one by the parameter ratio.

    python -m benchmarks.bench_diagnose [--quick] [--work DIR] [--skip-base] [--skip-calibration]

``--quick``: a tiny model, every path once (the test suite runs it). The model is written once to ``--work``
(default ``$TMPDIR/lora-theory-bench-diagnose``) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
R, ALPHA, DROPOUT = 16, 32, 0.05


def build(work: Path, quick: bool) -> dict:
    """The base model, the adapter and the calibration file under ``work`` (built once)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = QUICK if quick else FULL
    n_cal, t_cal = (2, 16) if quick else (8, 512)
    paths = {"base": work / "base", "adapter": work / "adapter", "calibration": work / "calibration.npy"}
    stamp = work / "built.json"
    want = {"config": cfg, "r": R, "alpha": ALPHA, "calibration": [n_cal, t_cal]}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(p.exists() for p in paths.values()):
        return paths
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(paths["base"])  # safetensors
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                  target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(paths["adapter"])
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], (n_cal, t_cal))
    np.save(paths["calibration"], ids)
    stamp.write_text(json.dumps(want))
    return paths


def timed_cli(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, last lines) of ``python -m diagnose.cli ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run([sys.executable, '-m', 'diagnose.cli', *sys.argv[1:]], capture_output=True, text=True)\n"
            "dt = time.perf_counter() - t\n"
            "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(p.returncode, dt, rss)\nprint(p.stdout[-400:] + p.stderr[-800:])\n")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    head, _, tail = out.stdout.partition("\n")
    rc, dt, rss = head.split()
    if rc != "0":
        raise RuntimeError(f"diagnose {' '.join(args)} exited {rc}: {tail}")
    return float(dt), float(rss), tail


def per_layer_costs(quick: bool) -> dict:
    """Seconds per layer of each step at the 7B shapes (r = 16), median of ``reps`` runs."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from diagnose.quantities import DropoutStatistics, adapter_quantities, base_quantities

    shapes = [(64, 64), (128, 64)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    tokens = 32 if quick else 512
    reps = 1
    rng = np.random.default_rng(0)
    out = {}
    for d_out, d_in in shapes:
        W = rng.standard_normal((d_out, d_in)) * 0.02
        A = rng.uniform(-1, 1, (R, d_in)) / np.sqrt(d_in)
        B = 0.02 * rng.standard_normal((d_out, R))
        X = rng.standard_normal((tokens, d_in))
        costs, info = {}, {}
        steps = (("adapter", lambda A=A, B=B: adapter_quantities(A, B, 2.0, use_rslora=False)),
                 ("base", lambda W=W, A=A, B=B, info=info: base_quantities(W, A, B, 2.0, info=info)),
                 ("calibration_per_512_tokens", lambda A=A, B=B, X=X: DropoutStatistics(A, B, 2.0, 0.05).add(X)))
        for name, fn in steps:
            times = []
            for _ in range(reps):
                with threadpool_limits(limits=1):  # as lora-theory diagnose runs them (--threads 1)
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
            costs[name] = float(np.median(times))
        out[f"{d_out}x{d_in}"] = {**costs, "solver": info["solver"]}
    return out


def project_7b(costs: dict, forward_s_per_param_token: float | None, tokens: int) -> dict:
    """A 7B Llama all-linear adapter: 32 layers x (q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096; down:
    4096 x 11008); the calibration forward pass from the measured seconds per parameter-token."""
    n = {"4096x4096": 4 * 32, "11008x4096": 2 * 32, "4096x11008": 32}
    out = {}
    for step in ("adapter", "base", "calibration_per_512_tokens"):
        out[step] = sum(n[s] * costs[s][step] for s in n)
    out["calibration_stats"] = out.pop("calibration_per_512_tokens") * tokens / 512
    out["calibration_forward"] = None if forward_s_per_param_token is None else \
        forward_s_per_param_token * 6.74e9 * tokens
    return out


def main(argv: list[str] | None = None, quick: bool | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, every path once (a smoke run)")
    parser.add_argument("--work", type=Path, default=None, help="where the model and adapter are written")
    parser.add_argument("--skip-base", action="store_true", help="only the adapter-only run")
    parser.add_argument("--skip-calibration", action="store_true", help="no --calibration run")
    args = parser.parse_args([] if argv is None and quick is not None else argv)
    quick = args.quick or bool(quick)
    work = args.work or Path(tempfile.gettempdir()) / f"lora-theory-bench-diagnose{'-quick' if quick else ''}"
    t = time.perf_counter()
    paths = build(work, quick)
    print(f"diagnose benchmark: {'tiny (quick)' if quick else 'Llama-shaped 254 M'} model and all-linear r={R} "
          f"adapter in {work} ({time.perf_counter() - t:.1f} s to build or find); load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    runs = [("adapter only", [str(paths["adapter"]), "--quiet"])]
    if not args.skip_base:
        runs.append(("--base", [str(paths["adapter"]), "--base", str(paths["base"]), "--quiet"]))
        if not args.skip_calibration:
            runs.append(("--base --calibration", [str(paths["adapter"]), "--base", str(paths["base"]),
                                                  "--calibration", str(paths["calibration"]), "--quiet"]))
    rows = {}
    for name, cli_args in runs:
        dt, rss, _ = timed_cli(cli_args)
        rows[name] = (dt, rss)
        print(f"  {name:<24} {dt:8.1f} s   peak RSS {rss:7.0f} MB   (load {os.getloadavg()[0]:.2f})")
    costs = per_layer_costs(quick)
    print("  per layer at the 7B shapes (r=16, s):")
    for shape, c in costs.items():
        print(f"    {shape:<11} adapter {c['adapter']:.3f}  base {c['base']:.3f}  "
              f"calibration stats per 512 tokens {c['calibration_per_512_tokens']:.3f}  ({c['solver']} path)")
    if not quick:
        forward = None
        if "--base --calibration" in rows and "--base" in rows:
            # what calibration adds (loading the model with transformers, the forward pass, the statistics), per
            # parameter-token: an upper bound of the forward pass's cost, scaled to 7B
            extra = rows["--base --calibration"][0] - rows["--base"][0]
            forward = max(extra, 0.0) / (254e6 * 8 * 512)
        proj = project_7b(costs, forward, tokens=8 * 512)
        total_base = proj["adapter"] + proj["base"]
        print(f"  7B all-linear (224 layers) projection: adapter only {proj['adapter']:.0f} s of numerics; --base "
              f"{total_base:.0f} s (+ reading 13 GB of weights); --calibration 8 x 512 adds "
              f"{proj['calibration_stats']:.0f} s of statistics"
              + (f" and about {proj['calibration_forward']:.0f} s of forward pass" if forward else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

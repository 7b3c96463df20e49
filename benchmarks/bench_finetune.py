"""Benchmark: LoRA fine-tuning throughput for the toy-model protocol, three ways, side by side in one process.

Protocol (ALLoRA sec. 3.4, toymodels defaults): MNIST, a pretrained 784-256-256-10 ReLU MLP, LoRA r = 8
(alpha 8) on all three layers, 512 fine-tuning images, mini-batches of 64, Adam lr 1e-3, cross-entropy.

  (a) the straightforward way: a torch Dataset + DataLoader(batch_size=64, shuffle=True), HF PEFT's
      ``get_peft_model`` on the pretrained MLP, torch.optim.Adam, one configuration at a time;
  (b) the sequential engine: ``toymodels.loop.TrainingRun``, the one training loop that ``loop.finetune``
      runs (tensors on the device, mini-batches by index, LoRALinear, torch.optim.Adam, ``loss.item()`` every
      step, callbacks: none with recorders off), one configuration at a time;
  (c) the batched engine ``toymodels.batched`` for K = 1, 4, 16 runs (K lrs of one seed, or 4 seeds x 4 lrs);
      throughput is run-steps/s = K * steps/s;
  (d) the alternative measured for (c): ``torch.func`` — vmap(grad_and_value) of a ``functional_call`` of the
      LoRA model over K stacked adapters, torch.optim.Adam on the stacked tensors (K = 16, one seed, p = 0).

Only the training loop is timed (no evaluation: recorders off); each engine's one-time set-up (data, pretrained
model, PEFT injection, the batched engine's precomputation) is reported apart. The engines are timed in
interleaved rounds, so a change of load on the (shared) machine hits all of them alike. The table shows, per
engine, the best round (the least disturbed: the usual estimate of the speed on an idle machine, as timeit
reports) and the median over rounds; "x (a)" and "x (b)" are the ratios of the best rounds, followed by the
median of the round-by-round ratios.

A last line times what a user runs end to end, recording included: 4 configs (2 seeds x 2 lrs) with the default
recorders ("loss", "norms" every 10 steps: train and test loss on all 512 + 10000 images), ``loop.finetune``
one by one against one ``batched.finetune_many`` call (no cache; set-up included).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from toymodels import batched, config, loop, setup

LRS = (1e-3, 2e-3, 5e-4, 3e-3)


# --quick: a smoke run of every engine in seconds (the test suite runs it): synthetic data, a 64-32-32-10 MLP
QUICK_SIZES = dict(dataset="synthetic", widths=(64, 32, 32, 10), n_pretrain=256, pretrain_steps=20, n_finetune=128,
                   n_test=128)


def base_config(steps: int, dropout: float = 0.0, quick: bool = False) -> config.FinetuneConfig:
    """The protocol with recording off (record_every = steps: one record at the end, no evaluation)."""
    sizes = QUICK_SIZES if quick else dict(dataset="mnist")
    return config.FinetuneConfig(steps=steps, dropout=dropout, recorders=(), record_every=steps, **sizes)


# ---------------------------------------------------------------------------------------------- the engines
# each factory does its set-up and returns a function that runs the configured steps and returns the losses


def peft_dataloader(cfg: config.FinetuneConfig) -> Callable[[], list[float]]:
    """(a) Dataset + DataLoader(64, shuffle) + HF PEFT LoRA on the pretrained MLP + Adam."""
    import peft
    from torch.utils.data import DataLoader, TensorDataset

    device = torch.device("cpu")
    x, y = setup.protocol_data(cfg, device).finetune
    model = copy.deepcopy(setup.pretrain(cfg, device))
    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=["layers.0", "layers.1", "layers.2"])
    model = peft.get_peft_model(model, lora)
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=cfg.batch_size, shuffle=True,
                        generator=cfg.streams.generator("batches"))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    def run() -> list[float]:
        cfg.streams.seed_global("masks")
        model.train()
        losses: list[float] = []
        while len(losses) < cfg.steps:
            for xb, yb in loader:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if len(losses) == cfg.steps:
                    break
        return losses

    return run


def sequential(cfg: config.FinetuneConfig) -> Callable[[], list[float]]:
    """(b) The engine's training loop (``loop.TrainingRun``: what ``loop.finetune`` runs, without the cache)."""
    run = loop.TrainingRun(cfg, torch.device("cpu"))

    def train_loop() -> list[float]:
        return list(run.train()["batch_loss"])

    return train_loop


def batched_engine(configs: list[config.FinetuneConfig]) -> Callable[[], list[float]]:
    """(c) toymodels.batched: all configs in one loop; returns the first run's losses."""
    engine = batched._Batch(configs, torch.device("cpu"))

    def run() -> list[float]:
        return list(engine.run()[0]["batch_loss"])

    return run


def torch_func(configs: list[config.FinetuneConfig]) -> Callable[[], list[float]]:
    """(d) torch.func: vmap over K stacked adapters of grad_and_value(functional_call(LoRA model)), one seed."""
    from torch.func import functional_call, grad_and_value, vmap

    cfg = configs[0]
    if len({(c.seed, c.lr) for c in configs}) != 1 or any(c.dropout for c in configs):
        raise ValueError("configs must share seed and lr and have no dropout for the torch.func variant")
    device = torch.device("cpu")
    x, y = setup.protocol_data(cfg, device).finetune
    model = setup.build_finetune_model(cfg, device)
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    stacked = {n: p.detach().expand(len(configs), *p.shape).clone() for n, p in model.named_parameters()
               if p.requires_grad}
    opt = torch.optim.Adam(list(stacked.values()), lr=cfg.lr)  # elementwise: per-run Adam on stacked tensors

    def loss_fn(params, xb, yb):
        return nn.functional.cross_entropy(functional_call(model, {**params, **frozen}, (xb,)), yb)

    step_fn = vmap(grad_and_value(loss_fn), in_dims=(0, None, None))

    def run() -> list[float]:
        gen = cfg.streams.generator("batches")
        losses = []
        for idx in setup.minibatches(len(y), cfg.batch_size, cfg.steps, gen):
            grads, loss = step_fn(stacked, x[idx], y[idx])
            for n, p in stacked.items():
                p.grad = grads[n]
            opt.step()
            losses.append(loss[0].item())
        return losses

    return run


# ------------------------------------------------------------------------------------------------ measuring


def _timed(factory: Callable[[], Callable[[], list[float]]]) -> tuple[float, float, list[float]]:
    """(set-up seconds, loop seconds, losses)."""
    start = time.perf_counter()
    run = factory()
    set_up = time.perf_counter() - start
    start = time.perf_counter()
    losses = run()
    return set_up, time.perf_counter() - start, losses


def cases(steps: int, quick: bool = False) -> list[tuple[str, str, int, Callable]]:
    """(label, kind, runs K, factory) for every engine and configuration set measured."""
    out = []
    for p in (0.0, 0.1):
        c = base_config(steps, p, quick)
        one_seed = [c.replace(lr=LRS[i % 4] * (1 + i // 4)) for i in range(16)]
        four_seeds = [c.replace(seed=s, lr=lr) for s in range(4) for lr in LRS]
        tag = f"p={p}"
        out += [
            (f"{tag} (a) DataLoader + PEFT", "a", 1, lambda c=c: peft_dataloader(c)),
            (f"{tag} (b) sequential engine", "b", 1, lambda c=c: sequential(c)),
            (f"{tag} (c) batched K=1", "c", 1, lambda c=c: batched_engine([c])),
            (f"{tag} (c) batched K=4 (1 seed x 4 lr)", "c", 4, lambda cs=one_seed[:4]: batched_engine(cs)),
            (f"{tag} (c) batched K=16 (1 seed x 16 lr)", "c", 16, lambda cs=one_seed: batched_engine(cs)),
            (f"{tag} (c) batched K=16 (4 seeds x 4 lr)", "c", 16, lambda cs=four_seeds: batched_engine(cs)),
        ]
        if p == 0:
            out.append((f"{tag} (d) torch.func vmap K=16 (1 seed, 1 lr)", "d", 16,
                        lambda c=c: torch_func([c] * 16)))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"numpy {np.__version__}, Python {platform.python_version()}")


def run(quick: bool = False, rounds: int | None = None) -> dict:
    steps = 8 if quick else 200
    rounds = rounds or (1 if quick else 5)
    todo = cases(steps, quick)
    # warm up: pretrained models (cached on disk after the first time) and a short run of every engine
    for s in range(4):
        setup.pretrain(base_config(steps, quick=quick).replace(seed=s))
    for _, _, _, factory in cases(2 if quick else 8, quick):
        factory()()
    loads = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {label: [] for label, *_ in todo}
    setups: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, _, _, factory in todo:
            set_up, elapsed, loss = _timed(factory)
            times[label].append(elapsed)
            setups[label] = set_up
            losses[label] = loss
        loads.append(os.getloadavg()[0])
    return dict(steps=steps, rounds=rounds, cases=todo, times=times, setups=setups, losses=losses, loads=loads)


def end_to_end(steps: int, quick: bool = False) -> tuple[float, float, float]:
    """(sequential seconds, batched seconds, max relative difference of the test losses) for 4 default runs."""
    sizes = QUICK_SIZES if quick else {}
    configs = [config.FinetuneConfig(seed=s, lr=lr, steps=steps, **sizes) for s in (0, 1) for lr in LRS[:2]]
    start = time.perf_counter()
    seq = [loop.finetune(c, use_cache=False) for c in configs]
    t_seq = time.perf_counter() - start
    start = time.perf_counter()
    bat = batched.finetune_many(configs, use_cache=False)
    t_bat = time.perf_counter() - start
    diff = max(float(np.max(np.abs(a["test_loss"] - b["test_loss"]) / a["test_loss"])) for a, b in zip(seq, bat,
                                                                                                         strict=True))
    return t_seq, t_bat, diff


def main(quick: bool = False, strict: bool = False) -> int:
    """Print the table; returns 1 (raises RuntimeError if ``strict``) when (b) and (c) K=1 disagree."""
    if quick:  # a smoke run: one thread, so that it stays seconds on a loaded machine (no spinning thread pool)
        torch.set_num_threads(1)
    what = ("QUICK smoke run (synthetic data, 64-32-32-10 MLP, 128 images)" if quick else
            "MNIST, 784-256-256-10 MLP, LoRA r=8 on all 3 layers, 512 images")
    print(f"fine-tuning benchmark: {what}, batch 64, Adam | {machine()}")
    res = run(quick)
    steps, todo, times = res["steps"], res["cases"], res["times"]
    print(f"  {steps} steps per run, {res['rounds']} interleaved rounds; 1-min load average during the rounds: "
          + " ".join(f"{x:.1f}" for x in res["loads"]))
    print(f"  {'engine':<52} {'run-steps/s: best':>18} {'median':>7} {'x (a): best':>12} {'median':>6} "
          f"{'x (b): best':>12} {'median':>6}  set-up")
    for p in ("p=0.0", "p=0.1"):
        rows = [(label, kind, K) for label, kind, K, _ in todo if label.startswith(p)]
        ref_a = next(label for label, kind, _ in rows if kind == "a")
        ref_b = next(label for label, kind, _ in rows if kind == "b")
        for label, _, K in rows:
            rates = [K * steps / t for t in times[label]]
            ra = [K * ta / t for t, ta in zip(times[label], times[ref_a], strict=True)]
            rb = [K * tb / t for t, tb in zip(times[label], times[ref_b], strict=True)]
            best_a = K * min(times[ref_a]) / min(times[label])
            best_b = K * min(times[ref_b]) / min(times[label])
            print(f"  {label:<52} {max(rates):18.0f} {statistics.median(rates):7.0f} {best_a:12.2f} "
                  f"{statistics.median(ra):6.2f} {best_b:12.2f} {statistics.median(rb):6.2f}  "
                  f"{res['setups'][label]:5.2f} s")
    same = np.allclose(res["losses"]["p=0.0 (b) sequential engine"], res["losses"]["p=0.0 (c) batched K=1"],
                       rtol=1e-4)
    same_p = np.allclose(res["losses"]["p=0.1 (b) sequential engine"], res["losses"]["p=0.1 (c) batched K=1"],
                         rtol=1e-4)
    last = {k: np.mean(v[-8:]) for k, v in res["losses"].items()}
    print(f"  sanity: (b) and (c) K=1 losses equal to rtol 1e-4: p=0 {same}, p=0.1 {same_p}; mean loss of the "
          f"last 8 steps: (a) {last['p=0.0 (a) DataLoader + PEFT']:.3f}, (b) {last['p=0.0 (b) sequential engine']:.3f}"
          f", (c) {last['p=0.0 (c) batched K=1']:.3f} (p=0)")
    t_seq, t_bat, diff = end_to_end(20 if quick else 200, quick)
    print(f"  end to end, 4 runs x {20 if quick else 200} steps with the default recorders: loop.finetune one by one "
          f"{t_seq:.1f} s, batched.finetune_many {t_bat:.1f} s: {t_seq / t_bat:.2f}x (test losses agree to "
          f"{diff:.0e})")
    if strict and not (same and same_p):
        raise RuntimeError("bench_finetune: the batched engine's losses differ from the sequential engine's")
    return 0 if same and same_p else 1


def run_isolated(quick: bool = False) -> None:
    """Run :func:`main` in a child process (its memory and threads then do not show in the benchmarks that
    run after it in ``lora-theory bench``, e.g. their peak RSS); raises CalledProcessError if it fails."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "benchmarks.bench_finetune", *(["--quick"] if quick else [])], check=True)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(quick="--quick" in sys.argv))

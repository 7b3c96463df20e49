"""Setting up a run: its data, the pretrained MLP, the model with LoRA, the optimizer and the mini-batches.

:func:`protocol_data` (the ALLoRA sec. 3.4 protocol's pretrain / fine-tune / test tensors), :func:`pretrain` (the
pretrained MLP, cached), :func:`build_finetune_model` (LoRA injected on ``cfg.targets``, initialised from the
"init" stream), :func:`make_optimizer` and :func:`minibatches` (reshuffled epochs). Both engines (the loop,
:mod:`toymodels.loop`, and the batched engine) set runs up with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from toymodels import cache as run_cache
from toymodels import data as datasets
from toymodels.config import OPTIMIZERS, FinetuneConfig
from toymodels.lora import inject_lora
from toymodels.mlp import MLP, auto_device


def protocol_data(cfg: FinetuneConfig, device: torch.device) -> datasets.FinetuneData:
    """The pretrain / fine-tune / test tensors of the run (ALLoRA sec. 3.4 protocol), in float32."""
    kwargs = dict(n_pretrain=cfg.n_pretrain, n_finetune=cfg.n_finetune, seed=cfg.seed, task_shift=cfg.task_shift,
                  device=device)
    if cfg.n_test is not None:
        kwargs["n_test"] = cfg.n_test
    if cfg.dataset == "synthetic":
        kwargs["synthetic_options"] = {"dim": cfg.widths[0], "n_classes": cfg.widths[-1]}
    return datasets.finetune_protocol(cfg.dataset, **kwargs)



def make_optimizer(name: str, groups, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """torch.optim.SGD / Adam / AdamW (default betas and eps) over ``groups`` (parameters or param groups)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"name must be one of {OPTIMIZERS}, got {name!r}")


def minibatches(n: int, batch: int | None, steps: int, generator: torch.Generator) -> Iterable[torch.Tensor | None]:
    """Indices of each step's mini-batch: reshuffled epochs (``torch.randperm(n, generator)``, the last partial
    batch of an epoch dropped); ``None`` at every step for full batch (``batch`` None or >= n)."""
    if batch is None or batch >= n:
        for _ in range(steps):
            yield None
        return
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            if done == steps:
                return
            yield perm[start:start + batch]
            done += 1



def pretrain(cfg: FinetuneConfig, device: torch.device | None = None, *, use_cache: bool = True) -> MLP:
    """The pretrained MLP of the run's protocol (full weights, Adam, cross-entropy, float32), cached on disk."""
    device = auto_device(device)
    streams = cfg.streams

    def compute():
        streams.seed_global("pretrain")
        data = protocol_data(cfg, device)
        model = MLP(cfg.widths, seed=streams.seed("pretrain"), device=device, activation=cfg.activation)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
        x, y = data.pretrain
        for idx in minibatches(len(y), cfg.pretrain_batch, cfg.pretrain_steps, streams.generator("pretrain")):
            xb, yb = (x, y) if idx is None else (x[idx.to(device)], y[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    state = run_cache.cached("pretrain", cfg.pretrain_dict(), compute) if use_cache else compute()
    model = MLP(cfg.widths, seed=streams.seed("pretrain"), device=device, activation=cfg.activation)  # then loaded
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model



def build_finetune_model(cfg: FinetuneConfig, device: torch.device | None = None) -> MLP:
    """The pretrained MLP (in ``cfg.dtype``) with LoRA injected on ``cfg.targets`` (all else frozen); the
    adapters are initialised on the CPU from the "init" stream (identical numbers on every device)."""
    device = auto_device(device)
    model = pretrain(cfg, device)
    adapter = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, dropout_placement=cfg.placement, method=cfg.method,
                   eta=cfg.eta, init=cfg.init, rank_scaled_init=cfg.rank_scaled_init)
    if cfg.scaling is not None:
        adapter["scaling"] = cfg.scaling
    model.cpu().to(cfg.torch_dtype)
    inject_lora(model, list(cfg.targets), generator=cfg.streams.generator("init"), **adapter)
    return model.to(device)


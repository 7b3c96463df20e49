"""Pretraining and LoRA fine-tuning of the toy MLP, with recorders and a resumable on-disk cache.

One :class:`FinetuneConfig` describes one run completely (data protocol, model, adapter, optimizer, seed,
recorders); :func:`finetune` returns its history as numpy arrays and caches it under the SHA-256 of the
config, so a sweep (:func:`run_sweep`) interrupted at any point resumes where it stopped. Data are tensors on
the device (no DataLoader); mini-batches are drawn from a seeded generator; dropout masks from the global torch
RNG seeded per run, so the same config gives the same numbers on CPU.

``expected_loss=True`` trains LoRA on the last (linear) layer with MSE on the exact expected loss over dropout
masks (ALLoRA fig. 4), a torch transcription of :func:`analysis.dropout.expected_loss` (tested against it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from analysis._inputs import dropout_rate, finite_scalar, positive_int
from toymodels import cache as run_cache
from toymodels import data as datasets
from toymodels.lora import (
    METHODS,
    PLACEMENTS,
    LoRALinear,
    LoWR,
    inject_lora,
    lora_modules,
    lora_plus_param_groups,
)
from toymodels.mlp import MLP, auto_device

ENGINE_VERSION = 1


class TrainingDiverged(FloatingPointError):
    """A run's loss became non-finite; ``step`` is the step at which it happened (1-based)."""

    def __init__(self, step: int, cfg):
        super().__init__(f"non-finite loss at step {step} for {cfg}")
        self.step = step
        self.cfg = cfg
OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("ce", "mse")
RECORDERS = ("loss", "norms", "rows", "grads", "channels", "moments", "grad_std")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines one fine-tuning run (validated at construction, before any training)."""

    dataset: str = "mnist"
    n_pretrain: int = 4096
    n_finetune: int = 512
    n_test: int | None = None
    task_shift: str | None = None
    widths: tuple[int, ...] = (784, 256, 256, 10)
    pretrain_steps: int = 500
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 128
    # adapter
    targets: tuple[str, ...] = ("layers.0", "layers.1", "layers.2")
    r: int = 8
    alpha: float = 8.0
    scaling: str | float | None = None
    dropout: float = 0.0
    placement: str = "input"
    method: str = "lora"
    eta: float = 1.0
    init: str = "kaiming"
    rank_scaled_init: bool = False
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 200
    batch_size: int | None = 64  # None: full batch
    loss: str = "ce"
    expected_loss: bool = False
    lora_plus_ratio: float | None = None
    lowr: tuple[float, float, int] | None = None  # (tau, alpha, every)
    # recording
    seed: int = 0
    record_every: int = 10
    recorders: tuple[str, ...] = ("loss", "norms")
    grad_std_layer: str = "layers.1"
    grad_std_masks: int = 64
    extra: tuple = field(default_factory=tuple)  # free-form tags that must change the cache key

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "recorders", tuple(self.recorders))
        if self.dataset not in ("mnist", "fashion-mnist", "cifar10", "synthetic"):
            raise ValueError(f"dataset must be mnist, fashion-mnist, cifar10 or synthetic, got {self.dataset!r}")
        for name in ("n_pretrain", "n_finetune", "pretrain_steps", "pretrain_batch", "r", "steps", "record_every",
                     "grad_std_masks"):
            positive_int(name, getattr(self, name))
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        dropout_rate(self.dropout, name="dropout")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        unknown = set(self.recorders) - set(RECORDERS)
        if unknown:
            raise ValueError(f"recorders must be among {RECORDERS}, got {sorted(unknown)}")
        finite_scalar("lr", self.lr, positive=True)
        finite_scalar("pretrain_lr", self.pretrain_lr, positive=True)
        finite_scalar("eta", self.eta, positive=True)
        if self.widths[0] != datasets_input_dim(self.dataset) and self.dataset != "synthetic":
            raise ValueError(f"widths[0] must be the input size of {self.dataset} "
                             f"({datasets_input_dim(self.dataset)}), got {self.widths[0]}")
        layer_names = {f"layers.{i}" for i in range(len(self.widths) - 1)}
        bad = [t for t in self.targets if t not in layer_names]
        if bad or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {sorted(layer_names)}, got {self.targets}")
        if self.expected_loss:
            last = f"layers.{len(self.widths) - 2}"
            if self.targets != (last,) or self.loss != "mse" or self.method != "lora":
                raise ValueError("expected_loss=True needs targets=(last layer,), loss='mse' and method='lora' "
                                 f"(the closed form of ALLoRA sec. 3.1); got targets={self.targets}, "
                                 f"loss={self.loss!r}, method={self.method!r}")
        if "grad_std" in self.recorders and self.grad_std_layer not in self.targets:
            raise ValueError(f"grad_std_layer must be one of the targets {self.targets}, got {self.grad_std_layer!r}")
        if self.lowr is not None and len(self.lowr) != 3:
            raise ValueError(f"lowr must be (tau, alpha, every), got {self.lowr!r}")

    def replace(self, **changes) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The cache key's content: every field, the engine version and torch's CPU thread count (float
        reductions, hence the last bits of a run, depend on it; the figures CLI and the tests use 1 thread)."""
        d = {"engine_version": ENGINE_VERSION, "torch_threads": torch.get_num_threads(), **dataclasses.asdict(self)}
        if "grad_std" in self.recorders:
            d["grad_std_rng"] = "forked"  # since the grad_std masks stopped consuming the training RNG
        return d

    def pretrain_dict(self) -> dict:
        keys = ("dataset", "n_pretrain", "n_finetune", "n_test", "task_shift", "widths", "pretrain_steps",
                "pretrain_lr", "pretrain_batch", "seed")
        return {"engine_version": ENGINE_VERSION, "torch_threads": torch.get_num_threads(),
                **{k: getattr(self, k) for k in keys}}


def datasets_input_dim(name: str) -> int:
    return {"mnist": 784, "fashion-mnist": 784, "cifar10": 3072}.get(name, -1)


# --------------------------------------------------------------------------------------------------- data


def protocol_data(cfg: FinetuneConfig, device: torch.device) -> datasets.FinetuneData:
    """The pretrain / fine-tune / test tensors of the run (ALLoRA sec. 3.4 protocol)."""
    kwargs = dict(n_pretrain=cfg.n_pretrain, n_finetune=cfg.n_finetune, seed=cfg.seed, task_shift=cfg.task_shift,
                  device=device)
    if cfg.n_test is not None:
        kwargs["n_test"] = cfg.n_test
    if cfg.dataset == "synthetic":
        kwargs["synthetic_options"] = {"dim": cfg.widths[0], "n_classes": cfg.widths[-1]}
    return datasets.finetune_protocol(cfg.dataset, **kwargs)


def _loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "ce":
        return nn.functional.cross_entropy(logits, y)
    target = nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return ((logits - target) ** 2).sum(dim=1).mean()


def _optimizer(name: str, groups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _batches(n: int, batch: int | None, steps: int, generator: torch.Generator) -> Iterable[torch.Tensor | None]:
    """Indices of each step's mini-batch: reshuffled epochs; ``None`` for full batch."""
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


# ----------------------------------------------------------------------------------------------- pretraining


def pretrain(cfg: FinetuneConfig, device: torch.device | None = None, *, use_cache: bool = True) -> MLP:
    """The pretrained MLP of the run's protocol (full weights, Adam, cross-entropy), cached on disk."""
    device = auto_device(device)

    def compute():
        torch.manual_seed(cfg.seed)
        data = protocol_data(cfg, device)
        model = MLP(cfg.widths, seed=cfg.seed, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        x, y = data.pretrain
        for idx in _batches(len(y), cfg.pretrain_batch, cfg.pretrain_steps, gen):
            xb, yb = (x, y) if idx is None else (x[idx.to(device)], y[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    state = run_cache.cached("pretrain", cfg.pretrain_dict(), compute) if use_cache else compute()
    model = MLP(cfg.widths, seed=cfg.seed, device=device)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return model


# --------------------------------------------------------------------------------------- expected-loss training


def expected_mse(layer: LoRALinear, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact E over dropout masks of the batch-mean MSE of a last-layer LoRA (ALLoRA sec. 3.1), differentiable.

    With target T = one_hot(y), residual R = T - h W^T - b, s the scaling and v = p/(1-p):
    bottleneck: ||R - s h A^T B^T||^2 + v s^2 sum_k ||h a_k||^2 ||b_k||^2; input: the penalty is
    v s^2 sum_j (sum_n h_nj^2) ||(BA)_:j||^2 (see :func:`analysis.dropout.expected_loss`); divided by N.
    """
    A, B, s, p = layer.lora_A, layer.lora_B, layer.scaling, layer.p
    v = p / (1.0 - p)
    target = nn.functional.one_hot(y, B.shape[0]).to(h.dtype)
    resid = target - layer.base(h) - s * (h @ A.T) @ B.T
    if layer.dropout_placement == "bottleneck":
        penalty = ((h @ A.T) ** 2).sum(0) @ (B**2).sum(0)
    else:
        penalty = (h**2).sum(0) @ ((B @ A) ** 2).sum(0)
    return ((resid**2).sum() + v * s**2 * penalty) / h.shape[0]


# ------------------------------------------------------------------------------------------------- fine-tuning


def build_finetune_model(cfg: FinetuneConfig, device: torch.device | None = None) -> MLP:
    """The pretrained MLP with LoRA injected on ``cfg.targets`` (all else frozen)."""
    device = auto_device(device)
    model = pretrain(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    adapter = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, dropout_placement=cfg.placement, method=cfg.method,
                   eta=cfg.eta, init=cfg.init, rank_scaled_init=cfg.rank_scaled_init)
    if cfg.scaling is not None:
        adapter["scaling"] = cfg.scaling
    # initialise on CPU from a CPU generator (identical numbers on every device), then move
    model.cpu()
    inject_lora(model, list(cfg.targets), generator=gen, **adapter)
    return model.to(device)


@torch.no_grad()
def _evaluate(model: MLP, split: datasets.Split, loss_kind: str) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    logits = model(split.x)
    loss = _loss_fn(loss_kind, logits, split.y).item()
    acc = (logits.argmax(1) == split.y).double().mean().item()
    model.train(was_training)
    return loss, acc


def _adapter_output(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution to the layer's output (call in eval mode: no dropout), for every method."""
    return layer(x) - layer.base(x)


def _layer_inputs(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    inputs = []
    for i, layer in enumerate(model.layers):
        inputs.append(x)
        x = layer(x)
        if i < len(model.layers) - 1:
            x = torch.relu(x)
    return inputs


def _grad_std(model: MLP, cfg: FinetuneConfig, xb: torch.Tensor, yb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry std of the gradients of one layer's (A, B) over ``grad_std_masks`` dropout masks, one batch."""
    layer = dict(model.named_modules())[cfg.grad_std_layer]
    grads_A, grads_B = [], []
    was_training = model.training
    model.train()
    # masks from a forked RNG: switching the recorder on must not change the training run's own masks
    with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 5)  # the same masks at every record: epochs compare like with like
        for _ in range(cfg.grad_std_masks):
            loss = _loss_fn(cfg.loss, model(xb), yb)
            gA, gB = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
            grads_A.append(gA.flatten())
            grads_B.append(gB.flatten())
    model.train(was_training)
    return (torch.stack(grads_A).std(0).cpu().numpy(), torch.stack(grads_B).std(0).cpu().numpy())


def _train(cfg: FinetuneConfig, device: torch.device) -> dict[str, np.ndarray]:
    data = protocol_data(cfg, device)
    model = build_finetune_model(cfg, device)
    layers = lora_modules(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if cfg.lora_plus_ratio is not None:
        groups = lora_plus_param_groups(model, cfg.lr, cfg.lora_plus_ratio)
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    lowr = LoWR(layers, tau=cfg.lowr[0], alpha=cfg.lowr[1], every=int(cfg.lowr[2])) if cfg.lowr else None
    torch.manual_seed(cfg.seed + 2)  # dropout masks
    gen = torch.Generator().manual_seed(cfg.seed + 3)  # mini-batches
    x, y = data.finetune
    probe = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + 4))[: cfg.batch_size or len(y)]
    probe = probe.to(device)
    hist: dict[str, list] = {k: [] for k in ("step", "batch_loss")}
    rec = set(cfg.recorders)

    def record(step: int, grads: list[tuple[float, float]] | None) -> None:
        hist["step"].append(step)
        if "loss" in rec:
            for split_name, split in (("train", data.finetune), ("test", data.test)):
                loss, acc = _evaluate(model, split, cfg.loss)
                hist.setdefault(f"{split_name}_loss", []).append(loss)
                hist.setdefault(f"{split_name}_acc", []).append(acc)
        with torch.no_grad():
            if "norms" in rec:
                hist.setdefault("norm_A", []).append([m.lora_A.norm().item() for m in layers])
                hist.setdefault("norm_B", []).append([m.lora_B.norm().item() for m in layers])
            if "rows" in rec:
                hist.setdefault("row_norm_BA", []).append(
                    [(m.scaling * m.lora_B @ m.lora_A).norm(dim=1).mean().item() for m in layers])
            if "channels" in rec:
                hist.setdefault("channel_a", []).append([m.lora_A.norm(dim=1).cpu().numpy() for m in layers])
                hist.setdefault("channel_b", []).append([m.lora_B.norm(dim=0).cpu().numpy() for m in layers])
            if "moments" in rec:
                model.eval()
                ins = _layer_inputs(model, x)
                outs = [_adapter_output(m, ins[int(n.split(".")[1])]) for m, n in zip(layers, names, strict=True)]
                model.train()
                hist.setdefault("out_mean", []).append([o.mean().item() for o in outs])
                hist.setdefault("out_second", []).append([(o**2).mean().item() for o in outs])
        if "grads" in rec:
            g = grads if grads is not None else [(math.nan, math.nan)] * len(layers)
            hist.setdefault("grad_norm_A", []).append([a for a, _ in g])
            hist.setdefault("grad_norm_B", []).append([b for _, b in g])
        if "grad_std" in rec:
            sA, sB = _grad_std(model, cfg, x[probe], y[probe])
            hist.setdefault("grad_std_A", []).append(sA)
            hist.setdefault("grad_std_B", []).append(sB)

    model.train()
    record(0, None)
    last = layers[-1]
    for step, idx in enumerate(_batches(len(y), cfg.batch_size, cfg.steps, gen), start=1):
        xb, yb = (x, y) if idx is None else (x[idx.to(device)], y[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        if cfg.expected_loss:
            with torch.no_grad():
                h = model.features(xb)
            loss = expected_mse(last, h, yb)
        else:
            loss = _loss_fn(cfg.loss, model(xb), yb)
        if not torch.isfinite(loss):  # stop, and keep what was recorded (cached: a diverging run is not retrained)
            hist["diverged_step"] = [step]
            break
        loss.backward()
        grads = [(m.lora_A.grad.norm().item(), m.lora_B.grad.norm().item()) for m in layers] if "grads" in rec \
            else None
        opt.step()
        if lowr is not None:
            lowr.step()
        hist["batch_loss"].append(loss.item())
        if step % cfg.record_every == 0 or step == cfg.steps:
            record(step, grads)
    return {k: np.asarray(v, dtype=np.float64) for k, v in hist.items()}


def finetune(cfg: FinetuneConfig, *, device: str | torch.device | None = None, use_cache: bool = True,
             refresh: bool = False, on_diverge: str = "raise") -> dict[str, np.ndarray]:
    """Run (or load from the cache) one fine-tuning run; returns its history as numpy arrays.

    Keys: ``step`` (record steps), ``batch_loss`` (every step) and, per recorder, ``train_loss``, ``test_loss``,
    ``train_acc``, ``test_acc`` ("loss"); ``norm_A``, ``norm_B`` (records x layers, "norms"); ``row_norm_BA``
    (mean row norm of s BA, "rows"); ``grad_norm_A``, ``grad_norm_B`` ("grads"); ``channel_a``, ``channel_b``
    (records x layers x r, "channels"); ``out_mean``, ``out_second`` (adapter output moments, "moments");
    ``grad_std_A``, ``grad_std_B`` (records x entries, "grad_std").

    A run whose loss becomes non-finite stops there; its history (up to the last finite step) is cached with
    the key ``diverged_step``. ``on_diverge="raise"`` (default) then raises :class:`TrainingDiverged` (with
    ``.step``), ``"return"`` returns the truncated history.
    """
    if on_diverge not in ("raise", "return"):
        raise ValueError(f"on_diverge must be 'raise' or 'return', got {on_diverge!r}")
    dev = auto_device(device)
    if use_cache:
        hist = run_cache.cached("finetune", cfg.as_dict(), lambda: _train(cfg, dev), refresh=refresh)
    else:
        hist = _train(cfg, dev)
    if "diverged_step" in hist and on_diverge == "raise":
        raise TrainingDiverged(int(hist["diverged_step"][0]), cfg)
    return hist


def run_sweep(configs: Sequence[FinetuneConfig], *, device: str | torch.device | None = None,
              progress: bool | None = None, use_cache: bool = True,
              on_diverge: str = "raise") -> list[dict[str, np.ndarray]]:
    """Run many configurations (seeds x settings), skipping cached ones; an interrupted sweep resumes.

    All configurations are validated before the first run starts. Progress is shown on a terminal only.
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    for c in configs:
        if not isinstance(c, FinetuneConfig):
            raise ValueError(f"configs must be FinetuneConfig objects, got {type(c).__name__}")
    out = []
    for c in tqdm(configs, desc="runs", disable=None if progress is None else not progress, leave=False):
        out.append(finetune(c, device=device, use_cache=use_cache, on_diverge=on_diverge))
    return out

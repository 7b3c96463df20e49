"""Pretraining and LoRA fine-tuning of the toy MLP: the one training loop, its callbacks, and the run cache.

One :class:`FinetuneConfig` describes one run completely (data protocol, model, adapter, optimizer, seed,
recorders); :func:`finetune` returns its history as numpy arrays and caches it under the SHA-256 of the
config (plus the keys of any custom callbacks), so a sweep (:func:`run_sweep`) interrupted at any point resumes
where it stopped. Data are tensors on the device (no DataLoader); every random stream of a run is derived from
its seed by :class:`SeedStreams`, so the same config gives the same bits on CPU.

What a run measures is done by callbacks (:class:`Callback`): the recorders named in ``cfg.recorders``
("loss", "norms", ...) are built-in callbacks (:mod:`toymodels.callbacks`); a figure that needs more (weight
snapshots, closed-form quantities of the live model, captured layer inputs and output gradients, an init
transform) passes its own callbacks to :func:`finetune`: their :meth:`Callback.key` enters the cache key and
their :meth:`Callback.result` is cached with the run's history.

``expected_loss=True`` trains LoRA on the last (linear) layer with MSE on the exact expected loss over dropout
masks (ALLoRA fig. 4), a torch transcription of :func:`analysis.dropout.expected_loss` (tested against it).
``dtype="float64"`` runs the whole fine-tuning (pretrained weights, data, the adapters, drawn in float64: other
numbers than the float32 draw from the same stream) in double precision (LoWR Prop. 4.1's check). A full-batch
run whose first layers carry no LoRA computes their output once (the same numbers as at every step).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from analysis.inputs import dropout_rate, finite_scalar, positive_int
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
from toymodels.masks import SCHEME as MASK_SCHEME
from toymodels.masks import MaskStream
from toymodels.mlp import MLP, auto_device, check_activation

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
DTYPES = ("float32", "float64")
ON_DIVERGE = ("raise", "return")


# ---------------------------------------------------------------------------------------------- seed streams


class SeedStreams:
    """The one place where a run's random streams are derived from its seed.

    Stream ``name`` is seeded ``seed + SeedStreams.OFFSETS[name]``: "pretrain" (+0: the pretrained MLP's init,
    its batches and the data subsets), "init" (+1: the LoRA initialisation, a CPU generator), "masks" (+2: the
    dropout masks of the training steps, :meth:`masks`; the global torch RNG is seeded with it too, for
    anything else a step may draw), "batches" (+3: the mini-batch permutations), "probe" (+4:
    the probe mini-batch of the recorders), "grad_std" (+5: the masks of the grad_std recorder, drawn from a
    forked RNG). A callback that draws random numbers must not touch the training streams: it uses
    :meth:`fork` (a forked global RNG seeded ``seed + offset``, restored afterwards) or its own generator.
    """

    OFFSETS = MappingProxyType({"pretrain": 0, "init": 1, "masks": 2, "batches": 3, "probe": 4, "grad_std": 5})

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.base = int(seed)

    def __repr__(self) -> str:
        return f"SeedStreams({self.base})"

    def seed(self, stream: str) -> int:
        """The integer seed of ``stream`` (one of :attr:`OFFSETS`)."""
        if stream not in self.OFFSETS:
            raise ValueError(f"stream must be one of {tuple(self.OFFSETS)}, got {stream!r}")
        return self.base + self.OFFSETS[stream]

    def generator(self, stream: str) -> torch.Generator:
        """A fresh CPU generator seeded for ``stream`` (CPU draws give the same numbers on every device)."""
        return torch.Generator(device="cpu").manual_seed(self.seed(stream))

    def masks(self) -> MaskStream:
        """A fresh dropout-mask stream of the run (:class:`toymodels.masks.MaskStream`, "masks" seed): what the
        training steps of both engines draw their masks from."""
        return MaskStream(self.seed("masks"))

    def seed_global(self, stream: str) -> None:
        """Seed torch's global RNG (CPU and CUDA) for ``stream``."""
        torch.manual_seed(self.seed(stream))

    @contextlib.contextmanager
    def fork(self, offset: int | str, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the block with the global RNG seeded ``seed + offset`` (``offset`` an int or a stream name) and
        restore the training RNG afterwards (so a Monte Carlo inside a callback leaves the run unchanged)."""
        off = self.OFFSETS[offset] if isinstance(offset, str) and offset in self.OFFSETS else offset
        if isinstance(off, str) or isinstance(off, bool) or not isinstance(off, int | np.integer):
            raise ValueError(f"offset must be an integer or one of {tuple(self.OFFSETS)}, got {offset!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.base + int(off))
            yield

    def probe_indices(self, n: int, size: int | None) -> torch.Tensor:
        """The probe mini-batch: the first ``size`` (all if None) of a permutation of ``range(n)`` drawn from the
        "probe" stream (the same rows at every record of a run)."""
        return torch.randperm(n, generator=self.generator("probe"))[: size or n]


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines one fine-tuning run (validated at construction, before any training)."""

    dataset: str = "mnist"
    n_pretrain: int = 4096
    n_finetune: int = 512
    n_test: int | None = None
    task_shift: str | None = None
    widths: tuple[int, ...] = (784, 256, 256, 10)
    activation: str = "relu"  # the MLP's hidden activation, toymodels.mlp.ACTIVATIONS ("identity": deep linear)
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
    dtype: str = "float32"  # "float64": the whole fine-tuning in double precision
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
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"dataset must be one of {datasets.DATASETS}, got {self.dataset!r}")
        check_activation(self.activation)
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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
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

    @property
    def streams(self) -> SeedStreams:
        """The run's random streams (:class:`SeedStreams` of ``seed``)."""
        return SeedStreams(self.seed)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def record_steps(self) -> list[int]:
        """The steps at which the recorders record: 0, every ``record_every`` steps, and the last step."""
        return sorted(set(range(0, self.steps + 1, self.record_every)) | {self.steps})

    def as_dict(self) -> dict:
        """The cache key's content: every field, the engine version and torch's CPU thread count (float
        reductions, hence the last bits of a run, depend on it; the figures CLI and the tests use 1 thread).
        Fields added after version 1 enter only when they differ from their default (old keys stay valid)."""
        d = {"engine_version": ENGINE_VERSION, "torch_threads": torch.get_num_threads(), **dataclasses.asdict(self)}
        for name, default in _LATE_FIELDS.items():
            if d[name] == default:
                del d[name]
        if "grad_std" in self.recorders:
            d["grad_std_rng"] = "forked"  # since the grad_std masks stopped consuming the training RNG
        if self.dropout > 0:
            d["mask_stream"] = MASK_SCHEME  # since the masks left torch's global RNG (toymodels.masks)
        return d

    def pretrain_dict(self) -> dict:
        """The pretrained model's cache key (the late fields that shape it enter only off their default)."""
        keys = ("dataset", "n_pretrain", "n_finetune", "n_test", "task_shift", "widths", "pretrain_steps",
                "pretrain_lr", "pretrain_batch", "seed")
        d = {"engine_version": ENGINE_VERSION, "torch_threads": torch.get_num_threads(),
             **{k: getattr(self, k) for k in keys}}
        if self.activation != _LATE_FIELDS["activation"]:
            d["activation"] = self.activation
        return d


# fields added after the first cached runs, and their defaults (a config at the default keeps its old key)
_LATE_FIELDS = {"dtype": "float32", "activation": "relu"}


def datasets_input_dim(name: str) -> int:
    """Input size of a real data set (:data:`toymodels.data.DIMS`), -1 for "synthetic" (any size)."""
    return datasets.DIMS.get(name, -1)


# --------------------------------------------------------------------------------------------- public helpers


def protocol_data(cfg: FinetuneConfig, device: torch.device) -> datasets.FinetuneData:
    """The pretrain / fine-tune / test tensors of the run (ALLoRA sec. 3.4 protocol), in float32."""
    kwargs = dict(n_pretrain=cfg.n_pretrain, n_finetune=cfg.n_finetune, seed=cfg.seed, task_shift=cfg.task_shift,
                  device=device)
    if cfg.n_test is not None:
        kwargs["n_test"] = cfg.n_test
    if cfg.dataset == "synthetic":
        kwargs["synthetic_options"] = {"dim": cfg.widths[0], "n_classes": cfg.widths[-1]}
    return datasets.finetune_protocol(cfg.dataset, **kwargs)


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss: "ce" = cross-entropy; "mse" = mean over samples of ||logits - one_hot(y)||^2."""
    if kind == "ce":
        return nn.functional.cross_entropy(logits, y)
    if kind != "mse":
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
    target = nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return ((logits - target) ** 2).sum(dim=1).mean()


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


@torch.no_grad()
def evaluate(model: nn.Module, split: datasets.Split, loss_kind: str) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on a whole split, dropout off (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    logits = model(split.x)
    loss = loss_fn(loss_kind, logits, split.y).item()
    acc = (logits.argmax(1) == split.y).double().mean().item()
    model.train(was_training)
    return loss, acc


def layer_inputs(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every layer of the MLP for input ``x`` (layer i gets the activation, :meth:`MLP.act`, of layer
    i-1's output)."""
    inputs = []
    for i, layer in enumerate(model.layers):
        inputs.append(x)
        x = layer(x)
        if i < len(model.layers) - 1:
            x = model.act(x)
    return inputs


def adapter_output(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution to the layer's output (call in eval mode: no dropout), for every method."""
    return layer(x) - layer.base(x)


# ----------------------------------------------------------------------------------------------- pretraining


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
    model = MLP(cfg.widths, seed=cfg.seed, device=device, activation=cfg.activation)
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


class TrainState:
    """What a :class:`Callback` sees: the live run.

    Attributes: ``cfg``, ``device``, ``streams`` (:class:`SeedStreams`), ``model`` (the MLP with LoRA),
    ``layers`` / ``layer_names`` (its LoRALinear modules, in order, and their names), ``data``
    (:class:`toymodels.data.FinetuneData` in the run's dtype), ``optimizer``, ``step`` (0 before training, then
    the 1-based number of the step just taken or about to be taken), ``batch`` (the step's (x, y)), ``loss``
    (the step's loss tensor, after the forward pass), ``record`` (True at the record steps of
    :meth:`FinetuneConfig.record_steps`), ``diverged_step`` (None, or the step whose loss was non-finite).
    """

    def __init__(self, cfg: FinetuneConfig, device: torch.device, model: MLP, data: datasets.FinetuneData,
                 optimizer: torch.optim.Optimizer):
        self.cfg = cfg
        self.device = device
        self.streams = cfg.streams
        self.model = model
        self.layers = lora_modules(model)
        self.layer_names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        self.data = data
        self.optimizer = optimizer
        self.step = 0
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None
        self.record = True
        self.diverged_step: int | None = None
        self._probe: torch.Tensor | None = None

    @property
    def probe(self) -> torch.Tensor:
        """Indices (on the device) of the probe mini-batch of the fine-tune set (:meth:`SeedStreams.probe_indices`
        with the run's batch size)."""
        if self._probe is None:
            n = len(self.data.finetune.y)
            self._probe = self.streams.probe_indices(n, self.cfg.batch_size).to(self.device)
        return self._probe


class Callback:
    """A measurement (or an intervention) run inside :func:`finetune`'s loop.

    Hooks (all optional, called with the :class:`TrainState`; callbacks are called in the order given, the
    built-in recorders of ``cfg.recorders`` last):

    - ``on_train_begin``: the model is built and initialised, step 0, before any update;
    - ``on_step_begin``: the step's batch is chosen, before the forward pass;
    - ``on_after_backward``: the gradients of the step are in ``.grad`` (before the optimizer step);
    - ``on_step_end``: the optimizer (and LoWR) have updated the weights (a callback that changes the model does
      it here; put it before the callbacks that measure it);
    - ``on_record``: at the record steps (0, every ``record_every``, the last), after every ``on_step_end``;
    - ``on_train_end``: after the last step, or after the step whose loss was non-finite (``state.diverged_step``).

    A callback that draws random numbers uses ``state.streams.fork(offset)`` or its own generator, so that its
    numbers depend neither on the callbacks before it nor on the step (the dropout masks of the steps come from
    the run's :class:`toymodels.masks.MaskStream`, set on the layers during the steps' forward passes only, so a
    callback's own train-mode forward never consumes them). :meth:`key` (JSON-able) enters the run-cache key
    together with the class's qualified name and :attr:`version`; :meth:`result` (name -> array) is merged into
    the run's history and cached with it (a name that another callback or the engine already uses raises
    ValueError). A callback object is used for one run: :func:`finetune` calls :meth:`reset` before a run.
    """

    version: int = 0  # bump when what the callback computes changes (it is part of the cache key)

    def key(self) -> dict:
        """The parameters that change what the callback computes (JSON-able)."""
        return {}

    def reset(self) -> None:
        """Forget the results of a previous run."""

    def result(self) -> Mapping[str, np.ndarray]:
        return {}

    def on_train_begin(self, state: TrainState) -> None: ...

    def on_step_begin(self, state: TrainState) -> None: ...

    def on_after_backward(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_record(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def full_key(self) -> dict:
        """What enters the cache key: the class (module and qualified name), :attr:`version` and :meth:`key`."""
        cls = type(self)
        return {"callback": f"{cls.__module__}.{cls.__qualname__}", "version": self.version, **self.key()}


def recorder_callbacks(cfg: FinetuneConfig) -> list[Callback]:
    """The built-in callbacks of ``cfg.recorders`` (:mod:`toymodels.callbacks`), in :data:`RECORDERS` order."""
    from toymodels import callbacks as builtin  # the callbacks module imports this one

    return [builtin.RECORDER_CLASSES[name]() for name in RECORDERS if name in cfg.recorders]


def _frozen_prefix(cfg: FinetuneConfig) -> int:
    """Number of leading layers that are frozen (no LoRA): their output on the full batch is computed once."""
    return min(int(t.split(".")[1]) for t in cfg.targets)


def _forward_from(model: MLP, start: int, h: torch.Tensor) -> torch.Tensor:
    """``model(x)`` given ``h``, the activated output of layer ``start - 1`` (the input of layer ``start``): the
    same operations as :meth:`MLP.forward` from there on."""
    last = len(model.layers) - 1
    for i in range(start, last):
        h = model.act(model.layers[i](h))
    return model.layers[last](h)


def _in_dtype(data: datasets.FinetuneData, dtype: torch.dtype) -> datasets.FinetuneData:
    if dtype == torch.float32:
        return data
    cast = {k: datasets.Split(getattr(data, k).x.to(dtype), getattr(data, k).y) for k in ("pretrain", "finetune",
                                                                                          "test")}
    return dataclasses.replace(data, **cast)


class TrainingRun:
    """One run of the training loop, set up (data, model, optimizer, callbacks) and ready to :meth:`train`.

    :func:`finetune` is the way to run a config (it caches); this class exists so that a benchmark can time the
    loop apart from the set-up. A TrainingRun trains once.
    """

    def __init__(self, cfg: FinetuneConfig, device: str | torch.device | None = None,
                 callbacks: Sequence[Callback] = ()):
        device = auto_device(device)
        self.cfg, self.device = cfg, device
        data = _in_dtype(protocol_data(cfg, device), cfg.torch_dtype)
        model = build_finetune_model(cfg, device)
        if cfg.lora_plus_ratio is not None:
            groups = lora_plus_param_groups(model, cfg.lr, cfg.lora_plus_ratio)
        else:
            groups = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
        self.state = TrainState(cfg, device, model, data, opt)
        self.lowr = LoWR(self.state.layers, tau=cfg.lowr[0], alpha=cfg.lowr[1], every=int(cfg.lowr[2])) \
            if cfg.lowr else None
        self.callbacks = [*callbacks, *recorder_callbacks(cfg)]
        for cb in self.callbacks:
            cb.reset()
        x = data.finetune.x
        full_batch = cfg.batch_size is None or cfg.batch_size >= len(x)
        self.start = _frozen_prefix(cfg) if full_batch and not cfg.expected_loss else 0
        self.h_frozen = x
        with torch.no_grad():  # the frozen layers' output on the full batch: the same numbers at every step
            for i in range(self.start):
                self.h_frozen = model.act(model.layers[i](self.h_frozen))
        self._done = False

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        cfg, model = self.cfg, self.state.model
        if cfg.expected_loss:
            with torch.no_grad():
                h = model.features(xb)
            return expected_mse(self.state.layers[-1], h, yb)
        if self.start:
            return loss_fn(cfg.loss, _forward_from(model, self.start, self.h_frozen), yb)
        return loss_fn(cfg.loss, model(xb), yb)

    def train(self) -> dict[str, np.ndarray]:
        """Run the loop; returns the history (callbacks' results merged in), truncated if the loss diverged."""
        if self._done:
            raise RuntimeError("a TrainingRun trains once: make a new one")
        self._done = True
        cfg, state, cbs, device = self.cfg, self.state, self.callbacks, self.device
        model, opt = state.model, state.optimizer
        state.streams.seed_global("masks")
        masks = state.streams.masks()
        gen = state.streams.generator("batches")
        x, y = state.data.finetune
        hist: dict[str, list] = {"step": [], "batch_loss": []}
        record_steps = set(cfg.record_steps())

        model.train()
        for cb in cbs:
            cb.on_train_begin(state)
        hist["step"].append(0)
        for cb in cbs:
            cb.on_record(state)
        for step, idx in enumerate(minibatches(len(y), cfg.batch_size, cfg.steps, gen), start=1):
            state.step, state.record = step, step in record_steps
            xb, yb = (x, y) if idx is None else (x[idx.to(device)], y[idx.to(device)])
            state.batch, state.loss = (xb, yb), None
            for cb in cbs:
                cb.on_step_begin(state)
            opt.zero_grad(set_to_none=True)
            with _mask_stream(state.layers, masks):
                loss = state.loss = self._loss(xb, yb)
            if not torch.isfinite(loss):  # stop, keep what was recorded (cached: a diverging run is not retrained)
                state.diverged_step = step
                break
            loss.backward()
            for cb in cbs:
                cb.on_after_backward(state)
            opt.step()
            if self.lowr is not None:
                self.lowr.step()
            hist["batch_loss"].append(loss.item())
            for cb in cbs:
                cb.on_step_end(state)
            if state.record:
                hist["step"].append(step)
                for cb in cbs:
                    cb.on_record(state)
        for cb in cbs:
            cb.on_train_end(state)
        out = {k: np.asarray(v, dtype=np.float64) for k, v in hist.items()}
        if state.diverged_step is not None:
            out["diverged_step"] = np.asarray([state.diverged_step], dtype=np.float64)
        for cb in cbs:
            for name, value in cb.result().items():
                if name in out:
                    raise ValueError(f"callback {type(cb).__qualname__} returns {name!r}, a name already in the "
                                     "history")
                out[name] = np.asarray(value)
        return out


@contextlib.contextmanager
def _mask_stream(layers: Sequence[LoRALinear], stream: MaskStream) -> Iterator[None]:
    """The step's forward pass: every LoRA layer draws its dropout mask from the run's stream, in layer order."""
    for layer in layers:
        layer.mask_stream = stream
    try:
        yield
    finally:
        for layer in layers:
            layer.mask_stream = None


def _train(cfg: FinetuneConfig, device: torch.device, callbacks: Sequence[Callback] = ()) -> dict[str, np.ndarray]:
    """One run of the training loop, no cache (what :func:`finetune` computes on a cache miss)."""
    return TrainingRun(cfg, device, callbacks).train()


def run_key(cfg: FinetuneConfig, callbacks: Sequence[Callback] = ()) -> dict:
    """The run-cache key of ``cfg`` trained with ``callbacks``: ``cfg.as_dict()``, plus the callbacks' keys
    (:meth:`Callback.full_key`) when there are any (so a run without custom callbacks keeps its key)."""
    d = cfg.as_dict()
    if callbacks:
        d["callbacks"] = [cb.full_key() for cb in callbacks]
    return d


def finetune(cfg: FinetuneConfig, *, callbacks: Sequence[Callback] = (), device: str | torch.device | None = None,
             use_cache: bool = True, refresh: bool = False, on_diverge: str = "raise") -> dict[str, np.ndarray]:
    """Run (or load from the cache) one fine-tuning run; returns its history as numpy arrays.

    Keys: ``step`` (record steps), ``batch_loss`` (every step) and, per recorder, ``train_loss``, ``test_loss``,
    ``train_acc``, ``test_acc`` ("loss"); ``norm_A``, ``norm_B`` (records x layers, "norms"); ``row_norm_BA``
    (mean row norm of s BA, "rows"); ``grad_norm_A``, ``grad_norm_B`` ("grads"); ``channel_a``, ``channel_b``
    (records x layers x r, "channels"); ``out_mean``, ``out_second`` (adapter output moments, "moments");
    ``grad_std_A``, ``grad_std_B`` (records x entries, "grad_std"); plus what each of ``callbacks`` returns
    (:meth:`Callback.result`). The callbacks' keys enter the cache key (:func:`run_key`).

    Divergence, the one policy: a run whose loss becomes non-finite at step k stops there; its history (steps
    before k: ``batch_loss`` has k - 1 entries, the records and callback results up to step k - 1) is cached
    with ``diverged_step = [k]`` (a diverging run is computed once). ``on_diverge="raise"`` (default) then
    raises :class:`TrainingDiverged` (``.step`` = k), ``"return"`` returns that truncated history: the caller
    tests ``"diverged_step" in hist``.
    """
    if on_diverge not in ON_DIVERGE:
        raise ValueError(f"on_diverge must be 'raise' or 'return', got {on_diverge!r}")
    callbacks = list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise ValueError(f"callbacks must be Callback objects, got {type(cb).__name__}")
    dev = auto_device(device)

    def compute():
        return _train(cfg, dev, callbacks) if callbacks else _train(cfg, dev)

    hist = run_cache.cached("finetune", run_key(cfg, callbacks), compute, refresh=refresh) if use_cache else compute()
    if "diverged_step" in hist and on_diverge == "raise":
        raise TrainingDiverged(int(hist["diverged_step"][0]), cfg)
    return hist


def run_sweep(configs: Sequence[FinetuneConfig], *, executor="local", workers: int | None = None,
              device: str | torch.device | None = None, progress: bool | None = None, use_cache: bool = True,
              on_diverge: str = "raise", **options) -> list[dict[str, np.ndarray]]:
    """Run many configurations (seeds x settings), in parallel, skipping cached ones; an interrupted sweep resumes.

    Batchable groups go to :func:`toymodels.batched.finetune_many`, the rest to :func:`finetune`; tasks run on
    ``executor`` ("local" processes, ``workers`` of them (None: one per core; 1: in-process), "ray", "slurm"
    or a ``concurrent.futures.Executor``); each worker writes its finished runs to the run cache. Histories come
    back in the order of ``configs``, the same bits whatever the executor and worker count. Progress is shown
    on a terminal only. ``options``: ``batched``, ``max_batch``, ``threads``, ``retries``, ``executor_options``,
    ``callbacks`` (custom :class:`Callback` objects: one sequence for every config, a callable cfg -> sequence,
    or one sequence per config; those runs go through :func:`finetune`, same cache entry and bits as a direct
    call) (see :func:`toymodels.sweep.run_sweep`, the implementation).
    """
    from toymodels.sweep import run_sweep as sweep  # lazy: toymodels.sweep imports this module

    return sweep(configs, executor=executor, workers=workers, device=device, progress=progress,
                 use_cache=use_cache, on_diverge=on_diverge, **options)

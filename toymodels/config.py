"""What defines one fine-tuning run: :class:`FinetuneConfig` (validated at construction) and its cache keys.

One config describes one run completely (data protocol, model, adapter, optimizer, seed, recorders).
:meth:`FinetuneConfig.as_dict` is the content of its run-cache key (every field, :data:`ENGINE_VERSION`, torch's
thread count, the seed scheme :data:`analysis.streams.STREAMS_VERSION`), :meth:`FinetuneConfig.pretrain_dict`
that of its pretrained model; ``cfg.streams`` its random streams (:class:`toymodels.seeds.SeedStreams`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from analysis.inputs import dropout_rate, finite_scalar, positive_int
from analysis.streams import STREAMS_VERSION
from toymodels import data as datasets
from toymodels.lora import PLACEMENTS, VARIANTS
from toymodels.masks import SCHEME as MASK_SCHEME
from toymodels.mlp import check_activation
from toymodels.seeds import SeedStreams

ENGINE_VERSION = 1

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("ce", "mse")
RECORDERS = ("loss", "norms", "rows", "grads", "channels", "moments", "grad_std")
DTYPES = ("float32", "float64")


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
        if self.method not in VARIANTS:
            raise ValueError(f"method must be one of {tuple(VARIANTS)}, got {self.method!r}")
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
        d = {"engine_version": ENGINE_VERSION, "torch_threads": torch.get_num_threads(), **dataclasses.asdict(self),
             "streams": STREAMS_VERSION}  # the seed scheme (analysis.streams): no run of an older scheme is returned
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
             **{k: getattr(self, k) for k in keys}, "streams": STREAMS_VERSION}
        if self.activation != _LATE_FIELDS["activation"]:
            d["activation"] = self.activation
        return d


# fields added after the first cached runs, and their defaults (a config at the default keeps its old key)
_LATE_FIELDS = {"dtype": "float32", "activation": "relu"}


def datasets_input_dim(name: str) -> int:
    """Input size of a real data set (:data:`toymodels.data.DIMS`), -1 for "synthetic" (any size)."""
    return datasets.DIMS.get(name, -1)

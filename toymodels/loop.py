"""The one training loop: :func:`finetune` (one run, cached), :class:`TrainingRun` (the loop itself) and
:func:`run_key` (a run's cache key).

:func:`finetune` returns a run's history as numpy arrays and caches it under the SHA-256 of the config (plus the
keys of any custom callbacks), so a sweep (:func:`toymodels.sweep.run_sweep`) interrupted at any point resumes
where it stopped. Data are tensors on the device (no DataLoader); every random stream of a run is derived from
its seed by :class:`toymodels.seeds.SeedStreams`, so the same config gives the same bits on CPU.

What a run measures is done by callbacks (:class:`toymodels.callback_base.Callback`): the recorders named in
``cfg.recorders`` ("loss", "norms", ...) are built-in callbacks (:mod:`toymodels.callbacks`); a figure that needs
more (weight snapshots, closed-form quantities of the live model, captured layer inputs and output gradients, an
init transform) passes its own callbacks to :func:`finetune`: their ``key()`` enters the cache key and their
``result()`` is cached with the run's history.

``expected_loss=True`` trains LoRA on the last (linear) layer with MSE on the exact expected loss over dropout
masks (ALLoRA fig. 4), a torch transcription of :func:`analysis.dropout.expected_loss` (tested against it).
``dtype="float64"`` runs the whole fine-tuning (pretrained weights, data, the adapters, drawn in float64: other
numbers than the float32 draw from the same stream) in double precision (LoWR Prop. 4.1's check). A full-batch
run whose first layers carry no LoRA computes their output once (the same numbers as at every step).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from toymodels import cache as run_cache
from toymodels import callbacks as builtin
from toymodels import data as datasets
from toymodels.callback_base import Callback, TrainState
from toymodels.config import RECORDERS, FinetuneConfig
from toymodels.lora import LoRALinear, LoWR, lora_plus_param_groups
from toymodels.losses import expected_mse, loss_fn
from toymodels.masks import MaskStream
from toymodels.mlp import MLP, auto_device
from toymodels.setup import build_finetune_model, make_optimizer, minibatches, protocol_data

ON_DIVERGE = ("raise", "return")


class TrainingDiverged(FloatingPointError):
    """A run's loss became non-finite; ``step`` is the step at which it happened (1-based)."""

    def __init__(self, step: int, cfg):
        super().__init__(f"non-finite loss at step {step} for {cfg}")
        self.step = step
        self.cfg = cfg


def recorder_callbacks(cfg: FinetuneConfig) -> list[Callback]:
    """The built-in callbacks of ``cfg.recorders`` (:mod:`toymodels.callbacks`), in :data:`RECORDERS` order."""
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

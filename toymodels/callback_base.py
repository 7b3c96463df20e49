"""The callback protocol of the training loop: :class:`Callback` (the hooks) and :class:`TrainState` (what a
hook sees). The built-in recorders and the general callbacks are in :mod:`toymodels.callbacks`; the loop that
calls the hooks is :mod:`toymodels.loop`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from toymodels import data as datasets
from toymodels.config import FinetuneConfig
from toymodels.lora import LoRALinear, lora_modules
from toymodels.mlp import MLP


class TrainState:
    """What a :class:`Callback` sees: the live run.

    Attributes: ``cfg``, ``device``, ``streams`` (:class:`toymodels.seeds.SeedStreams`), ``model`` (the MLP with LoRA),
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
        """Indices (on the device) of the probe mini-batch of the fine-tune set (:meth:`toymodels.seeds.SeedStreams.probe_indices`
        with the run's batch size)."""
        if self._probe is None:
            n = len(self.data.finetune.y)
            self._probe = self.streams.probe_indices(n, self.cfg.batch_size).to(self.device)
        return self._probe


class Callback:
    """A measurement (or an intervention) run inside :func:`toymodels.loop.finetune`'s loop.

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
    ValueError). A callback object is used for one run: :func:`toymodels.loop.finetune` calls :meth:`reset` before a run.
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

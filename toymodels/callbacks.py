"""Callbacks of the training loop (:func:`toymodels.loop.finetune`): the built-in recorders and the general
measurements and interventions the figures use.

Built-in recorders (named in ``FinetuneConfig.recorders``; they record at the record steps, history keys as in
:func:`toymodels.loop.finetune`): :class:`LossRecorder` ("loss"), :class:`NormsRecorder` ("norms"),
:class:`RowsRecorder` ("rows"), :class:`GradNormsRecorder` ("grads"), :class:`ChannelsRecorder` ("channels"),
:class:`MomentsRecorder` ("moments"), :class:`GradStdRecorder` ("grad_std"). Their parameters are fields of the
config, so they enter the cache key through it.

General callbacks (passed as ``finetune(cfg, callbacks=[...])``; their :meth:`~toymodels.callback_base.Callback.key`
enters the cache key):

- :class:`AtSteps`: base class of a measurement of the live model at chosen steps (subclass it and write
  :meth:`AtSteps.measure`); :class:`WeightSnapshots` is one: every LoRA layer's A and B at the given steps.
- :class:`CaptureLayerIO`: every LoRA layer's input X and the gradient of the loss with respect to its output
  G = dL/dy at the given steps (what the closed-form one-step updates of ``analysis.channels`` take).
- :class:`ScaleAdapters`: an init transform, (A, B) -> (nA, B/n) in every LoRA layer after a given step (the
  equivalent modules of LoWR Prop. 4.1: the same product BA, another trajectory).

Shapes: A = lora_A (r, d_in), B = lora_B (d_out, r), X (N, d_in), G (N, d_out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from analysis.inputs import finite_scalar
from toymodels.callback_base import Callback, TrainState
from toymodels.lora import adapter_output
from toymodels.losses import evaluate, loss_fn
from toymodels.mlp import layer_inputs


def _steps(name: str, steps: Iterable[int] | None) -> tuple[int, ...] | None:
    if steps is None:
        return None
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise ValueError(f"{name} must be non-negative integers, got {s!r}")
        out.append(int(s))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(sorted(set(out)))


class Recorder(Callback):
    """Base of a callback that appends values to named lists; :meth:`result` stacks them as float64 arrays."""

    def __init__(self):
        self.hist: dict[str, list] = {}

    def reset(self) -> None:
        self.hist = {}

    def add(self, name: str, value) -> None:
        self.hist.setdefault(name, []).append(value)

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.hist.items()}


# ------------------------------------------------------------------------------------------------ recorders


class LossRecorder(Recorder):
    """"loss": ``train_loss``, ``train_acc`` (whole fine-tune set) and ``test_loss``, ``test_acc``, dropout off."""

    def on_record(self, state: TrainState) -> None:
        for split_name, split in (("train", state.data.finetune), ("test", state.data.test)):
            loss, acc = evaluate(state.model, split, state.cfg.loss)
            self.add(f"{split_name}_loss", loss)
            self.add(f"{split_name}_acc", acc)


class NormsRecorder(Recorder):
    """"norms": ``norm_A``, ``norm_B``: Frobenius norms of each LoRA layer's A and B (records x layers)."""

    @torch.no_grad()
    def on_record(self, state: TrainState) -> None:
        self.add("norm_A", [m.lora_A.norm().item() for m in state.layers])
        self.add("norm_B", [m.lora_B.norm().item() for m in state.layers])


class RowsRecorder(Recorder):
    """"rows": ``row_norm_BA``: mean over output rows of ||(s BA)_i,:|| per layer (records x layers)."""

    @torch.no_grad()
    def on_record(self, state: TrainState) -> None:
        self.add("row_norm_BA", [(m.scaling * m.lora_B @ m.lora_A).norm(dim=1).mean().item() for m in state.layers])


class GradNormsRecorder(Recorder):
    """"grads": ``grad_norm_A``, ``grad_norm_B``: norms of the gradients of the record step's batch (NaN at
    step 0, before any gradient)."""

    def __init__(self):
        super().__init__()
        self._last: list[tuple[float, float]] | None = None

    def reset(self) -> None:
        super().reset()
        self._last = None

    def on_after_backward(self, state: TrainState) -> None:
        if state.record:
            self._last = [(m.lora_A.grad.norm().item(), m.lora_B.grad.norm().item()) for m in state.layers]

    def on_record(self, state: TrainState) -> None:
        g = self._last if state.step > 0 and self._last is not None else [(math.nan, math.nan)] * len(state.layers)
        self.add("grad_norm_A", [a for a, _ in g])
        self.add("grad_norm_B", [b for _, b in g])


class ChannelsRecorder(Recorder):
    """"channels": ``channel_a`` = ||a_k|| (rows of A), ``channel_b`` = ||b_k|| (columns of B), records x layers
    x r."""

    @torch.no_grad()
    def on_record(self, state: TrainState) -> None:
        self.add("channel_a", [m.lora_A.norm(dim=1).cpu().numpy() for m in state.layers])
        self.add("channel_b", [m.lora_B.norm(dim=0).cpu().numpy() for m in state.layers])


class MomentsRecorder(Recorder):
    """"moments": ``out_mean``, ``out_second``: mean and mean square of each adapter's output on the whole
    fine-tune set, dropout off (records x layers)."""

    @torch.no_grad()
    def on_record(self, state: TrainState) -> None:
        model = state.model
        was = model.training
        model.eval()
        ins = layer_inputs(model, state.data.finetune.x)
        outs = [adapter_output(m, ins[int(n.split(".")[1])]) for m, n in zip(state.layers, state.layer_names,
                                                                             strict=True)]
        model.train(was)
        self.add("out_mean", [o.mean().item() for o in outs])
        self.add("out_second", [(o**2).mean().item() for o in outs])


class GradStdRecorder(Recorder):
    """"grad_std": ``grad_std_A``, ``grad_std_B``: per-entry std of the gradients of layer
    ``cfg.grad_std_layer``'s (A, B) over ``cfg.grad_std_masks`` dropout masks, on the probe batch (records x
    entries). The masks come from the "grad_std" stream (forked: the same masks at every record, and the
    training run's masks are unchanged)."""

    def on_record(self, state: TrainState) -> None:
        cfg, model = state.cfg, state.model
        layer = dict(model.named_modules())[cfg.grad_std_layer]
        x, y = state.data.finetune
        xb, yb = x[state.probe], y[state.probe]
        grads_A, grads_B = [], []
        was = model.training
        model.train()
        with state.streams.fork("grad_std", xb.device):
            for _ in range(cfg.grad_std_masks):
                loss = loss_fn(cfg.loss, model(xb), yb)
                gA, gB = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
                grads_A.append(gA.flatten())
                grads_B.append(gB.flatten())
        model.train(was)
        self.add("grad_std_A", torch.stack(grads_A).std(0).cpu().numpy())
        self.add("grad_std_B", torch.stack(grads_B).std(0).cpu().numpy())


RECORDER_CLASSES: Mapping[str, type[Recorder]] = {
    "loss": LossRecorder, "norms": NormsRecorder, "rows": RowsRecorder, "grads": GradNormsRecorder,
    "channels": ChannelsRecorder, "moments": MomentsRecorder, "grad_std": GradStdRecorder,
}


# ---------------------------------------------------------------------------------------- general callbacks


class AtSteps(Callback):
    """Base of a measurement of the live model at chosen steps (0 = before training; ``steps=None``: the record
    steps of the config). Subclasses write :meth:`measure` (returns name -> array-like) and, when they have
    parameters, :meth:`params` (JSON-able, enters the cache key with the steps). Each name's values are stacked
    over the steps at which it was returned, with the steps themselves under ``{prefix}step``.

    :meth:`measure` runs after the step's update (and after the callbacks listed before this one). A measurement
    that draws random numbers uses ``state.streams.fork(offset)`` (or its own generator).
    """

    prefix = ""  # prepended to every name measure returns (and to "step")

    def __init__(self, steps: Iterable[int] | None = None):
        self.steps = _steps("steps", steps)
        self.rows: dict[str, list] = {}

    def params(self) -> dict:
        return {}

    def key(self) -> dict:
        return {"steps": None if self.steps is None else list(self.steps), "prefix": self.prefix, **self.params()}

    def reset(self) -> None:
        self.rows = {}

    def measure(self, state: TrainState) -> Mapping[str, object]:
        raise NotImplementedError

    def _due(self, state: TrainState) -> bool:
        return state.record if self.steps is None else state.step in self.steps

    def _take(self, state: TrainState) -> None:
        if not self._due(state):
            return
        self.rows.setdefault(f"{self.prefix}step", []).append(state.step)
        for name, value in self.measure(state).items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            self.rows.setdefault(f"{self.prefix}{name}", []).append(np.asarray(value))

    def on_train_begin(self, state: TrainState) -> None:
        self._take(state)

    def on_step_end(self, state: TrainState) -> None:
        self._take(state)

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.rows.items()}


class WeightSnapshots(AtSteps):
    """A and B of every LoRA layer at ``steps``: ``{prefix}step`` (S,), ``{prefix}A{i}`` (S, r, d_in) and
    ``{prefix}B{i}`` (S, d_out, r) for the i-th LoRA layer, in the run's dtype; prefix "snapshot_"."""

    prefix = "snapshot_"

    @torch.no_grad()
    def measure(self, state: TrainState) -> dict[str, np.ndarray]:
        out = {}
        for i, m in enumerate(state.layers):
            out[f"A{i}"] = m.lora_A.detach().cpu().numpy().copy()
            out[f"B{i}"] = m.lora_B.detach().cpu().numpy().copy()
        return out


class FullGradientNorm(AtSteps):
    """Gradient probe: the global norm of every adapter gradient (all LoRA layers, A and B) of the loss on the
    whole fine-tune set, without dropout (eval mode), at ``steps`` (0 = at initialisation). It computes its own
    gradient with ``torch.autograd.grad`` and leaves the training gradients, the optimizer and the RNG untouched.
    History: ``fullgrad_step`` (S,), ``fullgrad_norm`` (S,) = sqrt(sum_l ||dL/dA_l||^2 + ||dL/dB_l||^2).

    At initialisation B = 0, so dL/dA = 0 and dL/dB = s (sum_n g_n (A x_n)^T) / N: the probe of rsLoRA figs. 3-4's
    gradient norm at init, whose square has expectation s^2 r C over the draws of A (C independent of r).
    """

    prefix = "fullgrad_"

    @torch.enable_grad()
    def measure(self, state: TrainState) -> dict[str, float]:
        model = state.model
        was = model.training
        model.eval()
        try:
            x, y = state.data.finetune
            params = [p for m in state.layers for p in (m.lora_A, m.lora_B)]
            grads = torch.autograd.grad(loss_fn(state.cfg.loss, model(x), y), params, allow_unused=True)
        finally:
            model.train(was)
        sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        return {"norm": math.sqrt(sq)}


class CaptureLayerIO(Callback):
    """Every LoRA layer's input X (N, d_in) and output gradient G = dL/dy (N, d_out) of the batch of each step in
    ``steps`` (taken before the step's update, i.e. at the weights of step - 1), through forward hooks and
    tensor hooks (nothing is recomputed: X and G are those of the training step). History: ``io_step`` (S,),
    ``io_X{i}`` (S, N, d_in), ``io_G{i}`` (S, N, d_out) for the i-th LoRA layer. X is the layer's input before
    its dropout; with the "input" placement and p > 0 the LoRA path sees a masked X."""

    def __init__(self, steps: Iterable[int]):
        self.steps = _steps("steps", steps)
        if 0 in self.steps:
            raise ValueError("steps must be >= 1 (step 0 has no gradient)")
        self.rows: dict[str, list] = {}
        self._hooks: list = []
        self._x: dict[int, np.ndarray] = {}
        self._g: dict[int, np.ndarray] = {}

    def key(self) -> dict:
        return {"steps": list(self.steps)}

    def reset(self) -> None:
        self.rows = {}

    def on_step_begin(self, state: TrainState) -> None:
        if state.step not in self.steps:
            return
        self._x, self._g = {}, {}

        def make(i):
            def hook(module, inputs, output):
                self._x[i] = inputs[0].detach().cpu().numpy().copy()
                output.register_hook(lambda g: self._g.__setitem__(i, g.detach().cpu().numpy().copy()))
            return hook

        self._hooks = [m.register_forward_hook(make(i)) for i, m in enumerate(state.layers)]

    def _remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_after_backward(self, state: TrainState) -> None:
        if state.step not in self.steps:
            return
        self._remove()
        self.rows.setdefault("io_step", []).append(state.step)
        for i in range(len(state.layers)):
            self.rows.setdefault(f"io_X{i}", []).append(self._x[i])
            self.rows.setdefault(f"io_G{i}", []).append(self._g[i])

    def on_train_end(self, state: TrainState) -> None:
        self._remove()  # a run that diverged in a captured step

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.rows.items()}


class ScaleAdapters(Callback):
    """After step ``at_step`` (0: at the initialisation), replace every LoRA layer's (A, B) by (nA, B/n): the same
    product BA, hence the same model (LoWR Prop. 4.1's equivalent modules), but another point of the
    factorised parameter space. With a stateless optimizer (SGD without momentum) a run with this callback is
    the run of the equivalent module from that point; with Adam the moments are kept as they were.

    Put it before the callbacks that measure the model at ``at_step``.
    """

    def __init__(self, at_step: int, n: float):
        self.at_step = _steps("at_step", [at_step])[0]
        self.n = finite_scalar("n", n, positive=True)

    def key(self) -> dict:
        return {"at_step": self.at_step, "n": self.n}

    @torch.no_grad()
    def _apply(self, state: TrainState) -> None:
        if state.step != self.at_step:
            return
        for m in state.layers:
            m.lora_A.mul_(self.n)
            m.lora_B.div_(self.n)

    def on_train_begin(self, state: TrainState) -> None:
        self._apply(state)

    def on_step_end(self, state: TrainState) -> None:
        self._apply(state)

"""Watching an adapter during training: a plain hook for custom loops and a ``transformers.TrainerCallback``.

Every ``every`` steps each adapted layer's adapter-only quantities (:func:`diagnose.quantities.adapter_quantities`:
norms, ranks, ALLoRA row norms and factors, LoWR significances and gamma) and, with the frozen base weight at
hand (always, inside a PeftModel), m = ||s B A||_2 / ||W||_2 are appended as one JSON line
``{"step": k, "layers": [...]}`` to a JSONL file, and written to TensorBoard when it is installed and asked for.
So one can watch B escape from zero, the row norms taper and the channel significances drift.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diagnose.errors import DiagnoseError

__all__ = ["AdapterMonitor", "DiagnoseCallback"]


class AdapterMonitor:
    """Plain hook: ``monitor = AdapterMonitor(peft_model, "log.jsonl", every=10)``, then ``monitor.step()`` after
    each optimizer step (or ``monitor.log(step)`` to log now). ``tensorboard``: a log dir for
    ``torch.utils.tensorboard.SummaryWriter`` (ignored, with a note in the JSONL, when tensorboard is missing).
    """

    def __init__(self, model, path, *, every: int = 10, eta: float = 2.0, lowr_alpha: float = 1.0,
                 adapter_name: str | None = None, tensorboard: str | Path | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise DiagnoseError(f"every must be an integer >= 1, got {every!r}")
        self.model, self.path, self.every = model, Path(path), every
        self.eta, self.lowr_alpha, self.adapter_name = eta, lowr_alpha, adapter_name
        self.calls = 0
        self._norm_W: dict[str, float] = {}
        self.writer = None
        self.tensorboard_note = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard))
            except ImportError:
                self.tensorboard_note = "tensorboard is not installed: JSONL only"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, step: int | None = None) -> dict | None:
        """Count one step; log on every ``every``-th. Returns the logged record (or None)."""
        self.calls += 1
        if self.calls % self.every:
            return None
        return self.log(self.calls if step is None else step)

    def log(self, step: int) -> dict:
        """Append one record for ``step`` now and return it."""
        from diagnose.adapter import load_adapter
        from diagnose.base import base_weight
        from diagnose.quantities import adapter_quantities
        from diagnose.report import _jsonable

        ad = load_adapter(self.model, self.adapter_name)
        layers = []
        for lay in ad.layers:
            q = adapter_quantities(lay.A, lay.B, lay.scaling, use_rslora=lay.use_rslora, eta=self.eta,
                                   lowr_alpha=self.lowr_alpha)
            rec = {"name": lay.name, "r": lay.r, "scaling": lay.scaling, "norm_A": q["norm_A"],
                   "norm_B": q["norm_B"], "norm_BA": q["norm_BA"], "spectral_norm_BA": q["spectral_norm_BA"],
                   "stable_rank": q["stable_rank"], "effective_rank": q["effective_rank"],
                   "allora_row_norms": q["allora"]["row_norm_summary"],
                   "allora_factors": q["allora"]["factor_summary"],
                   "lowr_significance": q["lowr"]["significance"], "lowr_norm_a": q["lowr"]["norm_a"],
                   "lowr_norm_b": q["lowr"]["norm_b"], "lowr_gamma": q["lowr"]["gamma"],
                   "flags": ["dead_adapter"] if q["b_exactly_zero"] else []}
            if lay.name not in self._norm_W:  # W is frozen: its spectral norm once
                import numpy as np

                self._norm_W[lay.name] = float(np.linalg.norm(base_weight(self.model, lay), 2))
            rec["m"] = q["spectral_norm_BA"] / self._norm_W[lay.name] if self._norm_W[lay.name] > 0 else math.inf
            layers.append(rec)
        record = _jsonable({"step": int(step), "layers": layers})
        if self.tensorboard_note:
            record["note"] = self.tensorboard_note
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for rec in layers:
                for key in ("norm_A", "norm_B", "norm_BA", "effective_rank", "m"):
                    self.writer.add_scalar(f"{rec['name']}/{key}", rec[key], step)
            self.writer.flush()
        return record


def DiagnoseCallback(path, *, every: int = 10, eta: float = 2.0, lowr_alpha: float = 1.0,
                     tensorboard: str | Path | None = None):
    """A ``transformers.TrainerCallback`` logging :class:`AdapterMonitor` records every ``every`` global steps.

    ``Trainer(..., callbacks=[DiagnoseCallback("diag.jsonl", every=10)])``. transformers is imported here only.
    """
    from transformers import TrainerCallback

    class _DiagnoseCallback(TrainerCallback):
        def __init__(self):
            self.monitor = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None or state.global_step % every:
                return control
            if self.monitor is None:
                self.monitor = AdapterMonitor(model, path, every=1, eta=eta, lowr_alpha=lowr_alpha,
                                              tensorboard=tensorboard)
            self.monitor.model = model
            self.monitor.log(state.global_step)
            return control

    return _DiagnoseCallback()

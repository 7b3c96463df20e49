"""Watching an adapter during training: a plain hook for custom loops and a ``transformers.TrainerCallback``.

Every ``every`` steps each adapted layer's adapter-only quantities (:func:`diagnose.quantities.adapter_quantities`:
norms, ranks, ALLoRA row norms and factors, LoWR significances and gamma) and, with the frozen base weight at
hand (always, inside a PeftModel), m = ||s B A||_2 / ||W||_2 are appended as one JSON line
``{"run_id": ..., "step": k, "layers": [...]}`` to a JSONL file, and written to TensorBoard when it is installed and
asked for. So one can watch B escape from zero, the row norms taper and the channel significances drift.

Each monitor (each training run) first appends a header line ``{"run_id", "event": "run_start", "time",
"schema_version", "tool_version", "every", "adapter": {r, lora_alpha, use_rslora, ...}}``, so several runs appended
to one file stay apart. The layer flags are those of :mod:`diagnose.flags` (the same rules as the report, on the
facts known during training: no intruder test, no calibration). :func:`DiagnoseCallback` also logs the last step of
training when it is not a multiple of ``every``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from analysis.jsonable import to_jsonable
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
        self.last_step: int | None = None
        self.run_id = uuid.uuid4().hex[:12]
        self._header_written = False
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

    def _header(self, ad) -> None:
        from diagnose.report import SCHEMA_VERSION, tool_version

        keys = ("r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
                "use_dora", "init_lora_weights", "base_model_name_or_path")
        header = {"run_id": self.run_id, "event": "run_start", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "schema_version": SCHEMA_VERSION, "tool_version": tool_version(), "every": self.every,
                  "adapter": {k: ad.config.get(k) for k in keys}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(to_jsonable(header, nonfinite="null")) + "\n")
        self._header_written = True

    def log(self, step: int) -> dict:
        """Append one record for ``step`` now and return it."""
        from diagnose.adapter import load_adapter
        from diagnose.base import ModelSource
        from diagnose.flags import layer_facts, raised_layer_flags
        from diagnose.quantities import adapter_quantities, update_ratio

        ad = load_adapter(self.model, self.adapter_name)
        if not self._header_written:
            self._header(ad)
        source = ModelSource(self.model)
        layers = []
        for lay in ad.layers:
            q = adapter_quantities(lay.A, lay.B, lay.scaling, use_rslora=lay.use_rslora, eta=self.eta,
                                   lowr_alpha=self.lowr_alpha)
            if lay.name not in self._norm_W:  # W is frozen: its spectral norm once
                import numpy as np

                self._norm_W[lay.name] = float(np.linalg.norm(source.weight(lay), 2))
            m = update_ratio(q["spectral_norm_BA"], self._norm_W[lay.name])
            facts = layer_facts(b_exactly_zero=q["b_exactly_zero"], norm_update=q["norm_BA"], scaling=lay.scaling,
                                r=lay.r, d_in=lay.d_in, d_out=lay.d_out, dora=lay.magnitude is not None, m=m)
            rec = {"name": lay.name, "r": lay.r, "scaling": lay.scaling, "norm_A": q["norm_A"],
                   "norm_B": q["norm_B"], "norm_BA": q["norm_BA"], "spectral_norm_BA": q["spectral_norm_BA"],
                   "stable_rank": q["stable_rank"], "effective_rank": q["effective_rank"], "m": m,
                   "allora_row_norms": q["allora"]["row_norm_summary"],
                   "allora_factors": q["allora"]["factor_summary"],
                   "lowr_significance": q["lowr"]["significance"], "lowr_norm_a": q["lowr"]["norm_a"],
                   "lowr_norm_b": q["lowr"]["norm_b"], "lowr_gamma": q["lowr"]["gamma"],
                   "flags": raised_layer_flags(facts)}
            layers.append(rec)
        record = to_jsonable({"run_id": self.run_id, "step": int(step), "layers": layers}, nonfinite="null")
        self.last_step = int(step)
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
    """A ``transformers.TrainerCallback`` logging :class:`AdapterMonitor` records every ``every`` global steps, and
    the last step at the end of training (``on_train_end``) when it was not logged already.

    ``Trainer(..., callbacks=[DiagnoseCallback("diag.jsonl", every=10)])``. transformers is imported here only.
    """
    from transformers import TrainerCallback

    class _DiagnoseCallback(TrainerCallback):
        def __init__(self):
            self.monitor = None

        def _log(self, model, step):
            if self.monitor is None:
                self.monitor = AdapterMonitor(model, path, every=every, eta=eta, lowr_alpha=lowr_alpha,
                                              tensorboard=tensorboard)
            self.monitor.model = model
            self.monitor.log(step)

        def on_train_begin(self, args, state, control, **kwargs):
            self.monitor = None  # a new run: a new header (trainer.train() twice appends two runs)
            return control

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and state.global_step % every == 0:
                self._log(model, state.global_step)
            return control

        def on_train_end(self, args, state, control, model=None, **kwargs):
            last = None if self.monitor is None else self.monitor.last_step
            if model is not None and state.global_step > 0 and last != state.global_step:
                self._log(model, state.global_step)
            return control

    return _DiagnoseCallback()

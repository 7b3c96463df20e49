"""``diagnose_adapter``: the report of one PEFT LoRA adapter against the three papers, and its outputs.

JSON contract: a top-level ``layers`` list, one dict per adapted linear layer with at least ``name`` (the module
path as PEFT writes it, ``base_model.model.model.layers.0.self_attn.q_proj``), ``r``, ``scaling``, ``norm_A``,
``norm_B``, ``norm_BA`` (Frobenius norm of scaling * B @ A) and ``flags`` (list of str); a top-level ``flags``
list (every flag raised anywhere, sorted) with ``flag_details`` (flag -> explanation and layers), plus
``unsupported`` (layers named, with why they are not analysed), ``stacks`` (ripple bound per stack, with a base
model), ``settings`` and ``source``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnose.adapter import Adapter, load_adapter
from diagnose.errors import DiagnoseError
from diagnose.quantities import adapter_quantities, base_quantities, calibration_quantities

__all__ = ["FLAG_EXPLANATIONS", "LayerReport", "Report", "Thresholds", "diagnose_adapter"]


@dataclass(frozen=True)
class Thresholds:
    """The stated rules of the flags (every flag's explanation quotes its rule)."""

    dead_rms: float = 1e-6  # dead_adapter: RMS entry of s B A below this (or B exactly zero)
    scale_min: float = 0.25  # scale_small: scaling below this
    scale_max: float = 8.0  # scale_large: scaling above this
    dominate_m: float = 1.0  # update_dominates: m = ||s B A||_2 / ||W||_2 at least this
    dropout_steps: int = 100  # dropout_below_noise: more steps than this to resolve the penalty


FLAG_EXPLANATIONS = {
    "dead_adapter": "B is exactly zero or the RMS entry of s*B@A is below {dead_rms:g}: the adapter changes "
                    "nothing (never trained, B stuck at its zero init, or lost in sharded saving)",
    "scale_small": "scaling < {scale_min:g}: the update s*B@A is shrunk; with Adam (steps ~ lr whatever the "
                   "gradient) it learns 1/s times slower than at s = 1 (PEFT's default alpha = r = 8 gives 1)",
    "scale_large": "scaling > {scale_max:g}: the scale, not the learned weights, sets the size of the update "
                   "(ALLoRA sec. 3.3 ripple: each adapted layer multiplies the output bound by 1 + s||BA||/||W||)",
    "rank_exceeds_dims": "r > min(d_in, d_out): B@A has rank <= min(d_in, d_out), so r - min(d_in, d_out) "
                         "channels are redundant (and rsLoRA's alpha/sqrt(r) no longer matches the usable rank)",
    "dora": "DoRA magnitude vector present: the effective update is m * (W + s*B@A) / ||W + s*B@A||_row - W; the "
            "norms reported are those of s*B@A alone",
    "update_dominates": "m = ||s*B@A||_2 / ||W||_2 >= {dominate_m:g}: the adapter outweighs the frozen weight "
                        "(ALLoRA sec. 3.3: the ripple bound's factor 1 + m >= 2 per layer)",
    "intruder_dimensions": "some top singular directions of W + s*B@A have |cos| < epsilon with every singular "
                           "direction of W: new directions (the 'intruder dimensions' of LoRA vs full fine-tuning)",
    "dropout_below_noise": "at this batch, more than {dropout_steps} dropout realisations (steps) are needed before "
                           "the expected penalty exceeds the Monte-Carlo noise Std/sqrt(n) (ALLoRA app. A)",
    "unsupported_layer": "LoRA weights of a layer type that is not a linear map (embedding, convolution, "
                         "parameter); named in `unsupported`, not analysed",
}


@dataclass
class LayerReport:
    """All numbers of one layer; :meth:`to_dict` is its JSON form. Arrays (row norms, ...) stay numpy here."""

    name: str
    r: int
    alpha: float
    scaling: float
    d_in: int
    d_out: int
    dropout: float
    quantities: dict
    base: dict | None = None
    calibration: dict | None = None
    dora_magnitude: dict | None = None
    flags: list[str] = field(default_factory=list)

    def __getattr__(self, item):  # norm_A, norm_B, norm_BA, stable_rank, ... read from quantities
        quantities = self.__dict__.get("quantities", {})
        if item in quantities:
            return quantities[item]
        raise AttributeError(item)

    def to_dict(self, *, full: bool = False) -> dict:
        """JSON-ready dict; ``full`` adds the per-row ALLoRA arrays (length d_out) and the intruder cosines."""
        q = self.quantities
        out = {
            "name": self.name, "r": self.r, "alpha": self.alpha, "scaling": self.scaling, "d_in": self.d_in,
            "d_out": self.d_out, "lora_dropout": self.dropout,
            "norm_A": q["norm_A"], "norm_B": q["norm_B"], "norm_BA": q["norm_BA"],
            "spectral_norm_BA": q["spectral_norm_BA"], "singular_values": q["singular_values"],
            "stable_rank": q["stable_rank"], "effective_rank": q["effective_rank"],
            "b_exactly_zero": q["b_exactly_zero"], "rslora": q["rslora"],
            "allora": {k: v for k, v in q["allora"].items() if full or k not in ("row_norms", "factors")},
            "lowr": q["lowr"], "flags": list(self.flags),
        }
        if self.dora_magnitude is not None:
            out["dora_magnitude"] = self.dora_magnitude
        if self.base is not None:
            base = dict(self.base)
            if not full:
                base["intruder"] = {k: v for k, v in base["intruder"].items() if k != "max_abs_cos"}
            out["base"] = base
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return _jsonable(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


@dataclass
class Report:
    """The diagnosis: ``layers`` (:class:`LayerReport`), ``flags`` (sorted names), ``stacks``, ``unsupported``."""

    source: str
    layers: list[LayerReport]
    flags: list[str]
    flag_details: dict
    unsupported: list[dict]
    other_tensors: list[str]
    stacks: list[dict] | None
    settings: dict
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def to_dict(self, *, full: bool = False) -> dict:
        return _jsonable({
            "source": self.source, "settings": self.settings, "flags": self.flags, "flag_details": self.flag_details,
            "layers": [lay.to_dict(full=full) for lay in self.layers], "stacks": self.stacks,
            "unsupported": self.unsupported, "other_tensors": self.other_tensors, "notes": self.notes,
        })

    def to_json(self, path: str | Path | None = None, *, full: bool = False) -> str:
        """The JSON text (strict JSON: inf as the string "inf"); written to ``path`` too when given."""
        text = json.dumps(self.to_dict(full=full), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self) -> str:
        from diagnose.render import table

        return table(self)

    def plot(self, path: str | Path) -> Path:
        from diagnose.render import plot

        return plot(self, path)


def _stack_key(name: str) -> tuple[str, int] | None:
    """'...layers.3.self_attn.q_proj' -> ('...layers.*.self_attn.q_proj', 3); None without a numeric index."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if not idx:
        return None
    i = idx[-1]
    return ".".join(parts[:i] + ["*"] + parts[i + 1:]), int(parts[i])


def _stacks(layers: list[LayerReport]) -> list[dict]:
    """ALLoRA sec. 3.3 per stack of same-role layers across depth: prod (1 + m_l) and (1 + mean m)^L.

    With the scaling folded into B (eta = 1 in ``analysis.ripple``), ||f_L|| <= prod_l ||W_l|| prod_l (1 + m_l)
    ||x|| <= C (1 + m_bar)^L ||x||: the two factors by which the adapters can at most amplify the frozen chain.
    """
    groups: dict[str, list] = {}
    for lay in layers:
        key = _stack_key(lay.name)
        if key is not None and lay.base is not None:
            groups.setdefault(key[0], []).append((key[1], lay.base["m"]))
    out = []
    for pattern, items in sorted(groups.items()):
        items.sort()
        m = np.array([v for _, v in items])
        out.append({"stack": pattern, "depth": len(items), "indices": [i for i, _ in items], "m": m,
                    "ripple_product": float(np.prod(1.0 + m)), "m_bar": float(m.mean()),
                    "ripple_amgm": float((1.0 + m.mean()) ** len(m))})
    return out


def diagnose_adapter(adapter, base=None, calibration=None, *, eta: float = 2.0, lowr_alpha: float = 1.0,
                     lowr_tau: float = math.inf, intruder_top_k: int = 10, intruder_epsilon: float = 0.5,
                     thresholds: Thresholds | None = None, adapter_name: str | None = None,
                     max_bytes: int = 2**28) -> Report:
    """Diagnose a PEFT LoRA adapter: a ``save_pretrained`` folder (str / Path) or a loaded ``PeftModel``.

    ``base``: a folder loadable by transformers or a model object, for m_l, the ripple bound and the intruder
    dimensions (a ``PeftModel`` brings its own base weights). ``calibration``: token ids (file or array, see
    :func:`diagnose.base.load_calibration`) for the exact dropout penalty on the captured layer inputs; it needs a
    base model. ``eta``: ALLoRA's eta (default 2, listing 1's 1/eta^2 = 1/4). ``lowr_alpha``, ``lowr_tau``:
    LoWR's Algorithm 1 hyper-parameters for the gamma_i shown. Raises :class:`DiagnoseError` on bad input.
    """
    th = thresholds or Thresholds()
    if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
        raise DiagnoseError(f"eta (ALLoRA) must be a finite number > 0, got {eta!r}")
    if not (isinstance(lowr_alpha, int | float) and math.isfinite(lowr_alpha) and lowr_alpha >= 0):
        raise DiagnoseError(f"lowr_alpha must be a finite number >= 0, got {lowr_alpha!r}")
    if not (isinstance(lowr_tau, int | float) and lowr_tau > 0):
        raise DiagnoseError(f"lowr_tau must be > 0 (inf allowed), got {lowr_tau!r}")
    ad: Adapter = load_adapter(adapter, adapter_name)
    notes: list[str] = []

    model = None
    if base is not None:
        from diagnose.base import load_base_model

        model = load_base_model(base, ad)
    elif ad.peft_model is not None:
        model = ad.peft_model
    if calibration is not None and model is None:
        raise DiagnoseError("calibration needs the base model: pass base= (--base MODEL) or a PeftModel")

    layers = []
    for lay in ad.layers:
        q = adapter_quantities(lay.A, lay.B, lay.scaling, use_rslora=lay.use_rslora, eta=eta,
                               lowr_alpha=lowr_alpha, lowr_tau=lowr_tau)
        rep = LayerReport(name=lay.name, r=lay.r, alpha=lay.alpha, scaling=lay.scaling, d_in=lay.d_in,
                          d_out=lay.d_out, dropout=lay.dropout, quantities=q)
        if lay.magnitude is not None:
            mag = lay.magnitude
            rep.dora_magnitude = {"norm": float(np.linalg.norm(mag)), "min": float(mag.min()),
                                  "mean": float(mag.mean()), "max": float(mag.max())}
        layers.append(rep)

    if model is not None:
        from diagnose.base import base_weight

        for lay, rep in zip(ad.layers, layers, strict=True):
            W = base_weight(model, lay)
            if lay.magnitude is not None:
                mag = lay.magnitude
                merged = W + lay.scaling * lay.B @ lay.A
                dora_delta = mag[:, None] * merged / np.linalg.norm(merged, axis=1, keepdims=True) - W
                rep.dora_magnitude["norm_effective_update"] = float(np.linalg.norm(dora_delta))
                rep.dora_magnitude["norm_rows_W_plus_update"] = float(np.linalg.norm(np.linalg.norm(merged, axis=1)))
            rep.base = base_quantities(W, lay.A, lay.B, lay.scaling, intruder_top_k=intruder_top_k,
                                       intruder_epsilon=intruder_epsilon)

    if calibration is not None:
        from diagnose.base import base_weight, capture_inputs, load_calibration, vocab_size

        ids = load_calibration(calibration, vocab_size(model))
        peft_forward = model is ad.peft_model or hasattr(model, "peft_config")
        if not peft_forward and any(lay.magnitude is not None for lay in ad.layers):
            notes.append("calibration skipped: a DoRA adapter's forward needs the PeftModel (pass it instead of the "
                         "folder)")
        else:
            if peft_forward and model is not ad.peft_model:
                notes.append("base is itself a PeftModel: its own adapter's forward is used for the calibration")
            inputs = capture_inputs(model, ad, ids, peft_forward=peft_forward)
            for lay, rep in zip(ad.layers, layers, strict=True):
                if lay.magnitude is not None:
                    rep.calibration = {"skipped": "DoRA layer: the closed form is for plain LoRA"}
                    continue
                rep.calibration = calibration_quantities(inputs[lay.name], base_weight(model, lay), lay.A, lay.B,
                                                         lay.scaling, lay.dropout, max_bytes=max_bytes)

    # flags
    for lay, rep in zip(ad.layers, layers, strict=True):
        q = rep.quantities
        rms = q["norm_BA"] / math.sqrt(rep.d_in * rep.d_out)
        if q["b_exactly_zero"] or rms < th.dead_rms:
            rep.flags.append("dead_adapter")
        if abs(rep.scaling) < th.scale_min:
            rep.flags.append("scale_small")
        if abs(rep.scaling) > th.scale_max:
            rep.flags.append("scale_large")
        if rep.r > min(rep.d_in, rep.d_out):
            rep.flags.append("rank_exceeds_dims")
        if lay.magnitude is not None:
            rep.flags.append("dora")
        if rep.base is not None:
            if rep.base["m"] >= th.dominate_m:
                rep.flags.append("update_dominates")
            if rep.base["intruder"]["count"] > 0 and "dead_adapter" not in rep.flags:
                rep.flags.append("intruder_dimensions")
        cal = rep.calibration
        if cal and cal.get("steps_to_resolve") is not None and cal["steps_to_resolve"] > th.dropout_steps:
            rep.flags.append("dropout_below_noise")
    rules = {k: v for k, v in vars(th).items()}
    details = {}
    for rep in layers:
        for f in rep.flags:
            details.setdefault(f, {"explanation": FLAG_EXPLANATIONS[f].format(**rules), "layers": []})
            details[f]["layers"].append(rep.name)
    if ad.unsupported:
        details["unsupported_layer"] = {"explanation": FLAG_EXPLANATIONS["unsupported_layer"],
                                        "layers": [u["name"] for u in ad.unsupported]}
    if not layers:
        notes.append("no LoRA linear layer to analyse: every LoRA layer is of an unsupported type")
    settings = {"eta": eta, "lowr_alpha": lowr_alpha, "lowr_tau": lowr_tau, "intruder_top_k": intruder_top_k,
                "intruder_epsilon": intruder_epsilon, "thresholds": rules, "base": base is not None or model is not None,
                "calibration": calibration is not None, "use_rslora": bool(ad.config.get("use_rslora", False)),
                "lora_alpha": ad.config.get("lora_alpha"), "r": ad.config.get("r"),
                "rank_pattern": ad.config.get("rank_pattern") or {}, "alpha_pattern": ad.config.get("alpha_pattern") or {}}
    return Report(source=ad.source, layers=layers, flags=sorted(details), flag_details=details,
                  unsupported=ad.unsupported, other_tensors=ad.other_tensors,
                  stacks=_stacks(layers) if model is not None else None, settings=settings, notes=notes)

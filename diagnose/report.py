"""``diagnose_adapter``: the report of one PEFT LoRA adapter against the three papers, and its outputs.

The JSON form (``Report.to_dict`` / ``to_json``) is described by ``diagnose/report.schema.json`` (JSON Schema,
checked by the tests on every adapter of the suite) and versioned by ``schema_version``. Its rules: every key is
always present (``null`` when a quantity is not computed, with the reason in the matching ``*_skipped`` field);
a number field is a number or ``null`` (an infinite or undefined value is ``null``, never a string); the flags raised
are split into ``problems`` and ``notes`` (kinds declared once in :mod:`diagnose.flags`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from analysis.jsonable import to_jsonable
from diagnose.adapter import Adapter, load_adapter
from diagnose.errors import DiagnoseError
from diagnose.flags import FLAGS, default_thresholds, flag, layer_facts, raised_layer_flags
from diagnose.quantities import a_init_check, adapter_quantities, base_quantities, merge_rounding

__all__ = ["SCHEMA_VERSION", "LayerReport", "Report", "diagnose_adapter", "schema", "tool_version"]

#: Version of the JSON report's layout (``diagnose/report.schema.json``); bumped on any incompatible change.
SCHEMA_VERSION = "2.0"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def tool_version() -> str:
    """The installed lora-theory version (``0+unknown`` from a bare checkout)."""
    try:
        from importlib.metadata import version

        return version("lora-theory")
    except Exception:  # PackageNotFoundError, or a broken metadata install
        return "0+unknown"


def schema() -> dict:
    """The JSON Schema of :meth:`Report.to_dict` (``diagnose/report.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text())


def _split(names) -> tuple[list[str], list[str]]:
    kinds = {f.name: f.kind for f in FLAGS}
    return [n for n in names if kinds[n] == "problem"], [n for n in names if kinds[n] == "note"]


class _FlagKinds:
    """``problems`` / ``notes``: the raised ``flags`` split by their declared kind (:data:`diagnose.flags.FLAGS`)."""

    flags: list

    @property
    def problems(self) -> list[str]:
        return _split(self.flags)[0]

    @property
    def notes(self) -> list[str]:
        return _split(self.flags)[1]


@dataclass
class LayerReport(_FlagKinds):
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
    base_skipped: str | None = None
    calibration: dict | None = None
    calibration_skipped: str | None = None
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
        base = None
        if self.base is not None:
            base = dict(self.base)
            if not full:
                base["intruder"] = {k: v for k, v in base["intruder"].items()
                                    if k not in ("max_abs_cos", "cluster_sizes", "energy_in_update")}
        out = {
            "name": self.name, "r": self.r, "alpha": self.alpha, "scaling": self.scaling, "d_in": self.d_in,
            "d_out": self.d_out, "lora_dropout": self.dropout,
            "norm_A": q["norm_A"], "norm_B": q["norm_B"], "norm_BA": q["norm_BA"],
            "spectral_norm_BA": q["spectral_norm_BA"], "singular_values": q["singular_values"],
            "stable_rank": q["stable_rank"], "effective_rank": q["effective_rank"],
            "b_exactly_zero": q["b_exactly_zero"], "a_init": q["a_init"], "rslora": q["rslora"],
            "allora": {k: v for k, v in q["allora"].items() if full or k not in ("row_norms", "factors")},
            "lowr": q["lowr"], "dora_magnitude": self.dora_magnitude,
            "base": base, "base_skipped": self.base_skipped,
            "calibration": self.calibration, "calibration_skipped": self.calibration_skipped,
            "problems": self.problems, "notes": self.notes, "flags": list(self.flags),
        }
        return to_jsonable(out, nonfinite="null")


@dataclass
class Report(_FlagKinds):
    """The diagnosis: ``layers`` (:class:`LayerReport`), ``flags`` (names raised), ``problems`` / ``notes`` (the
    same split by kind), ``flag_details`` (name -> kind, rule, explanation, threshold, layers), ``stacks``,
    ``unsupported``, ``missing_modules``, ``messages`` (sentences: what was skipped and why)."""

    source: str
    layers: list[LayerReport]
    flags: list[str]
    flag_details: dict
    unsupported: list[dict]
    other_tensors: list[str]
    stacks: list[dict] | None
    settings: dict
    messages: list[str] = field(default_factory=list)
    missing_modules: list[str] = field(default_factory=list)
    base_info: dict | None = None
    questions: dict = field(default_factory=lambda: {"adapter_applied": None, "rslora_ignored_factor": None})

    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def to_dict(self, *, full: bool = False) -> dict:
        return to_jsonable({
            "schema_version": SCHEMA_VERSION, "tool_version": tool_version(),
            "source": self.source, "settings": self.settings,
            "problems": self.problems, "notes": self.notes, "flags": self.flags, "flag_details": self.flag_details,
            "layers": [lay.to_dict(full=full) for lay in self.layers], "stacks": self.stacks,
            "unsupported": self.unsupported, "missing_modules": self.missing_modules,
            "other_tensors": self.other_tensors, "base_model": self.base_info, "questions": self.questions,
            "messages": self.messages,
        }, nonfinite="null")

    def to_json(self, path: str | Path | None = None, *, full: bool = False) -> str:
        """The JSON text (strict JSON; see the module docstring); written to ``path`` too when given."""
        text = json.dumps(self.to_dict(full=full), indent=2, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self, *, wide: bool = False, width: int = 100) -> str:
        from diagnose.render import table

        return table(self, wide=wide, width=width)

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
        if key is not None and lay.base is not None and lay.base["m"] is not None:
            groups.setdefault(key[0], []).append((key[1], lay.base["m"]))
    out = []
    for pattern, items in sorted(groups.items()):
        items.sort()
        m = np.array([v for _, v in items])
        out.append({"stack": pattern, "depth": len(items), "indices": [i for i, _ in items], "m": m,
                    "ripple_product": float(np.prod(1.0 + m)), "m_bar": float(m.mean()),
                    "ripple_amgm": float((1.0 + m.mean()) ** len(m))})
    return out


#: init_lora_weights values whose initialisation subtracts the initial adapter from W (PEFT: the base weight is
#: replaced by a residual): pissa (and pissa_niter_*), olora, corda, loftq. EVA only sets A (B = 0, W untouched).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _init_changes_base(config: dict) -> bool:
    init = config.get("init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)


def _check_number(name, value, *, low=0.0, allow_inf=False, strict=True):
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (allow_inf or math.isfinite(value)) and (value > low if strict else value >= low)
    if not ok:
        raise DiagnoseError(f"{name} must be a {'' if allow_inf else 'finite '}number {'>' if strict else '>='} "
                            f"{low:g}{' (inf allowed)' if allow_inf else ''}, got {value!r}")


def diagnose_adapter(adapter, base=None, calibration=None, *, eta: float = 2.0, lowr_alpha: float = 1.0,
                     lowr_tau: float = math.inf, intruder_top_k: int = 10, intruder_epsilon: float = 0.5,
                     thresholds: dict | None = None, adapter_name: str | None = None, layers: str | None = None,
                     strict: bool = False, base_fingerprint: str | None = None, progress: bool = False,
                     blas_threads: int | None = 1, device: str | None = None) -> Report:
    """Diagnose a PEFT LoRA adapter: a ``save_pretrained`` folder (str / Path) or a loaded ``PeftModel``.

    ``base``: a folder loadable by transformers or a model object, for m_l, the ripple bound and the intruder
    dimensions (a ``PeftModel`` brings its own base weights). ``calibration``: token ids (file or array, see
    :func:`diagnose.base.load_calibration`) for the exact dropout penalty on the captured layer inputs; it needs a
    base model. ``eta``: ALLoRA's eta (default 2, listing 1's 1/eta^2 = 1/4). ``lowr_alpha``, ``lowr_tau``:
    LoWR's Algorithm 1 hyper-parameters for the gamma_i shown. ``thresholds``: {flag name: value} overriding the
    defaults of :data:`diagnose.flags.FLAGS`. ``layers``: a regular expression; only the layers whose name it
    matches (``re.search``) are analysed. ``strict``: missing modules are an error instead of a flag.
    ``base_fingerprint``: the expected fingerprint of the base weights (``base_model.fingerprint`` of an earlier
    report); a different one raises ``base_mismatch``. Raises :class:`DiagnoseError` on bad input.
    """
    _check_number("eta (ALLoRA)", eta)
    _check_number("lowr_alpha", lowr_alpha, strict=False)
    _check_number("lowr_tau", lowr_tau, allow_inf=True)
    _check_number("intruder_epsilon", intruder_epsilon)
    th = default_thresholds()
    th["intruder_dimensions"] = float(intruder_epsilon)
    for name, value in (thresholds or {}).items():
        if name not in th:
            raise DiagnoseError(f"thresholds: unknown flag {name!r}; flags with a threshold: {', '.join(th)}")
        _check_number(f"thresholds[{name!r}]", value, strict=False)
        th[name] = value
    intruder_epsilon = th["intruder_dimensions"]
    pattern = None
    if layers is not None:
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise DiagnoseError(f"layers: {layers!r} is not a valid regular expression ({exc})") from exc
    ad: Adapter = load_adapter(adapter, adapter_name)
    messages: list[str] = []
    adapter_flags: dict[str, list[str]] = {}
    selected = ad.layers
    if pattern is not None:
        selected = [lay for lay in ad.layers if pattern.search(lay.name)]
        if not selected:
            raise DiagnoseError(f"layers: {layers!r} matches none of the {len(ad.layers)} adapted layers (e.g. "
                                f"{ad.layers[0].name if ad.layers else '-'})")
        messages.append(f"--layers {layers!r}: {len(selected)} of {len(ad.layers)} layers analysed")

    from diagnose.base import open_base

    source = open_base(base, ad) if base is not None else (open_base(ad.peft_model, ad) if ad.peft_model else None)
    if calibration is not None and source is None:
        raise DiagnoseError("calibration needs the base model: pass base= (--base MODEL) or a PeftModel")

    # adapter-level facts: missing modules, patterns, rsLoRA, merged, base identity, init
    missing = source.missing_modules(ad) if source is not None else ad.missing_by_stack()
    if missing:
        if strict:
            raise DiagnoseError(f"{ad.source}: {len(missing)} targeted module(s) have no saved lora_A / lora_B: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (a lost shard?)")
        adapter_flags["missing_modules"] = missing
    if ad.config.get("rank_pattern") or ad.config.get("alpha_pattern"):
        adapter_flags["patterns_in_force"] = [lay.name for lay in ad.layers
                                              if (lay.r, lay.alpha) != (ad.config.get("r"),
                                                                        ad.config.get("lora_alpha"))]
    if ad.config.get("use_rslora"):
        adapter_flags["rslora_engine_factor"] = []
    if any(lay.merged for lay in ad.layers):
        adapter_flags["merged_model"] = [lay.name for lay in ad.layers if lay.merged]
    base_info = None
    withhold_base = None
    if source is not None:
        base_info = source.identity(ad, expected_fingerprint=base_fingerprint)
        if base_info["mismatch"]:
            adapter_flags["base_mismatch"] = []
            messages.append(f"base_mismatch: {base_info['mismatch']}")
        if _init_changes_base(ad.config) and not source.is_peft_model:
            adapter_flags["init_changes_base"] = []
            withhold_base = (f"init_lora_weights={ad.config.get('init_lora_weights')!r} changed W during "
                             f"initialisation; this adapter needs the residual base (the PeftModel it was trained "
                             f"in) or a converted save (path_initial_model_for_weight_conversion)")

    numerics_device = None  # the per-layer base numerics: on the CPU unless a device is given
    if source is not None and device is not None and str(device) != "cpu":
        import torch

        try:
            torch.zeros(1, device=torch.device(device))
        except (RuntimeError, AssertionError) as exc:  # no such device, or torch built without CUDA
            raise DiagnoseError(f"device {device!r} is not usable here ({exc})") from exc
        numerics_device = device
    questions: dict = {"adapter_applied": None, "rslora_ignored_factor": None}
    if ad.config.get("use_rslora"):  # alpha/r instead of alpha/sqrt(r): 1/sqrt(r) of the intended scale
        questions["rslora_ignored_factor"] = {lay.name: 1.0 / math.sqrt(lay.r) for lay in selected}
    default_init = ad.config.get("init_lora_weights", True) is True
    reports = []
    iterator = selected
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(selected, desc="diagnose", unit="layer", leave=False)
    # the per-layer numerics on blas_threads BLAS threads (None: the libraries' default)
    limiter = threadpool_limits(limits=blas_threads) if blas_threads else None
    try:
        for lay in iterator:
            q = adapter_quantities(lay.A, lay.B, lay.scaling, use_rslora=lay.use_rslora, eta=eta,
                                   lowr_alpha=lowr_alpha, lowr_tau=lowr_tau)
            q["a_init"] = a_init_check(lay.A) if default_init else None
            rep = LayerReport(name=lay.name, r=lay.r, alpha=lay.alpha, scaling=lay.scaling, d_in=lay.d_in,
                              d_out=lay.d_out, dropout=lay.dropout, quantities=q)
            if lay.magnitude is not None:
                mag = lay.magnitude
                rep.dora_magnitude = {"norm": float(np.linalg.norm(mag)), "min": float(mag.min()),
                                      "mean": float(mag.mean()), "max": float(mag.max()),
                                      "norm_effective_update": None, "norm_rows_W_plus_update": None}
            if source is None:
                rep.base_skipped = "no base model given"
            elif withhold_base:
                rep.base_skipped = withhold_base
            else:
                W = source.weight(lay)
                if lay.magnitude is not None:
                    merged = W + lay.scaling * lay.B @ lay.A
                    dora_delta = lay.magnitude[:, None] * merged / np.linalg.norm(merged, axis=1, keepdims=True) - W
                    rep.dora_magnitude["norm_effective_update"] = float(np.linalg.norm(dora_delta))
                    rep.dora_magnitude["norm_rows_W_plus_update"] = float(np.linalg.norm(np.linalg.norm(merged, axis=1)))
                rep.base = base_quantities(W, lay.A, lay.B, lay.scaling, sigma_update=q["singular_values"],
                                           intruder_top_k=intruder_top_k, intruder_epsilon=intruder_epsilon,
                                           device=numerics_device)
                rep.base["merge_rounding"] = merge_rounding(W, lay.A, lay.B, lay.scaling)
            reports.append(rep)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()

    if calibration is not None:
        _calibrate(ad, selected, source, reports, calibration, withhold_base, messages, questions, device)
    else:
        for rep in reports:
            rep.calibration_skipped = "no calibration batch given"

    # flags: layer flags from the declared rules, adapter flags from the checks above
    details: dict[str, dict] = {}
    for rep in reports:
        q = rep.quantities
        intr = rep.base["intruder"] if rep.base else None
        facts = layer_facts(b_exactly_zero=q["b_exactly_zero"], norm_update=q["norm_BA"], scaling=rep.scaling,
                            r=rep.r, d_in=rep.d_in, d_out=rep.d_out, dora=rep.dora_magnitude is not None,
                            m=rep.base["m"] if rep.base else None,
                            a_at_init=q["a_init"]["consistent_with_init"] if q["a_init"] else None,
                            merge_bf16=rep.base["merge_rounding"]["bfloat16"]["predicted"] if rep.base else None,
                            intruder_count=intr["count"] if intr else None,
                            intruder_abstained=intr["abstained"] if intr else None,
                            steps_to_resolve=(rep.calibration or {}).get("steps_to_resolve"))
        rep.flags = raised_layer_flags(facts, th)
        for name in rep.flags:
            details.setdefault(name, []).append(rep.name)
    if ad.unsupported:
        adapter_flags["unsupported_layer"] = [u["name"] for u in ad.unsupported]
    applied = (questions["adapter_applied"] or {}).get("relative_output_change")
    if applied is not None and applied < th["adapter_not_applied"] and reports:
        adapter_flags["adapter_not_applied"] = []
    details.update(adapter_flags)
    order = [f.name for f in FLAGS]
    flag_details = {name: {"kind": flag(name).kind, "rule": flag(name).rule_text(th.get(name)),
                           "explanation": flag(name).explanation, "threshold": th.get(name),
                           "layers": details[name]}
                    for name in order if name in details}
    if not reports:
        messages.append("no LoRA linear layer to analyse: every LoRA layer is of an unsupported type")
    settings = {"eta": eta, "lowr_alpha": lowr_alpha, "lowr_tau": lowr_tau, "intruder_top_k": intruder_top_k,
                "intruder_epsilon": intruder_epsilon, "thresholds": th, "base": source is not None,
                "calibration": calibration is not None, "use_rslora": bool(ad.config.get("use_rslora", False)),
                "lora_alpha": ad.config.get("lora_alpha"), "r": ad.config.get("r"),
                "rank_pattern": ad.config.get("rank_pattern") or {},
                "alpha_pattern": ad.config.get("alpha_pattern") or {}, "layers": layers, "strict": strict}
    return Report(source=ad.source, layers=reports, flags=list(flag_details), flag_details=flag_details,
                  unsupported=ad.unsupported, other_tensors=ad.other_tensors,
                  stacks=_stacks(reports) if source is not None else None, settings=settings, messages=messages,
                  missing_modules=missing, base_info=base_info, questions=questions)


def _calibrate(ad, selected, source, reports, calibration, withhold_base, messages, questions, device):
    from diagnose.base import FolderSource, load_calibration

    model = source.model()
    if isinstance(source, FolderSource):
        import torch

        try:
            target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            model.to(target)
        except (RuntimeError, AssertionError) as exc:  # no such device, or torch built without CUDA
            raise DiagnoseError(f"device {device!r} is not usable here ({exc})") from exc
    ids = load_calibration(calibration, source.vocab_size(), source.context_length(),
                           tokenizer_folder=getattr(source, "folder", None) or source.name_or_path)
    peft_forward = source.is_peft_model
    reason = None
    if withhold_base:
        reason = withhold_base
    elif not peft_forward and any(lay.magnitude is not None for lay in selected):
        reason = "a DoRA adapter's forward needs the PeftModel (pass it instead of the folder)"
    if reason:
        messages.append(f"calibration skipped: {reason}")
        for rep in reports:
            rep.calibration_skipped = reason
        return
    if peft_forward and model is not ad.peft_model:
        messages.append("base is itself a PeftModel: its own adapter's forward is used for the calibration")
    from diagnose.base import capture_statistics

    stats, applied = capture_statistics(model, selected, ids, peft_forward=peft_forward)
    questions["adapter_applied"] = applied
    for lay, rep in zip(selected, reports, strict=True):
        if lay.magnitude is not None:
            rep.calibration_skipped = "DoRA layer: the closed form is for plain LoRA"
            continue
        rep.calibration = stats[lay.name].result()

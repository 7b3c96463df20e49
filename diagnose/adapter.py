"""Reading a PEFT LoRA adapter: its per-layer A, B, rank, alpha and scaling, exactly as PEFT resolves them.

Two sources give the same :class:`Adapter`:

- a ``save_pretrained`` folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``),
  read without PEFT or transformers: ``safetensors`` (or a minimal reader of the same format when it is not
  installed) or ``torch.load(weights_only=True)``;
- a loaded ``peft.PeftModel``: the values are read from its LoRA layers (``module.scaling[adapter]``,
  ``module.r[adapter]``, ``lora_A[adapter].weight`` ...).

Resolution of a layer's rank and alpha (PEFT ``LoraModel._create_and_replace``): the module path relative to
the base model (``model.layers.0.self_attn.q_proj``; the saved name prefixes it with ``base_model.model.``) is
matched against the keys of ``rank_pattern`` / ``alpha_pattern`` by ``peft.utils.other.get_pattern_key``
(``re.match(rf"(.*\\.)?({key})$", name)``, first key in order wins), else ``r`` / ``lora_alpha``. The scaling is
then ``alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA eq. 4) and ``alpha / r`` otherwise
(``LoraLayer.update_layer``). That rule is re-stated here (:func:`get_pattern_key`): reading a folder never imports
peft or transformers.

Shapes (torch.nn.Linear / PEFT): A = lora_A (r, d_in), B = lora_B (d_out, r); the layer's update is
scaling * B @ A (d_out, d_in). For GPT-2's ``Conv1D`` (``fan_in_fan_out=True``) A and B have the same shapes;
only the base weight is stored transposed, (d_in, d_out).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diagnose.errors import DiagnoseError

__all__ = ["Adapter", "AdaptedLayer", "load_adapter", "resolve_rank_alpha", "PEFT_PREFIX"]

#: What PEFT puts before a module's path in the saved state dict and in ``PeftModel.named_modules()``.
PEFT_PREFIX = "base_model.model."

_EXPECTED = ("a PEFT save_pretrained folder holding adapter_config.json and adapter_model.safetensors "
             "(or adapter_model.bin)")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)$")
_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")


@dataclass
class AdaptedLayer:
    """One LoRA-adapted linear layer. ``name`` is the module path as PEFT writes it (``base_model.model.<key>``)."""

    name: str
    key: str  # module path inside the base model
    A: np.ndarray  # lora_A (r, d_in), float64
    B: np.ndarray  # lora_B (d_out, r), float64
    r: int
    alpha: float
    scaling: float
    use_rslora: bool
    dropout: float  # lora_dropout, probability of zeroing
    fan_in_fan_out: bool
    magnitude: np.ndarray | None = None  # DoRA magnitude vector (d_out,)
    lora_bias: np.ndarray | None = None  # lora_B bias (lora_bias=True), not part of BA
    merged: bool = False  # a PeftModel layer merged into its base weight (merge_adapter)

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])


@dataclass
class Adapter:
    """An adapter's LoRA layers plus everything it holds that is not a LoRA linear layer (named, with why)."""

    source: str
    config: dict
    layers: list[AdaptedLayer]
    unsupported: list[dict] = field(default_factory=list)  # {"name", "kind", "reason"}
    other_tensors: list[str] = field(default_factory=list)
    adapter_name: str = "default"
    peft_model: object | None = None  # the PeftModel when read from one

    def missing_by_stack(self) -> list[str]:
        """Modules missing from a stack of same-role layers, without the base model.

        A stack is a module path with its first numeric index as the depth (``model.layers.*.self_attn.q_proj``,
        ``encoder.block.*.layer.0.SelfAttention.q``); its container is the path before that index (``model.layers``,
        ``encoder.block``). A stack that holds at least half of the depths seen in its container but not all of them
        misses the others (q_proj saved for layers 0-15 but 5: a lost shard). Stacks present at a few depths only
        (attention every 8th layer of a hybrid model) are not judged, nor is an adapter with ``layers_to_transform``.
        With the base model, :meth:`diagnose.base.BaseSource.missing_modules` is exact.
        """
        if self.config.get("layers_to_transform") not in (None, []):
            return []
        stacks: dict[tuple[str, str], set[int]] = {}
        for name in [lay.name for lay in self.layers] + [u["name"] for u in self.unsupported]:
            parts = name.split(".")
            idx = [i for i, p in enumerate(parts) if p.isdigit()]
            if idx:
                i = idx[0]
                container = ".".join(parts[:i])
                stacks.setdefault((container, ".".join(parts[:i] + ["*"] + parts[i + 1:])), set()).add(int(parts[i]))
        seen: dict[str, set[int]] = {}
        for (container, _), got in stacks.items():
            seen.setdefault(container, set()).update(got)
        missing = []
        for (container, pattern), got in stacks.items():
            if 2 * len(got) >= len(seen[container]):
                missing += [pattern.replace("*", str(i), 1) for i in seen[container] - got]
        return sorted(missing, key=natural_order)


def natural_order(name: str) -> tuple:
    """Sort key of a module path with its numeric parts as integers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    r"""PEFT's ``peft.utils.other.get_pattern_key`` (0.10 - 0.21) re-stated, so that reading an adapter never imports
    peft (4 s): the first key ``k`` with ``re.match(rf"(.*\.)?({k})$", name)`` wins; the name itself otherwise.
    ``tests/diagnose`` checks it against PEFT's own function."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def resolve_rank_alpha(config: dict, key: str) -> tuple[int, float, float]:
    """(r, alpha, scaling) of the module at ``key`` (path inside the base model) as PEFT resolves them.

    r = rank_pattern[match] else config r; alpha = alpha_pattern[match] else lora_alpha; scaling = alpha/sqrt(r)
    if use_rslora else alpha/r (PEFT ``LoraLayer.update_layer``; rsLoRA eq. 4 vs LoRA's alpha/r).
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern.keys()), key), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern.keys()), key), config.get("lora_alpha", 8))
    r, alpha = int(r), float(alpha)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, alpha, scaling


# ------------------------------------------------------------------------------------------ reading a folder


def _read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise DiagnoseError(f"{path}: not found; expected {_EXPECTED}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiagnoseError(f"{path}: unreadable or not valid JSON ({exc}); expected PEFT's adapter config") from exc
    if not isinstance(config, dict):
        raise DiagnoseError(f"{path}: expected a JSON object (PEFT's adapter config), got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise DiagnoseError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type "
                            f"'LORA') can be diagnosed")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise DiagnoseError(f"{path}: {name} must be a number > 0, got {value!r}")
    p = config.get("lora_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise DiagnoseError(f"{path}: lora_dropout must be a probability in [0, 1), got {p!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise DiagnoseError(f"{path}: {name} must be a mapping from module-name patterns to numbers")
    return config


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_safetensors_minimal(path: Path) -> dict:
    """The safetensors format (8-byte little-endian header size, JSON header, raw bytes) read with torch."""
    import torch

    raw = path.read_bytes()
    if len(raw) < 8:
        raise ValueError("file shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"header size {n} exceeds the file size {len(raw)}")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"tensor {name}: offsets {start}..{end} outside the data ({len(data)} bytes)")
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def _read_weights(folder: Path) -> tuple[dict, Path]:
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        try:
            try:
                from safetensors.torch import load_file
            except ImportError:
                return _read_safetensors_minimal(st), st
            return load_file(str(st)), st
        except Exception as exc:  # the library raises its own error types (SafetensorError, ...)
            raise DiagnoseError(f"{st}: not a valid safetensors file ({type(exc).__name__}: {exc}); "
                                f"expected the adapter weights written by PEFT's save_pretrained") from exc
    if binary.is_file():
        import torch

        try:
            state = torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors of many types
            raise DiagnoseError(f"{binary}: unreadable ({type(exc).__name__}: {exc}); expected a torch state "
                                f"dict written by PEFT's save_pretrained") from exc
        if not isinstance(state, dict):
            raise DiagnoseError(f"{binary}: expected a state dict (name -> tensor), got {type(state).__name__}")
        return state, binary
    raise DiagnoseError(f"{folder}: holds no adapter_model.safetensors or adapter_model.bin; expected {_EXPECTED}")


def _to_numpy(name: str, tensor, file: Path) -> np.ndarray:
    try:
        arr = tensor.detach().to("cpu").double().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, float)
    except Exception as exc:
        raise DiagnoseError(f"{file}: tensor {name} is not numeric ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        raise DiagnoseError(f"{file}: tensor {name} has non-finite entries (NaN or inf): the adapter is corrupt "
                            f"or training diverged")
    return arr


def _strip_prefix(module: str) -> str:
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def _load_folder(folder: Path) -> Adapter:
    if not folder.exists():
        raise DiagnoseError(f"{folder}: no such folder; expected {_EXPECTED}")
    if not folder.is_dir():
        raise DiagnoseError(f"{folder}: not a folder; expected {_EXPECTED}")
    config = _read_config(folder)
    state, file = _read_weights(folder)
    parts: dict[str, dict] = {}
    unsupported: dict[str, dict] = {}
    other = []
    for name, tensor in state.items():
        if m := _LORA_KEY.match(name):
            parts.setdefault(m["module"], {})[m["which"]] = (name, tensor)
        elif m := _MAGNITUDE_KEY.match(name):
            parts.setdefault(m["module"], {})["magnitude"] = (name, tensor)
        elif m := _BIAS_KEY.match(name):
            parts.setdefault(m["module"], {})["bias"] = (name, tensor)
        elif m := _EMBEDDING_KEY.match(name):
            unsupported[m["module"]] = {"name": m["module"], "kind": "embedding",
                                        "reason": "LoRA on an embedding (lora_embedding_A/B): a lookup table, "
                                                  "not a linear map of an input; not analysed"}
        else:
            other.append(name)
    if not parts and not unsupported:
        raise DiagnoseError(f"{file}: holds no LoRA tensors (*.lora_A.weight / *.lora_B.weight); it has "
                            f"{len(state)} tensors, e.g. {sorted(state)[:3]}")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    p = float(config.get("lora_dropout", 0.0) or 0.0)
    layers = []
    for module, got in sorted(parts.items()):
        if "lora_A" not in got or "lora_B" not in got:
            have = ", ".join(sorted(got))
            raise DiagnoseError(f"{file}: module {module} has {have} but not both lora_A.weight and lora_B.weight "
                                f"(config/weight mismatch)")
        (a_name, a_t), (b_name, b_t) = got["lora_A"], got["lora_B"]
        if len(a_t.shape) != 2 or len(b_t.shape) != 2:
            unsupported[module] = {"name": module, "kind": f"conv{len(a_t.shape) - 2}d" if len(a_t.shape) > 2 else
                                   "unknown", "reason": f"lora_A of shape {tuple(a_t.shape)} and lora_B of shape "
                                   f"{tuple(b_t.shape)}: a convolution LoRA (kernel weights), not a linear map; not "
                                   f"analysed"}
            continue
        key = _strip_prefix(module)
        r, alpha, scaling = resolve_rank_alpha(config, key)
        A, B = _to_numpy(a_name, a_t, file), _to_numpy(b_name, b_t, file)
        if A.shape[0] != r or B.shape[1] != r:
            raise DiagnoseError(f"{file}: module {module} has lora_A {A.shape} and lora_B {B.shape}, but "
                                f"adapter_config.json gives it rank r = {r} (expected lora_A (r, d_in) and lora_B "
                                f"(d_out, r)): config/weight mismatch")
        magnitude = None
        if "magnitude" in got:
            magnitude = _to_numpy(got["magnitude"][0], got["magnitude"][1], file).reshape(-1)
            if magnitude.shape[0] != B.shape[0]:
                raise DiagnoseError(f"{file}: module {module}: DoRA magnitude of length {magnitude.shape[0]}, "
                                    f"expected d_out = {B.shape[0]} (config/weight mismatch)")
        bias = _to_numpy(got["bias"][0], got["bias"][1], file).reshape(-1) if "bias" in got else None
        layers.append(AdaptedLayer(name=module, key=key, A=A, B=B, r=r, alpha=alpha, scaling=scaling,
                                   use_rslora=bool(config.get("use_rslora", False)), dropout=p,
                                   fan_in_fan_out=fan_in_fan_out, magnitude=magnitude, lora_bias=bias))
    if config.get("use_dora") and layers and all(lay.magnitude is None for lay in layers):
        raise DiagnoseError(f"{file}: adapter_config.json sets use_dora but no lora_magnitude_vector is saved "
                            f"(config/weight mismatch)")
    if config.get("target_parameters"):
        for lay in layers:
            lay_note = "target_parameters set: some LoRA weights may act on nn.Parameters (e.g. MoE experts)"
            unsupported.setdefault(lay.name, {"name": lay.name, "kind": "parameter", "reason": lay_note})
    layers.sort(key=lambda lay: natural_order(lay.name))
    return Adapter(source=str(folder), config=config, layers=layers, unsupported=list(unsupported.values()),
                   other_tensors=sorted(other))


# ------------------------------------------------------------------------------------- reading a PeftModel


def _load_peft_model(model, adapter_name: str | None) -> Adapter:
    from peft.tuners.lora import LoraLayer

    name = adapter_name or getattr(model, "active_adapter", None) or "default"
    if isinstance(name, list | tuple):
        name = name[0]
    peft_config = getattr(model, "peft_config", {}).get(name)
    if peft_config is None:
        raise DiagnoseError(f"the PeftModel has no adapter named {name!r} (it has {sorted(model.peft_config)})")
    if str(getattr(peft_config, "peft_type", "")).upper().split(".")[-1] != "LORA":
        raise DiagnoseError(f"adapter {name!r} is of type {peft_config.peft_type}; only LoRA adapters can be "
                            f"diagnosed")
    config = peft_config.to_dict()
    layers, unsupported = [], []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in getattr(module, "lora_embedding_A", {}):
            unsupported.append({"name": module_name, "kind": "embedding",
                                "reason": "LoRA on an embedding (lora_embedding_A/B): not analysed"})
            continue
        if name not in module.lora_A:
            continue
        a_w, b_w = module.lora_A[name].weight, module.lora_B[name].weight
        if a_w.ndim != 2:
            unsupported.append({"name": module_name, "kind": f"conv{a_w.ndim - 2}d",
                                "reason": f"lora_A of shape {tuple(a_w.shape)}: a convolution LoRA; not analysed"})
            continue
        A = a_w.detach().cpu().double().numpy()
        B = b_w.detach().cpu().double().numpy()
        drop = module.lora_dropout[name]
        p = float(getattr(drop, "p", 0.0))
        magnitude = None
        mags = getattr(module, "lora_magnitude_vector", None)
        if mags is not None and name in mags:
            magnitude = mags[name].weight.detach().cpu().double().numpy().reshape(-1)
        bias = module.lora_B[name].bias
        merged = name in (getattr(module, "merged_adapters", None) or [])
        if merged and magnitude is not None:
            raise DiagnoseError(f"{module_name}: the DoRA adapter {name!r} is merged into the base weights; call "
                                f"model.unmerge_adapter() first (DoRA's merge cannot be undone from A and B alone)")
        layers.append(AdaptedLayer(
            name=module_name, key=_strip_prefix(module_name), A=A, B=B, r=int(module.r[name]),
            alpha=float(module.lora_alpha[name]), scaling=float(module.scaling[name]),
            use_rslora=bool(module.use_rslora.get(name, False)), dropout=p,
            fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)), magnitude=magnitude,
            lora_bias=None if bias is None else bias.detach().cpu().double().numpy(), merged=merged))
    if not layers and not unsupported:
        raise DiagnoseError(f"the PeftModel has no LoRA layer for adapter {name!r}")
    layers.sort(key=lambda lay: natural_order(lay.name))
    return Adapter(source=f"PeftModel({type(model.base_model.model).__name__}, adapter {name!r})", config=config,
                   layers=layers, unsupported=unsupported, adapter_name=name, peft_model=model)


def load_adapter(source, adapter_name: str | None = None) -> Adapter:
    """An :class:`Adapter` from a ``save_pretrained`` folder (str / Path) or a loaded ``peft.PeftModel``.

    Raises :class:`DiagnoseError` naming the file and what was expected on a missing or unreadable folder, a
    non-LoRA adapter, a config/weight mismatch or a corrupt weights file.
    """
    if isinstance(source, str | Path):
        return _load_folder(Path(source))
    if hasattr(source, "peft_config") and hasattr(source, "named_modules"):
        return _load_peft_model(source, adapter_name)
    raise DiagnoseError(f"adapter must be a PEFT save_pretrained folder (str or Path) or a peft.PeftModel, got "
                        f"{type(source).__name__}")

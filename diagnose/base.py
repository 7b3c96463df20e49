"""The base model side: its frozen weights W per adapted layer, its identity, calibration batches, captured inputs.

:func:`open_base` turns ``base`` into a :class:`BaseSource`:

- a folder (or a Hugging Face hub id found in the local cache, or ``"auto"``: the adapter config's
  ``base_model_name_or_path``) holding safetensors weights is read **layer by layer** from the (possibly
  sharded) files, one positioned read per weight: the full model is never materialised, and transformers is imported only when a
  calibration batch needs a forward pass (the class follows the adapter config's ``task_type``, else
  ``auto_mapping.base_model_class``, else ``AutoModelForCausalLM``, else ``AutoModel``);
- a model object (a transformers model without the adapter, or the ``PeftModel`` itself) is read from its modules.
  A merged ``PeftModel`` (``merge_adapter()``) holds W + s B A in its base layers: W is recovered as
  W_merged - s B A (PEFT's own unmerge).

The model is never modified: the adapted forward of a plain base model is obtained with forward hooks that add
s x A^T B^T (eval mode, no dropout) and are removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from diagnose.adapter import PEFT_PREFIX, AdaptedLayer, Adapter
from diagnose.errors import DiagnoseError

__all__ = ["BaseSource", "open_base", "resolve_base_folder", "load_calibration", "capture_statistics",
           "fingerprint", "targeted"]


# ------------------------------------------------------------------------------------------ which modules


def _index_of(key: str) -> int | None:
    m = re.match(r".*\.[^.]*\.(\d+)\.", key)  # PEFT's default layers pattern: the index after a container
    return int(m[1]) if m else None


def targeted(config: dict, key: str) -> bool:
    """Whether PEFT would adapt the module at ``key`` (path inside the base model) under ``config``.

    As ``peft.tuners.tuners_utils.check_target_module_exists``: a string target_modules is a regex matched in full;
    a list matches the key or a '.'-suffix of it; ``layers_to_transform`` keeps the listed layer indices;
    ``exclude_modules`` (same rules) removes. ``all-linear`` (PEFT: every nn.Linear but the output layer) is read
    here as every 2-D weight except embeddings and the output layer (lm_head / embed / wte / wpe in the name).
    """
    def match(spec) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            if spec == "all-linear":
                return not re.search(r"(^|\.)(lm_head|embed\w*|wte|wpe|score|classifier)$", key)
            return re.fullmatch(spec, key) is not None
        return key in spec or any(key.endswith("." + t) for t in spec)

    if match(config.get("exclude_modules")) or not match(config.get("target_modules")):
        return False
    keep = config.get("layers_to_transform")
    if keep not in (None, []) and not isinstance(config.get("target_modules"), str):
        keep = [keep] if isinstance(keep, int) else list(keep)
        return _index_of(key) in keep
    return True


def fingerprint(W: np.ndarray, name: str) -> str:
    """sha256 (16 hex digits) of a layer's W as float32 (d_out, d_in) and its name: the base's identity."""
    h = hashlib.sha256(name.encode())
    h.update(np.ascontiguousarray(W, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ sources


class BaseSource:
    """The frozen base of an adapter: ``weight(layer)`` (float64, nn.Linear orientation), ``module_names()``,
    ``identity(...)``, and ``model()`` (a torch model, for a forward pass)."""

    is_peft_model = False
    name_or_path: str | None = None

    def raw_weight(self, layer: AdaptedLayer) -> np.ndarray:  # as stored (a Conv1D weight is (d_in, d_out))
        raise NotImplementedError

    def module_names(self) -> list[str] | None:
        raise NotImplementedError

    def model(self):
        raise NotImplementedError

    def vocab_size(self) -> int | None:
        raise NotImplementedError

    def context_length(self) -> int | None:
        raise NotImplementedError

    def weight(self, layer: AdaptedLayer) -> np.ndarray:
        """W (d_out, d_in) of the layer's frozen base module, float64 (Conv1D transposed; merged: unmerged)."""
        W = self.raw_weight(layer)
        if W.ndim != 2:
            raise DiagnoseError(f"base module {layer.key} has a weight of shape {W.shape}, not 2-D; the adapter "
                                f"expects a linear layer of shape ({layer.d_out}, {layer.d_in})")
        if layer.fan_in_fan_out and W.shape == (layer.d_in, layer.d_out):
            W = W.T
        if W.shape != (layer.d_out, layer.d_in):
            raise DiagnoseError(f"base module {layer.key} has weight {tuple(W.shape)} but the adapter's lora_B @ "
                                f"lora_A is ({layer.d_out}, {layer.d_in}): the base model does not match the adapter")
        if layer.merged:
            W = W - layer.scaling * layer.B @ layer.A
        return W

    def missing_modules(self, adapter: Adapter) -> list[str]:
        """Module names PEFT would adapt in this base (``targeted``) with no LoRA weights saved."""
        names = self.module_names()
        if names is None:
            return adapter.missing_by_stack()
        have = {lay.key for lay in adapter.layers} | {u["name"].removeprefix(PEFT_PREFIX) for u in adapter.unsupported}
        return [PEFT_PREFIX + n for n in names if n not in have and targeted(adapter.config, n)]

    def identity(self, adapter: Adapter, *, expected_fingerprint: str | None = None) -> dict:
        """name_or_path, the fingerprint of the first adapted layer's W, and why it mismatches (or None)."""
        first = adapter.layers[0] if adapter.layers else None
        fp = fingerprint(self.weight(first), first.key) if first is not None else None
        want = adapter.config.get("base_model_name_or_path") or None
        why = []
        if expected_fingerprint and fp != expected_fingerprint:
            why.append(f"fingerprint {fp} differs from the expected {expected_fingerprint}")
        if want and self.name_or_path and not _same_name(want, self.name_or_path):
            other = _try_folder(want)
            if other is not None and first is not None:
                try:
                    theirs = fingerprint(FolderSource(other).weight(first), first.key)
                except DiagnoseError as exc:
                    theirs = f"unreadable ({exc})"
                if theirs != fp:
                    why.append(f"the adapter was trained on {want!r} ({other}: fingerprint {theirs}), the base given "
                               f"is {self.name_or_path!r} (fingerprint {fp})")
            else:
                why.append(f"the adapter config names base_model_name_or_path {want!r}, the base given is "
                           f"{self.name_or_path!r} (that model is not on this machine to compare weights)")
        return {"name_or_path": self.name_or_path, "adapter_base_model_name_or_path": want, "fingerprint": fp,
                "mismatch": "; ".join(why) or None}


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
            return True
    except OSError:
        pass
    return pa.name == pb.name and pa.name != ""  # 'meta-llama/Llama-2-7b-hf' vs a local '.../Llama-2-7b-hf'


def _try_folder(spec: str) -> Path | None:
    try:
        return resolve_base_folder(spec)
    except DiagnoseError:
        return None


def resolve_base_folder(spec: str | Path, config: dict | None = None) -> Path:
    """A local folder for ``spec``: a folder, ``"auto"`` (the adapter config's ``base_model_name_or_path``), or a
    Hugging Face hub id found in the local cache (offline: nothing is downloaded)."""
    spec = str(spec)
    if spec == "auto":
        spec = (config or {}).get("base_model_name_or_path") or ""
        if not spec:
            raise DiagnoseError("--base auto: the adapter config has no base_model_name_or_path; pass --base FOLDER")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # not installed, not cached (LocalEntryNotFoundError), bad id
            pass
    raise DiagnoseError(f"{spec}: not a folder, and not a Hugging Face model in the local cache (offline: nothing "
                        f"is downloaded); expected the base model the adapter was trained on, saved with "
                        f"save_pretrained")


class FolderSource(BaseSource):
    """A saved transformers model read tensor by tensor from its (possibly sharded) safetensors, memory-mapped."""

    def __init__(self, folder: Path, adapter: Adapter | None = None):
        self.folder = Path(folder)
        self.adapter_config = adapter.config if adapter is not None else {}
        self.name_or_path = str(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise DiagnoseError(f"{self.folder}: not a transformers model folder (no config.json); expected the base "
                                f"model the adapter was trained on, saved with save_pretrained")
        try:
            self.config = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DiagnoseError(f"{cfg}: unreadable ({exc})") from exc
        self._files: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self._files = {k: self.folder / v for k, v in weight_map.items()}
        elif single.is_file():
            self._files = {k: single for k in self._header(single)[1] if k != "__metadata__"}
        self._model = None

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data, the JSON header) of a safetensors file: 8-byte little-endian size, then JSON."""
        if path not in self._headers:
            try:
                with path.open("rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    self._headers[path] = (8 + n, json.loads(fh.read(n)))
            except (OSError, struct.error, ValueError) as exc:
                raise DiagnoseError(f"{path}: not a valid safetensors file ({exc})") from exc
        return self._headers[path]

    def _tensor_name(self, layer: AdaptedLayer) -> str | None:
        key = layer.key
        parts = key.split(".")
        for cand in (key, ".".join(parts[1:]), "model." + key, "transformer." + key):
            if cand + ".weight" in self._files:
                return cand + ".weight"
        return None

    def _read(self, name: str) -> np.ndarray:
        """One tensor as float64, read with one positioned read (no memory map: the process keeps only the layer
        it works on, whatever the size of the model)."""
        path = self._files[name]
        start, header = self._header(path)
        info = header[name]
        lo, hi = info["data_offsets"]
        dtype = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(info["dtype"])
        if dtype is None:
            raise DiagnoseError(f"{path}: tensor {name} has dtype {info['dtype']}; expected a float weight")
        with path.open("rb") as fh:
            raw = os.pread(fh.fileno(), hi - lo, start + lo)
        arr = np.frombuffer(raw, dtype=dtype)
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float64).reshape(info["shape"])

    def raw_weight(self, layer: AdaptedLayer) -> np.ndarray:
        if not self._files:  # .bin weights only: through transformers
            return ModelSource(self.model()).raw_weight(layer)
        name = self._tensor_name(layer)
        if name is None:
            raise DiagnoseError(f"the base model has no module {layer.key} (adapter layer {layer.name}): is it the "
                                f"model the adapter was trained on? ({self.folder})")
        return self._read(name)

    def module_names(self) -> list[str] | None:
        if not self._files:
            return None
        out = []
        for name, path in self._files.items():
            if name.endswith(".weight") and len(self._header(path)[1][name]["shape"]) == 2:
                out.append(name[: -len(".weight")])
        return sorted(out)

    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        return int(v) if isinstance(v, int) else None

    def context_length(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        return None

    def model(self):
        if self._model is None:
            self._model = _load_transformers(self.folder, self.adapter_config)
        return self._model


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                 "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def _load_transformers(folder: Path, adapter_config: dict):
    try:
        import transformers
    except ImportError as exc:
        raise DiagnoseError("a forward pass of the base model needs transformers: pip install "
                            "'lora-theory[adapters]'") from exc
    classes = []
    task = str(adapter_config.get("task_type") or "").upper().split(".")[-1]
    if task in _TASK_CLASSES:
        classes.append(getattr(transformers, _TASK_CLASSES[task]))
    mapping = adapter_config.get("auto_mapping") or {}
    if isinstance(mapping, dict) and hasattr(transformers, str(mapping.get("base_model_class"))):
        classes.append(getattr(transformers, mapping["base_model_class"]))
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for cls in classes:
        try:
            model = cls.from_pretrained(str(folder), local_files_only=True)
            model.eval()
            return model
        except Exception as exc:  # transformers raises many types for a folder it cannot load
            errors.append(f"{cls.__name__}: {type(exc).__name__}: {exc}")
    raise DiagnoseError(f"{folder}: transformers could not load the base model ({'; '.join(errors)[:600]})")


class ModelSource(BaseSource):
    """A torch model object: a transformers model without the adapter, or the PeftModel itself."""

    def __init__(self, model):
        self._m = model
        self.is_peft_model = hasattr(model, "peft_config")
        inner = model.base_model.model if self.is_peft_model else model
        self.name_or_path = getattr(inner, "name_or_path", None) or None

    def _module(self, layer: AdaptedLayer):
        for path in (layer.name, layer.key, "model." + layer.key):
            try:
                return self._m.get_submodule(path)
            except AttributeError:
                continue
        raise DiagnoseError(f"the base model has no module {layer.key} (adapter layer {layer.name}): is it the "
                            f"model the adapter was trained on?")

    def raw_weight(self, layer: AdaptedLayer) -> np.ndarray:
        module = self._module(layer)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            raise DiagnoseError(f"base module {layer.key} ({type(module).__name__}) has no 2-D weight; the adapter "
                                f"expects a linear layer of shape ({layer.d_out}, {layer.d_in})")
        W = weight.detach().cpu().double().numpy()
        if type(module).__name__ == "Conv1D" and W.shape == (layer.d_in, layer.d_out):  # GPT-2: (d_in, d_out)
            W = W.T
        return W

    def module_names(self) -> list[str] | None:
        prefix = PEFT_PREFIX if self.is_peft_model else ""
        out = []
        for name, module in self._m.named_modules():
            if "lora_" in name or name.endswith(".base_layer") or not name.startswith(prefix):
                continue
            inner = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if type(inner).__name__ in ("Linear", "Conv1D") and getattr(inner, "weight", None) is not None:
                out.append(name[len(prefix):])
        return sorted(out)

    def model(self):
        return self._m

    def vocab_size(self) -> int | None:
        try:
            return int(self._m.get_input_embeddings().num_embeddings)
        except Exception:  # a model without token embeddings
            return None

    def context_length(self) -> int | None:
        cfg = getattr(self._m, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        return None


def open_base(base, adapter: Adapter) -> BaseSource:
    """A :class:`BaseSource` from a folder / hub id / ``"auto"`` (str, Path) or a torch model object."""
    if isinstance(base, str | Path):
        return FolderSource(resolve_base_folder(base, adapter.config), adapter)
    if not hasattr(base, "get_submodule"):
        raise DiagnoseError(f"base must be a folder loadable by transformers or a torch model, got "
                            f"{type(base).__name__}")
    return ModelSource(base)


# ------------------------------------------------------------------------------------------ calibration

_CAL_EXPECTED = "integer token ids of shape (N, T) or (T,), in [0, vocab_size)"


def _tokenize_text(path: Path, tokenizer_folder, context_length: int | None) -> list:
    """One sequence per non-empty line of a text file, tokenized by the base model's tokenizer (offline)."""
    import torch

    if tokenizer_folder is None:
        raise DiagnoseError(f"{path}: a text calibration file needs the base model's tokenizer; give --base as a "
                            f"folder (or Hugging Face cache entry) that holds it")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a folder without a tokenizer
        raise DiagnoseError(f"{path}: a text calibration file needs the base model's tokenizer, and "
                            f"{tokenizer_folder} has none that transformers can load ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from exc
    seqs = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids = tok(line, add_special_tokens=True)["input_ids"]
            if context_length is not None:
                ids = ids[:context_length]
            if ids:
                seqs.append(torch.as_tensor(ids, dtype=torch.long))
    if not seqs:
        raise DiagnoseError(f"{path}: no text to tokenize (every line is empty)")
    return seqs


def load_calibration(calibration, vocab_size: int | None, context_length: int | None = None,
                     tokenizer_folder=None):
    """A (N, T) int64 torch tensor of token ids from a file (.pt, .safetensors, .npy, .json, .txt) or an array.

    .pt: a tensor or a dict with ``input_ids``; .safetensors: ``input_ids`` or the only tensor; .npy: an
    integer array; .json: a list (of lists) of ints or a dict with ``input_ids`` (the Hugging Face form);
    .txt: one sequence of whitespace-separated ids per line, or, when the file is not made of integers, text:
    one sequence per non-empty line, tokenized by the base model's tokenizer (``tokenizer_folder``) and cut to the
    context length (a list of 1-D sequences is returned then). T must not exceed the model's context length.
    """
    import torch

    where = "calibration"
    if isinstance(calibration, str | Path):
        path = Path(calibration)
        where = str(path)
        if not path.is_file():
            raise DiagnoseError(f"{path}: no such calibration file; expected {_CAL_EXPECTED}")
        suffix = path.suffix.lower()
        try:
            if suffix in (".pt", ".pth", ".bin"):
                data = torch.load(str(path), map_location="cpu", weights_only=True)
            elif suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
                data = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
            elif suffix == ".npy":
                data = np.load(str(path), allow_pickle=False)
            elif suffix == ".json":
                data = json.loads(path.read_text())
            elif suffix == ".txt":
                lines = [line for line in path.read_text().splitlines() if line.strip()]
                if all(re.fullmatch(r"\s*\d+(\s+\d+)*\s*", line) for line in lines):
                    data = [[int(t) for t in line.split()] for line in lines]
                else:
                    return _tokenize_text(path, tokenizer_folder, context_length)
            else:
                raise DiagnoseError(f"{path}: unknown calibration format {suffix!r}; use .pt, .safetensors, .npy, "
                                    f".json or .txt holding {_CAL_EXPECTED}")
        except DiagnoseError:
            raise
        except Exception as exc:
            raise DiagnoseError(f"{path}: unreadable calibration file ({type(exc).__name__}: {exc}); expected "
                                f"{_CAL_EXPECTED}") from exc
        if isinstance(data, dict):
            data = data.get("input_ids", None)
        if data is None:
            raise DiagnoseError(f"{path}: no 'input_ids' tensor found; expected {_CAL_EXPECTED}")
    else:
        data = calibration
        if isinstance(data, dict):
            data = data.get("input_ids", None)
    try:
        ids = torch.as_tensor(np.asarray(data.detach().cpu() if hasattr(data, "detach") else data))
    except Exception as exc:
        raise DiagnoseError(f"{where}: not an array ({type(exc).__name__}: {exc}); expected {_CAL_EXPECTED}") from exc
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise DiagnoseError(f"{where}: dtype {ids.dtype}; expected {_CAL_EXPECTED}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.numel() == 0:
        raise DiagnoseError(f"{where}: shape {tuple(ids.shape)}; expected {_CAL_EXPECTED}")
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DiagnoseError(f"{where}: ids range over [{int(ids.min())}, {int(ids.max())}] but the base model's "
                            f"vocabulary has {vocab_size} entries; expected {_CAL_EXPECTED}")
    if context_length is not None and ids.shape[1] > context_length:
        raise DiagnoseError(f"{where}: sequences of {ids.shape[1]} tokens, but the base model's context length is "
                            f"{context_length}; cut them to at most {context_length} tokens")
    return ids.long()


def capture_statistics(model, layers: list[AdaptedLayer], ids, *, peft_forward: bool,
                       sequences_per_pass: int = 1) -> dict:
    """Dropout statistics (:class:`diagnose.quantities.DropoutStatistics`) of every adapted layer's inputs in
    eval-mode forwards of the adapted model, ``sequences_per_pass`` sequences at a time (no input is kept), and
    whether the adapter does anything: ||f_adapted - f_base|| / ||f_base|| of the model's outputs on the first
    chunk (the base output with PEFT's ``disable_adapter()``, or the plain base without the hooks).
    ``ids``: (N, T) token ids, or a list of 1-D sequences of different lengths (one pass each).

    ``peft_forward``: the model is the PeftModel (hooks only record); else it is the plain base model and the
    hooks also add s x A^T B^T to each adapted layer's output, which is PEFT's eval forward of plain LoRA.
    """
    import torch

    from diagnose.quantities import DropoutStatistics

    src = ModelSource(model)
    stats = {lay.name: DropoutStatistics(lay.A, lay.B, lay.scaling, lay.dropout) for lay in layers}
    handles = []
    device = next(model.parameters()).device

    def make_hook(layer: AdaptedLayer):
        A = torch.as_tensor(layer.A, device=device)
        B = torch.as_tensor(layer.B, device=device)
        bias = None if layer.lora_bias is None else torch.as_tensor(layer.lora_bias, device=device)

        def hook(module, inputs, output):
            x = inputs[0]
            if x.shape[-1] != layer.d_in:
                raise DiagnoseError(f"layer {layer.name} received inputs of width {x.shape[-1]}, expected d_in = "
                                    f"{layer.d_in}")
            stats[layer.name].add(x.detach().reshape(-1, x.shape[-1]).double().cpu().numpy())
            if peft_forward:
                return None
            delta = layer.scaling * (x.double() @ A.T) @ B.T
            if bias is not None:
                delta = delta + bias
            return output + delta.to(output.dtype)

        return hook

    def output(batch):
        out = model(input_ids=batch.to(device))
        return (out.logits if hasattr(out, "logits") else out[0]).double()

    was_training = model.training
    change = None
    chunks = [ids[i:i + sequences_per_pass] for i in range(0, len(ids), sequences_per_pass)] \
        if not isinstance(ids, list) else [seq[None] for seq in ids]
    try:
        model.eval()
        with torch.no_grad():
            if peft_forward:  # the adapter's effect on the outputs, on the first chunk
                with model.disable_adapter():
                    reference = output(chunks[0])
            else:
                reference = output(chunks[0])
        for lay in layers:
            handles.append(src._module(lay).register_forward_hook(make_hook(lay)))
        with torch.no_grad():
            for i, chunk in enumerate(chunks):
                out = output(chunk)
                if i == 0:
                    norm = float(torch.linalg.norm(reference))
                    change = float(torch.linalg.norm(out - reference)) / norm if norm > 0 else None
    except DiagnoseError:
        raise
    except Exception as exc:
        raise DiagnoseError(f"the forward pass on the calibration batch of shape {tuple(ids.shape)} failed "
                            f"({type(exc).__name__}: {exc}); expected {_CAL_EXPECTED} the model accepts") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for lay in layers:
        if stats[lay.name].n_rows == 0:
            raise DiagnoseError(f"layer {lay.name} was not called in the forward pass of the calibration batch")
    return stats, {"relative_output_change": change, "sequences": int(chunks[0].shape[0]),
                   "tokens": int(chunks[0].numel())}

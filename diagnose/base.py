"""The base model side: its frozen weights W per adapted layer, calibration batches and the captured inputs.

``base`` may be a local folder loadable by transformers (the class is the adapter config's
``auto_mapping.base_model_class`` when present, else ``AutoModelForCausalLM``, else ``AutoModel``) or a model
object (a transformers model without the adapter). When the adapter itself is a ``PeftModel``, its own base
layers are used. The model is never modified: the adapted forward of a plain base model is obtained with
forward hooks that add s x A^T B^T (eval mode, no dropout) and are removed afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diagnose.adapter import AdaptedLayer, Adapter
from diagnose.errors import DiagnoseError

__all__ = ["load_base_model", "base_weight", "load_calibration", "capture_inputs"]


def load_base_model(base, adapter: Adapter):
    """A torch model from ``base`` (a folder or a model object); raises :class:`DiagnoseError` if unloadable."""
    if not isinstance(base, str | Path):
        if not hasattr(base, "get_submodule"):
            raise DiagnoseError(f"base must be a folder loadable by transformers or a torch model, got "
                                f"{type(base).__name__}")
        return base
    folder = Path(base)
    if not (folder / "config.json").is_file():
        raise DiagnoseError(f"{folder}: not a transformers model folder (no config.json); expected the base model "
                            f"the adapter was trained on, saved with save_pretrained")
    try:
        import transformers
    except ImportError as exc:
        raise DiagnoseError("--base needs transformers: pip install 'lora-theory[adapters]'") from exc
    classes = []
    mapping = adapter.config.get("auto_mapping") or {}
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


def _module(model, layer: AdaptedLayer):
    for path in (layer.name, layer.key, "model." + layer.key):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise DiagnoseError(f"the base model has no module {layer.key} (adapter layer {layer.name}): is it the model "
                        f"the adapter was trained on?")


def _base_module(model, layer: AdaptedLayer):
    module = _module(model, layer)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2): weight (d_in, d_out)


def base_weight(model, layer: AdaptedLayer) -> np.ndarray:
    """W (d_out, d_in) of the layer's frozen base module, float64 (a Conv1D weight is transposed)."""
    module = _base_module(model, layer)
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        raise DiagnoseError(f"base module {layer.key} ({type(module).__name__}) has no 2-D weight; the adapter "
                            f"expects a linear layer of shape ({layer.d_out}, {layer.d_in})")
    W = weight.detach().cpu().double().numpy()
    if _is_conv1d(module) or (layer.fan_in_fan_out and W.shape == (layer.d_in, layer.d_out)):
        W = W.T
    if W.shape != (layer.d_out, layer.d_in):
        raise DiagnoseError(f"base module {layer.key} has weight {tuple(weight.shape)} but the adapter's lora_B @ "
                            f"lora_A is ({layer.d_out}, {layer.d_in}): the base model does not match the adapter")
    return W


_CAL_EXPECTED = "integer token ids of shape (N, T) or (T,), in [0, vocab_size)"


def load_calibration(calibration, vocab_size: int | None):
    """A (N, T) int64 torch tensor of token ids from a file (.pt, .safetensors, .npy, .json, .txt) or an array.

    .pt: a tensor or a dict with ``input_ids``; .safetensors: ``input_ids`` or the only tensor; .npy: an
    integer array; .json: a list (of lists) of ints; .txt: one sequence of whitespace-separated ids per line.
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
                if isinstance(data, dict):
                    data = data.get("input_ids", None)
            elif suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
                data = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
            elif suffix == ".npy":
                data = np.load(str(path), allow_pickle=False)
            elif suffix == ".json":
                data = json.loads(path.read_text())
            elif suffix == ".txt":
                data = [[int(t) for t in line.split()] for line in path.read_text().splitlines() if line.strip()]
            else:
                raise DiagnoseError(f"{path}: unknown calibration format {suffix!r}; use .pt, .safetensors, .npy, "
                                    f".json or .txt holding {_CAL_EXPECTED}")
        except DiagnoseError:
            raise
        except Exception as exc:
            raise DiagnoseError(f"{path}: unreadable calibration file ({type(exc).__name__}: {exc}); expected "
                                f"{_CAL_EXPECTED}") from exc
        if data is None:
            raise DiagnoseError(f"{path}: no 'input_ids' tensor found; expected {_CAL_EXPECTED}")
    else:
        data = calibration
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
    return ids.long()


def vocab_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # a model without token embeddings
        return None


def capture_inputs(model, adapter: Adapter, ids, *, peft_forward: bool) -> dict[str, np.ndarray]:
    """Inputs X (N*T, d_in) float64 of every adapted layer in one eval-mode forward of the adapted model.

    ``peft_forward``: the model is the PeftModel (hooks only record); else it is the plain base model and the
    hooks also add s x A^T B^T to each adapted layer's output, which is PEFT's eval forward of plain LoRA.
    """
    import torch

    captured: dict[str, list] = {lay.name: [] for lay in adapter.layers}
    handles = []

    def make_hook(layer: AdaptedLayer):
        A = torch.as_tensor(layer.A)
        B = torch.as_tensor(layer.B)

        def hook(module, inputs, output):
            x = inputs[0]
            captured[layer.name].append(x.detach().reshape(-1, x.shape[-1]).double().cpu().numpy())
            if peft_forward:
                return None
            delta = layer.scaling * (x.double() @ A.T.to(x.device)) @ B.T.to(x.device)
            if layer.lora_bias is not None:
                delta = delta + torch.as_tensor(layer.lora_bias).to(x.device)
            return output + delta.to(output.dtype)

        return hook

    was_training = model.training
    try:
        for lay in adapter.layers:
            module = _module(model, lay)
            handles.append(module.register_forward_hook(make_hook(lay)))
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    except DiagnoseError:
        raise
    except Exception as exc:
        raise DiagnoseError(f"the forward pass on the calibration batch of shape {tuple(ids.shape)} failed "
                            f"({type(exc).__name__}: {exc}); expected {_CAL_EXPECTED} the model accepts") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for lay in adapter.layers:
        if not captured[lay.name]:
            raise DiagnoseError(f"layer {lay.name} was not called in the forward pass of the calibration batch")
        X = np.concatenate(captured[lay.name])
        if X.shape[1] != lay.d_in:
            raise DiagnoseError(f"layer {lay.name} received inputs of width {X.shape[1]}, expected d_in = {lay.d_in}")
        out[lay.name] = X
    return out

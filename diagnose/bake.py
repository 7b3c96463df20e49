"""``lora-theory diagnose --bake OUT``: an rsLoRA adapter rewritten for engines that ignore ``use_rslora``.

PEFT scales an rsLoRA layer by alpha / sqrt(r) (rsLoRA eq. 4); an engine that reads only ``r`` and ``lora_alpha``
uses alpha / r, sqrt(r) times too weak. The baked adapter folds the difference into B: lora_B (and its bias, which
PEFT scales too) times sqrt(r_l) for each layer's own r_l (``rank_pattern`` applied), ``use_rslora`` false, so
that alpha / r_l * B' = alpha / sqrt(r_l) * B: the same outputs under any engine (tested with PEFT to 1e-6).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from diagnose.adapter import PEFT_PREFIX, resolve_rank_alpha
from diagnose.errors import DiagnoseError

__all__ = ["bake_rslora"]


def bake_rslora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the baked copy of the rsLoRA adapter folder ``adapter_dir`` to ``out_dir`` (new or empty)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    if not isinstance(adapter_dir, str | Path) or not src.is_dir():
        raise DiagnoseError(f"--bake needs the adapter as a save_pretrained folder, got {adapter_dir!r}")
    config = json.loads((src / "adapter_config.json").read_text())
    if not config.get("use_rslora"):
        raise DiagnoseError(f"{src}: use_rslora is not set; there is nothing to bake (alpha/r is already the scale)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DiagnoseError(f"--bake {out}: exists and is not an empty folder")
    weights = src / "adapter_model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    elif (src / "adapter_model.bin").is_file():
        state = torch.load(str(src / "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise DiagnoseError(f"{src}: holds no adapter_model.safetensors or adapter_model.bin")
    baked = {}
    for name, tensor in state.items():
        if ".lora_B." in name or name.endswith(".lora_embedding_B"):
            module = name.split(".lora_B.")[0] if ".lora_B." in name else name.rsplit(".", 1)[0]
            key = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
            r, _, _ = resolve_rank_alpha(config, key)
            tensor = (tensor.double() * math.sqrt(r)).to(tensor.dtype)
        baked[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(baked, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config["use_rslora"] = False
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("README.md",):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    return out

"""The one engine of the toolkit: LoRA variants on a toy MLP, data, the training loop, sweeps and the run cache.

Public face (``from toymodels import FinetuneConfig, finetune, run_sweep, base_config``): the names of
:data:`__all__`, each imported from the module that owns it on first use (importing :mod:`toymodels` itself
loads nothing heavy).

Layout, each module importing only the ones above it (no import cycle: ``tests/toymodels/test_layout.py``)::

    cache.py          the run cache (atomic, checksummed files keyed by a config's SHA-256), the cache directory
    masks.py          the dropout-mask stream of a run (the same masks in both engines)
    mlp.py            the toy MLP, its activations, the device choice
    lora.py           LoRALinear and the LoRA variants (registered objects: scaling, init, forward, merge), LoWR
    data.py           MNIST / Fashion-MNIST / CIFAR-10 / synthetic data and the fine-tuning protocol's splits
    seeds.py          SeedStreams: every random stream of a run, derived from its seed in one place
    config.py         FinetuneConfig: one run, validated; its cache keys (as_dict, pretrain_dict)
    protocol.py       the shared fine-tuning protocol by fidelity (base_config) and the data sets available here
    setup.py          a run's data, pretrained MLP (cached), model with LoRA, optimizer, mini-batches
    losses.py         the training objectives (cross-entropy, MSE, the exact expected MSE) and evaluation
    callback_base.py  the callback protocol: Callback (the hooks) and TrainState (what a hook sees)
    callbacks.py      the built-in recorders and the general callbacks (snapshots, layer I/O, init transforms)
    loop.py           the one training loop: finetune (cached), TrainingRun, run_key, TrainingDiverged
    batched.py        the batched engine: many runs of one shape as one computation (the loop is its oracle)
    results.py        the results table of a sweep (Parquet / CSV)
    sweep.py          run_sweep: many configs, batched or looped, in processes / Ray / SLURM, resumable
    sweep_cli.py      ``lora-theory sweep``;  data_cli.py  ``lora-theory data``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module that owns it
_HOMES = {
    "FinetuneConfig": "toymodels.config",
    "SeedStreams": "toymodels.seeds",
    "base_config": "toymodels.protocol",
    "real_datasets": "toymodels.protocol",
    "protocol_data": "toymodels.setup",
    "pretrain": "toymodels.setup",
    "build_finetune_model": "toymodels.setup",
    "Callback": "toymodels.callback_base",
    "TrainState": "toymodels.callback_base",
    "finetune": "toymodels.loop",
    "run_key": "toymodels.loop",
    "TrainingRun": "toymodels.loop",
    "TrainingDiverged": "toymodels.loop",
    "run_sweep": "toymodels.sweep",
    "MLP": "toymodels.mlp",
    "LoRALinear": "toymodels.lora",
    "LoRAVariant": "toymodels.lora",
    "register_variant": "toymodels.lora",
    "inject_lora": "toymodels.lora",
    "lora_modules": "toymodels.lora",
}

__all__ = [
    "MLP",
    "Callback",
    "FinetuneConfig",
    "LoRALinear",
    "LoRAVariant",
    "SeedStreams",
    "TrainState",
    "TrainingDiverged",
    "TrainingRun",
    "base_config",
    "build_finetune_model",
    "finetune",
    "inject_lora",
    "lora_modules",
    "pretrain",
    "protocol_data",
    "real_datasets",
    "register_variant",
    "run_key",
    "run_sweep",
]

if TYPE_CHECKING:  # what a reader's tools see; at run time the names are imported on first use
    from toymodels.callback_base import Callback, TrainState
    from toymodels.config import FinetuneConfig
    from toymodels.loop import TrainingDiverged, TrainingRun, finetune, run_key
    from toymodels.lora import LoRALinear, LoRAVariant, inject_lora, lora_modules, register_variant
    from toymodels.mlp import MLP
    from toymodels.protocol import base_config, real_datasets
    from toymodels.seeds import SeedStreams
    from toymodels.setup import build_finetune_model, pretrain, protocol_data
    from toymodels.sweep import run_sweep


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'toymodels' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))

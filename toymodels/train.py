"""Deprecated alias of the modules ``toymodels/train.py`` was split into (kept so that code written against it
still imports; nothing inside :mod:`toymodels` imports it). Import from the public face, :mod:`toymodels`
(``from toymodels import FinetuneConfig, finetune, run_sweep``), or from the module that owns a name:
:mod:`toymodels.config`, :mod:`toymodels.seeds`, :mod:`toymodels.setup`, :mod:`toymodels.losses`,
:mod:`toymodels.callback_base`, :mod:`toymodels.loop`, :mod:`toymodels.sweep` (see :mod:`toymodels`).
"""

from __future__ import annotations

from toymodels.callback_base import Callback, TrainState  # noqa: F401
from toymodels.config import (  # noqa: F401
    DTYPES,
    ENGINE_VERSION,
    LOSSES,
    OPTIMIZERS,
    RECORDERS,
    FinetuneConfig,
    datasets_input_dim,
)
from toymodels.loop import (  # noqa: F401
    ON_DIVERGE,
    TrainingDiverged,
    TrainingRun,
    finetune,
    recorder_callbacks,
    run_key,
)
from toymodels.lora import adapter_output  # noqa: F401
from toymodels.losses import evaluate, expected_mse, loss_fn  # noqa: F401
from toymodels.mlp import layer_inputs  # noqa: F401
from toymodels.seeds import SeedStreams  # noqa: F401
from toymodels.setup import build_finetune_model, make_optimizer, minibatches, pretrain, protocol_data  # noqa: F401
from toymodels.sweep import run_sweep  # noqa: F401

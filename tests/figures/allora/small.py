"""A tiny synthetic fine-tuning setting and its last-layer problem, shared by the ALLoRA figure tests."""

from __future__ import annotations

import torch

from analysis.inputs import default_seed
from toymodels import config, setup
from toymodels.lora import lora_modules

SMALL = dict(dataset="synthetic", widths=(16, 24, 24, 6), n_pretrain=128, n_finetune=64, n_test=128,
             pretrain_steps=10, steps=12, batch_size=16, record_every=4)


def last_layer_model(p: float, placement: str):
    """The SMALL model with one adapted last layer (MSE), a random nonzero B, and 16 fine-tuning rows in float64."""
    cfg = config.FinetuneConfig(**SMALL, targets=("layers.2",), loss="mse", dropout=p, placement=placement,
                               recorders=())
    model = setup.build_finetune_model(cfg, torch.device("cpu")).double()
    layer = lora_modules(model)[-1]
    gen = torch.Generator().manual_seed(default_seed())
    with torch.no_grad():  # a nonzero B, as after fine-tuning
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64))
    data = setup.protocol_data(cfg, torch.device("cpu"))
    x, y = data.finetune
    return model, layer, x[:16].double(), y[:16]

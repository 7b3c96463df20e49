"""The toy model: a ReLU MLP whose layers are ``nn.Linear`` (so LoRA can wrap any of them).

Layers are named ``layers.0 ... layers.{L-1}`` (the targets for :func:`toymodels.lora.inject_lora`); the last
one is linear with no activation after it, which is where ALLoRA's expected-loss training applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from analysis.inputs import positive_int


def auto_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MLP(nn.Module):
    """x -> Linear -> ReLU -> ... -> Linear, widths (d_in, h_1, ..., d_out); default 784-256-256-10 (3 layers)."""

    def __init__(self, widths: Sequence[int] = (784, 256, 256, 10), *, seed: int | None = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        super().__init__()
        widths = [positive_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
        if len(widths) < 2:
            raise ValueError(f"widths must list at least an input and an output size, got {widths}")
        self.widths = tuple(widths)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        layers = []
        for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
            layer = nn.Linear(d_in, d_out, dtype=dtype)
            if generator is not None:  # nn.Linear's default init, drawn from our generator (reproducible)
                bound = 1.0 / d_in**0.5
                with torch.no_grad():
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.to(auto_device(device))

    @property
    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.layers))]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer (after the last ReLU)."""
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.features(x))

"""The toy model: a ReLU MLP whose layers are ``nn.Linear`` (so LoRA can wrap any of them).

Layers are named ``layers.0 ... layers.{L-1}`` (the targets for :func:`toymodels.lora.inject_lora`); the last
one is linear with no activation after it, which is where ALLoRA's expected-loss training applies. The hidden
activation is ReLU by default; ``activation="identity"`` makes a deep linear network (rsLoRA's inductive
argument after Thm. 3.2 covers both). Code that runs the layers by hand applies :meth:`MLP.act` between them.
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


ACTIVATIONS = ("relu", "identity")  # the hidden activation: ReLU, or none (a deep linear network)


def check_activation(activation: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS`, else ValueError naming the argument."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


class MLP(nn.Module):
    """x -> Linear -> act -> ... -> Linear, widths (d_in, h_1, ..., d_out); default 784-256-256-10 (3 layers).

    ``activation``: "relu" (default) or "identity" (no nonlinearity: the network is linear in x, a deep linear
    network); the weights drawn from ``seed`` do not depend on it.
    """

    def __init__(self, widths: Sequence[int] = (784, 256, 256, 10), *, seed: int | None = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 activation: str = "relu"):
        super().__init__()
        self.activation = check_activation(activation)
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

    def act(self, z: torch.Tensor) -> torch.Tensor:
        """The hidden activation applied to a layer's output ``z`` (every layer but the last): ReLU, or ``z``
        itself for "identity"."""
        return torch.relu(z) if self.activation == "relu" else z

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer (after the last activation)."""
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.features(x))


def layer_inputs(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every layer of the MLP for input ``x`` (layer i gets the activation, :meth:`MLP.act`, of layer
    i-1's output)."""
    inputs = []
    for i, layer in enumerate(model.layers):
        inputs.append(x)
        x = layer(x)
        if i < len(model.layers) - 1:
            x = model.act(x)
    return inputs

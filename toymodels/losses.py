"""The training objectives and the evaluation of a model: :func:`loss_fn` (cross-entropy or MSE),
:func:`expected_mse` (the exact expectation over dropout masks, ALLoRA sec. 3.1) and :func:`evaluate`."""

from __future__ import annotations

import torch
from torch import nn

from toymodels import data as datasets
from toymodels.config import LOSSES
from toymodels.lora import LoRALinear


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss: "ce" = cross-entropy; "mse" = mean over samples of ||logits - one_hot(y)||^2."""
    if kind == "ce":
        return nn.functional.cross_entropy(logits, y)
    if kind != "mse":
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
    target = nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    return ((logits - target) ** 2).sum(dim=1).mean()


def expected_mse(layer: LoRALinear, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact E over dropout masks of the batch-mean MSE of a last-layer LoRA (ALLoRA sec. 3.1), differentiable.

    With target T = one_hot(y), residual R = T - h W^T - b, s the scaling and v = p/(1-p):
    bottleneck: ||R - s h A^T B^T||^2 + v s^2 sum_k ||h a_k||^2 ||b_k||^2; input: the penalty is
    v s^2 sum_j (sum_n h_nj^2) ||(BA)_:j||^2 (see :func:`analysis.dropout.expected_loss`); divided by N.
    """
    A, B, s, p = layer.lora_A, layer.lora_B, layer.scaling, layer.p
    v = p / (1.0 - p)
    target = nn.functional.one_hot(y, B.shape[0]).to(h.dtype)
    resid = target - layer.base(h) - s * (h @ A.T) @ B.T
    if layer.dropout_placement == "bottleneck":
        penalty = ((h @ A.T) ** 2).sum(0) @ (B**2).sum(0)
    else:
        penalty = (h**2).sum(0) @ ((B @ A) ** 2).sum(0)
    return ((resid**2).sum() + v * s**2 * penalty) / h.shape[0]


@torch.no_grad()
def evaluate(model: nn.Module, split: datasets.Split, loss_kind: str) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on a whole split, dropout off (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    logits = model(split.x)
    loss = loss_fn(loss_kind, logits, split.y).item()
    acc = (logits.argmax(1) == split.y).double().mean().item()
    model.train(was_training)
    return loss, acc

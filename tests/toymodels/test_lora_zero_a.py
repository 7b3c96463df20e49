"""init="zero_a" (ALLoRA sec. 3.2, "if A is zero-initialised instead"): A = 0, B with the law of PEFT's A entries."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.inputs import default_seed
from toymodels.lora import LoRALinear


def _layer(d_in=40, d_out=30, r=4, seed=0, **kw):
    base = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    return LoRALinear(base, r, init="zero_a", generator=torch.Generator().manual_seed(seed), **kw)


def test_zero_a_draws_b_with_the_law_of_peft_a():
    d_in, d_out, r = 400, 300, 8
    layer = _layer(d_in, d_out, r, seed=default_seed())
    assert torch.count_nonzero(layer.lora_A) == 0
    b = 1.0 / math.sqrt(d_in)
    B = layer.lora_B.detach()
    assert B.abs().max() <= b
    # E[U^2] = b^2/3, Var[U^2] = 4 b^4 / 45 for U ~ U(-b, b): 5 standard errors of the mean of n squares
    n = B.numel()
    se = math.sqrt(4 * b**4 / 45 / n)
    assert abs(float((B**2).mean()) - b**2 / 3) < 5 * se
    se_mean = math.sqrt(b**2 / 3 / n)
    assert abs(float(B.mean())) < 5 * se_mean


def test_zero_a_starts_at_the_base_and_mirrors_the_first_gradients():
    layer = _layer()
    x = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    torch.testing.assert_close(out, layer.base(x), rtol=0, atol=0)
    out.pow(2).sum().backward()
    # f = s x A^T B^T: grad_B = s G^T x A^T = 0 at A = 0, grad_A = s B^T G^T x != 0 (the usual init, mirrored)
    assert torch.count_nonzero(layer.lora_B.grad) == 0
    assert layer.lora_A.grad.abs().max() > 0


def test_zero_a_rank_scaled_and_bad_input():
    a = _layer(r=4, seed=3)
    b = _layer(r=4, seed=3, rank_scaled_init=True)
    torch.testing.assert_close(b.lora_B, a.lora_B / 2.0)
    with pytest.raises(ValueError, match="b_init_std"):
        _layer(b_init_std=0.1)
    with pytest.raises(ValueError, match="init"):
        LoRALinear(torch.nn.Linear(4, 3), 2, init="zero_b")

"""ALLoRA's 'effective learning rate eta * l_b' (sec. 4.2) holds for SGD, not for Adam (ERRATA: adaptive 6)."""

from __future__ import annotations

import pytest
import torch

from toymodels.lora import LoRALinear


def _first_step_B(method: str, optimizer: str, lr: float, eta: float) -> torch.Tensor:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    kw = dict(method=method, eta=eta) if method != "lora" else dict(scaling=1.0)
    layer = LoRALinear(base, 3, generator=gen, **kw)
    x = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([layer.lora_A, layer.lora_B], lr=lr)
    ((layer(x) - target) ** 2).sum().backward()
    opt.step()
    return layer.lora_B.detach().clone()


@pytest.mark.parametrize("eta", [1.5, 2.0])
def test_sgd_allora_first_step_equals_lora_at_eta_lb(eta):
    lb = 1e-3
    allora = _first_step_B("allora", "sgd", lb, eta)
    torch.testing.assert_close(allora, _first_step_B("lora", "sgd", eta * lb, eta), rtol=1e-12, atol=0)
    assert torch.linalg.norm(allora) / torch.linalg.norm(_first_step_B("lora", "sgd", lb, eta)) == pytest.approx(eta)


@pytest.mark.parametrize("eta", [1.5, 2.0])
def test_adam_cancels_allora_eta_on_the_first_step(eta):
    lb = 1e-3
    allora = _first_step_B("allora", "adam", lb, eta)
    # Adam divides by the gradient's own magnitude: the common factor eta (scale at BA = 0) cancels
    torch.testing.assert_close(allora, _first_step_B("lora", "adam", lb, eta), rtol=1e-6, atol=0)
    ratio = torch.linalg.norm(allora) / torch.linalg.norm(_first_step_B("lora", "adam", eta * lb, eta))
    assert ratio == pytest.approx(1 / eta, rel=1e-6)

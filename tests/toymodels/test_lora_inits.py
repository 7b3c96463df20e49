"""PiSSA and OLoRA initialisations of LoRALinear (init="pissa" / "olora", LoWR table 2), against independent
numpy decompositions and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from toymodels.lora import LoRALinear


def _base(d_out: int, d_in: int, seed: int = 0, dtype=torch.float64) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.random.default_rng(seed).standard_normal((d_out, d_in))))
    return lin


@pytest.mark.parametrize("scaling", [1.0, 0.25, "rslora"])
def test_pissa_is_the_top_r_svd_part_and_keeps_the_function(scaling):
    base = _base(12, 20)
    W = base.weight.detach().numpy().copy()
    layer = LoRALinear(base, r=4, alpha=2.0, scaling=scaling, init="pissa")
    s = layer.scaling
    A, B = layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy()
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # independent decomposition (numpy)
    top = (U[:, :4] * S[:4]) @ Vt[:4]
    np.testing.assert_allclose(s * B @ A, top, atol=1e-12)
    np.testing.assert_allclose(layer.base.weight.detach().numpy(), W - top, atol=1e-12)  # residual
    np.testing.assert_allclose(layer.merged_weight().numpy(), W, atol=1e-12)
    # balanced factors: ||a_i|| = ||b_i|| = sqrt(S_i / s) (PEFT's pissa_init)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(S[:4] / s), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.sqrt(S[:4] / s), rtol=1e-12)
    # the residual's spectrum is the remaining singular values
    np.testing.assert_allclose(np.linalg.svd(W - top, compute_uv=False)[:8], S[4:], atol=1e-10)


def test_olora_is_qr_with_orthonormal_b_columns():
    base = _base(12, 20, seed=1)
    W = base.weight.detach().numpy().copy()
    layer = LoRALinear(base, r=5, alpha=5.0, init="olora")
    A, B = layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy()
    np.testing.assert_allclose(B.T @ B, np.eye(5), atol=1e-12)  # orthonormal columns of lora_B (= Q_r)
    assert np.allclose(np.tril(A[:, :5], -1), 0.0, atol=1e-12)  # A = R_r is upper trapezoidal
    Q, R = np.linalg.qr(W)
    # QR is unique up to column signs: compare the product per column pair
    for i in range(5):
        np.testing.assert_allclose(np.outer(B[:, i], A[i]), np.outer(Q[:, i], R[i]), atol=1e-12)
    np.testing.assert_allclose(layer.base.weight.detach().numpy() + layer.scaling * B @ A, W, atol=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_decomposition_inits_leave_the_forward_unchanged_float32(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    before = base(x).detach()
    layer = LoRALinear(base, r=3, init=init)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_decomposition_inits_bad_input(init):
    with pytest.raises(ValueError, match="r must be <="):
        LoRALinear(_base(4, 10), r=5, init=init)
    with pytest.raises(ValueError, match="b_init_std"):
        LoRALinear(_base(8, 10), r=2, init=init, b_init_std=0.1)
    with pytest.raises(ValueError, match="asf"):
        LoRALinear(_base(8, 10), r=2, init=init, method="asf")
    with pytest.raises(ValueError, match="scaling > 0"):
        LoRALinear(_base(8, 10), r=2, init=init, scaling=-1.0)


def test_pissa_dora_starts_at_w():
    base = _base(6, 9, seed=3)
    W = base.weight.detach().numpy().copy()
    layer = LoRALinear(base, r=2, init="pissa", method="dora")
    np.testing.assert_allclose(layer.merged_weight().numpy(), W, atol=1e-12)

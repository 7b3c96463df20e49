"""Helpers of figures/lowr.py: the variance share, eq. 12 from channel norms, the captured (X, G) of an SGD step.

The figures themselves run in --quick mode in tests/figures/test_figures.py (-k lowr).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import channels
from analysis._inputs import default_seed
from figures import Context
from figures import lowr as fig
from toymodels.lora import inject_lora, lora_modules, lowr_gamma
from toymodels.mlp import MLP


def test_b_share_splits_the_log_significance_variance():
    rng = np.random.default_rng(default_seed())
    a, b = rng.uniform(0.5, 2.0, 16), rng.uniform(0.1, 3.0, 16)
    # log c = log a + log b: the two shares sum to 1 exactly
    assert fig._b_share(a, b) + fig._b_share(b, a) == pytest.approx(1.0, abs=1e-12)
    assert fig._b_share(np.full(16, 1.3), b) == pytest.approx(1.0, abs=1e-12)  # constant A: B carries everything
    assert fig._b_share(a, np.full(16, 0.7)) == pytest.approx(0.0, abs=1e-12)
    assert fig._b_share(a, 3 * a) == pytest.approx(0.5, abs=1e-12)  # proportional: shared equally
    assert math.isnan(fig._b_share(np.ones(4), np.ones(4)))


def test_gamma_from_norms_equals_the_layer_rescaling():
    g = torch.Generator().manual_seed(default_seed())
    A = torch.randn(8, 12, generator=g, dtype=torch.float64)
    B = torch.randn(7, 8, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 8, dtype=torch.float64)
    a, b = A.norm(dim=1).numpy(), B.norm(dim=0).numpy()
    tau = float(np.median(a / b))  # some channels above, some below the threshold
    for alpha in (0.1, 1.0):
        want = (lowr_gamma(A, B, tau=tau, alpha=alpha) - 1).numpy()
        got = fig._gamma_minus_one(a, b, tau, alpha)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert np.any(got == 0) and np.any(got > 0)


def test_sgd_step_captures_each_layers_input_and_output_gradient():
    # the captured (X, G) must reproduce the exact change of s BA of every layer (analysis.channels.one_step_update)
    model = MLP((6, 5, 4, 3), seed=default_seed(), dtype=torch.float64)
    inject_lora(model, ["layers.0", "layers.1", "layers.2"], r=2, alpha=3.0, b_init_std=0.3,
                generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    layers = lora_modules(model)
    before = [(m.lora_A.detach().numpy().copy(), m.lora_B.detach().numpy().copy(), m.scaling) for m in layers]
    lr = 0.1
    _, xg = fig._sgd_step(model, x, y, lr, capture=True)
    assert len(xg) == len(layers)
    for (A, B, s), (X, G), m in zip(before, xg, layers, strict=True):
        want = channels.one_step_update(A, B, X, G, lr, s)["total"]
        got = s * (m.lora_B @ m.lora_A).detach().numpy() - s * B @ A
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        assert np.abs(want).max() > 1e-6  # a real update, not 0 == 0


def test_grids_and_ranks_by_fidelity():
    quick, default = Context(fidelity="quick", seeds=(0,)), Context()
    assert fig._rank(quick) < fig._rank(default)
    grid = fig._grid(default)
    assert len(grid) == 12 and len(set(grid)) == 12
    assert {t for t, _, _ in grid} == {math.inf, 10.0, 100.0} and {e for *_, e in grid} == {1, 5}
    assert {a for _, a, _ in grid} == set(fig.ALPHAS)
    assert {t for t, _, _ in fig._grid(quick)} == {math.inf, 10.0} and {e for *_, e in fig._grid(quick)} == {1, 5}
    cfg = fig._config(default, 0, lowr=fig.MAIN_LOWR)
    assert cfg.r == fig._rank(default) and cfg.alpha / cfg.r == 1.0 and set(fig.RECORDERS) <= set(cfg.recorders)

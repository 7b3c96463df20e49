"""figures.lowr.protocol: the variance share, eq. 12 from channel norms, the shared runs; lowr-prop41's snapshot steps
and lowr-tab5's grid. (The captured (X, G) of an SGD step is tested with the engine's callback in
tests/toymodels/test_callbacks.py.)

The figures themselves run in --quick mode in tests/figures/test_figures.py (-k lowr).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.inputs import default_seed
from figures import Context
from figures.lowr import prop41_equivalent, tab5_sensitivity
from figures.lowr import protocol as fig
from toymodels.lora import lowr_gamma


def test_b_share_splits_the_log_significance_variance():
    rng = np.random.default_rng(default_seed())
    a, b = rng.uniform(0.5, 2.0, 16), rng.uniform(0.1, 3.0, 16)
    # log c = log a + log b: the two shares sum to 1 exactly
    assert fig.b_share(a, b) + fig.b_share(b, a) == pytest.approx(1.0, abs=1e-12)
    assert fig.b_share(np.full(16, 1.3), b) == pytest.approx(1.0, abs=1e-12)  # constant A: B carries everything
    assert fig.b_share(a, np.full(16, 0.7)) == pytest.approx(0.0, abs=1e-12)
    assert fig.b_share(a, 3 * a) == pytest.approx(0.5, abs=1e-12)  # proportional: shared equally
    assert math.isnan(fig.b_share(np.ones(4), np.ones(4)))


def test_gamma_from_norms_equals_the_layer_rescaling():
    g = torch.Generator().manual_seed(default_seed())
    A = torch.randn(8, 12, generator=g, dtype=torch.float64)
    B = torch.randn(7, 8, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 8, dtype=torch.float64)
    a, b = A.norm(dim=1).numpy(), B.norm(dim=0).numpy()
    tau = float(np.median(a / b))  # some channels above, some below the threshold
    for alpha in (0.1, 1.0):
        want = (lowr_gamma(A, B, tau=tau, alpha=alpha) - 1).numpy()
        got = fig.gamma_minus_one(a, b, tau, alpha)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert np.any(got == 0) and np.any(got > 0)


def test_prop41_snapshot_steps_cover_the_first_steps_and_the_end():
    got = prop41_equivalent.snapshot_steps(20, 200)
    assert got[:7] == [20, 21, 22, 23, 24, 25, 26] and got[-1] == 220 and got == sorted(set(got))
    assert len(got) < 50  # a few MB per cached run at rank 32


def test_grids_and_ranks_by_fidelity():
    quick, default = Context(fidelity="quick", seeds=(0,)), Context()
    assert fig.rank(quick) < fig.rank(default)
    grid = tab5_sensitivity.grid_of(default)
    # every tau x alpha at every step, plus every 5 steps at the main alpha for tau in {inf, 10}: 8 of the paper's 12
    assert len(grid) == 8 and len(set(grid)) == 8 and tab5_sensitivity.grid_of(quick) == grid
    assert {t for t, _, _ in grid} == {math.inf, 10.0, 100.0} and {e for *_, e in grid} == {1, 5}
    assert {a for _, a, _ in grid} == set(fig.ALPHAS) and fig.MAIN_LOWR in grid
    assert {(t, a) for t, a, e in grid if e == 5} == {(math.inf, fig.ALPHAS[0]), (10.0, fig.ALPHAS[0])}
    cfg = fig.shared_config(default, lowr=fig.MAIN_LOWR)
    assert cfg.r == fig.rank(default) and cfg.alpha / cfg.r == 1.0 and set(fig.RECORDERS) <= set(cfg.recorders)

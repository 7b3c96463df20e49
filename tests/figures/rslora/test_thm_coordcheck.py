"""figures.rslora.thm_coordcheck: the exponent CI (known Monte-Carlo errors vs residual scatter) and the coordinate-check
panel's plumbing (projections, exact vs Monte Carlo)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis import rank_scaling as rs
from analysis.inputs import default_seed
from figures.criteria import CONFIDENCE
from figures.rslora import thm_coordcheck as cc


def test_exponent_ci_uses_known_errors_when_residuals_vanish():
    ranks = np.array([1.0, 2.0, 4.0, 8.0])
    m = 3.0 * ranks**-1.5  # exact power law: fit_exponent's residual interval has zero width
    se = 0.02 * m
    slope, lo, hi = cc._fit_with_known_se(ranks, m, se)
    t = np.log(ranks)
    half = stats.norm.ppf(0.5 + CONFIDENCE / 2) * 0.02 / math.sqrt(np.sum((t - t.mean()) ** 2))
    assert slope == pytest.approx(-1.5) and hi - slope == pytest.approx(half) and slope - lo == pytest.approx(half)


def test_exponent_ci_keeps_residual_interval_when_scatter_exceeds_errors():
    ranks = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    m = ranks**-1.0 * np.array([1.0, 1.3, 0.8, 1.2, 0.9])
    se = 1e-4 * m
    assert cc._fit_with_known_se(ranks, m, se) == pytest.approx(
        rs.fit_exponent(ranks, m, weights=(m / se) ** 2, confidence=CONFIDENCE))


def test_coord_panel_exact_exponents_and_monte_carlo_agree():
    """Large rank at small width: the exact exponents are the paper's up to their finite-r deficit; every MC mean lies
    within 5 standard errors of the exact moment (the projections onto the mean directions are consistent).

    Deficit (mean value theorem on ln m = a ln r + ln(1 + K/r)): at most K/(r_min + K). For the input gradient
    K = d + 1 (ERRATA rank 2); for the output's second moment E||f||^2 = ||E f||^2 (1 + K/r) with K = r (E||f||^2 /
    ||E f||^2 - 1), which depends on the drawn inputs (one step: (|x0|^2|x|^2 + c^2) / c^2, c = x0.x, unbounded for
    nearly orthogonal inputs): the fixed bound (d+1)/(r_min+d+1) failed there at 6 of seeds 0..39 (issue 19)."""
    seed = default_seed()
    d, ranks = 2, (256, 512, 1024)
    panel = cc.coord_panel(d, ranks, n_steps=2, draws=lambda r: 400, seed=seed)
    bound = (d + 1) / (ranks[0] + d + 1)
    for s in panel["scalings"].values():
        m = s["moments"]
        k_out = ranks[0] * (m["second_out"]["exact"][0] / m["mean_out"]["exact"][0] ** 2 - 1)
        for k, e in m.items():
            allowed = max(bound, k_out / (ranks[0] + k_out)) if k == "second_out" else bound
            assert abs(e["exact_fit"] - e["theory_large_rank"]) <= allowed, k
            z = (np.array(e["mc_mean"]) - np.array(e["exact"])) / np.array(e["mc_se"])
            assert np.all(np.abs(z) <= 5), (k, z)

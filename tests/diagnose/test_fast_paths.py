"""The fast paths of the diagnosis against the exact implementation they replace (small adapters, float64).

- ``base_quantities``: Gram + eigh (and a top-k eigensolve of the Gram's rank-2r update) instead of two full SVDs
  and two extra spectral norms; the reference is the previous code: ``numpy.linalg.svd`` of W and of W + s B A.
- ``DropoutStatistics``: the penalty and its variance from per-batch statistics of the inputs instead of
  ``analysis.dropout.loss_variance`` on (rows, d_out, d_in) temporaries.
"""

from __future__ import annotations

import numpy as np
import pytest

from analysis import dropout, ripple
from diagnose.quantities import (
    DropoutStatistics,
    base_quantities,
    calibration_quantities,
    intruder_cluster_size,
)
from tests.diagnose.conftest import SEED


def reference_base(W, A, B, s, k=10, eps=0.5):
    """The exact implementation before the fast path (full SVDs), plus the abstention rule on its outputs."""
    sB = s * B
    m = float(ripple.layer_ratios([W], [A], [sB])[0])
    delta = sB @ A
    U_w, S_w, _ = np.linalg.svd(W, full_matrices=False)
    U_m, S_m, _ = np.linalg.svd(W + delta, full_matrices=False)
    k = min(k, U_m.shape[1])
    cos = np.abs(U_m[:, :k].T @ U_w).max(axis=1)
    d2 = np.linalg.norm(delta, 2)
    cluster = np.array([(np.abs(S_w - S_m[j]) <= d2 * (1 + 1e-12)).sum() for j in range(k)])
    QB = np.linalg.qr(B)[0]
    energy = ((QB.T @ U_m[:, :k]) ** 2).sum(0)
    abstain = (cluster >= intruder_cluster_size(eps)) & (energy < 1 - eps**2)
    return {"m": m, "norm_W": np.linalg.norm(W), "spectral_norm_W": np.linalg.norm(W, 2),
            "m_frobenius": np.linalg.norm(delta) / np.linalg.norm(W), "cos": cos,
            "count": int(((cos < eps) & ~abstain).sum()), "abstained": int(abstain.sum()), "S_m": S_m[:k]}


def _problem(d_out, d_in, r, seed, spectrum="decaying", scale=0.3):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((d_out, d_out)))[0][:, :min(d_out, d_in)]
    V = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0][:, :min(d_out, d_in)]
    n = min(d_out, d_in)
    S = {"decaying": 1.0 / (1 + np.arange(n)) ** 0.7, "flat": 1.0 + 1e-3 * rng.random(n),
         "random": np.sort(rng.random(n))[::-1] + 0.1}[spectrum]
    W = (U * S) @ V.T
    A = rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in)
    B = scale * rng.standard_normal((d_out, r))
    return W, A, B


@pytest.mark.parametrize("shape", [(48, 48), (40, 96), (96, 40)])
@pytest.mark.parametrize("spectrum", ["decaying", "flat", "random"])
def test_base_quantities_equal_the_full_svd_implementation(shape, spectrum):
    for j, scale in enumerate((0.05, 0.5, 3.0)):
        W, A, B = _problem(*shape, r=4, seed=SEED + j, spectrum=spectrum, scale=scale)
        s = 1.7
        got = base_quantities(W, A, B, s)
        ref = reference_base(W, A, B, s)
        for key in ("m", "norm_W", "spectral_norm_W", "m_frobenius"):
            assert got[key] == pytest.approx(ref[key], rel=1e-10), key
        intr = got["intruder"]
        np.testing.assert_allclose(intr["max_abs_cos"], ref["cos"], rtol=1e-6, atol=1e-8)
        assert (intr["count"], intr["abstained"]) == (ref["count"], ref["abstained"])


def test_dropout_statistics_equal_the_exact_closed_forms():
    rng = np.random.default_rng(SEED)
    N, d_in, d_out, r = 37, 11, 9, 3
    X = rng.standard_normal((N, d_in)) * rng.uniform(0.2, 3, d_in)
    W = rng.standard_normal((d_out, d_in))
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    for p, s in ((0.1, 2.0), (0.5, 0.7), (0.9, 1.0)):
        Y = X @ W.T + s * X @ A.T @ B.T  # the layer's own dropout-free output
        stats = DropoutStatistics(A, B, s, p)
        for start in range(0, N, 10):  # batches accumulate exactly
            stats.add(X[start:start + 10])
        got = stats.result()
        assert got["n_rows"] == N
        want_mean = dropout.expected_loss(X, Y, W, A, B, p, placement="input", scaling=s)
        want_var = dropout.loss_variance(X, Y, W, A, B, p, placement="input", scaling=s)
        assert got["expected_loss"] == pytest.approx(want_mean, rel=1e-10)
        assert got["penalty"] == pytest.approx(dropout.dropout_penalty(X, A, B, p, placement="input", scaling=s),
                                               rel=1e-10)
        assert got["std"] ** 2 == pytest.approx(want_var, rel=1e-10)
        assert got["adapter_output_energy"] == pytest.approx(((s * X @ A.T @ B.T) ** 2).sum(), rel=1e-12)
        assert calibration_quantities(X, A, B, s, p) == pytest.approx(got)


def test_dropout_statistics_with_a_zero_b():
    rng = np.random.default_rng(SEED)
    got = calibration_quantities(rng.standard_normal((5, 4)), rng.standard_normal((2, 4)), np.zeros((3, 2)), 1.0, 0.2)
    assert got["penalty"] == 0 and got["std"] == 0 and got["steps_to_resolve"] is None

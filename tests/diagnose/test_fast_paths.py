"""The fast paths of the diagnosis against the exact implementation they replace (small adapters, float64).

- ``base_quantities``: Gram + eigh (and a top-k eigensolve of the Gram's rank-2r update) instead of two full SVDs
  and two extra spectral norms; the reference is the previous code: ``numpy.linalg.svd`` of W and of W + s B A.
  Its truncated path (top 2k eigenpairs of W's Gram by Lanczos, the exact path only where a verdict is
  undetermined) against the same reference: norms, m and the spectral gap to 1e-10 relative (float64 Lanczos to
  machine precision: the top eigenvalues carry ~1e-14 relative error, their square roots half that; 1e-10 leaves
  room for the Gram's rounding, eps ||W||^2, and nothing more); counts and abstentions exactly; the cosines to
  1e-6 where they are certified (the computed max >= the bound on the uncomputed ones: eigenvector error is
  eps ||G|| / gap, and these spectra have relative gaps >= 1e-5 at the top), otherwise inside their bracket.
- ``DropoutStatistics``: the penalty and its variance from per-batch statistics of the inputs instead of
  ``analysis.dropout.loss_variance`` on (rows, d_out, d_in) temporaries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import dropout, ripple
from diagnose import diagnose_adapter
from diagnose.errors import DiagnoseError
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
    proj = U_m[:, :k].T @ U_w
    abstain = (cluster >= intruder_cluster_size(eps)) & (energy < 1 - eps**2)
    return {"m": m, "norm_W": np.linalg.norm(W), "spectral_norm_W": np.linalg.norm(W, 2),
            "m_frobenius": np.linalg.norm(delta) / np.linalg.norm(W), "cos": cos,
            "count": int(((cos < eps) & ~abstain).sum()), "abstained": int(abstain.sum()), "S_m": S_m[:k],
            "proj": proj, "energy": energy, "cluster": cluster,
            "spectral_gap": (S_w[0] - S_w[min(k, len(S_w) - 1)]) / S_w[0]}


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


@pytest.mark.parametrize("shape", [(48, 48), (40, 96), (96, 40), (64, 300)])
@pytest.mark.parametrize("spectrum", ["decaying", "flat", "random"])
def test_truncated_path_equals_the_full_svd_implementation(shape, spectrum, solvers_seen):
    eps, k = 0.5, 10
    for j, scale in enumerate((0.05, 0.5, 3.0)):
        W, A, B = _problem(*shape, r=4, seed=SEED + j, spectrum=spectrum, scale=scale)
        s = 1.7
        info = {}
        got = base_quantities(W, A, B, s, method="truncated", info=info)
        solvers_seen.add(info["solver"])
        ref = reference_base(W, A, B, s, k=k, eps=eps)
        for key in ("m", "norm_W", "spectral_norm_W", "m_frobenius"):
            assert got[key] == pytest.approx(ref[key], rel=1e-10), key
        intr = got["intruder"]
        assert intr["spectral_gap"] == pytest.approx(ref["spectral_gap"], rel=1e-9, abs=1e-12)
        assert (intr["count"], intr["abstained"]) == (ref["count"], ref["abstained"])
        np.testing.assert_allclose(intr["energy_in_update"], ref["energy"], rtol=1e-6, atol=1e-9)
        if info["solver"] != "truncated":  # fell back: everything exact
            np.testing.assert_allclose(intr["max_abs_cos"], ref["cos"], rtol=1e-6, atol=1e-8)
            np.testing.assert_array_equal(intr["cluster_sizes"], ref["cluster"])
            continue
        # what the truncated path saw: W's top 2k directions; the bound on every other |cos|
        seen = np.abs(ref["proj"][:, :2 * k])
        bound = np.sqrt(np.maximum(1 - (seen**2).sum(1), 0))
        np.testing.assert_allclose(intr["max_abs_cos"], seen.max(1), rtol=1e-6, atol=1e-8)
        certified = seen.max(1) >= bound + 1e-6
        np.testing.assert_allclose(intr["max_abs_cos"][certified], ref["cos"][certified], rtol=1e-6, atol=1e-8)
        assert np.all(ref["cos"] >= intr["max_abs_cos"] - 1e-8)
        assert np.all(ref["cos"] <= np.maximum(intr["max_abs_cos"], bound) + 1e-8)
        assert np.all(intr["cluster_sizes"] <= ref["cluster"])  # exact or a lower bound
        big = intr["cluster_sizes"] < ref["cluster"]
        assert np.all(intr["cluster_sizes"][big] >= intruder_cluster_size(eps))  # only where it decides the same


@pytest.fixture(scope="module")
def solvers_seen():
    """Which branches the truncated test went through: both must occur, or the test checked only one."""
    seen = set()
    yield seen
    assert {"truncated", "exact (truncated undetermined)"} <= seen, seen


def test_truncated_path_is_deterministic_and_auto_picks_it_on_large_layers():
    rng = np.random.default_rng(SEED)
    W = rng.standard_normal((300, 260)) * 0.02
    A = rng.uniform(-1, 1, (8, 260)) / np.sqrt(260)
    B = 0.02 * rng.standard_normal((300, 8))
    info = {}
    first = base_quantities(W, A, B, 2.0, info=info)
    assert info["solver"] in ("truncated", "exact (truncated undetermined)")
    again = base_quantities(W, A, B, 2.0)
    assert first["spectral_norm_W"] == again["spectral_norm_W"]
    np.testing.assert_array_equal(first["intruder"]["max_abs_cos"], again["intruder"]["max_abs_cos"])
    small = {}
    base_quantities(W[:40, :40], A[:, :40], B[:40], 2.0, info=small)
    assert small["solver"] == "exact"
    with pytest.raises(ValueError, match="method"):
        base_quantities(W, A, B, 2.0, method="fast")


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


def _torch_path_equals_the_cpu_exact_path(shape, device):
    W, A, B = _problem(*shape, r=4, seed=SEED, spectrum="random", scale=0.5)
    cpu = base_quantities(W, A, B, 1.7, method="exact")
    gpu = base_quantities(W, A, B, 1.7, device=device)
    for key in ("m", "norm_W", "spectral_norm_W", "m_frobenius"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-10), key
    np.testing.assert_allclose(gpu["intruder"]["max_abs_cos"], cpu["intruder"]["max_abs_cos"], rtol=1e-6, atol=1e-8)
    for key in ("count", "abstained"):
        assert gpu["intruder"][key] == cpu["intruder"][key]
    np.testing.assert_array_equal(gpu["intruder"]["cluster_sizes"], cpu["intruder"]["cluster_sizes"])


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_base_quantities_torch_code_path_on_the_cpu(shape):
    """The --device code path (torch Gram + torch.linalg.eigh) run on the CPU ("cpu:0" is not "cpu")."""
    _torch_path_equals_the_cpu_exact_path(shape, "cpu:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (300, 260)])
def test_base_quantities_on_cuda_equal_the_cpu_exact_path(shape):
    """float64 Gram + eigh on the GPU against LAPACK: the same thin SVD, so the same tolerances as the exact path."""
    _torch_path_equals_the_cpu_exact_path(shape, "cuda")


def test_device_cpu_is_the_cpu_path_and_a_bad_device_is_refused_without_calibration(llama_with_base):
    W, A, B = _problem(96, 40, r=4, seed=SEED)
    a, b = base_quantities(W, A, B, 1.7, device="cpu"), base_quantities(W, A, B, 1.7)
    assert (a["spectral_norm_W"], a["m"]) == (b["spectral_norm_W"], b["m"])  # the same code: the same bits
    np.testing.assert_array_equal(a["intruder"]["max_abs_cos"], b["intruder"]["max_abs_cos"])
    _, folder, base_dir, _, _ = llama_with_base
    with pytest.raises(DiagnoseError, match="device 'nowhere' is not usable"):
        diagnose_adapter(folder, base=base_dir, device="nowhere")


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_threads_are_applied_to_the_per_layer_numerics(llama_with_base, monkeypatch, threads):
    """``--threads`` / ``blas_threads``: every BLAS the numerics use runs on that many threads (it was once a
    parameter that nothing applied), and the limit is lifted afterwards."""
    from threadpoolctl import threadpool_info

    import diagnose.report

    seen = []
    real = diagnose.report.base_quantities

    def spy(*args, **kwargs):
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return real(*args, **kwargs)

    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    monkeypatch.setattr(diagnose.report, "base_quantities", spy)
    _, folder, base_dir, _, _ = llama_with_base
    diagnose_adapter(folder, base=base_dir, blas_threads=threads)
    assert seen and set(seen) == {threads}
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before

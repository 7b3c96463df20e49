"""analysis.dropout proved three ways: exact enumeration of all masks, autograd / finite differences, Monte Carlo.

The oracle (analysis.verify.dropout.enumerate_oracle, shared with `lora-theory verify`) is independent of the closed forms: it evaluates the loss of every joint dropout mask with a plain
torch forward pass (float64) and differentiates it with autograd, then averages with the exact mask
probabilities. Monte-Carlo tolerances are 5 standard errors of the estimator, seeded from LORA_THEORY_SEED.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import dropout as dr
from analysis._masks import enumerate_masks, pivot_form_moments, quadratic_form_moments, residual_norm_moments
from analysis.inputs import default_seed
from analysis.verify.dropout import enumerate_oracle, one_mask_loss

PLACEMENTS = ("bottleneck", "input")


def make_problem(seed, N=2, d_in=3, d_out=2, r=2, b_scale=1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d_in))
    Y = rng.normal(size=(N, d_out))
    W = rng.normal(size=(d_out, d_in)) * 0.5
    A = rng.normal(size=(r, d_in))
    B = rng.normal(size=(d_out, r)) * b_scale
    return X, Y, W, A, B


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_enumeration_loss_and_grad_moments(placement, p):
    X, Y, W, A, B = make_problem(1)
    scaling = 0.7
    (mL, vL), (mA, vA), (mB, vB) = enumerate_oracle(X, Y, W, A, B, p, placement, scaling)
    kw = dict(placement=placement, scaling=scaling)
    assert dr.expected_loss(X, Y, W, A, B, p, **kw) == pytest.approx(mL, rel=1e-12, abs=1e-12)
    assert dr.loss_variance(X, Y, W, A, B, p, **kw) == pytest.approx(vL, rel=1e-10, abs=1e-10)
    gA, gB = dr.expected_loss_grad(X, Y, W, A, B, p, **kw)
    np.testing.assert_allclose(gA, mA, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(gB, mB, rtol=1e-11, atol=1e-11)
    mean_A, var_A, mean_B, var_B = dr.grad_moments(X, Y, W, A, B, p, **kw)
    np.testing.assert_allclose(mean_A, mA, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(mean_B, mB, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(var_A, vA, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(var_B, vB, rtol=1e-9, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    N=st.integers(1, 2),
    d_in=st.integers(1, 3),
    d_out=st.integers(1, 3),
    r=st.integers(1, 3),
    p=st.floats(0.0, 0.95),
    scaling=st.floats(-2.0, 2.0),
    placement=st.sampled_from(PLACEMENTS),
)
def test_enumeration_property(seed, N, d_in, d_out, r, p, scaling, placement):
    X, Y, W, A, B = make_problem(seed, N, d_in, d_out, r)
    (mL, vL), (mA, vA), (mB, vB) = enumerate_oracle(X, Y, W, A, B, p, placement, scaling)
    kw = dict(placement=placement, scaling=scaling)
    scale = 1.0 + abs(mL)
    assert abs(dr.expected_loss(X, Y, W, A, B, p, **kw) - mL) <= 1e-10 * scale
    assert abs(dr.loss_variance(X, Y, W, A, B, p, **kw) - vL) <= 1e-9 * (1.0 + vL + mL**2)
    mean_A, var_A, mean_B, var_B = dr.grad_moments(X, Y, W, A, B, p, **kw)
    for got, want in ((mean_A, mA), (mean_B, mB), (var_A, vA), (var_B, vB)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9 * (1.0 + np.abs(want).max()))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_expected_loss_grad_matches_finite_differences(placement):
    X, Y, W, A, B = make_problem(3, N=6, d_in=5, d_out=4, r=3)
    p, s, h = 0.3, 1.3, 1e-6
    gA, gB = dr.expected_loss_grad(X, Y, W, A, B, p, placement=placement, scaling=s)
    for name, M, g in (("A", A, gA), ("B", B, gB)):
        fd = np.zeros_like(M)
        for idx in np.ndindex(M.shape):
            up, dn = M.copy(), M.copy()
            up[idx] += h
            dn[idx] -= h
            args = (up, B) if name == "A" else (A, up)
            args_dn = (dn, B) if name == "A" else (A, dn)
            fd[idx] = (dr.expected_loss(X, Y, W, *args, p, placement=placement, scaling=s)
                       - dr.expected_loss(X, Y, W, *args_dn, p, placement=placement, scaling=s)) / (2 * h)
        rel = np.linalg.norm(fd - g) / np.linalg.norm(g)
        assert rel < 1e-7, f"relative Frobenius error of grad_{name}: {rel:.2e}"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sample_loss_monte_carlo_mean_and_variance(placement):
    """Sample mean within 5 standard errors of E[L]; sample variance within 5 SE of the exact Var[L]."""
    X, Y, W, A, B = make_problem(7, N=12, d_in=9, d_out=4, r=3)
    p, s, n = 0.2, 0.8, 200_000
    kw = dict(placement=placement, scaling=s)
    L = dr.sample_loss(X, Y, W, A, B, p, n, seed=default_seed(), **kw)
    assert L.shape == (n,)
    mean, var = dr.expected_loss(X, Y, W, A, B, p, **kw), dr.loss_variance(X, Y, W, A, B, p, **kw)
    z_mean = (L.mean() - mean) / math.sqrt(var / n)
    centred = (L - mean) ** 2
    z_var = (centred.mean() - var) / (centred.std() / math.sqrt(n))
    assert abs(z_mean) < 5, z_mean
    assert abs(z_var) < 5, z_var


def test_sample_loss_reproducible_and_chunk_invariant():
    X, Y, W, A, B = make_problem(2, N=5, d_in=4, d_out=3, r=2)
    a = dr.sample_loss(X, Y, W, A, B, 0.3, 1000, seed=5)
    b = dr.sample_loss(X, Y, W, A, B, 0.3, 1000, seed=5)
    np.testing.assert_array_equal(a, b)
    small = dr.sample_loss(X, Y, W, A, B, 0.3, 1000, seed=5, max_chunk_bytes=1)
    np.testing.assert_array_equal(a, small)


def test_sample_loss_support_matches_enumeration():
    """Every sampled value is one of the 2^(N r) enumerated losses, with the right frequencies (chi-square)."""
    from scipy import stats

    X, Y, W, A, B = make_problem(4, N=2, d_in=3, d_out=2, r=2)
    p = 0.4
    masks, probs = enumerate_masks(4, p)
    t = [torch.tensor(v) for v in (X, Y, W, A, B)]
    values = np.array([one_mask_loss(*t, torch.tensor(m.reshape(2, 2)), "bottleneck", 1.0).item() for m in masks])
    L = dr.sample_loss(X, Y, W, A, B, p, 50_000, seed=default_seed())
    idx = np.abs(L[:, None] - values[None]).argmin(axis=1)
    assert np.abs(L - values[idx]).max() < 1e-9
    counts = np.bincount(idx, minlength=len(values))
    # merge masks giving identical losses is unnecessary here: random data makes all 16 values distinct
    assert len(np.unique(np.round(values, 9))) == len(values)
    chi2 = stats.chisquare(counts, probs * len(L))
    assert chi2.pvalue > 1e-6


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_grad_moments_monte_carlo_realistic(placement):
    """At realistic shapes, per-entry MC means/variances of autograd gradients agree with the closed form."""
    X, Y, W, A, B = make_problem(11, N=32, d_in=20, d_out=5, r=4)
    p, s, n = 0.3, 1.0, 4000
    mean_A, var_A, mean_B, var_B = dr.grad_moments(X, Y, W, A, B, p, placement=placement, scaling=s)
    gen = torch.Generator().manual_seed(default_seed())
    t = {k: torch.tensor(v) for k, v in dict(X=X, Y=Y, W=W, A=A, B=B).items()}
    K = A.shape[0] if placement == "bottleneck" else X.shape[1]

    def loss(Ap, Bp, m):
        return one_mask_loss(t["X"], t["Y"], t["W"], Ap, Bp, m, placement, s)

    masks = (torch.rand((n, X.shape[0], K), generator=gen, dtype=torch.float64) >= p).double() / (1 - p)
    gA, gB = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(t["A"], t["B"], masks)
    for g, m_ex, v_ex in ((gA.numpy(), mean_A, var_A), (gB.numpy(), mean_B, var_B)):
        z = (g.mean(axis=0) - m_ex) / np.sqrt(v_ex / n)
        assert np.abs(z).max() < 5.5, np.abs(z).max()  # max over <= 100 entries: 5.5 sigma keeps it never flaky
        c = (g - m_ex) ** 2
        z_var = (c.mean(axis=0) - v_ex) / (c.std(axis=0) / np.sqrt(n))
        assert np.abs(z_var).max() < 5.5, np.abs(z_var).max()


def test_deviation_bound_holds_and_clt_limit():
    """E|mean_n - E L| <= Std/sqrt(n) for all n, and its ratio to the bound tends to sqrt(2/pi) (app. A)."""
    X, Y, W, A, B = make_problem(5, N=8, d_in=6, d_out=3, r=3)
    p = 0.3
    mu = dr.expected_loss(X, Y, W, A, B, p)
    std = math.sqrt(dr.loss_variance(X, Y, W, A, B, p))
    groups = 4000
    for n in (1, 16, 256):
        L = dr.sample_loss(X, Y, W, A, B, p, n * groups, seed=default_seed() + n).reshape(groups, n)
        dev = np.abs(L.mean(axis=1) - mu)
        se = dev.std() / math.sqrt(groups)
        bound = float(dr.deviation_bound(std, n))
        assert dev.mean() <= bound + 5 * se
        if n == 256:
            assert abs(dev.mean() - float(dr.deviation_clt(std, n))) < 5 * se
    assert float(dr.deviation_clt(std, 100)) / float(dr.deviation_bound(std, 100)) == pytest.approx(
        math.sqrt(2 / math.pi), rel=1e-15)


def test_bottleneck_penalty_asymmetry_at_zero_B():
    """At B = 0 dropout's decay strength on A is zero and on B equals v ||X a_k||^2 (ALLoRA sec. 3.2)."""
    X, _, _, A, B = make_problem(6, N=10, d_in=5, d_out=3, r=4)
    p = 0.25
    on_A, on_B = dr.penalty_strengths(X, A, np.zeros_like(B), p)
    assert np.all(on_A == 0)
    np.testing.assert_allclose(on_B, p / (1 - p) * ((X @ A.T) ** 2).sum(axis=0), rtol=1e-14)
    on_A, on_B = dr.penalty_strengths(X, A, B, p)
    assert dr.dropout_penalty(X, A, B, p) == pytest.approx(float((on_B * (B**2).sum(axis=0)).sum()), rel=1e-13)


def test_paper_gradient_display_is_half_the_true_gradient():
    """ALLoRA sec. 3.2 prints grad_B E[L] without the factor 2 and with rows of XA (erratum 'factor-2')."""
    X, Y, W, A, B = make_problem(8, N=6, d_in=4, d_out=3, r=2)
    p = 0.2
    lam = 1 - p
    gA, gB = dr.expected_loss_grad(X, Y, W, A, B, p)
    # Paper notation: A_p = A^T (D x R), B_p = B^T (R x C); its display for grad_{B_p} is (R x C)
    Ap, Bp, R = A.T, B.T, Y - X @ W.T
    XA = X @ Ap
    printed_rows = np.array([np.sum(XA[i, :] ** 2) for i in range(Bp.shape[0])])  # rows of XA, as printed
    paper_gB = -Ap.T @ X.T @ R + (Ap.T @ X.T @ X @ Ap + (1 - lam) / lam * np.diag(printed_rows)) @ Bp
    corrected = -Ap.T @ X.T @ R + (Ap.T @ X.T @ X @ Ap + (1 - lam) / lam * np.diag((XA**2).sum(axis=0))) @ Bp
    np.testing.assert_allclose(2 * corrected, gB.T, rtol=1e-12)
    assert np.linalg.norm(paper_gB - gB.T / 2) > 1e-3 * np.linalg.norm(gB)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_linear_dropout_minimizer_and_tikhonov(p):
    rng = np.random.default_rng(9)
    X = rng.normal(size=(40, 5))
    Y = rng.normal(size=(40, 3))
    Ws = dr.linear_minimizer(X, Y, p)
    # stationarity by finite differences of the exact expected loss
    h = 1e-6
    for idx in [(0, 0), (2, 4), (1, 2)]:
        up, dn = Ws.copy(), Ws.copy()
        up[idx] += h
        dn[idx] -= h
        fd = (dr.linear_expected_loss(X, Y, up, p) - dr.linear_expected_loss(X, Y, dn, p)) / (2 * h)
        assert abs(fd) < 1e-6 * np.abs(Y).sum()
    # whitened inputs: X^T X = c I  ->  dropout == ridge with lam = c p / (1 - p)
    Q, _ = np.linalg.qr(X)
    c = 3.0
    Xw = Q * math.sqrt(c)
    np.testing.assert_allclose(Xw.T @ Xw, c * np.eye(5), atol=1e-12)
    np.testing.assert_allclose(dr.ridge_minimizer(Xw, Y, dr.ridge_lambda(c, p)), dr.linear_minimizer(Xw, Y, p),
                               rtol=1e-12)
    # non-whitened inputs: the equivalence breaks
    gap = np.linalg.norm(dr.ridge_minimizer(X, Y, dr.ridge_lambda(np.trace(X.T @ X) / 5, p)) - Ws)
    assert gap > 1e-3 * np.linalg.norm(Ws)


def test_linear_expected_loss_enumeration():
    rng = np.random.default_rng(10)
    X, Y, W = rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.normal(size=(2, 3))
    p = 0.35
    masks, probs = enumerate_masks(4, p)
    vals = [((Y - (X @ W.T) * m.reshape(2, 2)) ** 2).sum() for m in masks]
    assert dr.linear_expected_loss(X, Y, W, p) == pytest.approx(float(np.dot(probs, vals)), rel=1e-13)


def test_ridge_lambda_printed_relation_is_keep_probability():
    """The paper's 'rate p = 1/(1+lam)' (c = 1) is the keep probability: rate = lam/(1+lam)."""
    lam = 0.5
    assert dr.ridge_lambda(1.0, lam / (1 + lam)) == pytest.approx(lam, rel=1e-15)
    assert dr.ridge_lambda(1.0, 1 / (1 + lam)) != pytest.approx(lam, rel=1e-3)


# --- the shared mask machinery against brute force --------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 6), p=st.floats(0.0, 0.95))
def test_quadratic_form_moments_enumeration(seed, K, p):
    rng = np.random.default_rng(seed)
    c, a, G = rng.normal(), rng.normal(size=K), rng.normal(size=(K, K))
    masks, probs = enumerate_masks(K, p)
    vals = c + masks @ a + np.einsum("mk,kl,ml->m", masks, G, masks)
    mean, var = quadratic_form_moments(c, a, G, p)
    ex_mean = probs @ vals
    assert mean == pytest.approx(ex_mean, rel=1e-10, abs=1e-10)
    assert var == pytest.approx(probs @ (vals - ex_mean) ** 2, rel=1e-9, abs=1e-10)
    # structured forms agree with the generic one
    D = 3
    C, rho = rng.normal(size=(D, K)), rng.normal(size=D)
    m1, v1 = residual_norm_moments(C, rho, p)
    m2, v2 = quadratic_form_moments(rho @ rho, -2 * C.T @ rho, C.T @ C, p)
    assert m1 == pytest.approx(m2, rel=1e-11) and v1 == pytest.approx(v2, rel=1e-9, abs=1e-10)
    k = int(rng.integers(K))
    beta, gam = rng.normal(), rng.normal(size=K)
    Gp = np.zeros((K, K))
    Gp[k, :] += gam / 2
    Gp[:, k] += gam / 2
    m3, v3 = pivot_form_moments(beta, gam[k], gam[k], gam.sum(), (gam**2).sum(), p)
    m4, v4 = quadratic_form_moments(0.0, beta * np.eye(K)[k], Gp, p)
    assert m3 == pytest.approx(m4, rel=1e-11, abs=1e-12) and v3 == pytest.approx(v4, rel=1e-9, abs=1e-11)


def test_enumerate_masks_probabilities():
    masks, probs = enumerate_masks(5, 0.3)
    assert probs.sum() == pytest.approx(1.0, rel=1e-15)
    np.testing.assert_allclose(probs @ masks, np.ones(5), rtol=1e-14)  # E m = 1
    np.testing.assert_allclose(probs @ masks**2, np.full(5, 1 / 0.7), rtol=1e-14)  # E m^2 = 1/q


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(X=np.ones((3, 5))), "A"),
        (dict(Y=np.ones((4, 2))), "Y"),
        (dict(W=np.ones((3, 3))), "W"),
        (dict(B=np.ones((3, 5))), "B"),
        (dict(A=np.full((2, 4), np.nan)), "A"),
        (dict(X=np.ones(4)), "X"),
        (dict(p=1.0), "p"),
        (dict(p=-0.1), "p"),
        (dict(p=float("nan")), "p"),
        (dict(placement="output"), "placement"),
        (dict(scaling=float("inf")), "scaling"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    X, Y, W, A, B = make_problem(0, N=3, d_in=4, d_out=3, r=2)
    args = dict(X=X, Y=Y, W=W, A=A, B=B, p=0.1)
    kw = {}
    for k, v in change.items():
        (kw if k in ("placement", "scaling") else args)[k] = v
    for fn in (dr.expected_loss, dr.loss_variance, dr.expected_loss_grad, dr.grad_moments):
        with pytest.raises(ValueError, match=match):
            fn(*args.values(), **kw)
    with pytest.raises(ValueError, match=match):
        dr.sample_loss(*args.values(), 10, **kw)


def test_bad_n_and_std():
    X, Y, W, A, B = make_problem(0)
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n"):
            dr.sample_loss(X, Y, W, A, B, 0.1, n)
    with pytest.raises(ValueError, match="n"):
        dr.deviation_bound(1.0, 0)
    with pytest.raises(ValueError, match="std"):
        dr.deviation_bound(-1.0, 3)
    with pytest.raises(ValueError, match="c"):
        dr.ridge_lambda(0.0, 0.1)


def test_zero_rate_is_deterministic():
    X, Y, W, A, B = make_problem(12, N=4, d_in=3, d_out=2, r=2)
    for placement in PLACEMENTS:
        assert dr.loss_variance(X, Y, W, A, B, 0.0, placement=placement) == pytest.approx(0.0, abs=1e-10)
        L = dr.sample_loss(X, Y, W, A, B, 0.0, 5, placement=placement)
        np.testing.assert_allclose(L, dr.expected_loss(X, Y, W, A, B, 0.0), rtol=1e-13)
        _, vA, _, vB = dr.grad_moments(X, Y, W, A, B, 0.0, placement=placement)
        assert vA.max() < 1e-20 and vB.max() < 1e-20


def test_itertools_oracle_agrees_with_enumerate_masks():
    """The enumeration helper itself against a direct product over {0, 1/q}."""
    p = 0.2
    q = 1 - p
    direct = sorted(itertools.product((0.0, 1 / q), repeat=3))
    masks, _ = enumerate_masks(3, p)
    assert sorted(map(tuple, masks)) == direct


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_first_step_at_zero_B_is_unaffected_by_dropout_in_expectation(placement):
    """At B = 0 the dropout penalty is a decay proportional to B, so grad E[L] does not depend on p."""
    X, Y, W, A, B = make_problem(13, N=8, d_in=5, d_out=3, r=2)
    B0 = np.zeros_like(B)
    g0 = dr.expected_loss_grad(X, Y, W, A, B0, 0.0, placement=placement)
    for p in (0.2, 0.7):
        g = dr.expected_loss_grad(X, Y, W, A, B0, p, placement=placement)
        np.testing.assert_allclose(g[0], g0[0], atol=1e-13)
        np.testing.assert_allclose(g[1], g0[1], rtol=1e-13)
    assert np.abs(g0[0]).max() == 0.0 and np.abs(g0[1]).max() > 0.1


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_moves_from_the_first_step_on(placement):
    """ERRATA D6: "the effective gradient norm for A is 0 during the first few steps" holds at step 0 only; one
    step of gradient descent makes B = -lr grad_B != 0, and grad_A is then of order lr (and grows with the steps)."""
    X, Y, W, A, _ = make_problem(16, N=16, d_in=6, d_out=3, r=2)
    lr = 0.1 / (2 * np.linalg.norm(X, 2) ** 2 * (1 + np.linalg.norm(A, 2) ** 2))
    ratio = dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr, 5, placement=placement)
    assert ratio[0] == 0.0 and np.all(ratio[1:] > 0) and np.all(np.diff(ratio) > 0)
    # first order in lr: grad_A(B_1) = -lr x (a fixed matrix) + O(lr^2)
    r_half = dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr / 2, 1, placement=placement)[1]
    r_quarter = dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr / 4, 1, placement=placement)[1]
    assert ratio[1] / r_half == pytest.approx(2.0, rel=0.05) and r_half / r_quarter == pytest.approx(2.0, rel=0.03)
    # by hand: B_1 = -lr grad_B E[L](B = 0) and grad_A E[L](A, B_1) is the closed form at that point
    gA0, gB0 = dr.expected_loss_grad(X, Y, W, A, np.zeros((3, 2)), 0.1, placement=placement)
    gA1, gB1 = dr.expected_loss_grad(X, Y, W, A - lr * gA0, -lr * gB0, 0.1, placement=placement)
    assert ratio[1] == pytest.approx(np.linalg.norm(gA1) / np.linalg.norm(gB1), rel=1e-12)
    with pytest.raises(ValueError, match="steps"):
        dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr, -1)


def test_printed_tikhonov_displays_carry_the_same_transposition():
    """ERRATA D1: "(X^T X + lambda I)^-1 Y^T X" and "c/(c+lambda) (X^T X)^-1 Y^T X" (sec. 3.1) are undefined for
    C != D and, for C = D, not the Tikhonov minimiser (X^T X + lambda I)^-1 X^T Y unless X^T Y is symmetric."""
    rng = np.random.default_rng(5)
    X, Y, lam = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)), 0.5
    with pytest.raises(ValueError, match="Y has C = 3"):
        dr.printed_ridge_minimizer(X, Y[:, :3], lam)
    corrected = dr.ridge_minimizer(X, Y, lam).T  # paper shapes (D, C)

    def grad(Wp):  # of ||Y - X W||^2 + lam ||W||^2 in the paper's shapes
        return 2 * (X.T @ (X @ Wp - Y) + lam * Wp)

    assert np.linalg.norm(grad(corrected)) < 1e-12 * np.linalg.norm(X.T @ Y)
    for c in (None, float(np.trace(X.T @ X) / 5)):
        assert np.linalg.norm(grad(dr.printed_ridge_minimizer(X, Y, lam, c))) > 0.5 * np.linalg.norm(2 * X.T @ Y)
    # whitened X (X^T X = c I) and symmetric X^T Y: the printed displays are right
    Q, _ = np.linalg.qr(rng.normal(size=(40, 5)))
    Xw = 2.0 * Q
    S = rng.normal(size=(5, 5))
    Yw = Xw @ np.linalg.solve(Xw.T @ Xw, S + S.T)  # X^T Y = S + S^T
    for c in (None, 4.0):
        np.testing.assert_allclose(dr.printed_ridge_minimizer(Xw, Yw, lam, c), dr.ridge_minimizer(Xw, Yw, lam).T,
                                   rtol=1e-12, atol=1e-12)


def test_placements_give_different_penalties():
    """Bottleneck (ALLoRA eq. 1) and input (PEFT) dropout regularize differently (ERRATA: placement)."""
    X, _, _, A, B = make_problem(14, N=64, d_in=32, d_out=8, r=4)
    pb = dr.dropout_penalty(X, A, B, 0.1, placement="bottleneck")
    pi = dr.dropout_penalty(X, A, B, 0.1, placement="input")
    # ERRATA D5 quotes these (verify rows "D5 penalty, ..."): the bottleneck penalty is the larger, by 15-20%
    assert 1.15 < pb / pi < 1.2
    # input placement depends on BA only: invariant under (nA, B/n); bottleneck too (per channel), but not
    # under a mixing of channels (A -> T A, B -> B T^-1) which leaves BA unchanged
    T = np.eye(4) + 0.3 * np.random.default_rng(0).normal(size=(4, 4))
    A2, B2 = T @ A, B @ np.linalg.inv(T)
    np.testing.assert_allclose(B2 @ A2, B @ A, atol=1e-10)
    assert dr.dropout_penalty(X, A2, B2, 0.1, placement="input") == pytest.approx(pi, rel=1e-10)
    assert abs(dr.dropout_penalty(X, A2, B2, 0.1, placement="bottleneck") - pb) > 1e-3 * pb


def test_sample_loss_a_million_realisations():
    X, Y, W, A, B = make_problem(15, N=3, d_in=4, d_out=2, r=2)
    L = dr.sample_loss(X, Y, W, A, B, 0.3, 10**6, seed=default_seed())
    assert L.shape == (10**6,) and L.dtype == np.float64
    z = (L.mean() - dr.expected_loss(X, Y, W, A, B, 0.3)) / math.sqrt(dr.loss_variance(X, Y, W, A, B, 0.3) / 10**6)
    assert abs(z) < 5


def test_linear_minimizer_rejects_rank_deficient_X():
    X = np.random.default_rng(0).normal(size=(10, 3))
    X[:, 2] = 0.0  # an always-zero pixel
    with pytest.raises(ValueError, match="X must have full column rank"):
        dr.linear_minimizer(X, np.ones((10, 2)), 0.1)


# --- ERRATA D1, D2, D7, D8, D9: each test evaluates the paper's printed statement itself ------------------------

def test_printed_linear_minimizer_is_undefined_or_not_the_minimiser():
    """D1: "W = p (X^T X)^{-1} Y^T X" (paper shapes X (N, D), Y (N, C), W (D, C), p = keep probability)."""
    rng = np.random.default_rng(default_seed() + 11)
    keep = 0.7
    X, Y = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    # C != D: the printed product (D x D)(C x D) is not defined -- literally, and in the named evaluation
    with pytest.raises(ValueError, match="matmul"):
        np.linalg.inv(X.T @ X) @ (Y.T @ X)
    with pytest.raises(ValueError, match="Y has C = 3 columns but X has D = 5"):
        dr.printed_linear_minimizer(X, Y, keep)
    # C = D: defined, but not a stationary point of the paper's own expected loss
    #   E||Y - (X W) o V||^2 = ||Y - X W||^2 + (1/keep - 1) ||X W||^2, gradient 2 X^T (X W / keep - Y)
    Ys = rng.normal(size=(40, 5))

    def grad(Wp):
        return 2 * X.T @ (X @ Wp / keep - Ys)

    printed = dr.printed_linear_minimizer(X, Ys, keep)
    corrected = dr.linear_minimizer(X, Ys, 1 - keep).T  # paper shape (D, C)
    scale = np.linalg.norm(2 * X.T @ Ys)
    assert np.linalg.norm(grad(corrected)) < 1e-12 * scale
    assert np.linalg.norm(grad(printed)) > 0.5 * scale
    exp_loss = [dr.linear_expected_loss(X, Ys, Wp.T, 1 - keep) for Wp in (printed, corrected)]
    assert exp_loss[0] > exp_loss[1] * 1.05
    # the printed formula is right exactly when X^T Y is symmetric (then Y^T X = X^T Y)
    Ysym = X @ np.linalg.solve(X.T @ X, np.diag([1.0, 2.0, 3.0, 4.0, 5.0]))  # X^T Ysym = diag, symmetric
    np.testing.assert_allclose(dr.printed_linear_minimizer(X, Ysym, keep),
                               dr.linear_minimizer(X, Ysym, 1 - keep).T, rtol=1e-10, atol=1e-12)


def test_torch_dropout_is_not_the_printed_parametrization():
    """D2: sec. 3.1 says V in {0, 1/p} "is also PyTorch's official implementation". torch.nn.Dropout(p) zeroes
    with probability p and keeps with value 1/(1 - p): its p is the rate of zeroing, and the dropout penalty
    coefficient E[V^2] - 1 it produces is p/(1-p), not the printed reading's 1/p - 1."""
    p, n = 2.0 / 3.0, 200_000
    drop = torch.nn.Dropout(p).train()
    with torch.random.fork_rng():  # torch.nn.Dropout draws from the global generator: seed it locally
        torch.manual_seed(default_seed())
        V = drop(torch.ones(n, dtype=torch.float64)).numpy()
    values = np.unique(V)
    assert values.tolist() == pytest.approx([0.0, 1.0 / (1.0 - p)], rel=1e-12)  # {0, 3}, not {0, 1/p} = {0, 1.5}
    zero = (V == 0).mean()
    assert abs(zero - p) < 5 * math.sqrt(p * (1 - p) / n)  # probability of zeroing = p
    coef = (V**2).mean() - 1.0  # the orange term's coefficient (E V^2 - 1)
    se = (V**2).std() / math.sqrt(n)
    assert abs(coef - p / (1 - p)) < 5 * se  # 2.0
    assert abs(coef - (1 / p - 1)) > 100 * se  # the printed reading: 0.5


def test_printed_rate_with_pytorch_dropout_gives_the_inverse_tikhonov_strength():
    """D2: "Dropout with rate p = 1/(1+lam) is equivalent to Tikhonov with rate lam" (X^T X = I). Read with the
    keep probability p of V in {0, 1/p} it holds; with the rate of PyTorch (and of the paper's sec. 4), the
    exact minimiser is Tikhonov with 1/lam, so a larger lam means a WEAKER regularizer."""
    rng = np.random.default_rng(default_seed() + 12)
    Q, _ = np.linalg.qr(rng.normal(size=(30, 4)))  # X^T X = I (c = 1)
    Y = rng.normal(size=(30, 2))
    for lam in (0.5, 2.0):
        torch_rate = 1.0 / (1.0 + lam)  # torch.nn.Dropout(p=torch_rate) = our p
        W = dr.linear_minimizer(Q, Y, torch_rate)
        np.testing.assert_allclose(W, dr.ridge_minimizer(Q, Y, 1.0 / lam), rtol=1e-12)
        assert np.linalg.norm(W - dr.ridge_minimizer(Q, Y, lam)) > 0.1 * np.linalg.norm(W)
        # the keep-probability reading is the consistent one: rate lam / (1 + lam)
        np.testing.assert_allclose(dr.linear_minimizer(Q, Y, lam / (1 + lam)), dr.ridge_minimizer(Q, Y, lam),
                                   rtol=1e-12)
    assert dr.ridge_lambda(1.0, 1 / 1.5) == pytest.approx(2.0, rel=1e-14)  # lam = 0.5 -> 1/lam


def test_deviation_bound_is_attained_at_n1_by_a_two_point_loss():
    """D7: the app. A bound E|mean_n - E L| <= Std/sqrt(n) is attained at n = 1 by a symmetric two-point loss --
    eq. 1's own loss with a single mask entry (N = r = 1) and p = 1/2 -- and is strict for n >= 2."""
    X, Y, W, A, B = make_problem(21, N=1, d_in=3, d_out=2, r=1)
    p = 0.5
    masks, probs = enumerate_masks(1, p)
    t = [torch.tensor(v, dtype=torch.float64) for v in (X, Y, W, A, B)]
    L = np.array([float(one_mask_loss(*t, torch.tensor(m.reshape(1, 1)), "bottleneck", 1.0)) for m in masks])
    mu, std = float(probs @ L), math.sqrt(dr.loss_variance(X, Y, W, A, B, p))
    assert mu == pytest.approx(dr.expected_loss(X, Y, W, A, B, p), rel=1e-13)
    assert float(probs @ np.abs(L - mu)) == pytest.approx(float(dr.deviation_bound(std, 1)), rel=1e-13)
    # n = 2: all 4 pairs of independent realisations; strictly below the bound (ratio 1/sqrt 2)
    pairs = [(li, pi) for li, pi in zip(L, probs, strict=True)]
    dev2 = sum(pi * pj * abs((li + lj) / 2 - mu) for li, pi in pairs for lj, pj in pairs)
    assert dev2 / float(dr.deviation_bound(std, 2)) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # a p != 1/2 makes the two points asymmetric: strict already at n = 1
    m2, pr2 = enumerate_masks(1, 0.2)
    L2 = np.array([float(one_mask_loss(*t, torch.tensor(m.reshape(1, 1)), "bottleneck", 1.0)) for m in m2])
    mu2 = float(pr2 @ L2)
    assert float(pr2 @ np.abs(L2 - mu2)) < 0.9 * math.sqrt(dr.loss_variance(X, Y, W, A, B, 0.2))


def test_two_point_deviation_ratio_by_enumeration_and_its_sqrt_2_over_pi_limit():
    """D7: the ratio E|mean_n - mu| / (Std/sqrt n) for a symmetric two-point law, by enumerating all 2^n sign
    sequences, is 1 at n = 1 and tends to sqrt(2/pi) = 0.798 (asymptotic looseness sqrt(pi/2) = 1.25)."""
    for n in range(1, 13):
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
        brute = np.abs(signs.mean(axis=1)).mean() * math.sqrt(n)
        assert dr.two_point_deviation_ratio(n) == pytest.approx(brute, rel=1e-12)
    assert dr.two_point_deviation_ratio(1) == 1.0
    ns = np.array([10, 100, 10_000, 1_000_000])
    gap = np.abs(dr.two_point_deviation_ratio(ns) - math.sqrt(2 / math.pi))
    assert np.all(np.diff(gap) < 0) and gap[-1] < 1e-6  # converges (even n: ratio = sqrt(2/pi)(1 - 1/(4n) + ...))
    assert gap[0] > 1e-3
    with pytest.raises(ValueError, match="n must be an integer"):
        dr.two_point_deviation_ratio(0)


def test_printed_std_of_the_linear_loss_is_not_the_bounds_std():
    """D8: the text after the bound names "Std[||Y - (XW) o V||^2]" (the linear model's loss). With the frozen
    W = 0 that Std is exactly 0, so "E|mean_n - E L| <= 0" would have to hold for eq. 1's loss -- it does not."""
    X, Y, _, A, B = make_problem(22, N=2, d_in=3, d_out=2, r=2)
    W = np.zeros((2, 3))
    p = 0.3
    masks, probs = enumerate_masks(4, p)
    t = [torch.tensor(v, dtype=torch.float64) for v in (X, Y, W, A, B)]
    L = np.array([float(one_mask_loss(*t, torch.tensor(m.reshape(2, 2)), "bottleneck", 1.0)) for m in masks])
    mu = float(probs @ L)
    printed_std = 0.0  # (X W) o V = 0 for every mask V: the linear loss is the constant ||Y||^2
    lin = [float(((Y - (X @ W.T) * m.reshape(2, 2)) ** 2).sum()) for m in masks]
    assert np.ptp(lin) == 0.0
    deviation = float(probs @ np.abs(L - mu))
    assert deviation > 0.1 * mu and deviation > printed_std
    assert deviation <= math.sqrt(dr.loss_variance(X, Y, W, A, B, p)) * (1 + 1e-12)  # the right Std bounds it


def test_sec32_rows_of_B_are_channels_only_in_the_sec31_shapes():
    """D9: sec. 3.2's diag(||B_{1,:}||^2, ..., ||B_{r,:}||^2) is per channel only with sec. 3.1's B (R x C);
    with Definition 1's (and listing 1's) B in R^{n1 x r} -- our lora_B -- rows are output units, and the
    abstract's "W + AB" is not even defined for n1 != n2."""
    X, _, _, A, B = make_problem(23, N=7, d_in=5, d_out=4, r=3)
    p = 0.25
    v = p / (1 - p)
    on_A, _ = dr.penalty_strengths(X, A, B, p)
    B_sec31 = B.T  # (R, C)
    np.testing.assert_allclose(v * np.array([B_sec31[i] @ B_sec31[i] for i in range(3)]), on_A, rtol=1e-13)
    B_def1 = B  # (n1, r) = (d_out, r)
    rows_def1 = v * np.array([B_def1[i] @ B_def1[i] for i in range(3)])
    assert np.max(np.abs(rows_def1 - on_A)) > 0.1 * np.max(on_A)
    # abstract "W + AB" with Definition 1's A (r x n2), B (n1 x r), n1 = 4 != n2 = 5
    with pytest.raises(ValueError, match="matmul"):
        A @ B
    # square case n1 = n2 = r: AB is defined and has the right shape, but it is not BA
    rng = np.random.default_rng(default_seed() + 13)
    As, Bs = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    assert np.linalg.norm(As @ Bs - Bs @ As) > 0.5 * np.linalg.norm(Bs @ As)

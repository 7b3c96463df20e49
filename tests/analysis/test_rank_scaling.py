"""analysis.rank_scaling (rsLoRA Thm. 3.2, App. A) proved by exact enumeration, autograd and Monte Carlo.

Oracles independent of the closed forms: (i) exact enumeration over every A0 of a discrete law (Rademacher,
three-point) -- the moments only involve the 2nd and 4th moments of the entries of A0, so a discrete law with
the right excess kurtosis gives them exactly -- with the SGD steps run by torch autograd (float64); (ii)
autograd for a fixed A0 (the conditional-on-A0 identity f = -lr gamma^2 v0 x0^T A0^T A0 x); (iii) Monte
Carlo over Gaussian / uniform A0 with |z| <= 5 from the estimator's own standard error, seeded from
LORA_THEORY_SEED. Exponent tolerances are derived (mean-value bound on a least-squares slope), not tuned.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import rank_scaling as rs
from analysis.inputs import default_seed

KEYS = ("mean_out", "second_out", "mean_grad_in", "second_grad_in", "entry_second_out", "entry_second_grad_in")
Z_MAX = 5.0


def vectors(seed, d, d_out, n=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)), rng.normal(size=(n, d_out)), rng.normal(size=d), rng.normal(size=d_out))


def torch_sgd(A0s, xs, vs, x, v, *, gamma, lr, targets=None):
    """Independent oracle: SGD on (A, B0 = 0) by torch autograd, batched over A0s (D, r, d); returns
    f(x) (D, d_out), grad_x (D, d) and the final A, B. Linear loss v_k . f(x_k) or MSE 0.5 ||f - y_k||^2."""
    A = torch.tensor(np.asarray(A0s), dtype=torch.float64, requires_grad=True)
    D, r, d = A.shape
    d_out = (vs if targets is None else targets).shape[1]
    B = torch.zeros((D, d_out, r), dtype=torch.float64, requires_grad=True)
    for k in range(xs.shape[0]):
        xk = torch.tensor(xs[k])
        fk = gamma * torch.einsum("bor,br->bo", B, A @ xk)
        if targets is None:
            loss = (fk * torch.tensor(vs[k])).sum()
        else:
            loss = 0.5 * ((fk - torch.tensor(targets[k])) ** 2).sum()
        gA, gB = torch.autograd.grad(loss, (A, B))
        A = (A - lr * gA).detach().requires_grad_(True)
        B = (B - lr * gB).detach().requires_grad_(True)
    xt = torch.tensor(np.broadcast_to(x, (D, d)).copy(), requires_grad=True)
    f = gamma * torch.einsum("bor,br->bo", B, torch.einsum("brk,bk->br", A, xt))
    (grad_x,) = torch.autograd.grad((f * torch.tensor(v)).sum(), xt)
    return f.detach().numpy(), grad_x.numpy(), A.detach().numpy(), B.detach().numpy()


def enumerate_law(values, probs, r, d):
    """Every A0 (r, d) with iid entries from a discrete law, and its probability."""
    idx = np.array(list(itertools.product(range(len(values)), repeat=r * d)))
    A0s = np.asarray(values)[idx].reshape(-1, r, d)
    return A0s, np.prod(np.asarray(probs)[idx], axis=1)


def three_point(sigma2, p):
    """Entries in {-a, 0, a} with probs p/2, 1-p, p/2 and variance sigma2: excess kurtosis 1/p - 3."""
    a = math.sqrt(sigma2 / p)
    return (-a, 0.0, a), (p / 2, 1 - p, p / 2), 1 / p - 3


LAWS = {
    "rademacher": lambda s2: ((-math.sqrt(s2), math.sqrt(s2)), (0.5, 0.5), -2.0),
    "gauss_kurtosis": lambda s2: three_point(s2, 1 / 3),  # excess kurtosis 0, like N(0, s2)
    "three_point_half": lambda s2: three_point(s2, 1 / 2),  # excess kurtosis -1
    "heavy": lambda s2: three_point(s2, 1 / 5),  # excess kurtosis 2
}


def enumerated_moments(A0s, w, f, g):
    return {
        "mean_out": w @ f,
        "second_out": w @ np.sum(f**2, axis=1),
        "mean_grad_in": w @ g,
        "second_grad_in": w @ np.sum(g**2, axis=1),
        "entry_second_out": w @ f**2,
        "entry_second_grad_in": w @ g**2,
    }


# ------------------------------------------------------------------------------------------------- gamma


def test_gamma_values():
    assert rs.gamma(4) == 0.25
    assert rs.gamma(4, 2.0, "rslora") == 1.0
    assert rs.gamma(16, 1.0, 0.25) == 0.5
    assert rs.gamma(3, 1.0, 2.0) == pytest.approx(1 / 9, rel=1e-15)
    np.testing.assert_allclose(rs.gamma(np.array([1, 4, 16]), 8.0, "rslora"), [8.0, 4.0, 2.0], rtol=1e-15)
    assert rs.scaling_exponent("lora") == 1.0 and rs.scaling_exponent("rslora") == 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(r=0), "r"),
        (dict(r=1.5), "r"),
        (dict(r=[4, 0]), "r"),
        (dict(r=[4, 2.5]), "r"),
        (dict(r=[4, float("nan")]), "r"),
        (dict(r=4, alpha=-1.0), "alpha"),
        (dict(r=4, alpha=float("inf")), "alpha"),
        (dict(r=4, kind="dora"), "kind"),
        (dict(r=4, kind=True), "kind"),
        (dict(r=4, kind=float("nan")), "kind"),
    ],
)
def test_gamma_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        rs.gamma(**kwargs)


def test_moment_exponents_values_and_bad_inputs():
    assert rs.moment_exponents(0.5) == (0.0, 0.0)
    assert rs.moment_exponents("lora") == (-1.0, -2.0)
    assert rs.moment_exponents(0.5, regime="small_rank") == (0.0, -1.0)
    assert rs.moment_exponents(0.25, regime="small_rank") == (0.5, 0.0)
    with pytest.raises(ValueError, match=r"^regime\b"):
        rs.moment_exponents(0.5, regime="huge")
    with pytest.raises(ValueError, match=r"^kind\b"):
        rs.moment_exponents(float("inf"))


# -------------------------------------------------------------------------------- exact enumeration oracle


@pytest.mark.parametrize("law", sorted(LAWS))
def test_one_step_moments_exact_enumeration(law):
    r, d, d_out, s2, g, lr = 2, 3, 2, 0.7, 0.8, 0.6
    xs, vs, x, v = vectors(3, d, d_out)
    values, probs, kappa = LAWS[law](s2)
    A0s, w = enumerate_law(values, probs, r, d)
    f, gx, _, _ = torch_sgd(A0s, xs, vs, x, v, gamma=g, lr=lr)
    want = enumerated_moments(A0s, w, f, gx)
    got = rs.one_step_moments(xs[0], vs[0], x, v, r=r, gamma=g, lr=lr, sigma2=s2, excess_kurtosis=kappa)
    for key in KEYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-11, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("law", ["rademacher", "gauss_kurtosis", "heavy"])
def test_sgd_moments_exact_enumeration_three_steps(law):
    r, d, d_out, s2, g, lr = 2, 3, 2, 1.3, 0.9, 0.5
    xs, vs, x, v = vectors(5, d, d_out, n=3)
    values, probs, kappa = LAWS[law](s2)
    A0s, w = enumerate_law(values, probs, r, d)
    f, gx, _, _ = torch_sgd(A0s, xs, vs, x, v, gamma=g, lr=lr)
    want = enumerated_moments(A0s, w, f, gx)
    got = rs.sgd_moments(xs, vs, x, v, r=r, gamma=g, lr=lr, sigma2=s2, excess_kurtosis=kappa)
    for key in KEYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-11, atol=1e-13, err_msg=key)


# ------------------------------------------------------------------------------------------------ autograd


def test_one_step_conditional_on_A0_autograd():
    """For a fixed A0: f(x) = -lr gamma^2 v0 x0^T A0^T A0 x and grad_x = -lr gamma^2 (v0.v) A0^T A0 x0."""
    r, d, d_out, g, lr = 5, 4, 3, 0.37, 0.9
    xs, vs, x, v = vectors(7, d, d_out)
    A0 = np.random.default_rng(8).normal(size=(r, d))
    f, gx, A1, B1 = torch_sgd(A0[None], xs, vs, x, v, gamma=g, lr=lr)
    S = A0.T @ A0
    np.testing.assert_allclose(f[0], -lr * g**2 * vs[0] * (xs[0] @ S @ x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gx[0], -lr * g**2 * (vs[0] @ v) * (S @ xs[0]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A1[0], A0, rtol=0, atol=0)  # grad_A = 0 since B0 = 0
    np.testing.assert_allclose(B1[0], -lr * g * np.outer(vs[0], A0 @ xs[0]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["linear", "mse"])
def test_sgd_adapter_matches_autograd(loss):
    r, d, d_out, g, lr = 4, 3, 2, 0.8, 0.4
    xs, vs, x, v = vectors(11, d, d_out, n=4)
    A0 = np.random.default_rng(12).normal(size=(r, d))
    targets = vs if loss == "mse" else None
    _, _, A_t, B_t = torch_sgd(A0[None], xs, None if targets is not None else vs, x, v, gamma=g, lr=lr,
                               targets=targets)
    A_n, B_n = rs.sgd_adapter(A0, xs, None if targets is not None else vs, gamma=g, lr=lr, targets=targets)
    np.testing.assert_allclose(A_n, A_t[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(B_n, B_t[0], rtol=1e-12, atol=1e-14)


def test_mse_first_step_is_linear_step_with_minus_target():
    """At B0 = 0, f(x0) = 0 so the MSE gradient is v0 = -y0: one MSE step = one linear step with v0 = -y0."""
    xs, ys, x, v = vectors(13, 4, 3)
    A0 = np.random.default_rng(14).normal(size=(6, 4))
    A_m, B_m = rs.sgd_adapter(A0, xs, None, gamma=0.5, lr=0.7, targets=ys)
    A_l, B_l = rs.sgd_adapter(A0, xs, -ys, gamma=0.5, lr=0.7)
    np.testing.assert_allclose(A_m, A_l, rtol=0, atol=1e-15)
    np.testing.assert_allclose(B_m, B_l, rtol=0, atol=1e-15)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), r=st.integers(1, 5), d=st.integers(1, 4),
       d_out=st.integers(1, 3))
def test_structure_lemma_B_is_M_At_and_A_is_A0_P(seed, n, r, d, d_out):
    """The exact form of eq. (7): B_n = M A0^T and A_n = A0 P with (M, P) independent of A0."""
    xs, vs, _, _ = vectors(seed, d, d_out, n=n)
    A0 = np.random.default_rng(seed + 1).normal(size=(r, d))
    M, P = rs.structure_matrices(xs, vs, gamma=0.7, lr=0.5)
    A_n, B_n = rs.sgd_adapter(A0, xs, vs, gamma=0.7, lr=0.5)
    np.testing.assert_allclose(B_n, M @ A0.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A_n, A0 @ P, rtol=1e-10, atol=1e-12)


def test_eq8_remainder_is_order_gamma4_not_gamma3():
    """gamma B_n A_n = -lr gamma^2 sum v_k x_k^T S + R with R = O(gamma^4) (eq. (8) states O(gamma^3)):
    halving gamma divides R by 2^4 up to a relative O(gamma^2) correction."""
    xs, vs, _, _ = vectors(15, 3, 2, n=3)
    A0 = np.random.default_rng(16).normal(size=(4, 3))
    S = A0.T @ A0
    lr = 1.0

    def remainder(g):
        A_n, B_n = rs.sgd_adapter(A0, xs, vs, gamma=g, lr=lr)
        return np.linalg.norm(g * B_n @ A_n + lr * g**2 * vs.T @ xs @ S)

    g = 1e-2
    assert remainder(g) / remainder(g / 2) == pytest.approx(16.0, rel=1e-3)


# --------------------------------------------------------------------------------------------- Monte Carlo


def assert_mc_matches(samples, exact):
    summary = rs.mc_summary(samples)
    for key, (mean, se) in summary.items():
        z = np.abs(mean - exact[key]) / se
        assert np.all(z <= Z_MAX), (key, z)


@pytest.mark.parametrize(("init", "kappa"), [("normal", 0.0), ("uniform", -1.2)])
def test_one_step_moments_vs_monte_carlo(init, kappa):
    r, d, d_out, s2, g, lr = 3, 4, 2, 0.5, 0.9, 0.7
    xs, vs, x, v = vectors(17, d, d_out)
    samples = rs.simulate_sgd(xs, vs, x, v, r=r, gamma=g, lr=lr, n_draws=40_000, sigma2=s2,
                              seed=default_seed(), init=init)
    exact = rs.one_step_moments(xs[0], vs[0], x, v, r=r, gamma=g, lr=lr, sigma2=s2, excess_kurtosis=kappa)
    assert_mc_matches(samples, exact)
    for key, col in (("entry_second_out", "out"), ("entry_second_grad_in", "grad_in")):
        sq = samples[col] ** 2
        z = np.abs(sq.mean(0) - exact[key]) / (sq.std(0, ddof=1) / math.sqrt(sq.shape[0]))
        assert np.all(z <= Z_MAX), (key, z)


def test_sgd_moments_vs_monte_carlo_four_steps():
    r, d, d_out, s2, g, lr = 3, 3, 2, 0.8, 0.9, 0.6
    xs, vs, x, v = vectors(19, d, d_out, n=4)
    samples = rs.simulate_sgd(xs, vs, x, v, r=r, gamma=g, lr=lr, n_draws=40_000, sigma2=s2, seed=default_seed())
    assert_mc_matches(samples, rs.sgd_moments(xs, vs, x, v, r=r, gamma=g, lr=lr, sigma2=s2))


def test_simulate_one_step_equals_formula_per_draw():
    """Draw i uses A0_i = sqrt(sigma2) * default_rng(seed).standard_normal((n_draws, r, d))[i]."""
    r, d, d_out, s2, g, lr, n_draws = 3, 4, 2, 0.6, 0.8, 0.5, 50
    xs, vs, x, v = vectors(21, d, d_out)
    out = rs.simulate_sgd(xs, vs, x, v, r=r, gamma=g, lr=lr, n_draws=n_draws, sigma2=s2, seed=5, chunk=7)
    A0s = math.sqrt(s2) * np.random.default_rng(5).standard_normal((n_draws, r, d))
    S = np.einsum("nri,nrj->nij", A0s, A0s)
    quad = np.einsum("i,nij,j->n", xs[0], S, x)
    np.testing.assert_allclose(out["out"], -lr * g**2 * quad[:, None] * vs[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["grad_in"], -lr * g**2 * (vs[0] @ v) * S @ xs[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["sq_grad_in"], np.sum(out["grad_in"] ** 2, axis=1), rtol=1e-14)


def test_simulate_does_not_depend_on_chunk_and_mse_matches_adapter():
    xs, ys, x, v = vectors(23, 3, 2, n=3)
    kw = dict(r=4, gamma=0.7, lr=0.4, n_draws=12, seed=3, targets=ys)
    a = rs.simulate_sgd(xs, None, x, v, chunk=5, **kw)
    b = rs.simulate_sgd(xs, None, x, v, chunk=12, **kw)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-13, atol=1e-15)
    A0s = np.random.default_rng(3).standard_normal((12, 4, 3))
    f, gx, _, _ = torch_sgd(A0s, xs, None, x, v, gamma=0.7, lr=0.4, targets=ys)
    np.testing.assert_allclose(a["out"], f, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a["grad_in"], gx, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ property tests


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 64), d=st.integers(1, 6), d_out=st.integers(1, 4),
       kappa=st.sampled_from([-2.0, -1.2, 0.0, 3.0]))
def test_one_step_equals_general_n_step_and_exceeds_paper(seed, r, d, d_out, kappa):
    xs, vs, x, v = vectors(seed, d, d_out)
    kw = dict(r=r, gamma=0.6, lr=0.8, sigma2=1.7, excess_kurtosis=kappa)
    one = rs.one_step_moments(xs[0], vs[0], x, v, **kw)
    gen = rs.sgd_moments(xs, vs, x, v, **kw)
    assert one["mean_out"].shape == (d_out,) and one["mean_grad_in"].shape == (d,)
    for key in KEYS:
        np.testing.assert_allclose(one[key], gen[key], rtol=1e-11, atol=1e-13, err_msg=key)
    # the exact second moment is the paper's kept term times (1 + dropped ratio)
    ratio = rs.dropped_term_ratio(xs[0], x, r=r, excess_kurtosis=kappa)
    kept_grad = float(one["mean_grad_in"] @ one["mean_grad_in"])
    assert one["second_grad_in"] == pytest.approx(kept_grad * (1 + ratio["second_grad_in"]), rel=1e-11)
    kept_out = float(one["mean_out"] @ one["mean_out"])
    assert one["second_out"] == pytest.approx(kept_out * (1 + ratio["second_out"]), rel=1e-9)
    # Jensen: E||w||^2 >= ||E w||^2 (variance >= 0), whatever the law of A0
    assert one["second_out"] >= kept_out * (1 - 1e-12)
    assert one["second_grad_in"] >= kept_grad * (1 - 1e-12)


# ------------------------------------------------------------------------------------------- exponent fits


LARGE_RANKS = np.array([256, 512, 1024, 2048, 4096])
GAMMAS = ["lora", "rslora", 0.25, 2.0]


def ones_problem(d, d_out=2):
    return np.ones(d), np.ones(d_out), np.ones(d), np.ones(d_out)


@pytest.mark.parametrize("kind", GAMMAS)
def test_exponents_from_exact_moments_large_rank(kind):
    """d = 4, r in 256..4096: the least-squares slope of log(moment) is a positive average of secant slopes,
    so it lies between the smallest and largest local exponent. Local exponent of r (r + q) is 2 - q / (r + q)
    with q = d + 1 (grad) or 1 + |x0|^2|x|^2/(x0.x)^2 = 2 (output, x0 = x): within that bound of 2 - 4 beta."""
    d = 4
    x0, v0, x, v = ones_problem(d)
    first, second = rs.moment_exponents(kind)
    mom = [rs.one_step_moments(x0, v0, x, v, r=int(r), gamma=rs.gamma(int(r), 1.5, kind), lr=0.3)
           for r in LARGE_RANKS]
    slope, lo, hi = rs.fit_exponent(LARGE_RANKS, [-m["mean_out"][0] for m in mom])
    assert slope == pytest.approx(first, abs=1e-10)  # exact power law r^(1 - 2 beta)
    r0 = LARGE_RANKS[0]
    for key, q in (("second_grad_in", d + 1), ("second_out", 2)):
        slope, lo, hi = rs.fit_exponent(LARGE_RANKS, [m[key] for m in mom])
        assert second - q / (r0 + q) <= slope <= second, (key, slope)


@pytest.mark.parametrize("kind", GAMMAS)
def test_exponents_from_monte_carlo_large_rank(kind):
    """Monte Carlo at d = 4 (r >> d): the fitted first-moment exponent's CI contains 1 - 2 beta, and the
    second-moment CI reaches 2 - 4 beta once widened by the derived finite-r deficit (d + 1) / (r_min + d + 1)."""
    d, n_draws = 4, 300
    x0, v0, x, v = ones_problem(d, 1)
    ranks = np.array([256, 362, 512, 724, 1024, 1448, 2048])
    first, second = rs.moment_exponents(kind)
    means, w_mean, seconds, w_second = [], [], [], []
    for i, r in enumerate(ranks):
        samples = rs.simulate_sgd(x0[None], v0[None], x, v, r=int(r), gamma=rs.gamma(int(r), 1.0, kind), lr=0.5,
                                  n_draws=n_draws, seed=default_seed() + i)
        summary = rs.mc_summary(samples)
        m, se = summary["mean_out"]
        means.append(-m[0])
        w_mean.append((m[0] / se[0]) ** 2)
        m2, se2 = summary["second_grad_in"]
        seconds.append(m2)
        w_second.append((m2 / se2) ** 2)
    _, lo, hi = rs.fit_exponent(ranks, means, weights=w_mean, confidence=0.999)
    assert lo <= first <= hi
    _, lo, hi = rs.fit_exponent(ranks, seconds, weights=w_second, confidence=0.999)
    deficit = (d + 1) / (ranks[0] + d + 1)
    assert lo <= second <= hi + deficit


def test_small_rank_regime_rslora_second_moment_decays():
    """d = 784, r in 1..16: for rsLoRA E||grad_x||^2 ~ (r + d + 1) / r, so its exponent is in
    [-1, -1 + r_max / (r_max + d + 1)] (small_rank regime, 1 - 4 beta), not the paper's 0; MC agrees."""
    d = 784
    ranks = np.array([1, 2, 3, 4, 6, 8, 11, 16])
    rng = np.random.default_rng(default_seed())
    x0, x = rng.normal(size=d), rng.normal(size=d)
    v0 = v = np.ones(1)
    exact = [rs.one_step_moments(x0, v0, x, v, r=int(r), gamma=rs.gamma(int(r), 1.0, "rslora"), lr=0.1)
             for r in ranks]
    small = rs.moment_exponents("rslora", regime="small_rank")[1]
    slope, _, _ = rs.fit_exponent(ranks, [m["second_grad_in"] for m in exact])
    assert small <= slope <= small + ranks[-1] / (ranks[-1] + d + 1)
    assert rs.moment_exponents("rslora")[1] == 0.0  # the paper's (large-rank) exponent, far from slope
    vals, wts = [], []
    for i, r in enumerate(ranks):
        s = rs.simulate_sgd(x0[None], v0[None], x, v, r=int(r), gamma=rs.gamma(int(r), 1.0, "rslora"), lr=0.1,
                            n_draws=300, seed=default_seed() + i)
        m2, se2 = rs.mc_summary(s)["second_grad_in"]
        vals.append(m2)
        wts.append((m2 / se2) ** 2)
    _, lo, hi = rs.fit_exponent(ranks, vals, weights=wts, confidence=0.999)
    assert lo <= slope <= hi  # MC agrees with the exact exponent ...
    assert hi < 0.0  # ... and rejects the paper's exponent 0


# ------------------------------------------------------------------------------------ errata demonstrations


def test_erratum_eq11_moment_inside_power_at_d784_r8():
    """E[w^2] != (E w)^2: at d = 784, r = 8 the exact E||grad_x||^2 is (r + d + 1) / r = 99.1 times the
    paper's leading term; MC over A0 confirms the exact value."""
    d, r = 784, 8
    rng = np.random.default_rng(default_seed())
    x0, x = rng.normal(size=d), rng.normal(size=d)
    v0 = v = np.ones(1)
    g = rs.gamma(r, 1.0, "rslora")
    exact = rs.one_step_moments(x0, v0, x, v, r=r, gamma=g, lr=0.1)
    paper = rs.paper_eq11_moment(x0[None], v0[None], x, r=r, gamma=g, lr=0.1, m=2)
    kept_grad = float(exact["mean_grad_in"] @ exact["mean_grad_in"])
    assert exact["second_grad_in"] / kept_grad == pytest.approx((r + d + 1) / r, rel=1e-12)
    ratio_out = exact["second_out"] / paper[0]
    assert ratio_out == pytest.approx(1 + rs.dropped_term_ratio(x0, x, r=r)["second_out"], rel=1e-10)
    assert ratio_out > 10  # random inputs: (x0.x)^2 ~ |x0|^2 |x|^2 / d
    s = rs.simulate_sgd(x0[None], v0[None], x, v, r=r, gamma=g, lr=0.1, n_draws=4000, seed=default_seed())
    m2, se2 = rs.mc_summary(s)["second_grad_in"]
    assert abs(m2 - exact["second_grad_in"]) <= Z_MAX * se2
    assert (m2 - kept_grad) / se2 > Z_MAX  # the paper's value is rejected by the Monte Carlo


def test_erratum_eq11_sum_of_powers_misses_cross_terms():
    """Two steps on the same (x0, v0): the exact m = 2 moment -> (2 c v0)^2 = 4 c^2 v0^2 as r -> inf,
    gamma -> 0, while eq. (11) gives 2 c^2 v0^2: a factor 2 that no rank removes."""
    x0 = np.array([1.0, -0.5, 2.0])
    v0 = np.array([0.7, -1.1])
    xs, vs = np.stack([x0, x0]), np.stack([v0, v0])
    r, g, lr = 10**6, 1e-4, 1.0
    exact = rs.sgd_moments(xs, vs, x0, v0, r=r, gamma=g, lr=lr)["entry_second_out"]
    paper = rs.paper_eq11_moment(xs, vs, x0, r=r, gamma=g, lr=lr, m=2)
    # corrections: dropped terms 2 / r and O(gamma^2) terms, both < 1e-5 here
    np.testing.assert_allclose(exact / paper, 2.0, rtol=1e-5)


def test_erratum_eq11_m4_cross_terms_survive_input_average():
    """Averaging over iid N(0, I_d) inputs kills the m = 2 cross terms but not m = 4 ones:
    E[(c0 + c1)^4] = 12 (d^2 + 2d) while sum_k E[c_k^4] = 6 (d^2 + 2d), c_k = x_k . x."""
    d, n = 3, 200_000
    rng = np.random.default_rng(default_seed())
    x, x0, x1 = rng.normal(size=(3, n, d))
    c0, c1 = np.sum(x0 * x, 1), np.sum(x1 * x, 1)
    for sample, want in (((c0 + c1) ** 4, 12 * (d * d + 2 * d)), (c0**4 + c1**4, 6 * (d * d + 2 * d))):
        z = (sample.mean() - want) / (sample.std(ddof=1) / math.sqrt(n))
        assert abs(z) <= Z_MAX


def test_erratum_odd_moments_vanish_for_centred_inputs():
    """E_x(x_k^T x_n) = 0 for centred iid inputs, so the m = 1 output moment averaged over inputs is 0 for
    every gamma: the "Theta_r(1)" of E_x((x_k^T x_n)^m) fails for odd m. Exact: f is odd in x."""
    xs, vs, x, v = vectors(29, 5, 2)
    kw = dict(r=7, gamma=0.3, lr=0.2)
    plus = rs.one_step_moments(xs[0], vs[0], x, v, **kw)["mean_out"]
    minus = rs.one_step_moments(xs[0], vs[0], -x, v, **kw)["mean_out"]
    np.testing.assert_allclose(plus + minus, 0.0, atol=1e-15)
    assert np.all(np.abs(plus) > 0)


# ------------------------------------------------------------------------------------------------ fitting


def test_fit_exponent_matches_linregress_and_exact_power_law():
    from scipy import stats

    rng = np.random.default_rng(default_seed())
    r = np.array([2.0, 4, 8, 16, 32, 64])
    y = 3.0 * r**-0.7 * np.exp(0.05 * rng.normal(size=r.size))
    slope, lo, hi = rs.fit_exponent(r, y, confidence=0.9)
    ref = stats.linregress(np.log(r), np.log(y))
    half = stats.t.ppf(0.95, r.size - 2) * ref.stderr
    assert slope == pytest.approx(ref.slope, rel=1e-12)
    assert (lo, hi) == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-12)
    s, lo, hi = rs.fit_exponent(r, 2.0 * r**1.5)
    assert s == pytest.approx(1.5, abs=1e-12) and hi - lo == pytest.approx(0.0, abs=1e-10)
    # integer weights = repeated points, for the slope
    w = np.array([1, 2, 1, 3, 1, 2])
    sw, _, _ = rs.fit_exponent(r, y, weights=w)
    assert sw == pytest.approx(stats.linregress(np.log(np.repeat(r, w)), np.log(np.repeat(y, w))).slope, rel=1e-12)


# --------------------------------------------------------------------------------------------- bad inputs


def _ok():
    xs, vs, x, v = vectors(31, 3, 2)
    return xs, vs, x, v


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(x=np.ones(4)), "x"),
        (dict(v=np.ones(3)), "v"),
        (dict(x0=np.ones((3, 1))), "x0"),
        (dict(v0=[np.nan, 1.0]), "v0"),
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(lr=0.0), "lr"),
        (dict(sigma2=-1.0), "sigma2"),
        (dict(excess_kurtosis=-3.0), "excess_kurtosis"),
    ],
)
def test_one_step_moments_bad_inputs(change, name):
    xs, vs, x, v = _ok()
    kw = dict(x0=xs[0], v0=vs[0], x=x, v=v, r=2, gamma=0.5, lr=0.1)
    kw.update(change)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        rs.one_step_moments(kw.pop("x0"), kw.pop("v0"), kw.pop("x"), kw.pop("v"), **kw)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(n_draws=0), "n_draws"),
        (dict(chunk=0), "chunk"),
        (dict(init="kaiming"), "init"),
        (dict(seed=1.5), "seed"),
        (dict(targets=np.ones((1, 2))), "vs must be None"),
        (dict(vs=None), "vs must be given"),
        (dict(xs=np.ones((2, 3))), "vs"),
        (dict(x=np.ones(2)), "x"),
        (dict(r=-1), "r"),
    ],
)
def test_simulate_sgd_bad_inputs(change, name):
    xs, vs, x, v = _ok()
    kw = dict(xs=xs, vs=vs, x=x, v=v, r=2, gamma=0.5, lr=0.1, n_draws=4)
    kw.update(change)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        rs.simulate_sgd(kw.pop("xs"), kw.pop("vs"), kw.pop("x"), kw.pop("v"), **kw)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        (([1, 2, 4], [1.0, 2.0, -1.0]), {}, "values"),
        (([1, 2], [1.0, 2.0]), {}, "rs"),
        (([1, 1, 1], [1.0, 2.0, 3.0]), {}, "rs"),
        (([0, 2, 4], [1.0, 2.0, 3.0]), {}, "rs"),
        (([1, 2, 4], [1.0, 2.0]), {}, "values"),
        (([1, 2, 4], [1.0, 2.0, 3.0]), dict(confidence=1.5), "confidence"),
        (([1, 2, 4], [1.0, 2.0, 3.0]), dict(weights=[1.0, -1.0, 1.0]), "weights"),
    ],
)
def test_fit_exponent_bad_inputs(args, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        rs.fit_exponent(*args, **kwargs)


def test_other_bad_inputs():
    xs, vs, x, v = _ok()
    with pytest.raises(ValueError, match=r"^x\b"):
        rs.dropped_term_ratio(xs[0], np.ones(5), r=2)
    with pytest.raises(ValueError, match=r"^r\b"):
        rs.dropped_term_ratio(xs[0], x, r=0)
    with pytest.raises(ValueError, match=r"^vs\b"):
        rs.sgd_moments(xs, np.ones((2, 2)), x, v, r=2, gamma=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"^m\b"):
        rs.paper_eq11_moment(xs, vs, x, r=2, gamma=0.5, lr=0.1, m=0)
    with pytest.raises(ValueError, match=r"^A0\b"):
        rs.sgd_adapter(np.ones((2, 4)), xs, vs, gamma=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"^samples\["):
        rs.mc_summary({k: np.ones((1, 2)) for k in ("out", "sq_out", "grad_in", "sq_grad_in")})
    assert math.isinf(rs.dropped_term_ratio(np.array([1.0, 0.0]), np.array([0.0, 1.0]), r=3)["second_out"])


# --------------------------------------------- ERRATA rank_scaling 8-11: conditions of Thm. 3.2's statement


def test_erratum_additive_constant_breaks_rank_stabilization():
    """Item 8: "the only setting of gamma_r (modulo an additive constant)": gamma_r = alpha/sqrt(r) + c, c != 0,
    violates the hypothesis gamma_r -> 0 and makes the first moment (exactly proportional to gamma^2 r) grow
    like r; a multiplicative constant (3 / sqrt(r)) keeps it exactly constant."""
    x0, v0, x, v = vectors(default_seed() + 31, d=5, d_out=3)
    ranks = np.array([1, 10**6, 10**7, 10**8])

    def first_moment(g_of_r):
        return np.array([np.linalg.norm(rs.one_step_moments(x0[0], v0[0], x, v, r=int(r), gamma=g_of_r(r),
                                                            lr=0.1)["mean_out"]) for r in ranks])

    mult = first_moment(lambda r: 3.0 / math.sqrt(r))
    np.testing.assert_allclose(mult / mult[0], 1.0, rtol=1e-12)
    c = 0.1
    add = first_moment(lambda r: 1.0 / math.sqrt(r) + c)
    np.testing.assert_allclose(add / add[0], (1 + c * np.sqrt(ranks)) ** 2 / (1 + c) ** 2, rtol=1e-12)
    slope, _, _ = rs.fit_exponent(ranks[1:], add[1:])
    # derivative of log((1 + c sqrt r)^2) in log r is c sqrt(r) / (1 + c sqrt r) in [0.990, 0.9999] here
    assert 0.990 <= slope <= 1.0
    assert add[-1] / add[0] > 8e5


def test_erratum_step_zero_of_the_trajectory_is_not_rank_stabilized():
    """Item 9: "the above holds at any point in the learning trajectory": at n = 0 (B0 = 0) the adapter's output
    and its input gradient are exactly 0 for every gamma_r and r, so no scaling gives Theta_r(1) moments; from
    n = 1 on, rsLoRA's first moment is exactly r-independent (gamma^2 r = alpha^2)."""
    rng = np.random.default_rng(default_seed() + 32)
    x0, v0, x, v = vectors(default_seed() + 33, d=4, d_out=2)
    for r in (4, 64):
        A0 = torch.tensor(rng.normal(size=(r, 4)), dtype=torch.float64)
        B0 = torch.zeros((2, r), dtype=torch.float64)
        xt = torch.tensor(x, requires_grad=True)
        for g in (rs.gamma(r, kind="rslora"), rs.gamma(r, kind="lora"), 1.0):
            f = g * B0 @ (A0 @ xt)
            (gx,) = torch.autograd.grad((f * torch.tensor(v)).sum(), xt)
            assert torch.all(f == 0) and torch.all(gx == 0)
    means = [rs.sgd_moments(x0, v0, x, v, r=r, gamma=rs.gamma(r, kind="rslora"), lr=0.1)["mean_out"]
             for r in (4, 64)]
    np.testing.assert_allclose(means[0], means[1], rtol=1e-12)
    assert np.linalg.norm(means[0]) > 0


def torch_adam_first_step(A0s, x0, v0, x, v, *, gamma, lr):
    """Oracle: one torch.optim.Adam step on (A, B0 = 0), linear loss v0 . f(x0), batched over A0s (D, r, d).
    Adam is entrywise, so one batched parameter equals D separate runs. eps = 1e-30 (-> 0): grad_A is exactly
    0 at B0 = 0 and stays 0 / eps = 0; |grad_B| >> eps."""
    A = torch.tensor(A0s, dtype=torch.float64, requires_grad=True)
    D, r, d = A.shape
    B = torch.zeros((D, v0.shape[0], r), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([A, B], lr=lr, eps=1e-30)
    f0 = gamma * torch.einsum("bor,brk,k->bo", B, A, torch.tensor(x0))
    (f0 @ torch.tensor(v0)).sum().backward()
    opt.step()
    with torch.no_grad():
        f = gamma * torch.einsum("bor,brk,k->bo", B, A, torch.tensor(x))
        gx = gamma * torch.einsum("brk,bor,o->bk", A, B, torch.tensor(v))
    return f.numpy(), gx.numpy()


def test_erratum_thm32_is_for_sgd_adam_first_step_needs_lora_scaling():
    """Item 10: Thm. 3.2 is proved for SGD (app. A; app. B.1 says so) but stated without the optimizer, and the
    main experiments use AdamW. After one Adam step the first moment is Theta(gamma_r r): rsLoRA's grows like
    sqrt(r); LoRA's alpha/r keeps it constant. Exact formula vs a real torch.optim.Adam step (Monte Carlo)."""
    x0, v0, x, v = vectors(default_seed() + 34, d=6, d_out=3)
    x0, v0 = x0[0], v0[0]
    rng = np.random.default_rng(default_seed() + 35)
    r, n, s2, lr = 8, 20_000, 0.5, 0.01
    g = rs.gamma(r, kind="rslora")
    f, gx = torch_adam_first_step(rng.normal(size=(n, r, 6)) * math.sqrt(s2), x0, v0, x, v, gamma=g, lr=lr)
    ex = rs.adam_first_step_moments(x0, v0, x, v, r=r, gamma=g, lr=lr, sigma2=s2)
    for got, want in ((f, ex["mean_out"]), (gx, ex["mean_grad_in"])):
        z = (got.mean(axis=0) - want) / (got.std(axis=0, ddof=1) / math.sqrt(n))
        assert np.abs(z).max() <= Z_MAX, z
    for got, want in ((np.sum(f**2, axis=1), ex["second_out"]), (np.sum(gx**2, axis=1), ex["second_grad_in"])):
        assert abs(got.mean() - want) <= Z_MAX * got.std(ddof=1) / math.sqrt(n)
    # the exponents: r = 4 -> 2048 (ratio 512)
    def mean_norm(moments, kind, r_):
        return np.linalg.norm(moments(x0, v0, x, v, r=r_, gamma=rs.gamma(r_, kind=kind), lr=lr)["mean_out"])

    adam_rs = mean_norm(rs.adam_first_step_moments, "rslora", 2048) / mean_norm(rs.adam_first_step_moments, "rslora", 4)
    adam_lora = mean_norm(rs.adam_first_step_moments, "lora", 2048) / mean_norm(rs.adam_first_step_moments, "lora", 4)
    sgd_rs = mean_norm(rs.one_step_moments, "rslora", 2048) / mean_norm(rs.one_step_moments, "rslora", 4)
    assert adam_rs == pytest.approx(math.sqrt(512), rel=1e-12)  # 22.6: grows like sqrt(r) under Adam
    assert adam_lora == pytest.approx(1.0, rel=1e-12)
    assert sgd_rs == pytest.approx(1.0, rel=1e-12)  # the theorem's claim, true for SGD


def test_erratum_sec21_and_thm32_swap_d1_and_d2():
    """Item 11: sec. 2.1 has W in R^{d2 x d1} (input x in R^{d1}), A in R^{r x d1}, B in R^{d2 x r}; Thm. 3.2
    has B in R^{d1 x r}, A in R^{r x d2}. With d1 != d2, sec. 2.1's W plus Thm. 3.2's BA is undefined."""
    rng = np.random.default_rng(default_seed() + 36)
    d1, d2, r = 5, 3, 2
    W = rng.normal(size=(d2, d1))  # sec. 2.1
    B_thm, A_thm = rng.normal(size=(d1, r)), rng.normal(size=(r, d2))  # Thm. 3.2
    with pytest.raises(ValueError, match="broadcast"):
        W + B_thm @ A_thm
    B_21, A_21 = rng.normal(size=(d2, r)), rng.normal(size=(r, d1))  # sec. 2.1's shapes (= PEFT's)
    assert (W + B_21 @ A_21).shape == (d2, d1)


def test_erratum_thm32_mean_and_variance_do_not_fix_the_second_moments():
    """ERRATA rank 5: laws with the same mean 0 and variance sigma_A but growing fourth moment give unbounded
    second moments: three-point laws P(+-sqrt(s2/q)) = q/2 (excess kurtosis 1/q - 3), by exact enumeration over
    every A0 (torch autograd SGD). E||grad_x||^2 grows linearly in the kurtosis, without bound as q -> 0 (a law
    with infinite fourth moment, e.g. Student t with 3 dof, is the limit: E||grad_x||^2 = infinity)."""
    r, d, d_out, s2, g, lr = 1, 2, 2, 0.7, 0.8, 0.6
    xs, vs, x, v = vectors(3, d, d_out)
    second, kappas = [], []
    for q in (0.5, 0.05, 0.005):
        values, probs, kappa = three_point(s2, q)
        A0s, w = enumerate_law(values, probs, r, d)
        _, gx, _, _ = torch_sgd(A0s, xs, vs, x, v, gamma=g, lr=lr)
        want = enumerated_moments(A0s, w, np.zeros((len(w), 1)), gx)
        assert want["mean_grad_in"] == pytest.approx(rs.one_step_moments(xs[0], vs[0], x, v, r=r, gamma=g, lr=lr,
                                                     sigma2=s2, excess_kurtosis=kappa)["mean_grad_in"], rel=1e-11)
        second.append(want["second_grad_in"])
        kappas.append(kappa)
    # same mean (the first moment depends on sigma_A only), second moment affine in kappa with a positive slope
    slope = (second[2] - second[1]) / (kappas[2] - kappas[1])
    assert slope > 0 and (second[1] - second[0]) / (kappas[1] - kappas[0]) == pytest.approx(slope, rel=1e-9)
    assert second[2] > 50 * second[0]

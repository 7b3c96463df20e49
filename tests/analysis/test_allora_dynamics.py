"""analysis.allora_dynamics: ALLoRA's flow vs dropout's expected flow, ALLoRA-OD as LoRA on a reshaped loss, the
chain's forward/backward for LoRA x eta, ALLoRA and ASF-LoRA. Oracles: torch autograd (float64), central finite
differences, scipy quadrature, exact constructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from analysis import adaptive
from analysis import allora_dynamics as ad
from analysis import dropout as dr


def problem(seed, N=7, d_in=5, d_out=4, r=3, b_scale=0.7):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, d_in)), rng.normal(size=(N, d_out)), rng.normal(size=(d_out, d_in)),
            rng.normal(size=(r, d_in)), b_scale * rng.normal(size=(d_out, r)))


def t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def fd(fun, theta, direction, h=1e-5):
    """Central difference of fun along direction (theta, direction: tuples of arrays)."""
    plus = fun(*[a + h * d for a, d in zip(theta, direction, strict=True)])
    minus = fun(*[a - h * d for a, d in zip(theta, direction, strict=True)])
    return (plus - minus) / (2 * h)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eta=st.sampled_from([0.5, 1.0, 2.0]))
def test_allora_velocity_is_minus_autograd_of_listing_1(seed, eta):
    X, Y, W, A, B = problem(seed)
    fn = adaptive.allora_function()
    At, Bt = t(A), t(B)
    F = fn.apply(torch.tensor(X), At, Bt, eta)
    ((torch.tensor(Y - X @ W.T) - F) ** 2).sum().backward()
    dA, dB = ad.allora_velocity(X, Y, W, A, B, eta)
    np.testing.assert_allclose(dA, -At.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB, -Bt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_allora_has_no_force_at_a_stationary_loss_but_dropout_does():
    # R = X (B A)^T exactly: g = 0. ALLoRA's velocity vanishes identically; dropout's expected flow shrinks BA.
    X, _, W, A, B = problem(1)
    Y = X @ W.T + X @ (B @ A).T
    dA, dB = ad.allora_velocity(X, Y, W, A, B, eta=2.0)
    assert np.abs(dA).max() < 1e-12 and np.abs(dB).max() < 1e-12
    for placement in ("bottleneck", "input"):
        vA, vB = ad.dropout_velocity(X, Y, W, A, B, 0.3, placement=placement)
        assert np.abs(vA).max() > 1e-3 and np.abs(vB).max() > 1e-3
        # the force is the penalty's descent direction: dP/dt = -||grad P||^2 < 0
        rate = ad.penalty_rate(X, A, B, vA, vB, 0.3, placement=placement)
        assert rate == pytest.approx(-(np.sum(vA**2) + np.sum(vB**2)), rel=1e-10)


def test_taper_split():
    X, Y, W, A, B = problem(2)
    eta = 2.0
    (lA, lB), (tA, tB) = ad.allora_taper_split(X, Y, W, A, B, eta)
    dA, dB = ad.allora_velocity(X, Y, W, A, B, eta)
    np.testing.assert_allclose(lA + tA, dA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lB + tB, dB, rtol=1e-12, atol=1e-12)
    pA, pB = ad.dropout_velocity(X, Y, W, A, B, 0.0)
    np.testing.assert_allclose(lA, eta * pA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lB, eta * pB, rtol=1e-12, atol=1e-12)
    (_, _), (tA0, tB0) = ad.allora_taper_split(X, Y, W, A, np.zeros_like(B), eta)  # BA = 0: s_i = eta
    assert np.abs(tA0).max() == 0 and np.abs(tB0).max() == 0


@pytest.mark.parametrize("seed", range(4))
def test_rates_match_finite_differences(seed):
    X, Y, W, A, B = problem(seed)
    rng = np.random.default_rng(100 + seed)
    dA, dB = rng.normal(size=A.shape), rng.normal(size=B.shape)
    # product velocity and row-norm rates
    np.testing.assert_allclose(ad.product_velocity(A, B, dA, dB), fd(lambda a, b: b @ a, (A, B), (dA, dB)),
                               rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(ad.row_norm_rates(A, B, dA, dB),
                               fd(lambda a, b: np.linalg.norm(b @ a, axis=1), (A, B), (dA, dB)), rtol=1e-6)
    for s in (1.0, 0.5):
        loss = lambda a, b, s=s: float(((Y - X @ W.T - s * X @ a.T @ b.T) ** 2).sum())  # noqa: E731
        assert ad.loss_rate(X, Y, W, A, B, dA, dB, scaling=s) == pytest.approx(fd(loss, (A, B), (dA, dB)), rel=1e-6)
        for placement in ("bottleneck", "input"):
            pen = lambda a, b, s=s, pl=placement: dr.dropout_penalty(X, a, b, 0.2, placement=pl, scaling=s)  # noqa
            got = ad.penalty_rate(X, A, B, dA, dB, 0.2, placement=placement, scaling=s)
            assert got == pytest.approx(fd(pen, (A, B), (dA, dB)), rel=1e-6)


def test_row_norm_rate_of_a_zero_row_is_its_escape_speed():
    A = np.array([[1.0, 2.0]])
    B = np.array([[0.0], [1.0]])
    dA, dB = np.zeros_like(A), np.array([[3.0], [0.0]])
    rates = ad.row_norm_rates(A, B, dA, dB)
    assert rates[0] == pytest.approx(3.0 * np.sqrt(5.0))  # ||dB_0 A|| for the zero row
    assert rates[1] == 0.0


def test_allora_flow_can_raise_the_loss():
    # X = I, W = 0, A = [1, 0], B = [1, 3]^T: rows of BA have norms 1 and 3, so s_1 > s_2; R chosen so that
    # g A^T = 0 and B^T g and B^T S g point in opposite directions: dL/dt = -<B^T g, B^T S g> > 0.
    X, W = np.eye(2), np.zeros((2, 2))
    A, B = np.array([[1.0, 0.0]]), np.array([[1.0], [3.0]])
    Y = np.array([[1.0, 3.0], [-1.0, 0.4]])
    dA, dB = ad.allora_velocity(X, Y, W, A, B, eta=1.0)
    s1, s2 = 1 / np.sqrt(2.0), 1 / np.sqrt(4.0)
    expected = -4 * (-1.0 + 3 * 0.4) * (s1 * -1.0 + 3 * s2 * 0.4)  # the derivation in the test's comment
    rate = ad.loss_rate(X, Y, W, A, B, dA, dB)
    assert rate == pytest.approx(expected, rel=1e-12)
    assert rate > 0
    loss = lambda a, b: float(((Y - X @ a.T @ b.T) ** 2).sum())  # noqa: E731
    h = 1e-4
    assert loss(A + h * dA, B + h * dB) > loss(A, B)
    # plain LoRA's flow never raises it
    pA, pB = ad.dropout_velocity(X, Y, W, A, B, 0.0)
    assert ad.loss_rate(X, Y, W, A, B, pA, pB) <= 0


@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_od_surrogate_is_the_integral_of_the_scaled_gradient(eta):
    c = 1 / eta**2
    for f, r in ((0.7, 0.3), (-1.3, 0.5), (2.5, -1.0), (-0.2, -2.0), (0.0, 1.0)):
        want, _ = integrate.quad(lambda u, r=r: -2 * (r - u) / np.sqrt(abs(u) + c), 0.0, f, epsabs=1e-13)
        assert ad.od_surrogate_loss([[f]], [[r]], eta) == pytest.approx(want, rel=1e-9, abs=1e-12)
    rng = np.random.default_rng(3)
    F, R = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    # its gradient: central differences of the closed form, entry by entry
    grad = ad.od_surrogate_grad(F, R, eta)
    for i in range(5):
        for j in range(3):
            E = np.zeros_like(F)
            E[i, j] = 1.0
            num = (ad.od_surrogate_loss(F + 1e-6 * E, R, eta) - ad.od_surrogate_loss(F - 1e-6 * E, R, eta)) / 2e-6
            assert grad[i, j] == pytest.approx(num, rel=1e-6, abs=1e-8)
    np.testing.assert_allclose(grad, adaptive.allora_od_scale(F, eta) * (-2 * (R - F)), rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), eta=st.sampled_from([0.5, 1.0, 2.0]))
def test_allora_od_is_lora_on_the_surrogate_loss(seed, eta):
    X, Y, W, A, B = problem(seed)
    R = Y - X @ W.T
    c = 1 / eta**2
    At, Bt = t(A), t(B)
    F = torch.tensor(X) @ At.T @ Bt.T
    Rt = torch.tensor(R)
    w = F.abs() + c
    # the docstring's closed form, transcribed independently in torch; autograd gives LoRA's (s = 1) gradients
    psi = torch.where(F >= 0, -4 * (Rt + c) * (w.sqrt() - c**0.5), 4 * (Rt - c) * (w.sqrt() - c**0.5)) \
        + 4 / 3 * (w**1.5 - c**1.5)
    psi.sum().backward()
    dA, dB = ad.od_velocity(X, Y, W, A, B, eta)
    np.testing.assert_allclose(dA, -At.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dB, -Bt.grad.numpy(), rtol=1e-9, atol=1e-11)


def _torch_chain(Ws, As, Bs, x, grad_out, method, eta):
    fn = adaptive.allora_function()
    h = t(x)
    params = []
    for W, A, B in zip(Ws, As, Bs, strict=True):
        At, Bt = t(A), t(B)
        params.append((At, Bt))
        if method == "allora":
            o = fn.apply(h[None], At, Bt, eta)[0]
        else:
            f = Bt @ (At @ h)
            o = eta * f if method == "lora" else f / torch.sqrt(f.abs() + 1 / eta**2)
        h = torch.tensor(W) @ h + o
        h.retain_grad()
    return h, params


@pytest.mark.parametrize("method", ad.CHAIN_METHODS)
@pytest.mark.parametrize("eta", [0.7, 2.0])
def test_chain_response_matches_autograd(method, eta):
    rng = np.random.default_rng(5)
    dims = [6, 5, 7, 4]
    Ws = [rng.normal(size=(dims[i + 1], dims[i])) / 2 for i in range(3)]
    As = [rng.normal(size=(2, dims[i])) for i in range(3)]
    Bs = [rng.normal(size=(dims[i + 1], 2)) for i in range(3)]
    x, g = rng.normal(size=6), rng.normal(size=4)
    out = ad.chain_response(Ws, As, Bs, x, g, method, eta)
    # forward: each prefix chain's output
    norms = []
    for depth in range(1, 4):
        h, _ = _torch_chain(Ws[:depth], As[:depth], Bs[:depth], x, None, method, eta)
        norms.append(float(h.detach().norm()))
    np.testing.assert_allclose(out["forward"], norms, rtol=1e-12)
    # backward from grad_out at the top
    xt = t(x)
    fn = adaptive.allora_function()
    h, hs, params = xt, [xt], []
    for W, A, B in zip(Ws, As, Bs, strict=True):
        At, Bt = t(A), t(B)
        params.append((At, Bt))
        if method == "allora":
            o = fn.apply(h[None], At, Bt, eta)[0]
        else:
            f = Bt @ (At @ h)
            o = eta * f if method == "lora" else f / torch.sqrt(f.abs() + 1 / eta**2)
        h = torch.tensor(W) @ h + o
        h.retain_grad()
        hs.append(h)
    (h * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out["input_grad"], [float(v.grad.norm()) for v in hs[:-1]], rtol=1e-10)
    np.testing.assert_allclose(out["grad_A"], [float(a.grad.norm()) for a, _ in params], rtol=1e-10)
    np.testing.assert_allclose(out["grad_B"], [float(b.grad.norm()) for _, b in params], rtol=1e-10)


def test_chain_lora_eta_one_equals_allora_forward_and_input_grad():
    rng = np.random.default_rng(6)
    Ws = [rng.normal(size=(5, 5)) for _ in range(4)]
    As = [rng.normal(size=(2, 5)) for _ in range(4)]
    Bs = [rng.normal(size=(5, 2)) for _ in range(4)]
    x, g = rng.normal(size=5), rng.normal(size=5)
    a = ad.chain_response(Ws, As, Bs, x, g, "lora", 1.0)
    b = ad.chain_response(Ws, As, Bs, x, g, "allora", 1.0)
    np.testing.assert_allclose(a["forward"], b["forward"], rtol=1e-13)
    np.testing.assert_allclose(a["input_grad"], b["input_grad"], rtol=1e-13)
    assert np.all(b["grad_B"] < a["grad_B"])  # s_i < 1 = eta on nonzero rows


def test_bad_input():
    X, Y, W, A, B = problem(0)
    with pytest.raises(ValueError, match="eta"):
        ad.allora_velocity(X, Y, W, A, B, eta=0.0)
    with pytest.raises(ValueError, match="dA"):
        ad.product_velocity(A, B, A.T, B)
    with pytest.raises(ValueError, match="method"):
        ad.chain_response([W], [A], [B], X[0], Y[0], "dora", 1.0)
    with pytest.raises(ValueError, match="R"):
        ad.od_surrogate_loss(np.ones((2, 2)), np.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match="p"):
        ad.penalty_rate(X, A, B, A, B, 1.0)

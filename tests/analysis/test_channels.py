"""LoWR: proxy gradients (Prop. 3.1), one-step update split (eq. 9-11), equivalent modules (Prop. 4.1),
eq. 12 and Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.channels import (
    channel_norms,
    channel_significance,
    equivalent_modules,
    equivalent_update_difference,
    lowr_gamma,
    lowr_rescale,
    lowr_rescale_sequential,
    one_step_update,
    proxy_gradients,
)
from analysis.inputs import default_seed

SEED = default_seed()
T64 = torch.float64


def problem(rng, N=6, d_in=5, r=3, d_out=4):
    return (rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), rng.standard_normal((N, d_in)),
            rng.standard_normal((N, d_out)), rng.standard_normal((d_out, d_in)))


def loss_t(y, Y):
    return 0.5 * ((y - Y) ** 2).sum() + torch.cos(y).sum()


def torch_layer(A, B, X, Y, W, s):
    """Returns (A_t, B_t, y, G) for y = X W^T + s X A^T B^T and the non-quadratic loss."""
    At = torch.tensor(A, dtype=T64, requires_grad=True)
    Bt = torch.tensor(B, dtype=T64, requires_grad=True)
    y = torch.tensor(X) @ torch.tensor(W).T + s * torch.tensor(X) @ At.T @ Bt.T
    G, = torch.autograd.grad(loss_t(y, torch.tensor(Y)), y, retain_graph=True)
    return At, Bt, y, G.numpy()


def test_proxy_gradients_match_autograd_and_the_per_channel_formulas():
    rng = np.random.default_rng(SEED)
    A, B, X, Y, W = problem(rng)
    s = 0.75
    At, Bt, y, G = torch_layer(A, B, X, Y, W, s)
    gA_t, gB_t = torch.autograd.grad(loss_t(y, torch.tensor(Y)), (At, Bt))
    gA, gB = proxy_gradients(A, B, X, G, scaling=s)
    np.testing.assert_allclose(gA, gA_t.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gB, gB_t.numpy(), rtol=1e-12, atol=1e-12)
    # eq. 5-6 channel by channel, sample by sample
    for i in range(A.shape[0]):
        a_i, b_i = A[i], B[:, i]
        grad_a = s * sum((b_i @ G[n]) * X[n] for n in range(X.shape[0]))
        grad_b = s * sum((a_i @ X[n]) * G[n] for n in range(X.shape[0]))
        np.testing.assert_allclose(gA[i], grad_a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gB[:, i], grad_b, rtol=1e-12, atol=1e-12)


def test_one_step_update_terms_sum_to_the_exact_sgd_step():
    rng = np.random.default_rng(SEED)
    A, B, X, Y, W = problem(rng)
    s, lr = 2.0, 0.05
    At, Bt, y, G = torch_layer(A, B, X, Y, W, s)
    opt = torch.optim.SGD([At, Bt], lr=lr)
    loss_t(y, torch.tensor(Y)).backward()
    opt.step()
    exact = s * (Bt.detach().numpy() @ At.detach().numpy() - B @ A)
    u = one_step_update(A, B, X, G, lr, scaling=s)
    np.testing.assert_allclose(u["total"], exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u["a_term"] + u["b_term"] + u["second_order"], exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u["A_new"], At.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(u["B_new"], Bt.detach().numpy(), rtol=1e-13)
    # LoWR eq. 10 in matrix form: a_term = -lr s^2 g A^T A, b_term = -lr s^2 B B^T g with g = G^T X
    g = G.T @ X
    np.testing.assert_allclose(u["a_term"], -lr * s**2 * g @ A.T @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u["b_term"], -lr * s**2 * B @ B.T @ g, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 5),
       st.floats(0.1, 10.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_equivalent_modules_scale_the_terms_by_n2_and_inverse_n2(N, d_in, r, d_out, n, negative, seed):
    rng = np.random.default_rng(seed)
    A, B, X, G, _ = problem(rng, N, d_in, r, d_out)
    n = -n if negative else n
    An, Bn = equivalent_modules(A, B, n)
    lr, s = 0.1, 1.5
    # rounding scales: the same products with absolute values (entries may cancel)
    aG, aX, aA, aB = np.abs(G), np.abs(X), np.abs(A), np.abs(B)
    scale_ba = aB @ aA
    scale_a = lr * s**2 * aG.T @ aX @ aA.T @ aA
    scale_b = lr * s**2 * aB @ aB.T @ aG.T @ aX
    scale_2 = lr**2 * s**3 * (aG.T @ aX @ aA.T) @ (aB.T @ aG.T @ aX)

    def close(x, y, scale):
        np.testing.assert_array_less(np.abs(x - y), 1e-13 * scale + 1e-300)

    close(Bn @ An, B @ A, scale_ba)
    u, v = one_step_update(A, B, X, G, lr, s), one_step_update(An, Bn, X, G, lr, s)
    close(v["a_term"], n**2 * u["a_term"], n**2 * scale_a)
    close(v["b_term"], u["b_term"] / n**2, scale_b / n**2)
    close(v["second_order"], u["second_order"], scale_2)
    diff = equivalent_update_difference(A, B, X, G, lr, n, s)
    close(diff, (n**2 - 1) * u["a_term"] + (n**-2 - 1) * u["b_term"], (n**2 + 1) * scale_a + 2 * scale_b + scale_2)


def test_equivalent_update_difference_matches_two_real_sgd_runs():
    rng = np.random.default_rng(SEED)
    A, B, X, Y, W = problem(rng)
    s, lr, n = 1.0, 0.02, 3.0
    products = []
    for A0, B0 in ((A, B), equivalent_modules(A, B, n)):
        At, Bt, y, G = torch_layer(A0, B0, X, Y, W, s)
        loss_t(y, torch.tensor(Y)).backward()
        with torch.no_grad():
            At -= lr * At.grad
            Bt -= lr * Bt.grad
        products.append(s * Bt.detach().numpy() @ At.detach().numpy())
    got = equivalent_update_difference(A, B, X, G, lr, n, s)
    np.testing.assert_allclose(got, products[1] - products[0], rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(got) > 1e-3 * np.linalg.norm(products[0] - s * B @ A)


def test_prop_4_1_inequality_can_be_an_equality():
    """Rank 1, x = a/||a||, g = b/||b||, n = ||b||/||a|| != 1: the two equivalent modules make the SAME update."""
    rng = np.random.default_rng(SEED)
    a, b = rng.standard_normal(5), rng.standard_normal(4)
    b *= 3.0 * np.linalg.norm(a) / np.linalg.norm(b)  # ||b|| = 3 ||a||
    A, B = a[None, :], b[:, None]
    X, G = (a / np.linalg.norm(a))[None, :], (b / np.linalg.norm(b))[None, :]
    n = np.linalg.norm(b) / np.linalg.norm(a)
    assert n == pytest.approx(3.0, rel=1e-14)
    u = one_step_update(A, B, X, G, 0.1)
    diff = equivalent_update_difference(A, B, X, G, 0.1, n)
    assert np.linalg.norm(diff) <= 1e-13 * np.linalg.norm(u["total"])


def test_printed_sign_of_eq_7_8_is_gradient_ascent():
    """W' = W + eta grad (eq. 7-8) increases the loss for a small step; the descent step decreases it."""
    rng = np.random.default_rng(SEED)
    A, B, X, Y, W = problem(rng)

    def loss(A_, B_):
        R = X @ W.T + X @ A_.T @ B_.T - Y
        return 0.5 * np.sum(R**2)

    G = X @ W.T + X @ A.T @ B.T - Y  # dL/dy for the squared loss
    gA, gB = proxy_gradients(A, B, X, G)
    lr = 1e-6
    base = loss(A, B)
    printed = loss(A + lr * gA, B + lr * gB)
    descent = loss(A - lr * gA, B - lr * gB)
    first_order = lr * (np.sum(gA**2) + np.sum(gB**2))
    assert printed > base and descent < base
    assert printed - base == pytest.approx(first_order, rel=1e-3)  # first-order increase, O(lr^2) remainder
    assert (printed - descent) / 2 == pytest.approx(first_order, rel=1e-6)  # symmetric difference: O(lr^3)


def test_eq_11_omitted_second_order_term_is_linear_in_lr():
    rng = np.random.default_rng(SEED)
    A, B, X, G, _ = problem(rng)
    rel = []
    for lr in (1e-3, 2e-3):
        u = one_step_update(A, B, X, G, lr)
        rel.append(np.linalg.norm(u["second_order"]) / np.linalg.norm(u["a_term"] + u["b_term"]))
    assert rel[1] == pytest.approx(2 * rel[0], rel=1e-12)
    assert rel[0] > 0


def test_lowr_by_hand():
    A = np.array([[1.0, 0.0], [0.0, 2.0]])  # a_1 = (1, 0), a_2 = (0, 2)
    B = np.array([[3.0, 0.0], [0.0, 1.0]])  # b_1 = (3, 0), b_2 = (0, 1)
    # ||a|| = (1, 2), ||b|| = (3, 1), significances (3, 2), population variance 0.25
    np.testing.assert_allclose(channel_significance(A, B), [3.0, 2.0], rtol=0)
    np.testing.assert_allclose(lowr_gamma(A, B, 2.0), [1.0, 1.0 + 2.0 * 2.0 * 0.25], rtol=1e-15)
    A2, B2 = lowr_rescale(A, B, tau=np.inf, alpha=2.0)
    np.testing.assert_allclose(A2, [[1.0, 0.0], [0.0, 4.0]], rtol=1e-15)
    np.testing.assert_allclose(B2, [[3.0, 0.0], [0.0, 0.5]], rtol=1e-15)
    # tau = 1: ratios (1/3, 2); channel 2 (ratio 2 >= 1) is left alone, channel 1 has gamma = 1
    A3, B3 = lowr_rescale(A, B, tau=1.0, alpha=2.0)
    np.testing.assert_array_equal(A3, A)
    np.testing.assert_array_equal(B3, B)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 5.0),
       st.sampled_from([0.1, 1.0, 10.0, np.inf]), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_lowr_keeps_ba_and_equals_the_sequential_loop(d_in, r, d_out, alpha, tau, n_special, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((r, d_in)) * rng.uniform(0.1, 3, size=(r, 1))
    B = rng.standard_normal((d_out, r)) * rng.uniform(0.1, 3, size=(1, r))
    if n_special >= 1:
        B[:, 0] = 0.0  # zero column: ratio inf, never rescaled
    if n_special >= 2 and r > 1:
        A[1] = 0.0  # zero row with b != 0: ratio 0 < tau, rescaled, BA unchanged
    if n_special >= 3 and r > 2:
        B[:, 2] = B[:, 1]  # a tie in ||b||
    A2, B2 = lowr_rescale(A, B, tau=tau, alpha=alpha)
    # rounding relative to the size of the rank-1 terms (||BA|| itself can be small by cancellation)
    scale = np.sum(channel_significance(A, B))
    err = np.linalg.norm(B2 @ A2 - B @ A) / scale if scale > 0 else np.linalg.norm(B2 @ A2)
    assert err <= 1e-14
    np.testing.assert_allclose(channel_significance(A2, B2), channel_significance(A, B), rtol=1e-14, atol=1e-300)
    gamma = lowr_gamma(A, B, alpha)
    assert np.all(gamma >= 1.0)
    nb = channel_norms(A, B)[1]
    assert np.all(gamma[nb == nb.max()] == 1.0)
    As, Bs = lowr_rescale_sequential(A, B, tau=tau, alpha=alpha)
    np.testing.assert_allclose(A2, As, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(B2, Bs, rtol=1e-13, atol=1e-300)
    if n_special >= 1:
        np.testing.assert_array_equal(A2[0], A[0])


def test_tau_inf_does_not_bound_the_ratio():
    """Sec. 4.1 says ||a_i||/||b_i|| 'should be bounded'; with tau = inf (the best setting of Table 5) repeated
    passes push it up without bound, while a finite tau caps it at tau (1 + alpha max||b|| var)^2."""
    rng = np.random.default_rng(SEED)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((5, 4))
    na, nb = channel_norms(A, B)
    start = na / nb
    moved = nb < nb.max()
    # alpha such that every non-max channel starts with gamma >= 1.2; gamma_i only grows as ||b_i|| shrinks
    alpha = 0.2 / np.min((nb.max() - nb[moved]) * np.var(na * nb))
    np.testing.assert_allclose(lowr_gamma(A, B, alpha)[moved].min(), 1.2, rtol=1e-12)
    cap = (1 + alpha * nb.max() * np.var(na * nb)) ** 2
    A_inf, B_inf, A_10, B_10 = A, B, A, B
    for _ in range(30):
        A_inf, B_inf = lowr_rescale(A_inf, B_inf, tau=np.inf, alpha=alpha)
        A_10, B_10 = lowr_rescale(A_10, B_10, tau=10.0, alpha=alpha)
    na_inf, nb_inf = channel_norms(A_inf, B_inf)
    assert np.all((na_inf / nb_inf)[moved] >= (1.2**60 * (1 - 1e-9)) * start[moved])  # >= 5.6e4 x
    na10, nb10 = channel_norms(A_10, B_10)
    assert np.all(na10 / nb10 <= np.maximum(start, 10.0 * cap))
    np.testing.assert_allclose(B_inf @ A_inf, B @ A, rtol=1e-12, atol=1e-12)


def test_rescaling_moves_weight_from_b_term_to_a_term():
    """Sec. 4.1 bullets: after a_i *= gamma, b_i /= gamma (one channel), that channel's a-part of eq. 11 grows by
    gamma^2, its b-part shrinks by 1/gamma^2, and grad b_i grows by gamma (eq. 6)."""
    rng = np.random.default_rng(SEED)
    a, b = rng.standard_normal(5), rng.standard_normal(4)
    X, G = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    gamma = 1.7
    u = one_step_update(a[None, :], b[:, None], X, G, 0.1)
    v = one_step_update(gamma * a[None, :], b[:, None] / gamma, X, G, 0.1)
    np.testing.assert_allclose(v["a_term"], gamma**2 * u["a_term"], rtol=1e-12)
    np.testing.assert_allclose(v["b_term"], u["b_term"] / gamma**2, rtol=1e-12)
    gb = proxy_gradients(a[None, :], b[:, None], X, G)[1]
    gb2 = proxy_gradients(gamma * a[None, :], b[:, None] / gamma, X, G)[1]
    np.testing.assert_allclose(gb2, gamma * gb, rtol=1e-12)


def test_significance_is_the_singular_value_and_ba_is_the_sum_of_channels():
    rng = np.random.default_rng(SEED)
    A, B, *_ = problem(rng)
    sig = channel_significance(A, B)
    for i in range(A.shape[0]):
        assert sig[i] == pytest.approx(np.linalg.svd(np.outer(B[:, i], A[i]), compute_uv=False)[0], rel=1e-12)
    # eq. 2: BA = sum_i b_i a_i^T (B is the LEFT factor of W + BA)
    np.testing.assert_allclose(B @ A, sum(np.outer(B[:, i], A[i]) for i in range(A.shape[0])), rtol=1e-12)


def test_bad_input():
    rng = np.random.default_rng(0)
    A, B, X, G, _ = problem(rng)
    with pytest.raises(ValueError, match="tau"):
        lowr_rescale(A, B, tau=0.0, alpha=1.0)
    with pytest.raises(ValueError, match="tau"):
        lowr_rescale(A, B, tau=-np.inf, alpha=1.0)
    with pytest.raises(ValueError, match="tau"):
        lowr_rescale_sequential(A, B, tau=float("nan"), alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        lowr_rescale(A, B, tau=1.0, alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        lowr_gamma(A, B, np.inf)
    with pytest.raises(ValueError, match="B"):
        lowr_gamma(A, B.T, 1.0)
    with pytest.raises(ValueError, match="X"):
        proxy_gradients(A, B, X[:, :-1], G)
    with pytest.raises(ValueError, match="grad_out"):
        proxy_gradients(A, B, X, G[:-1])
    with pytest.raises(ValueError, match="lr"):
        one_step_update(A, B, X, G, float("nan"))
    with pytest.raises(ValueError, match="scaling"):
        one_step_update(A, B, X, G, 0.1, scaling="x")
    with pytest.raises(ValueError, match="n"):
        equivalent_modules(A, B, 0.0)
    with pytest.raises(ValueError, match="A"):
        channel_norms(np.ones(3), B)


# ----------------------------------------------------------- ERRATA channels 2, 4, 7: the printed statements


def test_eq_10_second_order_size_depends_on_the_layer_and_vanishes_at_b_zero():
    """Item 2 (an announced approximation): ||second-order|| / ||first-order|| is linear in lr AND in the scale of
    the output gradient, invariant under (A, B) -> (cA, cB), changed by (nA, B/n), and exactly 0 at B = 0."""
    rng = np.random.default_rng(SEED)
    A, B, X, G, _ = problem(rng, N=8, d_in=6, r=3, d_out=5)

    def ratio(A_, B_, G_, lr=1e-2):
        u = one_step_update(A_, B_, X, G_, lr)
        return np.linalg.norm(u["second_order"]) / np.linalg.norm(u["a_term"] + u["b_term"])

    base = ratio(A, B, G)
    assert ratio(A, B, G, lr=2e-2) == pytest.approx(2 * base, rel=1e-12)
    assert ratio(A, B, 3 * G) == pytest.approx(3 * base, rel=1e-12)
    assert ratio(5 * A, 5 * B, G) == pytest.approx(base, rel=1e-12)
    assert abs(ratio(*equivalent_modules(A, B, 2.0), G) / base - 1) > 0.1
    assert ratio(A, np.zeros_like(B), G) == 0.0  # LoRA's start: grad_A = B^T g = 0
    # rank 1, one sample: closed form lr |a.x||b.g| |g||x| / sqrt((a.x)^2|g|^2|a|^2 + (b.g)^2|b|^2|x|^2
    #                                                              + 2 (a.x)^2 (b.g)^2)
    a, b, x, g = A[0], B[:, 0], X[0], G[0]
    ax, bg = a @ x, b @ g
    want = 1e-2 * abs(ax * bg) * np.linalg.norm(g) * np.linalg.norm(x) / np.sqrt(
        ax**2 * (g @ g) * (a @ a) + bg**2 * (b @ b) * (x @ x) + 2 * ax**2 * bg**2)
    u = one_step_update(a[None], b[:, None], x[None], g[None], 1e-2)
    got = np.linalg.norm(u["second_order"]) / np.linalg.norm(u["a_term"] + u["b_term"])
    assert got == pytest.approx(want, rel=1e-12)


def test_contributions_bullet_b_on_the_right_is_false():
    """Item 4: "LoRA-B (the matrix on the right acting as the output gradient proxy)". In W + BA the output-
    gradient proxy (gradient along dL/dy) is the LEFT factor B; the right factor A gets gradients along x. Read
    literally ("W + AB", B on the right): undefined for the paper's shapes A (r, n), B (m, r) unless m = n, and
    in the square case m = n = r it is another model whose right factor B gets gradients along x, i.e. B would
    then be the input proxy."""
    rng = np.random.default_rng(SEED)
    m = n = r = 4
    A, B, x, W = (rng.standard_normal((r, n)), rng.standard_normal((m, r)), rng.standard_normal(n),
                  rng.standard_normal((m, n)))
    y_target = rng.standard_normal(m)

    def grads(product):
        At = torch.tensor(A, requires_grad=True)
        Bt = torch.tensor(B, requires_grad=True)
        y = (torch.tensor(W) + product(At, Bt)) @ torch.tensor(x)
        yv = y.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(0.5 * ((yv - torch.tensor(y_target)) ** 2).sum(), yv)
        gA, gB = torch.autograd.grad(0.5 * ((y - torch.tensor(y_target)) ** 2).sum(), (At, Bt))
        return gA.numpy(), gB.numpy(), g.numpy()

    def off_span(M, u, axis):
        """Relative residual of the columns (axis=0) or rows (axis=1) of M after projection on u."""
        P = np.outer(u, u) / (u @ u)
        R = P @ M if axis == 0 else M @ P
        return np.linalg.norm(M - R) / np.linalg.norm(M)

    gA, gB, g = grads(lambda A_, B_: B_ @ A_)  # the paper's W + BA (eq. 1)
    assert off_span(gB, g, axis=0) < 1e-13  # columns of grad_B along dL/dy: B (left) is the output proxy
    assert off_span(gA, x, axis=1) < 1e-13  # rows of grad_A along x: A (right) is the input proxy
    gA2, gB2, _ = grads(lambda A_, B_: A_ @ B_)  # literal reading: B on the right
    assert off_span(gB2, x, axis=1) < 1e-13 and off_span(gB2, g, axis=0) > 0.1  # B would be the input proxy
    assert np.linalg.norm(A @ B - B @ A) > 0.5 * np.linalg.norm(B @ A)
    with pytest.raises(ValueError, match="matmul"):
        rng.standard_normal((2, 5)) @ rng.standard_normal((4, 2))  # A (r, n) @ B (m, r), m = 4 != n = 5


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_prop_4_1_condition_n_neq_1_admits_n_minus_1(optimizer):
    """Item 7: the proof takes "n != 1"; n = -1 ((-A, -B), same BA) gives the SAME trajectory of BA at every
    step, for SGD and Adam alike (both are odd in the gradient), while n = 2 does not."""
    rng = np.random.default_rng(SEED)
    A, B, X, Y, W = problem(rng)

    def trajectory(A0, B0, steps=15):
        At = torch.tensor(A0, dtype=T64, requires_grad=True)
        Bt = torch.tensor(B0, dtype=T64, requires_grad=True)
        opt = (torch.optim.SGD([At, Bt], lr=2e-3) if optimizer == "sgd" else torch.optim.Adam([At, Bt], lr=1e-2))
        out = []
        for _ in range(steps):
            opt.zero_grad()
            y = torch.tensor(X) @ torch.tensor(W).T + torch.tensor(X) @ At.T @ Bt.T
            loss_t(y, torch.tensor(Y)).backward()
            opt.step()
            out.append((Bt @ At).detach().numpy().copy())
        return np.array(out)

    base = trajectory(A, B)
    minus = trajectory(*equivalent_modules(A, B, -1.0))
    two = trajectory(*equivalent_modules(A, B, 2.0))
    scale = np.linalg.norm(base - B @ A)
    assert np.linalg.norm(minus - base) <= 1e-13 * np.linalg.norm(base)
    assert np.linalg.norm(two - base) > 1e-2 * scale
    assert np.all(np.isfinite(base)) and scale > 1e-3 * np.linalg.norm(B @ A)
    G = rng.standard_normal((6, 4))
    diff = equivalent_update_difference(A, B, X, G, 0.1, -1.0)  # (n^2 - 1) a_term + (1/n^2 - 1) b_term = 0
    assert np.linalg.norm(diff) <= 1e-14 * np.linalg.norm(one_step_update(A, B, X, G, 0.1)["total"])


def test_prop31_for_a_batch_grad_a_is_in_the_span_of_the_inputs_parallel_to_none():
    """ERRATA channels 8: eq. 5 ("a_i is updated in the direction of x") is per sample. For a batch, grad a_i =
    sum_n (b_i . g_n) x_n (autograd): in span{x_n}, along one input only if b_i . g_n vanishes for all others.
    Constructed: orthonormal inputs e_1, e_2, e_3, so cos(grad a_i, x_n) = |c_in| / ||c_i||, c_in = b_i . g_n."""
    rng = np.random.default_rng(SEED)
    r, d_in, d_out, N = 3, 8, 5, 3
    A, B, G = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r)), rng.standard_normal((N, d_out))
    X = np.eye(d_in)[:N]
    gA, _ = proxy_gradients(A, B, X, G)
    c = B.T @ G.T  # (r, N): c_in = b_i . g_n
    At = torch.tensor(A, requires_grad=True)
    f = torch.tensor(X) @ At.T @ torch.tensor(B).T
    (f * torch.tensor(G)).sum().backward()  # dL/dy = G
    np.testing.assert_allclose(gA, At.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gA, c @ X, rtol=1e-12, atol=1e-14)
    cos = np.abs(gA @ X.T) / np.linalg.norm(gA, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, np.abs(c) / np.linalg.norm(c, axis=1, keepdims=True), rtol=1e-12)
    # a channel with b_i . g_n != 0 for two inputs or more is parallel to none of them; with one sample, to x
    share = np.abs(c) / np.linalg.norm(c, axis=1, keepdims=True)
    spread = np.sort(share, axis=1)[:, -2] > 1e-3  # a second input carries > 0.1% of the channel's gradient
    assert spread.any() and np.all(cos[spread] <= np.sqrt(1 - 1e-6))
    g1, _ = proxy_gradients(A, B, X[:1], G[:1])
    np.testing.assert_allclose(np.abs(g1 @ X[0]) / np.linalg.norm(g1, axis=1), 1.0, rtol=1e-12)


def test_algorithm1_line5_value_is_a_real_number_not_the_rank():
    """ERRATA channels 5: line 5 assigns r <- alpha [max ||b|| - ||b_i||] var(||a|| ||b||), by hand from the norms
    (population variance), equal to lowr_gamma - 1; on a standard-normal draw it is a small real number, so read
    literally it overwrites the loop bound (the rank)."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((5, 4))
    na, nb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0)
    c = na * nb
    by_hand = 0.1 * (nb.max() - nb[0]) * (np.mean(c**2) - np.mean(c) ** 2)
    assert lowr_gamma(A, B, 0.1)[0] - 1 == pytest.approx(by_hand, rel=1e-12)
    assert 0 < by_hand < 1  # not the rank 4 (a loop over "i = 1..r" would stop after channel 1)

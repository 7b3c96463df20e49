"""ALLoRA sec. 4.2-4.3 and listing 1: ALLoRA, ALLoRA-OD and ASF-LoRA gradients against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.adaptive import (
    PAPER_LISTING_1,
    adaptive_function,
    allora_function,
    allora_grads,
    allora_od_grads,
    allora_od_scale,
    allora_scale,
    asf_derivative,
    asf_output,
    lora_grads,
)
from analysis.inputs import default_seed

SEED = default_seed()
T64 = torch.float64


def problem(rng, N=7, d_in=5, r=3, d_out=4, b_scale=1.0):
    X = rng.standard_normal((N, d_in))
    A = rng.standard_normal((r, d_in))
    B = b_scale * rng.standard_normal((d_out, r))
    Y = rng.standard_normal((N, d_out))
    return X, A, B, Y


def loss_fn(f, Y):
    """A non-quadratic loss of the adapter output, so that G = dL/df is not linear in f."""
    return 0.5 * ((f - Y) ** 2).sum() + torch.sin(f).sum()


def autograd_reference(X, A, B, Y, row_scale=None, sample_scale=None, scaling=1.0):
    """torch: G = dL/df from autograd of the real loss; then the gradients of the surrogate
    sum_{n,i} w_{n,i} G_{n,i} f_{n,i} (w, G detached), whose A/B gradients are B^T (w o G)^T X and (w o G)^T X A^T."""
    Xt, At, Bt, Yt = (torch.tensor(v, dtype=T64, requires_grad=True) for v in (X, A, B, Y))
    f = scaling * Xt @ At.T @ Bt.T
    G, = torch.autograd.grad(loss_fn(f, Yt), f, retain_graph=True)
    w = torch.ones_like(G)
    if row_scale is not None:
        w = w * torch.tensor(row_scale, dtype=T64)[None, :]
    if sample_scale is not None:
        w = w * torch.tensor(sample_scale, dtype=T64)
    surrogate = (w * G.detach() * f).sum()
    gA, gB = torch.autograd.grad(surrogate, (At, Bt), retain_graph=True)
    gX, = torch.autograd.grad(loss_fn(f, Yt), Xt)
    return G.numpy(), gX.numpy(), gA.numpy(), gB.numpy()


def test_allora_grads_match_row_scaled_autograd():
    rng = np.random.default_rng(SEED)
    X, A, B, Y = problem(rng)
    eta = 1.5
    s = 1 / np.sqrt(np.sqrt(((B @ A) ** 2).sum(axis=1)) + 1 / eta**2)  # written out independently
    G, gX, gA, gB = autograd_reference(X, A, B, Y, row_scale=s)
    got = allora_grads(X, A, B, G, eta)
    np.testing.assert_allclose(got[0], gX, rtol=1e-12, atol=1e-12)  # grad_input untouched
    np.testing.assert_allclose(got[1], gA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[2], gB, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(allora_scale(A, B, eta), s, rtol=1e-14)


def test_allora_equals_lora_with_scaling_eta_at_b_zero():
    """At B = 0 every s_i = eta and the forward is 0 for both: ALLoRA's A/B gradients are LoRA's with scaling eta."""
    rng = np.random.default_rng(SEED)
    X, A, B, Y = problem(rng, b_scale=0.0)
    eta = 2.0
    np.testing.assert_allclose(allora_scale(A, B, eta), eta, rtol=1e-15)
    G, _, gA, gB = autograd_reference(X, A, B, Y, scaling=eta)  # real autograd of LoRA with scaling eta
    got = allora_grads(X, A, B, G, eta)
    np.testing.assert_allclose(got[1], gA, rtol=1e-12, atol=1e-12)  # zero (B = 0) ...
    np.testing.assert_allclose(got[2], gB, rtol=1e-12, atol=1e-12)  # ... and eta g A^T
    assert np.abs(gB).max() > 0
    # and grad_input is LoRA's with scaling 1 (not eta): it is not rescaled
    np.testing.assert_allclose(got[0], lora_grads(X, A, B, G, 1.0)[0], rtol=1e-12, atol=0)


def test_corrected_listing_matches_allora_grads_through_real_autograd():
    rng = np.random.default_rng(SEED)
    X, A, B, Y = problem(rng, N=12)
    eta = 0.8
    fn = allora_function()
    for shape in [(12, 5), (3, 4, 5), (2, 3, 2, 5)]:
        Xt = torch.tensor(X.reshape(shape), dtype=T64, requires_grad=True)
        At = torch.tensor(A, dtype=T64, requires_grad=True)
        Bt = torch.tensor(B, dtype=T64, requires_grad=True)
        f = fn.apply(Xt, At, Bt, eta)
        assert f.shape == (*shape[:-1], 4)
        Yt = torch.tensor(Y.reshape(*shape[:-1], 4), dtype=T64)
        G, = torch.autograd.grad(loss_fn(f, Yt), f, retain_graph=True)
        loss_fn(f, Yt).backward()
        gi, gA, gB = allora_grads(X, A, B, G.reshape(12, 4).numpy(), eta)
        np.testing.assert_allclose(Xt.grad.reshape(12, 5).numpy(), gi, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(At.grad.numpy(), gA, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(Bt.grad.numpy(), gB, rtol=1e-12, atol=1e-12)


def _printed(patch_name: bool):
    ns = {"torch": torch}
    exec(PAPER_LISTING_1, ns)  # the printed text, verbatim
    if patch_name:
        ns["LinearLayer2"] = ns["ALLoRA"]
    return ns["ALLoRA"]


def _run_printed(F, x_shape, r=3, d_out=4, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, dtype=T64, generator=g, requires_grad=True)
    A = torch.randn(r, x_shape[-1], dtype=T64, generator=g, requires_grad=True)
    B = torch.randn(d_out, r, dtype=T64, generator=g, requires_grad=True)
    f = F.apply(x, A, B)
    G = 2 * f.detach()
    (f**2).sum().backward()
    d_in = x_shape[-1]
    ref = allora_grads(x.detach().reshape(-1, d_in).numpy(), A.detach().numpy(), B.detach().numpy(),
                       G.reshape(-1, d_out).numpy(), 2.0)  # rsq_scale = 1/4 -> eta = 2
    return A.grad.numpy(), B.grad.numpy(), ref


def test_printed_listing_bug_undefined_name():
    with pytest.raises(NameError, match="LinearLayer2"):
        _run_printed(_printed(False), (3, 4, 5))


def test_printed_listing_bug_2d_input():
    with pytest.raises(IndexError, match="Dimension out of range"):
        _run_printed(_printed(True), (6, 5))


def test_printed_listing_3d_input_is_correct_and_batch_grads_are_summed_by_autograd():
    """With the name fixed and 3-D input the listing is right: its (batch, r, d_in) parameter gradients are
    accepted and sum-reduced by torch's autograd (they are not rejected)."""
    gA, gB, ref = _run_printed(_printed(True), (3, 4, 5))
    assert gA.shape == (3, 5) and gB.shape == (4, 3)
    np.testing.assert_allclose(gA, ref[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gB, ref[2], rtol=1e-12, atol=1e-12)


def test_printed_listing_bug_4d_input():
    """4-D input (batch, heads, T, d): a shape error in general, and silently wrong gradients when
    heads = T = r = d_out (the transposed matmuls then happen to broadcast)."""
    with pytest.raises(RuntimeError):
        _run_printed(_printed(True), (2, 3, 4, 5))
    gA, gB, ref = _run_printed(_printed(True), (2, 3, 3, 5), r=3, d_out=3)
    assert np.abs(gA - ref[1]).max() > 0.1 * np.abs(ref[1]).max()
    assert np.abs(gB - ref[2]).max() > 0.1 * np.abs(ref[2]).max()


def test_allora_od_matches_per_sample_scaled_autograd():
    rng = np.random.default_rng(SEED)
    X, A, B, Y = problem(rng)
    eta = 1.2
    f = X @ A.T @ B.T
    S = 1 / np.sqrt(np.abs(f) + 1 / eta**2)
    G, gX, gA, gB = autograd_reference(X, A, B, Y, sample_scale=S)
    got = allora_od_grads(X, A, B, G, eta)
    np.testing.assert_allclose(allora_od_scale(f, eta), S, rtol=1e-14)
    np.testing.assert_allclose(got[0], gX, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], gA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[2], gB, rtol=1e-12, atol=1e-12)


def test_allora_od_equals_allora_when_outputs_have_row_norm_size():
    """Rank 1, every x_n = +-a/||a||: |f_{n,i}| = |b_i| ||a|| = ||(BA)_{i,:}||, so S_{n,i} = s_i and OD = ALLoRA."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal(5)
    b = rng.standard_normal(4)
    A, B = a[None, :], b[:, None]
    signs = rng.choice([-1.0, 1.0], size=6)
    X = signs[:, None] * a[None, :] / np.linalg.norm(a)
    G = rng.standard_normal((6, 4))
    for u, v in zip(allora_od_grads(X, A, B, G, 0.7), allora_grads(X, A, B, G, 0.7), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-14)
    # and they differ for generic inputs
    X2 = rng.standard_normal((6, 5))
    assert not np.allclose(allora_od_grads(X2, A, B, G, 0.7)[2], allora_grads(X2, A, B, G, 0.7)[2])


def test_asf_derivative_by_autograd_and_finite_differences():
    eta = 1.3
    f = np.array([-5.0, -1.0, -1e-3, 0.0, 1e-3, 0.4, 2.0, 30.0])
    ft = torch.tensor(f, dtype=T64, requires_grad=True)
    out = ft / torch.sqrt(torch.abs(ft) + 1 / eta**2)
    d, = torch.autograd.grad(out.sum(), ft)
    np.testing.assert_allclose(asf_output(f, eta), out.detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(asf_derivative(f, eta), d.numpy(), rtol=1e-13)
    h = 1e-8  # central differences; error O(h) at the kink of |f| at 0, O(h^2) elsewhere
    fd = (asf_output(f + h, eta) - asf_output(f - h, eta)) / (2 * h)
    np.testing.assert_allclose(asf_derivative(f, eta), fd, rtol=1e-6)
    assert asf_derivative(0.0, eta) == pytest.approx(eta, rel=1e-15)
    # ASF's natural gradient vs ALLoRA-OD's scale: ratio (|f|/2 + c)/(|f| + c) in (1/2, 1]
    ratio = asf_derivative(f, eta) / adaptive_function(f, eta)
    c = 1 / eta**2
    np.testing.assert_allclose(ratio, (np.abs(f) / 2 + c) / (np.abs(f) + c), rtol=1e-14)
    assert np.all(ratio > 0.5) and np.all(ratio <= 1.0)


def test_adaptive_function_shape_and_the_inverse_square_root_decay():
    eta = 2.0
    assert adaptive_function(0.0, eta) == pytest.approx(eta, rel=1e-15)
    xs = np.linspace(0, 10, 101)
    v = adaptive_function(xs, eta)
    assert np.all(np.diff(v) < 0) and np.all(v <= eta)
    np.testing.assert_allclose(adaptive_function(-xs, eta), v, rtol=0)
    # sec. 4.2 says "inversely proportional to ||(BA)_i||": quadrupling a large norm halves the rate (not 1/4)
    t = 1e8
    assert adaptive_function(4 * t, eta) / adaptive_function(t, eta) == pytest.approx(0.5, rel=1e-7)


def test_lora_dropout_masks_are_not_a_row_scaling_of_the_gradient():
    """Sec. 4.2's 'generalization of Dropout' remark: ALLoRA rescales rows (outputs i) of g = dL/d(BA). LoRA's
    dropout (PEFT: on the input x) multiplies the INPUT side of the per-sample gradient: autograd gives
    grad_B = G_V^T (X o V) A^T, which is not diag(s) G_V^T X A^T for any s."""
    rng = np.random.default_rng(SEED)
    X, A, B, Y = problem(rng, N=1)
    p = 0.5
    V = rng.binomial(1, 1 - p, size=X.shape) / (1 - p)
    V[0, :2] = [0.0, 1 / (1 - p)]  # at least one dropped and one kept input
    Xt, At, Bt, Yt = (torch.tensor(v, dtype=T64, requires_grad=True) for v in (X, A, B, Y))
    f = (Xt * torch.tensor(V)) @ At.T @ Bt.T
    G, = torch.autograd.grad(loss_fn(f, Yt), f, retain_graph=True)
    gB, = torch.autograd.grad(loss_fn(f, Yt), Bt)
    np.testing.assert_allclose(gB.numpy(), G.numpy().T @ (X * V) @ A.T, rtol=1e-12)
    plain = G.numpy().T @ X @ A.T  # rows g_i x^T A^T
    # best per-row scale s_i by least squares; the residual stays large
    s = (gB.numpy() * plain).sum(1) / (plain**2).sum(1)
    resid = np.linalg.norm(gB.numpy() - s[:, None] * plain) / np.linalg.norm(gB.numpy())
    assert resid > 1e-3


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 6), st.floats(0.05, 5.0),
       st.integers(0, 2**31 - 1))
def test_allora_structure_over_shapes(N, d_in, r, d_out, eta, seed):
    rng = np.random.default_rng(seed)
    X, A, B, _ = problem(rng, N, d_in, r, d_out)
    G = rng.standard_normal((N, d_out))
    gi, gA, gB = allora_grads(X, A, B, G, eta)
    assert gi.shape == (N, d_in) and gA.shape == (r, d_in) and gB.shape == (d_out, r)
    s = allora_scale(A, B, eta)
    assert np.all(s <= eta) and np.all(s > 0)
    _, lA, lB = lora_grads(X, A, B, G, 1.0)
    # grad_B's rows are LoRA's rows times s_i; grad_A = B^T diag(s) g
    np.testing.assert_allclose(gB, s[:, None] * lB, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gA, B.T @ (s[:, None] * (G.T @ X)), rtol=1e-12, atol=1e-12)
    # all s_i equal (BA = 0 rows) -> ALLoRA is LoRA with scaling eta on A/B
    Z = np.zeros_like(B)
    scale = eta * np.abs(G.T @ X) @ np.abs(A.T)  # rounding scale of the sums (they may cancel)
    np.testing.assert_array_less(np.abs(allora_grads(X, A, Z, G, eta)[2] - lora_grads(X, A, Z, G, eta)[2]),
                                 1e-13 * scale + 1e-300)
    # OD scale is elementwise <= eta and its grads have the right shapes
    gOD = allora_od_grads(X, A, B, G, eta)
    assert [g.shape for g in gOD] == [(N, d_in), (r, d_in), (d_out, r)]


def test_bad_input():
    rng = np.random.default_rng(0)
    X, A, B, _ = problem(rng)
    G = np.ones((7, 4))
    with pytest.raises(ValueError, match="eta"):
        allora_grads(X, A, B, G, 0.0)
    with pytest.raises(ValueError, match="eta"):
        allora_scale(A, B, -1.0)
    with pytest.raises(ValueError, match="eta"):
        adaptive_function(1.0, float("inf"))
    with pytest.raises(ValueError, match="A"):
        allora_grads(X, A.T, B, G, 1.0)
    with pytest.raises(ValueError, match="B"):
        allora_grads(X, A, B.T, G, 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        allora_grads(X, A, B, G.T, 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        allora_od_grads(X, A, B, np.full((7, 4), np.nan), 1.0)
    with pytest.raises(ValueError, match="X"):
        allora_grads(X[0], A, B, G, 1.0)
    with pytest.raises(ValueError, match="f"):
        allora_od_scale(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="f"):
        asf_output([1.0, np.nan], 1.0)
    with pytest.raises(ValueError, match="x"):
        adaptive_function("abc", 1.0)
    with pytest.raises(ValueError, match="scaling"):
        lora_grads(X, A, B, G, float("nan"))


def test_adam_cancels_eta_on_the_first_step_only():
    """ERRATA adaptive 6: under Adam a *constant* factor on the gradient cancels at every step (LoRA with its
    gradients times 2 follows LoRA's trajectory), and ALLoRA's s_i = eta at B = 0 is such a factor on the first
    step; afterwards s_i = eta / sqrt(1 + eta^2 ||(BA)_i||) varies between rows and over time: ALLoRA leaves LoRA's
    trajectory, and eta = 2 and eta = 4 give different trajectories (eta matters, but not as a learning rate)."""
    from analysis.verify.adaptive import adam_trajectories

    tr = adam_trajectories(etas=(2.0, 4.0), lr=1e-2, steps=20, seed=default_seed())
    lora, a2, a4 = tr["LoRA"], tr["ALLoRA eta=2"], tr["ALLoRA eta=4"]

    def rel(u, v):
        return np.linalg.norm(u - v) / np.linalg.norm(v)

    assert rel(a2[0], lora[0]) < 1e-6 and rel(a4[0], lora[0]) < 1e-6
    assert rel(a2[-1], lora[-1]) > 1e-3 and rel(a2[-1], a4[-1]) > 1e-3
    # the control: a constant factor on LoRA's gradient cancels under Adam at every step (eps aside)
    rng = np.random.default_rng(default_seed())
    X, Y, A0 = rng.standard_normal((16, 12)), rng.standard_normal((16, 5)), rng.standard_normal((3, 12)) / 12**0.5
    runs = []
    for factor in (1.0, 2.0):
        A = torch.tensor(A0, requires_grad=True)
        B = torch.zeros(5, 3, dtype=T64, requires_grad=True)
        opt = torch.optim.Adam([A, B], lr=1e-2)
        for _ in range(20):
            opt.zero_grad()
            (factor * ((torch.tensor(X) @ A.T @ B.T - torch.tensor(Y)) ** 2).sum()).backward()
            opt.step()
        runs.append(B.detach().numpy())
    assert rel(runs[1], runs[0]) < 1e-6

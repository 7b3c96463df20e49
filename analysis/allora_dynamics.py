"""ALLoRA's training dynamics in closed form: does it regularize like dropout (ALLoRA sec. 4.2 / 6), and does it
reduce the ripple effect (sec. 3.3 / 4.2)?

Convention (torch.nn.Linear / PEFT): X (N, d_in), Y (N, d_out), frozen W (d_out, d_in), A = lora_A (r, d_in),
B = lora_B (d_out, r), M = BA (d_out, d_in), residual R = Y - X W^T, adapter output F = X A^T B^T (N, d_out), the
loss L = ||R - s F||_F^2 (MSE, the setting of ALLoRA sec. 3.1-3.2 and of :mod:`analysis.dropout`), its gradient
w.r.t. the output G = dL/dF and w.r.t. the product g = G^T X (d_out, d_in). Velocities are gradient-flow
velocities (the small-learning-rate limit of SGD: one step at rate h moves theta by h * velocity + O(h^2)).

Derived here (each function's docstring gives its formula; tests/analysis/test_allora_dynamics.py proves them
by autograd, finite differences and exact constructions):

1. Dropout's expected flow = LoRA's flow minus the gradient of a penalty (:func:`dropout_velocity`,
   :func:`penalty_rate`): the penalty force is independent of g, so it acts even where the loss is stationary
   (g = 0) and shrinks BA there.
2. ALLoRA's flow (:func:`allora_velocity`) is *linear in g*: dB = -S g A^T, dA = -B^T S g, S = diag(s_i),
   s_i = 1/sqrt(||M_i,:|| + 1/eta^2). It therefore vanishes wherever g = 0: ALLoRA adds no penalty force at the
   loss's minimizers, unlike dropout. It splits as eta x (LoRA's flow) + a taper correction that is also linear in
   g (:func:`allora_taper_split`). Along it, dL/dt = -<S g A^T, g A^T> - <B^T g, B^T S g> (:func:`loss_rate`),
   whose second term is not of one sign when the s_i differ: ALLoRA is not a gradient flow of L in any metric.
   Because S depends on (A, B) only, the expected mini-batch step equals the full-batch step: no noise-induced
   drift at first order either.
3. ALLoRA-OD (sec. 4.3) is exactly plain LoRA (s = 1) on a reshaped loss: with the per-sample scale
   S_n,i = 1/sqrt(|F_n,i| + 1/eta^2) its parameter gradients are those of sum psi(F_n,i; R_n,i)
   (:func:`od_surrogate_loss`), psi' = -2 (r - f) / sqrt(|f| + 1/eta^2): a loss that downweights large adapter
   outputs, whose stationary points are those of a weighted least squares (an implicit reweighting, not a
   dropout-like penalty on BA).
4. The ripple through a multilinear chain (ALLoRA eq. 2) for LoRA x eta, ALLoRA and ASF-LoRA, forward and
   backward (:func:`chain_response`): LoRA x eta multiplies the forward and the input gradient by
   W_l + eta B_l A_l, ALLoRA by W_l + B_l A_l (identity output adaptor, unscaled input gradient), ASF-LoRA by
   W_l + diag(asf'(f_l)) B_l A_l with asf' in (0, eta].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from analysis import adaptive as _adaptive
from analysis import dropout as _dropout
from analysis import inputs as _validate
from analysis._masks import mask_variance

__all__ = [
    "allora_taper_split",
    "allora_velocity",
    "chain_response",
    "dropout_velocity",
    "loss_rate",
    "od_surrogate_grad",
    "od_surrogate_loss",
    "od_velocity",
    "penalty_rate",
    "product_velocity",
    "row_norm_rates",
]

CHAIN_METHODS = ("lora", "allora", "asf")


def _problem(X, Y, W, A, B):
    X, Y, W, A, B = _validate.lora_problem(X, Y, W, A, B)
    return X, Y - X @ W.T, A, B


def _output_grad(X, R, A, B, scaling: float = 1.0) -> np.ndarray:
    """dL/dF (N, d_out) for L = ||R - s F||^2 with F = X A^T B^T the unscaled adapter output: -2 s (R - s F)."""
    return -2.0 * scaling * (R - scaling * X @ A.T @ B.T)


def dropout_velocity(X, Y, W, A, B, p, *, placement="bottleneck", scaling=1.0):
    """(dA, dB) = -grad E[L] for dropout rate p (p = 0: plain LoRA's flow) (ALLoRA sec. 3.2, corrected).

    E[L] = L_0 + P with P = :func:`analysis.dropout.dropout_penalty`; so -grad E[L] = -grad L_0 - grad P: LoRA's
    flow plus a force -grad P that does not depend on the loss gradient g. At B = 0 (bottleneck) the force on A
    is 0 and the one on B is -2 v s^2 B diag(||X a_k||^2) = 0 too; it grows with BA.
    """
    gA, gB = _dropout.expected_loss_grad(X, Y, W, A, B, p, placement=placement, scaling=scaling)
    return -gA, -gB


def allora_velocity(X, Y, W, A, B, eta):
    """ALLoRA's flow (dA, dB) on L = ||R - X A^T B^T||^2 (ALLoRA sec. 4.2, listing 1; no scaling, no dropout).

    With G = -2 (R - X A^T B^T), g = G^T X and S = diag(s), s_i = 1/sqrt(||(BA)_i,:|| + 1/eta^2)
    (:func:`analysis.adaptive.allora_scale`):  dB = -S g A^T,  dA = -B^T S g.
    Linear in g: zero wherever g = 0, whatever (A, B) -- no penalty force (contrast :func:`dropout_velocity`).
    """
    X, R, A, B = _problem(X, Y, W, A, B)
    _, gA, gB = _adaptive.allora_grads(X, A, B, _output_grad(X, R, A, B), eta)
    return -gA, -gB


def od_velocity(X, Y, W, A, B, eta):
    """ALLoRA-OD's flow (dA, dB) on L = ||R - F||^2, F = X A^T B^T (ALLoRA sec. 4.3).

    G~ = S o G with S_n,i = 1/sqrt(|F_n,i| + 1/eta^2): dB = -G~^T X A^T, dA = -B^T G~^T X. Equals -grad of
    :func:`od_surrogate_loss` (plain LoRA on the reshaped loss psi).
    """
    X, R, A, B = _problem(X, Y, W, A, B)
    _, gA, gB = _adaptive.allora_od_grads(X, A, B, _output_grad(X, R, A, B), eta)
    return -gA, -gB


def allora_taper_split(X, Y, W, A, B, eta):
    """ALLoRA's flow = eta x (LoRA's flow at scaling 1) + taper, both linear in g (returns the two as
    ((dA_lora_eta, dB_lora_eta), (dA_taper, dB_taper))).

    With D = eta I - S = diag(eta - s_i) >= 0:  taper_B = D g A^T,  taper_A = B^T D g. It vanishes on rows with
    (BA)_i,: = 0 (s_i = eta) and opposes the LoRA step on large rows: ALLoRA is LoRA at rate eta with row-wise
    brakes proportional to the loss gradient, not a weight decay.
    """
    X, R, A, B = _problem(X, Y, W, A, B)
    eta = _validate.finite_scalar("eta", eta, positive=True)
    g = _output_grad(X, R, A, B).T @ X
    D = eta - _adaptive.allora_scale(A, B, eta)
    return (-eta * (B.T @ g), -eta * (g @ A.T)), (B.T @ (D[:, None] * g), (D[:, None] * g) @ A.T)


def product_velocity(A, B, dA, dB) -> np.ndarray:
    """d(BA)/dt = dB A + B dA (d_out, d_in) for a flow (dA, dB) of the factors."""
    A = _validate.as_matrix("A", A)
    B = _validate.as_matrix("B", B, (None, A.shape[0]))
    dA = _validate.as_matrix("dA", dA, A.shape)
    dB = _validate.as_matrix("dB", dB, B.shape)
    return dB @ A + B @ dA


def row_norm_rates(A, B, dA, dB) -> np.ndarray:
    """d||(BA)_i,:||/dt (d_out,) along (dA, dB): <M_i, dM_i> / ||M_i|| with M = BA, dM = :func:`product_velocity`;
    for a zero row the right derivative ||dM_i|| (the rate of escape from 0)."""
    M = _validate.as_matrix("B", B) @ _validate.as_matrix("A", A)
    dM = product_velocity(A, B, dA, dB)
    norms = np.linalg.norm(M, axis=1)
    out = np.linalg.norm(dM, axis=1)
    nz = norms > 0
    out[nz] = (M[nz] * dM[nz]).sum(axis=1) / norms[nz]
    return out


def loss_rate(X, Y, W, A, B, dA, dB, *, scaling=1.0) -> float:
    """dL/dt along (dA, dB) for L = ||R - s X A^T B^T||^2: <grad_A L, dA> + <grad_B L, dB>.

    For ALLoRA's flow this is -<S g A^T, g A^T> - <B^T g, B^T S g>: the first term is <= 0, the second is not of
    one sign when the s_i differ (B^T S g is not a positive multiple of B^T g), so L can rise along the flow.
    """
    X, R, A, B = _problem(X, Y, W, A, B)
    dA = _validate.as_matrix("dA", dA, A.shape)
    dB = _validate.as_matrix("dB", dB, B.shape)
    s = _validate.finite_scalar("scaling", scaling)
    g = _output_grad(X, R, A, B, s).T @ X  # dL/d(BA)
    return float((B.T @ g * dA).sum() + (g @ A.T * dB).sum())


def penalty_rate(X, A, B, dA, dB, p, *, placement="bottleneck", scaling=1.0) -> float:
    """d/dt of dropout's expected penalty P (:func:`analysis.dropout.dropout_penalty`) along (dA, dB).

    Bottleneck: grad_B P = 2 v s^2 B diag(||X a_k||^2), grad_A P = 2 v s^2 diag(||b_k||^2) A X^T X.
    Input: grad_M P = 2 v s^2 (BA) diag(D), D_j = sum_n X_nj^2, and dP/dt = <grad_M P, dB A + B dA>.
    Evaluated on another method's flow (ALLoRA's, LoRA's) it says whether that flow lowers the penalty that
    dropout would charge: the "effective penalty" of sec. 4.2's hypothesis.
    """
    X = _validate.as_matrix("X", X)
    A = _validate.as_matrix("A", A, (None, X.shape[1]))
    B = _validate.as_matrix("B", B, (None, A.shape[0]))
    dA = _validate.as_matrix("dA", dA, A.shape)
    dB = _validate.as_matrix("dB", dB, B.shape)
    v = mask_variance(_validate.dropout_rate(p))
    placement = _validate.placement(placement)
    s = _validate.finite_scalar("scaling", scaling)
    if placement == "bottleneck":
        gB = 2 * v * s**2 * B * ((X @ A.T) ** 2).sum(axis=0)
        gA = 2 * v * s**2 * ((B**2).sum(axis=0)[:, None] * A) @ (X.T @ X)
        return float((gA * dA).sum() + (gB * dB).sum())
    gM = 2 * v * s**2 * (B @ A) * (X**2).sum(axis=0)
    return float((gM * product_velocity(A, B, dA, dB)).sum())


def od_surrogate_grad(F, R, eta) -> np.ndarray:
    """psi'(F; R) = -2 (R - F) / sqrt(|F| + 1/eta^2), elementwise: ALLoRA-OD's scaled output gradient S o G."""
    F = _validate.as_matrix("F", F)
    R = _validate.as_matrix("R", R, F.shape)
    c = 1.0 / _validate.finite_scalar("eta", eta, positive=True) ** 2
    return -2.0 * (R - F) / np.sqrt(np.abs(F) + c)


def od_surrogate_loss(F, R, eta) -> float:
    """sum_n,i psi(F_n,i; R_n,i), psi(f; r) = int_0^f -2 (r - u) / sqrt(|u| + c) du, c = 1/eta^2 (ALLoRA sec. 4.3).

    Closed form, w = |f| + c:  f >= 0: psi = -4 (r + c)(sqrt(w) - sqrt(c)) + 4/3 (w^1.5 - c^1.5);
                               f <  0: psi =  4 (r - c)(sqrt(w) - sqrt(c)) + 4/3 (w^1.5 - c^1.5).
    Theorem (tested by autograd): ALLoRA-OD's parameter gradients for L = ||R - F||^2, F = X A^T B^T, are exactly
    plain LoRA's (scaling 1) gradients of sum psi(X A^T B^T; R): ALLoRA-OD is LoRA on a reshaped loss, which
    grows like |f|^{3/2} instead of f^2 (large outputs are damped) and whose stationary points are those of the
    weighted least squares sum_n s(F_n,i) (R_n,i - F_n,i) x_n = 0.
    """
    F = _validate.as_matrix("F", F)
    R = _validate.as_matrix("R", R, F.shape)
    c = 1.0 / _validate.finite_scalar("eta", eta, positive=True) ** 2
    w = np.abs(F) + c
    root = np.sqrt(w) - math.sqrt(c)
    cube = (4.0 / 3.0) * (w**1.5 - c**1.5)
    psi = np.where(F >= 0, -4.0 * (R + c) * root, 4.0 * (R - c) * root) + cube
    return float(psi.sum())


def chain_response(Ws: Sequence, As: Sequence, Bs: Sequence, x, grad_out, method: str, eta: float) -> dict:
    """Forward and backward of the multilinear chain (ALLoRA eq. 2) with adapters of one method.

    h_0 = x, z_l = A_l h_{l-1}, f_l = B_l z_l, h_l = W_l h_{l-1} + o_l with the adapter output
        lora   (LoRA x eta): o_l = eta f_l;      allora: o_l = f_l;      asf: o_l = f_l / sqrt(|f_l| + 1/eta^2).
    Backward from delta_L = grad_out (dL/dh_L), with u_l the adapted output gradient
        lora: u_l = eta delta_l;   allora: u_l = s_l o delta_l (s_l = allora_scale(A_l, B_l, eta));
        asf: u_l = asf'(f_l) o delta_l (:func:`analysis.adaptive.asf_derivative`, in (0, eta]);
        grad_B_l = u_l z_l^T, grad_A_l = B_l^T u_l h_{l-1}^T, delta_{l-1} = W_l^T delta_l + A_l^T B_l^T v_l,
    with v_l = u_l for lora and asf (the true input gradient) and v_l = delta_l for allora (sec. 4.2: the input
    gradient is not rescaled, so it is the true gradient of the unscaled forward).
    Returns ``forward`` (L,) ||h_l||, ``input_grad`` (L,) ||delta_{l-1}|| (index l-1 for layer l), ``grad_A``,
    ``grad_B`` (L,) Frobenius norms of the parameter gradients. Shapes: W_l (d_l, d_{l-1}), A_l (r_l, d_{l-1}),
    B_l (d_l, r_l), x (d_0,), grad_out (d_L,).
    """
    if method not in CHAIN_METHODS:
        raise ValueError(f"method must be one of {CHAIN_METHODS}, got {method!r}")
    eta = _validate.finite_scalar("eta", eta, positive=True)
    Ws, As, Bs = list(Ws), list(As), list(Bs)
    L = len(Ws)
    if L < 1 or len(As) != L or len(Bs) != L:
        raise ValueError(f"Ws, As, Bs must have one matrix per layer (>= 1): got {len(Ws)}, {len(As)}, {len(Bs)}")
    Wv, Av, Bv = [], [], []
    d_prev = None
    for l in range(L):
        W = _validate.as_matrix(f"Ws[{l}]", Ws[l], (None, d_prev))
        A = _validate.as_matrix(f"As[{l}]", As[l], (None, W.shape[1]))
        Bv.append(_validate.as_matrix(f"Bs[{l}]", Bs[l], (W.shape[0], A.shape[0])))
        Wv.append(W)
        Av.append(A)
        d_prev = W.shape[0]
    h = _validate.as_vector("x", x, Wv[0].shape[1])
    delta = _validate.as_vector("grad_out", grad_out, Wv[-1].shape[0])
    hs, zs, fs = [h], [], []
    for W, A, B in zip(Wv, Av, Bv, strict=True):
        z = A @ h
        f = B @ z
        o = eta * f if method == "lora" else f if method == "allora" else _adaptive.asf_output(f, eta)
        h = W @ h + o
        zs.append(z)
        fs.append(f)
        hs.append(h)
    forward = np.array([np.linalg.norm(v) for v in hs[1:]])
    in_grad, g_A, g_B = np.empty(L), np.empty(L), np.empty(L)
    for l in range(L - 1, -1, -1):
        W, A, B, z, f, h_prev = Wv[l], Av[l], Bv[l], zs[l], fs[l], hs[l]
        if method == "lora":
            u = eta * delta
            v = u
        elif method == "allora":
            u = _adaptive.allora_scale(A, B, eta) * delta
            v = delta
        else:
            u = _adaptive.asf_derivative(f, eta) * delta
            v = u
        g_B[l] = np.linalg.norm(np.outer(u, z))
        g_A[l] = np.linalg.norm(np.outer(B.T @ u, h_prev))
        delta = W.T @ delta + A.T @ (B.T @ v)
        in_grad[l] = np.linalg.norm(delta)
    return {"forward": forward, "input_grad": in_grad, "grad_A": g_A, "grad_B": g_B}

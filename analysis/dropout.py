"""Dropout in LoRA is a regularizer only in expectation (ALLoRA sec. 3.1-3.2, app. A), exactly.

Setting (our convention, torch.nn.Linear / PEFT shapes): X (N, d_in), Y (N, d_out), frozen W (d_out, d_in),
A = lora_A (r, d_in), B = lora_B (d_out, r), adapter scaling s (``scaling``, 1 in the paper), residual
R = Y - X W^T, dropout rate p (probability of zeroing), keep probability q = 1 - p (the paper's lambda),
mask variance v = p / q (the paper's 1/lambda - 1). One realisation of the loss is

    L = ||R - s ((X A^T) o M) B^T||_F^2,   M in {0, 1/q}^(N x r)          placement="bottleneck" (ALLoRA eq. 1)
    L = ||R - s ((X o M) A^T) B^T||_F^2,   M in {0, 1/q}^(N x d_in)       placement="input" (PEFT, original LoRA)

The paper writes the bottleneck case as ||Y - XW - ((XA) o V) B||_F^2 with its A = our A^T (D x R) and its B =
our B^T (R x C). PEFT and the original LoRA code put dropout on the adapter's input instead; both are here.

Closed forms (H = X A^T (N, r), BA the adapter's weight (d_out, d_in), D_j = sum_n X_nj^2):

    E[L] = ||R - s H B^T||^2 + v s^2 sum_k ||H_:k||^2 ||B_:k||^2          (bottleneck)
    E[L] = ||R - s X (BA)^T||^2 + v s^2 sum_j D_j ||(BA)_:j||^2             (input)

The first is the paper's display after eq. 1; its gradients are the paper's sec. 3.2 display **times 2**, with
the norms of the *columns* of XA (the paper prints rows): see ERRATA.md. Var[L] and the per-entry mean and
variance of the gradient of one realisation are exact too: each is, per sample, a polynomial of degree <= 2
in that sample's mask (see :mod:`analysis._masks`), and samples carry independent masks.
"""

from __future__ import annotations

import math

import numpy as np

from analysis import inputs as _validate
from analysis._masks import (
    mask_variance,
    pivot_form_moments,
    residual_norm_moments,
)

__all__ = [
    "expected_loss",
    "expected_loss_grad",
    "loss_variance",
    "sample_loss",
    "grad_moments",
    "deviation_bound",
    "deviation_clt",
    "two_point_deviation_ratio",
    "dropout_penalty",
    "penalty_strengths",
    "linear_expected_loss",
    "linear_minimizer",
    "ridge_minimizer",
    "ridge_lambda",
    "printed_linear_minimizer",
]

# Samples per chunk in the per-sample closed forms: bounds memory to O(chunk * d_out * max(r, d_in)).
_CHUNK = 256


def _problem(X, Y, W, A, B, p, placement, scaling):
    X, Y, W, A, B = _validate.lora_problem(X, Y, W, A, B)
    p = _validate.dropout_rate(p)
    placement = _validate.placement(placement)
    s = _validate.finite_scalar("scaling", scaling)
    R = Y - X @ W.T
    return X, R, A, B, p, placement, s


def _columns(X, A, B, s, placement, rows: slice) -> np.ndarray:
    """C_n (n, d_out, K): column k is what mask entry k adds to sample n's output when kept (times 1)."""
    if placement == "bottleneck":
        H = X[rows] @ A.T  # (n, r)
        return s * B[None, :, :] * H[:, None, :]
    return s * (B @ A)[None, :, :] * X[rows][:, None, :]


def expected_loss(X, Y, W, A, B, p, *, placement="bottleneck", scaling=1.0) -> float:
    """Exact E[L] over dropout masks (ALLoRA display after eq. 1; ``placement="input"`` is PEFT's).

    Bottleneck: ||R - s H B^T||^2 + v s^2 sum_k ||H_:k||^2 ||B_:k||^2 with H = X A^T, v = p/(1-p).
    Input:      ||R - s X (BA)^T||^2 + v s^2 sum_j (sum_n X_nj^2) ||(BA)_:j||^2.
    """
    X, R, A, B, p, placement, s = _problem(X, Y, W, A, B, p, placement, scaling)
    fit = R - s * X @ A.T @ B.T
    return float((fit**2).sum() + dropout_penalty(X, A, B, p, placement=placement, scaling=s))


def dropout_penalty(X, A, B, p, *, placement="bottleneck", scaling=1.0) -> float:
    """The term dropout adds to the expected loss (the paper's orange term): E[L] - (dropout-free loss).

    Bottleneck: v s^2 sum_k ||X a_k||^2 ||b_k||^2 (a_k = A[k], b_k = B[:, k]); it is a weight decay on b_k of
    strength v s^2 ||X a_k||^2 and on a_k (in the X^T X metric) of strength v s^2 ||b_k||^2 (ALLoRA sec. 3.2).
    Input: v s^2 tr(BA diag(D) (BA)^T), D_j = sum_n X_nj^2: a function of the product BA only.
    """
    X = _validate.as_matrix("X", X)
    A = _validate.as_matrix("A", A, (None, X.shape[1]))
    B = _validate.as_matrix("B", B, (None, A.shape[0]))
    p = _validate.dropout_rate(p)
    placement = _validate.placement(placement)
    s = _validate.finite_scalar("scaling", scaling)
    v = mask_variance(p)
    if placement == "bottleneck":
        h_sq = ((X @ A.T) ** 2).sum(axis=0)  # ||H_:k||^2
        return float(v * s**2 * (h_sq * (B**2).sum(axis=0)).sum())
    D = (X**2).sum(axis=0)
    return float(v * s**2 * (((B @ A) ** 2).sum(axis=0) * D).sum())


def penalty_strengths(X, A, B, p, *, scaling=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel weight-decay strengths that bottleneck dropout puts on A and on B (ALLoRA sec. 3.2).

    Returns ``(on_A, on_B)``, each (r,), such that the penalty is
    sum_k on_B[k] ||b_k||^2 = sum_k on_A[k] ||X a_k||^2, with on_A[k] = v s^2 ||b_k||^2 (a decay on a_k in the
    X^T X metric) and on_B[k] = v s^2 ||X a_k||^2 (a plain weight decay on b_k).
    At B = 0 the strength on A is 0 while the one on B is v s^2 ||X a_k||^2 > 0: the "unfair" regularization.
    """
    X = _validate.as_matrix("X", X)
    A = _validate.as_matrix("A", A, (None, X.shape[1]))
    B = _validate.as_matrix("B", B, (None, A.shape[0]))
    v = mask_variance(_validate.dropout_rate(p))
    s = _validate.finite_scalar("scaling", scaling)
    return v * s**2 * (B**2).sum(axis=0), v * s**2 * ((X @ A.T) ** 2).sum(axis=0)


def expected_loss_grad(X, Y, W, A, B, p, *, placement="bottleneck", scaling=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact gradients (grad_A (r, d_in), grad_B (d_out, r)) of E[L] (ALLoRA sec. 3.2, corrected).

    Bottleneck, with E = R - s H B^T, H = X A^T, nb_k = ||B_:k||^2, nh_k = ||H_:k||^2:
        grad_B = -2 s E^T H + 2 v s^2 B diag(nh)
        grad_A = -2 s B^T E^T X + 2 v s^2 diag(nb) A X^T X
    Input, with E = R - s X (BA)^T, D_j = sum_n X_nj^2 and the gradient wrt the product
        G_M = -2 s E^T X + 2 v s^2 (BA) diag(D):   grad_B = G_M A^T, grad_A = B^T G_M.
    The paper's display lacks the factor 2 and uses rows of XA where columns are meant (ERRATA.md).
    """
    X, R, A, B, p, placement, s = _problem(X, Y, W, A, B, p, placement, scaling)
    v = mask_variance(p)
    if placement == "bottleneck":
        H = X @ A.T
        E = R - s * H @ B.T
        grad_B = -2 * s * E.T @ H + 2 * v * s**2 * B * (H**2).sum(axis=0)
        grad_A = -2 * s * B.T @ E.T @ X + 2 * v * s**2 * ((B**2).sum(axis=0)[:, None] * A) @ (X.T @ X)
        return grad_A, grad_B
    M = B @ A
    E = R - s * X @ M.T
    G_M = -2 * s * E.T @ X + 2 * v * s**2 * M * (X**2).sum(axis=0)
    return B.T @ G_M, G_M @ A.T


def loss_variance(X, Y, W, A, B, p, *, placement="bottleneck", scaling=1.0) -> float:
    """Exact Var[L] over dropout masks (not Monte Carlo); Std[L] is what ALLoRA's app. A bound needs.

    Per sample n, L_n = ||rho_n - C_n m_n||^2 is a quadratic form in the independent mask m_n; its variance is
    :func:`analysis._masks.residual_norm_moments`; Var[L] = sum_n Var[L_n].
    """
    X, R, A, B, p, placement, s = _problem(X, Y, W, A, B, p, placement, scaling)
    total = 0.0
    for start in range(0, X.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        _, var = residual_norm_moments(_columns(X, A, B, s, placement, rows), R[rows], p)
        total += float(var.sum())
    return max(total, 0.0)


def sample_loss(X, Y, W, A, B, p, n, *, placement="bottleneck", scaling=1.0, seed=0,
                max_chunk_bytes: int = 4 * 2**20) -> np.ndarray:
    """n independent realisations of L, one dropout mask each (float64, shape (n,)).

    Vectorised over realisations and chunked so that memory stays below ``max_chunk_bytes`` whatever n
    (n = 10^6 works; the 4 MiB default is also the fastest chunk here: it stays in cache). The frozen path
    X W^T and (bottleneck) H = X A^T are computed once; a chunk of c
    realisations is then one (c N, K) x (K, d_out) matmul. Masks come from ``numpy.random.default_rng(seed)``
    as float32 uniforms compared with 1 - p (the keep probability is resolved to 2^-24, far below any
    Monte-Carlo resolution). A per-sample table of the 2^r possible losses was tried and was no faster:
    drawing the N K mask entries dominates.
    """
    X, R, A, B, p, placement, s = _problem(X, Y, W, A, B, p, placement, scaling)
    n = _validate.positive_int("n", n)
    rng = np.random.default_rng(seed)
    q = 1.0 - p
    N, d_in = X.shape
    K = A.shape[0] if placement == "bottleneck" else d_in
    d_out = B.shape[0]
    base = (X @ A.T if placement == "bottleneck" else X) / q  # (N, K): kept entries, already scaled by 1/q
    right = (s * B.T) if placement == "bottleneck" else (s * (B @ A).T)  # (K, d_out)
    per_realisation = 8 * N * (K + 2 * d_out) + 5 * N * K
    chunk = max(1, min(n, max_chunk_bytes // per_realisation))
    out = np.empty(n)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        keep = rng.random((c, N, K), dtype=np.float32) < q
        masked = keep * base[None]  # (c, N, K)
        resid = R[None] - (masked.reshape(c * N, K) @ right).reshape(c, N, d_out)
        out[start:start + c] = np.einsum("cnd,cnd->c", resid, resid)
    return out


def grad_moments(X, Y, W, A, B, p, *, placement="bottleneck", scaling=1.0):
    """Exact per-entry mean and variance of the gradient of ONE realisation of L (theory of ALLoRA fig. 2).

    Returns ``(mean_A, var_A, mean_B, var_B)`` with the shapes of A and B. Each entry of the gradient is, per
    sample, a mask entry times an affine function of the mask (bottleneck and grad_A under input dropout:
    :func:`analysis._masks.pivot_form_moments`) or a product of two affine functions (grad_B under input
    dropout: :func:`_product_form_moments`); samples are independent, so means and variances add.
    ``mean_A, mean_B`` equal :func:`expected_loss_grad` (differentiation and expectation commute).
    """
    X, R, A, B, p, placement, s = _problem(X, Y, W, A, B, p, placement, scaling)
    r, d_in = A.shape
    mean_A, var_A = np.zeros_like(A), np.zeros_like(A)
    mean_B, var_B = np.zeros_like(B), np.zeros_like(B)
    P = B.T @ B  # (r, r)
    M = B @ A  # (d_out, d_in)
    for start in range(0, X.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        Xc, Rc = X[rows], R[rows]
        U = Rc @ B  # (n, r): u_n = B^T rho_n
        if placement == "bottleneck":
            H = Xc @ A.T  # (n, r)
            # d L / d B_ck = m_k (-2 s rho_c h_k + sum_l 2 s^2 h_k h_l B_cl m_l)
            beta = -2 * s * Rc[:, :, None] * H[:, None, :]
            g_piv = 2 * s**2 * B[None] * H[:, None, :] ** 2
            g_sum = 2 * s**2 * (H @ B.T)[:, :, None] * H[:, None, :]
            g_sq = 4 * s**4 * H[:, None, :] ** 2 * ((H**2) @ (B**2).T)[:, :, None]
            mb, vb = pivot_form_moments(beta, g_piv, g_piv, g_sum, g_sq, p)
            mean_B += mb.sum(axis=0)
            var_B += vb.sum(axis=0)
            # d L / d A_kj = x_j m_k (-2 s u_k + sum_l 2 s^2 P_kl h_l m_l)
            beta_a = -2 * s * U
            a_piv = 2 * s**2 * np.diag(P)[None, :] * H
            a_sum = 2 * s**2 * H @ P.T
            a_sq = 4 * s**4 * (H**2) @ (P**2).T
            mq, vq = pivot_form_moments(beta_a, a_piv, a_piv, a_sum, a_sq, p)
            mean_A += mq.T @ Xc
            var_A += vq.T @ (Xc**2)
        else:
            Pp = B.T @ M  # (r, d_in) = B^T B A
            # d L / d A_kj = m_j (-2 s u_k x_j + sum_i 2 s^2 x_j Pp_ki x_i m_i)
            beta_a = -2 * s * U[:, :, None] * Xc[:, None, :]
            a_piv = 2 * s**2 * Pp[None] * Xc[:, None, :] ** 2
            a_sum = 2 * s**2 * (Xc @ Pp.T)[:, :, None] * Xc[:, None, :]
            a_sq = 4 * s**4 * ((Xc**2) @ (Pp**2).T)[:, :, None] * Xc[:, None, :] ** 2
            ma, va = pivot_form_moments(beta_a, a_piv, a_piv, a_sum, a_sq, p)
            mean_A += ma.sum(axis=0)
            var_A += va.sum(axis=0)
            # d L / d B_ck = (-2 s rho_c + sum_j 2 s^2 M_cj x_j m_j)(sum_i A_ki x_i m_i)
            mb, vb = _product_form_moments(-2 * s * Rc, 2 * s**2 * M, A, Xc, p)
            mean_B += mb.sum(axis=0)
            var_B += vb.sum(axis=0)
    return mean_A, np.maximum(var_A, 0.0), mean_B, np.maximum(var_B, 0.0)


def _product_form_moments(beta, Phi, Psi, Xc, p):
    """Moments of g_nck = (beta_nc + sum_j Phi_cj x_nj m_nj)(sum_i Psi_ki x_ni m_ni), per (n, c, k).

    With phi_j = Phi_cj x_nj, psi_i = Psi_ki x_ni (so G = (psi phi^T + phi psi^T) / 2, a = beta psi):
        mean = (beta + S_phi) S_psi + v sum_i psi_i phi_i
        d_i  = psi_i (beta + S_phi) + phi_i S_psi + kappa psi_i phi_i,  kappa = 1/q - 2
        var  = v sum_i d_i^2 + v^2 (|psi|^2 |phi|^2 + (psi.phi)^2 - 2 sum_i psi_i^2 phi_i^2).
    All sums over i are einsum contractions, so nothing of size (n, c, k, d_in) is materialised.
    """
    q, v = 1.0 - p, mask_variance(p)
    kappa = 1.0 / q - 2.0

    def contract(phi_pow: int, psi_pow: int, x_pow: int) -> np.ndarray:
        return np.einsum("ni,ci,ki->nck", Xc**x_pow, Phi**phi_pow, Psi**psi_pow, optimize=True)

    S_phi = (Xc @ Phi.T)[:, :, None]  # (n, c, 1)
    S_psi = (Xc @ Psi.T)[:, None, :]  # (n, 1, k)
    psi_phi = contract(1, 1, 2)
    psi2 = ((Xc**2) @ (Psi**2).T)[:, None, :]
    phi2 = ((Xc**2) @ (Phi**2).T)[:, :, None]
    psi2_phi2 = contract(2, 2, 4)
    psi2_phi = contract(1, 2, 3)
    psi_phi2 = contract(2, 1, 3)
    lead = beta[:, :, None] + S_phi
    mean = lead * S_psi + v * psi_phi
    sum_d2 = (lead**2 * psi2 + S_psi**2 * phi2 + kappa**2 * psi2_phi2 + 2 * lead * S_psi * psi_phi
              + 2 * kappa * lead * psi2_phi + 2 * kappa * S_psi * psi_phi2)
    var = v * sum_d2 + v**2 * (psi2 * phi2 + psi_phi**2 - 2 * psi2_phi2)
    return mean, var


def deviation_bound(std, n):
    """ALLoRA app. A: E|mean of n realisations - E[L]| <= Std[L] / sqrt(n) (Jensen; holds for every n)."""
    std = np.asarray(std, dtype=np.float64)
    if np.any(~np.isfinite(std)) or np.any(std < 0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    n_arr = np.asarray(n)
    if np.any(n_arr < 1) or not np.issubdtype(n_arr.dtype, np.number):
        raise ValueError(f"n must be >= 1, got {n}")
    return std / np.sqrt(n_arr)


def deviation_clt(std, n):
    """Large-n value of E|mean of n realisations - E[L]|: sqrt(2/pi) Std[L] / sqrt(n) (CLT, E|Z| = sqrt(2/pi)).

    The app. A bound is therefore asymptotically loose by the factor sqrt(pi/2) ~ 1.25 for every law with finite
    variance; at n = 1 it is attained by a symmetric two-point law (:func:`two_point_deviation_ratio`).
    """
    return math.sqrt(2.0 / math.pi) * deviation_bound(std, n)


def two_point_deviation_ratio(n):
    """Exact E|mean of n realisations - mean| / (Std / sqrt(n)) for a symmetric two-point law (L = mu +- sigma).

    With S_n a sum of n independent signs, E|S_n| = 2m C(2m, m) / 4^m for n = 2m and E|S_{2m+1}| = E|S_{2m+2}|;
    the ratio is E|S_n| / sqrt(n): exactly 1 at n = 1 (the app. A bound Std / sqrt(n) is attained; at n = 1
    equality in Jensen holds iff |L - E L| is constant, i.e. for a symmetric two-point law), 1/sqrt(2) at n = 2,
    and it tends to sqrt(2/pi) (the CLT, :func:`deviation_clt`) as n grows. ``n``: int >= 1 or an array of them.
    """
    n_arr = np.asarray(n)
    if (n_arr.size == 0 or not np.issubdtype(n_arr.dtype, np.integer) or np.any(n_arr < 1)):
        raise ValueError(f"n must be an integer >= 1 (or an array of them), got {n!r}")
    m = (n_arr + 1) // 2  # E|S_{2m-1}| = E|S_{2m}| = 2m C(2m, m) / 4^m
    from scipy.special import gammaln

    log_e_abs = np.log(2.0 * m) + gammaln(2 * m + 1) - 2 * gammaln(m + 1) - 2 * m * math.log(2.0)
    ratio = np.exp(log_e_abs) / np.sqrt(n_arr)
    return float(ratio) if np.ndim(ratio) == 0 else ratio


# --- Linear dropout regression (ALLoRA sec. 3.1, "Linear model with full training") -------------------------

def _linear_problem(X, Y, W=None):
    X = _validate.as_matrix("X", X)
    Y = _validate.as_matrix("Y", Y, (X.shape[0], None))
    if W is not None:
        W = _validate.as_matrix("W", W, (Y.shape[1], X.shape[1]))
    return X, Y, W


def linear_expected_loss(X, Y, W, p) -> float:
    """E ||Y - (X W^T) o M||^2 = ||Y - X W^T||^2 + v ||X W^T||^2, M iid in {0, 1/q} (mask on the predictions)."""
    X, Y, W = _linear_problem(X, Y, W)
    v = mask_variance(_validate.dropout_rate(p))
    P = X @ W.T
    return float(((Y - P) ** 2).sum() + v * (P**2).sum())


def linear_minimizer(X, Y, p) -> np.ndarray:
    """Minimiser W* (d_out, d_in) of the expected linear dropout loss: (1 - p) times the OLS solution.

    Setting the gradient -2 X^T (Y - X W^T) + 2 v X^T X W^T to 0 gives (1 + v) X^T X W^T = X^T Y, i.e.
    W*^T = q (X^T X)^{-1} X^T Y with q = 1 - p, for any X of full column rank (whitened or not). The paper
    prints "W = p (X^T X)^{-1} Y^T X", with p its keep probability and the transpose wrong (ERRATA.md).
    """
    X, Y, _ = _linear_problem(X, Y)
    q = 1.0 - _validate.dropout_rate(p)
    gram = X.T @ X
    if np.linalg.matrix_rank(gram) < X.shape[1]:
        raise ValueError(f"X must have full column rank (X^T X invertible) for the minimiser to be unique; got "
                         f"rank {np.linalg.matrix_rank(gram)} < d_in = {X.shape[1]} (e.g. always-zero pixels)")
    return q * np.linalg.solve(gram, X.T @ Y).T


def printed_linear_minimizer(X, Y, keep) -> np.ndarray:
    """The minimiser as printed in ALLoRA sec. 3.1, "W = p (X^T X)^{-1} Y^T X", evaluated literally (paper shapes).

    Paper convention: X (N, D), Y (N, C), W (D, C) (prediction X W), ``keep`` = its p, the keep probability
    (V in {0, 1/p}). The product (X^T X)^{-1} (D x D) times Y^T X (C x D) is defined only when C = D: otherwise
    this raises ValueError naming Y. When C = D it returns the printed (D, C) matrix, which equals the minimiser
    keep (X^T X)^{-1} X^T Y (= ``linear_minimizer(X, Y, 1 - keep).T``) iff X^T Y is symmetric (Y^T X = X^T Y).
    For comparison only (ERRATA.md D1).
    """
    X, Y, _ = _linear_problem(X, Y)
    keep = _validate.finite_scalar("keep", keep, positive=True)
    if keep > 1.0:
        raise ValueError(f"keep is the keep probability (the paper's p in V in {{0, 1/p}}), in (0, 1], got {keep}")
    D, C = X.shape[1], Y.shape[1]
    if C != D:
        raise ValueError(f"Y has C = {C} columns but X has D = {D}: the printed product (X^T X)^{{-1}} Y^T X is "
                         f"({D} x {D}) @ ({C} x {D}), undefined unless C = D (ALLoRA sec. 3.1, ERRATA.md D1)")
    return keep * np.linalg.solve(X.T @ X, Y.T @ X)


def ridge_minimizer(X, Y, lam) -> np.ndarray:
    """Tikhonov solution W (d_out, d_in) of ||Y - X W^T||^2 + lam ||W||^2: W^T = (X^T X + lam I)^{-1} X^T Y."""
    X, Y, _ = _linear_problem(X, Y)
    lam = _validate.finite_scalar("lam", lam, nonnegative=True)
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y).T


def printed_ridge_minimizer(X, Y, lam, c=None) -> np.ndarray:
    """The Tikhonov solutions as printed in ALLoRA sec. 3.1, evaluated literally (paper shapes, X (N, D), Y (N, C)).

    ``c=None``: "(X^T X + lambda I)^{-1} Y^T X"; a number c: "c/(c + lambda) (X^T X)^{-1} Y^T X" (the whitened
    case X^T X = c I). Both carry the transposition of the printed dropout minimiser (ERRATA.md D1): Y^T X is C x D,
    so the product is undefined unless C = D (ValueError naming Y); when C = D it returns the printed (D, C) matrix,
    which equals the Tikhonov minimiser (X^T X + lambda I)^{-1} X^T Y (= ``ridge_minimizer(X, Y, lam).T``) iff
    X^T Y is symmetric. For comparison only.
    """
    X, Y, _ = _linear_problem(X, Y)
    lam = _validate.finite_scalar("lam", lam, nonnegative=True)
    D, C = X.shape[1], Y.shape[1]
    if C != D:
        raise ValueError(f"Y has C = {C} columns but X has D = {D}: the printed product (...)^{{-1}} Y^T X is "
                         f"({D} x {D}) @ ({C} x {D}), undefined unless C = D (ALLoRA sec. 3.1, ERRATA.md D1)")
    if c is None:
        return np.linalg.solve(X.T @ X + lam * np.eye(D), Y.T @ X)
    c = _validate.finite_scalar("c", c, positive=True)
    return c / (c + lam) * np.linalg.solve(X.T @ X, Y.T @ X)


def zero_b_gradient_ratio(X, Y, W, A, p, lr, steps, *, placement="bottleneck", scaling=1.0) -> np.ndarray:
    """||grad_A E[L]|| / ||grad_B E[L]|| at steps 0..``steps`` of gradient descent on E[L] from B = 0 (ALLoRA sec.
    3.2, ERRATA.md D6).

    Both factors move (A_{t+1} = A_t - lr grad_A, B likewise) from the given A and B_0 = 0 (d_out, r). At step 0 the
    ratio is exactly 0 (grad_A = 2 s X^T(...) B = 0); after one step B_1 = -lr grad_B E[L](B = 0) != 0, so grad_A is
    already nonzero, of order lr: the paper's "the effective gradient norm for A is 0 during the first few steps"
    holds at step 0 only.
    """
    X, Y, W, A, _ = _validate.lora_problem(X, Y, W, A, np.zeros((np.shape(W)[0], np.shape(A)[0])))
    lr = _validate.finite_scalar("lr", lr, positive=True)
    if not (isinstance(steps, int | np.integer) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    B = np.zeros((W.shape[0], A.shape[0]))
    out = np.empty(int(steps) + 1)
    for t in range(int(steps) + 1):
        gA, gB = expected_loss_grad(X, Y, W, A, B, p, placement=placement, scaling=scaling)
        out[t] = np.linalg.norm(gA) / np.linalg.norm(gB)
        A, B = A - lr * gA, B - lr * gB
    return out


def ridge_lambda(c, p) -> float:
    """Tikhonov strength equivalent to dropout rate p when X^T X = c I: lam = c p / (1 - p).

    Dropout shrinks OLS by q = 1 - p; ridge with X^T X = c I shrinks it by c / (c + lam); equal iff
    lam = c (1 - q) / q = c p / (1 - p). The paper states "dropout with rate p = 1/(1 + lam)" for c = 1, which
    is the *keep* probability: the rate of zeroing is lam / (1 + lam) (ERRATA.md).
    """
    c = _validate.finite_scalar("c", c, positive=True)
    p = _validate.dropout_rate(p)
    return c * p / (1.0 - p)

"""Shared exact machinery for dropout masks: enumeration and moments of polynomials in scaled Bernoulli masks.

A dropout mask entry is m = xi / q with xi ~ Bernoulli(q), q = 1 - p the keep probability (p = rate of
zeroing, as torch.nn.Dropout). Its moments: E m = 1, Var m = v = p / q, and m^2 = m / q because m takes only
the values 0 and 1/q.

Every quantity of ALLoRA sec. 3 (the loss under one mask, each entry of its gradient) is, per sample, a
polynomial of degree <= 2 in that sample's independent mask entries, g(m) = c + a.m + m^T G m (G symmetric).
Replacing m_k^2 by m_k / q makes it multilinear; in the centred variables e = m - 1 it is then

    g = g_ml(1) + sum_k d_k e_k + sum_{k<l} 2 G_kl e_k e_l,     d_k = a_k + G_kk / q + 2 sum_{l != k} G_kl,

and the monomials 1, e_k, e_k e_l are orthogonal with variances 1, v, v^2. Hence, exactly,

    E g   = g(1) + v tr G,
    Var g = v sum_k d_k^2 + v^2 sum_{k != l} 2 G_kl^2.

Samples carry independent masks, so means and variances add over samples. This module holds that identity
once (:func:`quadratic_form_moments`, :func:`residual_norm_moments`, :func:`pivot_form_moments`) and the
enumeration of all 2^k masks with exact probabilities used by the tests and ``lora-theory verify``.
"""

from __future__ import annotations

import itertools

import numpy as np


def keep_probability(p: float) -> float:
    """q = 1 - p, the probability that a mask entry is kept (the ALLoRA paper's lambda)."""
    return 1.0 - p


def mask_variance(p: float) -> float:
    """Var m = p / (1 - p) for m = Bernoulli(1 - p) / (1 - p); the paper's 1/lambda - 1."""
    return p / (1.0 - p)


def enumerate_masks(k: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """All 2^k scaled masks m in {0, 1/q}^k with their exact probabilities q^{#kept} p^{#dropped}.

    Returns ``(masks (2^k, k), probs (2^k,))``; the probabilities sum to 1. For tests on tiny sizes.
    """
    if k > 22:
        raise ValueError(f"k must be <= 22 for exact enumeration (2^k masks), got {k}")
    q = 1.0 - p
    bits = np.array(list(itertools.product((0.0, 1.0), repeat=k)), dtype=np.float64).reshape(2**k, k)
    kept = bits.sum(axis=1)
    probs = q**kept * p ** (k - kept)
    return bits / q, probs


def quadratic_form_moments(c, a, G, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of g(m) = c + a.m + m^T G m over one scaled Bernoulli mask m.

    Shapes: c (...), a (..., K), G (..., K, K) (symmetrised internally). Generic and O(K^2): the dropout
    module uses the structured versions below for realistic sizes; this one is their reference.
    """
    c = np.asarray(c, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    G = 0.5 * (G + np.swapaxes(G, -1, -2))
    q, v = 1.0 - p, mask_variance(p)
    diag = np.diagonal(G, axis1=-2, axis2=-1)
    row_sums = G.sum(axis=-1)
    g_at_one = c + a.sum(axis=-1) + row_sums.sum(axis=-1)
    mean = g_at_one + v * diag.sum(axis=-1)
    d = a + diag / q + 2.0 * (row_sums - diag)
    off = (G**2).sum(axis=(-2, -1)) - (diag**2).sum(axis=-1)
    var = v * (d**2).sum(axis=-1) + 2.0 * v**2 * off
    return mean, var


def residual_norm_moments(C, rho, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ||rho - C m||^2 for one mask m (K entries), batched over leading dims.

    C (..., D, K) holds the columns c_k that a kept entry k adds to the output, rho (..., D) the residual.
    Here G = C^T C and a = -2 C^T rho, so with e0 = rho - C 1 (the residual of the mean prediction):

        mean = ||e0||^2 + v sum_k ||c_k||^2,
        d_k  = -2 c_k.e0 + ||c_k||^2 (1/q - 2),
        var  = v sum_k d_k^2 + 2 v^2 (||C^T C||_F^2 - sum_k ||c_k||^4),

    with ||C^T C||_F = ||C C^T||_F computed on the smaller side.
    """
    C = np.asarray(C, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    q, v = 1.0 - p, mask_variance(p)
    e0 = rho - C.sum(axis=-1)
    col_sq = (C**2).sum(axis=-2)  # ||c_k||^2, (..., K)
    mean = (e0**2).sum(axis=-1) + v * col_sq.sum(axis=-1)
    d = -2.0 * np.einsum("...dk,...d->...k", C, e0) + col_sq * (1.0 / q - 2.0)
    D, K = C.shape[-2:]
    if D <= K:
        gram = C @ np.swapaxes(C, -1, -2)
    else:
        gram = np.swapaxes(C, -1, -2) @ C
    off = (gram**2).sum(axis=(-2, -1)) - (col_sq**2).sum(axis=-1)
    var = v * (d**2).sum(axis=-1) + 2.0 * v**2 * off
    return mean, var


def pivot_form_moments(beta, gamma, gamma_pivot, gamma_sum, gamma_sq_sum, p: float):
    """Moments of a "pivot" form g = m_k (beta + sum_l gamma_l m_l) in one mask, k the pivot index.

    Every gradient entry of the LoRA loss has this form: a mask entry m_k times an affine function of the
    mask (e.g. d L / d B_ck = -2 s h_k m_k (rho_c - s sum_l B_cl h_l m_l) for bottleneck dropout). Only the
    sums over l are needed, so callers pass them precomputed:

        gamma_pivot = gamma_k,  gamma_sum = sum_l gamma_l,  gamma_sq_sum = sum_l gamma_l^2.

    With G_kk = gamma_k and G_kl = gamma_l / 2 (l != k):
        mean = beta + gamma_sum + v gamma_k,
        d_k  = beta + gamma_k / q + (gamma_sum - gamma_k),   d_l = gamma_l (l != k),
        var  = v d_k^2 + (v + v^2) (gamma_sq_sum - gamma_k^2).
    ``beta`` and the gamma sums broadcast together.
    """
    q, v = 1.0 - p, mask_variance(p)
    mean = beta + gamma_sum + v * gamma_pivot
    d_pivot = beta + gamma_pivot / q + (gamma_sum - gamma_pivot)
    var = v * d_pivot**2 + (v + v**2) * (gamma_sq_sum - gamma_pivot**2)
    return mean, var

"""LoRA channels as input / output-gradient proxies, equivalent modules and LoWR rescaling (LoWR paper).

Convention (torch.nn.Linear / PEFT): X (N, d_in), A = lora_A (r, d_in), B = lora_B (d_out, r); the layer is
y = x W^T + s x A^T B^T (s = ``scaling``) and G = dL/dy (N, d_out). LoWR writes y = (W + BA) x (eq. 1, 4), i.e. s = 1.
Channel i: a_i = A[i, :] (row of lora_A, in R^{d_in}), b_i = B[:, i] (column of lora_B, in R^{d_out});
BA = sum_i b_i a_i^T (eq. 2); the significance of channel i is ||a_i|| ||b_i||, the only nonzero singular value
of b_i a_i^T.

- Prop. 3.1, eq. 5-6: grad a_i = s sum_n (b_i . g_n) x_n, grad b_i = s sum_n (a_i . x_n) g_n.
- One plain gradient-descent step A' = A - lr grad_A, B' = B - lr grad_B changes the effective weight by
  s (B'A' - BA) = -lr s grad_B A  [a_term: sum_i (a_i.x) g a_i^T, a_i in place of x]
                 - lr s B grad_A  [b_term: sum_i (b_i.g) b_i x^T, b_i in place of g]
                 + lr^2 s grad_B grad_A  [second_order].
  LoWR eq. 7-10 print "+ eta grad" (gradient ascent) and eq. 10-11 drop the second-order term (ERRATA.md).
- Prop. 4.1: (nA, B/n) has the same BA; its a_term is n^2 times, its b_term 1/n^2 times, its second-order term
  equal to the original module's (same G at the first step since the outputs agree).
- Eq. 12 / Algorithm 1 (LoWR): gamma_i = 1 + alpha (max_j ||b_j|| - ||b_i||) var_j(||a_j|| ||b_j||) (population
  variance), applied as a_i *= gamma_i, b_i /= gamma_i to channels with ||a_i|| / ||b_i|| < tau.
"""

from __future__ import annotations

import numpy as np

from analysis.inputs import as_matrix, finite_scalar, lowr_tau

__all__ = [
    "channel_norms",
    "channel_significance",
    "equivalent_modules",
    "equivalent_update_difference",
    "lowr_gamma",
    "lowr_rescale",
    "lowr_rescale_sequential",
    "one_step_update",
    "proxy_gradients",
]


def _AB(A, B):
    A = as_matrix("A", A)
    B = as_matrix("B", B, (None, A.shape[0]))
    return A, B


def _problem(A, B, X, grad_out):
    A, B = _AB(A, B)
    X = as_matrix("X", X, (None, A.shape[1]))
    G = as_matrix("grad_out", grad_out, (X.shape[0], B.shape[0]))
    return A, B, X, G


def channel_norms(A, B) -> tuple[np.ndarray, np.ndarray]:
    """(||a_i||, ||b_i||) for i = 1..r: row norms of lora_A and column norms of lora_B, each shape (r,)."""
    A, B = _AB(A, B)
    return np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0)


def channel_significance(A, B) -> np.ndarray:
    """||a_i|| ||b_i|| = sigma_max(b_i a_i^T), shape (r,) (LoWR sec. 3.1)."""
    na, nb = channel_norms(A, B)
    return na * nb


def proxy_gradients(A, B, X, grad_out, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(grad_A, grad_B) of the loss for y = x W^T + s x A^T B^T, summed over samples (LoWR eq. 5-6, Prop. 3.1).

    Row i of grad_A = s sum_n (b_i . g_n) x_n (direction of the inputs); column i of grad_B =
    s sum_n (a_i . x_n) g_n (direction of the output gradients). In matrix form grad_A = s B^T G^T X (r, d_in),
    grad_B = s G^T X A^T (d_out, r). X (N, d_in), grad_out = G = dL/dy (N, d_out).
    """
    A, B, X, G = _problem(A, B, X, grad_out)
    s = finite_scalar("scaling", scaling)
    g = G.T @ X  # dL/dW, eq. 3 summed over samples
    return s * (B.T @ g), s * (g @ A.T)


def one_step_update(A, B, X, grad_out, lr: float, scaling: float = 1.0) -> dict[str, np.ndarray]:
    """Exact change of the effective weight s (B'A' - BA) after one gradient-DESCENT step, split in three.

    A' = A - lr grad_A, B' = B - lr grad_B with the gradients of :func:`proxy_gradients`. Keys (each (d_out, d_in)):
    ``a_term`` = -lr s grad_B A = -lr s^2 sum_i (a_i.x) g a_i^T (a_i acts as the input; LoWR eq. 10, first sum),
    ``b_term`` = -lr s B grad_A = -lr s^2 sum_i (b_i.g) b_i x^T (b_i acts as the output gradient; second sum),
    ``second_order`` = lr^2 s grad_B grad_A (dropped by LoWR eq. 10-11), ``total`` = their sum = s (B'A' - BA);
    also ``A_new``, ``B_new``. LoWR eq. 7-9 write "+ eta grad" (ascent): its terms are these with lr -> -lr.
    """
    A, B, X, G = _problem(A, B, X, grad_out)
    lr = finite_scalar("lr", lr)
    s = finite_scalar("scaling", scaling)
    gA, gB = proxy_gradients(A, B, X, G, s)
    a_term = -lr * s * (gB @ A)
    b_term = -lr * s * (B @ gA)
    second = lr**2 * s * (gB @ gA)
    return {
        "a_term": a_term,
        "b_term": b_term,
        "second_order": second,
        "total": a_term + b_term + second,
        "A_new": A - lr * gA,
        "B_new": B - lr * gB,
    }


def equivalent_modules(A, B, n: float) -> tuple[np.ndarray, np.ndarray]:
    """(n A, B / n): the same product BA for any n != 0 (LoWR Prop. 4.1, proof)."""
    A, B = _AB(A, B)
    n = finite_scalar("n", n)
    if n == 0.0:
        raise ValueError("n must be nonzero (B / n)")
    return n * A, B / n


def equivalent_update_difference(A, B, X, grad_out, lr: float, n: float, scaling: float = 1.0) -> np.ndarray:
    """Exact first-step difference total(nA, B/n) - total(A, B) of the effective-weight updates (Prop. 4.1).

    Both modules have the same output, hence the same G = dL/dy, at the first step; the difference is
    (n^2 - 1) a_term + (1/n^2 - 1) b_term (the second-order terms cancel). It vanishes iff
    (n^2 - 1)(a_term - b_term / n^2) = 0, which Prop. 4.1's displayed "!=" overlooks (ERRATA.md).
    """
    base = one_step_update(A, B, X, grad_out, lr, scaling)
    An, Bn = equivalent_modules(A, B, n)
    return one_step_update(An, Bn, X, grad_out, lr, scaling)["total"] - base["total"]


def lowr_gamma(A, B, alpha: float) -> np.ndarray:
    """LoWR eq. 12: gamma_i = 1 + alpha (max_j ||b_j|| - ||b_i||) var(||a|| ||b||), shape (r,).

    var is the population variance (ddof = 0) of the r channel significances (the paper does not say which;
    ddof = 1 would multiply gamma - 1 by r/(r-1)). gamma_i >= 1, with equality for the max-||b|| channel and when
    all significances are equal (the paper says "greater than 1").
    """
    A, B = _AB(A, B)
    alpha = finite_scalar("alpha", alpha, nonnegative=True)
    na, nb = channel_norms(A, B)
    return 1.0 + alpha * (nb.max() - nb) * np.var(na * nb)


def _ratios(na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """||a_i|| / ||b_i||, with inf where b_i = 0 (such channels are never rescaled)."""
    out = np.full(na.shape, np.inf)
    np.divide(na, nb, out=out, where=nb > 0)
    return out


def lowr_rescale(A, B, *, tau: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """LoWR Algorithm 1, lines 3-10 (one rescaling pass), applied to all channels at once.

    Channels with ||a_i|| / ||b_i|| < tau (tau may be inf; b_i = 0 gives ratio inf, left alone) get
    a_i <- gamma_i a_i, b_i <- b_i / gamma_i with gamma_i from :func:`lowr_gamma`. B'A' = BA up to rounding;
    every ||a_i|| ||b_i|| (hence the variance) is kept and the max-||b|| channel has gamma = 1, so this equals the
    paper's sequential in-place loop (:func:`lowr_rescale_sequential`). Returns new arrays (A', B').
    """
    A, B = _AB(A, B)
    tau = lowr_tau(tau)
    gamma = lowr_gamma(A, B, alpha)
    na, nb = channel_norms(A, B)
    g = np.where(_ratios(na, nb) < tau, gamma, 1.0)
    return A * g[:, None], B / g[None, :]


def lowr_rescale_sequential(A, B, *, tau: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1, lines 3-10, literally: loop over i, recomputing max ||b|| and var(||a|| ||b||) from the
    current (partly rescaled) A, B before each channel. Reference for :func:`lowr_rescale`."""
    A, B = _AB(A, B)
    tau = lowr_tau(tau)
    alpha = finite_scalar("alpha", alpha, nonnegative=True)
    A, B = A.copy(), B.copy()
    for i in range(A.shape[0]):
        na, nb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0)
        if _ratios(na[i : i + 1], nb[i : i + 1])[0] < tau:
            ratio = alpha * (nb.max() - nb[i]) * np.var(na * nb)  # the paper reuses the name r here
            gamma = 1.0 + ratio
            A[i] *= gamma
            B[:, i] /= gamma
    return A, B

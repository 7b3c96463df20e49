"""The papers' quantities of one adapted layer, from its A, B and scaling (and W, and captured inputs).

Convention (torch.nn.Linear / PEFT): A = lora_A (r, d_in), B = lora_B (d_out, r), scaling s, update
Delta = s B A (d_out, d_in), frozen W (d_out, d_in), inputs X (N, d_in). All numbers float64, via the public
functions of :mod:`analysis` where it has them.

- Norms: ||A||_F, ||B||_F, ||s B A||_F; the singular values sigma of s B A (at most r nonzero) from the
  r x r core of the QR factors (B = Q_B R_B, A^T = Q_A R_A, B A = Q_B (R_B R_A^T) Q_A^T), so no d_out x d_in SVD.
  Stable rank ||BA||_F^2 / ||BA||_2^2; effective rank exp(H(p)), p_i = sigma_i / sum_j sigma_j (Roy & Vetterli
  2007); both 0 for BA = 0.
- rsLoRA (Thm. 3.2, :mod:`analysis.rank_scaling`): gamma_r sqrt(r) = s sqrt(r) (= alpha under rsLoRA, the constant
  its theorem keeps Theta(1)); the ratio of the terms eq. (11) drops to the r^2 term it keeps in the input-gradient
  second moment, (d_in + 1 + kappa) / r with kappa = -1.2 (PEFT's Kaiming-uniform A), from
  ``rank_scaling.dropped_term_ratio``; regime "large_rank" (ratio <= 0.1: the theorem applies), "small_rank"
  (ratio >= 10: second moments scale like gamma^4 r d, i.e. r^-1 under rsLoRA) or "intermediate"; and the exponent
  of r in that second moment at fixed alpha (``rank_scaling.moment_exponents``).
- ALLoRA (sec. 4.2, ``adaptive.adaptive_function``): ALLoRA has no scaling factor; the PEFT layer computes the
  same function as ALLoRA's adapter with B' = s B, so the row norms are those of the update, ||(s B A)_i,:||, and
  the factor is 1 / sqrt(||(s B A)_i,:|| + 1/eta^2) (<= eta). Row norms come from the r x r Gram A A^T.
  ``fraction_rows_escaped``: the rows with ||(s B A)_i,:|| >= 1/eta^2, whose factor has fallen to <= eta/sqrt(2).
- LoWR (sec. 3.1, eq. 12, ``channels``): significance ||a_i|| ||b_i|| of the stored parameters (LoWR rescales
  parameters, so s does not enter), its spread (max/min, coefficient of variation), Pearson correlations with
  ||b_i|| and ||a_i||, and the gamma_i Algorithm 1 would apply (1 where ||a_i|| / ||b_i|| >= tau or b_i = 0).
- With W: m = ||s B A||_2 / ||W||_2 (``ripple.layer_ratios``, ALLoRA sec. 3.3) and the intruder dimensions of
  W + s B A (Shuttleworth et al. 2024, arXiv 2410.21228, as PEFT's ``reduce_intruder_dimension``: among the top-k
  left singular vectors of W + s B A, those whose largest |cosine| with any left singular vector of W is below
  epsilon), abstaining where W's spectrum is flat (see :func:`base_quantities`). Cost: two SVDs of a
  d_out x d_in matrix per layer (seconds at d = 4096).
- With inputs X: the exact expected loss of one dropout realisation at PEFT's placement ("input": the mask is on
  x before lora_A) with the layer's own dropout-free output as target, Y = X W^T + s X (BA)^T, so that
  E[L] = the dropout penalty v s^2 sum_j D_j ||(BA)_:j||^2 (``dropout.expected_loss``, ALLoRA sec. 3.1), its
  exact Std over masks (``dropout.loss_variance``) and n* = ceil(Var / E[L]^2), the fewest realisations
  (training steps on this batch) for which the Monte-Carlo noise Std / sqrt(n) of ALLoRA app. A
  (``dropout.deviation_bound``) falls below the penalty itself.
"""

from __future__ import annotations

import math

import numpy as np

from analysis import adaptive, channels, dropout, rank_scaling

__all__ = [
    "PEFT_A_EXCESS_KURTOSIS",
    "update_ratio",
    "intruder_cluster_size",
    "adapter_quantities",
    "base_quantities",
    "calibration_quantities",
    "effective_rank",
    "update_singular_values",
]

#: Excess kurtosis of PEFT's default lora_A init (Kaiming uniform): a uniform law has -6/5.
PEFT_A_EXCESS_KURTOSIS = -1.2
LARGE_RANK_RATIO, SMALL_RANK_RATIO = 0.1, 10.0


def update_singular_values(A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """Singular values of s B A (descending, length min(r, d_in, d_out)) from the small QR core."""
    _, Rb = np.linalg.qr(B)  # (k, r)
    _, Ra = np.linalg.qr(A.T)  # (k', r)
    return abs(scaling) * np.linalg.svd(Rb @ Ra.T, compute_uv=False)


def effective_rank(sigma: np.ndarray) -> float:
    """exp(-sum p_i log p_i), p_i = sigma_i / sum sigma (Roy & Vetterli 2007); 0 for the zero matrix."""
    total = float(sigma.sum())
    if total <= 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _summary(x: np.ndarray) -> dict:
    return {"min": float(x.min()), "median": float(np.median(x)), "mean": float(x.mean()), "max": float(x.max())}


def adapter_quantities(A, B, scaling: float, *, use_rslora: bool, eta: float = 2.0, lowr_alpha: float = 1.0,
                       lowr_tau: float = math.inf) -> dict:
    """Every adapter-only quantity of one layer (see the module docstring); arrays are numpy, the rest floats."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    s = float(scaling)
    r, d_in = A.shape
    d_out = B.shape[0]
    sigma = update_singular_values(A, B, s)
    norm_BA = float(np.sqrt((sigma**2).sum()))
    spec = float(sigma[0]) if sigma.size else 0.0
    # rsLoRA: the input-gradient ratio depends only on d and r (x0, x are placeholders of the right length)
    ones = np.ones(d_in)
    ratio = rank_scaling.dropped_term_ratio(ones, ones, r=r, excess_kurtosis=PEFT_A_EXCESS_KURTOSIS)["second_grad_in"]
    regime = "large_rank" if ratio <= LARGE_RANK_RATIO else "small_rank" if ratio >= SMALL_RANK_RATIO else "intermediate"
    beta = 0.5 if use_rslora else 1.0
    exponent = None if regime == "intermediate" else rank_scaling.moment_exponents(beta, regime)[1]
    # ALLoRA: rows of s B A via the Gram matrix of A
    gram = A @ A.T
    sB = s * B
    row_norms = np.sqrt(np.maximum(np.einsum("ik,kl,il->i", sB, gram, sB), 0.0))
    factors = adaptive.adaptive_function(row_norms, eta)
    # LoWR
    na, nb = channels.channel_norms(A, B)
    sig = channels.channel_significance(A, B)
    gamma = channels.lowr_gamma(A, B, lowr_alpha)
    ratio_ab = np.full(r, np.inf)
    np.divide(na, nb, out=ratio_ab, where=nb > 0)
    gamma = np.where(ratio_ab < lowr_tau, gamma, 1.0)
    return {
        "r": int(r), "d_in": int(d_in), "d_out": int(d_out), "scaling": s,
        "norm_A": float(np.linalg.norm(A)), "norm_B": float(np.linalg.norm(B)), "norm_BA": norm_BA,
        "spectral_norm_BA": spec, "singular_values": sigma,
        "stable_rank": norm_BA**2 / spec**2 if spec > 0 else 0.0, "effective_rank": effective_rank(sigma),
        "b_exactly_zero": bool(not np.any(B)),
        "rslora": {"gamma_sqrt_r": s * math.sqrt(r), "dropped_term_ratio": float(ratio), "regime": regime,
                   "scaling_exponent": beta, "second_moment_exponent": exponent},
        "allora": {"eta": float(eta), "row_norms": row_norms, "factors": factors,
                   "row_norm_summary": _summary(row_norms), "factor_summary": _summary(factors),
                   "fraction_rows_escaped": float(np.mean(row_norms >= 1.0 / eta**2))},
        "lowr": {"alpha": float(lowr_alpha), "tau": float(lowr_tau), "norm_a": na, "norm_b": nb,
                 "significance": sig,
                 "spread_max_over_min": float(sig.max() / sig.min()) if sig.min() > 0 else math.inf,
                 "coefficient_of_variation": float(sig.std() / sig.mean()) if sig.mean() > 0 else None,
                 "corr_with_norm_b": _corr(sig, nb), "corr_with_norm_a": _corr(sig, na), "gamma": gamma},
    }


def update_ratio(spectral_norm_update: float, spectral_norm_W: float) -> float | None:
    """m = ||s B A||_2 / ||W||_2 (ALLoRA sec. 3.3, ``analysis.ripple.layer_ratios`` with the scaling folded into
    B); None when W = 0. The one place m is computed (report and monitor alike)."""
    return float(spectral_norm_update) / float(spectral_norm_W) if spectral_norm_W > 0 else None


def intruder_cluster_size(epsilon: float) -> int:
    """The smallest cluster of W's singular vectors inside which a rotation can fake an intruder: a unit vector in
    the span of n orthonormal vectors has |cos| >= 1/sqrt(n) with one of them, so below n = 1/eps^2 it cannot
    look new; from ceil(1/eps^2) on it can (4 at PEFT's eps = 0.5)."""
    return max(1, math.ceil(1.0 / float(epsilon) ** 2 - 1e-12))


def base_quantities(W, A, B, scaling: float, *, sigma_update: np.ndarray | None = None, intruder_top_k: int = 10,
                    intruder_epsilon: float = 0.5) -> dict:
    """m = ||s B A||_2 / ||W||_2 (and its Frobenius analogue) and the intruder dimensions of W + s B A.

    W (d_out, d_in) in nn.Linear orientation (transpose a Conv1D weight first). One SVD of W gives ||W||_2 and its
    left singular vectors U_W; one of W + s B A its top-k directions u_j (singular values s_j). Intruder test (as
    PEFT's ``reduce_intruder_dimension``): u_j is an intruder when max_i |<u_j, U_W[:, i]>| < epsilon.

    Abstention (a flat spectrum): by Weyl's inequality each singular value moves by at most delta = ||s B A||_2, so
    where W has a cluster of at least ``intruder_cluster_size(epsilon)`` singular values within delta of s_j, the
    update can rotate W's own singular vectors inside it into a u_j with every |cos| < epsilon (in an exactly
    flat spectrum every direction is a singular vector of W). The test abstains for u_j (``abstained``; not
    counted) when both hold: such a cluster exists and u_j is not the update's own direction, i.e. less than
    1 - eps^2 of its energy lies in the update's column space (||Q_B^T u_j||^2 < 1 - eps^2, Q_B an orthonormal
    basis of span(B)). A direction the update put there (its part outside span(B) shorter than eps) is judged.
    ``spectral_gap``: (sigma_1 - sigma_{k+1}) / sigma_1 of W, the relative spread of its top k+1 singular values.
    """
    W = np.asarray(W, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    sB = float(scaling) * np.asarray(B, dtype=np.float64)
    if sigma_update is None:
        sigma_update = update_singular_values(A, B, scaling)
    delta_2 = float(sigma_update[0]) if len(sigma_update) else 0.0
    delta = sB @ A
    U_w, S_w, _ = np.linalg.svd(W, full_matrices=False)
    U_m, S_m, _ = np.linalg.svd(W + delta, full_matrices=False)
    norm_W = float(np.linalg.norm(W))
    k = min(int(intruder_top_k), U_m.shape[1])
    cos = np.abs(U_m[:, :k].T @ U_w).max(axis=1)
    cluster = np.array([int(np.sum(np.abs(S_w - S_m[j]) <= delta_2 * (1 + 1e-12))) for j in range(k)])
    Q_B = np.linalg.qr(B)[0] if np.any(B) else np.zeros((B.shape[0], 0))
    in_update = ((Q_B.T @ U_m[:, :k]) ** 2).sum(axis=0)
    abstain = (cluster >= intruder_cluster_size(intruder_epsilon)) & (in_update < 1.0 - intruder_epsilon**2)
    intruder = (cos < intruder_epsilon) & ~abstain
    spectral_gap = float((S_w[0] - S_w[min(k, len(S_w) - 1)]) / S_w[0]) if S_w[0] > 0 else None
    return {
        "norm_W": norm_W, "spectral_norm_W": float(S_w[0]),
        "m": update_ratio(delta_2, S_w[0]),
        "m_frobenius": float(np.linalg.norm(delta) / norm_W) if norm_W > 0 else None,
        "intruder": {"top_k": k, "epsilon": float(intruder_epsilon), "max_abs_cos": cos,
                     "count": int(intruder.sum()), "abstained": int(abstain.sum()), "cluster_sizes": cluster,
                     "energy_in_update": in_update, "spectral_gap": spectral_gap},
    }


def calibration_quantities(X, W, A, B, scaling: float, p: float, *, max_bytes: int = 2**28) -> dict:
    """Exact dropout penalty at PEFT's placement on the captured inputs X (N, d_in), its Std and n*.

    Var[L] is a sum over samples, so it is computed on row blocks whose (rows, d_out, d_in) temporaries of
    ``dropout.loss_variance`` fit in ``max_bytes``.
    """
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    s = float(scaling)
    Y = X @ W.T + s * (X @ A.T) @ B.T
    signal = float(((s * (X @ A.T) @ B.T) ** 2).sum())
    out = {"n_rows": int(X.shape[0]), "p": float(p), "placement": "input", "adapter_output_energy": signal}
    if p == 0.0:
        return {**out, "expected_loss": 0.0, "penalty": 0.0, "std": 0.0, "penalty_relative": 0.0,
                "steps_to_resolve": None}
    expected = dropout.expected_loss(X, Y, W, A, B, p, placement="input", scaling=s)
    penalty = dropout.dropout_penalty(X, A, B, p, placement="input", scaling=s)
    rows = max(1, int(max_bytes // (8 * 3 * A.shape[1] * B.shape[0])))
    var = sum(dropout.loss_variance(X[i:i + rows], Y[i:i + rows], W, A, B, p, placement="input", scaling=s)
              for i in range(0, X.shape[0], rows))
    std = math.sqrt(var)
    steps = None
    if penalty > 0:
        steps = max(1, math.ceil(var / penalty**2))
        while steps > 1 and float(dropout.deviation_bound(std, steps - 1)) <= penalty:  # rounding guard
            steps -= 1
        while float(dropout.deviation_bound(std, steps)) > penalty:
            steps += 1
    return {**out, "expected_loss": float(expected), "penalty": float(penalty), "std": std,
            "penalty_relative": float(penalty / signal) if signal > 0 else None, "steps_to_resolve": steps}

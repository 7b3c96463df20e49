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
  epsilon), abstaining where W's spectrum is flat (see :func:`base_quantities`). Cost: one Gram matrix of the
  smaller side, its eigendecomposition and a top-k eigensolve of its rank-2r update per layer.
- With inputs X: the exact expected loss of one dropout realisation at PEFT's placement ("input": the mask is on
  x before lora_A) with the layer's own dropout-free output as target, Y = X W^T + s X (BA)^T, so that
  E[L] = the dropout penalty v s^2 sum_j D_j ||(BA)_:j||^2 (``dropout.expected_loss``, ALLoRA sec. 3.1), its
  exact Std over masks (``dropout.loss_variance``, accumulated from per-batch statistics of the inputs by
  :class:`DropoutStatistics`, cost d_in r^2 / 2 per token) and n* = ceil(Var / E[L]^2), the fewest realisations
  (training steps on this batch) for which the Monte-Carlo noise Std / sqrt(n) of ALLoRA app. A
  (``dropout.deviation_bound``) falls below the penalty itself.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from analysis import adaptive, channels, dropout, rank_scaling

__all__ = [
    "PEFT_A_EXCESS_KURTOSIS",
    "update_ratio",
    "intruder_cluster_size",
    "adapter_quantities",
    "base_quantities",
    "calibration_quantities",
    "DropoutStatistics",
    "steps_to_resolve",
    "a_init_check",
    "merge_rounding",
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


def _descending_eigh(G: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a symmetric PSD G, largest first (all, or the ``top`` largest: LAPACK's subset driver)."""
    n = G.shape[0]
    if top is None or top >= n:
        lam, V = np.linalg.eigh(G)
    else:
        lam, V = scipy.linalg.eigh(G, subset_by_index=[n - top, n - 1])
    return np.maximum(lam[::-1], 0.0), V[:, ::-1]


def _singular(G: np.ndarray, top: int | None = None):
    """(V, S): eigenvectors of the Gram G of a matrix's smaller side and its singular values, largest first."""
    lam, V = _descending_eigh(G, top)
    return V, np.sqrt(lam)


#: Below this smaller side the exact path (a full eigendecomposition) is as cheap as a truncated solve.
TRUNCATED_MIN_SIDE = 256


def _top_eigsh(G: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` largest eigenpairs of a symmetric PSD G (largest first): ARPACK's implicitly restarted Lanczos
    (``scipy.sparse.linalg.eigsh``, tol = 0: to machine precision) from a fixed start vector, so the same bits
    every run; LAPACK's subset driver where ARPACK cannot take it (top >= n - 1)."""
    n = G.shape[0]
    if top >= n - 1:
        return _descending_eigh(G, top)
    v0 = np.random.default_rng(0).standard_normal(n)
    lam, V = scipy.sparse.linalg.eigsh(G, k=top, which="LA", tol=0.0, v0=v0, ncv=min(n, max(2 * top + 1, 20)))
    order = np.argsort(lam)[::-1]
    return np.maximum(lam[order], 0.0), V[:, order]


def base_quantities(W, A, B, scaling: float, *, sigma_update: np.ndarray | None = None, intruder_top_k: int = 10,
                    intruder_epsilon: float = 0.5, method: str = "auto", info: dict | None = None,
                    device: str | None = None) -> dict:
    """m = ||s B A||_2 / ||W||_2 (and its Frobenius analogue) and the intruder dimensions of W + s B A.

    W (d_out, d_in) in nn.Linear orientation (transpose a Conv1D weight first). Everything comes from the Gram
    matrix G of W's smaller side (d x d with d = min(d_out, d_in); U = W V / S when d_in is the smaller side) and
    the Gram of W + s B A, which is G plus a rank-2r correction (no d_out x d_in product is formed twice);
    ||W||_2 is W's largest singular value (no second SVD), ||W||_F = sqrt(tr G).
    Intruder test (as PEFT's ``reduce_intruder_dimension``): u_j (the top-k left singular vectors of W + s B A,
    singular values s_j) is an intruder when max_i |<u_j, U_W[:, i]>| < epsilon over every left singular vector
    U_W[:, i] of W.

    ``method``: "exact" (one full eigendecomposition of G: W's whole thin SVD, the same as ``numpy.linalg.svd`` to
    1e-8), "truncated" (only the top K = 2k eigenpairs of G and the top k of the updated Gram, from ARPACK's
    Lanczos in float64 to machine precision) or "auto" (truncated when d >= ``TRUNCATED_MIN_SIDE``). The truncated
    path knows the cosines with W's top K directions only; the rest are bounded: since
    sum_i <u_j, U_W[:, i]>^2 <= 1, every uncomputed |cos| is at most b_j = sqrt(1 - sum over the computed ones).
    A verdict is kept only where it is determined: not an intruder when a computed |cos| >= epsilon, an intruder
    when the computed max and b_j are both < epsilon, abstained as below; the cluster size is exact when W's
    K-th singular value lies below s_j - ||sBA||_2, otherwise it counts W's computed singular values only (a lower
    bound, enough once it reaches ``intruder_cluster_size``). Where any of the k verdicts is undetermined, the
    layer falls back to the exact path, so counts and abstentions always equal the exact ones. ``max_abs_cos``
    then equals the exact value where it is >= b_j and is a lower bound of it otherwise (the exact value lies
    in [max_abs_cos, max(max_abs_cos, b_j)]); m, ||W||_2, ||W||_F, spectral_gap and energy_in_update agree with
    the exact path to about 1e-10; ``info`` (a dict, if given) receives "solver": "exact", "truncated" or
    "exact (truncated undetermined)" (float64 throughout; float32 is not used: the cosines' error is eps / gap of
    W's top spectrum, and a random W's top gaps are ~1e-3 relative, which would leave ~1e-4 in float32).

    ``device``: a torch device other than the CPU (e.g. "cuda") forms both Gram matrices and eigendecomposes them
    there (``torch.linalg.eigh``, float64, the exact path: a full eigendecomposition is cheap on a GPU); the rest
    (k directions) is the same numpy code. None or "cpu": numpy / LAPACK / ARPACK on the CPU.

    Abstention (a flat spectrum): by Weyl's inequality each singular value moves by at most delta = ||s B A||_2, so
    where W has a cluster of at least ``intruder_cluster_size(epsilon)`` singular values within delta of s_j, the
    update can rotate W's own singular vectors inside it into a u_j with every |cos| < epsilon (in an exactly
    flat spectrum every direction is a singular vector of W). The test abstains for u_j (``abstained``; not
    counted) when both hold: such a cluster exists and u_j is not the update's own direction, i.e. less than
    1 - eps^2 of its energy lies in the update's column space (||Q_B^T u_j||^2 < 1 - eps^2, Q_B an orthonormal
    basis of span(B)). A direction the update put there (its part outside span(B) shorter than eps) is judged.
    ``spectral_gap``: (sigma_1 - sigma_{k+1}) / sigma_1 of W, the relative spread of its top k+1 singular values.
    """
    if method not in ("auto", "exact", "truncated"):
        raise ValueError(f"method must be 'auto', 'exact' or 'truncated', not {method!r}")
    W = np.asarray(W, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    sB = float(scaling) * B
    if sigma_update is None:
        sigma_update = update_singular_values(A, B, scaling)
    delta_2 = float(sigma_update[0]) if len(sigma_update) else 0.0
    d_out, d_in = W.shape
    n = min(d_out, d_in)
    left = d_out <= d_in
    k = min(int(intruder_top_k), n)
    on_device = device is not None and str(device) != "cpu"
    if on_device:
        import torch

        dev = torch.device(device)
        Wt, At, sBt = (torch.as_tensor(x, device=dev) for x in (W, A, sB))
    else:
        Wt, At, sBt = W, A, sB
    G = Wt @ Wt.T if left else Wt.T @ Wt
    # Gram of W + sB A from G: left: (W + sBA)(W + sBA)^T = G + sB (A W^T) + (W A^T) sB^T + sB (A A^T) sB^T
    if left:
        corr = (Wt @ At.T) @ sBt.T
        G_m = G + corr + corr.T + sBt @ (At @ At.T) @ sBt.T
    else:  # (W + sBA)^T (W + sBA) = G + A^T (sB^T W) + (W^T sB) A + A^T (sB^T sB) A
        corr = (Wt.T @ sBt) @ At
        G_m = G + corr + corr.T + At.T @ (sBt.T @ sBt) @ At
    G_m = (G_m + G_m.T) / 2
    truncated = not on_device and (method == "truncated" or (method == "auto" and n >= TRUNCATED_MIN_SIDE))
    K = min(n, 2 * k) if truncated else n
    if truncated and K >= n - 1:
        truncated, K = False, n
    if on_device:
        lam_m, V_m = (x.flip(-1).cpu().numpy() for x in torch.linalg.eigh(G_m))
        lam_m, V_m = np.maximum(lam_m[:k], 0.0), V_m[:, :k]
        lam_w, V_w = (x.flip(-1).cpu().numpy() for x in torch.linalg.eigh(G))
        lam_w = np.maximum(lam_w, 0.0)
        G = G.cpu().numpy()
    else:
        lam_m, V_m = _top_eigsh(G_m, k) if truncated else _descending_eigh(G_m, k)
        lam_w, V_w = _top_eigsh(G, K) if truncated else _descending_eigh(G)
    S_m = np.sqrt(lam_m)
    S_w = np.sqrt(lam_w)  # left: V_w = U_W; else U_W = W V_w / S_w (never formed)
    if left:
        U_m = V_m
    else:  # u_j = (W + sBA) v_j / s_j
        U_m = (W @ V_m + sB @ (A @ V_m)) / np.where(S_m > 0, S_m, 1.0)
        U_m /= np.maximum(np.linalg.norm(U_m, axis=0), 1e-300)
    Q_B = np.linalg.qr(B)[0] if np.any(B) else np.zeros((B.shape[0], 0))
    in_update = ((Q_B.T @ U_m[:, :k]) ** 2).sum(axis=0)
    n_c = intruder_cluster_size(intruder_epsilon)

    def verdicts(V_w, S_w, complete):
        if left:  # cosines with every computed left singular vector of W
            proj = U_m.T @ V_w
        else:  # <u_j, U_W[:, i]> = (W^T u_j) . V_w[:, i] / S_w[i]
            proj = np.divide((W.T @ U_m).T @ V_w, S_w, out=np.zeros((k, len(S_w))), where=S_w > 0)
        cos = np.abs(proj).max(axis=1)
        window = delta_2 * (1 + 1e-12)
        cluster = np.array([int(np.sum(np.abs(S_w - S_m[j]) <= window)) for j in range(k)])
        if complete:
            abstain = (cluster >= n_c) & (in_update < 1.0 - intruder_epsilon**2)
            return cos, cluster, abstain, (cos < intruder_epsilon) & ~abstain, True
        bound = np.sqrt(np.maximum(1.0 - (proj**2).sum(axis=1), 0.0) + 1e-12)  # any uncomputed |cos|
        cluster_exact = S_w[-1] < S_m[:k] - window
        own = in_update >= 1.0 - intruder_epsilon**2
        abstain = (cluster >= n_c) & ~own
        abstain_known = cluster_exact | (cluster >= n_c) | own
        known_not = cos >= intruder_epsilon
        known_yes = (cos < intruder_epsilon) & (bound < intruder_epsilon)
        known = abstain_known & (abstain | known_not | known_yes)
        return cos, cluster, abstain, known_yes & ~abstain, bool(known.all())

    cos, cluster, abstain, intruder, determined = verdicts(V_w, S_w, complete=not truncated)
    solver = "truncated" if truncated else "exact"
    if not determined:  # the exact path for this layer
        lam_w, V_w = _descending_eigh(G)
        S_w = np.sqrt(lam_w)
        cos, cluster, abstain, intruder, _ = verdicts(V_w, S_w, complete=True)
        solver = "exact (truncated undetermined)"
    spectral_gap = float((S_w[0] - S_w[min(k, len(S_w) - 1)]) / S_w[0]) if S_w[0] > 0 else None
    norm_W = float(np.sqrt(max(np.trace(G), 0.0)))
    norm_update = float(np.sqrt((np.asarray(sigma_update) ** 2).sum()))
    out = {
        "norm_W": norm_W, "spectral_norm_W": float(S_w[0]),
        "m": update_ratio(delta_2, S_w[0]),
        "m_frobenius": norm_update / norm_W if norm_W > 0 else None,
        "intruder": {"top_k": k, "epsilon": float(intruder_epsilon), "max_abs_cos": cos,
                     "count": int(intruder.sum()), "abstained": int(abstain.sum()), "cluster_sizes": cluster,
                     "energy_in_update": in_update, "spectral_gap": spectral_gap},
    }
    if info is not None:
        info["solver"] = solver
    return out


class DropoutStatistics:
    """The exact dropout penalty of one layer at PEFT's placement, accumulated over batches of its inputs.

    The target is the layer's own dropout-free output Y = X W^T + s X M^T (M = B A), so the residual of the mean
    prediction is 0 and, per sample n (ALLoRA sec. 3.1; ``analysis._masks.residual_norm_moments`` with e0 = 0,
    columns c_k = s x_nk M_:k, v = p/(1-p), q = 1-p, mu_k = ||M_:k||^2, z_n = x_n * x_n entrywise):

        E[L_n]   = v s^2 sum_k x_nk^2 mu_k                                       (the penalty),
        Var[L_n] = s^4 [ (v (1/q - 2)^2 - 2 v^2) sum_k x_nk^4 mu_k^2 + 2 v^2 z_n^T H z_n ],  H = (M^T M)^2 entrywise.

    With M^T M = g^T g (g = Lambda^(1/2) Q^T A, r x d_in, from B^T B = Q Lambda Q^T), H_kl = <g_k, g_l>^2 =
    <phi_k, phi_l> for phi_k = g_k (x) g_k (its r(r+1)/2 distinct entries, off-diagonal ones times sqrt 2), so
    sum_n z_n^T H z_n = ||Z Phi^T||_F^2: a (rows, d_in) x (d_in, r(r+1)/2) product per batch. Nothing of size
    N x d_out or d_out x d_in is formed and no input is kept: the cost per token is d_in r^2 / 2, and the memory
    is that of one batch. Tested against :func:`analysis.dropout.expected_loss` / ``loss_variance`` (1e-10) and
    against Monte Carlo over PEFT's own dropout masks.
    """

    def __init__(self, A, B, scaling: float, p: float):
        A = np.asarray(A, dtype=np.float64)
        B = np.asarray(B, dtype=np.float64)
        self.s, self.p = float(scaling), float(p)
        lam, Q = np.linalg.eigh(B.T @ B)
        g = np.sqrt(np.maximum(lam, 0.0))[:, None] * (Q.T @ A)  # (r, d_in), M^T M = g^T g
        r = g.shape[0]
        iu = np.triu_indices(r)
        weight = np.where(iu[0] == iu[1], 1.0, math.sqrt(2.0))
        self._phi = (g[iu[0]] * g[iu[1]]) * weight[:, None]  # (r(r+1)/2, d_in)
        self._mu = (g**2).sum(axis=0)  # ||M_:k||^2
        self._A, self._BtB = A, B.T @ B
        self.n_rows = 0
        self._z1 = np.zeros(A.shape[1])  # sum_n x_nk^2
        self._z2 = np.zeros(A.shape[1])  # sum_n x_nk^4
        self._quad = 0.0  # sum_n z_n^T H z_n
        self._signal = 0.0  # sum_n ||s M x_n||^2

    def add(self, X) -> None:
        """Accumulate a batch of inputs X (rows, d_in)."""
        X = np.asarray(X, dtype=np.float64)
        Z = X * X
        self.n_rows += X.shape[0]
        self._z1 += Z.sum(axis=0)
        self._z2 += (Z * Z).sum(axis=0)
        self._quad += float(((Z @ self._phi.T) ** 2).sum())
        H = X @ self._A.T  # (rows, r)
        self._signal += self.s**2 * float(np.einsum("nk,kl,nl->", H, self._BtB, H))

    def result(self) -> dict:
        """n_rows, p, placement, adapter_output_energy, expected_loss (= penalty), penalty, std, penalty_relative
        (penalty / adapter output energy) and steps_to_resolve n*."""
        s, p = self.s, self.p
        out = {"n_rows": int(self.n_rows), "p": p, "placement": "input", "adapter_output_energy": self._signal}
        if p == 0.0:
            return {**out, "expected_loss": 0.0, "penalty": 0.0, "std": 0.0, "penalty_relative": 0.0,
                    "steps_to_resolve": None}
        q, v = 1.0 - p, p / (1.0 - p)
        penalty = v * s**2 * float((self._z1 * self._mu).sum())
        diag = float((self._z2 * self._mu**2).sum())
        var = max(0.0, s**4 * ((v * (1.0 / q - 2.0) ** 2 - 2.0 * v**2) * diag + 2.0 * v**2 * self._quad))
        std = math.sqrt(var)
        return {**out, "expected_loss": penalty, "penalty": penalty, "std": std,
                "penalty_relative": penalty / self._signal if self._signal > 0 else None,
                "steps_to_resolve": steps_to_resolve(penalty, std)}


def a_init_check(A) -> dict:
    """Did A move from PEFT's default init? lora_A starts Kaiming-uniform (a = sqrt 5): entries U(-b, b) with
    b = 1/sqrt(d_in), so E||A_0||_F^2 = r/3 and Var ||A_0||_F^2 = 4 r / (45 d_in). Without A_0 itself, A is
    consistent with its init when no entry exceeds b and ||A||_F^2 lies within 5 sd of r/3 (training moves
    entries past b within a few hundred Adam steps at lr >= 1e-4 when d_in >= 256)."""
    A = np.asarray(A, dtype=np.float64)
    r, d_in = A.shape
    b = 1.0 / math.sqrt(d_in)
    norm_sq = float((A**2).sum())
    z = (norm_sq - r / 3.0) / math.sqrt(4.0 * r / (45.0 * d_in))
    outside = float(np.mean(np.abs(A) > b * (1 + 1e-6)))
    return {"init_bound": b, "fraction_outside_init_bound": outside, "norm_ratio_to_init": math.sqrt(norm_sq * 3.0 / r),
            "z_norm_sq": z, "consistent_with_init": bool(outside == 0.0 and abs(z) <= 5.0)}


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest even on the float32 bits, as torch does), back in float64."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float64)


def merge_rounding(W, A, B, scaling: float) -> dict:
    """Is merging safe in bf16 / fp16? The relative error ||fl(W + sBA) - (W + sBA)||_F / ||sBA||_F of the merged
    weight stored in that dtype: predicted from the spacing of the representable numbers (round to nearest: an
    error uniform in +-ulp(x)/2, E err^2 = ulp(x)^2/12, ulp(x) = 2^(floor(log2|x|) - p) with p = 7 (bf16) or 10
    (fp16) mantissa bits) and measured by rounding W + sBA (float64) to the dtype. A value near 1 means the merge
    keeps about nothing of the update. floor(log2|x|) is read from the float64 exponent bits (an exact zero or a
    float64 subnormal reads below every dtype's lowest exponent, so it gets the smallest spacing), and the sum of
    ulp^2 is taken per exponent (a histogram), so no float array of W's size is formed for the prediction."""
    W = np.asarray(W, dtype=np.float64)
    delta = float(scaling) * np.asarray(B, dtype=np.float64) @ np.asarray(A, dtype=np.float64)
    merged = W + delta
    norm_delta = float(np.linalg.norm(delta))
    out = {}
    exponent = ((np.ascontiguousarray(merged).view(np.uint64) >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int32)
    lo = int(exponent.min()) if exponent.size else 0
    counts = np.bincount((exponent - lo).ravel())
    floor_log2 = np.arange(lo, lo + len(counts), dtype=np.float64) - 1023.0  # floor(log2 |x|) per histogram bin
    for name, mant, lowest, rounded in (("bfloat16", 7, -126.0, _round_bf16(merged)),
                                        ("float16", 10, -14.0, merged.astype(np.float16).astype(np.float64))):
        ulp_sq = np.exp2(2.0 * (np.maximum(floor_log2, lowest) - mant))
        predicted = math.sqrt(float((counts * ulp_sq).sum()) / 12.0)
        rounded -= merged
        measured = float(np.linalg.norm(rounded))
        out[name] = {"predicted": predicted / norm_delta if norm_delta > 0 else None,
                     "measured": measured / norm_delta if norm_delta > 0 else None}
    return out


def steps_to_resolve(penalty: float, std: float) -> int | None:
    """n* = the fewest realisations n with Std / sqrt(n) <= penalty (ALLoRA app. A); None for a zero penalty."""
    if penalty <= 0:
        return None
    var = std**2
    steps = max(1, math.ceil(var / penalty**2))
    while steps > 1 and float(dropout.deviation_bound(std, steps - 1)) <= penalty:  # rounding guard
        steps -= 1
    while float(dropout.deviation_bound(std, steps)) > penalty:
        steps += 1
    return steps


def calibration_quantities(X, A, B, scaling: float, p: float) -> dict:
    """The exact dropout penalty of one layer on its captured inputs X (N, d_in): :class:`DropoutStatistics`."""
    stats = DropoutStatistics(A, B, scaling, p)
    stats.add(X)
    return stats.result()

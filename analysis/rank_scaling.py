"""rsLoRA (Kalajdzievski 2023) Theorem 3.2 / App. A: exact moments of a LoRA adapter after SGD vs the rank.

Setting of the proof (our convention, torch.nn.Linear / PEFT): the adapter is ``f(x) = gamma * B @ A @ x``
with ``A = lora_A`` (r, d) of iid entries of mean 0 and variance ``sigma2`` (the paper's ``sigma_A`` -- a
*variance*, not a standard deviation), ``B = lora_B`` (d_out, r) = 0 and ``gamma = gamma_r`` the scaling.
SGD with learning rate ``lr`` runs on inputs ``x_k`` with loss gradients ``v_k = dL/df(x_k)`` (the proof's
setting: a linear loss ``sum_k v_k . f(x_k)``, so the ``v_k`` do not depend on ``A0``).

Structure lemma (exact, proved by :func:`structure_matrices` and its tests): for every ``n`` there are
deterministic ``M_n`` (d_out, d) and ``P_n`` (d, d) with ``B_n = M_n A0^T`` and ``A_n = A0 P_n``, where
``M_0 = 0, P_0 = I`` and ``M_{k+1} = M_k - lr gamma v_k (P_k x_k)^T``, ``P_{k+1} = P_k - lr gamma M_k^T v_k x_k^T``.
Hence ``gamma B_n A_n = gamma M_n S P_n`` with the Wishart matrix ``S = A0^T A0`` (r degrees of freedom), and
every moment below is a Wishart moment: ``E S = r sigma2 I`` and, for symmetric ``Q``,
``E[S Q S] = sigma2^2 (r (r + 1) Q + r tr(Q) I + r kappa diag(Q))`` (``kappa`` = excess kurtosis of the entries
of ``A0``: 0 for Gaussian, -6/5 for PEFT's uniform Kaiming init).

One step (n = 1): ``f(x) = -lr gamma^2 v0 (x0^T S x)`` and ``grad_x = -lr gamma^2 (v0 . v) S x0``, so with
``c = x0 . x``::

    E f(x)        = -lr gamma^2 r sigma2 c v0
    E ||f(x)||^2  = lr^2 gamma^4 |v0|^2 sigma2^2 (r^2 c^2  +  r |x0|^2 |x|^2 + r c^2 + kappa r sum_p x0_p^2 x_p^2)
    E grad_x      = -lr gamma^2 (v0 . v) r sigma2 x0
    E ||grad_x||^2 = lr^2 gamma^4 (v0 . v)^2 sigma2^2 |x0|^2 (r^2  +  r (d + 1 + kappa))

The paper's eq. (11) keeps only the ``r^2`` terms (``Theta((gamma^2 r)^m)`` with m = 2). The dropped terms
dominate when r is small relative to the width d: their ratio to the kept ones is
``(|x0|^2 |x|^2 + c^2) / (r c^2)`` for the output (about d / r for generic inputs, for which c^2 ~ |x0|^2|x|^2/d;
infinite when x0 is orthogonal to x) and ``(d + 1 + kappa) / r`` for the input gradient. So for rsLoRA
(gamma = alpha / sqrt(r)) ``E||grad_x||^2`` is proportional to ``(r + d + 1) / r``: Theta(1) only once r >> d;
for r << d (every LLM setting: d = 4096, r <= 2048) it decays like 1 / r (exponent ``1 - 4 beta``, see
:func:`moment_exponents`). At d = 784, r = 8 the paper's leading term is 99x too small. See ERRATA.md
(rank_scaling).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from analysis.inputs import as_matrix, as_vector, finite_scalar, positive_int

__all__ = [
    "gamma",
    "scaling_exponent",
    "one_step_moments",
    "adam_first_step_moments",
    "dropped_term_ratio",
    "moment_exponents",
    "structure_matrices",
    "sgd_adapter",
    "sgd_moments",
    "paper_eq11_moment",
    "simulate_sgd",
    "mc_summary",
    "fit_exponent",
]

_KINDS = {"lora": 1.0, "rslora": 0.5}
_UNIFORM_EXCESS_KURTOSIS = -1.2


# --------------------------------------------------------------------------------------------------- scaling


def scaling_exponent(kind="lora") -> float:
    """The exponent beta with gamma_r = alpha * r^-beta: "lora" -> 1, "rslora" -> 1/2, a real number -> itself."""
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'lora', 'rslora' or a real exponent beta, got {kind!r}")
        return _KINDS[kind]
    if isinstance(kind, bool):
        raise ValueError(f"kind must be 'lora', 'rslora' or a real exponent beta, got {kind!r}")
    return finite_scalar("kind", kind)


def _ranks(r) -> np.ndarray | int:
    """Validate a rank or an array of ranks (integers >= 1)."""
    if np.ndim(r) == 0:
        return positive_int("r", r.item() if isinstance(r, np.ndarray | np.generic) else r)
    try:
        arr = np.asarray(r, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"r must be integers >= 1, got {r!r}") from exc
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 1) or np.any(arr != np.round(arr)):
        raise ValueError(f"r must be integers >= 1, got {r!r}")
    return arr


def gamma(r, alpha: float = 1.0, kind="lora"):
    """The LoRA scaling gamma_r (PEFT's ``scaling``): alpha / r ("lora"), alpha / sqrt(r) ("rslora", eq. 4),
    or alpha * r^-beta for a real ``kind = beta``. ``r``: an int >= 1 or an array of them (returns an array)."""
    ranks = _ranks(r)
    a = finite_scalar("alpha", alpha, positive=True)
    beta = scaling_exponent(kind)
    if isinstance(ranks, int):
        return a * float(ranks) ** (-beta)
    return a * ranks ** (-beta)


def moment_exponents(beta, regime: str = "large_rank") -> tuple[float, float]:
    """Exponents of r in the first moment and the second moment E||.||^2 of the adapter output and input
    gradient for gamma = alpha r^-beta (fixed d, x, v, lr).

    ``regime="large_rank"`` (r -> infinity at fixed d, the paper's Thm. 3.2): ``(1 - 2 beta, 2 - 4 beta)``;
    zero iff beta = 1/2. ``regime="small_rank"`` (r << d, the terms eq. (11) drops dominate):
    ``(1 - 2 beta, 1 - 4 beta)``; the first moment is exactly proportional to gamma^2 r for every r, the second
    moment of the input gradient ~ gamma^4 r d (and of the output too when |x0|^2|x|^2 >> r (x0.x)^2).
    So for r << d no single beta keeps both moments Theta(1): rsLoRA's second moment decays like 1 / r.
    """
    b = scaling_exponent(beta)
    if regime == "large_rank":
        return 1.0 - 2.0 * b, 2.0 - 4.0 * b
    if regime == "small_rank":
        return 1.0 - 2.0 * b, 1.0 - 4.0 * b
    raise ValueError(f"regime must be 'large_rank' or 'small_rank', got {regime!r}")


# ---------------------------------------------------------------------------------------- one step, closed form


def _kurtosis(excess_kurtosis) -> float:
    k = finite_scalar("excess_kurtosis", excess_kurtosis)
    if k < -2.0:
        raise ValueError(f"excess_kurtosis must be >= -2 (E a^4 >= (E a^2)^2), got {excess_kurtosis!r}")
    return k


def _step_inputs(x0, v0, x, v):
    x0 = as_vector("x0", x0)
    d = x0.shape[0]
    v0 = as_vector("v0", v0)
    x = as_vector("x", x, d)
    v = as_vector("v", v, v0.shape[0])
    return x0, v0, x, v


def one_step_moments(x0, v0, x, v, *, r, gamma, lr, sigma2=1.0, excess_kurtosis=0.0) -> dict:
    """Exact moments over A0 of the adapter after ONE SGD step (rsLoRA App. A, eqs. (9)-(11) at n = 1).

    The step is on input ``x0`` (d,) with output gradient ``v0`` (d_out,); evaluation at input ``x`` (d,) with
    output gradient ``v`` (d_out,). ``gamma`` is the scaling value gamma_r (see :func:`gamma`), ``sigma2`` the
    variance of the entries of A0 (the paper's sigma_A), ``excess_kurtosis`` that of their law (0: Gaussian).
    Since B0 = 0, grad_A = 0 and grad_B = gamma v0 (A0 x0)^T, so f(x) = -lr gamma^2 v0 (x0^T S x), S = A0^T A0:

    - ``mean_out`` (d_out,) = -lr gamma^2 r sigma2 (x0.x) v0
    - ``second_out`` = lr^2 gamma^4 |v0|^2 sigma2^2 (r |x0|^2|x|^2 + (r^2 + r)(x0.x)^2 + kappa r sum x0^2 x^2)
    - ``mean_grad_in`` (d,) = -lr gamma^2 (v0.v) r sigma2 x0
    - ``second_grad_in`` = lr^2 gamma^4 (v0.v)^2 sigma2^2 |x0|^2 r (r + d + 1 + kappa)
    - ``entry_second_out`` (d_out,), ``entry_second_grad_in`` (d,): per-entry second moments (Definition 3.1
      speaks of moments "in each entry"); E grad_j^2 = lr^2 gamma^4 (v0.v)^2 sigma2^2 r (|x0|^2 + (r+1+kappa) x0_j^2).

    The paper's eq. (11) keeps only the r^2 terms; the others (ratio in :func:`dropped_term_ratio`) dominate
    for r << d. Its E_A0 inside the power (E[w^2] = (E w)^2) is wrong; see ERRATA.md (rank_scaling).
    """
    x0, v0, x, v = _step_inputs(x0, v0, x, v)
    r = positive_int("r", r)
    g = finite_scalar("gamma", gamma)
    eta = finite_scalar("lr", lr, positive=True)
    s2 = finite_scalar("sigma2", sigma2, positive=True)
    kappa = _kurtosis(excess_kurtosis)
    d = x0.shape[0]
    c = float(x0 @ x)
    vv = float(v0 @ v)
    n0, n = float(x0 @ x0), float(x @ x)
    pre = eta * g * g
    return {
        "mean_out": -pre * r * s2 * c * v0,
        "second_out": pre**2 * float(v0 @ v0) * s2**2
        * (r * n0 * n + (r * r + r) * c * c + kappa * r * float(np.sum(x0**2 * x**2))),
        "mean_grad_in": -pre * vv * r * s2 * x0,
        "second_grad_in": pre**2 * vv**2 * s2**2 * n0 * r * (r + d + 1 + kappa),
        "entry_second_out": v0**2 * (pre**2 * s2**2
                                     * (r * n0 * n + (r * r + r) * c * c + kappa * r * float(np.sum(x0**2 * x**2)))),
        "entry_second_grad_in": pre**2 * vv**2 * s2**2 * r * (n0 + (r + 1 + kappa) * x0**2),
    }


def adam_first_step_moments(x0, v0, x, v, *, r, gamma, lr, sigma2=1.0) -> dict:
    """Exact moments over a Gaussian A0 of the adapter after ONE Adam step from B0 = 0 (eps -> 0).

    The setting of :func:`one_step_moments` with Adam / AdamW (any beta1, beta2; weight decay 0 at B0 = 0 and
    irrelevant at first order for A) instead of SGD. Adam's first bias-corrected step is -lr g / |g| entrywise,
    so grad_A = 0 leaves A0 unchanged and B1 = -lr sign(gamma) sign(v0) sign(A0 x0)^T: its size does not depend
    on gamma or on the magnitude of A0. With a_k the rows of A0 (iid N(0, sigma2 I_d)), c = x0 . x, s = sign(v0):

    - ``mean_out`` = -lr |gamma| r sqrt(2 sigma2 / pi) (c / |x0|) s
    - ``second_out`` = lr^2 gamma^2 sigma2 #{v0_i != 0} (r |x|^2 + r (r - 1) (2 / pi) c^2 / |x0|^2)
    - ``mean_grad_in`` = -lr |gamma| (s . v) r sqrt(2 sigma2 / pi) x0 / |x0|
    - ``second_grad_in`` = lr^2 gamma^2 sigma2 (s . v)^2 (r d + r (r - 1) (2 / pi))

    So the first moment is Theta(|gamma_r| r), not Theta(gamma_r^2 r) as after an SGD step: under Adam it is
    LoRA's gamma_r = alpha / r that keeps it Theta_r(1), and rsLoRA's alpha / sqrt(r) makes it grow like
    sqrt(r). rsLoRA's Thm. 3.2 is proved for SGD only (app. A, app. B.1); see ERRATA.md (rank_scaling).
    Gaussian A0 only (the law of sign(a . x0) (a . x) depends on the law of A0's entries beyond its variance).
    """
    x0, v0, x, v = _step_inputs(x0, v0, x, v)
    r = positive_int("r", r)
    g = abs(finite_scalar("gamma", gamma))
    eta = finite_scalar("lr", lr, positive=True)
    s2 = finite_scalar("sigma2", sigma2, positive=True)
    n0 = float(np.linalg.norm(x0))
    if n0 == 0.0:
        raise ValueError("x0 must be nonzero (the first gradient of B is gamma v0 (A0 x0)^T)")
    d = x0.shape[0]
    c = float(x0 @ x)
    sv = np.sign(v0)
    sv_v = float(sv @ v)
    k = math.sqrt(2.0 * s2 / math.pi)
    two_pi = 2.0 / math.pi
    return {
        "mean_out": -eta * g * r * k * (c / n0) * sv,
        "second_out": eta**2 * g**2 * s2 * float(np.count_nonzero(v0))
        * (r * float(x @ x) + r * (r - 1) * two_pi * c * c / n0**2),
        "mean_grad_in": -eta * g * sv_v * r * k * x0 / n0,
        "second_grad_in": eta**2 * g**2 * s2 * sv_v**2 * (r * d + r * (r - 1) * two_pi),
    }


def dropped_term_ratio(x0, x, *, r, excess_kurtosis=0.0) -> dict:
    """Ratio of the one-step second-moment terms that eq. (11) drops to the r^2 term it keeps.

    ``second_out``: (|x0|^2|x|^2 + (x0.x)^2 + kappa sum x0^2 x^2) / (r (x0.x)^2)  (inf if x0 . x = 0);
    ``second_grad_in``: (d + 1 + kappa) / r. The exact second moment is the paper's value times (1 + ratio):
    the paper's Theta((gamma^2 r)^2) is the leading order only when the ratio is << 1, i.e. r >> d for the
    input gradient and r >> |x0|^2|x|^2 / (x0.x)^2 (about d for generic inputs) for the output.
    Independent of gamma, lr, sigma2 and the output gradients.
    """
    x0 = as_vector("x0", x0)
    x = as_vector("x", x, x0.shape[0])
    r = positive_int("r", r)
    kappa = _kurtosis(excess_kurtosis)
    d = x0.shape[0]
    c2 = float(x0 @ x) ** 2
    dropped = float(x0 @ x0) * float(x @ x) + c2 + kappa * float(np.sum(x0**2 * x**2))
    return {
        "second_out": math.inf if c2 == 0.0 else dropped / (r * c2),
        "second_grad_in": (d + 1 + kappa) / r,
    }


# --------------------------------------------------------------------------------------- n steps, closed form


def _trajectory(xs, vs):
    xs = as_matrix("xs", xs)
    vs = as_matrix("vs", vs, (xs.shape[0], None))
    return xs, vs


def structure_matrices(xs, vs, *, gamma, lr) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (M, P), M (d_out, d), P (d, d), with B_n = M A0^T and A_n = A0 P exactly, for every A0.

    ``xs`` (n, d) inputs and ``vs`` (n, d_out) output gradients of the n SGD steps (linear loss). Recursion
    (simultaneous updates, from grad_B = gamma v (A x)^T and grad_A = gamma B^T v x^T, eq. (6)):
    M_{k+1} = M_k - lr gamma v_k (P_k x_k)^T, P_{k+1} = P_k - lr gamma M_k^T v_k x_k^T, M_0 = 0, P_0 = I.
    This is the exact form of the paper's eq. (7): M = -lr gamma sum_k v_k x_k^T + O(gamma^3) and
    P = I + O(gamma^2) (the paper's "1 + O(gamma^2)" is this d x d matrix acting on the right).
    """
    xs, vs = _trajectory(xs, vs)
    g = finite_scalar("gamma", gamma)
    eta = finite_scalar("lr", lr, positive=True)
    n, d = xs.shape
    M = np.zeros((vs.shape[1], d))
    P = np.eye(d)
    for k in range(n):
        M, P = M - eta * g * np.outer(vs[k], P @ xs[k]), P - eta * g * np.outer(M.T @ vs[k], xs[k])
    return M, P


def sgd_moments(xs, vs, x, v, *, r, gamma, lr, sigma2=1.0, excess_kurtosis=0.0) -> dict:
    """Exact moments over A0 after n SGD steps (linear loss; rsLoRA App. A eqs. (9)-(11) without O-terms).

    With (M, P) from :func:`structure_matrices`, y = P x, u = M^T v: f(x) = gamma M S y and
    grad_x = gamma P^T S u, so by the Wishart moments E S = r s2 I, E[S Q S] = s2^2 (r(r+1) Q + r tr(Q) I +
    r kappa diag(Q)):

    - ``mean_out`` = gamma r s2 M y;  ``second_out`` = gamma^2 s2^2 (r(r+1)|My|^2 + r ||M||_F^2 |y|^2 +
      r kappa sum_p (M^T M)_pp y_p^2)
    - ``mean_grad_in`` = gamma r s2 P^T u;  ``second_grad_in`` = gamma^2 s2^2 (r(r+1)|P^T u|^2 +
      r ||P||_F^2 |u|^2 + r kappa sum_p (P P^T)_pp u_p^2)
    - ``entry_second_out``, ``entry_second_grad_in``: the same per entry.

    Same keys as :func:`one_step_moments` (which it equals for n = 1). Shapes: xs (n, d), vs (n, d_out),
    x (d,), v (d_out,).
    """
    xs, vs = _trajectory(xs, vs)
    x = as_vector("x", x, xs.shape[1])
    v = as_vector("v", v, vs.shape[1])
    r = positive_int("r", r)
    g = finite_scalar("gamma", gamma)
    s2 = finite_scalar("sigma2", sigma2, positive=True)
    kappa = _kurtosis(excess_kurtosis)
    M, P = structure_matrices(xs, vs, gamma=g, lr=lr)
    y, u = P @ x, M.T @ v
    My, Ptu = M @ y, P.T @ u
    pre = g * g * s2 * s2
    entry_out = pre * (r * (r + 1) * My**2 + r * float(y @ y) * np.sum(M**2, axis=1) + r * kappa * (M**2) @ (y**2))
    entry_grad = pre * (r * (r + 1) * Ptu**2 + r * float(u @ u) * np.sum(P**2, axis=0)
                        + r * kappa * (u**2) @ (P**2))
    return {
        "mean_out": g * r * s2 * My,
        "second_out": float(np.sum(entry_out)),
        "mean_grad_in": g * r * s2 * Ptu,
        "second_grad_in": float(np.sum(entry_grad)),
        "entry_second_out": entry_out,
        "entry_second_grad_in": entry_grad,
    }


def paper_eq11_moment(xs, vs, x, *, r, gamma, lr, sigma2=1.0, m=2) -> np.ndarray:
    """The per-entry m-th output moment as printed in rsLoRA eq. (11), without its O-term (for comparison only):
    ``(-gamma^2 r sigma_A lr)^m sum_k v_k^m (x_k . x)^m`` (entrywise powers of v_k; inputs held fixed).

    It is wrong twice (see ERRATA.md): E_A0 is taken inside the power (E[w^m] != (E w)^m), and the m-th power of
    the sum over steps is written as the sum of m-th powers. Exact values: :func:`sgd_moments` (m = 2).
    """
    xs, vs = _trajectory(xs, vs)
    x = as_vector("x", x, xs.shape[1])
    r = positive_int("r", r)
    g = finite_scalar("gamma", gamma)
    eta = finite_scalar("lr", lr, positive=True)
    s2 = finite_scalar("sigma2", sigma2, positive=True)
    m = positive_int("m", m)
    return (-g * g * r * s2 * eta) ** m * np.sum(vs**m * ((xs @ x) ** m)[:, None], axis=0)


# --------------------------------------------------------------------------------------------- Monte Carlo


def _sgd_batched(A, xs, vs, targets, g, eta):
    """Run the SGD steps on a batch of adapters: A (D, r, d), B0 = 0; returns (A_n, B_n)."""
    D, r, _ = A.shape
    d_out = (vs if targets is None else targets).shape[1]
    B = np.zeros((D, d_out, r))
    for k in range(xs.shape[0]):
        Ax = A @ xs[k]  # (D, r)
        if targets is None:
            vk = np.broadcast_to(vs[k], (D, d_out))
        else:  # gradient of 0.5 ||f(x_k) - y_k||^2 wrt f(x_k)
            vk = g * np.einsum("dor,dr->do", B, Ax) - targets[k]
        Btv = np.einsum("dor,do->dr", B, vk)  # (D, r)
        grad_B = g * vk[:, :, None] * Ax[:, None, :]
        grad_A = g * Btv[:, :, None] * xs[k][None, None, :]
        A = A - eta * grad_A
        B = B - eta * grad_B
    return A, B


def sgd_adapter(A0, xs, vs=None, *, gamma, lr, targets=None) -> tuple[np.ndarray, np.ndarray]:
    """(A_n, B_n) after n SGD steps from (A0, B0 = 0) for one given A0 (r, d): the conditional-on-A0 trajectory.

    Linear loss (output gradients ``vs`` (n, d_out) fixed, the paper's setting) or, with ``targets`` (n, d_out)
    and ``vs=None``, the MSE loss 0.5 ||f(x_k) - y_k||^2 (v_k = f(x_k) - y_k then depends on A0).
    """
    xs, vs, targets = _sim_trajectory(xs, vs, targets)
    A0 = as_matrix("A0", A0, (None, xs.shape[1]))
    g = finite_scalar("gamma", gamma)
    eta = finite_scalar("lr", lr, positive=True)
    A, B = _sgd_batched(A0[None], xs, vs, targets, g, eta)
    return A[0], B[0]


def _sim_trajectory(xs, vs, targets):
    xs = as_matrix("xs", xs)
    if targets is None:
        if vs is None:
            raise ValueError("vs must be given (n, d_out) unless targets are given (MSE loss)")
        return xs, as_matrix("vs", vs, (xs.shape[0], None)), None
    if vs is not None:
        raise ValueError("vs must be None when targets are given (MSE loss: v_k = f(x_k) - targets_k)")
    return xs, None, as_matrix("targets", targets, (xs.shape[0], None))


def simulate_sgd(xs, vs, x, v, *, r, gamma, lr, n_draws, sigma2=1.0, seed=0, chunk=None, targets=None,
                 init="normal") -> dict:
    """Monte Carlo over A0 of the adapter after n SGD steps, vectorised over draws with batched matmuls.

    Each draw: A0 (r, d) iid N(0, sigma2) (``init="normal"``) or uniform with variance sigma2 (``"uniform"``,
    PEFT's Kaiming-uniform law, excess kurtosis -6/5), B0 = 0, then n SGD steps (simultaneous A, B updates)
    on (xs[k], vs[k]) -- the linear loss of the proof -- or, with ``targets`` and ``vs=None``, on the MSE loss
    0.5 ||f(x_k) - targets_k||^2. Evaluated at input x (d,) with output gradient v (d_out,). Draws are made
    ``chunk`` at a time (default: about 32 MiB of adapters); the samples do not depend on ``chunk``: draw i uses
    A0_i = sqrt(sigma2) * default_rng(seed).standard_normal((n_draws, r, d))[i] (normal init).

    Returns per-draw samples: ``out`` (n_draws, d_out) = f(x), ``sq_out`` = ||f(x)||^2, ``grad_in``
    (n_draws, d) = (gamma B A)^T v, ``sq_grad_in`` = ||grad_in||^2. Use :func:`mc_summary` for means and SEs.
    """
    xs, vs, targets = _sim_trajectory(xs, vs, targets)
    d = xs.shape[1]
    d_out = (vs if targets is None else targets).shape[1]
    x = as_vector("x", x, d)
    v = as_vector("v", v, d_out)
    r = positive_int("r", r)
    g = finite_scalar("gamma", gamma)
    eta = finite_scalar("lr", lr, positive=True)
    n_draws = positive_int("n_draws", n_draws)
    s2 = finite_scalar("sigma2", sigma2, positive=True)
    if init not in ("normal", "uniform"):
        raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if chunk is None:
        chunk = max(1, min(n_draws, (32 << 20) // (8 * r * (d + d_out))))
    chunk = positive_int("chunk", chunk)
    rng = np.random.default_rng(seed)
    out = np.empty((n_draws, d_out))
    grad = np.empty((n_draws, d))
    for start in range(0, n_draws, chunk):
        D = min(chunk, n_draws - start)
        if init == "normal":
            A0 = math.sqrt(s2) * rng.standard_normal((D, r, d))
        else:
            A0 = math.sqrt(3.0 * s2) * rng.uniform(-1.0, 1.0, (D, r, d))
        A, B = _sgd_batched(A0, xs, vs, targets, g, eta)
        out[start:start + D] = g * np.einsum("dor,dr->do", B, A @ x)
        grad[start:start + D] = g * np.einsum("drk,dr->dk", A, np.einsum("dor,o->dr", B, v))
    return {
        "out": out,
        "sq_out": np.sum(out**2, axis=1),
        "grad_in": grad,
        "sq_grad_in": np.sum(grad**2, axis=1),
    }


def mc_summary(samples: dict) -> dict:
    """Means and standard errors (std / sqrt(n), ddof = 1) of :func:`simulate_sgd` samples, keyed like
    :func:`one_step_moments`: ``{"mean_out": (mean, se), "second_out": ..., "mean_grad_in": ...,
    "second_grad_in": ...}``."""
    names = {"out": "mean_out", "sq_out": "second_out", "grad_in": "mean_grad_in", "sq_grad_in": "second_grad_in"}
    result = {}
    for key, name in names.items():
        s = np.asarray(samples[key], dtype=np.float64)
        if s.shape[0] < 2:
            raise ValueError(f"samples[{key!r}] needs at least 2 draws for a standard error")
        result[name] = (s.mean(axis=0), s.std(axis=0, ddof=1) / math.sqrt(s.shape[0]))
    return result


# ------------------------------------------------------------------------------------------------ fitting


def fit_exponent(rs, values, *, weights=None, confidence=0.95) -> tuple[float, float, float]:
    """Slope of log(values) against log(rs) by (weighted) least squares, with a t-based confidence interval.

    Returns (slope, ci_low, ci_high); the interval is slope +- t_{(1+confidence)/2, n-2} * se, with se from the
    weighted residuals (weights ~ 1 / Var(log value), e.g. (mean / se)^2 for Monte-Carlo means). Needs >= 3
    points with >= 2 distinct ranks; values must be > 0. An exact power law gives a zero-width interval.
    """
    rs = as_vector("rs", rs)
    values = as_vector("values", values, rs.shape[0])
    if np.any(rs <= 0):
        raise ValueError("rs must be > 0")
    if np.any(values <= 0):
        raise ValueError("values must be > 0 (their logarithm is fitted)")
    n = rs.shape[0]
    if n < 3 or np.unique(rs).size < 2:
        raise ValueError(f"rs must hold >= 3 points and >= 2 distinct ranks, got {n} points")
    w = np.ones(n) if weights is None else as_vector("weights", weights, n)
    if np.any(w < 0) or not np.any(w > 0):
        raise ValueError("weights must be >= 0 and not all zero")
    conf = finite_scalar("confidence", confidence)
    if not (0.0 < conf < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    t, y = np.log(rs), np.log(values)
    tbar, ybar = np.average(t, weights=w), np.average(y, weights=w)
    sxx = float(np.sum(w * (t - tbar) ** 2))
    if sxx == 0.0:
        raise ValueError("rs must hold >= 2 distinct ranks with positive weight")
    slope = float(np.sum(w * (t - tbar) * (y - ybar)) / sxx)
    resid = y - ybar - slope * (t - tbar)
    s2 = float(np.sum(w * resid**2)) / (n - 2)
    half = float(stats.t.ppf(0.5 + conf / 2.0, n - 2)) * math.sqrt(s2 / sxx)
    return slope, slope - half, slope + half

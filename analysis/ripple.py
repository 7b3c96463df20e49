"""The ripple effect of LoRA's scaling factor through depth (ALLoRA sec. 3.3, Prop. 1).

Deep linear chain (ALLoRA eq. 2 with LoRA on every layer), in the torch.nn.Linear / PEFT convention:

    f_0 = x,   f_l = (W_l + eta B_l A_l) f_{l-1},   l = 1..L,

with W_l (d_l, d_{l-1}), A_l = lora_A (r_l, d_{l-1}), B_l = lora_B (d_l, r_l), x (d_0,). Rectangular
chains and per-layer ranks are allowed. Every norm here is the Euclidean vector norm and the induced
operator (spectral) 2-norm, written ||.||.

The paper's chain, corrected (see ERRATA.md, "ALLoRA sec. 3.3"):

    ||f_L(x)|| <= ||M_L ... M_1|| ||x||                      (induced norm: ||Mx|| <= ||M|| ||x||)
               <= prod_l ||M_l|| ||x||                        (submultiplicativity, not Cauchy-Schwarz)
               <= prod_l (||W_l|| + eta ||B_l A_l||) ||x||    (triangle inequality)
                = C prod_l (1 + eta m_l) ||x||,               m_l = ||B_l A_l|| / ||W_l||, C = prod ||W_l||
               <= C (1 + eta m_bar)^L ||x||,                  m_bar = mean_l m_l (AM-GM)

with M_l = W_l + eta B_l A_l. The paper prints the first step as an equality and ends with
"= Theta((1 + eta)^L)"; the right end is O(C (1 + eta m_bar)^L ||x||), an upper bound only.
All steps are equalities on :func:`tight_instance`; on generic instances every step is strict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.inputs import as_matrix, as_vector, finite_scalar, positive_int

__all__ = [
    "amgm_bound",
    "chain_terms",
    "layer_ratios",
    "output_norm",
    "product_bound",
    "product_operator_norm",
    "random_chain",
    "tight_instance",
]


def _chain(Ws, As, Bs, eta, x=None):
    """Validate a LoRA chain; return lists of float64 matrices, eta and x (or None)."""
    if isinstance(Ws, np.ndarray) and Ws.ndim == 2:
        raise ValueError("Ws must be a sequence of weight matrices, one per layer, not a single matrix")
    Ws, As, Bs = list(Ws), list(As), list(Bs)
    L = len(Ws)
    if L < 1:
        raise ValueError("Ws must hold at least one layer")
    if len(As) != L or len(Bs) != L:
        raise ValueError(f"As and Bs must have one matrix per layer: len(Ws)={L}, len(As)={len(As)}, "
                         f"len(Bs)={len(Bs)}")
    eta = finite_scalar("eta", eta, nonnegative=True)
    Wv, Av, Bv = [], [], []
    d_prev = None
    for l in range(L):
        W = as_matrix(f"Ws[{l}]", Ws[l], (None, d_prev))
        d_out, d_in = W.shape
        A = as_matrix(f"As[{l}]", As[l], (None, d_in))
        B = as_matrix(f"Bs[{l}]", Bs[l], (d_out, A.shape[0]))
        Wv.append(W)
        Av.append(A)
        Bv.append(B)
        d_prev = d_out
    xv = None if x is None else as_vector("x", x, Wv[0].shape[1])
    return Wv, Av, Bv, eta, xv


def _spec(M: np.ndarray) -> float:
    """Spectral (operator 2-) norm."""
    return float(np.linalg.norm(M, 2))


def output_norm(Ws: Sequence, As: Sequence, Bs: Sequence, eta: float, x) -> float:
    """||f_L(x)||_2 with f_l = (W_l + eta B_l A_l) f_{l-1}, f_0 = x (ALLoRA sec. 3.3)."""
    Wv, Av, Bv, eta, f = _chain(Ws, As, Bs, eta, x)
    for W, A, B in zip(Wv, Av, Bv, strict=True):
        f = W @ f + eta * (B @ (A @ f))
    return float(np.linalg.norm(f))


def product_operator_norm(Ws: Sequence, As: Sequence, Bs: Sequence, eta: float) -> float:
    """||M_L ... M_1||_2, M_l = W_l + eta B_l A_l: the best constant in ||f_L(x)|| <= c ||x||.

    The paper's first line writes ||f_L(x)|| = ||M_L ... M_1|| ||x|| (an equality); it is "<=", with
    equality iff x lies in the top right singular subspace of the product.
    """
    Wv, Av, Bv, eta, _ = _chain(Ws, As, Bs, eta)
    P = np.eye(Wv[0].shape[1])
    for W, A, B in zip(Wv, Av, Bv, strict=True):
        P = (W + eta * (B @ A)) @ P
    return _spec(P)


def layer_ratios(Ws: Sequence, As: Sequence, Bs: Sequence) -> np.ndarray:
    """m_l = ||B_l A_l||_2 / ||W_l||_2 per layer, shape (L,) (ALLoRA sec. 3.3, below the chain)."""
    Wv, Av, Bv, _, _ = _chain(Ws, As, Bs, 0.0)
    out = np.empty(len(Wv))
    for l, (W, A, B) in enumerate(zip(Wv, Av, Bv, strict=True)):
        nw = _spec(W)
        if nw == 0.0:
            raise ValueError(f"Ws[{l}] is zero: m_l = ||B_l A_l|| / ||W_l|| is undefined")
        out[l] = _spec(B @ A) / nw
    return out


def product_bound(Ws: Sequence, As: Sequence, Bs: Sequence, eta: float, x) -> float:
    """prod_l (||W_l||_2 + eta ||B_l A_l||_2) ||x||_2: submultiplicativity + triangle inequality.

    Equality needs every M_l to be aligned with W_l and B_l A_l (shared top singular pair) and the chain
    to pass the top singular vector from layer to layer (see :func:`tight_instance`).
    """
    Wv, Av, Bv, eta, xv = _chain(Ws, As, Bs, eta, x)
    out = float(np.linalg.norm(xv))
    for W, A, B in zip(Wv, Av, Bv, strict=True):
        out *= _spec(W) + eta * _spec(B @ A)
    return out


def amgm_bound(Ws: Sequence, As: Sequence, Bs: Sequence, eta: float, x) -> float:
    """C (1 + eta m_bar)^L ||x||_2, C = prod ||W_l||_2, m_bar = mean_l ||B_l A_l||_2 / ||W_l||_2.

    From prod_l (1 + eta m_l) <= (1 + eta m_bar)^L (AM-GM on the L nonnegative numbers 1 + eta m_l);
    equality iff all m_l are equal (or eta = 0). The paper's last step "= Theta((1 + eta)^L)" drops
    m_bar (and C) and claims a lower bound the chain does not give (ERRATA.md).
    """
    Wv, Av, Bv, eta, xv = _chain(Ws, As, Bs, eta, x)
    m = layer_ratios(Wv, Av, Bv)
    C = float(np.prod([_spec(W) for W in Wv]))
    return C * (1.0 + eta * float(np.mean(m))) ** len(Wv) * float(np.linalg.norm(xv))


def chain_terms(Ws: Sequence, As: Sequence, Bs: Sequence, eta: float, x) -> dict[str, float]:
    """Every term of the (corrected) chain, left to right, for one instance.

    Keys: ``output`` ||f_L(x)||, ``operator`` ||M_L...M_1|| ||x||, ``submultiplicative`` prod ||M_l|| ||x||,
    ``product`` (= ``ratio_product`` = C prod (1 + eta m_l) ||x||), ``amgm`` C (1 + eta m_bar)^L ||x||,
    ``paper_theta`` C (1 + eta)^L ||x|| (the printed right end, with its constant), ``m_bar``, ``C``.
    Each is <= the next one, except ``paper_theta``, which is neither a lower nor an upper bound.
    """
    Wv, Av, Bv, eta, xv = _chain(Ws, As, Bs, eta, x)
    nx = float(np.linalg.norm(xv))
    m = layer_ratios(Wv, Av, Bv)
    wn = np.array([_spec(W) for W in Wv])
    C = float(np.prod(wn))
    sub = nx * float(np.prod([_spec(W + eta * (B @ A)) for W, A, B in zip(Wv, Av, Bv, strict=True)]))
    return {
        "output": output_norm(Wv, Av, Bv, eta, xv),
        "operator": product_operator_norm(Wv, Av, Bv, eta) * nx,
        "submultiplicative": sub,
        "product": product_bound(Wv, Av, Bv, eta, xv),
        "ratio_product": C * float(np.prod(1.0 + eta * m)) * nx,
        "amgm": amgm_bound(Wv, Av, Bv, eta, xv),
        "paper_theta": C * (1.0 + eta) ** len(Wv) * nx,
        "m_bar": float(np.mean(m)),
        "C": C,
    }


def random_chain(rng: np.random.Generator, L: int, d: int, r: int, m: float):
    """A generic LoRA chain of Prop. 1: W_l (d, d) Gaussian / sqrt(d), A_l (r, d) Gaussian / sqrt(d), B_l (d, r)
    Gaussian rescaled so that m_l = ||B_l A_l|| / ||W_l|| (spectral norms) = m u_l with u_l ~ U(0.5, 1.5); and
    x (d,) Gaussian. Returns ``(Ws, As, Bs, x)``; draws, in this order, W_l, A_l, B_l, u_l for each layer, then x,
    from ``rng`` (a caller may keep drawing from it, e.g. an output gradient)."""
    L, d, r = positive_int("L", L), positive_int("d", d), positive_int("r", r)
    m = finite_scalar("m", m, positive=True)
    Ws, As, Bs = [], [], []
    for _ in range(L):
        W = rng.standard_normal((d, d)) / np.sqrt(d)
        A = rng.standard_normal((r, d)) / np.sqrt(d)
        B = rng.standard_normal((d, r))
        B *= m * rng.uniform(0.5, 1.5) * np.linalg.norm(W, 2) / np.linalg.norm(B @ A, 2)
        Ws.append(W)
        As.append(A)
        Bs.append(B)
    return Ws, As, Bs, rng.standard_normal(d)


def tight_instance(L: int, d: int, r: int, eta: float, m: float, seed: int = 0):
    """A chain on which every inequality of the ripple chain is an equality.

    Returns ``(Ws, As, Bs, x)`` with W_l (d, d), A_l (r, d), B_l (d, r), x (d,). Construction: a random
    orthonormal basis Q shared by all layers, e = Q[:, 0]; W_l = c_l e e^T + (a random block on e-perp with
    spectral norm 0.9 c_l); B_l A_l = m c_l e e^T + (a random rank r-1 block on e-perp with norm 0.5 m c_l),
    A_l and B_l then mixed by a random (r, r) matrix of condition number <= 4 (B_l A_l unchanged); x = t e.
    So M_l e = c_l (1 + eta m) e, ||M_l|| = ||W_l|| + eta ||B_l A_l|| = c_l (1 + eta m), every m_l = m, and
    ||f_L(x)|| = C (1 + eta m)^L ||x|| exactly; the scales c_l ~ U(0.5, 2) and t differ between layers/seeds.
    """
    L = positive_int("L", L)
    d = positive_int("d", d)
    r = positive_int("r", r)
    eta = finite_scalar("eta", eta, nonnegative=True)
    m = finite_scalar("m", m, nonnegative=True)
    if d < 2:
        raise ValueError(f"d must be >= 2 (a top direction plus its complement), got {d}")
    if r > d:
        raise ValueError(f"r must be <= d, got r={r}, d={d}")
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    e, P = Q[:, 0], Q[:, 1:]
    Ws, As, Bs = [], [], []
    for _ in range(L):
        c = float(rng.uniform(0.5, 2.0))
        K = rng.standard_normal((d - 1, d - 1))
        K *= 0.9 * c / _spec(K)
        Ws.append(c * np.outer(e, e) + P @ K @ P.T)
        # B A = m c e e^T + Pb Pa, with Pb (d, r-1), Pa (r-1, d) living on e-perp
        a_rows = [e]
        b_cols = [m * c * e]
        if r > 1:
            Ra = rng.standard_normal((r - 1, d - 1)) @ P.T
            Rb = P @ rng.standard_normal((d - 1, r - 1))
            s = _spec(Rb @ Ra)
            Rb *= 0.5 * m * c / s if s > 0 else 0.0
            a_rows += list(Ra)
            b_cols += list(Rb.T)
        A0 = np.vstack(a_rows)
        B0 = np.column_stack(b_cols)
        # random well-conditioned mixing T = U diag(t) V^T (cond(T) <= 4): B A is unchanged
        U, _ = np.linalg.qr(rng.standard_normal((r, r)))
        V, _ = np.linalg.qr(rng.standard_normal((r, r)))
        t = rng.uniform(0.5, 2.0, size=r)
        As.append((U * t) @ V.T @ A0)
        Bs.append(B0 @ (V / t) @ U.T)
    x = float(rng.uniform(0.5, 2.0)) * e
    return Ws, As, Bs, x

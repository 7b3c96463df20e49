"""Verify rows for :mod:`analysis.dropout` (ALLoRA sec. 3.1-3.2, app. A).

The oracle (:func:`enumerate_oracle`) is independent of the closed forms: a plain torch forward pass for every
joint dropout mask, autograd for its gradient, exact mask probabilities for the averages.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from analysis import dropout as dr
from analysis._masks import enumerate_masks
from analysis.streams import stream_seed
from analysis.verify import check, row

TOPIC = "dropout"


def random_problem(seed: int, N=2, d_in=3, d_out=2, r=2):
    """A random LoRA least-squares problem (X, Y, W, A, B) in the PEFT convention."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, d_in)), rng.normal(size=(N, d_out)), 0.5 * rng.normal(size=(d_out, d_in)),
            rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)))


def one_mask_loss(X, Y, W, A, B, mask, placement: str, scaling: float):
    """L for one joint mask, as the plain forward pass a user would write (torch tensors)."""
    if placement == "bottleneck":
        adapter = ((X @ A.T) * mask) @ B.T
    else:
        adapter = ((X * mask) @ A.T) @ B.T
    return ((Y - X @ W.T - scaling * adapter) ** 2).sum()


def enumerate_oracle(X, Y, W, A, B, p: float, placement: str, scaling: float):
    """Exact ((E L, Var L), (E gA, Var gA), (E gB, Var gB)) by enumerating all 2^(N K) joint masks."""
    t = [torch.tensor(v, dtype=torch.float64) for v in (X, Y, W, A, B)]
    N = X.shape[0]
    K = A.shape[0] if placement == "bottleneck" else X.shape[1]
    masks, probs = enumerate_masks(N * K, p)
    masks_t = torch.tensor(masks.reshape(-1, N, K))

    def loss(A_, B_, m):
        return one_mask_loss(t[0], t[1], t[2], A_, B_, m, placement, scaling)

    values = torch.func.vmap(loss, in_dims=(None, None, 0))(t[3], t[4], masks_t).numpy()
    gA, gB = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(t[3], t[4], masks_t)

    def moments(vals):
        mean = np.tensordot(probs, vals, axes=1)
        return mean, np.tensordot(probs, (vals - mean) ** 2, axes=1)

    return moments(values), moments(gA.numpy()), moments(gB.numpy())


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@check(TOPIC)
def enumeration(seed: int):
    for placement in ("bottleneck", "input"):
        errs = {"E[L]": 0.0, "Var[L]": 0.0, "grad E[L] (closed form)": 0.0, "Var[grad]": 0.0}
        for k, p in enumerate((0.1, 0.5, 0.9)):
            X, Y, W, A, B = random_problem(stream_seed(seed, "verify-dropout-enumeration", k), N=2, d_in=3, d_out=2, r=3)
            (mL, vL), (mA, vA), (mB, vB) = enumerate_oracle(X, Y, W, A, B, p, placement, 0.7)
            kw = dict(placement=placement, scaling=0.7)
            gA, gB = dr.expected_loss_grad(X, Y, W, A, B, p, **kw)
            _, var_A, _, var_B = dr.grad_moments(X, Y, W, A, B, p, **kw)
            errs["E[L]"] = max(errs["E[L]"], _rel(dr.expected_loss(X, Y, W, A, B, p, **kw), mL))
            errs["Var[L]"] = max(errs["Var[L]"], _rel(dr.loss_variance(X, Y, W, A, B, p, **kw), vL))
            errs["grad E[L] (closed form)"] = max(
                errs["grad E[L] (closed form)"], _rel(gA, mA), _rel(gB, mB))
            errs["Var[grad]"] = max(errs["Var[grad]"], _rel(var_A, vA), _rel(var_B, vB))
        for what, err in errs.items():
            yield row(TOPIC, f"{what} = enumeration of all masks ({placement})", err, "rel. error < 1e-10",
                      err < 1e-10)


@check(TOPIC)
def finite_differences(seed: int):
    X, Y, W, A, B = random_problem(stream_seed(seed, "verify-dropout-fd"), N=6, d_in=5, d_out=4, r=3)
    h, p = 1e-6, 0.3
    for placement in ("bottleneck", "input"):
        gA, _ = dr.expected_loss_grad(X, Y, W, A, B, p, placement=placement, scaling=1.3)
        fd = np.zeros_like(A)
        for idx in np.ndindex(A.shape):
            up, dn = A.copy(), A.copy()
            up[idx] += h
            dn[idx] -= h
            fd[idx] = (dr.expected_loss(X, Y, W, up, B, p, placement=placement, scaling=1.3)
                       - dr.expected_loss(X, Y, W, dn, B, p, placement=placement, scaling=1.3)) / (2 * h)
        err = _rel(gA, fd)
        yield row(TOPIC, f"grad_A E[L] = central finite differences ({placement})", err, "rel. error < 1e-7",
                  err < 1e-7)


@check(TOPIC)
def monte_carlo(seed: int):
    X, Y, W, A, B = random_problem(stream_seed(seed, "verify-dropout-mc"), N=64, d_in=32, d_out=8, r=4)
    n, p = 100_000, 0.2
    for placement in ("bottleneck", "input"):
        L = dr.sample_loss(X, Y, W, A, B, p, n, placement=placement,
                          seed=stream_seed(seed, "verify-dropout-mc-masks", placement))
        mu = dr.expected_loss(X, Y, W, A, B, p, placement=placement)
        var = dr.loss_variance(X, Y, W, A, B, p, placement=placement)
        z = (L.mean() - mu) / math.sqrt(var / n)
        c = (L - mu) ** 2
        z_var = (c.mean() - var) / (c.std() / math.sqrt(n))
        yield row(TOPIC, f"MC mean of 1e5 sampled losses vs E[L] ({placement})", float(z), "|z| <= 5", abs(z) <= 5)
        yield row(TOPIC, f"MC variance of sampled losses vs exact Var[L] ({placement})", float(z_var), "|z| <= 5",
                  abs(z_var) <= 5)


@check(TOPIC)
def deviation_bound(seed: int):
    X, Y, W, A, B = random_problem(stream_seed(seed, "verify-dropout-deviation"), N=16, d_in=8, d_out=4, r=3)
    p, groups = 0.3, 4000
    mu = dr.expected_loss(X, Y, W, A, B, p)
    std = math.sqrt(dr.loss_variance(X, Y, W, A, B, p))
    for n in (1, 256):
        L = dr.sample_loss(X, Y, W, A, B, p, n * groups,
                           seed=stream_seed(seed, "verify-dropout-deviation-masks", n)).reshape(groups, n)
        dev = np.abs(L.mean(axis=1) - mu)
        se = dev.std() / math.sqrt(groups)
        ratio = dev.mean() / float(dr.deviation_bound(std, n))
        yield row(TOPIC, f"E|mean_n - E L| / (Std/sqrt n) at n={n} (app. A bound)", float(ratio),
                  "<= 1 (+5 SE)", dev.mean() <= float(dr.deviation_bound(std, n)) + 5 * se)
        if n == 256:
            z = (dev.mean() - float(dr.deviation_clt(std, n))) / se
            yield row(TOPIC, "same ratio vs CLT limit sqrt(2/pi)=0.798 at n=256", float(z), "|z| <= 5", abs(z) <= 5)


@check(TOPIC)
def paper_discrepancies(seed: int):
    X, Y, W, A, B = random_problem(stream_seed(seed, "verify-dropout-printed-grad-b"), N=6, d_in=4, d_out=3, r=2)
    p = 0.2
    _, gB = dr.expected_loss_grad(X, Y, W, A, B, p)
    Ap, Bp, R = A.T, B.T, Y - X @ W.T  # the paper's A (D x R) and B (R x C)
    XA = X @ Ap
    lam = 1 - p
    printed = -Ap.T @ X.T @ R + (Ap.T @ X.T @ X @ Ap
                                 + (1 - lam) / lam * np.diag([XA[i] @ XA[i] for i in range(Bp.shape[0])])) @ Bp
    ratio = float(np.linalg.norm(gB) / np.linalg.norm(printed))
    yield row(TOPIC, "sec 3.2 printed grad_B E[L] (rows of XA, no factor 2): |true|/|printed|", ratio,
              "!= 1: erratum shown", abs(ratio - 1) > 1e-3)
    # linear dropout: equivalence with Tikhonov only for whitened inputs
    rng = np.random.default_rng(stream_seed(seed, "verify-dropout-linear"))
    Xl, Yl = rng.normal(size=(50, 5)), rng.normal(size=(50, 2))
    Q, _ = np.linalg.qr(Xl)
    Xw = 2.0 * Q
    gap_w = _rel(dr.ridge_minimizer(Xw, Yl, dr.ridge_lambda(4.0, 0.3)), dr.linear_minimizer(Xw, Yl, 0.3))
    yield row(TOPIC, "linear dropout = Tikhonov(lam = c p/(1-p)) when X^T X = cI", gap_w, "rel. gap < 1e-12",
              gap_w < 1e-12)
    c_mean = float(np.trace(Xl.T @ Xl) / 5)
    gap = _rel(dr.ridge_minimizer(Xl, Yl, dr.ridge_lambda(c_mean, 0.3)), dr.linear_minimizer(Xl, Yl, 0.3))
    yield row(TOPIC, "... and differs for non-whitened X (c = mean eigenvalue)", gap, "rel. gap > 1e-3",
              gap > 1e-3)
    # D2: the printed "rate p = 1/(1+lam)" with PyTorch's rate (probability of zeroing)
    lam_r = 0.5
    torch_rate = 1 / (1 + lam_r)
    n_draws = 200_000
    with torch.random.fork_rng():
        torch.manual_seed(stream_seed(seed, "verify-dropout-d2-torch"))
        V = torch.nn.Dropout(torch_rate).train()(torch.ones(n_draws, dtype=torch.float64)).numpy()
    coef = float((V**2).mean() - 1)
    se = float((V**2).std() / math.sqrt(n_draws))
    yield row(TOPIC, "D2 torch.nn.Dropout(p=1/(1+lam)): E[V^2]-1 (lam=0.5; printed reading 0.5)", coef,
              "= p/(1-p) = 2 (5 SE)", abs(coef - 2.0) <= 5 * se and abs(coef - 0.5) > 100 * se)
    Q, _ = np.linalg.qr(rng.normal(size=(30, 4)))
    Yq = rng.normal(size=(30, 2))
    W_torch = dr.linear_minimizer(Q, Yq, torch_rate)
    strength = 1.0 / lam_r
    gap_inv = _rel(W_torch, dr.ridge_minimizer(Q, Yq, strength))
    yield row(TOPIC, "D2 ... Tikhonov strength of the minimiser (X^T X = I, claimed 0.5)", strength,
              f"= 1/lam (rel. gap {gap_inv:.1g})", gap_inv < 1e-12 and _rel(W_torch, dr.ridge_minimizer(Q, Yq, lam_r)) > 0.1)
    # D1: the printed minimiser p (X^T X)^{-1} Y^T X (C = D, keep probability 0.7) is not stationary
    keep = 0.7
    Xs, Ys = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    Wp = dr.printed_linear_minimizer(Xs, Ys, keep)
    grad = 2 * Xs.T @ (Xs @ Wp / keep - Ys)
    g_rel = float(np.linalg.norm(grad) / np.linalg.norm(2 * Xs.T @ Ys))
    yield row(TOPIC, "D1 printed 'p (X^T X)^-1 Y^T X', C = D: |grad E L| / |2 X^T Y|", g_rel,
              "> 0.5 (corrected: 0)", g_rel > 0.5)
    # D7: the bound is attained at n = 1 by a symmetric two-point law, and tends to sqrt(2/pi) times it
    r1 = dr.two_point_deviation_ratio(1)
    yield row(TOPIC, "D7 two-point law: E|mean_1 - mu| / Std at n=1", r1, "= 1 (attained)", r1 == 1.0)
    r_inf = dr.two_point_deviation_ratio(10**6)
    yield row(TOPIC, "D7 two-point law: ratio at n=1e6 vs sqrt(2/pi)=0.798", r_inf, "|diff| < 1e-6",
              abs(r_inf - math.sqrt(2 / math.pi)) < 1e-6)


@check(TOPIC)
def fixed_problem_errata(seed: int):
    """D1 (Tikhonov displays), D5 (placements), D6 (A's gradient after the first step): exact numbers on fixed
    problems (independent of ``seed``: ERRATA.md quotes them)."""
    # D1: the printed Tikhonov displays carry the same transposition: not stationary for the ridge objective
    rng = np.random.default_rng(5)
    Xs, Ys, lam = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)), 0.5
    for label, c in (("(X^T X + lam I)^-1 Y^T X", None), ("c/(c+lam) (X^T X)^-1 Y^T X, c = mean eig.", "mean")):
        cc = None if c is None else float(np.trace(Xs.T @ Xs) / 5)
        Wp = dr.printed_ridge_minimizer(Xs, Ys, lam, cc)
        grad = 2 * (Xs.T @ (Xs @ Wp - Ys) + lam * Wp)
        g_rel = float(np.linalg.norm(grad) / np.linalg.norm(2 * Xs.T @ Ys))
        yield row(TOPIC, f"D1 printed Tikhonov '{label}', C = D: |grad| / |2 X^T Y|", g_rel,
                  "> 0.1 (corrected: 0)", g_rel > 0.1)
    # D5: the test's problem (tests/analysis/test_dropout.py::test_placements_give_different_penalties)
    rng = np.random.default_rng(14)
    X, _, _ = rng.normal(size=(64, 32)), rng.normal(size=(64, 8)), rng.normal(size=(8, 32))
    A, B = rng.normal(size=(4, 32)), rng.normal(size=(8, 4))
    pb = dr.dropout_penalty(X, A, B, 0.1, placement="bottleneck")
    pi = dr.dropout_penalty(X, A, B, 0.1, placement="input")
    yield row(TOPIC, "D5 penalty, bottleneck (N=64, d_in=32, d_out=8, r=4, p=0.1)", pb, "> 0", pb > 0)
    yield row(TOPIC, "D5 penalty, input (same problem)", pi, "> 0", pi > 0)
    yield row(TOPIC, "D5 bottleneck / input penalty - 1 (same problem)", pb / pi - 1, "|.| > 0.01 (placements differ)",
              abs(pb / pi - 1) > 0.01)
    # D6: ||grad_A E L|| / ||grad_B E L|| from B = 0 under gradient descent on E[L]
    rng = np.random.default_rng(3)
    X, Y, W = rng.normal(size=(16, 6)), rng.normal(size=(16, 3)), 0.5 * rng.normal(size=(3, 6))
    A = rng.normal(size=(2, 6)) / math.sqrt(6)
    lr = 0.1 / (2 * np.linalg.norm(X, 2) ** 2 * (1 + np.linalg.norm(A, 2) ** 2))
    ratio = dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr, 10)
    half = dr.zero_b_gradient_ratio(X, Y, W, A, 0.1, lr / 2, 1)
    yield row(TOPIC, "D6 |grad_A|/|grad_B| from B = 0, step 0 (N=16, d_in=6, r=2, p=0.1)", float(ratio[0]), "= 0",
              ratio[0] == 0.0)
    yield row(TOPIC, "D6 same, after 1 step (lr = 0.1 / (2 |X|^2 (1 + |A|^2)))", float(ratio[1]),
              "> 0 and ~ lr (half lr: half)", ratio[1] > 0 and abs(ratio[1] / half[1] - 2) < 0.05)
    yield row(TOPIC, "D6 same, after 10 steps", float(ratio[10]), "> after 1 step", ratio[10] > ratio[1])

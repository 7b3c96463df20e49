"""Verify rows for :mod:`analysis.allora_dynamics` (ALLoRA sec. 4.2-4.3 / 6: does ALLoRA regularize like dropout?).

Oracles independent of the closed forms: torch autograd (float64) of the corrected listing 1 and of a row-weighted
MSE with the ALLoRA scale frozen, autograd of the exact average over every joint dropout mask, central
finite differences, scipy quadrature and a hand-derived
instance where ALLoRA's flow raises the loss.
"""

from __future__ import annotations

import numpy as np

from analysis import allora_dynamics as ad
from analysis._masks import enumerate_masks
from analysis.adaptive import allora_function
from analysis.streams import stream_seed
from analysis.verify import check, row

TOPIC = "allora_dynamics"


def _problem(seed: int, N=7, d_in=5, d_out=4, r=3):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, d_in)), rng.normal(size=(N, d_out)), 0.5 * rng.normal(size=(d_out, d_in)),
            rng.normal(size=(r, d_in)), 0.7 * rng.normal(size=(d_out, r)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _mse(X, Y, W, A, B) -> float:
    return float(((Y - X @ W.T - X @ A.T @ B.T) ** 2).sum())


@check(TOPIC)
def allora_flow(seed: int):
    """ALLoRA's velocity = minus the autograd gradient of the corrected listing 1 and of the frozen-scale MSE;
    linear in g: mini-batch velocities add up to the full-batch one."""
    import torch

    err_listing = err_weighted = err_split = 0.0
    fn = allora_function()
    for k, eta in enumerate((0.5, 1.0, 2.0)):
        X, Y, W, A, B = _problem(stream_seed(seed, "verify-allora-flow", k))
        dA, dB = ad.allora_velocity(X, Y, W, A, B, eta)
        R = torch.tensor(Y - X @ W.T)
        At, Bt = (torch.tensor(v, requires_grad=True) for v in (A, B))
        ((R - fn.apply(torch.tensor(X), At, Bt, eta)) ** 2).sum().backward()
        err_listing = max(err_listing, _rel(dA, -At.grad.numpy()), _rel(dB, -Bt.grad.numpy()))
        # sum_i s_i ||R_:i - F_:i||^2 with s_i = 1/sqrt(||(BA)_i,:|| + 1/eta^2) frozen (no graph through s)
        At, Bt = (torch.tensor(v, requires_grad=True) for v in (A, B))
        s = torch.rsqrt(torch.linalg.vector_norm(Bt.detach() @ At.detach(), dim=1) + 1 / eta**2)
        (s * (R - torch.tensor(X) @ At.T @ Bt.T) ** 2).sum().backward()
        err_weighted = max(err_weighted, _rel(dA, -At.grad.numpy()), _rel(dB, -Bt.grad.numpy()))
        parts = [ad.allora_velocity(X[i::3], Y[i::3], W, A, B, eta) for i in range(3)]
        err_split = max(err_split, _rel(sum(p[0] for p in parts), dA), _rel(sum(p[1] for p in parts), dB))
    yield row(TOPIC, "allora_velocity = -autograd of corrected listing 1 (eta .5,1,2)", err_listing,
              "rel. err <= 1e-12", err_listing <= 1e-12)
    yield row(TOPIC, "allora_velocity = -autograd of sum_i s_i||R_i-F_i||^2, s frozen", err_weighted,
              "rel. err <= 1e-12", err_weighted <= 1e-12)
    yield row(TOPIC, "allora_velocity: sum over 3 mini-batches = full batch (linear in g)", err_split,
              "rel. err <= 1e-12", err_split <= 1e-12)
    X, Y, W, A, B = _problem(stream_seed(seed, "verify-allora-flow-od"))
    (lA, lB), (tA, tB) = ad.allora_taper_split(X, Y, W, A, B, 2.0)
    dA, dB = ad.allora_velocity(X, Y, W, A, B, 2.0)
    At, Bt = (torch.tensor(v, requires_grad=True) for v in (A, B))
    ((torch.tensor(Y - X @ W.T) - torch.tensor(X) @ At.T @ Bt.T) ** 2).sum().backward()
    err = max(_rel(lA + tA, dA), _rel(lB + tB, dB), _rel(lA, -2.0 * At.grad.numpy()), _rel(lB, -2.0 * Bt.grad.numpy()))
    yield row(TOPIC, "taper split: eta x (-autograd LoRA grad) + taper = ALLoRA flow", err, "rel. err <= 1e-12",
              err <= 1e-12)


def _mask_averaged_grad(X, Y, W, A, B, p, placement, scaling):
    """grad of E[L] = sum_m P(m) L(m) over all 2^(N K) joint masks: plain batched torch forward + autograd."""
    import torch

    N = X.shape[0]
    K = A.shape[0] if placement == "bottleneck" else X.shape[1]
    masks, probs = enumerate_masks(N * K, p)
    m = torch.tensor(masks.reshape(-1, N, K))
    Xt, Rt = torch.tensor(X), torch.tensor(Y - X @ W.T)
    At, Bt = (torch.tensor(v, requires_grad=True) for v in (A, B))
    adapter = ((Xt @ At.T) * m) @ Bt.T if placement == "bottleneck" else ((Xt * m) @ At.T) @ Bt.T
    losses = ((Rt - scaling * adapter) ** 2).sum(dim=(1, 2))
    (torch.tensor(probs) * losses).sum().backward()
    return At.grad.numpy(), Bt.grad.numpy()


@check(TOPIC)
def dropout_flow(seed: int):
    """dropout_velocity = minus the mask-averaged gradient, by enumerating all joint masks."""
    for placement in ("bottleneck", "input"):
        err = 0.0
        for k, p in enumerate((0.0, 0.2, 0.6)):
            X, Y, W, A, B = _problem(stream_seed(seed, "verify-dropout-flow", k), N=3, d_in=3, d_out=2, r=3)
            mA, mB = _mask_averaged_grad(X, Y, W, A, B, p, placement, 0.7)
            vA, vB = ad.dropout_velocity(X, Y, W, A, B, p, placement=placement, scaling=0.7)
            err = max(err, _rel(vA, -mA), _rel(vB, -mB))
        yield row(TOPIC, f"dropout_velocity = -E[grad L], all masks, p=0,.2,.6 ({placement})", err,
                  "rel. err <= 1e-10", err <= 1e-10)


@check(TOPIC)
def stationary_point(seed: int):
    """Where the loss gradient is 0 (R = X (BA)^T): ALLoRA's velocity is 0, dropout's is not (it shrinks BA)."""
    X, _, W, A, B = _problem(stream_seed(seed, "verify-stationary-point"))
    Y = X @ W.T + X @ (B @ A).T
    scale = np.linalg.norm(B @ A)
    dA, dB = ad.allora_velocity(X, Y, W, A, B, 2.0)
    size = float(max(np.abs(dA).max(), np.abs(dB).max()) / scale)
    yield row(TOPIC, "g = 0: max |ALLoRA velocity| / ||BA||", size, "<= 1e-12", size <= 1e-12)
    for placement in ("bottleneck", "input"):
        vA, vB = ad.dropout_velocity(X, Y, W, A, B, 0.3, placement=placement)
        size = float(max(np.abs(vA).max(), np.abs(vB).max()) / scale)
        yield row(TOPIC, f"g = 0: max |dropout velocity| / ||BA||, p=.3 ({placement})", size, "> 1e-2",
                  size > 1e-2)
        dM = ad.product_velocity(A, B, vA, vB)
        cos = float(np.sum(B @ A * dM) / (scale * np.linalg.norm(dM)))
        yield row(TOPIC, f"g = 0: dropout flow shrinks BA, cos(BA, d(BA)/dt) ({placement})", cos, "< 0", cos < 0)


@check(TOPIC)
def loss_can_rise(seed: int):
    """X = I, W = 0, A = [1, 0], B = [1, 3]^T, eta = 1, Y = [[1, 3], [-1, .4]]: g A^T = 0 and
    dL/dt = -<B^T g, B^T S g> = -4 (-1 + 3 (.4)) (-s_1 + 3 (.4) s_2), s_1 = 1/sqrt 2, s_2 = 1/2: positive."""
    X, W = np.eye(2), np.zeros((2, 2))
    A, B = np.array([[1.0, 0.0]]), np.array([[1.0], [3.0]])
    Y = np.array([[1.0, 3.0], [-1.0, 0.4]])
    dA, dB = ad.allora_velocity(X, Y, W, A, B, 1.0)
    rate = ad.loss_rate(X, Y, W, A, B, dA, dB)
    hand = -4 * (-1.0 + 3 * 0.4) * (-1 / np.sqrt(2.0) + 3 * 0.4 / 2.0)
    h = 1e-5
    fd = (_mse(X, Y, W, A + h * dA, B + h * dB) - _mse(X, Y, W, A - h * dA, B - h * dB)) / (2 * h)
    yield row(TOPIC, "ALLoRA loss rate on the hand instance, dL/dt", rate,
              f"> 0, = hand {hand:.4g} (1e-12)", rate > 0 and abs(rate / hand - 1) <= 1e-12)
    err = abs(fd / rate - 1)
    yield row(TOPIC, "same: central diff. of L along ALLoRA's velocity / loss_rate - 1", float(err),
              "|.| <= 1e-8", err <= 1e-8)
    step = _mse(X, Y, W, A + 1e-3 * dA, B + 1e-3 * dB) - _mse(X, Y, W, A, B)
    yield row(TOPIC, "same: one ALLoRA step (lr 1e-3) changes L by", float(step), "> 0 (loss rises)", step > 0)


@check(TOPIC)
def od_surrogate(seed: int):
    """ALLoRA-OD = LoRA on the reshaped loss psi: psi vs quadrature, psi' vs finite differences, the flow vs
    finite differences of the surrogate along random directions."""
    from scipy import integrate

    rng = np.random.default_rng(stream_seed(seed, "verify-od-surrogate"))
    err_quad = err_grad = err_flow = 0.0
    for eta in (0.5, 2.0):
        c = 1 / eta**2
        for f, r in zip(rng.normal(scale=2.0, size=4), rng.normal(size=4), strict=True):
            want, _ = integrate.quad(lambda u, r=r, c=c: -2 * (r - u) / np.sqrt(abs(u) + c), 0.0, f, epsabs=1e-13,
                                     points=[0.0] if f != 0 else None)
            err_quad = max(err_quad, abs(ad.od_surrogate_loss([[f]], [[r]], eta) - want) / max(abs(want), 1e-12))
        F, R = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
        F[np.abs(F) < 0.05] = 0.3  # keep the central difference away from the kink of psi'' at 0
        h = 1e-6
        num = np.empty_like(F)
        for idx in np.ndindex(F.shape):
            E = np.zeros_like(F)
            E[idx] = h
            num[idx] = (ad.od_surrogate_loss(F + E, R, eta) - ad.od_surrogate_loss(F - E, R, eta)) / (2 * h)
        err_grad = max(err_grad, _rel(ad.od_surrogate_grad(F, R, eta), num))
        X, Y, W, A, B = _problem(stream_seed(seed, "verify-od-surrogate-problem"))
        Rr = Y - X @ W.T
        dA, dB = ad.od_velocity(X, Y, W, A, B, eta)
        for _ in range(3):
            uA, uB = rng.normal(size=A.shape), rng.normal(size=B.shape)
            psi = lambda t, uA=uA, uB=uB: ad.od_surrogate_loss(X @ (A + t * uA).T @ (B + t * uB).T, Rr, eta)  # noqa
            fd = (psi(1e-6) - psi(-1e-6)) / 2e-6
            err_flow = max(err_flow, abs(-(np.sum(dA * uA) + np.sum(dB * uB)) - fd) / abs(fd))
    yield row(TOPIC, "od_surrogate_loss = quadrature of psi' (8 points, eta .5, 2)", err_quad, "rel. err <= 1e-9",
              err_quad <= 1e-9)
    yield row(TOPIC, "od_surrogate_grad = central diff. of od_surrogate_loss", err_grad, "rel. err <= 1e-6",
              err_grad <= 1e-6)
    yield row(TOPIC, "od_velocity = -grad of surrogate (central diff., 6 directions)", err_flow, "rel. err <= 1e-6",
              err_flow <= 1e-6)

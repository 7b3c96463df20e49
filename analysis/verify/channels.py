"""Verify rows for LoWR: proxy gradients, exact one-step split, equivalent modules, eq. 12 / Algorithm 1."""

from __future__ import annotations

import numpy as np

from analysis.channels import (
    channel_norms,
    channel_significance,
    equivalent_modules,
    equivalent_update_difference,
    lowr_gamma,
    lowr_rescale,
    lowr_rescale_sequential,
    one_step_update,
    proxy_gradients,
)
from analysis.streams import stream_seed
from analysis.verify import check, row

TOPIC = "channels"


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _sgd_product(torch, A, B, X, Y, W, s, lr):
    """One real autograd SGD step on (A, B); returns (G, s B'A', grad_A, grad_B)."""
    At = torch.tensor(A, requires_grad=True)
    Bt = torch.tensor(B, requires_grad=True)
    Xt = torch.tensor(X)
    y = Xt @ torch.tensor(W).T + s * Xt @ At.T @ Bt.T
    loss = 0.5 * ((y - torch.tensor(Y)) ** 2).sum() + torch.cos(y).sum()
    G, gA, gB = torch.autograd.grad(loss, (y, At, Bt))
    with torch.no_grad():
        prod = s * (Bt - lr * gB) @ (At - lr * gA)
    return G.numpy(), prod.numpy(), gA.numpy(), gB.numpy()


@check(TOPIC)
def proxies_and_updates(seed: int):
    import torch

    rng = np.random.default_rng(seed)
    A, B, X, Y, W = (rng.standard_normal(s) for s in ((3, 6), (5, 3), (8, 6), (8, 5), (5, 6)))
    s, lr, n = 1.5, 0.03, 3.0
    G, prod, gA_t, gB_t = _sgd_product(torch, A, B, X, Y, W, s, lr)
    gA, gB = proxy_gradients(A, B, X, G, s)
    err = max(_rel(gA, gA_t), _rel(gB, gB_t))
    yield row(TOPIC, "eq. 5-6 proxy gradients = autograd", err, "max rel. err <= 1e-12", err <= 1e-12)
    u = one_step_update(A, B, X, G, lr, s)
    err = _rel(u["a_term"] + u["b_term"] + u["second_order"], prod - s * B @ A)
    yield row(TOPIC, "a_term + b_term + 2nd order = exact SGD change of sBA", err, "max rel. err <= 1e-12",
              err <= 1e-12)
    An, Bn = equivalent_modules(A, B, n)
    v = one_step_update(An, Bn, X, G, lr, s)
    err = max(_rel(v["a_term"], n**2 * u["a_term"]), _rel(v["b_term"], u["b_term"] / n**2),
              _rel(v["second_order"], u["second_order"]))
    yield row(TOPIC, "Prop. 4.1: (nA, B/n) terms x n^2, x 1/n^2, x 1 (n=3)", err, "max rel. err <= 1e-12",
              err <= 1e-12)
    G2, prod2, _, _ = _sgd_product(torch, An, Bn, X, Y, W, s, lr)
    err = _rel(equivalent_update_difference(A, B, X, G, lr, n, s), prod2 - prod)
    yield row(TOPIC, "equivalent_update_difference = two real SGD steps", err, "max rel. err <= 1e-10",
              err <= 1e-10 and _rel(G2, G) <= 1e-12)


@check(TOPIC)
def lowr(seed: int):
    rng = np.random.default_rng(seed)
    worst_ba = worst_seq = worst_sig = 0.0
    min_gamma = np.inf
    max_ch_gamma = 0.0
    for _ in range(200):
        r, d_in, d_out = (int(v) for v in rng.integers(1, 9, size=3))
        A = rng.standard_normal((r, d_in)) * rng.uniform(0.05, 4, size=(r, 1))
        B = rng.standard_normal((d_out, r)) * rng.uniform(0.05, 4, size=(1, r))
        tau = float(rng.choice([0.3, 1.0, 10.0, np.inf]))
        alpha = float(rng.uniform(0, 3))
        A2, B2 = lowr_rescale(A, B, tau=tau, alpha=alpha)
        # error relative to the size of the summed rank-1 terms (||BA|| itself may be small by cancellation)
        scale = float(np.sum(channel_significance(A, B)))
        worst_ba = max(worst_ba, float(np.linalg.norm(B2 @ A2 - B @ A)) / scale)
        As, Bs = lowr_rescale_sequential(A, B, tau=tau, alpha=alpha)
        worst_seq = max(worst_seq, _rel(A2, As), _rel(B2, Bs))
        worst_sig = max(worst_sig, _rel(channel_significance(A2, B2), channel_significance(A, B)))
        g = lowr_gamma(A, B, alpha)
        min_gamma = min(min_gamma, float(g.min()))
        nb = channel_norms(A, B)[1]
        max_ch_gamma = max(max_ch_gamma, float(abs(g[np.argmax(nb)] - 1)))
    yield row(TOPIC, "Algorithm 1 keeps BA: ||B'A'-BA||_F / sum_i ||a_i|| ||b_i||", worst_ba, "<= 1e-14",
              worst_ba <= 1e-14)
    yield row(TOPIC, "Algorithm 1 keeps every ||a_i|| ||b_i|| (so the variance)", worst_sig, "max rel. err <= 1e-14",
              worst_sig <= 1e-14)
    yield row(TOPIC, "sequential in-place loop = simultaneous update", worst_seq, "max rel. diff <= 1e-13",
              worst_seq <= 1e-13)
    yield row(TOPIC, "eq. 12: min gamma_i over 200 modules", min_gamma, ">= 1", min_gamma >= 1.0)
    yield row(TOPIC, "erratum eq. 12 'gamma > 1': |gamma - 1| of the max-||b|| channel", max_ch_gamma,
              "= 0 (gamma >= 1, not > 1)", max_ch_gamma == 0.0)


@check(TOPIC)
def errata(seed: int):
    rng = np.random.default_rng(seed)
    A, B, X, Y, W = (rng.standard_normal(s) for s in ((3, 6), (5, 3), (8, 6), (8, 5), (5, 6)))

    def loss(A_, B_):
        return 0.5 * float(np.sum((X @ W.T + X @ A_.T @ B_.T - Y) ** 2))

    G = X @ W.T + X @ A.T @ B.T - Y
    gA, gB = proxy_gradients(A, B, X, G)
    lr = 1e-5
    up = loss(A + lr * gA, B + lr * gB) - loss(A, B)
    ratio = up / (lr * (np.sum(gA**2) + np.sum(gB**2)))
    yield row(TOPIC, "erratum eq. 7-8 '+eta grad': dL / (eta ||grad||^2), eta=1e-5", float(ratio),
              "~ +1 (ascent; descent is -1)", up > 0 and abs(ratio - 1) < 1e-2)
    def second_ratio(A_, B_, X_, G_, lr=1e-2):
        u = one_step_update(A_, B_, X_, G_, lr)
        return float(np.linalg.norm(u["second_order"]) / np.linalg.norm(u["a_term"] + u["b_term"]))

    rels = np.array([second_ratio(*(rng.standard_normal(s) for s in ((3, 6), (5, 3), (8, 6), (8, 5))))
                     for _ in range(200)])
    q05, q50, q95 = np.quantile(rels, (0.05, 0.5, 0.95))
    yield row(TOPIC, f"eq. 10-11 drop O(eta^2) (announced): ratio over 200 random layers [{q05:.3f}, {q95:.3f}]",
              float(q50), "median > 0, spread > 2x", q50 > 0 and q95 > 2 * q05)
    yield row(TOPIC, "eq. 10-11 ratio over the 200 layers: 5% quantile", float(q05), "> 0", q05 > 0)
    yield row(TOPIC, "eq. 10-11 ratio over the 200 layers: 95% quantile", float(q95), "> 2 x the 5% quantile",
              q95 > 2 * q05)
    r0 = second_ratio(A, np.zeros_like(B), X, G)
    yield row(TOPIC, "eq. 10-11: ||2nd||/||1st|| at B = 0 (LoRA's start)", r0, "= 0 exactly", r0 == 0.0)
    a, b = rng.standard_normal(5), rng.standard_normal(4)
    b *= 3.0 * np.linalg.norm(a) / np.linalg.norm(b)  # n = ||b|| / ||a|| = 3
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    diff = equivalent_update_difference(a[None, :], b[:, None], (a / na)[None, :], (b / nb)[None, :], 0.1, nb / na)
    tot = one_step_update(a[None, :], b[:, None], (a / na)[None, :], (b / nb)[None, :], 0.1)["total"]
    rel = float(np.linalg.norm(diff) / np.linalg.norm(tot))
    yield row(TOPIC, "erratum Prop. 4.1 '!=': x||a, g||b, n=||b||/||a||: rel. diff", rel,
              f"~ 0 (equal) with n={nb / na:.3g}", rel <= 1e-13 and abs(nb / na - 1) > 1e-3)


@check(TOPIC)
def errata_left_right_and_sign(seed: int):
    import torch

    rng = np.random.default_rng(stream_seed(seed, "verify-channels-left-right"))
    m = n = r = 4
    A, B, x, W, y_target = (rng.standard_normal(s) for s in ((r, n), (m, r), n, (m, n), m))

    def grad_of_right_factor(product):
        At = torch.tensor(A, requires_grad=True)
        Bt = torch.tensor(B, requires_grad=True)
        y = (torch.tensor(W) + product(At, Bt)) @ torch.tensor(x)
        gA, gB = torch.autograd.grad(0.5 * ((y - torch.tensor(y_target)) ** 2).sum(), (At, Bt))
        return gA.numpy(), gB.numpy()

    def off_x(M):  # relative residual of the rows of M after projection on x
        return float(np.linalg.norm(M - np.outer(M @ x, x) / (x @ x)) / np.linalg.norm(M))

    gA, _ = grad_of_right_factor(lambda A_, B_: B_ @ A_)  # W + BA: A is on the right
    _, gB2 = grad_of_right_factor(lambda A_, B_: A_ @ B_)  # literal "B on the right": W + AB
    worst = max(off_x(gA), off_x(gB2))
    yield row(TOPIC, "erratum contributions 'B on the right': right factor's grad off span(x)", worst,
              "<= 1e-13: right = input proxy", worst <= 1e-13)
    # Prop. 4.1 with n = -1: the same trajectory of BA (15 real SGD steps)
    A, B, X, Y, W = (rng.standard_normal(s) for s in ((3, 5), (4, 3), (6, 5), (6, 4), (4, 5)))

    def trajectory(A0, B0):
        At = torch.tensor(A0, requires_grad=True)
        Bt = torch.tensor(B0, requires_grad=True)
        opt = torch.optim.SGD([At, Bt], lr=2e-3)
        out = []
        for _ in range(15):
            opt.zero_grad()
            yv = torch.tensor(X) @ torch.tensor(W).T + torch.tensor(X) @ At.T @ Bt.T
            (0.5 * ((yv - torch.tensor(Y)) ** 2).sum() + torch.cos(yv).sum()).backward()
            opt.step()
            out.append((Bt @ At).detach().numpy().copy())
        return np.array(out)

    base = trajectory(A, B)
    rel = float(np.linalg.norm(trajectory(*equivalent_modules(A, B, -1.0)) - base) / np.linalg.norm(base))
    rel2 = float(np.linalg.norm(trajectory(*equivalent_modules(A, B, 2.0)) - base) / np.linalg.norm(base))
    yield row(TOPIC, "erratum Prop. 4.1 'n != 1': n = -1, 15 SGD steps, rel. difference of BA", rel,
              f"<= 1e-13 (n=2: {rel2:.2g})", rel <= 1e-13 and rel2 > 1e-6)


@check(TOPIC)
def errata_batch_names_and_tau(seed: int):
    """Item 5 (Algorithm 1 line 5's value, fixed draw: ERRATA quotes it), item 8 (Prop. 3.1 for a batch: grad a_i
    in the span of the inputs, parallel to none) and item 9 (tau = inf: nothing bounds ||a_i|| / ||b_i||)."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((5, 4))
    rho = float(lowr_gamma(A, B, 0.1)[0] - 1)
    yield row(TOPIC, "item 5: Algorithm 1 line 5 'r <- ...' for channel 1 (std-normal A (4,6), B (5,4), alpha .1)",
              rho, "a real number, not the rank 4", rho != 4)
    # Prop. 3.1 for a batch of N = 3 inputs (d_in = 8): grad a_i = sum_n (b_i . g_n) x_n
    rng = np.random.default_rng(1)
    A, B, X, G = (rng.standard_normal(s) for s in ((3, 8), (5, 3), (3, 8), (3, 5)))
    gA, _ = proxy_gradients(A, B, X, G)
    Q, _ = np.linalg.qr(X.T)  # orthonormal basis of span{x_n}
    off_span = float(np.max(np.linalg.norm(gA - gA @ Q @ Q.T, axis=1) / np.linalg.norm(gA, axis=1)))
    cos = np.abs(gA @ X.T) / np.outer(np.linalg.norm(gA, axis=1), np.linalg.norm(X, axis=1))
    yield row(TOPIC, "item 8: batch of 3: grad a_i off span{x_n} (max rel.)", off_span, "<= 1e-12 (in the span)",
              off_span <= 1e-12)
    yield row(TOPIC, "item 8: batch of 3: max_i,n |cos(grad a_i, x_n)|", float(cos.max()),
              "< 0.99 (parallel to no input)", cos.max() < 0.99)
    # tau = inf: 30 passes, alpha chosen so that every non-max channel starts with gamma = 1.2 or more
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((5, 4))
    na, nb = channel_norms(A, B)
    moved = nb < nb.max()
    alpha = 0.2 / np.min((nb.max() - nb[moved]) * np.var(na * nb))
    start = na / nb
    Ai, Bi, At, Bt = A, B, A, B
    for _ in range(30):
        Ai, Bi = lowr_rescale(Ai, Bi, tau=np.inf, alpha=alpha)
        At, Bt = lowr_rescale(At, Bt, tau=10.0, alpha=alpha)
    nai, nbi = channel_norms(Ai, Bi)
    growth = float(np.min((nai / nbi)[moved] / start[moved]))
    yield row(TOPIC, "item 9: tau = inf, 30 passes: min growth of ||a_i||/||b_i|| (non-max channels)", growth,
              ">= 1.2^60 = 5.6e4", growth >= 1.2**60 * (1 - 1e-9))
    cap = (1 + alpha * nb.max() * np.var(na * nb)) ** 2
    nat, nbt = channel_norms(At, Bt)
    worst = float(np.max((nat / nbt) / np.maximum(start, 10.0 * cap)))
    yield row(TOPIC, "item 9: tau = 10, 30 passes: max ratio / max(start, tau (1 + alpha max||b|| var)^2)", worst,
              "<= 1 (bounded)", worst <= 1)


@check(TOPIC)
def second_order_one_layer(seed: int):
    """Item 2's example: ||second-order|| / ||first-order|| of one SGD step (lr 1e-2) on one standard-normal layer
    (N = 8, d_in = 6, r = 3, d_out = 5; the draw of tests/analysis/test_channels.py at seed 0, ERRATA quotes it), and
    after the equivalent rescaling (2A, B/2)."""
    rng = np.random.default_rng(0)
    A, B, X, G = (rng.standard_normal(s) for s in ((3, 6), (5, 3), (8, 6), (8, 5)))

    def ratio(A_, B_):
        u = one_step_update(A_, B_, X, G, 1e-2)
        return float(np.linalg.norm(u["second_order"]) / np.linalg.norm(u["a_term"] + u["b_term"]))

    base, moved = ratio(A, B), ratio(*equivalent_modules(A, B, 2.0))
    yield row(TOPIC, "item 2: ||2nd||/||1st||, one std-normal layer, lr 1e-2", base, "> 0", base > 0)
    yield row(TOPIC, "item 2: same after (2A, B/2)", moved, "!= the above (changed by the rescaling)",
              abs(moved / base - 1) > 0.1)

"""Verify rows for ALLoRA sec. 3.3 (ripple effect): the chain of bounds, its tight instance, the errata."""

from __future__ import annotations

import numpy as np

from analysis.ripple import chain_terms, tight_instance
from analysis.streams import stream_seed
from analysis.verify import check, row

TOPIC = "ripple"
ORDER = ("output", "operator", "submultiplicative", "product", "amgm")


def _random_chain(rng, L=4, d=6, r=2):
    Ws = [rng.standard_normal((d, d)) for _ in range(L)]
    As = [rng.standard_normal((r, d)) for _ in range(L)]
    Bs = [rng.standard_normal((d, r)) for _ in range(L)]
    return Ws, As, Bs, rng.standard_normal(d)


@check(TOPIC)
def bounds_hold(seed: int):
    """Each step of the corrected chain holds on 200 random rectangular chains."""
    rng = np.random.default_rng(stream_seed(seed, "verify-ripple-bounds"))
    worst = -np.inf
    for _ in range(200):
        L = int(rng.integers(1, 6))
        dims = rng.integers(1, 7, size=L + 1)
        ranks = rng.integers(1, 4, size=L)
        Ws = [rng.standard_normal((dims[l + 1], dims[l])) for l in range(L)]
        As = [rng.standard_normal((ranks[l], dims[l])) for l in range(L)]
        Bs = [rng.standard_normal((dims[l + 1], ranks[l])) for l in range(L)]
        t = chain_terms(Ws, As, Bs, float(rng.uniform(0, 3)), rng.standard_normal(dims[0]))
        for lo, hi in zip(ORDER, ORDER[1:], strict=False):
            worst = max(worst, (t[lo] - t[hi]) / t[hi])
    yield row(TOPIC, "all 4 steps of the corrected chain hold, 200 random chains",
              float(worst), "max rel. excess <= 1e-12", worst <= 1e-12)


@check(TOPIC)
def tight_equalities(seed: int):
    """tight_instance: every inequality is an equality."""
    Ws, As, Bs, x = tight_instance(6, 8, 3, 0.7, 1.3, seed=stream_seed(seed, "verify-ripple-tight"))
    t = chain_terms(Ws, As, Bs, 0.7, x)
    gap = max(abs(t[k] / t["output"] - 1) for k in ORDER[1:])
    yield row(TOPIC, "tight_instance(L=6,d=8,r=3,eta=.7,m=1.3): all steps equal", float(gap),
              "max rel. gap <= 1e-12", gap <= 1e-12)
    closed = t["C"] * 1.91**6 * float(np.linalg.norm(x))
    err = abs(t["output"] / closed - 1)
    yield row(TOPIC, "tight_instance: ||f_L|| = C (1 + eta m)^L ||x||", float(err), "rel. err <= 1e-12", err <= 1e-12)


@check(TOPIC)
def errata(seed: int):
    """The printed chain's errata, with their sizes."""
    rng = np.random.default_rng(stream_seed(seed, "verify-ripple-errata"))
    Ws, As, Bs, x = _random_chain(rng)
    t = chain_terms(Ws, As, Bs, 0.5, x)
    ratio = t["output"] / t["operator"]
    yield row(TOPIC, "erratum: printed '||f_L||=||prod M|| ||x||' is '<='", float(ratio),
              "ratio < 1", ratio < 1 - 1e-6)
    slack = t["amgm"] / t["ratio_product"] - 1
    yield row(TOPIC, "erratum 'all tight': AM-GM step slack, random chain", float(slack),
              "(1+eta m_bar)^L/prod-1 > 0", slack > 1e-6)
    total = t["amgm"] / t["output"]
    yield row(TOPIC, "erratum 'all tight': AM-GM bound/||f_L||, random", float(total),
              "> 1", total > 1 + 1e-6)
    # Theta((1 + eta)^L) vs (1 + eta m_bar)^L on the tight instance with m = 2, eta = 0.5, L = 8
    Ws, As, Bs, x = tight_instance(8, 5, 2, 0.5, 2.0, seed=stream_seed(seed, "verify-ripple-errata-tight"))
    t = chain_terms(Ws, As, Bs, 0.5, x)
    ratio = t["output"] / t["paper_theta"]
    expected = (2.0 / 1.5) ** 8
    yield row(TOPIC, "erratum 'Theta((1+eta)^L)': ||f_L||/(C(1+eta)^L||x||)", float(ratio),
              f"((1+2eta)/(1+eta))^8={expected:.3g}", abs(ratio / expected - 1) <= 1e-12)
    # Cauchy-Schwarz (Frobenius) vs induced norm on a random chain
    P = np.eye(6)
    Wr, Ar, Br, xr = _random_chain(np.random.default_rng(stream_seed(seed, "verify-ripple-errata-cs")))
    for W, A, B in zip(Wr, Ar, Br, strict=True):
        P = (W + 0.5 * B @ A) @ P
    fro = float(np.linalg.norm(P, "fro") / np.linalg.norm(P, 2))
    yield row(TOPIC, "erratum 'Cauchy-Schwartz': gives ||P||_F; ||P||_F/||P||_2", fro,
              "> 1 (looser than induced)", fro > 1 + 1e-6)


@check(TOPIC)
def two_norms(seed: int):
    """Item 2: with two different norms the first "<=" is false in general: ||f||_2 / ||f||_inf > 1 on
    tight_instance(2, 6, 2, 0.5, 1.0) at seed 0 (ERRATA quotes it)."""
    from analysis.ripple import output_norm

    Ws, As, Bs, x = tight_instance(2, 6, 2, 0.5, 1.0, seed=0)
    f = x
    for W, A, B in zip(Ws, As, Bs, strict=True):
        f = (W + 0.5 * B @ A) @ f
    ratio = float(np.linalg.norm(f, 2) / np.linalg.norm(f, np.inf))
    same = abs(float(np.linalg.norm(f)) / output_norm(Ws, As, Bs, 0.5, x) - 1)
    yield row(TOPIC, "erratum first '<=' with l2 vs l_inf: ||f||_2/||f||_inf, tight_instance(2,6,2,.5,1)", ratio,
              "> 1 (false)", ratio > 1 and same < 1e-12)

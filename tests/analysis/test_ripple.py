"""ALLoRA sec. 3.3 (ripple effect): the chain of bounds, its tight instance and the printed errata."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.inputs import default_seed
from analysis.ripple import (
    amgm_bound,
    chain_terms,
    layer_ratios,
    output_norm,
    product_bound,
    product_operator_norm,
    tight_instance,
)

SEED = default_seed()
REL = 1e-12
ORDER = ("output", "operator", "submultiplicative", "product", "amgm")


def random_chain(rng, dims, ranks):
    """A random rectangular chain with layer widths dims (d_0..d_L) and ranks r_1..r_L."""
    Ws = [rng.standard_normal((dims[l + 1], dims[l])) for l in range(len(ranks))]
    As = [rng.standard_normal((ranks[l], dims[l])) for l in range(len(ranks))]
    Bs = [rng.standard_normal((dims[l + 1], ranks[l])) for l in range(len(ranks))]
    x = rng.standard_normal(dims[0])
    return Ws, As, Bs, x


def explicit_product(Ws, As, Bs, eta):
    """M_L ... M_1 built directly, independently of the module."""
    P = np.eye(Ws[0].shape[1])
    for W, A, B in zip(Ws, As, Bs, strict=True):
        P = (W + eta * B @ A) @ P
    return P


chains = st.integers(1, 5).flatmap(
    lambda L: st.tuples(
        st.lists(st.integers(1, 6), min_size=L + 1, max_size=L + 1),
        st.lists(st.integers(1, 3), min_size=L, max_size=L),
        st.floats(0.0, 3.0),
        st.integers(0, 2**31 - 1),
    )
)


@settings(max_examples=40, deadline=None)
@given(chains)
def test_chain_of_bounds_holds_on_random_chains(case):
    dims, ranks, eta, seed = case
    Ws, As, Bs, x = random_chain(np.random.default_rng(seed), dims, ranks)
    t = chain_terms(Ws, As, Bs, eta, x)
    for lo, hi in zip(ORDER, ORDER[1:], strict=False):
        assert t[lo] <= t[hi] * (1 + REL) + 1e-300, (lo, hi, t)
    assert t["product"] == pytest.approx(t["ratio_product"], rel=REL)
    # direct computation of the output and of the operator-norm step
    P = explicit_product(Ws, As, Bs, eta)
    assert t["output"] == pytest.approx(np.linalg.norm(P @ x), rel=1e-12, abs=1e-300)
    assert t["operator"] == pytest.approx(np.linalg.svd(P, compute_uv=False)[0] * np.linalg.norm(x), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(2, 7), st.integers(1, 7), st.floats(0.0, 3.0), st.floats(0.0, 3.0),
       st.integers(0, 2**31 - 1))
def test_tight_instance_makes_every_step_an_equality(L, d, r, eta, m, seed):
    r = min(r, d)
    Ws, As, Bs, x = tight_instance(L, d, r, eta, m, seed=seed)
    assert [W.shape for W in Ws] == [(d, d)] * L
    assert [A.shape for A in As] == [(r, d)] * L and [B.shape for B in Bs] == [(d, r)] * L
    t = chain_terms(Ws, As, Bs, eta, x)
    for key in ORDER[1:]:
        assert t["output"] == pytest.approx(t[key], rel=1e-12), key
    np.testing.assert_allclose(layer_ratios(Ws, As, Bs), m, rtol=1e-12, atol=1e-15)
    # closed form of the output: C (1 + eta m)^L ||x||
    C = np.prod([np.linalg.svd(W, compute_uv=False)[0] for W in Ws])
    assert t["output"] == pytest.approx(C * (1 + eta * m) ** L * np.linalg.norm(x), rel=1e-12)
    if m > 1e-3:  # the adapter really has rank r (not just the aligned rank-1 part)
        assert np.linalg.matrix_rank(Bs[0] @ As[0]) == r


def test_printed_equality_is_an_inequality():
    """The paper writes ||f_L(x)||_v = ||M_L...M_1||_M ||x||_v: strict on a random instance, equal only along
    the top right singular vector of the product."""
    rng = np.random.default_rng(SEED)
    Ws, As, Bs, x = random_chain(rng, [6, 6, 6, 6], [2, 2, 2])
    out = output_norm(Ws, As, Bs, 1.0, x)
    op = product_operator_norm(Ws, As, Bs, 1.0) * np.linalg.norm(x)
    assert out < 0.99 * op
    _, s, Vt = np.linalg.svd(explicit_product(Ws, As, Bs, 1.0))
    v = Vt[0] * np.linalg.norm(x)
    assert output_norm(Ws, As, Bs, 1.0, v) == pytest.approx(op, rel=1e-12)
    assert op == pytest.approx(s[0] * np.linalg.norm(x), rel=1e-12)


def test_amgm_step_is_strict_unless_all_ratios_are_equal():
    rng = np.random.default_rng(SEED)
    Ws, As, Bs, x = random_chain(rng, [5, 5, 5, 5, 5], [2, 2, 2, 2])
    m = layer_ratios(Ws, As, Bs)
    assert np.ptp(m) > 0
    t = chain_terms(Ws, As, Bs, 0.5, x)
    assert t["amgm"] > t["ratio_product"] * (1 + 1e-6)
    # rescale each B_l so that every m_l = 1.7: the AM-GM step becomes an equality
    Bs_eq = [B * 1.7 / ml for B, ml in zip(Bs, m, strict=True)]
    np.testing.assert_allclose(layer_ratios(Ws, As, Bs_eq), 1.7, rtol=1e-12)
    t_eq = chain_terms(Ws, As, Bs_eq, 0.5, x)
    assert t_eq["amgm"] == pytest.approx(t_eq["ratio_product"], rel=1e-12)
    # eta = 0: AM-GM is trivially an equality and the bound is C ||x||
    t0 = chain_terms(Ws, As, Bs, 0.0, x)
    assert t0["amgm"] == pytest.approx(t0["C"] * np.linalg.norm(x), rel=1e-12)


@pytest.mark.parametrize("m", [0.25, 1.0, 2.0])
def test_printed_theta_one_plus_eta_to_the_L_is_off_unless_m_bar_is_one(m):
    """On the tight instance ||f_L|| / (C (1 + eta)^L ||x||) = ((1 + eta m)/(1 + eta))^L: not Theta(1) in L."""
    eta = 0.5
    ratios = []
    for L in (1, 4, 8):
        Ws, As, Bs, x = tight_instance(L, 5, 2, eta, m, seed=SEED)
        t = chain_terms(Ws, As, Bs, eta, x)
        ratios.append(t["output"] / t["paper_theta"])
        assert ratios[-1] == pytest.approx(((1 + eta * m) / (1 + eta)) ** L, rel=1e-12)
    if m == 1.0:
        np.testing.assert_allclose(ratios, 1.0, rtol=1e-12)
    else:
        assert abs(np.log(ratios[-1])) > 7 * abs(np.log(ratios[0])) > 0  # grows/decays geometrically in L


def test_bounds_monotone_in_eta_and_output_exponential_in_depth():
    rng = np.random.default_rng(SEED)
    Ws, As, Bs, x = random_chain(rng, [4, 5, 3, 4], [1, 2, 2])
    etas = np.linspace(0.0, 3.0, 13)
    pb = [product_bound(Ws, As, Bs, e, x) for e in etas]
    ab = [amgm_bound(Ws, As, Bs, e, x) for e in etas]
    assert np.all(np.diff(pb) > 0) and np.all(np.diff(ab) > 0)
    # tight chain: output / (base output at eta = 0) = (1 + eta m)^L exactly, i.e. exponential in L
    for L in (1, 3, 6):
        Ws, As, Bs, x = tight_instance(L, 4, 2, 0.8, 0.5, seed=SEED + L)
        gain = output_norm(Ws, As, Bs, 0.8, x) / output_norm(Ws, As, Bs, 0.0, x)
        assert gain == pytest.approx(1.4**L, rel=1e-12)


def test_cauchy_schwarz_gives_the_looser_frobenius_bound():
    """Cauchy-Schwarz bounds ||Mx||_2 by ||M||_F ||x||_2; the printed chain needs the induced norm (||Mx|| <=
    ||M|| ||x|| and submultiplicativity). On the tight instance the Frobenius bound is strictly loose."""
    Ws, As, Bs, x = tight_instance(3, 5, 2, 0.5, 1.0, seed=SEED)
    P = explicit_product(Ws, As, Bs, 0.5)
    out = output_norm(Ws, As, Bs, 0.5, x)
    assert out == pytest.approx(product_operator_norm(Ws, As, Bs, 0.5) * np.linalg.norm(x), rel=1e-12)
    assert np.linalg.norm(P, "fro") * np.linalg.norm(x) > 1.001 * out


def test_first_inequality_compares_a_norm_with_itself():
    """||f|| <= ||f||_v is an identity when both are the same norm and false in general otherwise (l2 vs l_inf)."""
    Ws, As, Bs, x = tight_instance(2, 6, 2, 0.5, 1.0, seed=SEED)
    P = explicit_product(Ws, As, Bs, 0.5)
    f = P @ x
    assert np.linalg.norm(f) == pytest.approx(output_norm(Ws, As, Bs, 0.5, x), rel=1e-12)
    assert np.linalg.norm(f, 2) > np.linalg.norm(f, np.inf)  # "||f||_2 <= ||f||_inf" fails


def test_single_layer_enumeration():
    """L = 1 with diagonal matrices: every quantity by hand."""
    W = np.diag([3.0, 1.0])
    A = np.array([[0.0, 1.0]])
    B = np.array([[0.0], [2.0]])  # B A = diag(0, 2)
    x = np.array([0.0, 1.0])
    eta = 0.5
    # M = diag(3, 2): output = 2, operator = 3, product = 3 + 0.5 * 2 = 4, m = 2/3, amgm = 3 (1 + 1/3) = 4
    assert output_norm([W], [A], [B], eta, x) == pytest.approx(2.0, rel=1e-15)
    assert product_operator_norm([W], [A], [B], eta) == pytest.approx(3.0, rel=1e-15)
    assert product_bound([W], [A], [B], eta, x) == pytest.approx(4.0, rel=1e-15)
    assert layer_ratios([W], [A], [B]) == pytest.approx([2 / 3], rel=1e-15)
    assert amgm_bound([W], [A], [B], eta, x) == pytest.approx(4.0, rel=1e-15)


def test_bad_input():
    rng = np.random.default_rng(0)
    Ws, As, Bs, x = random_chain(rng, [3, 4, 2], [1, 2])
    with pytest.raises(ValueError, match="eta"):
        output_norm(Ws, As, Bs, -0.1, x)
    with pytest.raises(ValueError, match="eta"):
        product_bound(Ws, As, Bs, float("nan"), x)
    with pytest.raises(ValueError, match=r"Ws\[1\]"):
        output_norm([Ws[0], Ws[0]], As, Bs, 1.0, x)
    with pytest.raises(ValueError, match=r"As\[0\]"):
        output_norm(Ws, [As[0].T, As[1]], Bs, 1.0, x)
    with pytest.raises(ValueError, match=r"Bs\[1\]"):
        output_norm(Ws, As, [Bs[0], Bs[0]], 1.0, x)
    with pytest.raises(ValueError, match="As and Bs"):
        output_norm(Ws, As[:1], Bs, 1.0, x)
    with pytest.raises(ValueError, match="x"):
        output_norm(Ws, As, Bs, 1.0, np.ones(4))
    with pytest.raises(ValueError, match="x"):
        amgm_bound(Ws, As, Bs, 1.0, np.array([1.0, np.inf, 0.0]))
    with pytest.raises(ValueError, match="Ws"):
        output_norm([], [], [], 1.0, x)
    with pytest.raises(ValueError, match="Ws"):
        output_norm(Ws[0], As, Bs, 1.0, x)
    with pytest.raises(ValueError, match=r"Ws\[0\]"):
        layer_ratios([np.zeros((4, 3)), Ws[1]], As, Bs)
    with pytest.raises(ValueError, match="L"):
        tight_instance(0, 4, 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="r"):
        tight_instance(2, 4, 5, 1.0, 1.0)
    with pytest.raises(ValueError, match="m"):
        tight_instance(2, 4, 2, 1.0, -1.0)
    with pytest.raises(ValueError, match="d"):
        tight_instance(2, 1, 1, 1.0, 1.0)


def test_random_chain_layer_ratios_shapes_and_stream():
    """m_l = ||B_l A_l|| / ||W_l|| lies in m [0.5, 1.5] and differs between layers (so the AM-GM step is strict);
    shapes follow torch.nn.Linear; the stream is reproducible and the caller can keep drawing from it."""
    from analysis.ripple import random_chain

    m = 0.5
    Ws, As, Bs, x = random_chain(np.random.default_rng([SEED, 1]), 6, 10, 3, m)
    assert [W.shape for W in Ws] == [(10, 10)] * 6 and [A.shape for A in As] == [(3, 10)] * 6
    assert [B.shape for B in Bs] == [(10, 3)] * 6 and x.shape == (10,)
    ratios = layer_ratios(Ws, As, Bs)
    assert np.all(ratios >= 0.5 * m - 1e-12) and np.all(ratios <= 1.5 * m + 1e-12)
    assert len(set(np.round(ratios, 12))) == 6
    terms = chain_terms(Ws, As, Bs, 2.0, x)
    assert terms["output"] <= terms["product"] <= terms["amgm"]
    assert terms["product"] < terms["amgm"] * (1 - 1e-6)
    again = random_chain(np.random.default_rng([SEED, 1]), 6, 10, 3, m)
    np.testing.assert_array_equal(again[3], x)
    with pytest.raises(ValueError, match="m"):
        random_chain(np.random.default_rng(0), L=2, d=3, r=1, m=-1.0)

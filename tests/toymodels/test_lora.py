"""Tests for toymodels.lora: PEFT cross-checks, ALLoRA-family gradients against closed forms, placement
semantics, merging, LoWR invariance, LoRA+ groups and input validation. Everything in float64.

PEFT (the reference for lora, rslora, dora) drops out the input of A; the ALLoRA paper (eq. 1) drops out the
bottleneck x A^T. Only the input placement is compared with PEFT; the bottleneck is checked against its
formula with a fixed mask. PEFT's DoRA with dropout also feeds the dropped-out input to the W-part of its
rescaling, so in train mode it is not x W'^T for any single W'; this layer reproduces that too."""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from analysis import adaptive
from analysis.inputs import default_seed
from toymodels.lora import (
    METHODS,
    LoRALinear,
    LoWR,
    inject_lora,
    lora_modules,
    lora_plus_param_groups,
    lowr_gamma,
    scaling_factor,
)

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(default_seed() + offset)


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def make_layer(d_in=6, d_out=5, r=3, *, offset=0, b_std=0.7, **cfg) -> LoRALinear:
    g = gen(offset)
    base = nn.Linear(d_in, d_out, dtype=DT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=DT))
        base.bias.copy_(torch.randn(d_out, generator=g, dtype=DT))
    return LoRALinear(base, r, b_init_std=b_std, generator=g, **cfg)


def run(layer: LoRALinear, x: torch.Tensor, G: torch.Tensor):
    """Output, and the gradients of <G, output> w.r.t. x, A, B (and DoRA's magnitude)."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    params = [layer.lora_A, layer.lora_B] + ([layer.lora_magnitude] if layer.method == "dora" else [])
    grads = torch.autograd.grad((out * G).sum(), [x, *params])
    return out.detach(), grads


class FixedMask(nn.Module):
    """Stands in for nn.Dropout: multiplies by a given scaled mask (placement semantics without randomness)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, t):
        return t * self.mask


def dropout_mask(shape, p, seed) -> torch.Tensor:
    q = 1.0 - p
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DT) < q
    return keep.to(DT) / q


# ------------------------------------------------------------------------------------------------------
# Cross-check against HF PEFT


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 6, dtype=DT)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, 4, dtype=DT)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


PEFT_CASES = {
    "lora": ({"use_rslora": False, "use_dora": False}, {"scaling": "lora", "method": "lora"}),
    "rslora": ({"use_rslora": True, "use_dora": False}, {"scaling": "rslora", "method": "lora"}),
    "dora": ({"use_rslora": False, "use_dora": True}, {"scaling": "lora", "method": "dora"}),
    "rslora_dora": ({"use_rslora": True, "use_dora": True}, {"scaling": "rslora", "method": "dora"}),
}


def peft_and_ours(case: str, dropout: float = 0.0, r: int = 3, alpha: float = 5.0):
    """The same MLP with PEFT's LoRA and with ours on fc1 and fc2, at equal A, B (nonzero) and magnitude."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(default_seed())
    mlp = MLP()
    peft_kw, our_kw = PEFT_CASES[case]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["fc1", "fc2"], **peft_kw)
    theirs = peft.inject_adapter_in_model(config, copy.deepcopy(mlp))
    ours = inject_lora(copy.deepcopy(mlp), ["fc1", "fc2"], r=r, alpha=alpha, dropout=dropout, **our_kw)
    g = gen(1)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            t, o = getattr(theirs, name), getattr(ours, name)
            t.lora_B["default"].weight.copy_(torch.randn(t.lora_B["default"].weight.shape, generator=g, dtype=DT))
            o.lora_A.copy_(t.lora_A["default"].weight)
            o.lora_B.copy_(t.lora_B["default"].weight)
            if our_kw["method"] == "dora":
                # PEFT set m = ||W||_row at B = 0; move it away so the magnitude matters in the comparison
                m = t.lora_magnitude_vector["default"].weight
                m.mul_(1.0 + 0.3 * torch.rand(m.shape, generator=g, dtype=DT))
                o.lora_magnitude.copy_(m)
    return theirs, ours


def model_grads(model, x, G, names):
    x = x.clone().requires_grad_(True)
    out = model(x)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * G).sum(), [x] + [params[n] for n in names])
    return out.detach(), grads


def peft_names(case):
    names = []
    for layer in ("fc1", "fc2"):
        names += [f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"]
        if "dora" in case:
            names.append(f"{layer}.lora_magnitude_vector.default.weight")
    return names


def our_names(case):
    names = []
    for layer in ("fc1", "fc2"):
        names += [f"{layer}.lora_A", f"{layer}.lora_B"] + ([f"{layer}.lora_magnitude"] if "dora" in case else [])
    return names


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("shape", [(9,), (2, 5)])
def test_outputs_and_gradients_equal_peft(case, shape):
    theirs, ours = peft_and_ours(case)
    g = gen(2)
    x = torch.randn(*shape, 7, generator=g, dtype=DT)
    G = torch.randn(*shape, 4, generator=g, dtype=DT)
    out_t, grads_t = model_grads(theirs, x, G, peft_names(case))
    out_o, grads_o = model_grads(ours, x, G, our_names(case))
    torch.testing.assert_close(out_o, out_t, **TOL)
    assert len(grads_t) == len(grads_o)
    for got, want in zip(grads_o, grads_t, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert ours.fc1.scaling == theirs.fc1.scaling["default"]


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_input_dropout_equals_peft_in_train_mode_with_the_same_seed(case):
    """PEFT drops out the input of A (and, for DoRA, feeds it to the W-part too); same RNG stream -> same masks."""
    theirs, ours = peft_and_ours(case, dropout=0.4)
    theirs.train()
    ours.train()
    g = gen(3)
    x = torch.randn(8, 7, generator=g, dtype=DT)
    G = torch.randn(8, 4, generator=g, dtype=DT)
    torch.manual_seed(default_seed() + 11)
    out_t, grads_t = model_grads(theirs, x, G, peft_names(case))
    torch.manual_seed(default_seed() + 11)
    out_o, grads_o = model_grads(ours, x, G, our_names(case))
    torch.testing.assert_close(out_o, out_t, **TOL)
    for got, want in zip(grads_o, grads_t, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    # and dropout really acted: eval-mode outputs differ
    theirs.eval()
    assert not torch.allclose(theirs(x), out_t)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_merged_weight_equals_peft_merge(case):
    theirs, ours = peft_and_ours(case)
    for name in ("fc1", "fc2"):
        want = getattr(theirs, name).get_base_layer().weight.detach().clone()
        layer = getattr(theirs, name)
        layer.merge()
        torch.testing.assert_close(getattr(ours, name).merged_weight(), layer.get_base_layer().weight.detach(), **TOL)
        assert not torch.allclose(want, layer.get_base_layer().weight)


# ------------------------------------------------------------------------------------------------------
# Scaling and initialisation


def test_scaling_rules_enter_the_forward():
    cases = {"lora": 6.0 / 4, "rslora": 6.0 / 2, 0.37: 0.37, (lambda r: r**-0.25): 4**-0.25, (lambda r: r**-2.0): 1 / 16}
    g = gen(4)
    x = torch.randn(5, 6, generator=g, dtype=DT)
    for scaling, s in cases.items():
        layer = make_layer(r=4, alpha=6.0, scaling=scaling)
        assert layer.scaling == pytest.approx(s, rel=1e-15)
        A, B, W, b = layer.lora_A, layer.lora_B, layer.base.weight, layer.base.bias
        want = x @ W.T + b + s * (x @ A.T @ B.T)
        torch.testing.assert_close(layer(x), want, **TOL)


def test_scaling_factor_named_rules():
    assert scaling_factor("lora", 16, 8) == 2.0
    assert scaling_factor("rslora", 16, 64) == 2.0


def test_kaiming_init_is_uniform_with_variance_independent_of_rank():
    """PEFT's default A init, kaiming_uniform_(a=sqrt(5)): U(-c, c), c = 1/sqrt(d_in), Var = c^2/3 for any r."""
    d_in = 256
    c = 1.0 / math.sqrt(d_in)
    for offset, r in enumerate((2, 64)):
        A = make_layer(d_in=d_in, d_out=3, r=r, offset=offset, b_std=0.0).lora_A.detach().numpy().ravel()
        assert np.abs(A).max() <= c
        m2 = np.mean(A**2)
        se = math.sqrt((c**4 / 5 - c**4 / 9) / A.size)  # Var(a^2) = E a^4 - (E a^2)^2 for U(-c, c)
        assert abs(m2 - c**2 / 3) <= 5 * se


def test_gaussian_init_has_std_one_over_r_as_peft():
    r, d_in = 16, 512
    A = make_layer(d_in=d_in, d_out=3, r=r, init="gaussian", b_std=0.0).lora_A.detach().numpy().ravel()
    m2, var = np.mean(A**2), 1.0 / r**2
    assert abs(m2 - var) <= 5 * math.sqrt(2 * var**2 / A.size)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_rank_scaled_init_divides_A_by_sqrt_r(init):
    plain = make_layer(r=9, init=init, offset=5)
    scaled = make_layer(r=9, init=init, offset=5, rank_scaled_init=True)
    torch.testing.assert_close(scaled.lora_A, plain.lora_A / 3.0, rtol=1e-15, atol=0)


def test_b_init():
    assert torch.count_nonzero(make_layer(b_std=0.0).lora_B) == 0
    B = make_layer(d_in=4, d_out=400, r=50, b_std=0.3).lora_B.detach().numpy().ravel()
    assert abs(np.mean(B**2) - 0.09) <= 5 * math.sqrt(2 * 0.09**2 / B.size)


def test_base_is_frozen_and_untouched():
    base = nn.Linear(4, 3, dtype=DT)
    w = base.weight.detach().clone()
    layer = LoRALinear(base, 2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    torch.testing.assert_close(base.weight, w, rtol=0, atol=0)
    x = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: starts at the base


# ------------------------------------------------------------------------------------------------------
# Dropout placement semantics


@pytest.mark.parametrize("placement", ["input", "bottleneck"])
def test_placement_semantics_with_a_fixed_mask(placement):
    """input: s ((x o M) A^T) B^T with M (N, d_in); bottleneck (ALLoRA eq. 1): s ((x A^T) o M) B^T, M (N, r)."""
    layer = make_layer(r=3, alpha=2.0, dropout=0.5, dropout_placement=placement)
    g = gen(6)
    x = torch.randn(10, 6, generator=g, dtype=DT)
    G = torch.randn(10, 5, generator=g, dtype=DT)
    M = dropout_mask((10, 6 if placement == "input" else 3), 0.5, default_seed() + 7)
    layer.lora_dropout = FixedMask(M)
    out, grads = run(layer, x, G)

    A, B = (layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
    xr = x.clone().requires_grad_(True)
    f = ((xr * M) @ A.T @ B.T) if placement == "input" else (((xr @ A.T) * M) @ B.T)
    want = layer.base(xr) + layer.scaling * f
    want_grads = torch.autograd.grad((want * G).sum(), [xr, A, B])
    torch.testing.assert_close(out, want.detach(), **TOL)
    for got, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, w, **TOL)


def test_bottleneck_dropout_draws_one_mask_entry_per_sample_and_rank():
    layer = make_layer(r=4, dropout=0.3, dropout_placement="bottleneck")
    x = torch.randn(50, 6, generator=gen(8), dtype=DT)
    layer.train()
    torch.manual_seed(default_seed() + 9)
    out = layer(x)
    torch.manual_seed(default_seed() + 9)
    M = nn.functional.dropout(torch.ones(50, 4, dtype=DT), 0.3)
    assert set(M.unique().tolist()) == {0.0, 1 / 0.7}
    A, B = layer.lora_A, layer.lora_B
    torch.testing.assert_close(out, layer.base(x) + layer.scaling * ((x @ A.T) * M) @ B.T, **TOL)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + layer.scaling * (x @ A.T @ B.T), **TOL)


# ------------------------------------------------------------------------------------------------------
# ALLoRA family against the closed forms of analysis.adaptive and independent numpy oracles


def allora_oracle(X, A, B, G, eta, mask=None):
    """Numpy: s_i = 1/sqrt(||(BA)_i|| + 1/eta^2); grads of A, B with the row-scaled G, bottleneck mask M."""
    s = 1.0 / np.sqrt(np.linalg.norm(B @ A, axis=1) + 1.0 / eta**2)
    M = np.ones((X.shape[0], A.shape[0])) if mask is None else mask
    Z = (X @ A.T) * M
    Gs = G * s
    return ((G @ B) * M) @ A, ((Gs @ B) * M).T @ X, Gs.T @ Z


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 7), d_in=st.integers(1, 6), d_out=st.integers(1, 6), r=st.integers(1, 5),
    eta=st.floats(0.25, 4.0), three_d=st.booleans(), seed=st.integers(0, 2**16),
)
def test_allora_gradients_equal_closed_form(n, d_in, d_out, r, eta, three_d, seed):
    layer = make_layer(d_in, d_out, r, offset=seed, method="allora", eta=eta)
    g = gen(seed + 1)
    lead = (2, n) if three_d else (n,)
    x = torch.randn(*lead, d_in, generator=g, dtype=DT)
    G = torch.randn(*lead, d_out, generator=g, dtype=DT)
    out, (gx, gA, gB) = run(layer, x, G)
    X2, G2 = npy(x).reshape(-1, d_in), npy(G).reshape(-1, d_out)
    A, B, W = npy(layer.lora_A), npy(layer.lora_B), npy(layer.base.weight)
    want_x, want_A, want_B = adaptive.allora_grads(X2, A, B, G2, eta)
    np.testing.assert_allclose(npy(gA), want_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), want_B, rtol=1e-10, atol=1e-12)
    # the layer's input gradient adds the frozen base's part G W: the adapter's part is not rescaled
    np.testing.assert_allclose(npy(gx).reshape(-1, d_in), want_x + G2 @ W, rtol=1e-10, atol=1e-12)
    oracle = allora_oracle(X2, A, B, G2, eta)
    np.testing.assert_allclose(npy(gA), oracle[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), oracle[2], rtol=1e-10, atol=1e-12)
    # no scaling factor in the forward
    np.testing.assert_allclose(npy(out).reshape(-1, d_out), X2 @ W.T + npy(layer.base.bias) + X2 @ A.T @ B.T,
                               rtol=1e-10, atol=1e-12)


def test_allora_gradient_is_the_row_scaled_gradient_of_BA():
    """g~ = diag(s) G^T X, and grad_A = B^T g~, grad_B = g~ A^T (ALLoRA sec. 4.2) -- in tilde-g form."""
    eta = 1.7
    layer = make_layer(6, 5, 3, method="allora", eta=eta, b_std=1.3)
    g = gen(12)
    x = torch.randn(11, 6, generator=g, dtype=DT)
    G = torch.randn(11, 5, generator=g, dtype=DT)
    _, (_, gA, gB) = run(layer, x, G)
    A, B = npy(layer.lora_A), npy(layer.lora_B)
    BA = B @ A
    gt = np.diag([1 / math.sqrt(np.linalg.norm(BA[i]) + eta**-2) for i in range(5)]) @ npy(G).T @ npy(x)
    np.testing.assert_allclose(npy(gA), B.T @ gt, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), gt @ A.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["allora", "allora_od", "asf"])
def test_adaptive_methods_at_B_zero_equal_lora_with_scaling_eta(method):
    eta = 2.5
    ours = make_layer(method=method, eta=eta, b_std=0.0, offset=13)
    lora = make_layer(scaling=eta, b_std=0.0, offset=13)
    torch.testing.assert_close(ours.lora_A, lora.lora_A, rtol=0, atol=0)
    g = gen(14)
    x = torch.randn(2, 7, 6, generator=g, dtype=DT)
    G = torch.randn(2, 7, 5, generator=g, dtype=DT)
    out_a, grads_a = run(ours, x, G)
    out_l, grads_l = run(lora, x, G)
    torch.testing.assert_close(out_a, out_l, **TOL)
    assert torch.count_nonzero(grads_l[2]) > 0
    for got, want in zip(grads_a, grads_l, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_allora_equals_the_paper_listing_on_3d_input_and_the_listing_fails_on_2d():
    """Listing 1 verbatim (LinearLayer2 supplied): on 3-D input autograd sum-reduces its per-batch parameter
    gradients to ours; on 2-D input its transpose(1, 2) raises IndexError."""
    eta = 2.0
    namespace = {"torch": torch, "LinearLayer2": types.SimpleNamespace(rsq_scale=1.0 / eta**2)}
    exec(adaptive.PAPER_LISTING_1, namespace)
    listing = namespace["ALLoRA"]
    layer = make_layer(method="allora", eta=eta, offset=15)
    g = gen(16)
    x = torch.randn(3, 4, 6, generator=g, dtype=DT)
    G = torch.randn(3, 4, 5, generator=g, dtype=DT)
    _, ours = run(layer, x, G)
    xr = x.clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    out = layer.base(xr) + listing.apply(xr, A, B)
    theirs = torch.autograd.grad((out * G).sum(), [xr, A, B])
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(IndexError):
        x2 = torch.randn(4, 6, dtype=DT, requires_grad=True)
        listing.apply(x2, A, B).sum().backward()


@pytest.mark.parametrize("placement", ["input", "bottleneck"])
def test_allora_with_dropout_gradients_with_a_fixed_mask(placement):
    eta = 1.3
    layer = make_layer(method="allora+d", eta=eta, dropout=0.4, dropout_placement=placement, offset=17)
    g = gen(18)
    x = torch.randn(9, 6, generator=g, dtype=DT)
    G = torch.randn(9, 5, generator=g, dtype=DT)
    M = dropout_mask((9, 6 if placement == "input" else 3), 0.4, default_seed() + 19)
    layer.lora_dropout = FixedMask(M)
    out, (gx, gA, gB) = run(layer, x, G)
    X, Gn, Mn = npy(x), npy(G), npy(M)
    A, B, W, b = npy(layer.lora_A), npy(layer.lora_B), npy(layer.base.weight), npy(layer.base.bias)
    if placement == "input":
        want_x, want_A, want_B = allora_oracle(X * Mn, A, B, Gn, eta)
        want_x = want_x * Mn
        want_out = X @ W.T + b + (X * Mn) @ A.T @ B.T
    else:
        want_x, want_A, want_B = allora_oracle(X, A, B, Gn, eta, mask=Mn)
        want_out = X @ W.T + b + ((X @ A.T) * Mn) @ B.T
    np.testing.assert_allclose(npy(out), want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gx), want_x + Gn @ W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gA), want_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), want_B, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("three_d", [False, True])
def test_allora_od_gradients_equal_the_per_sample_formula(three_d):
    eta = 0.8
    layer = make_layer(method="allora_od", eta=eta, b_std=1.1, offset=20)
    g = gen(21)
    lead = (3, 4) if three_d else (12,)
    x = torch.randn(*lead, 6, generator=g, dtype=DT)
    G = torch.randn(*lead, 5, generator=g, dtype=DT)
    _, (gx, gA, gB) = run(layer, x, G)
    X, Gn = npy(x).reshape(-1, 6), npy(G).reshape(-1, 5)
    A, B, W = npy(layer.lora_A), npy(layer.lora_B), npy(layer.base.weight)
    want_x, want_A, want_B = adaptive.allora_od_grads(X, A, B, Gn, eta)
    np.testing.assert_allclose(npy(gA), want_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), want_B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gx).reshape(-1, 6), want_x + Gn @ W, rtol=1e-10, atol=1e-12)
    # independent per-sample loop: sample n contributes S_n o G_n to row-scaled outer products
    f = X @ A.T @ B.T
    loop_B = sum(np.outer(Gn[k] / np.sqrt(np.abs(f[k]) + eta**-2), A @ X[k]) for k in range(len(X)))
    np.testing.assert_allclose(npy(gB), loop_B, rtol=1e-10, atol=1e-12)


def test_asf_output_and_gradient():
    eta = 1.5
    layer = make_layer(method="asf", eta=eta, b_std=1.2, offset=22)
    g = gen(23)
    x = torch.randn(2, 5, 6, generator=g, dtype=DT)
    G = torch.randn(2, 5, 5, generator=g, dtype=DT)
    out, (gx, gA, gB) = run(layer, x, G)
    X, Gn = npy(x).reshape(-1, 6), npy(G).reshape(-1, 5)
    A, B, W, b = npy(layer.lora_A), npy(layer.lora_B), npy(layer.base.weight), npy(layer.base.bias)
    f = X @ A.T @ B.T
    np.testing.assert_allclose(npy(out).reshape(-1, 5), X @ W.T + b + adaptive.asf_output(f, eta), rtol=1e-10,
                               atol=1e-12)
    Gt = Gn * adaptive.asf_derivative(f, eta)  # the natural gradient through f / sqrt(|f| + 1/eta^2)
    np.testing.assert_allclose(npy(gA), B.T @ Gt.T @ X, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gB), Gt.T @ X @ A.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(npy(gx).reshape(-1, 6), Gt @ B @ A + Gn @ W, rtol=1e-10, atol=1e-12)


def test_allora_runs_in_float32():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, 3, method="allora", b_init_std=0.5, generator=gen(24))
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.shape == (3, 6)


# ------------------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("method", ["lora", "dora", "allora", "allora+d", "allora_od"])
@pytest.mark.parametrize("scaling", ["lora", "rslora"])
def test_merged_weight_reproduces_the_forward(method, scaling):
    adaptive_method = method.startswith("allora")
    cfg = {"method": method, "alpha": 3.0, "dropout": 0.2 if method != "allora" else 0.0}
    if not adaptive_method:
        cfg["scaling"] = scaling
    layer = make_layer(offset=25, **cfg)
    if method == "dora":
        with torch.no_grad():
            layer.lora_magnitude.mul_(1.5)
    layer.eval()
    x = torch.randn(3, 4, 6, generator=gen(26), dtype=DT)
    W = layer.merged_weight()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, W, layer.base.bias), **TOL)
    assert not torch.allclose(W, layer.base.weight)


def test_dora_magnitude_starts_at_the_row_norm():
    layer = make_layer(method="dora", b_std=0.5)
    want = torch.linalg.vector_norm(layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(layer.lora_magnitude, want, **TOL)
    x = torch.randn(4, 6, dtype=DT)
    plain = make_layer(b_std=0.5)
    torch.testing.assert_close(layer(x), plain(x), **TOL)  # m = ||W + sBA|| -> DoRA starts as LoRA


def test_asf_cannot_be_merged():
    with pytest.raises(ValueError, match="asf"):
        make_layer(method="asf").merged_weight()


# ------------------------------------------------------------------------------------------------------
# LoWR


def lowr_algorithm1(A, B, tau, alpha):
    """LoWR Algorithm 1, literally: channels in turn, norms, max and variance recomputed at every channel."""
    A, B = A.copy(), B.copy()
    for i in range(A.shape[0]):
        a, b = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0)
        if b[i] > 0 and a[i] / b[i] < tau:
            gamma = 1.0 + alpha * (b.max() - b[i]) * np.var(a * b)
            A[i] *= gamma
            B[:, i] /= gamma
    return A, B


def test_lowr_gamma_equals_the_sequential_algorithm():
    g = gen(27)
    for tau in (math.inf, 1.0, 0.05):
        A = torch.randn(6, 8, generator=g, dtype=DT)
        B = torch.randn(5, 6, generator=g, dtype=DT) * torch.linspace(0.1, 3.0, 6, dtype=DT)
        gamma = lowr_gamma(A, B, tau=tau, alpha=0.3)
        wantA, wantB = lowr_algorithm1(A.numpy(), B.numpy(), tau, 0.3)
        np.testing.assert_allclose(npy(A * gamma[:, None]), wantA, rtol=1e-13, atol=0)
        np.testing.assert_allclose(npy(B / gamma), wantB, rtol=1e-13, atol=0)
        assert (gamma >= 1).all()
        if tau == math.inf:
            assert int((gamma > 1).sum()) == 5  # every channel except the one with the largest b


def test_lowr_gamma_equals_analysis_channels():
    channels = pytest.importorskip("analysis.channels")
    if not hasattr(channels, "lowr_rescale"):
        pytest.skip("analysis.channels.lowr_rescale not written yet")
    g = gen(28)
    A = torch.randn(5, 7, generator=g, dtype=DT)
    B = torch.randn(4, 5, generator=g, dtype=DT)
    for tau in (math.inf, 2.0):
        gamma = lowr_gamma(A, B, tau=tau, alpha=0.5)
        wantA, wantB = channels.lowr_rescale(A.numpy(), B.numpy(), tau=tau, alpha=0.5)
        np.testing.assert_allclose(npy(A * gamma[:, None]), wantA, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(npy(B / gamma), wantB, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_lowr_step_leaves_the_function_unchanged(method):
    cfg = {"method": method}
    if method == "allora+d":
        cfg["dropout"] = 0.1
    model = inject_lora(nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 3, dtype=DT)),
                        ["0", "2"], r=4, b_init_std=0.8, generator=gen(29), **cfg)
    model.eval()
    x = torch.randn(10, 6, generator=gen(30), dtype=DT)
    before = model(x)
    A_before = model[0].lora_A.detach().clone()
    lowr = LoWR(model, tau=math.inf, alpha=1.0)
    assert lowr.step() > 0
    assert not torch.allclose(model[0].lora_A, A_before)  # it did rescale ...
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)  # ... without changing the function


def test_lowr_every_k_and_threshold_and_optimizer_state():
    model = inject_lora(nn.Sequential(nn.Linear(5, 4, dtype=DT)), ["0"], r=3, b_init_std=0.5, generator=gen(31))
    layer = model[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(6, 5, dtype=DT)).square().sum().backward()
    opt.step()
    state = {k: v.clone() for k, v in opt.state[layer.lora_A].items()}
    lowr = LoWR([layer], tau=math.inf, alpha=1.0, every=3)
    A0 = layer.lora_A.detach().clone()
    assert lowr.step() == 0 and lowr.step() == 0
    torch.testing.assert_close(layer.lora_A, A0, rtol=0, atol=0)
    assert lowr.step() > 0
    assert not torch.allclose(layer.lora_A, A0)
    for k, v in opt.state[layer.lora_A].items():  # the optimizer keeps its state, in the old coordinates
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # tau below every ratio ||a_i|| / ||b_i||: nothing to rescale
    with torch.no_grad():
        ratios = torch.linalg.vector_norm(layer.lora_A, dim=1) / torch.linalg.vector_norm(layer.lora_B, dim=0)
    assert LoWR([layer], tau=float(ratios.min()) * 0.99, alpha=1.0).step() == 0


def test_lowr_at_B_zero_changes_nothing():
    layer = make_layer(b_std=0.0)
    A0 = layer.lora_A.detach().clone()
    assert LoWR([layer], tau=math.inf, alpha=10.0).step() == 0
    torch.testing.assert_close(layer.lora_A, A0, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# LoRA+ and inject_lora


def test_lora_plus_param_groups():
    mlp = MLP()
    model = inject_lora(mlp, ["fc1", "fc2"], r=2, method="dora")
    model.fc2.base.bias.requires_grad_(True)  # an unfrozen extra parameter goes to the default group
    groups = lora_plus_param_groups(model, 1e-3, 16, weight_decay=0.1)
    by_name = {grp["name"]: grp for grp in groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(1.6e-2) and by_name["default"]["lr"] == pytest.approx(1e-3)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by_name["lora_B"]["params"]) == ids([model.fc1.lora_B, model.fc2.lora_B])
    assert ids(by_name["default"]["params"]) == ids([model.fc1.lora_A, model.fc2.lora_A, model.fc1.lora_magnitude,
                                                     model.fc2.lora_magnitude, model.fc2.base.bias])
    opt = torch.optim.AdamW(groups)
    assert sorted(grp["lr"] for grp in opt.param_groups) == pytest.approx([1e-3, 1.6e-2])
    assert all(grp["weight_decay"] == 0.1 for grp in opt.param_groups)


def test_lora_plus_with_lowr_in_a_training_step():
    """LoWR app. A.3 combines LoWR with LoRA+: one SGD step moves B by lr * ratio * grad_B, A by lr * grad_A;
    the LoWR step after it keeps the function."""
    model = inject_lora(MLP(), ["fc1", "fc2"], r=3, b_init_std=0.4, generator=gen(32))
    opt = torch.optim.SGD(lora_plus_param_groups(model, 0.01, 8.0))
    lowr = LoWR(model, tau=math.inf, alpha=0.5)
    x = torch.randn(16, 7, generator=gen(33), dtype=DT)
    A0, B0 = model.fc1.lora_A.detach().clone(), model.fc1.lora_B.detach().clone()
    model(x).square().mean().backward()
    gA, gB = model.fc1.lora_A.grad.clone(), model.fc1.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(model.fc1.lora_A, A0 - 0.01 * gA, **TOL)
    torch.testing.assert_close(model.fc1.lora_B, B0 - 0.08 * gB, **TOL)
    before = model(x).detach()
    assert lowr.step() > 0
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)


def test_inject_lora_targets_and_freezing():
    model = inject_lora(MLP(), ["fc2"], r=2, alpha=4.0, scaling="rslora")
    assert isinstance(model.fc2, LoRALinear) and isinstance(model.fc1, nn.Linear)
    assert model.fc2.scaling == pytest.approx(4.0 / math.sqrt(2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc2.lora_A", "fc2.lora_B"}
    assert lora_modules(model) == [model.fc2]
    nested = inject_lora(nn.Sequential(MLP(), MLP()), "fc1", r=1)  # suffix match, as PEFT
    assert isinstance(nested[0].fc1, LoRALinear) and isinstance(nested[1].fc1, LoRALinear)
    assert isinstance(nested[0].fc2, nn.Linear) and not isinstance(nested[0].fc2, LoRALinear)


@pytest.mark.parametrize(
    ("targets", "match"),
    [(["nope"], "nope"), (["act"], "act"), ([], "targets"), ("", "targets")],
)
def test_inject_lora_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        inject_lora(MLP(), targets, r=2)


# ------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"method": "qlora"}, "method"),
        ({"scaling": "sqrt"}, "scaling"),
        ({"scaling": math.nan}, "scaling"),
        ({"scaling": lambda r: math.inf}, "scaling"),
        ({"init": "orthogonal"}, "init"),
        ({"dropout_placement": "output"}, "dropout_placement"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"method": "allora", "dropout": 0.1}, "dropout"),
        ({"method": "allora", "scaling": "rslora"}, "scaling"),
        ({"b_init_std": -1.0}, "b_init_std"),
        ({"alpha": math.inf}, "alpha"),
    ],
)
def test_bad_layer_arguments(kwargs, name):
    kwargs = {"r": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        LoRALinear(nn.Linear(3, 2), **kwargs)


def test_bad_base_and_plug_in_arguments():
    with pytest.raises(ValueError, match="base"):
        LoRALinear(nn.Conv1d(2, 2, 1), 2)
    layer = make_layer()
    for kwargs, name in [({"tau": 0.0}, "tau"), ({"tau": "x"}, "tau"), ({"alpha": -1.0}, "alpha"),
                         ({"every": 0}, "every")]:
        with pytest.raises(ValueError, match=name):
            LoWR([layer], **{"tau": 1.0, "alpha": 1.0, **kwargs})
    with pytest.raises(ValueError, match="LoRALinear"):
        LoWR(nn.Linear(2, 2), tau=1.0, alpha=1.0)
    for kwargs, name in [({"lr": 0.0}, "lr"), ({"ratio": -2.0}, "ratio")]:
        with pytest.raises(ValueError, match=name):
            lora_plus_param_groups(inject_lora(MLP(), ["fc1"], r=1), **{"lr": 1.0, "ratio": 2.0, **kwargs})
    with pytest.raises(ValueError, match="lora_B"):
        lora_plus_param_groups(MLP(), 1.0, 2.0)
    with pytest.raises(ValueError, match="method"):
        make_layer().reset_magnitude()


def test_adaptive_methods_accept_the_default_scaling_and_ignore_it():
    base = nn.Linear(6, 4)
    for method in ("allora", "allora_od", "asf"):
        layer = LoRALinear(base, 2, 16.0, scaling="lora", method=method, eta=2.0)
        assert layer.scaling == 1.0


# ----------------------------------------------------------------------------------------------------------
# The variants are registered objects: adding one is one class and one registration


def test_the_builtin_variants_are_registered_in_order():
    from toymodels import lora

    assert tuple(lora.VARIANTS) == lora.METHODS == ("lora", "dora", "allora", "allora+d", "allora_od", "asf")
    assert all(isinstance(v, lora.LoRAVariant) and v.name == n for n, v in lora.VARIANTS.items())
    assert lora.ADAPTIVE_METHODS == ("allora", "allora+d", "allora_od", "asf")
    assert LoRALinear(nn.Linear(4, 3), 2, method="dora").variant is lora.VARIANTS["dora"]


@pytest.fixture
def half_lora():
    """A new variant, as a user writes one: LoRA at half the scaling factor, merged accordingly."""
    from toymodels import lora

    class HalfLoRA(lora.LoRAVariant):
        name = "half_lora"

        def scaling(self, layer, scaling):
            return 0.5 * super().scaling(layer, scaling)

    lora.register_variant(HalfLoRA)
    yield HalfLoRA
    del lora.VARIANTS["half_lora"]


def test_a_registered_variant_is_a_method_of_the_layer_and_of_the_config(half_lora):
    from toymodels.config import FinetuneConfig

    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    new = LoRALinear(copy.deepcopy(base), 3, 6.0, method="half_lora", b_init_std=0.5,
                     generator=torch.Generator().manual_seed(1))
    ref = LoRALinear(copy.deepcopy(base), 3, 6.0, scaling=1.0, b_init_std=0.5,
                     generator=torch.Generator().manual_seed(1))  # alpha / r / 2 = 1
    assert new.scaling == 1.0
    x = torch.randn(4, 6)
    torch.testing.assert_close(new(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(new.merged_weight(), ref.merged_weight(), rtol=0, atol=0)
    assert FinetuneConfig(method="half_lora").as_dict()["method"] == "half_lora"


def test_register_variant_bad_input(half_lora):
    from toymodels import lora

    with pytest.raises(ValueError, match="already registered"):
        lora.register_variant(half_lora)
    with pytest.raises(ValueError, match="cls must be a LoRAVariant"):
        lora.register_variant(int)
    with pytest.raises(ValueError, match="cls.name"):
        lora.register_variant(type("Nameless", (lora.LoRAVariant,), {}))
    with pytest.raises(ValueError, match="method must be one of"):
        LoRALinear(nn.Linear(4, 3), 2, method="vera")

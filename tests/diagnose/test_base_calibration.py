"""With the base model (m_l, ripple stacks, intruder dimensions) and a calibration batch (exact dropout penalty
against Monte Carlo over PEFT's own dropout masks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diagnose import diagnose_adapter
from tests.diagnose.conftest import SEED


def _base_and_delta(model, name):
    module = dict(model.named_modules())[name]
    W = module.get_base_layer().weight.detach().double()
    delta = module.get_delta_weight("default").detach().double()
    if module.fan_in_fan_out:
        W, delta = W.T, delta.T
    return W, delta


def test_base_quantities_match_an_independent_svd(llama_with_base):
    model, folder, base_dir, _, _ = llama_with_base
    rep = diagnose_adapter(folder, base=base_dir)
    for lay in rep.layers:
        W, delta = _base_and_delta(model, lay.name)
        m = (torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(W, 2)).item()
        assert lay.base["m"] == pytest.approx(m, rel=1e-5)  # PEFT's delta is float32
        U0, S0, _ = torch.linalg.svd(W)
        U1, S1, _ = torch.linalg.svd(W + delta)
        cos = (U1[:, :10].T @ U0).abs().max(dim=1).values.numpy()
        np.testing.assert_allclose(lay.base["intruder"]["max_abs_cos"], cos, rtol=1e-4)
        # abstention: >= 4 singular values of W within ||delta||_2 of s_j, and < 3/4 of u_j's energy in span(B)
        d2 = torch.linalg.matrix_norm(delta, 2).item()
        cluster = np.array([(abs(S0 - S1[j]) <= d2).sum().item() for j in range(10)])
        QB = torch.linalg.qr(model.get_submodule(lay.name).lora_B["default"].weight.detach().double())[0]
        energy = ((QB.T @ U1[:, :10]) ** 2).sum(0).numpy()
        abstain = (cluster >= 4) & (energy < 0.75)
        assert lay.base["intruder"]["abstained"] == int(abstain.sum())
        assert lay.base["intruder"]["count"] == int(((cos < 0.5) & ~abstain).sum())
    # ripple per stack: prod (1 + m_l) over layers.0 / layers.1 of the same projection, >= 1, AM-GM above it
    assert {st["stack"] for st in rep.stacks} == {"base_model.model.model.layers.*.self_attn.q_proj",
                                                  "base_model.model.model.layers.*.self_attn.v_proj"}
    for st in rep.stacks:
        ms = [rep.layer(st["stack"].replace("*", str(i))).base["m"] for i in (0, 1)]
        assert st["ripple_product"] == pytest.approx((1 + ms[0]) * (1 + ms[1]), rel=1e-12)
        assert st["ripple_product"] <= st["ripple_amgm"] * (1 + 1e-12)
    # the PeftModel brings its own base: same numbers
    same = diagnose_adapter(model)
    assert [lay.base["m"] for lay in same.layers] == pytest.approx([lay.base["m"] for lay in rep.layers], rel=1e-9)


def test_update_dominates_and_intruders_flagged(tmp_path_factory):
    from tests.diagnose.conftest import make_adapter

    model, folder, _ = make_adapter(tmp_path_factory, "llama", steps=0, r=2, lora_alpha=2,
                                    target_modules=["q_proj"])
    mods = dict(model.named_modules())
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    W = mods[name].get_base_layer().weight.detach()
    with torch.no_grad():  # a rank-1 update 3x ||W||_2 along an equal mix of W's 8 weakest singular pairs
        U, S, Vh = torch.linalg.svd(W)
        mods[name].lora_A["default"].weight.zero_()
        mods[name].lora_B["default"].weight.zero_()
        mods[name].lora_A["default"].weight[0] = Vh[-8:].sum(0) / math.sqrt(8)
        mods[name].lora_B["default"].weight[:, 0] = 3 * S[0] * U[:, -8:].sum(1) / math.sqrt(8)
    lay = diagnose_adapter(model).layer(name)
    assert lay.base["m"] == pytest.approx(3.0, rel=1e-5)
    assert "update_dominates" in lay.flags and "intruder_dimensions" in lay.flags
    assert lay.base["intruder"]["count"] >= 1


def _layer_io(model, name, ids):
    """The layer's input X (rows) in the adapted model's eval forward, from a hook of this test."""
    module = dict(model.named_modules())[name]
    got = []
    h = module.register_forward_hook(lambda mod, inp, out: got.append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return module, got[0]


@pytest.mark.parametrize("name", ["base_model.model.model.layers.1.self_attn.q_proj",
                                  "base_model.model.model.layers.0.self_attn.v_proj"])
def test_dropout_penalty_matches_monte_carlo_over_peft_masks(llama_with_base, name):
    import copy

    model, folder, base_dir, ids, cal = llama_with_base
    cal_rep = diagnose_adapter(folder, base=base_dir, calibration=cal).layer(name).calibration
    module, X = _layer_io(model, name, ids)
    layer = copy.deepcopy(module).double()
    X = X.double()
    with torch.no_grad():
        layer.eval()
        Y = layer(X)  # the layer's own dropout-free output is the target
        layer.train()  # PEFT's lora_dropout now draws real masks on the adapter's input
        torch.manual_seed(SEED)
        n = 4000
        L = torch.stack([((layer(X) - Y) ** 2).sum() for _ in range(n)]).numpy()
    assert cal_rep["p"] == 0.1 and cal_rep["n_rows"] == X.shape[0]
    mean_se = L.std(ddof=1) / math.sqrt(n)
    assert abs(L.mean() - cal_rep["expected_loss"]) <= 5 * mean_se
    dev = (L - L.mean()) ** 2
    var_se = dev.std(ddof=1) / math.sqrt(n)
    assert abs(L.var(ddof=1) - cal_rep["std"] ** 2) <= 5 * var_se
    assert cal_rep["penalty"] == pytest.approx(cal_rep["expected_loss"], rel=1e-9)  # target = own output
    assert cal_rep["steps_to_resolve"] == math.ceil(cal_rep["std"] ** 2 / cal_rep["penalty"] ** 2)


def test_calibration_via_peft_forward_equals_via_hooks(llama_with_base):
    model, folder, base_dir, ids, cal = llama_with_base
    a = diagnose_adapter(folder, base=base_dir, calibration=cal)  # plain base + diagnose's hooks
    b = diagnose_adapter(model, calibration=ids)  # PEFT's own forward
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.calibration["penalty"] == pytest.approx(lb.calibration["penalty"], rel=1e-4)
        assert la.calibration["std"] == pytest.approx(lb.calibration["std"], rel=1e-4)


def test_no_dropout_means_no_penalty(tmp_path_factory):
    from tests.diagnose.conftest import make_adapter, token_batch

    model, _, _ = make_adapter(tmp_path_factory, "gpt2", steps=1, r=2, lora_alpha=4, lora_dropout=0.0,
                               target_modules=["c_attn"], fan_in_fan_out=True)
    rep = diagnose_adapter(model, calibration=token_batch(2, 8))
    for lay in rep.layers:
        assert lay.calibration["penalty"] == 0.0 and lay.calibration["steps_to_resolve"] is None
        assert lay.calibration["n_rows"] == 16

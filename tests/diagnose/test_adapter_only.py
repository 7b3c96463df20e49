"""Adapter-only numbers against an independent computation from the PEFT model's own modules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diagnose import DiagnoseError, diagnose_adapter, load_adapter
from tests.diagnose.conftest import make_adapter

ETA, LOWR_ALPHA = 1.5, 0.3


def peft_layers(model, adapter="default"):
    """name -> (A, B, scaling, r, delta (d_out, d_in)) read from PEFT's LoraLayer modules, float64."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            A = module.lora_A[adapter].weight.detach().double()
            B = module.lora_B[adapter].weight.detach().double()
            s = module.scaling[adapter]
            delta = module.get_delta_weight(adapter).detach().double()  # PEFT's own s * B @ A (float32)
            if module.fan_in_fan_out:
                delta = delta.T
            out[name] = (A, B, s, module.r[adapter], delta)
    return out


def test_every_number_matches_peft_modules(trained):
    label, model, folder = trained
    report = diagnose_adapter(folder, eta=ETA, lowr_alpha=LOWR_ALPHA)
    expected = peft_layers(model)
    assert sorted(lay.name for lay in report.layers) == sorted(expected)
    for lay in report.layers:
        A, B, s, r, delta_peft = expected[lay.name]
        delta = s * B @ A
        torch.testing.assert_close(delta, delta_peft, rtol=1e-5, atol=1e-7)  # our test's own delta is PEFT's
        assert lay.r == r and lay.scaling == pytest.approx(s, rel=1e-12), label
        assert lay.norm_A == pytest.approx(torch.linalg.norm(A).item(), rel=1e-12)
        assert lay.norm_B == pytest.approx(torch.linalg.norm(B).item(), rel=1e-12)
        assert lay.norm_BA == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-10)
        sv = torch.linalg.svdvals(delta).numpy()[: min(r, *delta.shape)]
        np.testing.assert_allclose(lay.singular_values, sv, rtol=1e-8, atol=1e-12 * sv[0])
        assert lay.stable_rank == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=1e-8)
        p = sv / sv.sum()
        assert lay.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-8)
        # rsLoRA
        rs = lay.quantities["rslora"]
        assert rs["gamma_sqrt_r"] == pytest.approx(s * math.sqrt(r), rel=1e-12)
        assert rs["dropped_term_ratio"] == pytest.approx((A.shape[1] + 1 - 1.2) / r, rel=1e-12)
        # ALLoRA, rows of the update
        rows = torch.linalg.norm(delta, dim=1).numpy()
        al = lay.quantities["allora"]
        np.testing.assert_allclose(al["row_norms"], rows, rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(al["factors"], 1 / np.sqrt(rows + 1 / ETA**2), rtol=1e-10)
        # LoWR
        na, nb = torch.linalg.norm(A, dim=1).numpy(), torch.linalg.norm(B, dim=0).numpy()
        sig = na * nb
        lw = lay.quantities["lowr"]
        np.testing.assert_allclose(lw["significance"], sig, rtol=1e-12)
        np.testing.assert_allclose(lw["gamma"], 1 + LOWR_ALPHA * (nb.max() - nb) * sig.var(), rtol=1e-12)
        assert lw["corr_with_norm_b"] == pytest.approx(np.corrcoef(sig, nb)[0, 1], rel=1e-9)
        assert lw["corr_with_norm_a"] == pytest.approx(np.corrcoef(sig, na)[0, 1], rel=1e-9)
        assert lw["spread_max_over_min"] == pytest.approx(sig.max() / sig.min(), rel=1e-12)
        assert "dead_adapter" not in lay.flags


def test_regimes_follow_the_dropped_term_ratio(trained):
    _, _, folder = trained
    for lay in diagnose_adapter(folder).layers:
        ratio = (lay.d_in + 1 - 1.2) / lay.r
        want = "large_rank" if ratio <= 0.1 else "small_rank" if ratio >= 10 else "intermediate"
        assert lay.quantities["rslora"]["regime"] == want
        if want == "small_rank":  # rsLoRA's second moment ~ r^-1, LoRA's ~ r^-3 (analysis.rank_scaling)
            beta = 0.5 if lay.quantities["rslora"]["scaling_exponent"] == 0.5 else 1.0
            assert lay.quantities["rslora"]["second_moment_exponent"] == 1 - 4 * beta


def test_folder_and_peft_model_give_the_same_report(trained):
    _, model, folder = trained
    a = diagnose_adapter(folder).to_dict()
    b = diagnose_adapter(model).to_dict()
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["name"] == lb["name"]
        for key in ("r", "alpha", "scaling", "norm_A", "norm_B", "norm_BA", "stable_rank", "effective_rank"):
            assert la[key] == pytest.approx(lb[key], rel=1e-12), key
        assert set(la["flags"]) <= set(lb["flags"])  # the PeftModel also brings base quantities


def test_patterns_resolved_as_peft_does(tmp_path_factory):
    from tests.diagnose.conftest import CONFIGS

    model, folder, _ = make_adapter(tmp_path_factory, "llama", steps=1, **CONFIGS["patterns"][1])
    rep = diagnose_adapter(folder)
    got = {lay.name.removeprefix("base_model.model."): (lay.r, lay.scaling) for lay in rep.layers}
    assert got["model.layers.1.self_attn.q_proj"] == (6, 8 / 6)  # rank_pattern, default alpha
    assert got["model.layers.0.self_attn.q_proj"] == (4, 8 / 4)
    assert got["model.layers.0.self_attn.v_proj"] == (2, 3 / 2)  # both patterns
    assert got["model.layers.0.mlp.down_proj"] == (4, 32 / 4)  # alpha_pattern only
    mods = dict(model.named_modules())
    for lay in rep.layers:  # and PEFT agrees
        assert (lay.r, lay.scaling) == (mods[lay.name].r["default"], mods[lay.name].scaling["default"])


def test_untrained_adapter_is_dead(tmp_path_factory):
    _, folder, _ = make_adapter(tmp_path_factory, "llama", steps=0, r=4, lora_alpha=8, target_modules=["q_proj"])
    rep = diagnose_adapter(folder)
    assert all(lay.flags == ["dead_adapter"] for lay in rep.layers) and rep.flags == ["dead_adapter"]
    assert all(lay.norm_BA == 0 and lay.effective_rank == 0 for lay in rep.layers)
    assert rep.layers[0].norm_A > 0  # A keeps its random init
    assert rep.flag_details["dead_adapter"]["rule"] == "B == 0 or RMS entry of s*B@A < 1e-06"
    assert rep.problems == ["dead_adapter"] and rep.layers[0].problems == ["dead_adapter"]


def test_scale_rank_and_dora_flags(tmp_path_factory):
    # alpha = 8 at r = 64 (> d_out = 32 of v_proj): scaling 1/8 and rank beyond the layer
    _, folder, _ = make_adapter(tmp_path_factory, "llama", steps=1, r=40, lora_alpha=5, target_modules=["v_proj"])
    rep = diagnose_adapter(folder)
    for lay in rep.layers:
        assert {"scale_small", "rank_exceeds_dims"} <= set(lay.flags) and lay.scaling == 5 / 40
        assert len(lay.singular_values) == 32 and lay.quantities["rslora"]["regime"] == "intermediate"
    _, folder, _ = make_adapter(tmp_path_factory, "llama", steps=1, r=4, lora_alpha=64, use_rslora=True,
                                target_modules=["q_proj"])
    assert all("scale_large" in lay.flags and lay.scaling == 32 for lay in diagnose_adapter(folder).layers)


def test_dora_magnitude_reported(tmp_path_factory):
    from tests.diagnose.conftest import CONFIGS

    model, folder, _ = make_adapter(tmp_path_factory, "gpt2", steps=1, **CONFIGS["dora"][1])
    rep = diagnose_adapter(folder)
    mods = dict(model.named_modules())
    for lay in rep.layers:
        mag = mods[lay.name].lora_magnitude_vector["default"].weight.detach().double()
        assert "dora" in lay.flags
        assert lay.dora_magnitude["norm"] == pytest.approx(torch.linalg.norm(mag).item(), rel=1e-12)
        assert lay.dora_magnitude["max"] == pytest.approx(mag.max().item(), rel=1e-12)
    # with the base (the PeftModel's own), the effective DoRA update equals PEFT's merged weight minus W
    with_base = diagnose_adapter(model)
    for lay in with_base.layers:
        module = mods[lay.name]
        W = module.get_base_layer().weight.detach().double().clone()
        module.merge()
        merged = module.get_base_layer().weight.detach().double().clone()
        module.unmerge()
        want = torch.linalg.norm(merged - W).item()
        assert lay.dora_magnitude["norm_effective_update"] == pytest.approx(want, rel=1e-4)  # merge is float32


def test_unsupported_layers_are_named(tmp_path_factory):
    _, folder, _ = make_adapter(tmp_path_factory, "llama", steps=1, r=4, lora_alpha=8,
                                target_modules=["q_proj", "embed_tokens"])
    rep = diagnose_adapter(folder)
    assert [u["name"] for u in rep.unsupported] == ["base_model.model.model.embed_tokens"]
    assert rep.unsupported[0]["kind"] == "embedding" and "unsupported_layer" in rep.flags
    assert len(rep.layers) == 2
    assert "embed_tokens" in rep.table()


def test_bin_weights_and_minimal_safetensors_reader(trained, tmp_path, monkeypatch):
    _, model, folder = trained
    ref = diagnose_adapter(folder).to_dict()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the numpy/torch reader of the format
    for source in (tmp_path / "bin", folder):
        got = diagnose_adapter(source).to_dict()
        assert [lay["norm_BA"] for lay in got["layers"]] == pytest.approx([lay["norm_BA"] for lay in ref["layers"]],
                                                                           rel=1e-12)


def test_json_contract(trained, tmp_path):
    _, _, folder = trained
    rep = diagnose_adapter(folder)
    data = json.loads(rep.to_json(tmp_path / "r.json"))
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert isinstance(data["flags"], list) and isinstance(data["layers"], list) and data["layers"]
    for lay in data["layers"]:
        assert lay["name"].startswith("base_model.model.")
        for key in ("r", "scaling", "norm_A", "norm_B", "norm_BA"):
            assert isinstance(lay[key], int | float), key
        assert isinstance(lay["flags"], list) and all(isinstance(f, str) for f in lay["flags"])
    assert load_adapter(folder).layers[0].A.dtype == np.float64


def test_bad_analysis_settings(trained):
    _, _, folder = trained
    for kwargs in ({"eta": 0.0}, {"eta": float("nan")}, {"lowr_alpha": -1.0}, {"lowr_tau": 0}):
        with pytest.raises(DiagnoseError, match=next(iter(kwargs))):
            diagnose_adapter(folder, **kwargs)


def test_folder_needs_neither_peft_nor_safetensors(monkeypatch):
    """The core install reads a folder with torch and numpy only; the pattern rule is PEFT's, re-stated."""
    import sys

    from tests.diagnose.conftest import CONFIGS

    for name in ("peft", "peft.utils", "peft.utils.other", "safetensors", "safetensors.torch", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    from diagnose.adapter import resolve_rank_alpha

    cfg = {"r": 4, "lora_alpha": 8, **{k: v for k, v in CONFIGS["patterns"][1].items() if k.endswith("pattern")}}
    assert resolve_rank_alpha(cfg, "model.layers.1.self_attn.q_proj") == (6, 8.0, 8 / 6)
    assert resolve_rank_alpha(cfg, "model.layers.11.self_attn.q_proj") == (4, 8.0, 2.0)  # '.1.' is not '.11.'
    assert resolve_rank_alpha(cfg, "model.layers.0.self_attn.v_proj") == (2, 3.0, 1.5)
    assert resolve_rank_alpha({**cfg, "use_rslora": True}, "model.layers.0.mlp.down_proj") == (4, 32.0, 16.0)

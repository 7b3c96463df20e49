"""Flags declared once, the CI contract (--fail-on, JSON Schema, stable types, output paths checked first) and the
cases that used to be silently wrong (missing modules, merged model, another base, base-changing inits, a flat
spectrum's intruders)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnose import FLAGS, DiagnoseError, diagnose_adapter, schema
from diagnose.cli import main
from diagnose.flags import default_thresholds, layer_facts, raised_layer_flags, resolve_fail_on
from tests.diagnose.conftest import SEED, make_adapter, tiny_llama, token_batch

ROOT = Path(__file__).resolve().parents[2]


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def _validate(data):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, schema())
    assert not any(isinstance(v, str) and v in ("inf", "-inf", "nan") for v in _walk(data))


# ------------------------------------------------------------------------------------------ flags as data


def test_every_flag_is_declared_once_with_kind_rule_and_explanation():
    names = [f.name for f in FLAGS]
    assert len(names) == len(set(names))
    for f in FLAGS:
        assert f.kind in ("problem", "note") and f.scope in ("layer", "adapter")
        assert f.rule and f.explanation and "\n" not in f.explanation
        assert (f.test is not None) == (f.scope == "layer")
        assert ("{t}" in f.rule) == (f.threshold is not None), f.name


def _facts(**change):
    base = dict(b_exactly_zero=False, norm_update=1.0, scaling=1.0, r=4, d_in=10, d_out=10, m=0.1,
                intruder_count=0, intruder_abstained=0, steps_to_resolve=1)
    return layer_facts(**{**base, **change})


@pytest.mark.parametrize(("name", "quiet", "raised"), [
    ("dead_adapter", dict(norm_update=1.01e-6 * 10), dict(norm_update=0.99e-6 * 10)),  # RMS = norm / sqrt(100)
    ("dead_adapter", dict(), dict(b_exactly_zero=True)),
    ("update_dominates", dict(m=0.999), dict(m=1.0)),
    ("scale_large", dict(scaling=8.0), dict(scaling=8.01)),
    ("scale_small", dict(scaling=0.25), dict(scaling=0.249)),
    ("rank_exceeds_dims", dict(r=10), dict(r=11)),
    ("intruder_dimensions", dict(intruder_count=0), dict(intruder_count=1)),
    ("intruder_abstained", dict(intruder_abstained=0), dict(intruder_abstained=2)),
    ("dropout_below_noise", dict(steps_to_resolve=100), dict(steps_to_resolve=101)),
    ("dora", dict(dora=False), dict(dora=True)),
])
def test_each_layer_rule_passes_and_fails(name, quiet, raised):
    assert name not in raised_layer_flags(_facts(**quiet))
    assert name in raised_layer_flags(_facts(**raised))
    assert {f.name for f in FLAGS if f.scope == "layer"} >= {name}


def test_thresholds_are_overridable():
    assert "update_dominates" not in raised_layer_flags(_facts(m=1.5), {"update_dominates": 2.0})
    assert "update_dominates" in raised_layer_flags(_facts(m=0.6), {"update_dominates": 0.5})
    assert set(default_thresholds()) == {f.name for f in FLAGS if f.threshold is not None}


def test_unknown_facts_raise_nothing():
    flags = raised_layer_flags(_facts(m=None, intruder_count=None, intruder_abstained=None, steps_to_resolve=None))
    assert not {"update_dominates", "intruder_dimensions", "intruder_abstained", "dropout_below_noise"} & set(flags)


def test_fail_on_spec():
    assert resolve_fail_on("problems") == {f.name for f in FLAGS if f.kind == "problem"}
    assert resolve_fail_on("dead_adapter, scale_small") == {"dead_adapter", "scale_small"}
    with pytest.raises(ValueError, match="unknown flag 'deadadapter'"):
        resolve_fail_on("deadadapter")


def test_monitor_and_report_share_dead_adapter(tmp_path):
    """A tiny nonzero B (RMS of s*B@A below 1e-6): the report and the training monitor both call it dead (the
    monitor used to flag only B == 0)."""
    from peft import LoraConfig, get_peft_model

    from diagnose import AdapterMonitor

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(1e-9)
    report = diagnose_adapter(model)
    record = AdapterMonitor(model, tmp_path / "m.jsonl").log(0)
    assert all("dead_adapter" in lay.flags for lay in report.layers)
    assert all("dead_adapter" in lay["flags"] for lay in record["layers"])


# ------------------------------------------------------------------------------------------ JSON contract


def test_json_validates_against_the_schema(trained):
    _, model, folder = trained
    for rep in (diagnose_adapter(folder), diagnose_adapter(model)):
        for full in (False, True):
            data = json.loads(rep.to_json(full=full))
            _validate(data)
            assert data["schema_version"] == schema()["properties"]["schema_version"]["const"]
            assert isinstance(data["tool_version"], str)
            for lay in data["layers"]:
                assert set(lay["flags"]) == set(lay["problems"]) | set(lay["notes"])


def test_json_with_base_and_calibration_validates(llama_with_base):
    _, folder, base_dir, _, cal = llama_with_base
    data = json.loads(diagnose_adapter(folder, base=base_dir, calibration=cal).to_json(full=True))
    _validate(data)
    assert all(lay["calibration"] is not None and lay["calibration_skipped"] is None for lay in data["layers"])
    assert data["base_model"]["fingerprint"] and data["base_model"]["mismatch"] is None
    only = json.loads(diagnose_adapter(folder).to_json())
    assert all(lay["base"] is None and lay["base_skipped"] == "no base model given" for lay in only["layers"])
    assert only["settings"]["lowr_tau"] is None  # inf: null, never the string "inf"


# ------------------------------------------------------------------------------------------ CLI


def test_fail_on_exits_3_only_when_a_named_flag_is_raised(tmp_path_factory, capsys):
    _, folder, _ = make_adapter(tmp_path_factory, "llama", steps=0, r=4, lora_alpha=8, target_modules=["q_proj"])
    assert main([str(folder), "--quiet", "--fail-on", "problems"]) == 3
    assert "dead_adapter" in capsys.readouterr().err
    assert main([str(folder), "--quiet", "--fail-on", "scale_large"]) == 0
    assert main([str(folder), "--quiet"]) == 0
    with pytest.raises(SystemExit) as exc:
        main([str(folder), "--fail-on", "nonsense"])
    assert exc.value.code == 2 and "unknown flag 'nonsense'" in capsys.readouterr().err


def test_explain_prints_every_column_and_flag(capsys):
    assert main(["--explain", "--threshold", "update_dominates=0.5"]) == 0
    out = capsys.readouterr().out
    for f in FLAGS:
        assert f"{f.name} ({f.kind})" in out
    assert "m = ||s*B@A||_2 / ||W||_2 >= 0.5" in out and "regime" in out and "n*" in out


def test_output_paths_are_checked_before_any_computation(llama_with_base, tmp_path, monkeypatch, capsys):
    _, folder, _, _, _ = llama_with_base

    def boom(*a, **k):
        raise AssertionError("computed before checking the output paths")

    monkeypatch.setattr("diagnose.report.diagnose_adapter", boom)
    assert main([str(folder), "--json", str(tmp_path / "nowhere" / "r.json")]) == 2
    assert "the folder" in capsys.readouterr().err
    assert main([str(folder), "--plot", str(tmp_path / "r.foo")]) == 2
    assert "must end in .png" in capsys.readouterr().err


def test_layers_regex(llama_with_base, capsys):
    _, folder, _, _, _ = llama_with_base
    rep = diagnose_adapter(folder, layers=r"q_proj$")
    assert [lay.name.split(".")[-1] for lay in rep.layers] == ["q_proj", "q_proj"]
    assert rep.missing_modules == []  # the layers left out are not "missing"
    assert main([str(folder), "--layers", "(", "--quiet"]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err


def test_adapter_only_imports_neither_peft_nor_transformers(llama_with_base):
    _, folder, base_dir, _, _ = llama_with_base
    code = ("import sys; from diagnose import diagnose_adapter; "
            f"r = diagnose_adapter({str(folder)!r}); b = diagnose_adapter({str(folder)!r}, base={str(base_dir)!r}); "
            "print(len(r.layers), b.layers[0].base['m'] > 0, 'peft' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    assert out == ["4", "True", "False", "False"]


def test_pattern_rule_restated_equals_peft():
    from peft.utils.other import get_pattern_key as peft_rule

    from diagnose.adapter import get_pattern_key

    keys = ["layers.1.self_attn.q_proj", "v_proj", "mlp.down_proj", r"layers\.\d+\.mlp\.up_proj"]
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.v_proj",
                 "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj", "x.k_proj"):
        assert get_pattern_key(keys, name) == peft_rule(keys, name)


# ------------------------------------------------------------------------------------------ never silently wrong


def _drop_module(folder, fragment):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if fragment not in k}
    save_file(state, str(path))


def test_missing_modules_flagged_with_names_and_strict_refuses(llama_with_base, tmp_path, capsys):
    _, folder, base_dir, _, _ = llama_with_base
    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    _drop_module(copy, "layers.1.self_attn.v_proj.")  # both lora_A and lora_B: a lost shard
    want = ["base_model.model.model.layers.1.self_attn.v_proj"]
    for rep in (diagnose_adapter(copy), diagnose_adapter(copy, base=base_dir)):  # by stack; exact with the base
        assert rep.missing_modules == want and "missing_modules" in rep.problems
        assert rep.flag_details["missing_modules"]["layers"] == want
    with pytest.raises(DiagnoseError, match="layers.1.self_attn.v_proj"):
        diagnose_adapter(copy, strict=True)
    assert main([str(copy), "--strict", "--quiet"]) == 2
    assert main([str(copy), "--quiet", "--fail-on", "missing_modules"]) == 3
    assert diagnose_adapter(folder, base=base_dir).missing_modules == []


def test_merged_peft_model_is_unmerged_for_the_analysis(tmp_path_factory):
    from tests.diagnose.conftest import CONFIGS

    model, _, _ = make_adapter(tmp_path_factory, "llama", steps=3, **CONFIGS["plain"][1])
    before = diagnose_adapter(model)
    model.merge_adapter()
    try:
        after = diagnose_adapter(model)
    finally:
        model.unmerge_adapter()
    for a, b in zip(before.layers, after.layers, strict=True):
        assert b.base["m"] == pytest.approx(a.base["m"], rel=1e-5)  # was W + sBA taken for W (m halved)
    assert "merged_model" in after.notes and "merged_model" not in before.notes


def test_another_base_of_the_same_shape_is_a_mismatch(tmp_path_factory):
    from tests.diagnose.conftest import CONFIGS

    model, folder, base_dir = make_adapter(tmp_path_factory, "llama", steps=2, save_base=True,
                                           **CONFIGS["plain"][1])
    other = base_dir.parent / "other-base"
    tiny_llama(seed=SEED + 1).save_pretrained(other)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg))
    good = diagnose_adapter(folder, base=base_dir)
    assert "base_mismatch" not in good.flags and good.base_info["mismatch"] is None
    bad = diagnose_adapter(folder, base=other)
    assert "base_mismatch" in bad.problems and "fingerprint" in bad.base_info["mismatch"]
    again = diagnose_adapter(folder, base=base_dir, base_fingerprint="0" * 16)  # expected fingerprint given
    assert "base_mismatch" in again.problems
    assert "base_mismatch" not in diagnose_adapter(folder, base=base_dir,
                                                   base_fingerprint=good.base_info["fingerprint"]).flags


def test_pissa_adapter_uses_the_residual_base_or_says_it_cannot(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pissa")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, init_lora_weights="pissa",
                                            target_modules=["q_proj"]))
    model.save_pretrained(root / "adapter")
    # the PeftModel holds the residual W - B0 A0 (PEFT mutated it): the quantities use it
    in_model = diagnose_adapter(model)
    assert "init_changes_base" not in in_model.flags
    mods = dict(model.named_modules())
    for lay in in_model.layers:
        W_res = mods[lay.name].get_base_layer().weight.detach().double()
        want = (torch.linalg.matrix_norm(lay.scaling * torch.as_tensor(lay.quantities["singular_values"]).max()
                                         .reshape(1, 1), 2) / torch.linalg.matrix_norm(W_res, 2)).item()
        assert lay.base["m"] == pytest.approx(want, rel=1e-6)
    # the folder against the original base: that is not this adapter's base -> withheld, with the reason
    rep = diagnose_adapter(root / "adapter", base=root / "base")
    assert "init_changes_base" in rep.notes
    assert all(lay.base is None and "pissa" in lay.base_skipped for lay in rep.layers)


def test_intruder_test_abstains_on_a_flat_spectrum(tmp_path_factory):
    """W with all singular values equal (a scaled orthogonal matrix) and a small random update: every top
    direction of W + sBA rotates freely inside W's degenerate spectrum, so a low max |cos| is no evidence of a new
    direction. Today's rule counted them as intruders."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("q_proj") and hasattr(module, "lora_A"):
                Q = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
                V = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
                S = 0.5 * (1 + 1e-3 * torch.linspace(1, 0, 64))  # flat to 1e-3
                module.get_base_layer().weight.copy_(Q @ torch.diag(S) @ V.T)
                module.lora_B["default"].weight.copy_(0.05 * torch.randn(64, 2, generator=g))
    rep = diagnose_adapter(model)
    for lay in rep.layers:
        intr = lay.base["intruder"]
        naive = int((intr["max_abs_cos"] < 0.5).sum())
        assert naive >= 2  # what the old rule reported
        assert intr["spectral_gap"] < 1e-3
        assert intr["abstained"] >= naive - intr["count"] and intr["count"] < naive
        assert "intruder_abstained" in lay.notes


def test_intruder_from_the_update_is_still_counted(tmp_path_factory):
    """A rank-1 update 3 ||W||_2 along W's weakest directions: a direction the update put there is judged."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    mod = model.get_submodule(name)
    with torch.no_grad():
        U, S, Vh = torch.linalg.svd(mod.get_base_layer().weight)
        mod.lora_A["default"].weight.zero_()
        mod.lora_B["default"].weight.zero_()
        mod.lora_A["default"].weight[0] = Vh[-8:].sum(0) / math.sqrt(8)
        mod.lora_B["default"].weight[:, 0] = 3 * S[0] * U[:, -8:].sum(1) / math.sqrt(8)
    lay = diagnose_adapter(model).layer(name)
    assert lay.base["intruder"]["count"] >= 1 and "intruder_dimensions" in lay.notes


# ------------------------------------------------------------------------------------------ inputs


def test_calibration_hf_json_dict_and_context_length(llama_with_base, tmp_path):
    _, folder, base_dir, ids, _ = llama_with_base
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": np.ones(ids.shape, int).tolist()}))
    rep = diagnose_adapter(folder, base=base_dir, calibration=path)
    assert all(lay.calibration["n_rows"] == ids.numel() for lay in rep.layers)
    long = tmp_path / "long.npy"
    np.save(long, token_batch(1, 65).numpy())  # the tiny Llama's context is 64
    with pytest.raises(DiagnoseError, match="sequences of 65 tokens, but the base model's context length is 64"):
        diagnose_adapter(folder, base=base_dir, calibration=long)


def test_base_auto_resolves_the_config_path(llama_with_base, tmp_path):
    _, folder, base_dir, _, _ = llama_with_base
    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    auto = diagnose_adapter(copy, base="auto")
    direct = diagnose_adapter(copy, base=base_dir)
    assert [lay.base["m"] for lay in auto.layers] == [lay.base["m"] for lay in direct.layers]
    with pytest.raises(DiagnoseError, match="not a Hugging Face model in the local cache"):
        diagnose_adapter(copy, base="nobody/no-such-model-here")


def test_the_one_parser_runs_diagnose(llama_with_base, capsys):
    from lora_theory.cli import main as lora_theory_main

    _, folder, _, _, _ = llama_with_base
    assert lora_theory_main(["diagnose", "--explain"]) == 0
    assert "dead_adapter (problem)" in capsys.readouterr().out
    assert lora_theory_main(["diagnose", str(folder), "--fail-on", "dead_adapter"]) == 0
    assert "layers.1.self_attn.v_proj" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        lora_theory_main(["diagnose", str(folder), "--eta", "x"])
    assert exc.value.code == 2 and "--eta" in capsys.readouterr().err


def test_base_found_in_the_hugging_face_cache_offline(llama_with_base, tmp_path, monkeypatch):
    """--base ORG/NAME resolves a model in the local Hugging Face cache (refs/main -> snapshots/<commit>), offline."""
    _, folder, base_dir, _, _ = llama_with_base
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(base_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = diagnose_adapter(folder, base="someone/tiny-llama")
    direct = diagnose_adapter(folder, base=base_dir)
    assert [lay.base["m"] for lay in cached.layers] == [lay.base["m"] for lay in direct.layers]


def test_sequence_classification_base_follows_the_task_type(tmp_path_factory):
    """A SEQ_CLS adapter's base is loaded as a sequence classifier (it used to be loaded as a causal LM)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from diagnose.adapter import load_adapter
    from diagnose.base import open_base

    torch.manual_seed(SEED)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0)
    root = tmp_path_factory.mktemp("seqcls")
    base = LlamaForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(root / "adapter")
    ad = load_adapter(root / "adapter")
    assert type(open_base(root / "base", ad).model()).__name__ == "LlamaForSequenceClassification"
    rep = diagnose_adapter(root / "adapter", base=root / "base", calibration=token_batch(2, 8))
    assert all(lay.calibration["penalty"] == 0 and lay.calibration["adapter_output_energy"] > 0
               for lay in rep.layers)


def test_missing_by_stack_judges_only_near_complete_stacks():
    """Without the base: a lost module in a near-complete stack is named; an encoder and a decoder of different
    depths, T5-style nested indices and a hybrid model's sparse attention layers are not taken for losses."""
    from diagnose.adapter import Adapter

    def adapter(names):
        return Adapter(source="x", config={}, layers=[type("L", (), {"name": n})() for n in names])

    P = "base_model.model."
    llama = [f"{P}model.layers.{i}.self_attn.{m}" for i in range(16) for m in ("q_proj", "v_proj")]
    lost = [n for n in llama if n != f"{P}model.layers.5.self_attn.v_proj"]
    assert adapter(lost).missing_by_stack() == [f"{P}model.layers.5.self_attn.v_proj"]
    assert adapter(llama).missing_by_stack() == []
    t5 = [f"{P}encoder.block.{i}.layer.0.SelfAttention.q" for i in range(6)] + \
        [f"{P}decoder.block.{i}.layer.{j}.{m}.q" for i in range(12) for j, m in ((0, "SelfAttention"),
                                                                               (1, "EncDecAttention"))]
    assert adapter(t5).missing_by_stack() == []
    hybrid = [f"{P}model.layers.{i}.mamba.in_proj" for i in range(32) if i % 8] + \
        [f"{P}model.layers.{i}.self_attn.q_proj" for i in range(4, 32, 8)]
    assert adapter(hybrid).missing_by_stack() == []

"""Bad input fails with a DiagnoseError naming the file and what was expected; the CLI prints it, exits 2, and
writes JSON and PNG on success."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diagnose import DiagnoseError, diagnose_adapter
from diagnose.cli import main


@pytest.fixture()
def copy_of(llama_with_base, tmp_path):
    _, folder, _, _, _ = llama_with_base
    dst = tmp_path / "adapter"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_or_not_a_folder(tmp_path):
    with pytest.raises(DiagnoseError, match=r"nowhere: no such folder.*adapter_config.json"):
        diagnose_adapter(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiagnoseError, match="file: not a folder"):
        diagnose_adapter(tmp_path / "file")
    with pytest.raises(DiagnoseError, match=r"adapter_config.json: not found"):
        diagnose_adapter(tmp_path)
    with pytest.raises(DiagnoseError, match="PeftModel"):
        diagnose_adapter(42)


def test_bad_config(copy_of):
    (copy_of / "adapter_config.json").write_text("{not json")
    with pytest.raises(DiagnoseError, match=r"adapter_config.json: unreadable or not valid JSON"):
        diagnose_adapter(copy_of)


def test_non_lora_adapter(copy_of):
    _edit_config(copy_of, peft_type="IA3")
    with pytest.raises(DiagnoseError, match=r"adapter_config.json: peft_type is 'IA3'; only LoRA"):
        diagnose_adapter(copy_of)


def test_config_weight_mismatch(copy_of):
    _edit_config(copy_of, r=8)
    with pytest.raises(DiagnoseError, match=r"adapter_model.safetensors: module .*q_proj has lora_A \(4, 64\).*r = 8"):
        diagnose_adapter(copy_of)
    _edit_config(copy_of, r=4, use_dora=True)
    with pytest.raises(DiagnoseError, match="use_dora but no lora_magnitude_vector"):
        diagnose_adapter(copy_of)


def test_missing_b_tensor(copy_of):
    from safetensors.torch import load_file, save_file

    path = copy_of / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if "layers.1.self_attn.v_proj.lora_B" not in k}
    save_file(state, str(path))
    with pytest.raises(DiagnoseError, match=r"layers.1.self_attn.v_proj has lora_A but not both"):
        diagnose_adapter(copy_of)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(copy_of, damage):
    path = copy_of / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x13" * 64, "empty": b""}[damage])
    with pytest.raises(DiagnoseError, match=r"adapter_model.safetensors: not a valid safetensors file"):
        diagnose_adapter(copy_of)


def test_no_weights_file(copy_of):
    (copy_of / "adapter_model.safetensors").unlink()
    with pytest.raises(DiagnoseError, match="holds no adapter_model.safetensors or adapter_model.bin"):
        diagnose_adapter(copy_of)


def test_bad_calibration(llama_with_base, tmp_path):
    _, folder, base_dir, ids, _ = llama_with_base
    cases = {"3d.npy": np.zeros((2, 3, 4), dtype=np.int64), "float.npy": np.zeros((2, 5)),
             "vocab.npy": np.full((2, 5), 1000, dtype=np.int64)}
    patterns = {"3d.npy": r"3d.npy: shape \(2, 3, 4\); expected integer token ids of shape \(N, T\)",
                "float.npy": r"float.npy: dtype torch.float64; expected integer token ids",
                "vocab.npy": r"vocab.npy: ids range over \[1000, 1000\] but the base model's vocabulary has 128"}
    for name, arr in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(DiagnoseError, match=patterns[name]):
            diagnose_adapter(folder, base=base_dir, calibration=tmp_path / name)
    (tmp_path / "ids.csv").write_text("1,2")
    with pytest.raises(DiagnoseError, match="ids.csv: unknown calibration format"):
        diagnose_adapter(folder, base=base_dir, calibration=tmp_path / "ids.csv")
    with pytest.raises(DiagnoseError, match="no such calibration file"):
        diagnose_adapter(folder, base=base_dir, calibration=tmp_path / "missing.pt")
    with pytest.raises(DiagnoseError, match="calibration needs the base model"):
        diagnose_adapter(folder, calibration=ids)


def test_bad_base(llama_with_base, tmp_path):
    _, folder, _, _, _ = llama_with_base
    with pytest.raises(DiagnoseError, match="not a transformers model folder"):
        diagnose_adapter(folder, base=tmp_path)
    from tests.diagnose.conftest import tiny_gpt2

    with pytest.raises(DiagnoseError, match="the base model has no module model.layers.0.self_attn.q_proj"):
        diagnose_adapter(folder, base=tiny_gpt2())
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(DiagnoseError, match=r"has weight \(32, 32\) but the adapter's lora_B @ lora_A is \(64, 64\)"):
        diagnose_adapter(folder, base=narrow)


def test_cli_writes_json_and_png(llama_with_base, tmp_path, capsys):
    _, folder, base_dir, _, cal = llama_with_base
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main([str(folder), "--base", str(base_dir), "--calibration", str(cal), "--json", str(out), "--plot",
               str(png), "--eta", "3"])
    printed = capsys.readouterr().out
    assert rc == 0 and "layers.1.self_attn.q_proj" in printed and "ripple" in printed
    data = json.loads(out.read_text())
    assert data["settings"]["eta"] == 3.0 and len(data["layers"]) == 4
    assert all(lay["calibration"]["penalty"] > 0 and lay["base"]["m"] > 0 for lay in data["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_line_and_exit_2(copy_of, capsys):
    (copy_of / "adapter_model.safetensors").write_bytes(b"junk")
    rc = main([str(copy_of), "--json", str(copy_of / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "adapter_model.safetensors" in err
    assert not (copy_of / "x.json").exists()  # never a partial report


def test_narrow_table_fits_100_columns_and_wide_shows_all(llama_with_base):
    model, _, _, _, _ = llama_with_base
    rep = diagnose_adapter(model)
    lines = rep.table().splitlines()
    assert lines[1].split() == ["layer", "r", "s", "||sBA||", "m", "problems"]
    assert lines[2].split()[0] == "layers.0.self_attn.q_proj" and lines[2].split()[1] == "4"
    assert max(len(line) for line in lines) <= 100
    wide = rep.table(wide=True).splitlines()
    assert {"regime", "s*sqrt(r)", "ALLoRA", "eff.rank"} <= set(wide[1].split())

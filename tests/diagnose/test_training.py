"""The per-step monitor in a custom loop and the TrainerCallback in a real transformers.Trainer run."""

from __future__ import annotations

import json

import pytest
import torch

from diagnose import AdapterMonitor, DiagnoseCallback, DiagnoseError
from tests.diagnose.conftest import SEED, VOCAB, tiny_llama, token_batch


def _peft(**kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kwargs))


def test_monitor_watches_b_escape_zero(tmp_path):
    model = _peft()
    log = tmp_path / "diag.jsonl"
    monitor = AdapterMonitor(model, log, every=2)
    first = monitor.log(0)
    assert all(lay["norm_B"] == 0 and lay["flags"] == ["dead_adapter"] for lay in first["layers"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for k in range(4):
        ids = token_batch(2, 8, SEED + k)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["event"] == "run_start" and lines[0]["adapter"]["r"] == 4 and lines[0]["schema_version"]
    records = lines[1:]
    assert [r["step"] for r in records] == [0, 2, 4] and {r["run_id"] for r in records} == {lines[0]["run_id"]}
    mods = dict(model.named_modules())
    for lay in records[-1]["layers"]:  # the last record is the final state of the model
        B = mods[lay["name"]].lora_B["default"].weight.detach().double()
        A = mods[lay["name"]].lora_A["default"].weight.detach().double()
        W = mods[lay["name"]].get_base_layer().weight.detach().double()
        assert lay["norm_B"] == pytest.approx(torch.linalg.norm(B).item(), rel=1e-12) and lay["norm_B"] > 0
        delta = 2.0 * B @ A
        assert lay["m"] == pytest.approx((torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(W, 2)).item(),
                                         rel=1e-9)
        assert lay["lowr_norm_b"] == pytest.approx(torch.linalg.norm(B, dim=0).tolist(), rel=1e-12)
    with pytest.raises(DiagnoseError, match="every"):
        AdapterMonitor(model, log, every=0)


def test_trainer_callback_logs_during_a_real_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _peft(lora_dropout=0.1)
    g = torch.Generator().manual_seed(SEED)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=SEED)
    log = tmp_path / "cb.jsonl"
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DiagnoseCallback(log, every=2)])
    trainer.train()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["event"] == "run_start"
    records = lines[1:]
    # every 2 steps, and the last step (5, not a multiple of 2) at the end of training
    assert [r["step"] for r in records] == [2, 4, 5]
    names = sorted(n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert sorted(lay["name"] for lay in records[-1]["layers"]) == names
    mods = dict(model.named_modules())
    for lay in records[-1]["layers"]:
        B = mods[lay["name"]].lora_B["default"].weight.detach().double()
        assert lay["norm_B"] == pytest.approx(torch.linalg.norm(B).item(), rel=1e-12) and lay["norm_B"] > 0
    trainer.train()  # a second run appended to the same file: its own header and run id
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    headers = [i for i, rec in enumerate(lines) if rec.get("event") == "run_start"]
    assert headers == [0, 4] and lines[0]["run_id"] != lines[4]["run_id"]
    assert {rec["run_id"] for rec in lines[5:]} == {lines[4]["run_id"]}

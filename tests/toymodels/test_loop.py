"""toymodels.loop: reproducible, cached and resumable runs; expected-loss training against the closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from toymodels import config, loop, losses, sweep
from toymodels.lora import LoRALinear

SMALL = dict(dataset="synthetic", widths=(16, 32, 32, 10), n_pretrain=128, n_finetune=64, n_test=256,
             pretrain_steps=20, steps=12, batch_size=16, record_every=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def test_same_seed_same_numbers_and_all_recorders():
    cfg = config.FinetuneConfig(**SMALL, dropout=0.2, recorders=config.RECORDERS, grad_std_masks=8)
    a = loop.finetune(cfg, use_cache=False)
    b = loop.finetune(cfg, use_cache=False)
    assert set(a) >= {"train_loss", "test_acc", "norm_A", "row_norm_BA", "grad_norm_B", "channel_a", "out_mean",
                      "grad_std_B"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(a["step"], [0, 4, 8, 12])
    assert a["norm_B"][0].max() == 0.0 and a["norm_B"][-1].min() > 0  # B starts at zero and moves
    c = loop.finetune(cfg.replace(seed=1), use_cache=False)
    assert not np.array_equal(a["batch_loss"], c["batch_loss"])


def test_sweep_resumes_after_interruption(monkeypatch):
    cfgs = [config.FinetuneConfig(**SMALL, seed=s) for s in range(3)]
    calls = []
    real = loop._train

    def flaky(cfg, device):
        calls.append(cfg.seed)
        if cfg.seed == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt
        return real(cfg, device)

    monkeypatch.setattr(loop, "_train", flaky)
    with pytest.raises(KeyboardInterrupt):  # in-process, through the loop: the monkeypatched _train runs
        sweep.run_sweep(cfgs, workers=1, batched=False, progress=False)
    out = sweep.run_sweep(cfgs, workers=1, batched=False, progress=False)
    assert calls == [0, 1, 2, 2]  # runs 0 and 1 were not recomputed
    assert len(out) == 3


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_expected_mse_matches_closed_form(placement):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4, dtype=torch.float64)
    layer = LoRALinear(base, 3, alpha=6.0, dropout=0.3, dropout_placement=placement, b_init_std=0.5)
    h = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    got = losses.expected_mse(layer, h, y).item()
    T = torch.nn.functional.one_hot(y, 4).double() - base.bias.detach()  # the bias moves into the target
    want = dr.expected_loss(h.numpy(), T.numpy(), base.weight.detach().numpy(), layer.lora_A.detach().numpy(),
                            layer.lora_B.detach().numpy(), 0.3, placement=placement, scaling=layer.scaling) / 10
    assert got == pytest.approx(want, rel=1e-12)


def test_expected_loss_training_runs_and_differs_from_sampled():
    cfg = config.FinetuneConfig(**{**SMALL, "targets": ("layers.2",)}, loss="mse", dropout=0.3, lr=1e-2)
    exp = loop.finetune(cfg.replace(expected_loss=True), use_cache=False)
    emp = loop.finetune(cfg, use_cache=False)
    assert np.isfinite(exp["test_loss"]).all()
    assert not np.allclose(exp["test_loss"][1:], emp["test_loss"][1:])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(r=0), "r"),
        (dict(dropout=1.0), "dropout"),
        (dict(method="magic"), "method"),
        (dict(dataset="imagenet"), "dataset"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(targets=("layers.7",)), "targets"),
        (dict(recorders=("loss", "vibes")), "recorders"),
        (dict(expected_loss=True), "expected_loss"),
        (dict(dataset="mnist", widths=(100, 10)), "widths"),
    ],
)
def test_bad_config_fails_before_training(change, match):
    with pytest.raises(ValueError, match=match):
        config.FinetuneConfig(**{**SMALL, **change})


def test_variants_and_plugins_train():
    for extra in (dict(method="allora", eta=2.0), dict(method="dora"), dict(method="asf"),
                  dict(lowr=(10.0, 0.1, 1), lora_plus_ratio=4.0), dict(optimizer="sgd", lr=0.05)):
        h = loop.finetune(config.FinetuneConfig(**SMALL, **extra), use_cache=False)
        assert np.isfinite(h["batch_loss"]).all(), extra


def test_moments_recorder_equals_adapter_output_for_every_method():
    for method in ("lora", "asf", "dora"):
        cfg = config.FinetuneConfig(**{**SMALL, "steps": 4, "record_every": 4}, method=method,
                                   dropout=0.0 if method != "lora" else 0.3, recorders=("moments",))
        h = loop.finetune(cfg, use_cache=False)
        assert h["out_mean"].shape == (2, 3)
        assert np.all(h["out_second"][0] == 0)  # B = 0 at the start: the adapter adds nothing
        assert np.all(h["out_second"][-1] > 0)


def test_grad_std_recorder_does_not_change_the_training_run():
    cfg = config.FinetuneConfig(**SMALL, dropout=0.3, recorders=("loss",))
    plain = loop.finetune(cfg, use_cache=False)
    with_std = loop.finetune(cfg.replace(recorders=("loss", "grad_std"), grad_std_masks=4), use_cache=False)
    np.testing.assert_array_equal(plain["batch_loss"], with_std["batch_loss"])
    assert with_std["grad_std_B"].shape[0] == len(with_std["step"])


def test_divergence_reports_its_step_and_is_cached(monkeypatch):
    cfg = config.FinetuneConfig(**SMALL, optimizer="sgd", lr=1e6, loss="mse")
    with pytest.raises(loop.TrainingDiverged) as info:
        loop.finetune(cfg)
    assert 1 <= info.value.step <= cfg.steps
    assert isinstance(info.value, FloatingPointError)
    monkeypatch.setattr(loop, "_train", lambda *a: pytest.fail("a cached divergence must not be retrained"))
    hist = loop.finetune(cfg, on_diverge="return")
    assert int(hist["diverged_step"][0]) == info.value.step
    assert len(hist["batch_loss"]) == info.value.step - 1 and np.isfinite(hist["batch_loss"]).all()
    with pytest.raises(ValueError, match="on_diverge"):
        loop.finetune(cfg, on_diverge="ignore")

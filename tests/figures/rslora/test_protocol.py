"""figures.rslora.protocol: the per-seed exponent fit and the per-layer RMS of the deep network; the rank sweep's
reading of a diverged run (cached, truncated at its last record, an infinite loss and spike), the spike factor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from figures.criteria import ci_finite
from figures.framework import Context, diverged, sweep
from figures.rslora import protocol as rn
from toymodels.config import FinetuneConfig
from toymodels.loop import finetune


def test_seed_slopes_against_polyfit():
    rng = np.random.default_rng(0)
    x = np.log([32.0, 128.0, 512.0])
    Y = rng.normal(size=(5, 3))
    Y[2, 1] = np.nan
    got = rn.seed_slopes(x, Y)
    for i in (0, 1, 3, 4):
        assert got[i] == pytest.approx(np.polyfit(x, Y[i], 1)[0], rel=1e-12)
    assert np.isnan(got[2])
    with pytest.raises(ValueError, match="Y must have one column per x"):
        rn.seed_slopes(x, Y[:, :2])
    with pytest.raises(ValueError, match="Y must have one column per x"):
        rn.seed_slopes(np.zeros(3), Y)


def test_layer_rms_shape_and_values():
    runs = {("lora", r): [{"out_second": np.array([[0.0] * 4, [4.0, 9.0, 16.0, 25.0]]) * r} for _ in range(3)]
            for r in (1, 4)}
    rms = rn.layer_rms(runs, "lora", (1, 4))
    assert rms.shape == (3, 2, 4)
    np.testing.assert_allclose(rms[0, 1], 2 * np.array([2.0, 3.0, 4.0, 5.0]))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def _tiny(**changes) -> FinetuneConfig:
    cfg = FinetuneConfig(dataset="synthetic", widths=(8, 8, 4), targets=("layers.0", "layers.1"), n_pretrain=64,
                         n_finetune=32, n_test=32, pretrain_steps=5, steps=40, optimizer="sgd", lr=50.0, r=2,
                         record_every=5, batch_size=16, recorders=rn.RECORDERS)
    return cfg.replace(**changes)


def test_diverged_run_is_cached_and_truncated_at_its_last_record(monkeypatch):
    cfg = _tiny(record_every=2)
    with pytest.raises(FloatingPointError, match=r"step (\d+)") as info:
        finetune(cfg, use_cache=False)
    k = int(info.value.args[0].split("step ")[1].split()[0])
    assert k > cfg.record_every
    ctx = Context(fidelity="quick", seeds=(0,), workers=1)
    h = sweep(ctx, {"run": cfg})["run"][0]
    assert diverged(h) and int(h["diverged_step"][0]) == k
    last = int(h["step"][-1])
    assert last < k and last % cfg.record_every == 0  # the engine's history, up to its last record before k
    ref = finetune(cfg.replace(steps=last), use_cache=False)  # the identical trajectory, stopped there
    np.testing.assert_array_equal(h["train_loss"], ref["train_loss"])
    assert rn.final_loss(h) == math.inf and rn.spike(h) == math.inf

    from toymodels import loop as engine

    calls = []
    real = engine._train

    def spy(c, *args, **kwargs):
        calls.append(c.steps)
        return real(c, *args, **kwargs)

    monkeypatch.setattr(engine, "_train", spy)
    again = sweep(ctx, {"run": cfg})["run"][0]
    assert calls == [], "the blow-up must come from the cache, not be recomputed"
    np.testing.assert_array_equal(again["train_loss"], h["train_loss"])


def test_stable_run_is_finetune_unchanged():
    cfg = _tiny(lr=1e-2)
    ctx = Context(fidelity="quick", seeds=(0,), workers=1)
    h = sweep(ctx, {"run": cfg})["run"][0]
    assert not diverged(h)
    np.testing.assert_array_equal(h["train_loss"], finetune(cfg)["train_loss"])
    assert rn.final_loss(h) == float(h["train_loss"][-1])


def test_spike_factor():
    flat = {"train_loss": np.array([3.0, 2.0, 1.0, 0.5])}
    assert rn.spike(flat) == 1.0
    bumpy = {"train_loss": np.array([3.0, 1.0, 2.5, 0.5, 1.5])}
    assert rn.spike(bumpy) == pytest.approx(3.0)  # 1.5 / 0.5


def test_seed_slopes_and_ci_finite_exclude_diverged_seeds():
    x = np.log([4.0, 16.0, 64.0])
    Y = np.stack([2.0 * x + 1.0, -0.5 * x, np.array([1.0, math.inf, 0.0])])
    s = rn.seed_slopes(x, Y)
    assert s[0] == pytest.approx(2.0) and s[1] == pytest.approx(-0.5) and math.isnan(s[2])
    ci = ci_finite(s)
    assert ci["n"] == 2 and ci["n_excluded"] == 1 and ci["mean"] == pytest.approx(0.75)

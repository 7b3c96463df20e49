"""Helpers of figures/rslora.py: divergence handling, loss-spike and slope statistics, the exponent CI, and the
coordinate-check panel's plumbing (projections, exact vs Monte Carlo). The figures themselves run in
tests/figures/test_figures.py (quick mode)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import figures.rslora_unconverted as rsfig
from figures import Context
from toymodels.config import FinetuneConfig
from toymodels.loop import finetune


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def _tiny(**changes) -> FinetuneConfig:
    cfg = FinetuneConfig(dataset="synthetic", widths=(8, 8, 4), targets=("layers.0", "layers.1"), n_pretrain=64,
                         n_finetune=32, n_test=32, pretrain_steps=5, steps=40, optimizer="sgd", lr=50.0, r=2,
                         record_every=5, batch_size=16, recorders=rsfig.RECORDERS)
    return cfg.replace(**changes)


def test_diverged_run_is_cached_and_truncated_at_its_last_record(monkeypatch):
    cfg = _tiny(record_every=2)
    with pytest.raises(FloatingPointError, match=r"step (\d+)") as info:
        finetune(cfg, use_cache=False)
    k = int(info.value.args[0].split("step ")[1].split()[0])
    assert k > cfg.record_every
    ctx = Context(fidelity="quick", seeds=(0,), workers=1)
    h = rsfig._run(cfg, ctx)
    assert rsfig._diverged(h) and int(h["diverged_at"]) == k
    last = int(h["step"][-1])
    assert last < k and last % cfg.record_every == 0  # the engine's history, up to its last record before k
    ref = finetune(cfg.replace(steps=last), use_cache=False)  # the identical trajectory, stopped there
    np.testing.assert_array_equal(h["train_loss"], ref["train_loss"])
    assert rsfig._final_loss(h) == math.inf and rsfig._spike(h) == math.inf

    from toymodels import loop as engine

    calls = []
    real = engine._train

    def spy(c, *args, **kwargs):
        calls.append(c.steps)
        return real(c, *args, **kwargs)

    monkeypatch.setattr(engine, "_train", spy)
    again = rsfig._run(cfg, ctx)
    assert calls == [], "the blow-up must come from the cache, not be recomputed"
    np.testing.assert_array_equal(again["train_loss"], h["train_loss"])


def test_stable_run_is_finetune_unchanged():
    cfg = _tiny(lr=1e-2)
    ctx = Context(fidelity="quick", seeds=(0,), workers=1)
    h = rsfig._run(cfg, ctx)
    assert not rsfig._diverged(h)
    np.testing.assert_array_equal(h["train_loss"], finetune(cfg)["train_loss"])
    assert rsfig._final_loss(h) == float(h["train_loss"][-1])


def test_spike_factor():
    flat = {"diverged_at": np.array(math.nan), "train_loss": np.array([3.0, 2.0, 1.0, 0.5])}
    assert rsfig._spike(flat) == 1.0
    bumpy = {"diverged_at": np.array(math.nan), "train_loss": np.array([3.0, 1.0, 2.5, 0.5, 1.5])}
    assert rsfig._spike(bumpy) == pytest.approx(3.0)  # 1.5 / 0.5


def test_seed_slopes_and_ci_exclude_diverged_seeds():
    x = np.log([4.0, 16.0, 64.0])
    Y = np.stack([2.0 * x + 1.0, -0.5 * x, np.array([1.0, math.inf, 0.0])])
    s = rsfig._seed_slopes(x, Y)
    assert s[0] == pytest.approx(2.0) and s[1] == pytest.approx(-0.5) and math.isnan(s[2])
    ci = rsfig._ci(s)
    assert ci["n"] == 2 and ci["n_excluded"] == 1 and ci["mean"] == pytest.approx(0.75)

"""figures.allora.regularization_like_dropout: the EpochProbe callback on a tiny synthetic run, and the declared
criterion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from figures.allora import regularization_like_dropout as fn
from toymodels.config import FinetuneConfig
from toymodels.loop import finetune


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path_factory.getbasetemp() / "runs"))


def _tiny(**kw):
    cfg = dict(dataset="synthetic", widths=(12, 16, 16, 4), targets=("layers.0", "layers.1", "layers.2"),
               n_pretrain=64, n_finetune=32, n_test=32, pretrain_steps=5, steps=4, batch_size=8, r=2,
               record_every=2, recorders=())
    cfg.update(kw)
    return FinetuneConfig(**cfg)


def test_epoch_probe_penalty_is_zero_at_b_zero_and_matches_the_closed_form_later():
    from analysis import dropout as closed
    from toymodels.callbacks import WeightSnapshots
    from toymodels.setup import build_finetune_model, protocol_data

    cfg = _tiny(targets=("layers.2",))
    h = finetune(cfg, callbacks=[fn.EpochProbe([0, 4], 0.2), WeightSnapshots([4])])
    assert h["ep_penalty"][0] == 0.0
    # the closed form on the snapshot's A, B and the frozen features (layers 0, 1 carry no adapter here)
    model = build_finetune_model(cfg)
    data = protocol_data(cfg, model.layers[0].weight.device)
    import torch

    with torch.no_grad():
        X = model.features(data.finetune.x).double().numpy() / math.sqrt(len(data.finetune.y))
    want = closed.dropout_penalty(X, h["snapshot_A0"][0], h["snapshot_B0"][0], 0.2, placement="bottleneck",
                                  scaling=float(model.layers[2].scaling))
    assert want > 0
    assert h["ep_penalty"][1] == pytest.approx(want, rel=1e-5)
    assert 0 <= h["ep_test_acc"][1] <= 1


def _seeds(mean, sd=0.1, n=10, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    return mean + sd * (v - v.mean()) / v.std(ddof=1)


def test_regularization_criterion():
    good = {"allora_gap": _seeds(-0.05, 0.02), "allora_penalty": _seeds(-0.3), "od_early": _seeds(-0.01, 0.005),
            "dropout_gap": _seeds(-0.05, 0.02), "dropout_penalty": _seeds(-0.5)}
    assert fn.CRITERION.evaluate(good).verdict == "reproduced"
    # the OD conjecture is tested and reported, but does not enter the verdict on ALLoRA
    out = fn.CRITERION.evaluate({**good, "od_early": _seeds(0.02, 0.005)})
    assert out.verdict == "reproduced" and not out.passed["od_early"]
    # a drag below the declared practical margin (0.1 pp) does not support the conjecture, however many seeds
    assert not fn.CRITERION.evaluate({**good, "od_early": _seeds(-0.0004, 1e-5)}).passed["od_early"]
    assert fn.CRITERION.evaluate({**good, "allora_penalty": _seeds(0.3)}).verdict == "partially reproduced"
    assert fn.CRITERION.evaluate({**good, "allora_gap": _seeds(0.05, 0.02),
                                      "allora_penalty": _seeds(0.3)}).verdict == "not reproduced"

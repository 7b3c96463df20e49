"""figures.allora.regularization_like_dropout: the EpochProbe callback on a tiny synthetic run, and the declared
criterion."""

from __future__ import annotations

import math

import pytest

from figures.allora import regularization_like_dropout as fn
from tests.figures.constructed import seeds
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


def test_regularization_needs_a_narrower_gap_without_a_test_accuracy_loss():
    good = {"allora_gap": seeds(-0.05, 0.02), "allora_test_acc": seeds(0.3, 0.1), "dropout_gap": seeds(-0.05, 0.02)}
    assert fn.CRITERION.evaluate(good).verdict == "reproduced"
    # fitting less: a narrower gap, paid for in test accuracy (0.5 pp, beyond the paper's 0.1 pp 'no evident
    # difference'); the old rule (gap and dropout penalty) supported it
    fits_less = {**good, "allora_test_acc": seeds(-0.5, 0.1)}
    out = fn.CRITERION.evaluate(fits_less)
    assert out.passed["allora_gap"] and out.verdict == "not reproduced"
    # a loss within the paper's margin is no loss
    assert fn.CRITERION.evaluate({**good, "allora_test_acc": seeds(0.0, 0.05)}).verdict == "reproduced"
    # no narrower gap: not supported, whatever the accuracy; and the gap alone never gives a partial reading
    assert fn.CRITERION.evaluate({**good, "allora_gap": seeds(0.05, 0.02)}).verdict == "not reproduced"
    # the premise row never counts
    out = fn.CRITERION.evaluate({**good, "dropout_gap": seeds(0.05, 0.02)})
    assert out.verdict == "reproduced" and not out.passed["dropout_gap"]


def test_regularization_drops_the_proxies_any_method_that_fits_less_passes():
    names = {t.name for t in fn.CRITERION.tests}
    assert "allora_penalty" not in names and "od_early" not in names
    assert "ALLoRA-OD" not in fn.METHODS
    assert {p.settings["optimizer"] for p in fn.PROTOCOLS if p.plausible} == {"sgd", "adam"}

"""figures.allora.fig3_norms: its callback measures the run's own weights; the spread of the final norms; the declared
criterion on constructed per-seed numbers, both ways."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from figures.allora import fig3_norms as fig3
from figures.allora.protocol import last_layer_problem
from figures.framework import headline_protocols
from tests.figures.allora.small import SMALL
from tests.figures.constructed import seeds, t_stat
from toymodels import config, loop, setup
from toymodels.lora import lora_modules


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_fig3_measurement_matches_the_runs_weights(placement):
    """fig. 3's callback: ||A - A0|| and the closed-form strengths equal those computed from the run's weight
    snapshots at the record steps (same run, same cache entry)."""
    from toymodels.callbacks import WeightSnapshots

    cfg = config.FinetuneConfig(**SMALL, dropout=0.3, placement=placement, recorders=("loss", "norms"))
    snaps = WeightSnapshots(cfg.record_steps())
    hist = loop.finetune(cfg, callbacks=[fig3.DecayStrengths(), snaps], use_cache=False)
    got = fig3.DecayStrengths.of(hist)
    np.testing.assert_array_equal(got["step"], hist["step"])
    n_layers = hist["norm_A"].shape[1]
    dist = np.array([[np.linalg.norm(hist[f"snapshot_A{i}"][t] - hist[f"snapshot_A{i}"][0]) for i in range(n_layers)]
                     for t in range(len(hist["step"]))])
    np.testing.assert_allclose(got["dist_A"], dist, rtol=1e-5, atol=1e-7)
    assert got["dist_A"][0].max() == 0 and got["dist_A"][-1].min() > 0
    model = setup.build_finetune_model(cfg, torch.device("cpu"))
    data = setup.protocol_data(cfg, torch.device("cpu"))
    with torch.no_grad():  # the model at the last step, from the snapshots (its features depend on every layer)
        for i, m in enumerate(lora_modules(model)):
            m.lora_A.copy_(torch.from_numpy(hist[f"snapshot_A{i}"][-1]))
            m.lora_B.copy_(torch.from_numpy(hist[f"snapshot_B{i}"][-1]))
    layer = lora_modules(model)[-1]
    prob = last_layer_problem(model, layer, *data.finetune)
    on_a, on_b = dr.penalty_strengths(prob["X"] / math.sqrt(len(prob["X"])), prob["A"], prob["B"], 0.3,
                                      scaling=float(prob["s"]))
    np.testing.assert_allclose(got["strength_A"][-1], on_a, rtol=1e-6)
    np.testing.assert_allclose(got["strength_B"][-1], on_b, rtol=1e-6)


def test_spread_is_max_over_min_minus_one_per_seed():
    assert fig3.spread(np.array([[1.0, 2.0, 1.5], [2.0, 2.0, 2.0]])).tolist() == [1.0, 0.0]


def test_norm_of_sums_layers_or_takes_the_last():
    norms = np.array([[3.0, 4.0], [6.0, 8.0]])
    assert fig3.norm_of(norms, "summed").tolist() == [5.0, 10.0]
    assert fig3.norm_of(norms, "last").tolist() == [4.0, 8.0]
    with pytest.raises(ValueError, match="which"):
        fig3.norm_of(norms, "first")


# ------------------------------------------------------------------------------- the declared criterion (issue 16)


def _noise(shift: int) -> np.ndarray:
    return seeds(0.0, 0.05, shift=shift)  # constructed: sample sd 0.05, so every verdict below is certain


def test_far_more_needs_the_papers_ratio_and_more_needs_30pct():
    ok = {"far_more": np.log(40.0) + _noise(71), "more": 5.0 + _noise(72)}
    assert fig3.CRITERION.evaluate(ok).verdict == "reproduced"
    # B's spread 1.5 above A's, ratio 6: more, but not the paper's 'far more'
    six = {"far_more": np.log(6.0) + _noise(73), "more": 1.5 + _noise(74)}
    assert fig3.CRITERION.evaluate(six).verdict == "partially reproduced"
    equal = {"far_more": _noise(75), "more": _noise(76)}
    assert fig3.CRITERION.evaluate(equal).verdict == "not reproduced"


def test_a_ratio_of_five_and_a_gap_of_ten_points_passed_the_old_rule_and_fail_the_new():
    """Old rule: ratio > 3 ('a lenient far more', nobody's number) and spread_B - spread_A > 0. Sec. 3.2 gives
    > 500% vs ~30% (ratio >= 16.7) and calls a 30% variation 'minimal'."""
    weak = {"far_more": np.log(5.0) + _noise(77), "more": 0.1 + _noise(78)}
    assert t_stat(weak["far_more"], np.log(3.0)) > 5 and t_stat(weak["more"], 0.0) > 5  # old: reproduced
    assert fig3.CRITERION.evaluate(weak).verdict == "not reproduced"


def test_margins_from_the_paper_and_headline_over_adam_and_sgd():
    assert all(t.margin_from == "paper" for t in fig3.CRITERION.tests)
    assert fig3.CRITERION.tests[0].margin == pytest.approx(math.log(5.0 / 0.3))
    names = [p.name for p in headline_protocols(fig3.PROTOCOLS)]
    assert names == ["bottleneck, CE, summed", "sgd"] and not any(p.paper for p in fig3.PROTOCOLS)
    assert next(p for p in fig3.PROTOCOLS if p.name == "sgd").settings["optimizer"] == "sgd"

"""figures.allora.fig2_grad_std: the per-entry gradient std over masks that fig. 2's overlay hands to
analysis.dropout.grad_moments uses the engine's conventions (loss = mean over the batch); entry statistics; the
declared criterion on constructed per-seed numbers, both ways."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from analysis.inputs import default_seed
from figures.allora.fig2_grad_std import CRITERION, PROTOCOLS, entry_stats
from figures.allora.protocol import last_layer_problem
from figures.framework import headline_protocols
from tests.figures.allora.small import last_layer_model
from tests.figures.constructed import seeds, t_stat
from toymodels import losses


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_engine_loss_gradient_std_is_grad_moments_over_n(placement):
    """fig. 2's overlay: per-entry std over masks of d(engine MSE)/d(A, B) = sqrt(grad_moments var) / N."""
    p, masks = 0.3, 2000
    model, layer, x, y = last_layer_model(p, placement)
    prob = last_layer_problem(model, layer, x, y)
    _, var_a, _, var_b = dr.grad_moments(prob["X"], prob["Y"], prob["W"], prob["A"], prob["B"], p,
                                         placement=placement, scaling=float(prob["s"]))
    n = x.shape[0]
    model.train()
    torch.manual_seed(default_seed())
    h = model.features(x).detach()
    ga, gb = [], []
    for _ in range(masks):
        loss = losses.loss_fn("mse", layer(h), y)
        a, b = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
        ga.append(a.flatten())
        gb.append(b.flatten())
    for g, var in ((torch.stack(ga).numpy(), var_a), (torch.stack(gb).numpy(), var_b)):
        s2 = g.var(axis=0, ddof=1)
        m4 = ((g - g.mean(axis=0)) ** 4).mean(axis=0)
        se = np.sqrt(np.maximum(m4 - s2**2, 0) / masks)
        exact = var.ravel() / n**2
        live = exact > 1e-12 * exact.max()
        z = np.abs(s2[live] - exact[live]) / se[live]
        assert live.sum() > 10 and z.max() <= 5, (z.max(), live.sum())


def test_entry_stats():
    st = entry_stats(np.array([[0.0, 1.0, 2.0, 3.0]]))
    assert st["mean"][0] == 1.5 and st["max"][0] == 3.0 and st["median"][0] == 1.5


# ------------------------------------------------------------------------------- the declared criterion (issue 16)


def _noise(shift: int) -> np.ndarray:
    return seeds(0.0, 0.05, shift=shift)  # constructed: sample sd 0.05, so every verdict below is certain


def test_needs_a_heavier_tail_and_a_stable_mean():
    ok = {"heavier_tail": 0.7 + _noise(0), "mean_stable": 0.1 + _noise(1)}
    assert CRITERION.evaluate(ok).verdict == "reproduced"
    # the mean grows ~4x (log 1.4), more than the tail: not reproduced
    grown = {"heavier_tail": -0.3 + _noise(2), "mean_stable": 1.4 + _noise(3)}
    assert CRITERION.evaluate(grown).verdict == "not reproduced"
    assert CRITERION.evaluate(dict(ok, mean_stable=1.4 + _noise(4))).verdict == "partially reproduced"


def test_a_slightly_heavier_tail_and_a_50pct_mean_change_passed_the_old_rule_and_fail_the_new():
    """Old rule: tail/mean growth > 1 and mean within a factor 2. A tail 16% heavier than the mean and a mean 50%
    larger passed it; the paper calls ~30% 'minimal' (sec. 3.2), so neither is its 'significant' / 'slight'."""
    weak = {"heavier_tail": math.log(1.16) + _noise(5), "mean_stable": math.log(1.5) + _noise(6)}
    assert t_stat(weak["heavier_tail"], 0.0) > 5 and t_stat(weak["mean_stable"], math.log(2.0)) < -5  # old: pass
    assert CRITERION.evaluate(weak).verdict == "not reproduced"


def test_margins_from_the_paper_and_headline_over_adam_and_sgd():
    assert all(t.margin_from == "paper" for t in CRITERION.tests)
    assert [p.name for p in headline_protocols(PROTOCOLS)] == ["mnist", "mnist sgd"]
    assert len(PROTOCOLS) >= 4 and not any(p.paper for p in PROTOCOLS)

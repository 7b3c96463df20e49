"""figures.allora.fig2_grad_std: the per-entry gradient std over masks that fig. 2's overlay hands to
analysis.dropout.grad_moments uses the engine's conventions (loss = mean over the batch); entry statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from analysis.inputs import default_seed
from figures.allora.fig2_grad_std import entry_stats
from figures.allora.protocol import last_layer_problem
from tests.figures.allora.small import last_layer_model
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

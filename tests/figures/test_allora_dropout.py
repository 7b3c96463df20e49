"""figures.allora_dropout: the figures' engine callbacks measure the run's own weights; the last-layer problem and
the per-entry gradient std that figs. 1-3 hand to analysis.dropout use the engine's conventions (bias in Y, loss =
mean)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from analysis.inputs import default_seed
from figures import allora_dropout as fd
from toymodels import train
from toymodels.lora import lora_modules

SMALL = dict(dataset="synthetic", widths=(16, 24, 24, 6), n_pretrain=128, n_finetune=64, n_test=128,
             pretrain_steps=10, steps=12, batch_size=16, record_every=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_fig3_measurement_matches_the_runs_weights(placement):
    """fig. 3's callback: ||A - A0|| and the closed-form strengths equal those computed from the run's weight
    snapshots at the record steps (same run, same cache entry)."""
    from toymodels.callbacks import WeightSnapshots

    cfg = train.FinetuneConfig(**SMALL, dropout=0.3, placement=placement, recorders=("loss", "norms"))
    snaps = WeightSnapshots(cfg.record_steps())
    hist = train.finetune(cfg, callbacks=[fd._DecayStrengths(), snaps], use_cache=False)
    got = fd._DecayStrengths.of(hist)
    np.testing.assert_array_equal(got["step"], hist["step"])
    n_layers = hist["norm_A"].shape[1]
    dist = np.array([[np.linalg.norm(hist[f"snapshot_A{i}"][t] - hist[f"snapshot_A{i}"][0]) for i in range(n_layers)]
                     for t in range(len(hist["step"]))])
    np.testing.assert_allclose(got["dist_A"], dist, rtol=1e-5, atol=1e-7)
    assert got["dist_A"][0].max() == 0 and got["dist_A"][-1].min() > 0
    model = train.build_finetune_model(cfg, torch.device("cpu"))
    data = train.protocol_data(cfg, torch.device("cpu"))
    with torch.no_grad():  # the model at the last step, from the snapshots (its features depend on every layer)
        for i, m in enumerate(lora_modules(model)):
            m.lora_A.copy_(torch.from_numpy(hist[f"snapshot_A{i}"][-1]))
            m.lora_B.copy_(torch.from_numpy(hist[f"snapshot_B{i}"][-1]))
    layer = lora_modules(model)[-1]
    prob = fd._last_layer_problem(model, layer, *data.finetune)
    on_a, on_b = dr.penalty_strengths(prob["X"] / math.sqrt(len(prob["X"])), prob["A"], prob["B"], 0.3,
                                      scaling=float(prob["s"]))
    np.testing.assert_allclose(got["strength_A"][-1], on_a, rtol=1e-6)
    np.testing.assert_allclose(got["strength_B"][-1], on_b, rtol=1e-6)


def _last_layer_model(p: float, placement: str):
    cfg = train.FinetuneConfig(**SMALL, targets=("layers.2",), loss="mse", dropout=p, placement=placement,
                               recorders=())
    model = train.build_finetune_model(cfg, torch.device("cpu")).double()
    layer = lora_modules(model)[-1]
    gen = torch.Generator().manual_seed(default_seed())
    with torch.no_grad():  # a nonzero B, as after fine-tuning
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64))
    data = train.protocol_data(cfg, torch.device("cpu"))
    x, y = data.finetune
    return model, layer, x[:16].double(), y[:16]


def test_last_layer_problem_matches_the_model_output():
    model, layer, x, y = _last_layer_model(0.2, "bottleneck")
    prob = fd._last_layer_problem(model, layer, x, y)
    model.eval()
    with torch.no_grad():
        out = model(x).numpy()
    target = torch.nn.functional.one_hot(y, layer.out_features).double().numpy()
    X, Y, W, A, B, s = (prob[k] for k in ("X", "Y", "W", "A", "B", "s"))
    resid = Y - X @ W.T - s * X @ A.T @ B.T  # the residual of analysis.dropout's convention, dropout-free
    np.testing.assert_allclose(resid, target - out, rtol=1e-12, atol=1e-12)
    # and the dropout-free loss is E[L] at p = 0 (sum over the batch) = N x the engine's mean MSE
    mse = ((target - out) ** 2).sum(1).mean()
    assert dr.expected_loss(X, Y, W, A, B, 0.0, scaling=float(s)) == pytest.approx(len(y) * mse, rel=1e-12)


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_engine_loss_gradient_std_is_grad_moments_over_n(placement):
    """fig. 2's overlay: per-entry std over masks of d(engine MSE)/d(A, B) = sqrt(grad_moments var) / N."""
    p, masks = 0.3, 2000
    model, layer, x, y = _last_layer_model(p, placement)
    prob = fd._last_layer_problem(model, layer, x, y)
    _, var_a, _, var_b = dr.grad_moments(prob["X"], prob["Y"], prob["W"], prob["A"], prob["B"], p,
                                         placement=placement, scaling=float(prob["s"]))
    n = x.shape[0]
    model.train()
    torch.manual_seed(default_seed())
    h = model.features(x).detach()
    ga, gb = [], []
    for _ in range(masks):
        loss = train.loss_fn("mse", layer(h), y)
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


def test_summary_helpers():
    assert fd._spread(np.array([[1.0, 2.0, 1.5], [2.0, 2.0, 2.0]])).tolist() == [1.0, 0.0]
    st = fd._entry_stats(np.array([[0.0, 1.0, 2.0, 3.0]]))
    assert st["mean"][0] == 1.5 and st["max"][0] == 3.0 and st["median"][0] == 1.5
    r = fd._log_ratio_ci([2.0, 8.0, 4.0], [1.0, 2.0, 1.0])
    assert r["ratio"] == pytest.approx(math.exp(np.mean(np.log([2.0, 4.0, 4.0]))))
    assert r["ci_low"] < r["ratio"] < r["ci_high"]
    assert fd._spearman([1, 2, 3], [3, 3, 3]) == 0.0 and fd._spearman([1, 2, 3], [1, 5, 9]) == pytest.approx(1.0)
    assert fd._steps_per_epoch(train.FinetuneConfig(**SMALL)) == 4

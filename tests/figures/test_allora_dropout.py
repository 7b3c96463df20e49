"""figures.allora_dropout: the custom training loop mirrors the engine; the last-layer problem and the per-entry
gradient std that figs. 1-3 hand to analysis.dropout use the engine's conventions (bias in Y, loss = mean)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from analysis._inputs import default_seed
from figures import allora_dropout as fd
from toymodels import train
from toymodels.lora import lora_modules

SMALL = dict(dataset="synthetic", widths=(16, 24, 24, 6), n_pretrain=128, n_finetune=64, n_test=128,
             pretrain_steps=10, steps=12, batch_size=16, record_every=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


@pytest.mark.parametrize("placement", ["bottleneck", "input"])
def test_custom_loop_reproduces_engine_norms_and_losses(placement):
    cfg = train.FinetuneConfig(**SMALL, dropout=0.3, placement=placement, recorders=("loss", "norms"))
    ref = train.finetune(cfg, use_cache=False)
    got: dict[str, list] = {"step": [], "norm_A": [], "norm_B": [], "test_loss": []}

    def grab(step, model, data):
        layers = lora_modules(model)
        got["step"].append(step)
        got["norm_A"].append([m.lora_A.norm().item() for m in layers])
        got["norm_B"].append([m.lora_B.norm().item() for m in layers])
        got["test_loss"].append(train._evaluate(model, data.test, cfg.loss)[0])

    fd._custom_train(cfg, torch.device("cpu"), set(ref["step"].astype(int)), grab)
    np.testing.assert_array_equal(got["step"], ref["step"])
    for key in ("norm_A", "norm_B", "test_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-9, err_msg=key)
    assert ref["norm_B"][-1].min() > 0  # the comparison covers trained, dropout-driven steps


def test_custom_loop_rejects_what_it_does_not_mirror():
    cfg = train.FinetuneConfig(**SMALL, targets=("layers.2",), loss="mse", expected_loss=True, recorders=())
    with pytest.raises(ValueError, match="sampled-dropout"):
        fd._custom_train(cfg, torch.device("cpu"), {0}, lambda *a: None)


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
        loss = train._loss_fn("mse", layer(h), y)
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

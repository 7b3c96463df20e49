"""figures.allora.protocol: the last-layer problem that figs. 1-3 hand to analysis.dropout uses the engine's
conventions (bias in Y, loss = mean); the shared summary helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import dropout as dr
from figures.allora import protocol
from figures.allora.protocol import last_layer_problem
from tests.figures.allora.small import SMALL, last_layer_model
from toymodels import config


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def test_last_layer_problem_matches_the_model_output():
    model, layer, x, y = last_layer_model(0.2, "bottleneck")
    prob = last_layer_problem(model, layer, x, y)
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


def test_summary_helpers():
    r = protocol.log_ratio_ci([2.0, 8.0, 4.0], [1.0, 2.0, 1.0])
    assert r["ratio"] == pytest.approx(math.exp(np.mean(np.log([2.0, 4.0, 4.0]))))
    assert r["ci_low"] < r["ratio"] < r["ci_high"]
    assert protocol.spearman([1, 2, 3], [3, 3, 3]) == 0.0
    assert protocol.spearman([1, 2, 3], [1, 5, 9]) == pytest.approx(1.0)
    assert protocol.steps_per_epoch(config.FinetuneConfig(**SMALL)) == 4


def test_escape_step_is_exact_on_an_exponential_and_inf_when_never_reached():
    steps = np.arange(0, 50, 5, dtype=float)
    k = 0.3
    values = np.exp(k * steps)
    for t0 in (7.3, 12.0, 31.9):
        assert protocol.escape_step(steps, values, math.exp(k * t0)) == pytest.approx(t0, abs=1e-9)
    assert protocol.escape_step(steps, values, 0.5) == steps[0]  # reached at the first record
    assert protocol.escape_step(steps, values, 2 * values[-1]) == math.inf


def test_escape_step_interpolates_in_log_and_censors():
    steps = np.array([0.0, 1.0, 2.0, 3.0])
    vals = np.array([0.0, 1.0, 4.0, 8.0])
    assert min(protocol.escape_step(steps, vals, 2.0), 10) == pytest.approx(1.5)  # log2 halfway between 1 and 4
    assert min(protocol.escape_step(steps, vals, 100.0), 10) == 10.0

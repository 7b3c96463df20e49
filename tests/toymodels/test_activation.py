"""The toy MLP's ``activation`` option: "identity" gives a deep linear (affine, with the biases) network through
every code path of the engine, the default keeps every existing cache key, bad values are refused by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.streams import STREAMS_VERSION
from toymodels import batched, config, loop, mlp, setup
from toymodels.mlp import ACTIVATIONS, MLP

SMALL = dict(dataset="synthetic", widths=(6, 5, 4, 3), n_pretrain=64, n_finetune=32, n_test=32, pretrain_steps=5,
             steps=3, record_every=3, batch_size=None, loss="mse", optimizer="sgd", lr=0.05)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def _by_hand(model: MLP, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """The forward pass written out from the weights (x W_i^T + b_i, ReLU or nothing in between)."""
    h = x
    for i, layer in enumerate(model.layers):
        h = h @ layer.weight.T + layer.bias
        if relu and i < len(model.layers) - 1:
            h = h.clamp_min(0.0)
    return h


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_identity_mlp_is_affine(a, b, seed):
    # f(x) = M x + c: f(a x + b y) - f(0) = a (f(x) - f(0)) + b (f(y) - f(0)), to float64 rounding
    model = MLP((5, 7, 7, 3), seed=seed, dtype=torch.float64, activation="identity")
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f0 = model(torch.zeros(1, 5, dtype=torch.float64))
        lhs = model(a * x + b * y) - f0
        rhs = a * (model(x) - f0) + b * (model(y) - f0)
        scale = 1.0 + (abs(a) + abs(b)) * float(torch.max(model(x).abs().max(), model(y).abs().max()))
        np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose(model(x).numpy(), _by_hand(model, x, relu=False).numpy(), rtol=1e-13, atol=1e-14)


def test_relu_mlp_is_not_affine_and_weights_do_not_depend_on_the_activation():
    relu = MLP((5, 7, 7, 3), seed=3, dtype=torch.float64)
    ident = MLP((5, 7, 7, 3), seed=3, dtype=torch.float64, activation="identity")
    assert relu.activation == "relu" and ident.activation == "identity" and "identity" in repr(ident)
    for p, q in zip(relu.parameters(), ident.parameters(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(relu(x).numpy(), _by_hand(relu, x, relu=True).numpy(), rtol=1e-13, atol=1e-14)
        f0 = relu(torch.zeros(1, 5, dtype=torch.float64))
        gap = (relu(-x) - f0) + (relu(x) - f0)  # zero for an affine map (a = -1, b = 0 and a = 1)
        assert gap.abs().max() > 1e-3
        np.testing.assert_allclose(ident.features(x).numpy(), _features(ident, x).numpy(), rtol=1e-13, atol=1e-14)


def _features(model: MLP, x: torch.Tensor) -> torch.Tensor:
    h = x
    for layer in model.layers[:-1]:
        h = h @ layer.weight.T + layer.bias
    return h


def test_engine_paths_use_the_activation():
    # layer_inputs (the moments recorder), the frozen-prefix shortcut (targets from layers.1, full batch) and
    # pretraining all follow cfg.activation: the first step's loss is the pretrained identity network's MSE
    cfg = config.FinetuneConfig(**SMALL, activation="identity", targets=("layers.1", "layers.2"),
                               recorders=("moments",))
    model = setup.pretrain(cfg)
    assert model.activation == "identity"
    data = setup.protocol_data(cfg, torch.device("cpu"))
    x, y = data.finetune
    with torch.no_grad():
        want = ((_by_hand(model, x, relu=False) - torch.nn.functional.one_hot(y, 3)) ** 2).sum(1).mean().item()
        ins = mlp.layer_inputs(model, x)
        np.testing.assert_allclose(ins[2].numpy(), _features(model, x).numpy(), rtol=1e-5, atol=1e-6)
    hist = loop.finetune(cfg, use_cache=False)
    assert hist["batch_loss"][0] == pytest.approx(want, rel=1e-5)
    assert hist["out_second"].shape == (2, 2) and np.all(hist["out_second"][-1] > 0)
    relu_hist = loop.finetune(cfg.replace(activation="relu"), use_cache=False)
    assert relu_hist["batch_loss"][0] != pytest.approx(want, rel=1e-3)  # the ReLU network is another one


def test_default_activation_keeps_the_cache_keys():
    cfg = config.FinetuneConfig()
    d = cfg.as_dict()
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("activation", "dtype")}
    assert d == {"engine_version": config.ENGINE_VERSION, "torch_threads": torch.get_num_threads(), **fields,
                 "streams": STREAMS_VERSION}
    assert "activation" not in cfg.pretrain_dict()
    lin = cfg.replace(activation="identity")
    assert lin.as_dict() == {**d, "activation": "identity"}
    assert lin.pretrain_dict() == {**cfg.pretrain_dict(), "activation": "identity"}
    assert loop.run_key(lin) != loop.run_key(cfg)


@pytest.mark.parametrize("bad", ["tanh", "ReLU", None, 1])
def test_bad_activation_raises_naming_it(bad):
    with pytest.raises(ValueError, match="activation"):
        config.FinetuneConfig(**SMALL, activation=bad)
    with pytest.raises(ValueError, match="activation"):
        MLP((3, 2), activation=bad)


def test_batched_engine_refuses_the_identity_activation():
    assert ACTIVATIONS == ("relu", "identity")
    batched.check_batchable([config.FinetuneConfig(**SMALL)])
    with pytest.raises(ValueError, match="activation must be 'relu' for the batched engine"):
        batched.check_batchable([config.FinetuneConfig(**SMALL, activation="identity")])

"""toymodels.masks: the scheme as documented (recomputed from the PCG64 words independently), the law of the
masks (kept fraction within 5 sigma of 1 - p, values 0 and 1/(1-p), E = 1), determinism, and the layer and the
training loop drawing from the run's stream in layer order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.inputs import default_seed
from analysis.streams import stream_seed
from toymodels import config, loop, seeds
from toymodels.lora import LoRALinear, lora_modules
from toymodels.masks import SCHEME, MaskStream, keep_threshold

SEED = default_seed()
SMALL = dict(dataset="synthetic", widths=(12, 16, 16, 4), n_pretrain=128, n_finetune=64, n_test=64,
             pretrain_steps=20, steps=6, batch_size=16, record_every=3)


def _words(seed: int, n: int) -> np.ndarray:
    """The stream's first n 32-bit words, from the 64-bit outputs split by arithmetic (low half first)."""
    raw = np.random.PCG64(np.random.SeedSequence([seed, 0xD209])).random_raw((n + 1) // 2)
    halves = np.stack([raw & np.uint64(0xFFFFFFFF), raw >> np.uint64(32)], axis=1).reshape(-1)
    return halves[:n]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_scheme_is_the_documented_one(p):
    """Entry kept iff its word < round((1 - p) 2^32); consecutive draws continue the stream (an odd count
    discards its last half word); a kept entry is 1/(1-p) in the requested dtype."""
    stream = MaskStream(SEED)
    first, second = stream.kept((3, 5), p), stream.kept((4, 2), p)  # 15 entries: 8 outputs, then 4
    words = _words(SEED, 16 + 8)
    threshold = round((1 - p) * 2**32)
    np.testing.assert_array_equal(first.reshape(-1), words[:15] < threshold)
    np.testing.assert_array_equal(second.reshape(-1), words[16:24] < threshold)
    mask = MaskStream(SEED).draw((3, 5), p, torch.float64)
    assert mask.dtype == torch.float64
    np.testing.assert_array_equal(mask.numpy(), np.where(first, 1.0 / (1 - p), 0.0))


def test_keep_threshold():
    assert keep_threshold(0.5) == 2**31 and keep_threshold(0.0) == 2**32 - 1 and keep_threshold(0.75) == 2**30
    with pytest.raises(ValueError, match="p"):
        MaskStream(SEED).kept((2, 2), 1.0)
    with pytest.raises(ValueError, match="seed"):
        MaskStream(-1)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.01, 0.95), seed=st.integers(0, 2**31))
def test_kept_fraction_is_binomial(p, seed):
    """The kept fraction of 20000 entries is within 5 standard errors of 1 - p; the mean mask is 1 to within
    5 of its standard errors."""
    mask = MaskStream(seed).draw((200, 100), p, torch.float64).numpy()
    n, keep = mask.size, 1 - p
    kept = (mask > 0).mean()
    assert abs(kept - keep) <= 5 * math.sqrt(keep * p / n)
    assert set(np.unique(mask)) <= {0.0, 1.0 / keep}
    assert abs(mask.mean() - 1.0) <= 5 * math.sqrt(p / keep / n)


def test_streams_are_deterministic_and_distinct():
    a, b, c = MaskStream(SEED), MaskStream(SEED), MaskStream(SEED + 1)
    x, y, z = a.kept((64, 32), 0.5), b.kept((64, 32), 0.5), c.kept((64, 32), 0.5)
    assert np.array_equal(x, y) and not np.array_equal(x, z)
    assert not np.array_equal(a.kept((64, 32), 0.5), x)  # the next draw is a new mask
    assert seeds.SeedStreams(SEED).masks().seed == stream_seed(SEED, "masks")


@pytest.mark.parametrize("placement", ["input", "bottleneck"])
def test_layer_draws_from_its_stream_in_training_only(placement):
    """With ``mask_stream`` set a training-mode forward equals the forward with the stream's mask applied by
    hand; eval mode and p = 0 draw nothing; without a stream the layer is nn.Dropout's (global RNG)."""
    torch.manual_seed(SEED)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, 3, dropout=0.4, dropout_placement=placement, b_init_std=0.5)
    x = torch.randn(7, 6)
    layer.mask_stream = MaskStream(SEED)
    got = layer(x)
    shape = (7, 6) if placement == "input" else (7, 3)
    mask = MaskStream(SEED).draw(shape, 0.4)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    want = base(x) + s * (((x * mask) @ A.T) @ B.T if placement == "input" else ((x @ A.T) * mask) @ B.T)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    state = layer.mask_stream._bits.state
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + s * (x @ A.T) @ B.T, rtol=0, atol=1e-6)
    assert layer.mask_stream._bits.state == state  # eval mode drew nothing
    layer.train()
    layer.mask_stream = None
    torch.manual_seed(SEED + 1)
    one = layer(x)
    torch.manual_seed(SEED + 1)
    assert torch.equal(one, layer(x))  # nn.Dropout from the global RNG


def test_training_loop_draws_each_step_from_the_run_stream_in_layer_order(monkeypatch):
    """The loop's masks, step by step and layer by layer, are the run's MaskStream(stream_seed(seed, "masks")) drawn in that order,
    with shapes (batch, d_in); callbacks and records draw nothing from it."""
    cfg = config.FinetuneConfig(**SMALL, dropout=0.3, seed=SEED, recorders=("loss", "norms"))
    seen = []
    original = MaskStream.draw

    def spy(self, shape, p, dtype=torch.float32, device=None):
        out = original(self, shape, p, dtype, device)
        seen.append((self.seed, tuple(shape), p, out.clone()))
        return out

    monkeypatch.setattr(MaskStream, "draw", spy)
    loop.finetune(cfg, use_cache=False)
    n_layers = len(SMALL["widths"]) - 1
    assert len(seen) == cfg.steps * n_layers
    reference = MaskStream(stream_seed(SEED, "masks"))
    for t, (seed, shape, p, mask) in enumerate(seen):
        assert seed == stream_seed(SEED, "masks") and p == 0.3
        assert shape == (SMALL["batch_size"], SMALL["widths"][t % n_layers])
        assert torch.equal(mask, original(reference, shape, p))


def test_dropout_runs_are_keyed_by_the_scheme():
    plain, dropped = config.FinetuneConfig(**SMALL), config.FinetuneConfig(**SMALL, dropout=0.1)
    assert "mask_stream" not in plain.as_dict()  # runs without dropout keep their keys
    assert dropped.as_dict()["mask_stream"] == SCHEME


def test_trained_model_layers_hold_no_stream_afterwards():
    """The stream is set for the steps' forward passes only (a callback's own train-mode forward, e.g. the
    grad_std recorder's Monte Carlo, uses nn.Dropout and the forked global RNG)."""
    cfg = config.FinetuneConfig(**SMALL, dropout=0.3, seed=SEED)
    run = loop.TrainingRun(cfg, torch.device("cpu"))
    run.train()
    assert all(m.mask_stream is None for m in lora_modules(run.state.model))

"""toymodels.batched: K runs at once equal the sequential engine (the oracle) run by run, diverge where it
does, cache under their own key, and refuse what they cannot batch before any training.

Equality is to float32 rounding (the batched engine sums in another order): rtol 1e-4 on every recorded number
after 20 steps; the observed differences are ~1e-6. With dropout the masks are the sequential engine's own
(same stream, same order), so the comparison is as strict as without."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.inputs import default_seed
from toymodels import batched, config, loop, setup
from toymodels import cache as run_cache

SMALL = dict(dataset="synthetic", widths=(16, 32, 32, 10), n_pretrain=128, n_finetune=64, n_test=256,
             pretrain_steps=20, steps=20, batch_size=16, record_every=5, recorders=batched.RECORDERS)
SEED = default_seed()
TOL = dict(rtol=1e-4, atol=1e-7, equal_nan=True)


@pytest.fixture(scope="module")
def _cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")  # one per module: the pretrained models are computed once


@pytest.fixture(autouse=True)
def _env(_cache_root, monkeypatch):
    """A private run cache, and one torch thread (these models are tiny; the machine is shared)."""
    monkeypatch.setenv("LORA_THEORY_CACHE", str(_cache_root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cached_path(config: config.FinetuneConfig, batch=None):
    namespace, key_dict = batched.cache_entry(config, batch)
    return run_cache.cache_root() / namespace / f"{run_cache.config_key(key_dict)}.npz"


def cfg(**changes) -> config.FinetuneConfig:
    return config.FinetuneConfig(**{**SMALL, "seed": SEED, **changes})


def assert_same_runs(configs, **kwargs):
    got = batched.finetune_many(configs, use_cache=False, **kwargs)
    assert len(got) == len(configs)
    for c, h in zip(configs, got, strict=True):
        want = loop.finetune(c, use_cache=False)
        assert set(h) == set(want), c
        for key in want:
            assert h[key].shape == want[key].shape, key
            np.testing.assert_allclose(h[key], want[key], **TOL, err_msg=f"{key} of {c}")
    return got


@pytest.mark.parametrize(
    "configs",
    [
        # one seed (shared frozen weights, 2-D base matmuls), lr and scaling vary
        [cfg(), cfg(lr=3e-3), cfg(scaling=2.0), cfg(scaling="rslora", lr=2e-3)],
        # seeds interleaved, equal counts (a block per seed) and unequal counts (a block per run)
        [cfg(seed=SEED + 1), cfg(), cfg(seed=SEED + 1, lr=3e-3), cfg(lr=3e-3)],
        [cfg(), cfg(seed=SEED + 1), cfg(seed=SEED + 1, lr=3e-3)],
    ],
    ids=["one-seed", "two-seeds", "unequal-seeds"],
)
def test_equals_sequential_without_dropout(configs):
    assert_same_runs(configs)


@pytest.mark.parametrize(("placement", "mask_threads"), [("input", 1), ("bottleneck", 1), ("input", 3)])
def test_equals_sequential_with_dropout(placement, mask_threads):
    """Rates 0, 0.1, 0.5 side by side, two seeds: each run's masks are the sequential engine's, also when
    the runs' masks are drawn in parallel threads."""
    configs = [cfg(placement=placement, dropout=p, seed=SEED + s) for s in (0, 1) for p in (0.0, 0.1, 0.5)]
    got = assert_same_runs(configs, mask_threads=mask_threads)
    assert not np.allclose(got[0]["batch_loss"], got[1]["batch_loss"])  # dropout changed the trajectory


@pytest.mark.parametrize(
    "changes",
    [
        dict(targets=("layers.1",), loss="mse", optimizer="sgd", lr=0.05),  # frozen layer before the adapter
        dict(targets=("layers.0", "layers.2"), optimizer="adamw", weight_decay=0.1, dropout=0.2),  # frozen middle
        dict(batch_size=None, optimizer="adam", weight_decay=0.01, dropout=0.3, placement="bottleneck"),
        dict(widths=(16, 24, 10), targets=("layers.0", "layers.1"), r=3, dropout=0.2),
    ],
    ids=["mse-sgd-last-two", "adamw-middle-frozen", "full-batch-adam-wd", "two-layers-r3"],
)
@pytest.mark.parametrize("layout", ["a block per seed", "a block per run"])
def test_equals_sequential_other_settings(changes, layout):
    base = cfg(**changes)
    configs = [base, base.replace(seed=SEED + 1, lr=base.lr * 2)]
    if layout == "a block per run":  # seeds with unequal numbers of runs
        configs.append(base.replace(seed=SEED + 1))
    assert_same_runs(configs)


def test_cached_under_its_own_key(monkeypatch):
    """Reloaded without training, duplicates computed once; never mixed with the sequential engine's entries
    (equal to rounding, not to the bit)."""
    a, b = cfg(dropout=0.1, lr=1.1e-3), cfg(dropout=0.1, lr=1.2e-3)  # lrs used by no other test
    first = batched.finetune_many([a, b, a])
    for key in first[0]:
        np.testing.assert_array_equal(first[0][key], first[2][key])
    assert cached_path(a, batch=[a, b]).exists() and cached_path(a, batch=[b, a]).parent.name == batched.NAMESPACE
    assert batched.NAMESPACE != "finetune" and not cached_path(a).exists()  # keyed by its batch: not a run alone
    assert run_cache.config_key(batched.cache_entry(a)[1]) != run_cache.config_key(a.as_dict())
    sequential = loop.finetune(a)  # not taken from the batched run's entry: computed by the sequential engine
    np.testing.assert_allclose(sequential["batch_loss"], first[0]["batch_loss"], **TOL)

    def no_training(*args, **kwargs):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(batched._Batch, "__init__", no_training)
    again = batched.finetune_many([b, a])
    for key in first[0]:
        np.testing.assert_array_equal(again[1][key], first[0][key])
        np.testing.assert_array_equal(again[0][key], first[1][key])


def test_a_dropout_run_does_not_depend_on_its_batch():
    """Each run draws its masks from its own stream: trained alone or beside other runs, the same run (to
    rounding), and unlike the run without dropout."""
    dropped, plain = cfg(dropout=0.2, lr=1.3e-3), cfg(lr=1.3e-3)  # lr used by no other test
    both = batched.finetune_many([dropped, plain], use_cache=False)
    alone = batched.finetune_many([dropped], use_cache=False)[0]
    np.testing.assert_allclose(alone["batch_loss"], both[0]["batch_loss"], **TOL)
    assert not np.allclose(both[0]["batch_loss"], both[1]["batch_loss"])


def test_mask_distribution():
    """Masks take the values 0 and 1/(1-p); the kept fraction is Binomial(N, 1-p) (|z| <= 5); runs with their
    own seeds draw different masks, and a run with p = 0 gets ones."""
    ps = (0.1, 0.5, 0.0, 0.5)
    configs = [cfg(dropout=p, lr=1e-3 * (i + 1), seed=SEED + i) for i, p in enumerate(ps)]
    engine = batched._Batch(configs, torch.device("cpu"))
    kept = {i: [] for i in range(len(ps))}
    for _ in range(40):
        for mask in engine._step_masks(16).values():
            for k, c in enumerate(engine.runs):
                keep = 1 - c.dropout
                values = torch.unique(mask[k])
                allowed = torch.tensor([0.0, 1.0]) if keep == 1 else torch.tensor([0.0, 1.0]) / keep
                assert torch.isin(values, allowed.to(torch.float32)).all()
                kept[k].append(mask[k].flatten() > 0)
    for k, c in enumerate(engine.runs):
        flags = torch.cat(kept[k]).double()
        keep = 1 - c.dropout
        if keep == 1:
            assert flags.min() == 1
            continue
        z = (flags.mean().item() - keep) / math.sqrt(keep * (1 - keep) / len(flags))
        assert abs(z) <= 5, (c.dropout, z)
    same_rate = [k for k, c in enumerate(engine.runs) if c.dropout == 0.5]
    assert not torch.equal(torch.cat(kept[same_rate[0]]), torch.cat(kept[same_rate[1]]))


def test_divergence_as_the_sequential_engine():
    """A diverging run stops where the sequential one does, with its truncated history and ``diverged_step``;
    every run is cached first, then TrainingDiverged is raised (or the histories returned)."""
    good = cfg(optimizer="sgd", lr=0.05, record_every=1)  # a record every step: the truncation shows
    bad = good.replace(lr=300.0)  # diverges after a few steps
    with pytest.raises(loop.TrainingDiverged) as info:
        batched.finetune_many([good, bad])
    assert info.value.cfg == bad
    assert cached_path(good, batch=[good, bad]).exists() and cached_path(bad, batch=[good, bad]).exists()
    got = batched.finetune_many([good, bad], on_diverge="return")  # from the cache
    want = loop.finetune(bad, use_cache=False, on_diverge="return")
    assert "diverged_step" in want and 2 < want["diverged_step"][0] < SMALL["steps"]
    assert len(want["step"]) == want["diverged_step"][0]  # records at steps 0 .. diverged - 1
    assert set(got[1]) == set(want) and "diverged_step" not in got[0]
    for key in want:
        np.testing.assert_allclose(got[1][key], want[key], **TOL, err_msg=key)
    assert info.value.step == int(want["diverged_step"][0])


@pytest.mark.parametrize(
    ("configs", "kwargs", "match"),
    [
        ([], {}, "configs"),
        (["not a config"], {}, "configs"),
        ([cfg(method="dora")], {}, "method"),
        ([cfg(expected_loss=True, targets=("layers.2",), loss="mse")], {}, "expected_loss"),
        ([cfg(lora_plus_ratio=4.0)], {}, "lora_plus_ratio"),
        ([cfg(lowr=(10.0, 0.1, 1))], {}, "lowr"),
        ([cfg(recorders=("loss", "moments"))], {}, "recorders"),
        ([cfg(), cfg(r=4)], {}, "r must be the same"),
        ([cfg(), cfg(placement="bottleneck")], {}, "placement"),
        ([cfg(), cfg(optimizer="sgd")], {}, "optimizer"),
        ([cfg(), cfg(steps=10)], {}, "steps"),
        ([cfg()], {"mask_threads": 0}, "mask_threads"),
        ([cfg()], {"on_diverge": "ignore"}, "on_diverge"),
    ],
)
def test_bad_configs_raise_before_training(configs, kwargs, match, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(batched._Batch, "__init__", no_training)
    monkeypatch.setattr(setup, "protocol_data", no_training)
    with pytest.raises(ValueError, match=match):
        batched.finetune_many(configs, **kwargs)

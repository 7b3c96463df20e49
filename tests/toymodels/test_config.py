"""toymodels.config: the run-cache keys.

data/cache_keys.json is a regression pin (not a derivation): the keys of a representative set of configs as
written by data/make_cache_keys.py with the seed scheme of issue 16 (analysis.streams, STREAMS_VERSION 2), so a
later change cannot silently orphan the cached runs. data/cache_keys_streams_v1.json holds the keys of the same
configs under the old ``seed + offset`` streams (written from commit 801cc92, unchanged until issue 16): none of
them may come back, so the cache never returns a run computed with the old streams."""

import json
from pathlib import Path

import pytest
import torch

from toymodels import cache, callbacks
from toymodels.config import FinetuneConfig
from toymodels.loop import run_key

GOLDEN = json.loads((Path(__file__).parent / "data" / "cache_keys.json").read_text())


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the keys were computed with 1 thread (the thread count enters every key)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: json.dumps(c["config"], sort_keys=True)[:80])
def test_cache_keys_unchanged_since_streams_v2(case, one_thread):
    cfg = FinetuneConfig(**case["config"])
    cbs = [getattr(callbacks, name)(**args) for name, args in case.get("callbacks", [])]
    assert cache.config_key(run_key(cfg, cbs)) == case["finetune"]
    if "pretrain" in case:
        assert cache.config_key(cfg.pretrain_dict()) == case["pretrain"]


GOLDEN_V1 = json.loads((Path(__file__).parent / "data" / "cache_keys_streams_v1.json").read_text())


def test_no_key_of_the_old_streams_comes_back(one_thread):
    """Every pretraining and fine-tuning key of the old seed scheme (``seed + offset``) differs from today's, for
    the same configs: a run cached with the old streams is never a hit."""
    assert [c["config"] for c in GOLDEN_V1] == [c["config"] for c in GOLDEN]
    old = {c[k] for c in GOLDEN_V1 for k in ("finetune", "pretrain") if k in c}
    for case in GOLDEN_V1:
        cfg = FinetuneConfig(**case["config"])
        cbs = [getattr(callbacks, name)(**args) for name, args in case.get("callbacks", [])]
        assert cache.config_key(run_key(cfg, cbs)) not in old
        assert cache.config_key(cfg.pretrain_dict()) not in old


def test_golden_cases_cover_the_protocols():
    """The frozen set covers dropout (both placements), every variant, every optimizer and the real data sets."""
    configs = [c["config"] for c in GOLDEN]
    assert {c.get("placement", "input") for c in configs if c.get("dropout", 0) > 0} == {"input", "bottleneck"}
    assert {c.get("method", "lora") for c in configs} >= {"lora", "dora", "allora", "allora+d", "allora_od", "asf"}
    assert {c.get("optimizer", "adam") for c in configs} == {"sgd", "adam", "adamw"}
    assert {c.get("dataset", "mnist") for c in configs} == {"mnist", "fashion-mnist", "cifar10", "synthetic"}


def test_a_changed_field_changes_the_key(one_thread):
    """The check above can fail: any field off its value is another key."""
    cfg = FinetuneConfig(**GOLDEN[0]["config"])
    assert cache.config_key(run_key(cfg.replace(seed=1))) != GOLDEN[0]["finetune"]

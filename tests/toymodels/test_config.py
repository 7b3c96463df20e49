"""toymodels.config: the run-cache keys are those of the engine before the split (commit 801cc92), so the runs
cached by earlier code stay hits (data/cache_keys.json, written by data/make_cache_keys.py from that commit)."""

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
def test_cache_keys_unchanged_since_801cc92(case, one_thread):
    cfg = FinetuneConfig(**case["config"])
    cbs = [getattr(callbacks, name)(**args) for name, args in case.get("callbacks", [])]
    assert cache.config_key(run_key(cfg, cbs)) == case["finetune"]
    if "pretrain" in case:
        assert cache.config_key(cfg.pretrain_dict()) == case["pretrain"]


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

"""Writes cache_keys.json: the run-cache keys of a representative set of configs (a regression pin). Today's file
was written with the seed scheme of issue 16 (analysis.streams.STREAMS_VERSION 2), from the repository root:

    PYTHONPATH=$PWD python tests/toymodels/data/make_cache_keys.py > tests/toymodels/data/cache_keys.json

cache_keys_streams_v1.json holds the keys of the old ``seed + offset`` streams, written from commit 801cc92
(before toymodels/train.py was split; the keys did not change until issue 16):

    git worktree add --detach /tmp/base 801cc92
    PYTHONPATH=/tmp/base python tests/toymodels/data/make_cache_keys.py > tests/toymodels/data/cache_keys_streams_v1.json

It uses only what both the old and the new engine have: FinetuneConfig, run_key, the built-in callbacks and
cache.config_key. tests/toymodels/test_config.py checks that today's engine gives every key of cache_keys.json
unchanged and none of cache_keys_streams_v1.json."""

import json
import sys

import torch

from toymodels import cache, callbacks

try:
    from toymodels.config import FinetuneConfig
    from toymodels.loop import run_key
except ImportError:  # the engine before the split
    from toymodels.train import FinetuneConfig, run_key

QUICK = dict(n_pretrain=512, n_finetune=128, n_test=1000, pretrain_steps=60, steps=30, record_every=10,
             task_shift="permute")
DEFAULT = dict(n_pretrain=4096, n_finetune=512, n_test=2000, pretrain_steps=500, steps=300, record_every=25,
               task_shift="permute")
LARGE = dict(n_pretrain=4096, n_finetune=512, n_test=None, pretrain_steps=1500, steps=1000, record_every=50,
             task_shift="permute")
CASES = [
    {},
    QUICK, DEFAULT, LARGE,
    {**DEFAULT, "seed": 7},
    # dropout: both placements, the rates of the ALLoRA tables
    *({**DEFAULT, "dropout": p, "placement": pl, "seed": s} for p in (0.1, 0.3) for pl in ("input", "bottleneck")
      for s in (0, 3)),
    {**QUICK, "dropout": 0.5, "recorders": ("loss", "grad_std"), "grad_std_layer": "layers.2"},
    # variants and scalings
    *({**DEFAULT, "method": m, "recorders": ("loss", "rows")} for m in ("lora", "dora", "allora", "allora+d",
                                                                          "allora_od", "asf")),
    {**DEFAULT, "method": "allora", "eta": 0.5},
    {**DEFAULT, "scaling": "rslora", "r": 64, "alpha": 16.0},
    {**DEFAULT, "scaling": 0.25, "r": 4},
    {**DEFAULT, "init": "zero_a"}, {**DEFAULT, "init": "pissa"}, {**DEFAULT, "init": "olora"},
    {**DEFAULT, "init": "gaussian", "rank_scaled_init": True},
    {**DEFAULT, "targets": ("layers.1",), "recorders": ("loss", "channels")},
    # optimizers
    {**DEFAULT, "optimizer": "sgd", "lr": 0.1},
    {**DEFAULT, "optimizer": "adamw", "weight_decay": 0.01},
    {**DEFAULT, "lora_plus_ratio": 16.0},
    {**DEFAULT, "lowr": (0.1, 0.5, 10)},
    {**DEFAULT, "batch_size": None, "recorders": ("loss", "norms", "grads", "moments")},
    # losses, precision, activation
    {**QUICK, "loss": "mse", "expected_loss": True, "targets": ("layers.2",), "dropout": 0.2},
    {**QUICK, "dtype": "float64", "optimizer": "sgd"},
    {**QUICK, "activation": "identity"},
    {**QUICK, "extra": ("tag", 1)},
    # data sets
    {**DEFAULT, "dataset": "fashion-mnist"},
    {**DEFAULT, "dataset": "cifar10", "widths": (3072, 256, 256, 10)},
    {"dataset": "synthetic", "widths": (64, 32, 32, 10), "n_pretrain": 256, "n_finetune": 64, "n_test": 128,
     "pretrain_steps": 20, "steps": 10},
]
CALLBACK_CASES = [
    (QUICK, [("WeightSnapshots", {"steps": [0, 10, 30]})]),
    (QUICK, [("CaptureLayerIO", {"steps": [1, 2]})]),
    ({**QUICK, "optimizer": "sgd"}, [("ScaleAdapters", {"at_step": 0, "n": 4.0}), ("FullGradientNorm", {})]),
]

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = []
    for kw in CASES:
        c = FinetuneConfig(**kw)
        out.append({"config": kw, "finetune": cache.config_key(run_key(c)),
                    "pretrain": cache.config_key(c.pretrain_dict())})
    for kw, cbs in CALLBACK_CASES:
        c = FinetuneConfig(**kw)
        objs = [getattr(callbacks, name)(**args) for name, args in cbs]
        out.append({"config": kw, "callbacks": cbs, "finetune": cache.config_key(run_key(c, objs))})
    json.dump(out, sys.stdout, indent=1)
    print()

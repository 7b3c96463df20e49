"""toymodels.protocol: the shared fine-tuning protocol by fidelity (the sizes the figures' runs are cached under)."""

from types import SimpleNamespace

import pytest

from toymodels import data
from toymodels.config import FinetuneConfig
from toymodels.protocol import FIDELITIES, base_config, real_datasets


def test_sizes_by_fidelity():
    """ALLoRA sec. 3.4 protocol as the figures run it: 784-256-256-10, pixel permutation, sizes per fidelity."""
    quick, default, large = (base_config(f) for f in FIDELITIES)
    assert (quick.n_pretrain, quick.n_finetune, quick.n_test, quick.pretrain_steps, quick.steps) == (512, 128, 1000,
                                                                                                   60, 30)
    assert (default.n_pretrain, default.n_finetune, default.n_test, default.pretrain_steps, default.steps,
            default.record_every) == (4096, 512, 2000, 500, 300, 25)
    assert (large.n_test, large.pretrain_steps, large.steps, large.record_every) == (None, 1500, 1000, 50)
    assert default.widths == (784, 256, 256, 10) and default.task_shift == "permute"
    assert default == FinetuneConfig(n_pretrain=4096, n_finetune=512, n_test=2000, pretrain_steps=500, steps=300,
                                     record_every=25, task_shift="permute")


def test_a_context_overrides_and_another_dataset():
    ctx = SimpleNamespace(fidelity="quick")  # a figure's context: anything with .fidelity
    cfg = base_config(ctx, "cifar10", dropout=0.1, seed=3)
    assert cfg == base_config("quick", "cifar10").replace(dropout=0.1, seed=3)
    assert cfg.widths == (3072, 256, 256, 10) and cfg.dataset == "cifar10"


def test_figures_use_this_protocol():
    from figures import Context
    from figures.lowr.protocol import base_config as figures_base_config

    assert figures_base_config is base_config
    assert base_config(Context(fidelity="large")) == base_config("large")


@pytest.mark.parametrize(("args", "named"), [(("fast",), "fidelity"), ((SimpleNamespace(),), "fidelity"),
                                              (("quick", "imagenet"), "dataset"), (("quick", "synthetic"), "dataset")])
def test_bad_input_names_the_argument(args, named):
    with pytest.raises(ValueError, match=named):
        base_config(*args)


def test_real_datasets_falls_back_from_cifar(monkeypatch):
    avail = {"mnist": (True, ""), "cifar10": (False, "no cifar here"), "fashion-mnist": (True, "")}
    monkeypatch.setattr(data, "available", lambda name, probe_network=False: avail[name])
    assert real_datasets() == (["mnist", "fashion-mnist"], {"cifar10": "no cifar here"})
    avail["fashion-mnist"] = (False, "nor fashion")
    assert real_datasets() == (["mnist"], {"cifar10": "no cifar here", "fashion-mnist": "nor fashion"})

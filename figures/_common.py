"""Shared helpers of the figure modules: style, data-set choice, the shared fine-tuning setup. The statistics
(intervals, tests, verdict rules) live in :mod:`figures.criteria`; ``mean_ci`` / ``ci_dict`` are re-exported here."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a screen

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from figures.criteria import ci_dict, mean_ci  # noqa: E402,F401  (re-exported: figures not yet migrated)
from toymodels import data as datasets  # noqa: E402

PALETTE = "colorblind"


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.4, **kwargs):
    """A seaborn-styled (colour-blind palette) figure with ``nrows x ncols`` axes."""
    sns.set_theme(style="whitegrid", palette=PALETTE, context="paper")
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)
    return fig, axes


def colors(n: int) -> list:
    return sns.color_palette(PALETTE, n)


def real_datasets(prefer: Sequence[str] = ("mnist", "cifar10")) -> tuple[list[str], dict[str, str]]:
    """The preferred real data sets that are available, with CIFAR-10 replaced by Fashion-MNIST when absent.

    Returns ``(names, notes)``: ``notes`` maps a missing data set to the reason (for the JSON), so a figure
    can say clearly that CIFAR-10 is missing and how to get it.
    """
    names, notes = [], {}
    for name in prefer:
        ok, why = datasets.available(name, probe_network=False)
        if ok:
            names.append(name)
            continue
        notes[name] = why
        if name == "cifar10":
            alt = "fashion-mnist"
            ok_alt, why_alt = datasets.available(alt, probe_network=False)
            if ok_alt and alt not in names:
                names.append(alt)
            elif not ok_alt:
                notes[alt] = why_alt
    return names, notes


def unavailable(reason: str, **extra):
    """A Result saying the figure could not be made here, and why."""
    from figures import Result

    return Result(verdict="unavailable", summary=reason, measured={}, **extra)


def base_config(ctx, dataset: str = "mnist", **overrides):
    """The shared fine-tuning setup of the figures (ALLoRA sec. 3.4 protocol), sized by fidelity.

    Default: pretrain a 784-256-256-10 MLP on 4096 images (500 Adam steps), fine-tune on another 512 with a
    pixel-permutation task shift, test on 2000 test images. All figures use the same pretraining settings at a
    given fidelity, so the pretrained model is computed once and shared through the run cache. Quick: 512/128
    images, 60 pretraining steps, 1000 test images.
    """
    from toymodels.train import FinetuneConfig

    dim = datasets.DIMS[dataset]
    sizes = ctx.pick(
        quick=dict(n_pretrain=512, n_finetune=128, n_test=1000, pretrain_steps=60, steps=30, record_every=10),
        default=dict(n_pretrain=4096, n_finetune=512, n_test=2000, pretrain_steps=500, steps=300, record_every=25),
        large=dict(n_pretrain=4096, n_finetune=512, n_test=None, pretrain_steps=1500, steps=1000, record_every=50),
    )
    settings = dict(dataset=dataset, widths=(dim, 256, 256, 10), task_shift="permute", **sizes)
    settings.update(overrides)
    return FinetuneConfig(**settings)

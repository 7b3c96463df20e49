"""Shared helpers of the figure modules: style, data-set choice, the shared fine-tuning setup. The statistics
(intervals, tests, verdict rules) live in :mod:`figures.criteria`; ``mean_ci`` / ``ci_dict`` are re-exported here."""

from __future__ import annotations

from figures.criteria import ci_dict, mean_ci  # noqa: E402,F401  (re-exported: figures not yet migrated)
from figures.framework import real_datasets  # noqa: E402,F401  (re-exported: figures not yet converted)
from figures.style import colors, new_figure  # noqa: E402,F401  (re-exported: figures not yet converted)
from toymodels import data as datasets  # noqa: E402


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

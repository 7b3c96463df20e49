"""The shared fine-tuning protocol (ALLoRA sec. 3.4) that the figures, the benchmarks and the notebooks use.

:func:`base_config` is the one fine-tuning set-up, sized by fidelity (:data:`FIDELITIES`; :data:`SIZES` holds
each fidelity's data and step counts); :func:`real_datasets` picks the real data sets available here.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from toymodels import data as datasets
from toymodels.config import FinetuneConfig

FIDELITIES = ("quick", "default", "large")

#: per fidelity: the data sizes, pretraining steps, fine-tuning steps and record interval of :func:`base_config`
SIZES = MappingProxyType({
    "quick": MappingProxyType(dict(n_pretrain=512, n_finetune=128, n_test=1000, pretrain_steps=60, steps=30,
                                   record_every=10)),
    "default": MappingProxyType(dict(n_pretrain=4096, n_finetune=512, n_test=2000, pretrain_steps=500, steps=300,
                                     record_every=25)),
    "large": MappingProxyType(dict(n_pretrain=4096, n_finetune=512, n_test=None, pretrain_steps=1500, steps=1000,
                                   record_every=50)),
})


def base_config(fidelity="default", dataset: str = "mnist", **overrides) -> FinetuneConfig:
    """The shared fine-tuning setup (ALLoRA sec. 3.4 protocol), sized by ``fidelity``.

    ``fidelity``: one of :data:`FIDELITIES`, or an object with a ``fidelity`` attribute (a figure's context).
    Default: pretrain a 784-256-256-10 MLP on 4096 images (500 Adam steps), fine-tune on another 512 with a
    pixel-permutation task shift, test on 2000 test images. Every user of the protocol gets the same pretraining
    settings at a given fidelity, so the pretrained model is computed once and shared through the run cache.
    Quick: 512/128 images, 60 pretraining steps, 1000 test images. ``overrides``: any
    :class:`~toymodels.config.FinetuneConfig` field.
    """
    name = fidelity if isinstance(fidelity, str) else getattr(fidelity, "fidelity", fidelity)
    if name not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {FIDELITIES} (or have a .fidelity attribute), got {fidelity!r}")
    if dataset not in datasets.DIMS:
        raise ValueError(f"dataset must be one of {tuple(datasets.DIMS)}, got {dataset!r}")
    settings = dict(dataset=dataset, widths=(datasets.DIMS[dataset], 256, 256, 10), task_shift="permute",
                    **SIZES[name])
    settings.update(overrides)
    return FinetuneConfig(**settings)


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

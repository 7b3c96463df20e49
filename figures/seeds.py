"""The Monte-Carlo seeds of the figures, in one place.

Each figure that draws its own random numbers (beyond the engine's per-run streams, :class:`toymodels.SeedStreams`)
takes them from here, and every one is :func:`analysis.streams.stream_seed` ``(seed, <figure's key>, ...)``: numpy's
SeedSequence of the problem seed with a spawn key that names the figure's stream and the indices of the draw (the
project's one derivation of seeds; no two (seed, key) pairs share a seed, ``tests/figures/test_seeds.py``). Until
issue 16 these were ad-hoc formulas (``1000 seed + 10 j + i``, ``default_rng([seed, 20])``, a fork at
``seed + 10000 + step``) whose streams coincided across seeds; :data:`SCHEMES` keeps the words a figure's JSON
shows for each.
"""

from __future__ import annotations

import numpy as np

from analysis.streams import rng, stream_seed

#: The key of each scheme (its first spawn-key element) and the words a figure's JSON uses for it.
SCHEMES = {
    "allora-fig1-dropout-mc": "stream_seed(seed, 'allora-fig1-dropout-mc', dataset_index, rate_index)",
    "allora-fig2-grad-std": "the run's streams forked at ('allora-fig2-grad-std', step): "
                            "stream_seed(seed, 'allora-fig2-grad-std', step)",
    "allora-prop1-ripple": "default_rng(stream_seed(seed, 'allora-prop1-ripple', k))",
    "allora-ripple-adaptive": "default_rng(stream_seed(seed, 'allora-ripple-adaptive'))",
    "rslora-unit-inputs": "default_rng(stream_seed(seed, 'rslora-unit-inputs'))",
    "rslora-thm-coordcheck-sgd": "stream_seed(seed, 'rslora-thm-coordcheck-sgd', i) at the i-th rank",
}


def dropout_loss_draws(seed: int, dataset_index: int, rate_index: int) -> int:
    """allora-fig1-dropout-mc: the seed of :func:`analysis.dropout.sample_loss` for one problem seed, data set
    and dropout rate: ``stream_seed(seed, "allora-fig1-dropout-mc", dataset_index, rate_index)``."""
    return stream_seed(seed, "allora-fig1-dropout-mc", dataset_index, rate_index)


def gradient_masks_offset(step: int) -> tuple[str, int]:
    """allora-fig2-grad-std: the key at which a run's streams are forked (``state.streams.fork``) for the
    Monte-Carlo masks of the gradient std at ``step``: ``("allora-fig2-grad-std", step)``, i.e. the global RNG
    seeded ``stream_seed(seed, "allora-fig2-grad-std", step)``."""
    return ("allora-fig2-grad-std", int(step))


def random_chain(seed: int, k: int) -> np.random.Generator:
    """allora-prop1-ripple: the k-th random multilinear chain of a seed:
    ``default_rng(stream_seed(seed, "allora-prop1-ripple", k))``."""
    return rng(seed, "allora-prop1-ripple", k)


def ripple_chain(seed: int) -> np.random.Generator:
    """allora-ripple-adaptive: the random chain and output gradient of a seed:
    ``default_rng(stream_seed(seed, "allora-ripple-adaptive"))``."""
    return rng(seed, "allora-ripple-adaptive")


def unit_inputs(seed: int) -> np.random.Generator:
    """rslora-thm-coordcheck and rslora-trajectory: the unit inputs and output gradients of the proof's linear
    loss: ``default_rng(stream_seed(seed, "rslora-unit-inputs"))``."""
    return rng(seed, "rslora-unit-inputs")


def sgd_simulation(seed: int, i: int) -> int:
    """rslora-thm-coordcheck: the seed of :func:`analysis.rank_scaling.simulate_sgd` at the i-th rank:
    ``stream_seed(seed, "rslora-thm-coordcheck-sgd", i)``."""
    return stream_seed(seed, "rslora-thm-coordcheck-sgd", i)

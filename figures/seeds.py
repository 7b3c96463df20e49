"""The Monte-Carlo seed schemes of the figures, in one place.

Each figure that draws its own random numbers (beyond the engine's per-run streams) takes them from here. The
schemes are the ones the committed gallery was computed with, moved unchanged (issue 15: giving them one
scheme changes numbers, so the verdict-confirmation work does that, with new named streams)."""

from __future__ import annotations

import numpy as np


def dropout_loss_draws(seed: int, dataset_index: int, rate_index: int) -> int:
    """allora-fig1-dropout-mc: the seed of :func:`analysis.dropout.sample_loss` for one problem seed, data set
    and dropout rate: ``1000 seed + 10 dataset_index + rate_index``."""
    return 1000 * seed + 10 * dataset_index + rate_index


def gradient_masks_offset(step: int) -> int:
    """allora-fig2-grad-std: the offset at which a run's stream is forked (``state.streams.fork``) for the
    Monte-Carlo masks of the gradient std at ``step``: ``10000 + step``."""
    return 10_000 + step


def random_chain(seed: int, k: int) -> np.random.Generator:
    """allora-prop1-ripple: the k-th random multilinear chain of a seed: ``default_rng([seed, k])``."""
    return np.random.default_rng([seed, k])


def ripple_chain(seed: int) -> np.random.Generator:
    """allora-ripple-adaptive: the random chain and output gradient of a seed: ``default_rng([seed, 20])``."""
    return np.random.default_rng([seed, 20])


def unit_inputs(seed: int) -> np.random.Generator:
    """rslora-thm-coordcheck and rslora-trajectory: the unit inputs and output gradients of the proof's linear
    loss: ``default_rng(seed)``."""
    return np.random.default_rng(seed)


def sgd_simulation(seed: int, i: int) -> int:
    """rslora-thm-coordcheck: the seed of :func:`analysis.rank_scaling.simulate_sgd` at the i-th rank:
    ``SeedSequence([seed, i]).generate_state(1)[0]``."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])

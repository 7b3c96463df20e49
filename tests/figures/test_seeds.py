"""figures.seeds: every Monte-Carlo seed scheme of the figures is analysis.streams.stream_seed with its own key, and
no seed of a scheme equals another scheme's or a run stream's (the old ad-hoc formulas, such as
``1000 seed + 10 j + i``, coincided across seeds and with the runs' ``seed + offset`` streams)."""

from __future__ import annotations

import numpy as np

from analysis.streams import stream_seed, torch_seed_bits
from figures import seeds
from toymodels.seeds import SeedStreams

RUN_STREAMS = ("pretrain", "init", "masks", "batches", "probe", "grad_std")
GALLERY_SEEDS = (*range(10), *range(100, 110))  # exploratory and confirmatory seeds


def test_each_scheme_is_its_stream():
    assert seeds.dropout_loss_draws(7, 1, 3) == stream_seed(7, "allora-fig1-dropout-mc", 1, 3)
    assert SeedStreams(7).fork_seed(seeds.gradient_masks_offset(25)) == stream_seed(7, "allora-fig2-grad-std", 25)
    for gen, key in ((seeds.random_chain(4, 9), ("allora-prop1-ripple", 9)),
                     (seeds.ripple_chain(4), ("allora-ripple-adaptive",)),
                     (seeds.unit_inputs(4), ("rslora-unit-inputs",))):
        np.testing.assert_array_equal(gen.random(3), np.random.default_rng(stream_seed(4, *key)).random(3))
    assert seeds.sgd_simulation(4, 2) == stream_seed(4, "rslora-thm-coordcheck-sgd", 2)
    assert set(seeds.SCHEMES) == {"allora-fig1-dropout-mc", "allora-fig2-grad-std", "allora-prop1-ripple",
                                  "allora-ripple-adaptive", "rslora-unit-inputs", "rslora-thm-coordcheck-sgd"}


def _integer_seeds(s: int) -> list[int]:
    """Every integer seed of seed ``s`` that the figures pass to a consumer, over the indices they use (fig1: 2
    data sets x 4 rates; thm-coordcheck: up to 8 ranks), with the seeds of the runs' streams."""
    return ([SeedStreams(s).seed(n) for n in RUN_STREAMS]
            + [seeds.dropout_loss_draws(s, j, i) for j in range(2) for i in range(4)]
            + [seeds.sgd_simulation(s, i) for i in range(8)]
            + [stream_seed(s, "allora-ripple-adaptive"), stream_seed(s, "rslora-unit-inputs")])


def test_no_two_seeds_coincide_across_schemes_and_runs():
    """Seeds 0..9999: the run streams and every scheme's seeds are all distinct. Fails on the old formulas (e.g.
    dropout_loss_draws(0, 0, 1) = 1 = seed 1's pretraining stream)."""
    vals = [v for s in range(10_000) for v in _integer_seeds(s)]
    assert len(set(vals)) == len(vals)


def test_the_many_index_schemes_and_forks_are_distinct():
    """The schemes with many draws per seed (prop1's 200 random chains, fig2's forks at every step up to 1000)
    over the gallery's seeds (0..9, 100..109), with the run streams; and the torch-drawn ones (run streams and fig2's forks) distinct in
    the 32 bits torch's CPU generator reads, for the gallery's seeds."""
    vals = [v for s in GALLERY_SEEDS for v in (
        [SeedStreams(s).seed(n) for n in RUN_STREAMS]
        + [stream_seed(s, "allora-prop1-ripple", k) for k in range(200)]
        + [SeedStreams(s).fork_seed(seeds.gradient_masks_offset(t)) for t in range(1000)])]
    assert len(set(vals)) == len(vals)
    torch_vals = [torch_seed_bits(v) for s in GALLERY_SEEDS for v in (
        [SeedStreams(s).seed(n) for n in RUN_STREAMS]
        + [SeedStreams(s).fork_seed(seeds.gradient_masks_offset(t)) for t in range(1000)])]
    assert len(set(torch_vals)) == len(torch_vals)

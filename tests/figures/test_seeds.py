"""figures.seeds: each Monte-Carlo seed scheme is the formula the committed gallery was computed with."""

from __future__ import annotations

import numpy as np

from figures import seeds


def test_schemes_are_the_gallery_formulas():
    assert seeds.dropout_loss_draws(7, 1, 3) == 7013
    assert seeds.gradient_masks_offset(25) == 10_025
    np.testing.assert_array_equal(seeds.random_chain(4, 9).random(3), np.random.default_rng([4, 9]).random(3))
    np.testing.assert_array_equal(seeds.ripple_chain(4).random(3), np.random.default_rng([4, 20]).random(3))
    np.testing.assert_array_equal(seeds.unit_inputs(4).random(3), np.random.default_rng(4).random(3))
    assert seeds.sgd_simulation(4, 2) == int(np.random.SeedSequence([4, 2]).generate_state(1)[0])
    assert seeds.sgd_simulation(4, 2) != seeds.sgd_simulation(4, 3)

"""Declared criterion of allora-tab5 (issue 9) on synthetic per-seed numbers, both ways (no training here; the
figures run in --quick mode in test_figures.py). The criteria of allora-fig1 to fig4 are tested in
tests/figures/allora/test_fig*.py."""

from __future__ import annotations

import numpy as np

from figures.allora.tab5_dropout_epochs import CRITERION as TAB5_CRITERION
from tests.figures.constructed import seeds


def _noise(seed: int) -> np.ndarray:
    """Constructed seed-to-seed spread (sample sd 0.05, mean 0; see tests/figures/constructed.py): the verdicts
    asserted below hold with certainty, not with the chance of a random draw."""
    return seeds(0.0, 0.05, shift=seed)


def test_tab5_crossover_both_horizons_and_sanity_row_does_not_count():
    both = {"short_high_dropout_worse": -0.7 + _noise(5), "long_high_dropout_better": 2.6 + _noise(6),
            "short_above_chance": 0.5 + _noise(7)}
    assert TAB5_CRITERION.evaluate(both).verdict == "reproduced"
    long_only = dict(both, short_high_dropout_worse=0.6 + _noise(8))
    assert TAB5_CRITERION.evaluate(long_only).verdict == "partially reproduced"
    neither = dict(long_only, long_high_dropout_better=-1.0 + _noise(9))
    assert TAB5_CRITERION.evaluate(neither).verdict == "not reproduced"
    at_chance = dict(both, short_above_chance=-0.08 + _noise(10))
    out = TAB5_CRITERION.evaluate(at_chance)
    assert out.verdict == "reproduced" and not out.passed["short_above_chance"]


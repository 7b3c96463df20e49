"""figures.allora.zero_init_a: the declared criterion on synthetic numbers that must pass and that must fail."""

from __future__ import annotations

import math

import numpy as np

from figures.allora import zero_init_a as fn


def _seeds(mean, sd=0.1, n=10, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    return mean + sd * (v - v.mean()) / v.std(ddof=1)


def test_zero_a_criterion():
    good = {"mirror_closed_form": 1.0, "same_escape": _seeds(0.0, 0.1), "dropout_slows_zero_a": _seeds(0.3),
            "dropout_slows_usual": _seeds(0.3)}
    assert fn.CRITERION.evaluate(good).verdict == "reproduced"
    # an escape that is twice as slow is not "the same" (margin ln 1.5)
    assert fn.CRITERION.evaluate({**good, "same_escape": _seeds(math.log(2))}).verdict == \
        "partially reproduced"
    # too noisy to show equivalence: fails, although the mean is 0
    assert not fn.CRITERION.evaluate({**good, "same_escape": _seeds(0.0, 2.0)}).passed["same_escape"]
    assert fn.CRITERION.evaluate({**good, "mirror_closed_form": 0.0}).verdict == "not reproduced"

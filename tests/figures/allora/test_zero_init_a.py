"""figures.allora.zero_init_a: the declared criterion on constructed numbers that must pass and that must fail."""

from __future__ import annotations

import math

from figures.allora import zero_init_a as fn
from tests.figures.constructed import seeds

GOOD = {"mirror_closed_form": 1.0, "same_escape": seeds(0.0, 0.1), "dropout_slows_zero_a": seeds(0.7, 0.1),
        "dropout_slows_usual": seeds(0.7, 0.1, shift=1)}


def test_zero_a_criterion_passes_on_the_claim():
    assert fn.CRITERION.evaluate(GOOD).verdict == "reproduced"


def test_the_exact_closed_form_row_never_makes_partially_certain():
    # old rule: mirror_closed_form alone gave "partially reproduced" whatever the runs said
    bad = {**GOOD, "same_escape": seeds(math.log(2)), "dropout_slows_zero_a": seeds(-0.3)}
    out = fn.CRITERION.evaluate(bad)
    assert out.passed["mirror_closed_form"] and out.verdict == "not reproduced"
    # and a failing closed form (a code bug) does not change the verdict on the runs
    assert fn.CRITERION.evaluate({**GOOD, "mirror_closed_form": 0.0}).verdict == "reproduced"


def test_zero_a_margins_come_from_the_papers_30_percent():
    # a factor 1.4 either way is not "the same" (band ln 1.3); the old band ln 1.5 passed it
    out = fn.CRITERION.evaluate({**GOOD, "same_escape": seeds(math.log(1.4), 0.01)})
    assert not out.passed["same_escape"] and out.verdict == "partially reproduced"
    # a significant slowdown of 15% is what the paper calls barely impacting: it does not count (the old margin 0 did)
    out = fn.CRITERION.evaluate({**GOOD, "dropout_slows_zero_a": seeds(math.log(1.15), 0.01)})
    assert not out.passed["dropout_slows_zero_a"] and out.verdict == "partially reproduced"
    # too noisy to show equivalence: fails, although the mean is 0
    assert not fn.CRITERION.evaluate({**GOOD, "same_escape": seeds(0.0, 2.0)}).passed["same_escape"]

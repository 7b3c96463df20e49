"""The declared criterion of lowr-tab5 (issue 9) on synthetic numbers, both ways, and its divergence diagnosis on
a synthetic channel history (no training here; the figure runs in --quick mode in test_figures.py)."""

from __future__ import annotations

import math

import numpy as np

from analysis.inputs import default_seed
from figures.lowr import MAIN_LOWR, TAB5_GRID, _divergence_diagnosis, _setting_name, _tab5_criterion


def _samples(shift: dict, plus: float, seed: int = 0) -> dict:
    rng = np.random.default_rng([default_seed(), seed])
    out = {_setting_name(*g): shift.get(g, 0.0) + 0.3 * rng.standard_normal(10) for g in TAB5_GRID}
    out["plus_noninferior"] = plus + 0.3 * rng.standard_normal(10)
    return out


def test_tab5_noninferiority_passes_settings_equal_to_the_baseline():
    crit = _tab5_criterion(TAB5_GRID)
    # every setting equal to LoRA on average (the paper's table 5 shape): "matches" -> reproduced
    assert crit.evaluate(_samples({}, 0.0)).verdict == "reproduced"


def test_tab5_a_diverged_setting_fails_and_main_setting_decides_partially():
    crit = _tab5_criterion(TAB5_GRID)
    bad = (math.inf, 1.0, 1)
    out = crit.evaluate(_samples({bad: -40.0}, 0.0))  # diverged seeds at chance: far below the margin
    assert out.verdict == "partially reproduced" and not out.passed[_setting_name(*bad)]
    everything_worse = {g: -5.0 for g in TAB5_GRID}
    assert crit.evaluate(_samples(everything_worse, -5.0)).verdict == "not reproduced"
    only_main = {g: -5.0 for g in TAB5_GRID if g != MAIN_LOWR}
    assert crit.evaluate(_samples(only_main, -5.0)).verdict == "partially reproduced"


def test_divergence_diagnosis_reads_the_recorded_channels():
    a = np.ones((3, 2, 4))
    b = np.ones((3, 2, 4))
    a[2, 1, 0], b[2, 1, 0] = 50.0, 0.1  # the runaway channel at the last record
    hist = {"step": np.array([0.0, 10.0, 20.0]), "channel_a": a, "channel_b": b}
    d = _divergence_diagnosis(hist, math.inf, 1.0)
    assert d["first"] == {"step": 10.0, "max_a_over_b": 1.0, "max_norm_a": 1.0, "max_gamma_minus_1": 0.0}
    assert d["last"]["max_a_over_b"] == 500.0 and d["last"]["max_norm_a"] == 50.0
    # by hand: c = (5, 1, 1, 1), population Var(c) = 3; gamma_0 - 1 = alpha (max b - b_0) Var(c) = 0.9 * 3
    assert math.isclose(d["last"]["max_gamma_minus_1"], 2.7, rel_tol=1e-6)

"""The declared criteria of lowr-fig2, fig3, fig4 and tab5 (issue 9) on synthetic numbers, both ways, the helpers
that turn runs into their inputs, and tab5's divergence diagnosis on a synthetic channel history (no training here;
the figures run in --quick mode in test_figures.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.inputs import default_seed
from figures.lowr.protocol import MAIN_LOWR, accuracy_pp
from figures.lowr.protocol import gamma_minus_one as _gamma_minus_one
from figures.lowr.tab5_sensitivity import CLAIM as _CLAIM
from figures.lowr.tab5_sensitivity import GRID as TAB5_GRID
from figures.lowr.tab5_sensitivity import criterion as _tab5_criterion
from figures.lowr.tab5_sensitivity import divergence_diagnosis as _divergence_diagnosis
from figures.lowr.tab5_sensitivity import setting_name as _setting_name
from tests.figures.constructed import seeds, t_stat


def _tab5(setting: float = 0.4, moderate: float = 0.4, plus: float = 0.5, sd: float = 0.1, **override) -> dict:
    """Constructed per-seed differences in pp (exact sample mean and sd; tests/figures/constructed.py)."""
    out = {_setting_name(*g): seeds(setting, sd, shift=i) for i, g in enumerate(TAB5_GRID)}
    out["moderate_beats"] = seeds(moderate, sd, shift=11)
    out["plus_beats"] = seeds(plus, sd, shift=12)
    return {**out, **override}


def test_tab5_tests_the_papers_claim_with_the_papers_margins():
    crit = _tab5_criterion(TAB5_GRID)
    tests = {t.name: t for t in crit.tests}
    assert all(t.margin_from == "paper" for t in tests.values())
    assert tests["plus_beats"].margin == tests["moderate_beats"].margin == 0.1  # table 2: 39.55% -> 39.65%
    robust = [t for t in tests.values() if t.name.startswith("noninferior_")]
    assert {t.margin for t in robust} == {-0.19}  # table 5: 85.94% vs 86.13%
    # the finite-tau settings are tested; tau = inf (table 5's own 3.1 pp drop) is run and reported only
    assert len(robust) == len([g for g in TAB5_GRID if math.isfinite(g[0])]) == 5
    assert not any("tau=inf" in n for n in tests)
    assert "beats LoRA+" in _CLAIM and "matches or beats" not in _CLAIM
    # the paper's own effects (table 5: finite-tau mean +0.15 pp, table 6: +0.40 pp) clear the margins
    assert crit.evaluate(_tab5()).verdict == "reproduced"


def test_tab5_matching_the_baseline_is_no_longer_enough():
    crit = _tab5_criterion(TAB5_GRID)
    # every setting and LoWR + LoRA+ equal to their baselines on average: the old 'matches or beats' rule
    # (non-inferiority at -1 pp) called this reproduced; the paper claims a gain
    equal = _tab5(0.0, 0.0, 0.0)
    assert all(t_stat(equal[n], -1.0) > 25 for n in equal)  # far inside the old -1 pp margin
    assert crit.evaluate(equal).verdict == "not reproduced"
    # LoWR + LoRA+ 0.5 pp below LoRA+ (non-inferior at the old -1 pp): table 6's part fails
    out = crit.evaluate(_tab5(plus=-0.5))
    assert out.verdict == "partially reproduced" and not out.passed["plus_beats"]


def test_tab5_diverged_seeds_count_against_the_method():
    crit = _tab5_criterion(TAB5_GRID)
    # LoWR + LoRA+ diverges in every seed: chance (10%) against LoRA+'s ~85%: table 5's part alone
    out = crit.evaluate(_tab5(plus_beats=seeds(-75.0, 0.5)))
    assert out.verdict == "partially reproduced" and not out.passed["plus_beats"]
    # one diverged seed of ten, the nine others +0.5 pp: the mean falls to ~ -7 pp, no credit
    one = np.array([0.5 + 0.01 * i for i in range(9)] + [100 * (0.1 - 0.85)])
    assert not crit.evaluate(_tab5(plus_beats=one)).passed["plus_beats"]
    # the measurement puts a diverged run at chance, in either arm
    ok, blown = {"test_acc": np.array([0.5, 0.84])}, {"test_acc": np.array([0.5]), "diverged_step": np.array([7])}
    np.testing.assert_allclose(accuracy_pp([ok, blown]), [84.0, 10.0])


def test_tab5_a_setting_below_the_papers_robustness_denies_table_5():
    crit = _tab5_criterion(TAB5_GRID)
    worse = _tab5(**{_setting_name(*MAIN_LOWR): seeds(-1.0, 0.1, shift=3)})  # 1 pp below LoRA (the old margin)
    out = crit.evaluate(worse)
    assert out.verdict == "partially reproduced" and out.passed["plus_beats"]
    assert crit.evaluate(dict(worse, plus_beats=seeds(0.0, 0.1))).verdict == "not reproduced"


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


# ------------------------------------------------------------------------------------------------- figs. 2-4


def _n(seed: int, scale: float = 0.01) -> np.ndarray:
    """Constructed seed-to-seed spread (sample sd ``scale``, mean 0; tests/figures/constructed.py)."""
    return seeds(0.0, scale, shift=seed)


def test_fig2_needs_the_correlation_and_b_carrying_the_differences_in_every_layer():
    from figures.lowr.fig2_channel_corr import CRITERION as FIG2_CRITERION
    from figures.lowr.protocol import LAYERS

    ok = {**{f"tracks_b_{ln}": 0.99 + _n(i) for i, ln in enumerate(LAYERS)},
          **{f"b_carries_{ln}": 0.95 + _n(10 + i, 0.05) for i, ln in enumerate(LAYERS)}}
    assert FIG2_CRITERION.evaluate(ok).verdict == "reproduced"
    a_too = dict(ok, **{f"b_carries_{LAYERS[1]}": 0.5 + _n(20, 0.05)})  # A and B share the differences equally
    assert FIG2_CRITERION.evaluate(a_too).verdict == "partially reproduced"
    # B's share 0.7 passed the old margin 0.5 (the null); the paper's r > 0.9 is a share of 0.81
    most = dict(ok, **{f"b_carries_{LAYERS[1]}": 0.7 + _n(22, 0.05)})
    assert t_stat(most[f"b_carries_{LAYERS[1]}"], 0.5) > 10
    assert FIG2_CRITERION.evaluate(most).verdict == "partially reproduced"
    weak = dict(ok, **{f"tracks_b_{LAYERS[2]}": 0.85 + _n(21)})  # r below the paper's 0.9 in one layer
    assert FIG2_CRITERION.evaluate(weak).verdict == "not reproduced"


def test_fig3_each_half_of_the_claim_must_hold_in_every_layer():
    from figures.lowr.fig3_with_without import CRITERION as FIG3_CRITERION
    from figures.lowr.fig3_with_without import layer_test as _fig3_name
    from figures.lowr.protocol import LAYERS

    assert all(t.margin_from == "theory" for t in FIG3_CRITERION.tests)
    ok = {**{_fig3_name("mean_up", ln): 0.05 + _n(30 + i) for i, ln in enumerate(LAYERS)},
          **{_fig3_name("std_down", ln): -0.03 + _n(40 + i) for i, ln in enumerate(LAYERS)}}
    assert FIG3_CRITERION.evaluate(ok).verdict == "reproduced"
    # the measured shape at the paper's alpha: LoWR barely acts, changes ~0 in every layer
    none = {k: _n(50 + i) for i, k in enumerate(ok)}
    assert FIG3_CRITERION.evaluate(none).verdict == "not reproduced"
    # the old rule gave "partially" to any one of the 6 tests: 2 of 6 with one layer significantly reversed
    reversed_one = dict(none, **{_fig3_name("mean_up", LAYERS[0]): 0.05 + _n(60),
                                 _fig3_name("std_down", LAYERS[0]): -0.05 + _n(61),
                                 _fig3_name("mean_up", LAYERS[2]): -0.05 + _n(62)})
    assert FIG3_CRITERION.evaluate(reversed_one).verdict == "not reproduced"
    # the mean rises in every layer, the spread nowhere falls: the mean half holds, partially
    means = {k: v for k, v in ok.items() if k.startswith("mean_up")}
    assert FIG3_CRITERION.evaluate({**none, **means}).verdict == "partially reproduced"
    # ... but not when one layer's mean is significantly lower with LoWR
    bad = {**none, **means, _fig3_name("mean_up", LAYERS[1]): -0.05 + _n(63)}
    assert FIG3_CRITERION.evaluate(bad).verdict == "not reproduced"


def test_fig4_partial_credit_only_from_the_loss():
    from figures.lowr.fig4_loss_gradnorm import CRITERION as FIG4_CRITERION

    both = {"loss_lower": -0.01 + _n(70, 0.002), "grad_larger": np.log(1.3) + _n(71, 0.05)}
    assert FIG4_CRITERION.evaluate(both).verdict == "reproduced"
    assert FIG4_CRITERION.evaluate(dict(both, grad_larger=_n(72, 0.05))).verdict == "partially reproduced"
    assert t_stat(both["loss_lower"], 0.0) < -15 and t_stat(both["grad_larger"], 0.0) > 15
    # the old rule's partial credit: a larger gradient norm (mechanical under LoWR) while the loss is
    # significantly higher with LoWR: now not reproduced
    mechanical = dict(both, loss_lower=0.0045 + _n(73, 0.004))
    assert t_stat(mechanical["loss_lower"], 0.0) > 3
    assert FIG4_CRITERION.evaluate(mechanical).verdict == "not reproduced"
    measured = {"loss_lower": 0.0045 + _n(73, 0.004), "grad_larger": np.log(1.0) + _n(74, 0.2)}
    assert FIG4_CRITERION.evaluate(measured).verdict == "not reproduced"


def test_channel_stats_and_the_late_window():
    from figures.lowr.fig4_loss_gradnorm import late_window
    from figures.lowr.protocol import b_share as _b_share
    from figures.lowr.protocol import channel_stats
    from figures.lowr.protocol import log_ratio as _log_ratio

    rng = np.random.default_rng(default_seed())
    b = rng.uniform(0.1, 2.0, 32)
    st = channel_stats(np.full(32, 0.5), b)  # constant ||a_i||: the significance is proportional to ||b_i||
    assert st["r_b"] == pytest.approx(1.0, abs=1e-12) and st["share"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(st["r_a"])
    assert st["mean"] == pytest.approx(0.5 * b.mean()) and st["std"] == pytest.approx(0.5 * b.std())
    a = rng.uniform(0.1, 2.0, 32)
    assert channel_stats(a, b)["share"] == _b_share(a, b)
    np.testing.assert_array_equal(late_window(np.arange(0, 301, 10.0)), np.arange(0, 301, 10) > 150)
    d = _log_ratio(np.log([2.0, 2.0, 2.0]))
    assert d["mean"] == pytest.approx(2.0) and d["ci_low"] == d["ci_high"] == pytest.approx(2.0)


def test_lowr_protocols_adam_and_sgd_plausible_and_the_scaled_alpha_shares_tab5_runs():
    from figures.framework import check_protocols, headline_protocols
    from figures.lowr import (
        effective_rank,
        fig2_channel_corr,
        fig3_with_without,
        fig4_loss_gradnorm,
        mechanism,
        plugin_inits,
        tab5_sensitivity,
    )
    from figures.lowr.protocol import ALPHA_PROTOCOLS as LOWR_PROTOCOLS
    from figures.lowr.protocol import SCALED_ALPHA

    primary = [p for p in LOWR_PROTOCOLS if p.primary]
    assert len(primary) == 1 and not primary[0].paper and primary[0].settings["lowr"] == MAIN_LOWR
    scaled = [p.settings["lowr"] for p in LOWR_PROTOCOLS if p.name.startswith("alpha")]
    assert scaled == [(MAIN_LOWR[0], SCALED_ALPHA, MAIN_LOWR[2])] and scaled[0] in TAB5_GRID
    # the paper names no optimizer: every LoWR training figure's headline is Adam and SGD combined
    for mod in (effective_rank, fig2_channel_corr, fig3_with_without, fig4_loss_gradnorm, mechanism, plugin_inits,
                tab5_sensitivity):
        check_protocols(mod.PROTOCOLS)
        heads = headline_protocols(mod.PROTOCOLS)
        assert [p.settings.get("optimizer", "adam") for p in heads] == ["adam", "sgd"], mod.ID
        assert len(mod.PROTOCOLS) >= 4 and not any(p.paper for p in mod.PROTOCOLS), mod.ID
    # the figures on the shared runs use the same settings, so they share runs through the cache
    shared = {p.name: {k: v for k, v in p.settings.items() if k != "lowr"} for p in tab5_sensitivity.PROTOCOLS}
    for mod in (fig2_channel_corr, fig3_with_without, fig4_loss_gradnorm):
        for p in mod.PROTOCOLS:
            if p.name in shared:
                assert {k: v for k, v in p.settings.items() if k != "lowr"} == shared[p.name]
    # the target gamma - 1 per step ln(tau) / (2T) over the shared 300 steps, and the scaled alpha within the
    # range that the paper-alpha runs' gamma - 1 (1.3e-3 and 3e-4 in the two first layers at alpha = 0.1) imply
    target = math.log(MAIN_LOWR[0]) / (2 * 300)
    assert 0.1 * target / 1.3e-3 <= SCALED_ALPHA <= 0.1 * target / 3e-4


def test_prop41_apart_for_every_n_and_the_closed_form_is_a_sanity_row():
    from figures.lowr.prop41_equivalent import CRITERION as PROP41_CRITERION
    from figures.lowr.prop41_equivalent import NS as PROP41_NS
    from figures.lowr.prop41_equivalent import apart_test as _prop41_name

    far = {**{_prop41_name(n): np.log(0.3) + _n(80 + i, 0.2) for i, n in enumerate(PROP41_NS)}, "closed_form": 1e-15}
    assert PROP41_CRITERION.evaluate(far).verdict == "reproduced"
    # a float32-like noise floor (~0.5%) for n = 0.5: that module did not move away
    near = dict(far, **{_prop41_name(PROP41_NS[0]): np.log(0.005) + _n(90, 0.2)})
    assert PROP41_CRITERION.evaluate(near).verdict == "partially reproduced"
    assert PROP41_CRITERION.evaluate({**{k: np.log(0.005) + _n(91, 0.2) for k in far},
                                      "closed_form": 1e-15}).verdict == "not reproduced"
    out = PROP41_CRITERION.evaluate(dict(far, closed_form=1e-3))  # a broken identity is reported, never decides
    assert out.verdict == "reproduced" and not out.passed["closed_form"]


def test_divergence_diagnosis_survives_non_finite_records():
    """A record taken while the run blew up (inf norms in one layer) gives NaN gamma there, not an error, and the
    other layer's gamma is still reported."""
    a = np.array([[[1.0, 2.0], [1.0, 1.0]], [[np.inf, 2.0], [1.0, 3.0]]])
    b = np.array([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.5], [1.0, 2.0]]])
    hist = {"step": np.array([0.0, 10.0]), "channel_a": a, "channel_b": b}
    diag = _divergence_diagnosis(hist, tau=10.0, alpha=1.0)
    assert diag["last"]["max_norm_a"] == np.inf
    expected = float(np.max(_gamma_minus_one(a[1, 1], b[1, 1], 10.0, 1.0)))
    assert diag["last"]["max_gamma_minus_1"] == expected > 0

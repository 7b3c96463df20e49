"""rslora_new: the exponent fit, the exact-trajectory exponents against the theorem, and the declared criteria
both ways on synthetic numbers (the --quick runs are in test_figures.py)."""

from __future__ import annotations

import numpy as np
import pytest

from figures import rslora_new as rn


def test_seed_slopes_against_polyfit():
    rng = np.random.default_rng(0)
    x = np.log([32.0, 128.0, 512.0])
    Y = rng.normal(size=(5, 3))
    Y[2, 1] = np.nan
    got = rn.seed_slopes(x, Y)
    for i in (0, 1, 3, 4):
        assert got[i] == pytest.approx(np.polyfit(x, Y[i], 1)[0], rel=1e-12)
    assert np.isnan(got[2])
    with pytest.raises(ValueError, match="Y must have one column per x"):
        rn.seed_slopes(x, Y[:, :2])
    with pytest.raises(ValueError, match="Y must have one column per x"):
        rn.seed_slopes(np.zeros(3), Y)


def test_exact_trajectory_exponents_match_the_theorem_for_r_much_larger_than_d():
    # rms exponents 1 - 2 beta (0 rsLoRA, -1 LoRA) at r >> d, within the finite-rank bound (d+1)/(r_min+d+1)
    ex = rn.exact_trajectory_exponents(0, d=4, ranks=(1024, 4096, 16384), steps=(1, 10), lr=0.05)
    bound = 0.5 * 5 / (1024 + 5)
    for m, target in (("rslora", 0.0), ("lora", -1.0)):
        for key in ("rms_out", "rms_grad_in", "mean_out"):
            assert np.all(np.abs(np.asarray(ex[m][key]) - target) <= bound + 1e-3), (m, key, ex[m][key])


def test_exact_trajectory_exponents_small_rank_differ():
    # r << d: the dropped terms dominate: rsLoRA's input-gradient RMS decays like r^-1/2 (ERRATA rank_scaling 2)
    ex = rn.exact_trajectory_exponents(1, d=256, ranks=(1, 2, 4), steps=(1,), lr=0.05)
    assert ex["rslora"]["rms_grad_in"][0] < -0.4


def _network_samples(net: str, rs_exp: float, lora_exp: float, n: int = 10, noise: float = 0.02,
                     seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(rn.N_DEEP_LAYERS):
        rs = rs_exp + noise * rng.standard_normal(n)
        lo = lora_exp + noise * rng.standard_normal(n)
        out[f"{net}_rslora_{i}"], out[f"{net}_lora_{i}"], out[f"{net}_gap_{i}"] = rs, lo, rs - lo
    return out


def _samples(rs_exp: float, lora_exp: float, linear: tuple[float, float] | None = None) -> dict:
    """Both networks at (rs_exp, lora_exp), or the linear one at ``linear``."""
    return _network_samples("relu", rs_exp, lora_exp) | _network_samples("linear", *(linear or (rs_exp, lora_exp)),
                                                                         seed=1)


def test_multilayer_criterion_covers_both_networks():
    assert set(rn.NETWORKS) == {"relu", "linear"}
    names = {t.name for t in rn.MULTILAYER.claim_tests}
    assert names == set(_samples(0.0, -1.0)) and len(names) == 2 * 3 * rn.N_DEEP_LAYERS
    assert rn.MULTILAYER.rule.names() <= names


def test_multilayer_criterion_both_ways():
    assert rn.MULTILAYER.evaluate(_samples(0.0, -1.0)).verdict == "reproduced"
    # rsLoRA decays like r^-1/2 (the r << d regime): not equivalent to 0, but still flatter than LoRA
    assert rn.MULTILAYER.evaluate(_samples(-0.5, -1.5)).verdict == "partially reproduced"
    assert rn.MULTILAYER.evaluate(_samples(-1.0, -1.0)).verdict == "not reproduced"


def test_multilayer_criterion_needs_the_linear_network_too():
    # the ReLU network as the theorem says is not enough: the linear network's exponents count in the verdict
    outcome = rn.MULTILAYER.evaluate(_samples(0.0, -1.0, linear=(-0.5, -1.5)))
    assert outcome.verdict == "partially reproduced"
    assert not any(outcome.passed[f"linear_rslora_{i}"] for i in range(rn.N_DEEP_LAYERS))
    assert all(outcome.passed[f"relu_rslora_{i}"] for i in range(rn.N_DEEP_LAYERS))
    assert rn.MULTILAYER.evaluate(_samples(0.0, -1.0, linear=(-1.0, -1.0))).verdict == "not reproduced"
    # and the other way round: a linear network that agrees does not rescue a ReLU network that does not
    swapped = _network_samples("relu", -1.0, -1.0) | _network_samples("linear", 0.0, -1.0, seed=1)
    assert rn.MULTILAYER.evaluate(swapped).verdict == "not reproduced"


def test_trajectory_criterion_both_ways():
    crit = rn._trajectory_criterion((1, 10))
    rng = np.random.default_rng(1)
    good = {}
    for t in crit.tests:
        target = 0.0 if "rslora" in t.name else -1.0 if "lora" in t.name else 1.0
        good[t.name] = target + 0.01 * rng.standard_normal(10)
    assert crit.evaluate(good).verdict == "reproduced"
    bad = dict(good)
    for n in (1, 10):
        bad[f"trained_rslora_n{n}"] = -0.5 + 0.01 * rng.standard_normal(10)  # exact part still holds
    assert crit.evaluate(bad).verdict == "partially reproduced"
    for k in bad:
        bad[k] = 0.3 + 0.01 * rng.standard_normal(10) if not k.startswith("gap") else -0.1 + 0.01 * rng.standard_normal(10)
    assert crit.evaluate(bad).verdict == "not reproduced"


def test_layer_subset_criterion_both_ways():
    rng = np.random.default_rng(2)

    def s(m):
        return m + 0.05 * rng.standard_normal(10)

    good = {f"{k}_rs_gain": s(-0.5) for k in rn.SUBSETS} | {f"{k}_lora_gains_less": s(0.4) for k in rn.SUBSETS} \
        | {f"{k}_grad_collapse": s(-0.5) for k in rn.SUBSETS}
    assert rn.LAYER_SUBSET.evaluate(good).verdict == "reproduced"
    only_grad = dict(good, hidden_rs_gain=s(0.2), hidden_lora_gains_less=s(-0.2))
    assert rn.LAYER_SUBSET.evaluate(only_grad).verdict == "partially reproduced"
    none = dict(only_grad, hidden_grad_collapse=s(0.3))
    assert rn.LAYER_SUBSET.evaluate(none).verdict == "not reproduced"


def test_layer_rms_shape_and_values():
    runs = {("lora", r): [{"out_second": np.array([[0.0] * 4, [4.0, 9.0, 16.0, 25.0]]) * r} for _ in range(3)]
            for r in (1, 4)}
    rms = rn.layer_rms(runs, "lora", (1, 4))
    assert rms.shape == (3, 2, 4)
    np.testing.assert_allclose(rms[0, 1], 2 * np.array([2.0, 3.0, 4.0, 5.0]))

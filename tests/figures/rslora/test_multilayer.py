"""figures.rslora.multilayer: the declared criterion covers both networks and is tested both ways."""

from __future__ import annotations

import numpy as np

from figures.rslora import multilayer as rn


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
    names = {t.name for t in rn.CRITERION.claim_tests}
    assert names == set(_samples(0.0, -1.0)) and len(names) == 2 * 3 * rn.N_DEEP_LAYERS
    assert rn.CRITERION.rule.names() <= names


def test_multilayer_criterion_both_ways():
    assert rn.CRITERION.evaluate(_samples(0.0, -1.0)).verdict == "reproduced"
    # rsLoRA decays like r^-1/2 (the r << d regime): not equivalent to 0, but still flatter than LoRA
    assert rn.CRITERION.evaluate(_samples(-0.5, -1.5)).verdict == "partially reproduced"
    assert rn.CRITERION.evaluate(_samples(-1.0, -1.0)).verdict == "not reproduced"


def test_multilayer_criterion_needs_the_linear_network_too():
    # the ReLU network as the theorem says is not enough: the linear network's exponents count in the verdict
    outcome = rn.CRITERION.evaluate(_samples(0.0, -1.0, linear=(-0.5, -1.5)))
    assert outcome.verdict == "partially reproduced"
    assert not any(outcome.passed[f"linear_rslora_{i}"] for i in range(rn.N_DEEP_LAYERS))
    assert all(outcome.passed[f"relu_rslora_{i}"] for i in range(rn.N_DEEP_LAYERS))
    assert rn.CRITERION.evaluate(_samples(0.0, -1.0, linear=(-1.0, -1.0))).verdict == "not reproduced"
    # and the other way round: a linear network that agrees does not rescue a ReLU network that does not
    swapped = _network_samples("relu", -1.0, -1.0) | _network_samples("linear", 0.0, -1.0, seed=1)
    assert rn.CRITERION.evaluate(swapped).verdict == "not reproduced"


def test_multilayer_a_small_gap_is_not_partial_evidence():
    # rsLoRA flatter than LoRA by 0.2 in the exponent: > 0 (the old rule's partial credit), below 1 - 2 x margin
    assert rn.CRITERION.evaluate(_samples(-0.4, -0.6)).verdict == "not reproduced"
    assert all(t.margin_from == "theory" for t in rn.CRITERION.claim_tests) and len(rn.PROTOCOLS) >= 4

"""figures.rslora.layer_subset: the declared criterion both ways."""

from __future__ import annotations

import numpy as np

from figures.rslora import layer_subset as rn


def test_layer_subset_criterion_both_ways():
    rng = np.random.default_rng(2)

    def s(m):
        return m + 0.05 * rng.standard_normal(10)

    good = {f"{k}_rs_gain": s(-0.5) for k in rn.SUBSETS} | {f"{k}_lora_gains_less": s(0.4) for k in rn.SUBSETS} \
        | {f"{k}_grad_collapse": s(-0.5) for k in rn.SUBSETS}
    assert rn.CRITERION.evaluate(good).verdict == "reproduced"
    only_grad = dict(good, hidden_rs_gain=s(0.2), hidden_lora_gains_less=s(-0.2))
    assert rn.CRITERION.evaluate(only_grad).verdict == "partially reproduced"
    none = dict(only_grad, hidden_grad_collapse=s(0.3))
    assert rn.CRITERION.evaluate(none).verdict == "not reproduced"

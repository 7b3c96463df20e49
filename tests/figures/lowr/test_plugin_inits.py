"""figures.lowr.plugin_inits: the declared criterion both ways."""

from __future__ import annotations

import numpy as np

from figures.lowr import plugin_inits as ln


def _s(m, rng, n=10, sd=0.05):
    return m + sd * rng.standard_normal(n)


def test_plugin_criterion_both_ways():
    rng = np.random.default_rng(5)
    good = {f"gain_{k}": _s(0.01, rng, sd=0.003) for k in ln.INITS}
    assert ln.CRITERION.evaluate(good).verdict == "reproduced"
    assert ln.CRITERION.evaluate(dict(good, gain_olora=_s(-0.01, rng, sd=0.003))).verdict == "partially reproduced"
    assert ln.CRITERION.evaluate({k: _s(-0.01, rng, sd=0.003) for k in good}).verdict == "not reproduced"

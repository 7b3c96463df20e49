"""figures.rslora.fig3_gradnorm: the declared criterion both ways, with the paper's order-of-magnitude margins."""

from __future__ import annotations

from figures.rslora import fig3_gradnorm as fig
from figures.rslora.protocol import ORDER_SLOPE
from tests.figures.constructed import seeds


def _samples(lora: float, rs: float) -> dict:
    return {"lora_collapses": seeds(lora, 0.05), "rs_same_order": seeds(rs, 0.05, shift=1),
            "rs_flatter": seeds(rs - lora, 0.05, shift=2), "init_lora": seeds(0.0, 0.01),
            "init_rslora": seeds(0.0, 0.01, shift=3)}


def test_fig3_criterion_both_ways():
    assert fig.CRITERION.evaluate(_samples(-0.5, 0.0)).verdict == "reproduced"  # the init closed forms
    assert fig.CRITERION.evaluate(_samples(-1.5, -0.6)).verdict == "partially reproduced"
    assert fig.CRITERION.evaluate(_samples(0.0, 0.0)).verdict == "not reproduced"


def test_fig3_a_fall_of_less_than_an_order_of_magnitude_is_no_collapse():
    # LoRA's norm falls by a factor 512^0.1 = 1.9 over r = 4..2048: significantly < 0 (the old rule), no collapse
    outcome = fig.CRITERION.evaluate(_samples(-0.1, 0.0))
    assert not outcome.passed["lora_collapses"] and outcome.verdict == "not reproduced"
    assert 0.36 < ORDER_SLOPE < 0.37

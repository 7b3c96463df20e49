"""figures.rslora.layer_subset: the declared criterion both ways; 'does not train better for LoRA' is the same
equivalence (the paper's band) as in rslora-fig2 (issue 16), no longer 'gains less than rsLoRA'."""

from __future__ import annotations

from figures.rslora import fig2_loss_vs_rank as fig2
from figures.rslora import layer_subset as rn
from tests.figures.constructed import seeds


def _samples(rs: float, lora: float, grad: float, lora_sd: float = 0.001) -> dict:
    out = {}
    for k in rn.SUBSETS:
        out[f"{k}_rs_gain"] = seeds(rs, 0.05)
        out[f"{k}_lora_flat"] = seeds(lora, lora_sd, shift=1)
        out[f"{k}_grad_collapse"] = seeds(grad, 0.05, shift=2)
    return out


def test_layer_subset_criterion_both_ways():
    assert rn.CRITERION.evaluate(_samples(-0.3, 0.0, -0.5)).verdict == "reproduced"
    assert rn.CRITERION.evaluate(_samples(0.1, 0.0, -0.5)).verdict == "partially reproduced"
    assert rn.CRITERION.evaluate(_samples(0.1, 0.0, 0.0)).verdict == "not reproduced"


def test_layer_subset_lora_gaining_less_than_rslora_is_not_flat():
    # LoRA gains a third of rsLoRA's: 'gains less' (the old rule) holds, 'does not train better' does not
    outcome = rn.CRITERION.evaluate(_samples(-0.3, -0.1, -0.5, lora_sd=0.02))
    assert not outcome.passed["hidden_lora_flat"] and outcome.verdict == "partially reproduced"


def test_layer_subset_uses_fig2s_band():
    sub = {t.name: t for t in rn.CRITERION.tests}
    main = {t.name: t for t in fig2.CRITERION.tests}
    assert sub["hidden_lora_flat"].bounds == main["lora_flat"].bounds
    assert sub["hidden_rs_gain"].margin == main["rs_improves"].margin
    assert len(rn.PROTOCOLS) >= 4

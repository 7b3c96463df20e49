"""figures.allora.ripple_adaptive: the chain amplification on the tight instance, the RippleProbe callback on tiny
synthetic runs, and the declared criterion."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import ripple
from figures.allora import ripple_adaptive as fn
from tests.figures.constructed import seeds
from toymodels.config import FinetuneConfig
from toymodels.loop import finetune


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path_factory.getbasetemp() / "runs"))


def test_chain_amplification_on_the_tight_instance():
    eta, m, L = 2.0, 0.5, 6
    Ws, As, Bs, x = ripple.tight_instance(L=L, d=8, r=2, eta=eta, m=m, seed=3)
    f_lora, _ = fn.chain_amplification(Ws, As, Bs, x, x, "lora", eta)
    f_allora, _ = fn.chain_amplification(Ws, As, Bs, x, x, "allora", eta)
    depths = np.arange(1, L + 1)
    # on the tight instance x stays on the shared top direction: amplification (1 + eta m)^L, ALLoRA (1 + m)^L
    np.testing.assert_allclose(f_lora, (1 + eta * m) ** depths, rtol=1e-10)
    np.testing.assert_allclose(f_allora, (1 + m) ** depths, rtol=1e-10)
    assert f_lora[-1] == pytest.approx(ripple.output_norm(Ws, As, Bs, eta, x) / ripple.output_norm(Ws, As, Bs, 0, x))


def _tiny(**kw):
    cfg = dict(dataset="synthetic", widths=(12, 16, 16, 4), targets=("layers.0", "layers.1", "layers.2"),
               n_pretrain=64, n_finetune=32, n_test=32, pretrain_steps=5, steps=4, batch_size=8, r=2,
               record_every=2, recorders=())
    cfg.update(kw)
    return FinetuneConfig(**cfg)


@pytest.mark.parametrize("method", ["lora", "allora", "asf"])
def test_ripple_probe(method):
    cfg = _tiny(method=method, **({"eta": 2.0} if method != "lora" else {}))
    h = finetune(cfg, callbacks=[fn.RippleProbe([0, 4])])
    np.testing.assert_array_equal(h["ripple_step"], [0, 4])
    # at step 0, B = 0: the adapted model is the frozen one
    np.testing.assert_allclose(h["ripple_dev"][0], 0.0, atol=0)
    np.testing.assert_allclose(h["ripple_amp"][0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(h["ripple_grad_amp"][0], 1.0, rtol=1e-6)
    assert h["ripple_dev"].shape == (2, 3) and np.all(h["ripple_dev"][1] > 0)
    assert h["ripple_share_fwd"][0] == 0.0 and h["ripple_share_bwd"][0] == 0.0  # nothing changed at B = 0
    assert h["ripple_share_fwd"][1] > 0 and h["ripple_share_bwd"][1] > 0


def test_cross_layer_share_is_zero_with_a_single_adapted_layer():
    # with a single adapted layer there is no interaction between modules of different layers
    h = finetune(_tiny(method="lora", targets=("layers.1",)), callbacks=[fn.RippleProbe([4])])
    assert h["ripple_share_fwd"][0] == pytest.approx(0.0, abs=1e-6)


def test_ripple_criterion():
    good = {"chain_fwd": seeds(1.0), "chain_bwd": seeds(0.5, shift=1), "mlp_fwd": seeds(0.7, shift=2),
            "mlp_bwd": seeds(0.7, shift=3), "asf_fwd": seeds(0.7, shift=4), "tight_rate": 1e-14}
    assert fn.CRITERION.evaluate(good).verdict == "reproduced"
    assert fn.CRITERION.evaluate({**good, "asf_fwd": seeds(-0.2)}).verdict == "partially reproduced"
    out = fn.CRITERION.evaluate({**good, "tight_rate": 1e-3})
    assert out.verdict == "reproduced" and not out.passed["tight_rate"]  # sanity rows never count


def test_the_chain_rows_built_to_pass_never_make_partially_certain():
    # old rule: the chain pair (true by construction) alone gave "partially reproduced"
    bad = {"chain_fwd": seeds(1.0), "chain_bwd": seeds(0.5, shift=1), "mlp_fwd": seeds(0.0, shift=2),
           "mlp_bwd": seeds(-0.3, shift=3), "asf_fwd": seeds(0.0, shift=4), "tight_rate": 1e-14}
    out = fn.CRITERION.evaluate(bad)
    assert out.passed["chain_fwd"] and out.passed["chain_bwd"] and out.verdict == "not reproduced"
    # a significant reduction smaller than half of Prop. 1's (ln sqrt 2 = 0.35 in log) does not count
    small = {**bad, "mlp_fwd": seeds(0.15, 0.02), "mlp_bwd": seeds(0.15, 0.02, shift=1),
             "asf_fwd": seeds(0.15, 0.02, shift=2)}
    assert fn.CRITERION.evaluate(small).verdict == "not reproduced"
    assert {p.settings["optimizer"] for p in fn.PROTOCOLS if p.plausible} == {"sgd", "adam"}

"""figures.allora_new: the measurement helpers, the callbacks on tiny synthetic runs, and each declared criterion
on synthetic numbers that must pass and numbers that must fail. (The --quick runs of the four ids are in
tests/figures/test_figures.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis import ripple
from analysis.inputs import default_seed
from figures import allora_new as fn
from figures.criteria import Estimate
from toymodels.train import FinetuneConfig, finetune


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path_factory.getbasetemp() / "runs"))


# ------------------------------------------------------------------------------------------------ helpers


def test_best_epochs_ties_smoothing_and_horizon():
    ep = np.arange(1, 7, dtype=float)
    acc = np.array([[0.1, 0.5, 0.5, 0.2, 0.1, 0.1],     # tie at epochs 2 and 3 -> earliest
                    [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]])    # maximum at the horizon
    np.testing.assert_array_equal(fn.best_epochs(acc, ep), [2.0, 6.0])
    np.testing.assert_array_equal(fn.best_epochs(acc, ep, horizon=0.5), [2.0, 3.0])  # epochs <= 3 only
    spike = np.array([0.1, 0.2, 0.9, 0.2, 0.6, 0.6, 0.6])  # a one-epoch spike loses to a plateau when smoothed
    e7 = np.arange(1, 8, dtype=float)
    assert fn.best_epochs(spike, e7) == 3.0
    assert fn.best_epochs(spike, e7, smooth=3) == 6.0  # centred means: 0.43 at 3, 0.57 at 4, 0.6 at 6
    with pytest.raises(ValueError, match="smooth"):
        fn.best_epochs(acc, ep, smooth=2)
    with pytest.raises(ValueError, match="horizon"):
        fn.best_epochs(acc, ep, horizon=0.0)


def test_page_z_matches_its_definition():
    rng = np.random.default_rng(default_seed())
    data = rng.normal(size=(10, 5)) + 0.8 * np.arange(5)
    # Page's L = sum_j j R_j with within-block ranks; E[L] = n k (k+1)^2 / 4, Var = n k^2 (k+1)(k^2-1) / 144
    ranks = stats.rankdata(data, axis=1)
    n, k = data.shape
    L = float((ranks * np.arange(1, k + 1)).sum())
    z = (L - n * k * (k + 1) ** 2 / 4) / math.sqrt(n * k**2 * (k + 1) * (k**2 - 1) / 144)
    assert fn.page_z(data) == pytest.approx(z, rel=1e-6)
    assert fn.page_z(data) > 3
    assert fn.page_z(data[:, ::-1]) < -3
    with pytest.raises(ValueError, match="data"):
        fn.page_z(data[:1])


def test_per_seed_slopes_is_least_squares():
    rates = np.array([0.0, 0.05, 0.1, 0.2, 0.4])
    rng = np.random.default_rng(1)
    best = rng.normal(size=(4, 5)) + 30 * rates
    want = [np.polyfit(rates, b, 1)[0] for b in best]
    np.testing.assert_allclose(fn.per_seed_slopes(rates, best), want, rtol=1e-12)


def test_first_crossing_interpolates_in_log_and_censors():
    steps = np.array([0.0, 1.0, 2.0, 3.0])
    vals = np.array([0.0, 1.0, 4.0, 8.0])
    assert fn._first_crossing(steps, vals, 2.0, 10) == pytest.approx(1.5)  # log2 halfway between 1 and 4
    assert fn._first_crossing(steps, vals, 100.0, 10) == 10.0


def test_chain_amplification_on_the_tight_instance():
    eta, m, L = 2.0, 0.5, 6
    Ws, As, Bs, x = ripple.tight_instance(L=L, d=8, r=2, eta=eta, m=m, seed=3)
    f_lora, _ = fn._chain_amplification(Ws, As, Bs, x, x, "lora", eta)
    f_allora, _ = fn._chain_amplification(Ws, As, Bs, x, x, "allora", eta)
    depths = np.arange(1, L + 1)
    # on the tight instance x stays on the shared top direction: amplification (1 + eta m)^L, ALLoRA (1 + m)^L
    np.testing.assert_allclose(f_lora, (1 + eta * m) ** depths, rtol=1e-10)
    np.testing.assert_allclose(f_allora, (1 + m) ** depths, rtol=1e-10)
    assert f_lora[-1] == pytest.approx(ripple.output_norm(Ws, As, Bs, eta, x) / ripple.output_norm(Ws, As, Bs, 0, x))


# ---------------------------------------------------------------------------------------------- callbacks


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


def test_epoch_probe_penalty_is_zero_at_b_zero_and_matches_the_closed_form_later():
    from analysis import dropout as closed
    from toymodels.callbacks import WeightSnapshots
    from toymodels.train import build_finetune_model, protocol_data

    cfg = _tiny(targets=("layers.2",))
    h = finetune(cfg, callbacks=[fn.EpochProbe([0, 4], 0.2), WeightSnapshots([4])])
    assert h["ep_penalty"][0] == 0.0
    # the closed form on the snapshot's A, B and the frozen features (layers 0, 1 carry no adapter here)
    model = build_finetune_model(cfg)
    data = protocol_data(cfg, model.layers[0].weight.device)
    import torch

    with torch.no_grad():
        X = model.features(data.finetune.x).double().numpy() / math.sqrt(len(data.finetune.y))
    want = closed.dropout_penalty(X, h["snapshot_A0"][0], h["snapshot_B0"][0], 0.2, placement="bottleneck",
                                  scaling=float(model.layers[2].scaling))
    assert want > 0
    assert h["ep_penalty"][1] == pytest.approx(want, rel=1e-5)
    assert 0 <= h["ep_test_acc"][1] <= 1


# ---------------------------------------------------------------------------------------------- criteria


def _seeds(mean, sd=0.1, n=10, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    return mean + sd * (v - v.mean()) / v.std(ddof=1)


def test_ripple_criterion():
    good = {"chain_fwd": _seeds(1.0), "chain_bwd": _seeds(0.5), "mlp_fwd": _seeds(0.3), "mlp_bwd": _seeds(0.2),
            "asf_fwd": _seeds(0.2), "tight_rate": 1e-14}
    assert fn.RIPPLE_CRITERION.evaluate(good).verdict == "reproduced"
    assert fn.RIPPLE_CRITERION.evaluate({**good, "asf_fwd": _seeds(-0.2)}).verdict == "partially reproduced"
    bad = {**good, "chain_fwd": _seeds(-1.0), "mlp_fwd": _seeds(0.0)}
    assert fn.RIPPLE_CRITERION.evaluate(bad).verdict == "not reproduced"
    out = fn.RIPPLE_CRITERION.evaluate({**good, "tight_rate": 1e-3})
    assert out.verdict == "reproduced" and not out.passed["tight_rate"]  # sanity rows never count


def test_zero_a_criterion():
    good = {"mirror_closed_form": 1.0, "same_escape": _seeds(0.0, 0.1), "dropout_slows_zero_a": _seeds(0.3),
            "dropout_slows_usual": _seeds(0.3)}
    assert fn.ZERO_A_CRITERION.evaluate(good).verdict == "reproduced"
    # an escape that is twice as slow is not "the same" (margin ln 1.5)
    assert fn.ZERO_A_CRITERION.evaluate({**good, "same_escape": _seeds(math.log(2))}).verdict == \
        "partially reproduced"
    # too noisy to show equivalence: fails, although the mean is 0
    assert not fn.ZERO_A_CRITERION.evaluate({**good, "same_escape": _seeds(0.0, 2.0)}).passed["same_escape"]
    assert fn.ZERO_A_CRITERION.evaluate({**good, "mirror_closed_form": 0.0}).verdict == "not reproduced"


def test_tab5_criterion():
    good = {"page": Estimate(3.0, 1.0), "slope": _seeds(20.0, 5.0), "horizon": 0.1}
    assert fn.TAB5_CRITERION.evaluate(good).verdict == "reproduced"
    assert fn.TAB5_CRITERION.evaluate({**good, "page": Estimate(0.5, 1.0)}).verdict == "partially reproduced"
    assert fn.TAB5_CRITERION.evaluate({"page": Estimate(-1.0, 1.0), "slope": _seeds(-5.0, 5.0),
                                       "horizon": 0.9}).verdict == "not reproduced"


def test_regularization_criterion():
    good = {"allora_gap": _seeds(-0.05, 0.02), "allora_penalty": _seeds(-0.3), "od_early": _seeds(-0.01, 0.005),
            "dropout_gap": _seeds(-0.05, 0.02), "dropout_penalty": _seeds(-0.5)}
    assert fn.REG_CRITERION.evaluate(good).verdict == "reproduced"
    # the OD conjecture is tested and reported, but does not enter the verdict on ALLoRA
    out = fn.REG_CRITERION.evaluate({**good, "od_early": _seeds(0.02, 0.005)})
    assert out.verdict == "reproduced" and not out.passed["od_early"]
    # a drag below the declared practical margin (0.1 pp) does not support the conjecture, however many seeds
    assert not fn.REG_CRITERION.evaluate({**good, "od_early": _seeds(-0.0004, 1e-5)}).passed["od_early"]
    assert fn.REG_CRITERION.evaluate({**good, "allora_penalty": _seeds(0.3)}).verdict == "partially reproduced"
    assert fn.REG_CRITERION.evaluate({**good, "allora_gap": _seeds(0.05, 0.02),
                                      "allora_penalty": _seeds(0.3)}).verdict == "not reproduced"

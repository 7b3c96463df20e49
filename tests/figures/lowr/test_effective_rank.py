"""figures.lowr.effective_rank: the spectral measures against independent computations, the AdapterSpectrum
callback, and the declared criterion both ways."""

from __future__ import annotations

import math

import numpy as np
import pytest

from figures.lowr import effective_rank as ln
from tests.figures.constructed import seeds, t_stat


def test_effective_rank_against_entropy_definition():
    sv = np.array([3.0, 1.0, 1.0, 0.0])
    p = np.array([0.6, 0.2, 0.2])
    assert ln.effective_rank(sv) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-14)
    assert ln.effective_rank(np.ones(7)) == pytest.approx(7.0, rel=1e-14)
    assert ln.effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    # of a matrix: numpy's SVD of a random rank-3 product
    rng = np.random.default_rng(0)
    M = rng.normal(size=(9, 3)) @ rng.normal(size=(3, 11))
    s = np.linalg.svd(M, compute_uv=False)
    assert 1.0 < ln.effective_rank(s) <= 3.0 + 1e-9


def test_stable_rank_and_top_share():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(8, 6))
    s = np.linalg.svd(M, compute_uv=False)
    assert ln.stable_rank(s) == pytest.approx(np.linalg.norm(M, "fro") ** 2 / np.linalg.norm(M, 2) ** 2, rel=1e-12)
    assert ln.top_share([1.0, 4.0, 3.0, 2.0], 2) == pytest.approx(0.7)
    assert ln.top_share([np.nan, 2.0, 2.0], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k must be"):
        ln.top_share([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="sv must"):
        ln.effective_rank([0.0, 0.0])
    with pytest.raises(ValueError, match="sv must"):
        ln.stable_rank([-1.0, 2.0])


def test_adapter_spectrum_is_the_svd_of_s_ba():
    from toymodels.config import FinetuneConfig
    from toymodels.loop import finetune

    cfg = FinetuneConfig(dataset="synthetic", widths=(6, 5, 3), targets=("layers.0", "layers.1"), n_pretrain=64,
                         n_finetune=32, n_test=32, pretrain_steps=5, steps=3, batch_size=8, r=4,
                         recorders=("channels",), seed=1)
    hist = finetune(cfg, callbacks=[ln.AdapterSpectrum()], use_cache=False)
    sv = hist["ba_sv"]
    assert sv.shape == (2, 4)
    assert np.isnan(sv[1, 3])  # layers.1 is 5 -> 3: at most 3 singular values
    assert np.all(sv[0] >= 0) and np.all(np.diff(sv[0]) <= 1e-12)


def test_erank_criterion_needs_a_channel_at_every_rank():
    crit = ln.criterion(ln.RANKS)
    assert {t.margin for t in crit.tests} == {1.0} and {t.margin_from for t in crit.tests} == {"theory"}
    up = {t.name: seeds(2.0, 0.3, shift=i) for i, t in enumerate(crit.tests)}  # two more channels in use
    assert crit.evaluate(up).verdict == "reproduced"
    down = {t.name: seeds(-2.0, 0.3, shift=i) for i, t in enumerate(crit.tests)}
    assert crit.evaluate(down).verdict == "not reproduced"
    # a gain of a fifth of a channel (a few %) passed the old margin 0; it puts no further channel to use
    small = {t.name: seeds(0.2, 0.03, shift=i) for i, t in enumerate(crit.tests)}
    assert all(t_stat(v, 0.0) > 15 for v in small.values())
    assert crit.evaluate(small).verdict == "not reproduced"
    # the effective rank gains at every rank, the stable rank nowhere: partially
    er_only = {n: (v if n.startswith("erank") else seeds(0.0, 0.3, shift=7)) for n, v in up.items()}
    assert crit.evaluate(er_only).verdict == "partially reproduced"
    # the old rule credited a gain at a single rank: now not
    one_rank = {n: (v if n == "erank_gain_r8" else seeds(0.0, 0.3, shift=8)) for n, v in up.items()}
    assert crit.evaluate(one_rank).verdict == "not reproduced"


def test_a_diverged_run_has_no_spectrum_instead_of_crashing():
    """A diverging run reaches on_train_end with non-finite weights (the loop stops at the first non-finite loss);
    svdvals used to raise there, failing the protocol. Its row is now NaN, and measure reads it as missing."""
    import math
    from types import SimpleNamespace

    import torch

    from figures.lowr.effective_rank import AdapterSpectrum

    good = SimpleNamespace(r=2, scaling=1.0, lora_A=torch.eye(2, 3), lora_B=torch.ones(4, 2))
    bad = SimpleNamespace(r=2, scaling=1.0, lora_A=torch.full((2, 3), math.nan), lora_B=torch.ones(4, 2))
    cb = AdapterSpectrum()
    cb.reset()
    cb.on_train_end(SimpleNamespace(layers=[good, bad]))
    sv = cb.result()["ba_sv"]
    assert np.isfinite(sv[0]).all() and np.isnan(sv[1]).all()

"""figures.rslora.protocol: the per-seed exponent fit and the per-layer RMS of the deep network."""

from __future__ import annotations

import numpy as np
import pytest

from figures.rslora import protocol as rn


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


def test_layer_rms_shape_and_values():
    runs = {("lora", r): [{"out_second": np.array([[0.0] * 4, [4.0, 9.0, 16.0, 25.0]]) * r} for _ in range(3)]
            for r in (1, 4)}
    rms = rn.layer_rms(runs, "lora", (1, 4))
    assert rms.shape == (3, 2, 4)
    np.testing.assert_allclose(rms[0, 1], 2 * np.array([2.0, 3.0, 4.0, 5.0]))

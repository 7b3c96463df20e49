"""analysis.jsonable.to_jsonable: the one owner of the JSON conversion (figures and diagnose)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.jsonable import to_jsonable


def test_converts_numpy_paths_sets_and_keys():
    obj = {1: np.arange(3), "x": np.float32(0.5), "p": Path("/tmp/a"), "s": {"b", "a"}, "t": (np.int64(2), None)}
    assert to_jsonable(obj) == {"1": [0, 1, 2], "x": 0.5, "p": "/tmp/a", "s": ["a", "b"], "t": [2, None]}


@pytest.mark.parametrize(("mode", "inf", "ninf"), [("string", "inf", "-inf"), ("null", None, None)])
def test_nonfinite(mode, inf, ninf):
    got = to_jsonable([math.inf, -math.inf, math.nan, np.array([np.inf])], nonfinite=mode)
    assert got == [inf, ninf, None, [inf]]
    json.dumps(got, allow_nan=False)  # strict JSON either way


def test_torch_values():
    torch = pytest.importorskip("torch")
    assert to_jsonable({"d": torch.device("cpu"), "t": torch.tensor([1.0, math.inf])}, nonfinite="null") == \
        {"d": "cpu", "t": [1.0, None]}


def test_bad_mode():
    with pytest.raises(ValueError, match="nonfinite"):
        to_jsonable(1.0, nonfinite="drop")

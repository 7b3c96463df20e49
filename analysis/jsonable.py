"""Plain JSON values from the numbers the toolkit computes (public: ``figures`` and ``diagnose`` both use it).

One owner for the conversion (issue 15 item 3): numpy arrays and scalars, torch tensors and devices, paths,
tuples and sets (sorted) become lists, numbers and strings; dict keys become strings. Non-finite floats are the one choice a caller
makes: ``nonfinite="string"`` writes ``"inf"`` / ``"-inf"`` (NaN is always ``null``), the committed figure JSONs'
form; ``nonfinite="null"`` writes ``null`` for every non-finite float, so that a field keeps one JSON type (number or
null), the form a schema can state (``diagnose``'s report).
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(obj, *, nonfinite: str = "string"):
    """``obj`` with every value a JSON type (dict, list, str, int, float, bool, None); see the module docstring."""
    if nonfinite not in ("string", "null"):
        raise ValueError(f"nonfinite must be 'string' or 'null', got {nonfinite!r}")
    return _convert(obj, nonfinite)


def _convert(obj, nonfinite: str):
    if isinstance(obj, dict):
        return {str(k): _convert(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_convert(v, nonfinite) for v in obj]
    if isinstance(obj, set | frozenset):
        return [_convert(v, nonfinite) for v in sorted(obj, key=str)]
    if isinstance(obj, np.ndarray):
        return _convert(obj.tolist(), nonfinite)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if math.isnan(obj) or nonfinite == "null":
            return None
        return "inf" if obj > 0 else "-inf"
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__.split(".")[0] == "torch":  # a tensor (no torch import here) or a torch.device
        return _convert(obj.tolist(), nonfinite) if hasattr(obj, "tolist") else str(obj)
    return obj

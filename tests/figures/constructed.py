"""Constructed per-seed samples for the criterion tests (issue 19 item 8).

A criterion test asserts a verdict; a verdict on randomly drawn samples is decided by chance whenever the drawn
effect lies within a few standard errors of a margin (a one-sided 5% test passes data drawn *at* its margin 5% of
the time). So the samples here are built, not drawn: ``seeds(mean, sd)`` has exactly that sample mean and sample
standard deviation (to rounding), so a one-sample t statistic is ``(mean - margin) sqrt(n) / sd`` whatever
``LORA_THEORY_SEED`` says, and every asserted verdict holds with certainty. ``t_stat`` states the distance from a
margin in standard errors where a test wants to show it is far.
"""

from __future__ import annotations

import math

import numpy as np


def pattern(n: int = 10, shift: int = 0) -> np.ndarray:
    """A fixed zero-mean pattern with sample standard deviation 1 (evenly spaced values), rolled by ``shift`` so
    that two samples built from it are not identical (their paired difference has a nonzero spread)."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    z = np.linspace(-1.0, 1.0, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return np.roll(z, shift)


def seeds(mean: float, sd: float = 0.1, n: int = 10, shift: int = 0) -> np.ndarray:
    """``n`` per-seed values with sample mean ``mean`` and sample standard deviation ``sd`` (exactly, to rounding)."""
    return mean + sd * pattern(n, shift)


def t_stat(values, margin: float) -> float:
    """(mean - margin) / (sd / sqrt(n)) of ``values``: the one-sample t statistic against ``margin``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return float((v.mean() - margin) / (v.std(ddof=1) / math.sqrt(v.size)))

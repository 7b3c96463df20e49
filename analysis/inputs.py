"""Input validation shared by every closed form (public: `toymodels`, `figures` and `diagnose` use it too): bad
input raises ``ValueError`` naming the argument.

A closed form that silently broadcasts a transposed matrix returns a wrong number; these checks turn
every such mistake into an error that says which argument is wrong and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

PLACEMENTS = ("bottleneck", "input")


def as_matrix(name: str, value, shape: Sequence[int | None] | None = None, ndim: int = 2) -> np.ndarray:
    """Return ``value`` as a finite float64 array with ``ndim`` dimensions and the given ``shape``.

    ``shape`` entries that are ``None`` are free. Raises ``ValueError`` naming ``name`` otherwise.
    """
    try:
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(arr.shape, shape, strict=True)):
            if want is not None and got != want:
                expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{name} has shape {arr.shape}, expected {expected} (axis {axis} is {got}, not {want})")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite entries (NaN or inf)")
    return arr


def as_vector(name: str, value, length: int | None = None) -> np.ndarray:
    """Return ``value`` as a finite float64 1-D array of the given length."""
    return as_matrix(name, value, None if length is None else (length,), ndim=1)


def dropout_rate(p, name: str = "p") -> float:
    """Validate a dropout rate: the probability of zeroing, in [0, 1) (torch.nn.Dropout, PEFT)."""
    try:
        value = float(p)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}") from exc
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} is the dropout rate (probability of zeroing) and must lie in [0, 1), got {p!r}")
    return value


def finite_scalar(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Validate a finite real scalar (optionally > 0 or >= 0)."""
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number, got {value!r}") from exc
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and x < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return x


def positive_int(name: str, value) -> int:
    """Validate an integer >= 1 (ranks, sample counts, depths)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def placement(value: str) -> str:
    """Validate the dropout placement: "bottleneck" (ALLoRA eq. 1) or "input" (PEFT)."""
    if value not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {value!r}")
    return value


def lora_problem(X, Y, W, A, B):
    """Validate a LoRA least-squares problem in the torch.nn.Linear / PEFT convention.

    X (N, d_in), Y (N, d_out), W (d_out, d_in), A = lora_A (r, d_in), B = lora_B (d_out, r).
    """
    X = as_matrix("X", X)
    n, d_in = X.shape
    A = as_matrix("A", A, (None, d_in))
    r = A.shape[0]
    B = as_matrix("B", B, (None, r))
    d_out = B.shape[0]
    W = as_matrix("W", W, (d_out, d_in))
    Y = as_matrix("Y", Y, (n, d_out))
    return X, Y, W, A, B


def lowr_tau(tau) -> float:
    """LoWR's ratio threshold tau (Algorithm 1): a number > 0, ``math.inf`` allowed (no channel exempt)."""
    try:
        t = float(tau)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tau must be a number > 0 (inf allowed), got {tau!r}") from exc
    if math.isnan(t) or t <= 0:
        raise ValueError(f"tau must be > 0 (inf allowed), got {tau!r}")
    return t


def default_seed() -> int:
    """Seed for Monte-Carlo checks: ``LORA_THEORY_SEED`` from the environment, else 0.

    Monte-Carlo tests use tolerances derived from their own standard error (|z| <= 5), so a sweep over
    many seeds (``for s in $(seq 50); do LORA_THEORY_SEED=$s pytest ...``) shows they are strict yet not flaky.
    """
    raw = os.environ.get("LORA_THEORY_SEED", "0")
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"LORA_THEORY_SEED must be an integer, got {raw!r}") from exc

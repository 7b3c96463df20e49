"""``lora-theory verify``: the theory's own proof, one table row per derivation check.

Each topic module (``analysis.verify.dropout``, ``...rank_scaling``, ...) registers functions with
:func:`check`; each yields :class:`Row` objects saying what is checked, the measured value, the criterion
and whether it passed. Monte-Carlo rows use the seed from ``LORA_THEORY_SEED`` (default 0) and tolerances
derived from the estimator's own standard error, so they are strict but never flaky.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

TOPICS = ("dropout", "rank_scaling", "ripple", "adaptive", "channels", "allora_dynamics")


@dataclass(frozen=True)
class Row:
    """One line of the verify table."""

    topic: str
    check: str
    measured: str
    criterion: str
    passed: bool
    value: float | None = None  # the measured number unrounded (prose quotes it: analysis.verify.prose)


_REGISTRY: list[tuple[str, Callable[[int], Iterable[Row]]]] = []


def check(topic: str) -> Callable[[Callable[[int], Iterable[Row]]], Callable[[int], Iterable[Row]]]:
    """Register a check function ``fn(seed) -> iterable of Row`` under ``topic``."""

    def register(fn: Callable[[int], Iterable[Row]]) -> Callable[[int], Iterable[Row]]:
        _REGISTRY.append((topic, fn))
        return fn

    return register


def row(topic: str, what: str, measured: float | str, criterion: str, passed: bool) -> Row:
    """Build a row; floats are printed with 3 significant digits."""
    text = f"{measured:.3g}" if isinstance(measured, float) else str(measured)
    value = float(measured) if isinstance(measured, int | float) and not isinstance(measured, bool) else None
    return Row(topic, what, text, criterion, bool(passed), value)


def _load(topics: Iterable[str]) -> None:
    for topic in topics:
        try:
            importlib.import_module(f"analysis.verify.{topic}")
        except ModuleNotFoundError as exc:  # a topic not written yet
            if exc.name != f"analysis.verify.{topic}":
                raise


def run(topics: Iterable[str] | None = None, seed: int = 0) -> Iterator[Row]:
    """Run the registered checks of the given topics (all by default), yielding rows as they finish."""
    wanted = tuple(TOPICS if topics is None else topics)
    unknown = set(wanted) - set(TOPICS)
    if unknown:
        raise ValueError(f"topics must be among {TOPICS}, got {sorted(unknown)}")
    _load(wanted)
    for topic, fn in list(_REGISTRY):
        if topic in wanted:
            try:
                yield from fn(seed)
            except Exception as exc:  # a crashing check is a FAIL, not a crash of the table
                yield Row(topic, fn.__name__, f"error: {type(exc).__name__}: {exc}", "runs", False)


def main(topics: Iterable[str] | None = None, seed: int = 0) -> int:
    """Print the verify table; return 1 if any row failed."""
    start = time.perf_counter()
    header = f"{'topic':<15} {'check':<70} {'measured':>12}  {'criterion':<28} result"
    print(header)
    print("-" * len(header))
    failed = 0
    total = 0
    for r in run(topics, seed):
        total += 1
        failed += not r.passed
        print(f"{r.topic:<15} {r.check:<70} {r.measured:>12}  {r.criterion:<28} {'PASS' if r.passed else 'FAIL'}",
              flush=True)
    print("-" * len(header))
    print(f"{total - failed}/{total} checks passed in {time.perf_counter() - start:.1f} s (seed {seed})")
    return 1 if failed or total == 0 else 0

"""Shared helpers of the figure modules (style, unavailable results); the shared fine-tuning setup (``base_config``,
``real_datasets``) lives in :mod:`toymodels.protocol` and is re-exported here. The statistics
(intervals, tests, verdict rules) live in :mod:`figures.criteria`; ``mean_ci`` / ``ci_dict`` are re-exported here."""

from __future__ import annotations

from figures.criteria import ci_dict, mean_ci  # noqa: E402,F401  (re-exported: figures not yet migrated)
from figures.style import colors, new_figure  # noqa: E402,F401  (re-exported: figures not yet converted)
from toymodels import data as datasets  # noqa: E402,F401
from toymodels.protocol import base_config, real_datasets  # noqa: E402,F401  (the protocol's home: toymodels)


def unavailable(reason: str, **extra):
    """A Result saying the figure could not be made here, and why."""
    from figures import Result

    return Result(verdict="unavailable", summary=reason, measured={}, **extra)

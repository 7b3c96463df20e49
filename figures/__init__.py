"""Regenerated paper figures with claim checks: ``lora-theory figures``.

One file per figure, ``figures/<paper>/<name>.py`` (e.g. :mod:`figures.allora.fig3_norms`), read top to bottom:
the claim and its declared criterion, ``configs(ctx)`` (the runs of each protocol), ``measure(ctx, runs)``
(plain numbers) and ``draw(numbers)`` (the plot, from the saved numbers alone). :mod:`figures.framework` runs
them (seed fan-out, sweep, criterion, JSON, drawing); :mod:`figures.registry` lists them; :mod:`figures.gallery`
writes ``<out>/<id>.png``, ``<out>/<id>.json`` and the gallery ``<out>/README.md``; :mod:`figures.cli` is the
command. Shared per paper: ``figures/<paper>/protocol.py``; statistics: :mod:`figures.criteria`; plot style:
:mod:`figures.style`; Monte-Carlo seeds: :mod:`figures.seeds`.

Fidelities: ``quick`` (smoke test, tiny sizes, CI), ``default`` (what the README's main command runs; faithful
to the papers' setups where a CPU allows) and ``large`` (closer to the papers, longer).
"""

from __future__ import annotations

from figures.criteria import VERDICTS
from figures.framework import (  # noqa: F401  (the public names of the package)
    FIDELITIES,
    Context,
    Measurement,
    Protocol,
    Result,
    Runs,
    Spec,
    Unavailable,
    holds_count,
    run_figure,
)

__all__ = ["FIDELITIES", "VERDICTS", "Context", "Measurement", "Protocol", "Result", "Runs", "Spec", "Unavailable",
           "holds_count", "run_figure", "specs"]


def specs() -> dict[str, Spec]:
    """Every registered figure (id -> Spec), in the gallery's order (:func:`figures.registry.specs`)."""
    from figures import registry

    return registry.specs()

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

Transition (issue 15): figures not yet converted keep the old form, a ``@figure(...)``-decorated
``measure(ctx, protocol) -> Measurement`` in a multi-figure module (see :func:`figure`).
"""

from __future__ import annotations

from figures.criteria import VERDICTS, Criterion
from figures.framework import (  # noqa: F401  (the public names of the package)
    FIDELITIES,
    Context,
    Measurement,
    Protocol,
    Result,
    Runs,
    Spec,
    Unavailable,
    check_protocols,
    holds_count,
    run_figure,
)

__all__ = ["FIDELITIES", "VERDICTS", "Context", "Measurement", "Protocol", "Result", "Runs", "Spec", "Unavailable",
           "figure", "holds_count", "run_figure", "specs"]


def figure(fig_id: str, *, paper: str, claim: str, criterion: Criterion | None = None,
           protocols: tuple[Protocol, ...] | list[Protocol] | None = None):
    """Old form (until every figure has its file): register ``measure(ctx, protocol) -> Measurement``, run through
    :func:`run_figure` over ``protocols`` with the declared ``criterion``."""
    from figures import registry

    if fig_id not in registry.FIGURE_IDS:
        raise ValueError(f"unknown figure id {fig_id!r}; add it to figures.registry.FIGURE_IDS")
    if not isinstance(criterion, Criterion):
        raise ValueError(f"criterion must be a figures.criteria.Criterion, got {type(criterion).__name__}")
    prots = tuple(protocols) if protocols else (Protocol("default", {}, primary=True),)
    check_protocols(prots)

    def register(fn):
        registry._LEGACY[fig_id] = Spec(fig_id, paper, claim, criterion, prots, fn)
        return fn

    return register


def specs() -> dict[str, Spec]:
    """Every registered figure (id -> Spec), in the gallery's order (:func:`figures.registry.specs`)."""
    from figures import registry

    return registry.specs()

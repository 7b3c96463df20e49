"""Regenerated paper figures with claim checks: ``lora-theory figures``.

Each figure id (a contract, see :data:`FIGURE_MODULES`) is one thin module in this package that declares its
claim with :func:`figure` and implements ``run(ctx: Context) -> Result``: it asks the engine for runs (cached),
asks ``analysis`` for the overlay, draws, and computes its verdict *from the measured numbers*. The command
writes ``<out>/<id>.png`` and ``<out>/<id>.json`` and regenerates the gallery ``<out>/README.md``.

Fidelities: ``quick`` (smoke test, tiny sizes, CI), ``default`` (what the README's main command runs; faithful
to the papers' setups where a CPU allows) and ``large`` (closer to the papers, longer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

VERDICTS = ("reproduced", "partially reproduced", "not reproduced", "unavailable")
FIDELITIES = ("quick", "default", "large")

# id -> module (in this package) that implements it; the ids are a contract
FIGURE_MODULES: dict[str, str] = {
    "allora-fig1-dropout-mc": "allora_dropout",
    "allora-fig2-grad-std": "allora_dropout",
    "allora-fig3-norms": "allora_dropout",
    "allora-fig4-expected-vs-empirical": "allora_dropout",
    "allora-tab5-dropout-epochs": "allora_dropout",
    "allora-fig5-escape": "allora_adaptive",
    "allora-fig6-adaptive-fn": "allora_adaptive",
    "allora-prop1-ripple": "allora_adaptive",
    "allora-tab-variants": "allora_adaptive",
    "rslora-thm-coordcheck": "rslora",
    "rslora-fig2-loss-vs-rank": "rslora",
    "rslora-fig3-gradnorm": "rslora",
    "rslora-fig6-init-only": "rslora",
    "rslora-fig8-other-gammas": "rslora",
    "rslora-fig9-activation-moments": "rslora",
    "rslora-b4-lr-sweep": "rslora",
    "lowr-fig2-channel-corr": "lowr",
    "lowr-fig3-with-without": "lowr",
    "lowr-fig4-loss-gradnorm": "lowr",
    "lowr-tab5-sensitivity": "lowr",
    "lowr-prop41-equivalent": "lowr",
}

DEFAULT_OUT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Context:
    """What a figure's ``run`` gets: fidelity, seeds, device."""

    fidelity: str = "default"
    seeds: tuple[int, ...] = (0, 1, 2)
    device: torch.device = torch.device("cpu")
    # sweeps: toymodels.train.run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers)
    workers: int | None = None  # None: one per CPU core; 1: in-process
    executor: str = "local"  # "local", "ray" or "slurm"

    @property
    def quick(self) -> bool:
        return self.fidelity == "quick"

    def pick(self, quick, default, large=None):
        """The value for this fidelity (``large`` falls back to ``default``)."""
        if self.fidelity == "quick":
            return quick
        if self.fidelity == "large" and large is not None:
            return large
        return default


@dataclass
class Result:
    """A figure's outcome. ``measured`` holds only numbers computed in this run (JSON-serialisable)."""

    verdict: str
    summary: str  # one or two sentences: the measured number(s) that support or refute the claim
    measured: dict = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    figure: object | None = None  # a matplotlib Figure (None only when unavailable)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Spec:
    id: str
    paper: str  # e.g. "ALLoRA fig. 1"
    claim: str  # the one-line claim the figure tests
    run: Callable[[Context], Result]


_REGISTRY: dict[str, Spec] = {}


def figure(fig_id: str, *, paper: str, claim: str):
    """Register ``run(ctx) -> Result`` as figure ``fig_id``."""
    if fig_id not in FIGURE_MODULES:
        raise ValueError(f"unknown figure id {fig_id!r}; add it to FIGURE_MODULES")

    def register(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        _REGISTRY[fig_id] = Spec(fig_id, paper, claim, fn)
        return fn

    return register


def specs() -> dict[str, Spec]:
    """All registered figures (imports every figure module), in the contract's order."""
    for module in dict.fromkeys(FIGURE_MODULES.values()):
        try:
            importlib.import_module(f"figures.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"figures.{module}":
                raise
    return {fid: _REGISTRY[fid] for fid in FIGURE_MODULES if fid in _REGISTRY}

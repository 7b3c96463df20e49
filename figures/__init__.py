"""Regenerated paper figures with claim checks: ``lora-theory figures``.

Each figure id (a contract, see :data:`FIGURE_MODULES`) is one thin module in this package that declares its
claim with :func:`figure` and implements ``run(ctx: Context) -> Result``: it asks the engine for runs (cached),
asks ``analysis`` for the overlay, draws, and computes its verdict *from the measured numbers*. The command
writes ``<out>/<id>.png`` and ``<out>/<id>.json`` and regenerates the gallery ``<out>/README.md``.

Fidelities: ``quick`` (smoke test, tiny sizes, CI), ``default`` (what the README's main command runs; faithful
to the papers' setups where a CPU allows) and ``large`` (closer to the papers, longer).

Declared figures (issue 9). A figure module reads: claim -> criterion -> protocols -> measure -> plot::

    from figures import Measurement, Protocol, figure
    from figures.criteria import Criterion, Rule, Test

    CRIT = Criterion(tests=(Test("gap", "final loss, LoRA minus rsLoRA (paired by seed)", "greater",
                                 why="the claim is a direction"),),
                     rule=Rule(reproduced=("gap",)))
    PROTOCOLS = (Protocol("adam", {"optimizer": "adam", "lr": 1e-3}, primary=True, paper=True,
                          note="the paper's AdamW, constant lr (weight decay 0)"),
                 Protocol("sgd", {"optimizer": "sgd", "lr": 0.05}))

    @figure("my-id", paper="rsLoRA fig. 2", claim="...", criterion=CRIT, protocols=PROTOCOLS)
    def my_figure(ctx: Context, protocol: Protocol) -> Measurement:
        runs = run_sweep([...cfg.replace(**protocol.settings)...], device=ctx.device, executor=ctx.executor,
                         workers=ctx.workers)
        gaps = ...                                         # one number per seed
        return Measurement(samples={"gap": gaps}, measured={...}, summary="gap 0.1 [0.05, 0.2]",
                           datasets=["mnist"], config={...}, plot=lambda: draw(runs))

:func:`run_figure` runs the primary protocol only (``ctx.robustness`` False) or every declared protocol, evaluates
the criterion in each (:meth:`figures.criteria.Criterion.evaluate`), takes the headline verdict at the primary
protocol (which must be the paper's where the paper states one), draws the primary protocol's plot, and returns
a :class:`Result` whose ``criterion`` / ``protocols`` fill the JSON contract. Figures still written as
``run(ctx) -> Result`` keep working (a single "as run" protocol without a declared criterion).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from figures.criteria import VERDICTS, Criterion, Outcome

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
    "rslora-multilayer": "rslora_new",
    "rslora-trajectory": "rslora_new",
    "rslora-layer-subset": "rslora_new",
    "lowr-effective-rank": "lowr_new",
    "lowr-mechanism": "lowr_new",
    "lowr-plugin-inits": "lowr_new",
    "allora-ripple-adaptive": "allora_new",
    "allora-zero-init-a": "allora_new",
    "allora-tab5-best-epoch": "allora_new",
    "allora-regularization-like-dropout": "allora_new",
}

DEFAULT_OUT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Context:
    """What a figure's ``run`` gets: fidelity, seeds, device, and whether to run every declared protocol."""

    fidelity: str = "default"
    seeds: tuple[int, ...] = tuple(range(10))
    device: torch.device = torch.device("cpu")
    # sweeps: toymodels.train.run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers)
    workers: int | None = None  # None: one per CPU core; 1: in-process
    executor: str = "local"  # "local", "ray" or "slurm"
    robustness: bool = False

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
    criterion: dict | None = None  # the declared criterion (Criterion.as_dict()); None for legacy figures
    protocols: list[dict] | None = None  # one dict per protocol run: protocol, verdict, outcome, key numbers

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Protocol:
    """One training protocol a careful reader would question: ``settings`` (the FinetuneConfig fields it
    changes, or any figure-specific knobs), ``primary`` (exactly one per figure: the headline, run without
    ``--robustness``), ``paper`` (the paper states this protocol) and a ``note`` (why it is in the grid)."""

    name: str
    settings: dict = field(default_factory=dict)
    primary: bool = False
    paper: bool = False
    note: str = ""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a dict, got {type(self.settings).__name__}")

    def as_dict(self) -> dict:
        return {"name": self.name, "settings": dict(self.settings), "primary": self.primary,
                "paper": self.paper, "note": self.note}


@dataclass
class Measurement:
    """What ``measure(ctx, protocol)`` returns: ``samples`` (test name -> per-seed values / Estimate / number,
    the input of :meth:`Criterion.evaluate`), ``measured`` (JSON numbers), ``summary`` (the key numbers in one
    or two sentences, without restating the rule), ``key`` (a few numbers for the protocol map), and ``plot``
    (a callable drawing the figure; called only for the headline protocol). ``unavailable`` (a reason) when the
    measurement cannot be made here."""

    samples: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    summary: str = ""
    key: dict = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    plot: Callable[[], object] | None = None
    unavailable: str | None = None


@dataclass(frozen=True)
class Spec:
    id: str
    paper: str  # e.g. "ALLoRA fig. 1"
    claim: str  # the one-line claim the figure tests
    run: Callable[[Context], Result]
    criterion: Criterion | None = None
    protocols: tuple[Protocol, ...] = ()
    measure: Callable[[Context, Protocol], Measurement] | None = None  # declared figures only


_REGISTRY: dict[str, Spec] = {}


def _check_protocols(protocols: tuple[Protocol, ...]) -> None:
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise ValueError(f"protocols must have unique names, got {names}")
    primary = [p for p in protocols if p.primary]
    if len(primary) != 1:
        raise ValueError(f"protocols must mark exactly one primary protocol, got {len(primary)}")
    if any(p.paper for p in protocols) and not primary[0].paper:
        raise ValueError("protocols: the primary protocol must be the paper's where the paper states one "
                         f"(primary {primary[0].name!r} is not marked paper=True)")


def figure(fig_id: str, *, paper: str, claim: str, criterion: Criterion | None = None,
           protocols: tuple[Protocol, ...] | list[Protocol] | None = None):
    """Register a figure. Legacy form: ``run(ctx) -> Result``. Declared form (``criterion`` given):
    ``measure(ctx, protocol) -> Measurement``, run through :func:`run_figure` over ``protocols`` (default: one
    primary protocol without settings)."""
    if fig_id not in FIGURE_MODULES:
        raise ValueError(f"unknown figure id {fig_id!r}; add it to FIGURE_MODULES")
    if criterion is None and protocols:
        raise ValueError("protocols need a criterion (the verdict is evaluated per protocol)")
    if criterion is not None and not isinstance(criterion, Criterion):
        raise ValueError(f"criterion must be a figures.criteria.Criterion, got {type(criterion).__name__}")
    prots = tuple(protocols) if protocols else (Protocol("default", {}, primary=True),)
    if criterion is not None:
        _check_protocols(prots)

    def register(fn):
        if criterion is None:
            _REGISTRY[fig_id] = Spec(fig_id, paper, claim, fn)
        else:
            holder: dict[str, Spec] = {}

            def run(ctx: Context) -> Result:
                return run_figure(holder["spec"], ctx)

            holder["spec"] = _REGISTRY[fig_id] = Spec(fig_id, paper, claim, run, criterion, prots, fn)
        return fn

    return register


def holds_count(protocols: list[dict]) -> dict:
    """{"reproduced": k, "partially reproduced": j, ..., "n": n} over a figure's protocol records."""
    counts = {v: 0 for v in VERDICTS}
    for p in protocols:
        counts[p["verdict"]] += 1
    return {**counts, "n": len(protocols)}


def run_figure(spec: Spec, ctx: Context) -> Result:
    """Measure each protocol to run (primary only, or all with ``ctx.robustness``; the primary first), evaluate
    the criterion in each, and return the headline (primary) protocol's Result with ``criterion`` and
    ``protocols`` filled. An error in a non-primary protocol makes that protocol ``unavailable`` (and is
    printed); an error in the primary one propagates."""
    crit, measure = spec.criterion, spec.measure
    if crit is None or measure is None:
        raise ValueError(f"spec: {spec.id} is not a declared figure (no criterion / measure)")
    primary = [p for p in spec.protocols if p.primary]
    todo = primary + ([p for p in spec.protocols if not p.primary] if ctx.robustness else [])
    records, headline, head_meas = [], None, None
    for prot in todo:
        try:
            meas = measure(ctx, prot)
        except Exception as exc:
            if prot.primary:
                raise
            import traceback

            traceback.print_exc()
            meas = Measurement(unavailable=f"error in protocol {prot.name}: {type(exc).__name__}: {exc}")
        if not isinstance(meas, Measurement):
            raise ValueError(f"{spec.id}: measure must return a Measurement, got {type(meas).__name__}")
        outcome = Outcome.unavailable(meas.unavailable) if meas.unavailable else crit.evaluate(meas.samples)
        summary = meas.unavailable or meas.summary
        rec = {"name": prot.name, "protocol": dict(prot.settings), "primary": prot.primary, "paper": prot.paper,
               "note": prot.note, "verdict": outcome.verdict, "summary": summary, "key": meas.key,
               "tests": outcome.describe(), "outcome": outcome.as_dict()}
        records.append(rec)
        if prot.primary:
            headline, head_meas = rec, meas
    assert headline is not None and head_meas is not None
    order = {p.name: i for i, p in enumerate(spec.protocols)}
    records.sort(key=lambda r: order[r["name"]])
    counts = holds_count(records)
    where = "the paper's protocol" if headline["paper"] else "the primary protocol (the paper states none)"
    summary = f"At {where} ({headline['name']}): {headline['summary']}"
    if headline["verdict"] != "unavailable":
        tests = headline["outcome"]["tests"]
        if len(tests) <= 6:
            summary += f" Tests: {headline['tests']}."
        else:  # many tests (e.g. one per fitted exponent): count them, name the failures; statistics in the JSON
            claims = [t for t in tests if t["role"] == "claim"]
            failed = [t["name"] for t in tests if not t["passed"]]
            summary += (f" Tests: {sum(t['passed'] for t in claims)} of {len(claims)} claim tests pass"
                        + (f"; failing: {', '.join(failed)}" if failed else "") + " (statistics in the JSON).")
    if len(records) > 1:
        summary += (f" Holds (reproduced) in {counts['reproduced']} of {counts['n']} protocols, partially in "
                    f"{counts['partially reproduced']}.")
    fig = head_meas.plot() if (head_meas.plot is not None and not head_meas.unavailable) else None
    measured = dict(head_meas.measured)
    return Result(headline["verdict"], summary, measured, list(head_meas.datasets), dict(head_meas.config), fig,
                  criterion=crit.as_dict(), protocols=records)


def specs() -> dict[str, Spec]:
    """All registered figures (imports every figure module), in the contract's order."""
    for module in dict.fromkeys(FIGURE_MODULES.values()):
        try:
            importlib.import_module(f"figures.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"figures.{module}":
                raise
    return {fid: _REGISTRY[fid] for fid in FIGURE_MODULES if fid in _REGISTRY}

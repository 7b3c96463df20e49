"""The figure framework: what every figure file shares, so that a figure file holds only its claim.

A figure is one module, ``figures/<paper>/<name>.py``, read top to bottom::

    ID, PAPER, CLAIM        # the figure id (a contract), the paper's figure, the one-line claim
    KIND, CLAIM_ID          # check / claim / hypothesis (see KINDS) and the paper claim it tests (shared by figures)
    CRITERION, PROTOCOLS    # the declared criterion (figures.criteria) and the protocols it is judged under
    def configs(ctx) -> dict[str, FinetuneConfig | Runs]      # the runs of ctx.protocol (no seeds: see below)
    def measure(ctx, runs) -> Measurement                     # samples for the criterion, JSON numbers, summary
    def draw(numbers) -> matplotlib.figure.Figure             # from Measurement.draw alone (as saved in the JSON)

and is listed once in :mod:`figures.registry`. The framework (:func:`run_figure`) owns, per protocol:

- **the seed fan-out and the sweep**: every entry of ``configs(ctx)`` is run once per seed of ``ctx.seeds``
  (``cfg.replace(seed=s)``; :class:`Runs` for custom callbacks or the first seed only), all of one protocol in one
  cached, parallel :func:`toymodels.run_sweep`; ``runs[name]`` is the list of histories, one per seed;
- **the one way to read a diverged run**: sweeps return a diverged run truncated, with ``diverged_step``;
  :func:`diverged` says so and :func:`final` reads a last value as NaN for it;
- **the criterion's evaluation** (:meth:`figures.criteria.Criterion.evaluate` on ``Measurement.samples``), the
  headline verdict (the primary protocol) and the per-protocol records of the JSON;
- **the drawing**: ``draw`` receives ``Measurement.draw`` of the headline protocol after a round trip through
  JSON (so ``lora-theory figures --redraw`` draws the same picture from the saved JSON, without training).

A figure that needs no training (closed forms, Monte Carlo) returns ``{}`` from ``configs``. A figure that cannot
be made here (a data set missing) raises :class:`Unavailable` from ``configs`` or ``measure``. Monte-Carlo seeds
of figures come from :mod:`figures.seeds`; shared plot style from :mod:`figures.style`; CI helper and formatter
from :mod:`figures.criteria`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch

from analysis.jsonable import to_jsonable
from figures.criteria import VERDICTS, Criterion, Outcome
from toymodels.callbacks import AtSteps
from toymodels.protocol import FIDELITIES, real_datasets  # noqa: F401  (re-exported for the figures; home: toymodels)


@dataclass(frozen=True)
class Protocol:
    """One training protocol a careful reader would question: ``settings`` (the FinetuneConfig fields it
    changes, or any figure-specific knobs), ``primary`` (exactly one per figure: the one drawn and run first, and
    the only one of a first look), ``paper`` (the paper states this protocol: then it is the primary and the
    headline), ``plausible`` (the paper states none and this is one of the protocols it could mean: the headline
    verdict is combined over them, see :data:`HEADLINE_POLICY`) and a ``note`` (why it is in the grid; for
    ``paper`` / ``plausible``, where the paper says so)."""

    name: str
    settings: dict = field(default_factory=dict)
    primary: bool = False
    paper: bool = False
    note: str = ""
    plausible: bool = False

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a dict, got {type(self.settings).__name__}")

    def as_dict(self) -> dict:
        return {"name": self.name, "settings": dict(self.settings), "primary": self.primary,
                "paper": self.paper, "plausible": self.plausible, "note": self.note}


# The two seed sets (issue 16 item 7). Exploratory: the seeds every criterion was written and tuned on (seen).
# Confirmatory: fresh seeds, disjoint from the exploratory ones, first run only after the criteria were frozen
# (figures/FROZEN.json); the gallery's headline verdicts come from them.
EXPLORATORY_SEEDS = tuple(range(10))
CONFIRMATORY_SEEDS = tuple(range(100, 110))
SEED_SETS = {"exploratory": EXPLORATORY_SEEDS, "confirmatory": CONFIRMATORY_SEEDS}


@dataclass(frozen=True)
class Context:
    """What a figure gets: fidelity, seeds, device, sweep executor, whether to run every declared protocol, and
    (inside :func:`run_figure`) the ``protocol`` being measured."""

    fidelity: str = "default"
    seeds: tuple[int, ...] = EXPLORATORY_SEEDS
    device: torch.device = torch.device("cpu")
    workers: int | None = None  # sweep workers; None: one per CPU core; 1: in-process
    executor: str = "local"  # "local", "ray" or "slurm"
    robustness: bool = False
    protocol: Protocol | None = None
    seed_set: str = "exploratory"  # which of SEED_SETS ``seeds`` are drawn from

    def __post_init__(self):
        if self.seed_set not in SEED_SETS:
            raise ValueError(f"seed_set must be one of {tuple(SEED_SETS)}, got {self.seed_set!r}")

    @property
    def quick(self) -> bool:
        return self.fidelity == "quick"

    @property
    def settings(self) -> dict:
        """The settings of the protocol being measured ({} outside a protocol)."""
        return dict(self.protocol.settings) if self.protocol is not None else {}

    def pick(self, quick, default, large=None):
        """The value for this fidelity (``large`` falls back to ``default``)."""
        if self.fidelity == "quick":
            return quick
        if self.fidelity == "large" and large is not None:
            return large
        return default

    def with_protocol(self, protocol: Protocol) -> Context:
        return dataclasses.replace(self, protocol=protocol)


@dataclass
class Result:
    """A figure's outcome. ``measured`` holds only numbers computed in this run (JSON-serialisable); ``draw`` the
    numbers its ``draw`` function needs (None for a figure without one)."""

    verdict: str
    summary: str  # one or two sentences: the measured number(s) that support or refute the claim
    measured: dict = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    figure: object | None = None  # a matplotlib Figure (None only when unavailable)
    criterion: dict | None = None  # the declared criterion (Criterion.as_dict()); None when the figure crashed
    protocols: list[dict] | None = None  # one dict per protocol run: protocol, verdict, outcome, key numbers
    draw: dict | None = None  # the headline protocol's numbers for draw() (saved in the JSON)
    headline: str | None = None  # the primary protocol's name (the one drawn)
    headline_protocols: list[str] = field(default_factory=list)  # the protocols whose verdicts made ``verdict``
    headline_complete: bool = True  # False for a first look: only the primary of several plausible protocols ran

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass
class Measurement:
    """What ``measure`` returns: ``samples`` (test name -> per-seed values / Estimate / number, the input of
    :meth:`Criterion.evaluate`), ``measured`` (JSON numbers), ``summary`` (the key numbers in one or two
    sentences, without restating the rule), ``key`` (a few numbers for the protocol map), ``draw`` (the numbers
    ``draw`` needs, JSON-able). ``unavailable`` (a reason) when the measurement cannot be made here."""

    samples: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    summary: str = ""
    key: dict = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    draw: dict | None = None
    unavailable: str | None = None


class Unavailable(Exception):  # noqa: N818  (a state, not an error: the figure cannot be made here)
    """Raised by ``configs`` / ``measure`` when the figure cannot be made here (its message says why)."""


@dataclass(frozen=True)
class Runs:
    """An entry of ``configs(ctx)`` that is more than a config: custom ``callbacks`` (measurements of the live
    model, :class:`Probe`), or ``first_seed_only`` (one run, at ``ctx.seeds[0]``)."""

    config: object  # a toymodels FinetuneConfig
    callbacks: tuple = ()
    first_seed_only: bool = False


@dataclass(frozen=True)
class Spec:
    """A registered figure (:func:`spec_of` a figure module), run by :func:`run_figure`: its id, paper, claim,
    criterion, protocols, and its ``configs(ctx)``, ``measure(ctx, runs)`` and ``draw(numbers)``."""

    id: str
    paper: str
    claim: str
    criterion: Criterion
    protocols: tuple[Protocol, ...]
    configs: Callable
    measure: Callable
    draw: Callable
    module: str = ""
    kind: str = "claim"  # one of KINDS
    claim_id: str = ""  # the paper claim this figure tests ("" = its own id); figures of one claim share it

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.claim_id:
            object.__setattr__(self, "claim_id", self.id)


# Claim kinds (issue 16 item 1). ``check``: cannot fail for a correct implementation (a closed-form identity, the
# algebra of a proposition): reported in a table of its own, never counted as evidence. ``claim``: an empirical
# statement of the paper (reproduced / partially reproduced / not reproduced). ``hypothesis``: the paper's own
# conjecture, read as supported / inconclusive / not supported (HYPOTHESIS_READING maps the criterion's outcome).
KINDS = ("check", "claim", "hypothesis")
HYPOTHESIS_READING = {"reproduced": "supported", "partially reproduced": "inconclusive",
                      "not reproduced": "not supported", "unavailable": "unavailable"}
CHECK_READING = {"reproduced": "holds", "partially reproduced": "partially holds", "not reproduced": "fails",
                 "unavailable": "unavailable"}
VERDICT_STRENGTH = ("reproduced", "partially reproduced", "not reproduced")  # strongest first


def stated_verdict(kind: str, verdict: str) -> str:
    """The criterion's ``verdict`` as the gallery states it for a figure of ``kind``: a claim's verdict unchanged,
    a hypothesis's as supported (all rule tests pass) / inconclusive (the partial rule only) / not supported (neither),
    a check's as holds / partially holds / fails."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"claim": dict(zip(VERDICTS, VERDICTS, strict=True)), "hypothesis": HYPOTHESIS_READING,
            "check": CHECK_READING}[kind][verdict]


def claim_verdict(verdicts: list[str]) -> str:
    """One verdict for one paper claim tested by several figures: the WEAKEST of their verdicts (reproduced >
    partially reproduced > not reproduced); unavailable figures are skipped unless all are unavailable."""
    known = [v for v in verdicts if v in VERDICT_STRENGTH]
    if not known:
        return "unavailable"
    return max(known, key=VERDICT_STRENGTH.index)


# ------------------------------------------------------------------------------------------------ helpers


class CacheNamed:
    """Mixin of a figure's callback whose code moved to another module: ``cache_name`` (the old class path) enters
    the run-cache key in place of the class's own path, so its cached runs stay hits (bump ``version`` when what
    it computes changes). A new callback leaves it None."""

    cache_name: str | None = None

    def full_key(self) -> dict:
        key = super().full_key()
        if self.cache_name:
            key["callback"] = self.cache_name
        return key


class Probe(CacheNamed, AtSteps):
    """A figure's measurement of the live model at chosen steps (a :class:`toymodels.callbacks.AtSteps`):
    :meth:`of` returns its part of a run's history, prefix removed; ``cache_name``: see :class:`CacheNamed`."""

    @classmethod
    def of(cls, hist: Mapping) -> dict[str, np.ndarray]:
        return {k[len(cls.prefix):]: v for k, v in hist.items() if k.startswith(cls.prefix)}


def diverged(hist: Mapping) -> bool:
    """Whether a sweep's run diverged (its history is then truncated at ``diverged_step``): the one test."""
    return "diverged_step" in hist


def final(hist: Mapping, key: str) -> float:
    """The last recorded value of ``key``, NaN for a diverged run."""
    return math.nan if diverged(hist) else float(np.asarray(hist[key])[-1])


def require_datasets(*names: str) -> None:
    """The one "data missing" check: :class:`Unavailable` naming the first of ``names`` that is not available
    here, and why."""
    from toymodels import data

    for name in names:
        ok, why = data.available(name, probe_network=False)
        if not ok:
            raise Unavailable(f"{name} is not available here: {why}")


HEADLINE_POLICY = (
    "Headline protocol: where the paper states the protocol of the experiment a figure mirrors, the verdict is that "
    "protocol's (marked `paper`; it is the primary one). Where the paper states none (ALLoRA names no optimizer), "
    "the verdict is combined over the plausible protocols (marked `plausible`: SGD and Adam at least where the "
    "optimizer is unstated): reproduced if the claim holds under every one of them, not reproduced if it holds "
    "under none (not even partially), partially reproduced otherwise (e.g. holds under SGD, not under Adam). The "
    "marks are chosen from the papers' text and frozen with the criteria, never from outcomes; the primary protocol "
    "is the one drawn. A first look (`--primary`) runs the primary protocol alone and says so.")


def headline_protocols(protocols: tuple[Protocol, ...]) -> tuple[Protocol, ...]:
    """The protocols whose verdicts make the headline (:data:`HEADLINE_POLICY`): the paper's (the primary) where the
    paper states one, else every ``plausible`` one, else (a figure not yet marked) the primary alone."""
    primary = [p for p in protocols if p.primary]
    if len(primary) != 1:
        raise ValueError(f"protocols must mark exactly one primary protocol, got {len(primary)}")
    if primary[0].paper:
        return (primary[0],)
    plausible = tuple(p for p in protocols if p.plausible)
    return plausible or (primary[0],)


def combine_verdicts(verdicts: list[str]) -> str:
    """One headline verdict over the plausible protocols' ``verdicts``: reproduced if all are, not reproduced if all
    are, partially reproduced otherwise; unavailable if any is (a protocol that could not be judged leaves the
    combination undecided)."""
    if not verdicts:
        raise ValueError("verdicts must not be empty")
    bad = [v for v in verdicts if v not in VERDICTS]
    if bad:
        raise ValueError(f"verdicts must be in {VERDICTS}, got {bad}")
    if "unavailable" in verdicts:
        return "unavailable"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if all(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "partially reproduced"


def check_protocols(protocols: tuple[Protocol, ...]) -> None:
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise ValueError(f"protocols must have unique names, got {names}")
    primary = [p for p in protocols if p.primary]
    if len(primary) != 1:
        raise ValueError(f"protocols must mark exactly one primary protocol, got {len(primary)}")
    if any(p.paper for p in protocols) and not primary[0].paper:
        raise ValueError("protocols: the primary protocol must be the paper's where the paper states one "
                         f"(primary {primary[0].name!r} is not marked paper=True)")
    plausible = [p.name for p in protocols if p.plausible]
    if plausible and primary[0].paper:
        raise ValueError(f"protocols: {plausible} are marked plausible although the paper states the protocol "
                         f"({primary[0].name!r}): the headline is the paper's protocol alone")
    if plausible and not primary[0].plausible:
        raise ValueError(f"protocols: the primary protocol {primary[0].name!r} must be one of the plausible ones "
                         f"{plausible}")
    if len(plausible) == 1:
        raise ValueError(f"protocols: a single plausible protocol {plausible} is the primary alone; mark at least "
                         "two (the paper states none) or mark the paper's protocol paper=True")


_MODULE_FIELDS = ("ID", "PAPER", "KIND", "CLAIM_ID", "CLAIM", "CRITERION", "PROTOCOLS", "configs", "measure", "draw")


def spec_of(module: ModuleType) -> Spec:
    """The :class:`Spec` of a figure module (ValueError naming the missing part)."""
    missing = [f for f in _MODULE_FIELDS if not hasattr(module, f)]
    if missing:
        raise ValueError(f"module {module.__name__} lacks {missing} (see figures.framework)")
    if not isinstance(module.CRITERION, Criterion):
        raise ValueError(f"{module.__name__}.CRITERION must be a figures.criteria.Criterion")
    protocols = tuple(module.PROTOCOLS)
    check_protocols(protocols)
    return Spec(module.ID, module.PAPER, module.CLAIM, module.CRITERION, protocols, module.configs, module.measure,
                module.draw, module.__name__, kind=module.KIND, claim_id=module.CLAIM_ID)


def sweep(ctx: Context, runs: Mapping[str, object]) -> dict[str, list[dict]]:
    """Run every entry of ``runs`` (a config or :class:`Runs`) once per seed of ``ctx`` (or the first seed), in one
    cached parallel sweep; diverged runs come back truncated with ``diverged_step``. Returns name -> histories."""
    from toymodels import run_sweep

    plan, configs, callbacks = [], [], []
    for name, entry in runs.items():
        entry = entry if isinstance(entry, Runs) else Runs(entry)
        seeds = ctx.seeds[:1] if entry.first_seed_only else ctx.seeds
        plan.append((name, len(seeds)))
        configs += [entry.config.replace(seed=s) for s in seeds]
        callbacks += [list(entry.callbacks)] * len(seeds)
    if not configs:
        return {name: [] for name in runs}
    hists = run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False,
                      on_diverge="return", callbacks=callbacks if any(callbacks) else None)
    out, i = {}, 0
    for name, n in plan:
        out[name] = hists[i:i + n]
        i += n
    return out


def jsonable(obj):
    """``obj`` as JSON values (:func:`analysis.jsonable.to_jsonable`, the toolkit's one converter: arrays as lists,
    NaN as null, infinities as "inf" / "-inf")."""
    return to_jsonable(obj, nonfinite="string")


def as_saved(numbers):
    """``numbers`` as ``draw`` will read them back from the JSON (a round trip through :func:`jsonable`)."""
    return json.loads(json.dumps(jsonable(numbers)))


def floats(values) -> np.ndarray:
    """A saved list of numbers as a float array (None -> NaN, "inf" / "-inf" -> +-inf): the inverse of
    :func:`jsonable` for ``draw``."""
    def conv(v):
        if isinstance(v, list):
            return [conv(x) for x in v]
        if v is None:
            return math.nan
        if isinstance(v, str):
            return float(v)
        return v

    return np.asarray(conv(values), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ running


def holds_count(protocols: list[dict]) -> dict:
    """{"reproduced": k, "partially reproduced": j, ..., "n": n} over a figure's protocol records."""
    counts = {v: 0 for v in VERDICTS}
    for p in protocols:
        counts[p["verdict"]] += 1
    return {**counts, "n": len(protocols)}


def _measure(spec: Spec, ctx: Context, prot: Protocol) -> Measurement:
    pctx = ctx.with_protocol(prot)
    try:
        meas = spec.measure(pctx, sweep(pctx, spec.configs(pctx)))
    except Unavailable as exc:
        return Measurement(unavailable=str(exc))
    except Exception as exc:
        if prot.primary:
            raise
        traceback.print_exc()
        return Measurement(unavailable=f"error in protocol {prot.name}: {type(exc).__name__}: {exc}")
    if not isinstance(meas, Measurement):
        raise ValueError(f"{spec.id}: measure must return a Measurement, got {type(meas).__name__}")
    return meas


def run_figure(spec: Spec, ctx: Context) -> Result:
    """Measure each protocol to run (primary only, or all with ``ctx.robustness``; the primary first), evaluate
    the criterion in each, and return the Result: the headline verdict by :data:`HEADLINE_POLICY` (the paper's
    protocol, or combined over the plausible ones; the primary alone when only it ran), the primary protocol's
    numbers and figure, ``criterion``, ``protocols`` and ``draw`` filled. An error in a non-primary protocol makes
    that protocol ``unavailable`` (and is printed); an error in the primary one propagates."""
    crit = spec.criterion
    primary = [p for p in spec.protocols if p.primary]
    todo = primary + ([p for p in spec.protocols if not p.primary] if ctx.robustness else [])
    records, head, head_meas = [], None, None
    for prot in todo:
        meas = _measure(spec, ctx, prot)
        outcome = Outcome.unavailable(meas.unavailable) if meas.unavailable else crit.evaluate(meas.samples)
        summary = meas.unavailable or meas.summary
        rec = {"name": prot.name, "protocol": dict(prot.settings), "primary": prot.primary, "paper": prot.paper,
               "plausible": prot.plausible, "note": prot.note, "verdict": outcome.verdict, "summary": summary,
               "key": meas.key, "tests": outcome.describe(), "outcome": outcome.as_dict()}
        records.append(rec)
        if prot.primary:
            head, head_meas = rec, meas
    assert head is not None and head_meas is not None
    order = {p.name: i for i, p in enumerate(spec.protocols)}
    records.sort(key=lambda r: order[r["name"]])
    counts = holds_count(records)
    by_name = {r["name"]: r for r in records}
    wanted = [p.name for p in headline_protocols(spec.protocols)]
    ran = [n for n in wanted if n in by_name]
    complete = len(ran) == len(wanted)
    verdict = combine_verdicts([by_name[n]["verdict"] for n in ran]) if complete else head["verdict"]
    if head["paper"]:
        where = f"At the paper's protocol ({head['name']})"
    elif len(wanted) > 1 and complete:
        held = ", ".join(f"{by_name[n]['verdict']} under {n}" for n in ran)
        where = f"Over the plausible protocols ({held}); at the primary one ({head['name']})"
    elif len(wanted) > 1:
        where = (f"First look: the primary protocol ({head['name']}) alone; the headline combines the plausible "
                 f"protocols {wanted}")
    else:
        where = f"At the primary protocol ({head['name']}; the paper states none)"
    summary = f"{where}: {head['summary']}"
    if head["verdict"] != "unavailable":
        tests = head["outcome"]["tests"]
        if len(tests) <= 6:
            summary += f" Tests: {head['tests']}."
        else:  # many tests (e.g. one per fitted exponent): count them, name the failures; statistics in the JSON
            claims = [t for t in tests if t["role"] == "claim"]
            failed = [t["name"] for t in tests if not t["passed"]]
            summary += (f" Tests: {sum(t['passed'] for t in claims)} of {len(claims)} claim tests pass"
                        + (f"; failing: {', '.join(failed)}" if failed else "") + " (statistics in the JSON).")
    if len(records) > 1:
        summary += (f" Holds (reproduced) in {counts['reproduced']} of {counts['n']} protocols, partially in "
                    f"{counts['partially reproduced']}.")
    numbers, fig = None, None
    if not head_meas.unavailable and head_meas.draw is not None:
        numbers = as_saved(head_meas.draw)
        try:
            fig = spec.draw(numbers)
        except Exception:  # a broken plot must not lose the measurement: the JSON keeps the numbers (--redraw)
            traceback.print_exc()
    result = Result(verdict, summary, dict(head_meas.measured), list(head_meas.datasets),
                    dict(head_meas.config), fig, criterion=crit.as_dict(), protocols=records, draw=numbers,
                    headline=head["name"])
    result.headline_protocols = ran if complete else [head["name"]]
    result.headline_complete = complete
    return result

"""Claims about a results table, judged with the gallery's criterion machinery (:mod:`figures.criteria`).

A claim specification (a YAML or JSON file, or the one-line form of ``lora-theory stats``) declares tests in the
vocabulary of :class:`figures.criteria.Test` -- a direction (``greater``, ``less``, ``equivalent``) against a
margin, a method (``t`` or ``sign``; there is no bootstrap test, see :data:`figures.criteria.BOOTSTRAP_REMOVED`),
a ``why`` -- over one of three per-unit quantities:

- ``compare: {COLUMN: [A, B]}``: the paired difference of the metric, arm A minus arm B, one value per pairing
  unit (the ``pair`` key, e.g. the seed);
- ``trend: COLUMN``: per pairing unit, the least-squares slope of the metric against that ordered numeric factor
  (``log_x`` / ``log_y``: of ln factor / ln metric);
- neither: the metric itself, one value per pairing unit.

Shared keys (each test may override them): ``metric`` (a column), ``pair`` (a column or a list of columns: the
unit that is independent, usually the seed), ``where`` (``{column: value or [values]}``: the rows kept),
``average`` (columns averaged over within a unit and arm first, e.g. a task or a grid cell; without it every
unit must have exactly one row per arm), ``alpha`` (family-wise level, default 0.05), ``correction`` (``holm`` or
``none``), and ``rule`` (``reproduced: [names]``, ``partially: [[names], ...]``; default: reproduced when every
claim test passes, partially when at least one does). Example::

    metric: final_test_acc
    pair: seed
    where: {dataset: mnist}
    tests:
      - name: rslora_beats_lora
        compare: {variant: [rslora, lora]}
        direction: greater
        margin: 0.0
        why: the claim is a direction
      - name: acc_rises_with_rank
        compare: {variant: [rslora, lora]}   # optional: trend of one arm only via where
        trend: r
        log_x: true
        direction: greater

The evaluation returns, per test, the criterion's numbers (estimate, interval at 1 - 2 alpha, p, Holm p, pass,
and, from :mod:`figures.criteria` as in the gallery, ``mde``: the minimum detectable effect, the distance beyond
the margin a true mean needs to be detected with 80% power at level alpha by the t-test with this n and spread,
and ``reading``: ``pass``, ``refuted`` or ``inconclusive``; ``result`` repeats ``reading``), and, for a comparison,
the probability of improvement P(A beats B) (rliable: over every run of A against every run of B within each level
of the ``average`` columns, averaged over the levels; interval by a stratified BCa bootstrap).

Bad input raises :class:`ClaimError` naming what is wrong (missing columns, unpaired or duplicated units, a
single unit, NaN metrics, unknown keys or test names).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from figures.criteria import (
    BOOTSTRAP_REMOVED,
    CORRECTIONS,
    DIRECTIONS,
    POWER,  # noqa: F401 (re-exported: its home is figures.criteria)
    Criterion,
    Rule,
    Test,
    min_detectable_effect,  # noqa: F401 (re-exported: its home is figures.criteria)
    reading,  # noqa: F401 (re-exported: its home is figures.criteria)
)

METHODS = ("t", "sign")  # the criteria methods that take one value per unit
SPEC_KEYS = ("metric", "pair", "where", "average", "alpha", "correction", "method", "tests", "rule", "note")
TEST_KEYS = ("name", "compare", "trend", "log_x", "log_y", "direction", "margin", "method", "why", "role", "metric",
             "pair", "where", "average", "quantity")


class ClaimError(ValueError):
    """A claim that cannot be judged on this table; the message names what is wrong."""


@dataclass
class ClaimTest:
    """One declared test of a claim specification (see the module docstring)."""

    name: str
    direction: str
    margin: float | tuple[float, float] = 0.0
    compare: tuple[str, object, object] | None = None  # (column, arm A, arm B): A - B
    trend: str | None = None
    log_x: bool = False
    log_y: bool = False
    method: str = "t"
    why: str = ""
    role: str = "claim"
    metric: str = ""
    pair: tuple[str, ...] = ("seed",)
    where: dict = field(default_factory=dict)
    average: tuple[str, ...] = ()
    quantity: str = ""

    def describe_quantity(self) -> str:
        if self.quantity:
            return self.quantity
        unit = ", ".join(self.pair)
        y = f"ln {self.metric}" if self.log_y else self.metric
        if self.trend:
            x = f"ln {self.trend}" if self.log_x else self.trend
            what = f"slope of {y} against {x} per {unit}"
            if self.compare:
                col, a, b = self.compare
                what += f", {col}={a} minus {col}={b}"
        elif self.compare:
            col, a, b = self.compare
            what = f"{y}: {col}={a} minus {col}={b}, paired by {unit}"
        else:
            what = f"{y} per {unit}"
        if self.average:
            what += f" (averaged over {', '.join(self.average)})"
        return what


@dataclass
class ClaimSpec:
    tests: list[ClaimTest]
    rule: Rule
    alpha: float = 0.05
    correction: str = "holm"
    note: str = ""

    def criterion(self) -> Criterion:
        return Criterion(tests=tuple(Test(t.name, t.describe_quantity(), t.direction, margin=t.margin,
                                          method=t.method, why=t.why, role=t.role) for t in self.tests),
                         rule=self.rule, alpha=self.alpha, correction=self.correction, note=self.note)


# ---------------------------------------------------------------------------------------------- the spec


def _as_tuple(value, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ClaimError(f"{key} must be a column name or a list of column names, got {value!r}")


def _margin(value, direction: str, name: str):
    if direction == "equivalent":
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        if isinstance(value, Sequence) and len(value) == 2:
            return (float(value[0]), float(value[1]))
        raise ClaimError(f"test {name!r}: an equivalence test needs margin m > 0 (the band -m..m) or [low, high], "
                         f"got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ClaimError(f"test {name!r}: margin must be a finite number, got {value!r}")
    return float(value)


def parse_spec(data: Mapping) -> ClaimSpec:
    """A :class:`ClaimSpec` from the parsed YAML / JSON mapping (ClaimError naming a bad key or value)."""
    if not isinstance(data, Mapping):
        raise ClaimError(f"the criterion file must hold a mapping with a 'tests' list, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ClaimError(f"unknown keys {unknown} in the criterion; the keys are {', '.join(SPEC_KEYS)}")
    tests = data.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ClaimError("the criterion must have a non-empty 'tests' list")
    shared = {"metric": data.get("metric"), "pair": _as_tuple(data.get("pair", "seed"), "pair"),
              "where": data.get("where") or {}, "average": _as_tuple(data.get("average"), "average"),
              "method": data.get("method", "t")}
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, Mapping):
            raise ClaimError(f"tests[{i}] must be a mapping, got {t!r}")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ClaimError(f"tests[{i}] needs a name")
        bad = sorted(set(t) - set(TEST_KEYS))
        if bad:
            raise ClaimError(f"test {name!r}: unknown keys {bad}; a test's keys are {', '.join(TEST_KEYS)}")
        direction = t.get("direction")
        if direction not in DIRECTIONS:
            raise ClaimError(f"test {name!r}: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        method = t.get("method", shared["method"])
        if method == "bootstrap":
            raise ClaimError(f"test {name!r}: {BOOTSTRAP_REMOVED}")
        if method not in METHODS:
            raise ClaimError(f"test {name!r}: method must be one of {', '.join(METHODS)}, got {method!r}")
        metric = t.get("metric", shared["metric"])
        if not isinstance(metric, str) or not metric:
            raise ClaimError(f"test {name!r}: no metric (give 'metric: COLUMN' at the top or in the test)")
        compare = t.get("compare")
        if compare is not None:
            if not (isinstance(compare, Mapping) and len(compare) == 1):
                raise ClaimError(f"test {name!r}: compare must be {{COLUMN: [A, B]}}, got {compare!r}")
            (col, arms), = compare.items()
            if not (isinstance(arms, Sequence) and not isinstance(arms, str) and len(arms) == 2):
                raise ClaimError(f"test {name!r}: compare must name two arms, {{{col}: [A, B]}}, got {arms!r}")
            if arms[0] == arms[1]:
                raise ClaimError(f"test {name!r}: compare's two arms are the same ({arms[0]!r})")
            compare = (str(col), arms[0], arms[1])
        where = {**shared["where"], **(t.get("where") or {})}
        if not isinstance(where, Mapping):
            raise ClaimError(f"test {name!r}: where must be a mapping column: value(s), got {where!r}")
        out.append(ClaimTest(
            name=name, direction=direction, margin=_margin(t.get("margin", 0.0), direction, name), compare=compare,
            trend=t.get("trend"), log_x=bool(t.get("log_x", False)), log_y=bool(t.get("log_y", False)),
            method=method, why=str(t.get("why", "")), role=t.get("role", "claim"), metric=metric,
            pair=_as_tuple(t.get("pair"), "pair") or shared["pair"], where=dict(where),
            average=_as_tuple(t.get("average"), "average") or shared["average"], quantity=str(t.get("quantity", ""))))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ClaimError(f"test names must be unique, {dup} repeated")
    for t in out:
        if t.role not in ("claim", "sanity"):
            raise ClaimError(f"test {t.name!r}: role must be claim or sanity, got {t.role!r}")
    claims = [t.name for t in out if t.role == "claim"]
    if not claims:
        raise ClaimError("the criterion needs at least one test with role claim")
    rule_data = data.get("rule")
    if rule_data is None:
        rule = Rule(reproduced=tuple(claims), partially=tuple((n,) for n in claims) if len(claims) > 1 else ())
    else:
        if not isinstance(rule_data, Mapping) or "reproduced" not in rule_data:
            raise ClaimError("rule must be a mapping with 'reproduced: [test names]' (and optionally 'partially')")
        named = list(rule_data.get("reproduced") or []) + [n for g in rule_data.get("partially") or [] for n in g]
        unknown = sorted(set(named) - set(claims))
        if unknown:
            raise ClaimError(f"the rule names unknown tests {unknown}; the claim tests are {', '.join(claims)}")
        rule = Rule(reproduced=tuple(rule_data["reproduced"]),
                    partially=tuple(tuple(g) for g in rule_data.get("partially") or ()))
    alpha = data.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
        raise ClaimError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    correction = data.get("correction", "holm")
    if correction not in CORRECTIONS:
        raise ClaimError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    return ClaimSpec(tests=out, rule=rule, alpha=float(alpha), correction=correction, note=str(data.get("note", "")))


def load_spec(path: str | Path) -> ClaimSpec:
    """Parse a YAML (``.yaml``/``.yml``) or JSON criterion file."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ClaimError(f"criterion file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise ClaimError(f"criterion file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: "
                         f"{exc}") from None
    return parse_spec(data)


# ---------------------------------------------------------------------------------------------- the table


def load_table(path: str | Path):
    """A results table as a pandas DataFrame: Parquet (``.parquet``), CSV (``.csv``), TSV (``.tsv``) or JSON
    lines / records (``.json``, ``.jsonl``)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ClaimError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"),
               ".json": pd.read_json, ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if suffix not in readers:
        raise ClaimError(f"table {path}: unknown format {suffix or '(no suffix)'}; use "
                         + ", ".join(readers))
    try:
        return readers[suffix](path)
    except Exception as exc:
        raise ClaimError(f"table {path} cannot be read as {suffix[1:]}: {type(exc).__name__}: {exc}") from None


def _matches(column, value):
    """Rows of ``column`` equal to ``value`` (numbers compared as numbers, anything else as text)."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        try:
            return np.isclose(column.astype(float), float(value), rtol=1e-12, atol=0.0)
        except (TypeError, ValueError):
            return np.zeros(len(column), dtype=bool)
    return column.astype(str) == str(value)


def _filter(df, where: Mapping, test: str):
    for col, value in where.items():
        values = value if isinstance(value, list | tuple) else [value]
        keep = np.zeros(len(df), dtype=bool)
        for v in values:
            keep |= np.asarray(_matches(df[col], v))
        df = df[keep]
        if df.empty:
            raise ClaimError(f"test {test!r}: no row has {col} = {value!r}")
    return df


def _unit_label(key) -> str:
    return key if isinstance(key, str) else ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))


def _per_unit(df, t: ClaimTest, extra: Sequence[str] = ()):
    """{unit: value of the metric} after averaging over ``t.average``; ClaimError on duplicates or NaN."""
    keys = list(t.pair) + list(extra)
    dup = df.duplicated(subset=keys + list(t.average), keep=False)
    if dup.any():
        rows = df[dup]
        first = rows.iloc[0]
        same = rows[np.logical_and.reduce([_matches(rows[k], first[k]) for k in keys + list(t.average)])]
        differ = [c for c in df.columns if c not in keys and same[c].astype(str).nunique() > 1
                  and c not in (t.metric,)][:6]
        where = ", ".join(f"{k}={first[k]}" for k in keys + list(t.average))
        raise ClaimError(f"test {t.name!r}: duplicated {'/'.join(t.pair)}: {int(dup.sum())} rows share their "
                         f"{', '.join(keys + list(t.average))} (e.g. {len(same)} rows with {where}"
                         + (f"; they differ in {', '.join(differ)}" if differ else "") + "): filter them with "
                         "where, or average over the column that differs with average")
    means = df.groupby(keys, sort=True)[t.metric].mean()
    return means


def _check_columns(df, t: ClaimTest) -> None:
    need = [t.metric, *t.pair, *t.average, *t.where]
    if t.compare:
        need.append(t.compare[0])
    if t.trend:
        need.append(t.trend)
    missing = [c for c in dict.fromkeys(need) if c not in df.columns]
    if missing:
        raise ClaimError(f"test {t.name!r}: the table has no column {', '.join(map(repr, missing))}; its columns "
                         f"are {', '.join(map(str, df.columns))}")


def _check_metric(df, t: ClaimTest) -> None:
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(df[t.metric]):
        raise ClaimError(f"test {t.name!r}: metric column {t.metric!r} is not numeric (e.g. {df[t.metric].iloc[0]!r})")
    bad = df[~np.isfinite(df[t.metric].astype(float))]
    if len(bad):
        units = "; ".join(", ".join(f"{k}={r[k]}" for k in t.pair) for _, r in bad.head(3).iterrows())
        raise ClaimError(f"test {t.name!r}: metric {t.metric!r} is NaN or infinite in {len(bad)} rows ({units}"
                         f"{' ...' if len(bad) > 3 else ''}); drop them with where (e.g. status: ok) or fix the "
                         "table: a missing value is not evidence either way")


def _arms(df, t: ClaimTest):
    col, a, b = t.compare
    sel_a, sel_b = df[np.asarray(_matches(df[col], a))], df[np.asarray(_matches(df[col], b))]
    for arm, sel in ((a, sel_a), (b, sel_b)):
        if sel.empty:
            levels = ", ".join(map(str, sorted(df[col].astype(str).unique())[:12]))
            raise ClaimError(f"test {t.name!r}: no row has {col} = {arm!r}; its values are {levels}")
    return sel_a, sel_b


def _paired(ua, ub, t: ClaimTest, what: str):
    only_a = sorted(set(ua.index) - set(ub.index), key=str)
    only_b = sorted(set(ub.index) - set(ua.index), key=str)
    if only_a or only_b:
        col, a, b = t.compare
        parts = []
        if only_a:
            parts.append(f"{col}={a} only: {', '.join(_unit_label(k) for k in only_a[:6])}")
        if only_b:
            parts.append(f"{col}={b} only: {', '.join(_unit_label(k) for k in only_b[:6])}")
        raise ClaimError(f"test {t.name!r}: unpaired {'/'.join(t.pair)} ({what}): " + "; ".join(parts)
                         + " -- every unit needs both arms")
    return ua, ub.loc[ua.index]


def _slopes(df, t: ClaimTest):
    """Per unit, the least-squares slope of (ln) metric against (ln) the trend factor."""
    import pandas as pd

    if not pd.api.types.is_numeric_dtype(df[t.trend]):
        raise ClaimError(f"test {t.name!r}: trend factor {t.trend!r} must be numeric (an ordered factor)")
    values = _per_unit(df, t, extra=[t.trend])
    levels = sorted(values.index.get_level_values(-1).unique())
    if len(levels) < 2:
        raise ClaimError(f"test {t.name!r}: trend over {t.trend!r} needs at least 2 levels, got {levels}")
    out = {}
    for unit, grp in values.groupby(level=list(range(len(t.pair)))):
        x = np.asarray(grp.index.get_level_values(-1), dtype=np.float64)
        y = np.asarray(grp.to_numpy(), dtype=np.float64)
        if len(x) != len(levels):
            raise ClaimError(f"test {t.name!r}: unpaired {'/'.join(t.pair)} {_unit_label(unit)}: it has {t.trend} "
                             f"{sorted(x.tolist())}, the others {levels}")
        for flag, v, nm in ((t.log_x, x, t.trend), (t.log_y, y, t.metric)):
            if flag and np.any(v <= 0):
                raise ClaimError(f"test {t.name!r}: log of {nm} needs positive values (unit {_unit_label(unit)})")
        out[unit] = float(np.polyfit(np.log(x) if t.log_x else x, np.log(y) if t.log_y else y, 1)[0])
    return pd.Series(out)


def samples_of(df, t: ClaimTest):
    """(per-unit values as a pandas Series indexed by unit, arms (A rows, B rows) or None) of one test."""
    _check_columns(df, t)
    df = _filter(df, t.where, t.name)
    _check_metric(df, t)
    if t.compare:
        a, b = _arms(df, t)
        if t.trend:
            ua, ub = _paired(_slopes(a, t), _slopes(b, t), t, "slopes")
        else:
            ua, ub = _paired(_per_unit(a, t), _per_unit(b, t), t, "rows")
        values, arms = ua - ub, (a, b)
    else:
        values, arms = (_slopes(df, t) if t.trend else _per_unit(df, t)), None
    if len(values) < 2:
        raise ClaimError(f"test {t.name!r}: a single {'/'.join(t.pair)} ({_unit_label(values.index[0])}): a test "
                         "over units needs at least 2 (the spread between them is the evidence)")
    return values, arms


# ---------------------------------------------------------------------------------------------- judging


def _poi(*samples, axis=-1):
    """Mean over levels of P(A > B) (+ 1/2 P(A = B)); samples alternate A, B per level (vectorized for scipy)."""
    vals = []
    for xa, xb in zip(samples[0::2], samples[1::2], strict=True):
        d = xa[..., :, None] - xb[..., None, :]
        vals.append(np.mean((d > 0) + 0.5 * (d == 0), axis=(-2, -1)))
    return np.mean(vals, axis=0)


def poi_interval(groups: Sequence, confidence: float, seed: int = 0, resamples: int = 2000) -> dict:
    """The probability of improvement of ``groups`` = [A of level 1, B of level 1, A of level 2, ...] (1-D arrays)
    with its stratified BCa bootstrap interval (:func:`scipy.stats.bootstrap`, ``method="BCa"``: the runs of each arm
    are resampled within each level). BCa, not the percentile interval: at 10 runs per arm the percentile interval
    under-covers as P(A beats B) moves away from 1/2 (measured, nominal 90%, normal arms 1.5 sd apart: 82.8% of 400
    samples; BCa 92.5%). Where BCa is undefined (every resample gives the same value, e.g. every run of A beats every
    run of B) the percentile interval is reported and ``interval`` says so. ``ci`` is None with < 2 runs per arm."""
    from scipy import stats

    groups = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    if not groups or len(groups) % 2:
        raise ValueError(f"groups must alternate A, B per level (an even, non-zero number), got {len(groups)}")
    point = float(_poi(*groups))
    out = {"estimate": point, "ci": None, "levels": len(groups) // 2, "confidence": confidence}
    if all(g.size < 2 for g in groups):
        return out
    kw = dict(paired=False, vectorized=True, n_resamples=int(resamples), confidence_level=confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning / 0/0 in the acceleration: handled below
        res = stats.bootstrap(tuple(groups), _poi, method="BCa", random_state=np.random.default_rng(seed), **kw)
    ci, method = [float(res.confidence_interval.low), float(res.confidence_interval.high)], "BCa"
    if not all(math.isfinite(c) for c in ci):
        res = stats.bootstrap(tuple(groups), _poi, method="percentile", random_state=np.random.default_rng(seed), **kw)
        ci, method = [float(res.confidence_interval.low), float(res.confidence_interval.high)], \
            "percentile (BCa undefined: a degenerate bootstrap distribution)"
    return {**out, "ci": ci, "interval": method, "resamples": int(resamples)}


def probability_of_improvement(a, b, t: ClaimTest, confidence: float, seed: int = 0,
                               resamples: int = 2000) -> dict:
    """P(A beats B) over every run of A against every run of B (ties count 1/2) within each level of
    ``t.average`` (one level when none), averaged over the levels (rliable's probability of improvement);
    "beats" is "greater" unless the test's direction is ``less``. Interval: :func:`poi_interval` (stratified BCa
    bootstrap), ``confidence`` two-sided."""
    sign = -1.0 if t.direction == "less" else 1.0
    groups = []
    levels = list(a[list(t.average)].drop_duplicates().itertuples(index=False, name=None)) if t.average else [None]
    for level in levels:
        if level is None:
            xa, xb = a[t.metric], b[t.metric]
        else:
            key = level if isinstance(level, tuple) else (level,)
            ma = np.logical_and.reduce([_matches(a[c], v) for c, v in zip(t.average, key, strict=True)])
            mb = np.logical_and.reduce([_matches(b[c], v) for c, v in zip(t.average, key, strict=True)])
            xa, xb = a[np.asarray(ma)][t.metric], b[np.asarray(mb)][t.metric]
        if len(xa) and len(xb):
            groups += [sign * np.asarray(xa, dtype=np.float64), sign * np.asarray(xb, dtype=np.float64)]
    return poi_interval(groups, confidence, seed=seed, resamples=resamples)


@dataclass
class Judgement:
    """The result of :func:`judge`: the criterion's outcome (per test its row, with ``reading`` and ``mde`` from
    :mod:`figures.criteria`) plus, per test, its per-unit values, ``result`` (= ``reading``) and, for a comparison,
    the probability of improvement."""

    spec: ClaimSpec
    criterion: Criterion
    outcome: object
    values: dict
    extras: dict

    @property
    def verdict(self) -> str:
        return self.outcome.verdict

    def as_dict(self) -> dict:
        tests = []
        for r in self.outcome.tests:
            v = self.values[r["name"]]
            tests.append({**r, **self.extras[r["name"]],
                          "units": [_unit_label(k) for k in v.index], "values": [float(x) for x in v.to_numpy()]})
        return {"verdict": self.outcome.verdict, "reason": self.outcome.reason, "criterion": self.criterion.as_dict(),
                "tests": tests}


def judge(df, spec: ClaimSpec) -> Judgement:
    """Evaluate every test of ``spec`` on the table ``df`` with :meth:`figures.criteria.Criterion.evaluate`."""
    criterion = spec.criterion()
    values, arms = {}, {}
    for t in spec.tests:
        values[t.name], arms[t.name] = samples_of(df, t)
    outcome = criterion.evaluate({n: v.to_numpy(dtype=np.float64) for n, v in values.items()})
    extras = {}
    for t, r in zip(spec.tests, outcome.tests, strict=True):
        ex = {"result": r["reading"]}
        if t.compare and not t.trend:
            a, b = arms[t.name]
            ex["probability_of_improvement"] = probability_of_improvement(a, b, t, confidence=1 - 2 * spec.alpha)
        extras[t.name] = ex
    return Judgement(spec, criterion, outcome, values, extras)

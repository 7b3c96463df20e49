"""Declared verdict criteria: the one statistics + verdict module of the figures.

A figure states *once, as data*, how its claim is tested: which quantities (one number per seed, a known-error
estimate, or an exact number), in which direction against which margin (and why that margin), with which
test, at which family-wise level, corrected for multiplicity (Holm), and the rule that maps the tests' outcomes
to the four verdicts. The gallery's prose is rendered from the declaration (:meth:`Criterion.describe`), the
JSON carries it (:meth:`Criterion.as_dict`), and :meth:`Criterion.evaluate` turns measured numbers into an
:class:`Outcome` (per-test statistic, raw and Holm-adjusted p-values, interval, pass/fail, verdict). No rule is
restated by hand anywhere else.

Directions (``mu`` is the quantity's mean, or median for the sign test):

- ``greater``: H1 mu > margin (H0 mu <= margin); ``less``: H1 mu < margin.
- ``equivalent``: H1 low < mu < high (``margin`` = m means (-m, m); a pair means (low, high)), by two one-sided
  tests (TOST): p = max(p_low, p_high). A claim of "no change" / "same order" is *never* "the interval includes
  0", which gets easier to pass with less data; it is an equivalence margin declared before looking.

Tests (``method``): ``t`` (one-sample t over seeds, at least 2 values with nonzero spread; pass paired
differences for paired comparisons; a single number is refused: declare it ``exact``),
``z`` (an :class:`Estimate` with a known standard error, e.g. a Monte-Carlo fit),
``exact`` (a closed-form / deterministic number: the inequality holds or not, p is 0 or 1; never in the Holm
family, never a t-test) and ``sign`` (the
binomial sign test on the median, robust to the heavy tails of spike factors; +-inf values count, NaN are
dropped). Other tests drop non-finite values and report how many (``n_excluded``). Intervals are two-sided at
confidence 1 - 2 alpha, so a one-sided test at level alpha passes exactly when the interval clears the margin
(before multiplicity correction), and TOST passes exactly when the interval lies inside (low, high).

There is no bootstrap test: at 10 seeds a bootstrap of the mean rejects a true null too often (measured, n = 10,
4000 normal samples, one-sided nominal 5%: percentile 7.95%, BCa 7.6%, the t-test 5.3%; binomial se 0.34%), see
:data:`BOOTSTRAP_REMOVED`; ``method="bootstrap"`` raises ValueError.

Each test's row also says how to read a failure (``reading``, :func:`reading`): ``pass``; ``refuted`` (the interval
lies entirely on the other side of the margin -- the effect is significantly smaller than the smallest effect that
counts, which includes "equivalent to no effect" -- or, for an equivalence claim, entirely outside the band); or
``inconclusive`` (the interval spans the margin: more seeds could decide), and its minimum detectable effect
(``mde``, :func:`min_detectable_effect`): how far beyond the margin (inside each bound, for equivalence) the true
mean must lie for this test, with these seeds' n and spread, to pass at level alpha with 80% power.

Values that are all equal (sd = 0) give no t statistic and so no evidence: p = 1, the row never passes
(a deterministic quantity must be declared ``exact``; the old shortcut gave p = 0 from two equal seeds).

Roles: ``claim`` tests enter the Holm family (except ``exact`` rows, which have no sampling error: their p of 0 or
1 would take a place in the family and change the other tests' adjusted p) and the rule; ``sanity`` rows (checks that cannot fail for a working
pipeline, or that test the set-up rather than the claim) are evaluated and reported, but never count.

Example (a figure module)::

    from figures.criteria import Criterion, Recalibration, Rule, Test

    CRITERION = Criterion(
        tests=(
            Test("rs_slope", "slope of ln(final loss) vs ln r, rsLoRA (per seed)", "less", margin=0.0,
                 why="the claim is a direction: rsLoRA's loss falls with rank"),
            Test("lora_flat", "slope of ln(final loss) vs ln r, LoRA (per seed)", "equivalent", margin=0.1,
                 why="|slope| < 0.1: under 15% loss change from r=4 to r=16 counts as 'hardly improves'"),
            Test("init_ok", "initial loss is finite", "greater", method="exact", role="sanity"),
        ),
        rule=Rule(reproduced=("rs_slope", "lora_flat"), partially=(("rs_slope",),)),
        alpha=0.05,
        recalibrations=(Recalibration(old="LoRA's CI includes 0", new="TOST with margin 0.1",
                                      why="accepting the null gets harder to pass with more seeds"),),
    )
    outcome = CRITERION.evaluate({"rs_slope": slopes_rs, "lora_flat": slopes_lora, "init_ok": 1.0})
    outcome.verdict, outcome.as_dict()   # -> "reproduced", {...per test: p, p_holm, ci, passed...}

Also here, for every figure: :func:`mean_ci` / :func:`ci_dict` (t intervals over seeds), :func:`ci_finite` (the
same over the finite values, for runs that may diverge) and :func:`fmt_ci` (the one formatter of an interval).

One confidence level everywhere: :data:`CONFIDENCE` = 1 - 2 :data:`ALPHA` = 0.90, the level of the tests' intervals
and the default of every interval helper; figure files never pass another level and label their error bars with
:data:`CI_PCT`. :data:`CONFIDENCE_STATEMENT` says so in one sentence (the gallery's Methods).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

VERDICTS = ("reproduced", "partially reproduced", "not reproduced", "unavailable")
DIRECTIONS = ("greater", "less", "equivalent")
METHODS = ("t", "z", "exact", "sign")
ROLES = ("claim", "sanity")
MARGIN_SOURCES = ("paper", "theory")  # where a claim test's margin (smallest effect that counts) comes from
CORRECTIONS = ("holm", "none")
READINGS = ("pass", "refuted", "inconclusive")  # how a test's outcome reads (see reading())
POWER = 0.8  # the power of the minimum detectable effect
BOOTSTRAP_REMOVED = (
    "method 'bootstrap' was removed: at 10 seeds a bootstrap interval of the mean rejects a true null too often "
    "(n = 10, one-sided nominal 5%: percentile 7.95%, BCa 7.6% of 4000 normal samples, binomial se 0.34%; the t-test "
    "5.3%); use 't' (paired differences per seed) or 'sign' (heavy tails)")

ALPHA = 0.05  # the one-sided level of every declared test (family-wise under Holm)
CONFIDENCE = 1 - 2 * ALPHA  # = 0.90: the ONE confidence level of every interval (tests, error bars, summaries)
CI_PCT = f"{100 * CONFIDENCE:g}%"  # "90%": the level as figure labels print it ("mean, {CI_PCT} CI")
CONFIDENCE_STATEMENT = (
    f"Every interval in this gallery (test rows, error bars, summaries) is a two-sided {100 * CONFIDENCE:g}% "
    f"interval, 1 - 2 alpha at the one-sided level alpha = {ALPHA:g} of the tests, so a one-sided test passes "
    "(before Holm's correction) exactly when its interval clears the margin, and an equivalence test (TOST) exactly "
    "when its interval lies inside the band.")

_METHOD_PROSE = {
    "t": "one-sample t-test over seeds",
    "z": "z-test on an estimate with known standard error",
    "exact": "exact (closed-form / deterministic) comparison",
    "sign": "sign test on the median over seeds",
}


# ------------------------------------------------------------------------------------- intervals over seeds


def mean_ci(values, confidence: float = CONFIDENCE, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-based confidence interval over ``axis`` (seeds), at :data:`CONFIDENCE` (figures never pass
    another level). With one value the interval is [v, v]."""
    v = np.asarray(values, dtype=np.float64)
    m = v.mean(axis=axis)
    n = v.shape[axis]
    if n < 2:
        return m, m, m
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(axis=axis, ddof=1) / math.sqrt(n)
    return m, m - half, m + half


def ci_dict(values, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "ci_low", "ci_high", "n"}`` of a 1-D sample (seeds), JSON-ready."""
    m, lo, hi = mean_ci(np.asarray(values, dtype=np.float64).ravel(), confidence)
    return {"mean": float(m), "ci_low": float(lo), "ci_high": float(hi), "n": int(np.size(values)),
            "confidence": confidence}


def ci_finite(values, confidence: float = CONFIDENCE) -> dict:
    """:func:`ci_dict` over the finite values only (a diverged run is NaN), with ``n_excluded``: how many were
    dropped. With no finite value: NaN mean and bounds, ``n`` 0."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "confidence": confidence,
                "n_excluded": int(v.size)}
    return {**ci_dict(ok, confidence), "n_excluded": int(v.size - ok.size)}


def fmt_ci(d: Mapping, spec: str = ".3g", scale: float = 1.0, unit: str = "") -> str:
    """A CI dict as text, ``mean [ci_low, ci_high]``, each ``scale`` x value formatted with ``spec`` and
    followed by ``unit`` after the mean (e.g. ``fmt_ci(d, ".0f", 100, "%")`` -> ``"31% [25, 37]"``)."""
    return (f"{scale * d['mean']:{spec}}{unit} [{scale * d['ci_low']:{spec}}, {scale * d['ci_high']:{spec}}]")


# ------------------------------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class Estimate:
    """A number with a known standard error (for ``method="z"``), e.g. a Monte-Carlo fitted exponent."""

    value: float
    se: float


@dataclass(frozen=True)
class Test:
    """One declared test: ``quantity`` (prose: what one measured value is), ``direction`` against ``margin``,
    ``method``, ``why`` that margin, and ``role`` (``claim`` or ``sanity``). ``name`` keys the measured input."""

    __test__ = False  # not a pytest test class

    name: str
    quantity: str
    direction: str
    margin: float | tuple[float, float] = 0.0
    method: str = "t"
    why: str = ""
    role: str = "claim"
    margin_from: str = ""  # "paper" or "theory" (never our data): see needs_margin_source

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.method == "bootstrap":
            raise ValueError(f"method of test {self.name!r}: {BOOTSTRAP_REMOVED}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.margin_from and self.margin_from not in MARGIN_SOURCES:
            raise ValueError(f"margin_from must be one of {MARGIN_SOURCES} (or empty), got {self.margin_from!r}")
        if self.direction == "equivalent":
            lo, hi = self.bounds
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"margin of an equivalence test must be m > 0 or (low, high) with low < high, "
                                 f"got {self.margin!r}")
        elif not (isinstance(self.margin, int | float) and math.isfinite(self.margin)):
            raise ValueError(f"margin of a {self.direction} test must be a finite number, got {self.margin!r}")

    @property
    def bounds(self) -> tuple[float, float]:
        """The equivalence interval (low, high)."""
        if isinstance(self.margin, int | float):
            return -float(self.margin), float(self.margin)
        lo, hi = self.margin
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        margin = list(self.bounds) if self.direction == "equivalent" else float(self.margin)
        return {"name": self.name, "quantity": self.quantity, "direction": self.direction, "margin": margin,
                "method": self.method, "why": self.why, "role": self.role, "margin_from": self.margin_from}

    @property
    def needs_margin_source(self) -> bool:
        """A claim test with sampling error (not ``exact``) must say where its margin comes from: the smallest
        effect that counts (directional) or the equivalence band, from the paper's numbers or from theory."""
        return self.role == "claim" and self.method != "exact"

    def hypothesis(self) -> str:
        """The alternative hypothesis in words, e.g. ``mean < 0`` or ``-0.1 < mean < 0.1``."""
        stat = "median" if self.method == "sign" else "value" if self.method == "exact" else "mean"
        if self.direction == "equivalent":
            lo, hi = self.bounds
            return f"{lo:g} < {stat} < {hi:g}"
        return f"{stat} {'>' if self.direction == 'greater' else '<'} {float(self.margin):g}"

    def describe(self) -> str:
        source = {"paper": "margin from the paper", "theory": "margin from theory"}.get(self.margin_from, "")
        why = "; ".join(x for x in (source, self.why) if x)
        why = f" ({why})" if why else ""
        tost = " by two one-sided tests (TOST)" if self.direction == "equivalent" else ""
        return f"`{self.name}`: {self.quantity}: {self.hypothesis()}{tost}, {_METHOD_PROSE[self.method]}{why}"


@dataclass(frozen=True)
class Rule:
    """Outcomes -> verdict: ``reproduced`` when every test named in ``reproduced`` passes; ``partially
    reproduced`` when every test of at least one group in ``partially`` passes; otherwise ``not reproduced``.
    ``unavailable`` when a test of ``reproduced`` has too few values to be computed."""

    reproduced: tuple[str, ...]
    partially: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "reproduced", tuple(self.reproduced))
        object.__setattr__(self, "partially", tuple(tuple(g) for g in self.partially))
        if not self.reproduced:
            raise ValueError("reproduced must name at least one test")
        if any(not g for g in self.partially):
            raise ValueError("partially must not contain an empty group")

    def names(self) -> set[str]:
        return set(self.reproduced) | {n for g in self.partially for n in g}

    def as_dict(self) -> dict:
        return {"reproduced": list(self.reproduced), "partially": [list(g) for g in self.partially]}

    def describe(self) -> str:
        def conj(names):
            return " and ".join(f"`{n}`" for n in names)

        text = f"reproduced if {conj(self.reproduced)} pass"
        if self.partially:
            text += "; partially reproduced if " + ", or ".join(conj(g) for g in self.partially) + " pass"
        return text + "; otherwise not reproduced."


@dataclass(frozen=True)
class Recalibration:
    """A changed rule, for the gallery's Methods section: the old rule, the new one, and why."""

    old: str
    new: str
    why: str

    def as_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "why": self.why}


@dataclass(frozen=True)
class Criterion:
    """A figure's declared criterion (see the module docstring). ``alpha`` is the family-wise level of the claim
    tests (Holm over them when ``correction="holm"``); sanity rows are tested at ``alpha`` alone."""

    tests: tuple[Test, ...]
    rule: Rule
    alpha: float = ALPHA
    correction: str = "holm"
    recalibrations: tuple[Recalibration, ...] = ()
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tests", tuple(self.tests))
        object.__setattr__(self, "recalibrations", tuple(self.recalibrations))
        if not self.tests:
            raise ValueError("tests must not be empty")
        names = [t.name for t in self.tests]
        if len(set(names)) != len(names):
            raise ValueError(f"tests must have unique names, got {names}")
        if not (isinstance(self.alpha, float | int) and 0 < self.alpha < 0.5):
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        claims = {t.name for t in self.tests if t.role == "claim"}
        bad = self.rule.names() - claims
        if bad:
            raise ValueError(f"rule names tests that are not claim tests of this criterion: {sorted(bad)}")

    @property
    def claim_tests(self) -> tuple[Test, ...]:
        return tuple(t for t in self.tests if t.role == "claim")

    @property
    def sanity_tests(self) -> tuple[Test, ...]:
        return tuple(t for t in self.tests if t.role == "sanity")

    def as_dict(self) -> dict:
        return {"tests": [t.as_dict() for t in self.tests], "rule": self.rule.as_dict(), "alpha": self.alpha,
                "correction": self.correction, "confidence_of_intervals": 1 - 2 * self.alpha,
                "recalibrations": [r.as_dict() for r in self.recalibrations], "note": self.note,
                "description": self.describe()}

    def describe(self) -> str:
        """The criterion in prose (markdown), rendered from the declaration."""
        claims, sanity = self.claim_tests, self.sanity_tests
        corr = (f"Holm-corrected over the {len(claims)} claim tests (family-wise alpha = {self.alpha:g})"
                if self.correction == "holm" and len(claims) > 1 else f"alpha = {self.alpha:g}")
        lines = [f"Tests ({corr}; intervals are {100 * (1 - 2 * self.alpha):g}% two-sided):"]
        lines += [f"- {t.describe()}" for t in claims]
        if sanity:
            lines.append("Sanity checks (reported, not counted in the verdict):")
            lines += [f"- {t.describe()}" for t in sanity]
        lines.append(f"Verdict: {self.rule.describe()}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def evaluate(self, measured: Mapping[str, object]) -> Outcome:
        """Test every declared quantity on ``measured`` (name -> per-seed values / :class:`Estimate` / number),
        correct the claim tests for multiplicity, and apply the rule."""
        missing = [t.name for t in self.tests if t.name not in measured]
        if missing:
            raise ValueError(f"measured lacks the declared tests {missing}")
        results = {t.name: _run_test(t, measured[t.name], self.alpha) for t in self.tests}
        # exact rows have no sampling error: they are decided alone, outside the Holm family
        claim_names = [t.name for t in self.claim_tests if t.method != "exact"]
        for t in self.claim_tests:
            if t.method == "exact":
                r = results[t.name]
                r["p_adjusted"] = r["p"]
                r["passed"] = bool(r["computable"] and r["p"] <= self.alpha)
        raw = [results[n]["p"] for n in claim_names]
        adj = holm(raw) if self.correction == "holm" else [1.0 if math.isnan(p) else p for p in raw]
        for n, p in zip(claim_names, adj, strict=True):
            results[n]["p_adjusted"] = float(p)
            results[n]["passed"] = bool(results[n]["computable"] and p <= self.alpha)
        for t in self.sanity_tests:
            r = results[t.name]
            r["p_adjusted"] = r["p"]
            r["passed"] = bool(r["computable"] and r["p"] <= self.alpha)
        for t in self.tests:
            results[t.name]["reading"] = reading(results[t.name], self.alpha)
        passed = {n: r["passed"] for n, r in results.items()}
        uncomputable = [n for n in self.rule.reproduced if not results[n]["computable"]]
        if uncomputable:
            verdict = "unavailable"
            reason = f"too few values to test {uncomputable}"
        elif all(passed[n] for n in self.rule.reproduced):
            verdict, reason = "reproduced", ""
        elif any(all(passed[n] for n in g) for g in self.rule.partially):
            verdict, reason = "partially reproduced", ""
        else:
            verdict, reason = "not reproduced", ""
        return Outcome(verdict=verdict, tests=[results[t.name] for t in self.tests], reason=reason)


@dataclass
class Outcome:
    """The result of :meth:`Criterion.evaluate`: the verdict and, per test, its statistics."""

    verdict: str
    tests: list[dict] = field(default_factory=list)
    reason: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @classmethod
    def unavailable(cls, reason: str) -> Outcome:
        return cls(verdict="unavailable", tests=[], reason=reason)

    def test(self, name: str) -> dict:
        for t in self.tests:
            if t["name"] == name:
                return t
        raise ValueError(f"name: no test {name!r} in this outcome")

    @property
    def passed(self) -> dict[str, bool]:
        return {t["name"]: t["passed"] for t in self.tests}

    @property
    def readings(self) -> dict[str, str]:
        """Per test: ``pass``, ``refuted`` or ``inconclusive`` (:func:`reading`)."""
        return {t["name"]: t.get("reading", "pass" if t["passed"] else "inconclusive") for t in self.tests}

    def as_dict(self) -> dict:
        """The verdict, its reason, and per test its row (with ``reading`` and ``mde``)."""
        return {"verdict": self.verdict, "reason": self.reason, "tests": self.tests}

    def describe(self) -> str:
        """One line per test: estimate [interval], p (raw, adjusted), minimum detectable effect, and PASS or
        fail (refuted / inconclusive)."""
        out = []
        for t in self.tests:
            est = _fmt_num(t.get("estimate"))
            ci = t.get("ci")
            ci_txt = f" [{_fmt_num(ci[0])}, {_fmt_num(ci[1])}]" if ci else ""
            p_txt = (f", p = {_fmt_p(t['p'])}" + (f" (Holm {_fmt_p(t['p_adjusted'])})"
                                                   if t["role"] == "claim" and t["p_adjusted"] != t["p"] else ""))
            tag = "PASS" if t["passed"] else f"fail ({t.get('reading', 'inconclusive')})"
            mde = t.get("mde", math.nan)
            mde_txt = f", MDE {_fmt_num(mde)}" if mde is not None and math.isfinite(mde) else ""
            role = " (sanity)" if t["role"] == "sanity" else ""
            out.append(f"`{t['name']}`{role} {t['hypothesis']}: {est}{ci_txt}, n = {t['n']}{p_txt}{mde_txt}: {tag}")
        return "; ".join(out)


# ------------------------------------------------------------------------------------------- statistics


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: sort ascending p_(1) <= ... <= p_(m); adjusted p_(i) =
    max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting where adjusted <= alpha controls the family-wise error
    at alpha. NaN (an uncomputable test) counts as 1."""
    p = np.array([1.0 if (v is None or math.isnan(v)) else float(v) for v in pvalues], dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must lie in [0, 1], got {list(pvalues)}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def tost_t(values, low: float, high: float) -> tuple[float, float, float]:
    """TOST for low < mean < high with the one-sample t: returns (p, p_low, p_high), p = max(p_low, p_high),
    p_low = P(T_{n-1} >= (mean - low) / se), p_high = P(T_{n-1} <= (mean - high) / se)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n < 2:
        raise ValueError(f"values must hold at least 2 numbers, got {n}")
    se = x.std(ddof=1) / math.sqrt(n)
    m = x.mean()
    if se == 0:  # all values equal: no t statistic, no evidence (see _run_test)
        return 1.0, 1.0, 1.0
    p_lo = float(stats.t.sf((m - low) / se, n - 1))
    p_hi = float(stats.t.cdf((m - high) / se, n - 1))
    return max(p_lo, p_hi), p_lo, p_hi


def _one_sided_p(direction: str, dist, stat_low: float, stat_high: float) -> tuple[float, float, float]:
    """p for greater (uses stat_low = (est - margin)/se), less (stat_high), equivalent (both) under ``dist``."""
    if direction == "greater":
        p = float(dist.sf(stat_low))
        return p, p, math.nan
    if direction == "less":
        p = float(dist.cdf(stat_high))
        return p, math.nan, p
    p_lo, p_hi = float(dist.sf(stat_low)), float(dist.cdf(stat_high))
    return max(p_lo, p_hi), p_lo, p_hi


def _margins(test: Test) -> tuple[float, float]:
    """(low, high) against which the estimate is compared: equivalence bounds, or the margin twice."""
    return test.bounds if test.direction == "equivalent" else (float(test.margin), float(test.margin))


def _holds(test: Test, value: float) -> bool:
    lo, hi = _margins(test)
    if test.direction == "greater":
        return value > lo
    if test.direction == "less":
        return value < hi
    return lo < value < hi


def _run_test(test: Test, value, alpha: float) -> dict:
    lo, hi = _margins(test)
    out = {"name": test.name, "role": test.role, "method": test.method, "direction": test.direction,
           "hypothesis": test.hypothesis(), "margin": list(test.bounds) if test.direction == "equivalent"
           else float(test.margin), "confidence": 1 - 2 * alpha, "p_low": math.nan, "p_high": math.nan,
           "mde": math.nan}
    if test.method == "exact":
        v = float(np.asarray(value, dtype=np.float64).reshape(()))
        ok = math.isfinite(v) and _holds(test, v)
        return {**out, "estimate": v, "ci": [v, v], "n": 1, "p": 0.0 if ok else 1.0, "computable": True}
    if test.method == "z":
        if not isinstance(value, Estimate):
            raise ValueError(f"measured[{test.name!r}] must be an Estimate for a z test, got {type(value).__name__}")
        est, se = float(value.value), float(value.se)
        if not (math.isfinite(est) and math.isfinite(se) and se >= 0):
            return {**out, "estimate": est, "se": se, "ci": None, "n": 1, "p": math.nan, "computable": False}
        if se == 0:
            ok = _holds(test, est)
            return {**out, "estimate": est, "se": 0.0, "ci": [est, est], "n": 1, "p": 0.0 if ok else 1.0,
                    "computable": True}
        p, p_lo, p_hi = _one_sided_p(test.direction, stats.norm, (est - lo) / se, (est - hi) / se)
        half = float(stats.norm.ppf(1 - alpha)) * se
        return {**out, "estimate": est, "se": se, "ci": [est - half, est + half], "n": 1, "p": p, "p_low": p_lo,
                "p_high": p_hi, "mde": min_detectable_effect(se=se, alpha=alpha), "computable": True}

    if test.method == "t" and np.ndim(value) == 0:
        raise ValueError(f"measured[{test.name!r}] is a single number: a {test.method} test needs one value per "
                         "seed (declare a closed-form / deterministic row method='exact')")
    x = np.asarray(value, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    n, excluded = int(finite.size), int(x.size - finite.size)
    base = {**out, "n": n, "n_excluded": excluded}
    if test.method == "sign":  # infinities are ordered (e.g. a diverged run's infinite spike): only NaN is dropped
        finite = x[~np.isnan(x)]
        n = int(finite.size)
        base = {**out, "n": n, "n_excluded": int(x.size - n)}
        if n < 1:
            return {**base, "estimate": math.nan, "ci": None, "p": math.nan, "computable": False}
        med = float(np.median(finite))
        above_lo, below_lo = int(np.sum(finite > lo)), int(np.sum(finite < lo))
        above_hi, below_hi = int(np.sum(finite > hi)), int(np.sum(finite < hi))
        p_lo = float(stats.binom.sf(above_lo - 1, above_lo + below_lo, 0.5)) if above_lo + below_lo else 1.0
        p_hi = float(stats.binom.sf(below_hi - 1, above_hi + below_hi, 0.5)) if above_hi + below_hi else 1.0
        p = p_lo if test.direction == "greater" else p_hi if test.direction == "less" else max(p_lo, p_hi)
        return {**base, "estimate": med, "ci": None, "p": p, "p_low": p_lo, "p_high": p_hi,
                "counts": {"above_low": above_lo, "below_low": below_lo, "above_high": above_hi,
                           "below_high": below_hi}, "computable": True}
    if n < 2:
        est = float(finite[0]) if n else math.nan
        return {**base, "estimate": est, "ci": None, "p": math.nan, "computable": False}
    m = float(finite.mean())
    sd = float(finite.std(ddof=1))
    if sd == 0:  # all values equal: no t statistic (0/0 or +-inf), so no evidence: p = 1, never a pass
        return {**base, "estimate": m, "sd": 0.0, "ci": [m, m], "p": 1.0, "computable": True,
                "note": "all values equal (sd = 0): no test statistic, p set to 1 (a deterministic row is exact)"}
    # the one-sample t-test (method "t")
    se = sd / math.sqrt(n)
    dist = stats.t(n - 1)
    p, p_lo, p_hi = _one_sided_p(test.direction, dist, (m - lo) / se, (m - hi) / se)
    half = float(dist.ppf(1 - alpha)) * se
    return {**base, "estimate": m, "sd": sd, "se": se, "df": n - 1, "ci": [m - half, m + half], "p": p,
            "p_low": p_lo, "p_high": p_hi, "mde": min_detectable_effect(finite, alpha), "computable": True}


def min_detectable_effect(values=None, alpha: float = ALPHA, power: float = POWER, *, se: float | None = None) -> float:
    """The minimum detectable effect: how far beyond the margin (for an equivalence test: how far inside each bound)
    the true mean must lie for the one-sided test at level ``alpha`` to pass with probability ``power``.

    - ``values`` (one per seed): the one-sample t-test at this n and spread. The exact solution of
      ``P(T'_{n-1}(delta) > t_{1-alpha, n-1}) = power`` for the noncentral t with noncentrality
      ``delta = mde sqrt(n) / sd`` (:func:`scipy.stats.nct`); close to the textbook
      ``(t_{1-alpha, n-1} + t_{power, n-1}) sd / sqrt(n)`` and, for large n, to ``(z_{1-alpha} + z_power) sd/sqrt(n)``.
    - ``se`` (a z test on an estimate with known standard error): ``(z_{1-alpha} + z_power) se`` exactly.

    NaN with fewer than 2 finite values or no spread. It is the level alpha of one test, before Holm's correction
    (a Holm family needs more). For TOST each bound is one such one-sided test, so a mean this far inside both bounds
    passes each with probability ``power`` (both together somewhat less when the band is narrow)."""
    if not 0 < alpha < 0.5 or not 0 < power < 1:
        raise ValueError(f"alpha must be in (0, 0.5) and power in (0, 1), got alpha={alpha!r}, power={power!r}")
    if se is not None:
        if values is not None:
            raise ValueError("give values (a t-test) or se (a z test), not both")
        se = float(se)
        if not (math.isfinite(se) and se > 0):
            return math.nan
        return float((stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)) * se)
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = x.size
    if n < 2:
        return math.nan
    sd = float(x.std(ddof=1))
    if not sd > 0:
        return math.nan
    return _t_noncentrality(n, float(alpha), float(power)) * sd / math.sqrt(n)


@functools.lru_cache(maxsize=256)
def _t_noncentrality(n: int, alpha: float, power: float) -> float:
    """The noncentrality delta with P(T'_{n-1}(delta) > t_{1-alpha, n-1}) = power (depends on n, alpha, power only)."""
    from scipy.optimize import brentq

    df, crit = n - 1, float(stats.t.ppf(1 - alpha, n - 1))
    hi = 10.0 * (crit + float(stats.norm.ppf(power))) + 10.0
    return float(brentq(lambda d: float(stats.nct.sf(crit, df, d)) - power, 0.0, hi, xtol=1e-12, rtol=1e-12))


def reading(result: Mapping, alpha: float = ALPHA) -> str:
    """How a test's outcome reads: ``pass``; ``refuted`` when the evidence is on the other side -- the interval
    (at 1 - 2 alpha, before Holm's correction) lies entirely on the other side of the margin, i.e. the effect is
    significantly smaller than the smallest effect that counts (this includes an effect shown equivalent to none);
    for an equivalence claim, the interval lies entirely outside the band; for the sign test, the one-sided sign test
    in the opposite direction rejects at alpha; for an exact row, the value is on the wrong side -- else
    ``inconclusive`` (the interval spans the margin, too few values, all values equal, or a pass lost only to Holm's
    correction: more seeds could decide)."""
    if result.get("passed"):
        return "pass"
    if not result.get("computable"):
        return "inconclusive"
    direction, margin = result["direction"], result["margin"]
    lo_m, hi_m = (margin[0], margin[1]) if direction == "equivalent" else (margin, margin)
    if result["method"] == "exact" or (result["method"] == "z" and result.get("se") == 0.0):  # no sampling error
        return "refuted" if math.isfinite(result["estimate"]) else "inconclusive"
    if result["method"] == "sign":
        c = result["counts"]
        below = float(stats.binom.sf(c["below_low"] - 1, c["above_low"] + c["below_low"], 0.5)) \
            if c["above_low"] + c["below_low"] else 1.0  # median < low
        above = float(stats.binom.sf(c["above_high"] - 1, c["above_high"] + c["below_high"], 0.5)) \
            if c["above_high"] + c["below_high"] else 1.0  # median > high
        if direction == "greater":
            return "refuted" if below <= alpha else "inconclusive"
        if direction == "less":
            return "refuted" if above <= alpha else "inconclusive"
        return "refuted" if min(below, above) <= alpha else "inconclusive"
    ci = result.get("ci")
    if ci is None or result.get("sd") == 0.0:
        return "inconclusive"  # no interval, or no spread: no evidence either way
    lo, hi = ci
    if direction == "greater":
        return "refuted" if hi <= lo_m else "inconclusive"
    if direction == "less":
        return "refuted" if lo >= hi_m else "inconclusive"
    return "refuted" if hi <= lo_m or lo >= hi_m else "inconclusive"


def _fmt_num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3g}"


def _fmt_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"

"""The ``lora-theory stats`` command: judge a claim on a results table with the gallery's criteria
(:mod:`lora_theory.claims` over :mod:`figures.criteria`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

HELP = "judge a claim on a results table (yours or a sweep's) with the gallery's declared-criterion statistics"
DESCRIPTION = """\
Test a claim such as "method A beats method B by more than a margin" on a results table (Parquet, CSV, TSV or
JSON, one row per run: a sweep's runs.parquet, or a table you made elsewhere with columns such as method, seed,
task and a metric), the way the gallery judges its figures: one value per independent unit (the pairing key,
usually the seed), a one-sided test or an equivalence test (two one-sided tests) against a declared margin,
Holm's correction over several tests, and a verdict rule. Each test is printed with its estimate, its interval,
p and the Holm-adjusted p, the minimum detectable effect, and refuted or inconclusive where it fails; comparisons
also get the probability of improvement P(A beats B) with its interval. The exit status is 0 whatever the
verdict (the verdict is in the output), 2 for bad input.

The claim comes from a YAML or JSON file (--criterion; the format is described in the lora_theory.claims module
and the README), or, for one comparison, from the one-line form:

  lora-theory stats results/runs.parquet --metric final_test_acc --compare variant=rslora,lora --pair seed
  lora-theory stats scores.csv --metric score --compare method=ours,baseline --pair seed --average task \
--equivalent --margin 0.5"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", type=Path, help="the results table (.parquet, .csv, .tsv, .json or .jsonl)")
    parser.add_argument("--criterion", type=Path, default=None,
                        help="a YAML or JSON file declaring the tests, the pairing key and the verdict rule")
    parser.add_argument("--metric", help="one-line form: the metric column (e.g. final_test_acc)")
    parser.add_argument("--compare", metavar="COLUMN=A,B",
                        help="one-line form: the two arms compared, A minus B (e.g. variant=rslora,lora)")
    parser.add_argument("--trend", metavar="COLUMN",
                        help="one-line form: test the slope of the metric against this numeric column instead "
                             "(with --compare: the slope of A minus the slope of B)")
    parser.add_argument("--log-x", action="store_true", help="with --trend: the slope against ln of the column")
    parser.add_argument("--log-y", action="store_true", help="with --trend: the slope of ln of the metric")
    parser.add_argument("--pair", default="seed",
                        help="one-line form: the column(s) naming the independent unit, comma-separated "
                             "(default: seed)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[,VALUE]",
                        help="one-line form: keep only these rows (repeatable), e.g. --where dataset=mnist")
    parser.add_argument("--average", default="",
                        help="one-line form: columns to average over within a unit and arm first, comma-separated "
                             "(e.g. a task or a grid cell)")
    parser.add_argument("--margin", type=float, default=None,
                        help="one-line form: the margin (default 0; for --equivalent the band -margin..margin, "
                             "required)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--greater", dest="direction", action="store_const", const="greater",
                      help="claim: the difference (or slope) exceeds the margin (the default)")
    side.add_argument("--less", dest="direction", action="store_const", const="less",
                      help="claim: the difference (or slope) is below the margin")
    side.add_argument("--equivalent", dest="direction", action="store_const", const="equivalent",
                      help="claim: the difference lies within -margin..margin (two one-sided tests)")
    parser.add_argument("--method", choices=("t", "sign"), default="t",
                        help="one-line form: the test over units (default t; sign test on the median, for heavy "
                             "tails; there is no bootstrap test: at 10 units it rejects a true null too often)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="one-line form: the level (default 0.05; intervals are two-sided at 1 - 2 alpha)")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the result as JSON")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw the per-unit values with each test's interval and margin into this PNG")


def _one_line_spec(args: argparse.Namespace) -> dict:
    from lora_theory.claims import ClaimError

    if not args.metric:
        raise ClaimError("give --criterion FILE, or the one-line form with --metric COLUMN and --compare "
                         "COLUMN=A,B (or --trend COLUMN)")
    if not args.compare and not args.trend:
        raise ClaimError("the one-line form needs --compare COLUMN=A,B or --trend COLUMN")
    direction = args.direction or "greater"
    if direction == "equivalent" and not args.margin:
        raise ClaimError("--equivalent needs --margin M > 0 (the band -M..M declared before looking)")
    test = {"name": "claim", "direction": direction, "margin": 0.0 if args.margin is None else args.margin,
            "method": args.method}
    if args.compare:
        if "=" not in args.compare:
            raise ClaimError(f"--compare must be COLUMN=A,B, got {args.compare!r}")
        col, arms = args.compare.split("=", 1)
        arms = [a.strip() for a in arms.split(",")]
        if len(arms) != 2 or not all(arms):
            raise ClaimError(f"--compare must name two arms, COLUMN=A,B, got {args.compare!r}")
        test["compare"] = {col.strip(): arms}
        test["name"] = f"{arms[0]}_vs_{arms[1]}"
    if args.trend:
        test.update(trend=args.trend, log_x=args.log_x, log_y=args.log_y)
        test["name"] = f"trend_{args.trend}" if not args.compare else f"{test['name']}_trend_{args.trend}"
    where = {}
    for item in args.where:
        if "=" not in item:
            raise ClaimError(f"--where must be COLUMN=VALUE[,VALUE], got {item!r}")
        col, values = item.split("=", 1)
        vals = [v.strip() for v in values.split(",")]
        where[col.strip()] = vals if len(vals) > 1 else vals[0]
    return {"metric": args.metric, "pair": args.pair, "average": args.average or None, "where": where,
            "alpha": args.alpha, "tests": [test]}


def _num(v, spec: str = ".4g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}"


def report(judgement) -> str:
    """The text output: one block per test, then the verdict."""
    d = judgement.as_dict()
    alpha = judgement.spec.alpha
    lines = [f"claim tests ({'Holm-corrected, ' if judgement.spec.correction == 'holm' and len(d['tests']) > 1 else ''}"
             f"family-wise alpha = {alpha:g}; intervals {100 * (1 - 2 * alpha):g}% two-sided):"]
    for t in d["tests"]:
        ci = t.get("ci")
        role = " (sanity: not counted)" if t["role"] == "sanity" else ""
        lines.append(f"- {t['name']}{role}: {t['hypothesis']} ({t['method']}, n = {t['n']})")
        q = next(x for x in judgement.spec.tests if x.name == t["name"]).describe_quantity()
        lines.append(f"    quantity: {q}")
        lines.append(f"    estimate {_num(t.get('estimate'))}  interval [{_num(ci[0]) if ci else 'n/a'}, "
                     f"{_num(ci[1]) if ci else 'n/a'}]  p = {_num(t.get('p'), '.3g')}  Holm p = "
                     f"{_num(t.get('p_adjusted'), '.3g')}  MDE = {_num(t.get('mde'), '.3g')}")
        poi = t.get("probability_of_improvement")
        if poi:
            col, a, b = next(x for x in judgement.spec.tests if x.name == t["name"]).compare
            pci = poi.get("ci")
            lines.append(f"    P({col}={a} beats {col}={b}) = {poi['estimate']:.3f}"
                         + (f" [{pci[0]:.3f}, {pci[1]:.3f}]" if pci else ""))
        lines.append(f"    {'PASS' if t['result'] == 'pass' else 'FAIL: ' + t['result']}")
    lines.append(f"verdict: {d['verdict']}" + (f" ({d['reason']})" if d["reason"] else "")
                 + f"  [rule: {judgement.criterion.rule.describe().replace('`', '')}]")
    return "\n".join(lines)


def plot(judgement, path: Path) -> None:
    """Per test: the per-unit values (dots), the estimate with its interval, and the margin (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = judgement.as_dict()
    n = len(d["tests"])
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), layout="constrained", squeeze=False)
    for ax, t in zip(axes[0], d["tests"], strict=True):
        v = np.asarray(t["values"], dtype=float)
        jitter = np.random.default_rng(0).uniform(-0.08, 0.08, v.size)
        ax.scatter(jitter, v, s=14, color="0.45", zorder=3, label="per unit")
        if t.get("ci"):
            est = t["estimate"]
            ax.errorbar([0.3], [est], yerr=[[est - t["ci"][0]], [t["ci"][1] - est]], fmt="o", color="C0", capsize=4,
                        label=f"estimate, {100 * t['confidence']:g}% interval")
        m = t["margin"]
        if isinstance(m, list):
            ax.axhspan(m[0], m[1], color="C2", alpha=0.15, label="equivalence band")
        else:
            ax.axhline(m, color="C3", lw=1, ls="--", label=f"margin ({t['direction']})")
        q = next(x for x in judgement.spec.tests if x.name == t["name"]).describe_quantity()
        ax.set_ylabel("\n".join(textwrap.wrap(q, 48)), fontsize=7)
        ax.set_xlim(-0.4, 0.6)
        ax.set_xticks([])
        ax.set_title(f"{t['name']}: {t['result'].upper()}", fontsize=9)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"verdict: {d['verdict']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from lora_theory import claims

    try:
        spec = claims.load_spec(args.criterion) if args.criterion else claims.parse_spec(_one_line_spec(args))
        table = claims.load_table(args.table)
        judgement = claims.judge(table, spec)
    except claims.ClaimError as exc:
        print(f"lora-theory stats: error: {exc}", file=sys.stderr)
        return 2
    print(report(judgement))
    if args.json_out:
        from analysis.jsonable import to_jsonable

        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(to_jsonable(judgement.as_dict()), indent=2))
        print(f"wrote {args.json_out}")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(judgement, args.plot)
        print(f"wrote {args.plot}")
    return 0

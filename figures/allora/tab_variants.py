"""ALLoRA tables 1, 2, 4 (toy analogue): final test accuracy of ALLoRA against LoRA, LoRA x eta, ALLoRA+D,
ALLoRA-OD, ASF-LoRA and DoRA after short fine-tuning, over ranks and eta^2."""

from __future__ import annotations

import itertools
import math

import numpy as np

from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_dict, fmt_ci
from figures.framework import Measurement, Protocol, diverged
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-tab-variants"
PAPER = "ALLoRA tables 1, 2, 4"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("after short fine-tuning ALLoRA has the best accuracy on average among LoRA, LoRA x eta, ALLoRA-OD, ASF-LoRA "
         "and DoRA, and is comparable to ALLoRA+D, over ranks and eta^2 in {1, 2, 4}")

VARIANTS = ("LoRA", "LoRA x eta", "ALLoRA", "ALLoRA+D", "ALLoRA-OD", "ASF-LoRA", "DoRA")
DROPOUT = 0.05

OTHERS = tuple(n for n in VARIANTS if n not in ("ALLoRA", "ALLoRA+D"))
BEATS = {n: "beats_" + n.replace(" x ", "_x_").replace("-", "_").replace(" ", "_") for n in OTHERS}

# ALLoRA table 2 right: ALLoRA - ALLoRA+D, which the paper calls "no evident difference" / "comparable", averages
# 0.10%, 0.07% and 0.00% over its eta^2 columns (0.06% overall): a gain up to 0.1 pp is, in the paper's words, no
# difference, so "better" needs more. Its row averages (one model and data set, over eta^2, like our grid mean over
# ranks and eta^2) reach 0.41% (Qwen2-0.5b:rott) and are still "comparable": the equivalence band.
BETTER_PP = 0.1
COMPARABLE_PP = 0.41

CRITERION = Criterion(
    tests=tuple(Test(BEATS[n], f"ALLoRA - {n}: grid-mean final test accuracy (pp), paired by seed", "greater",
                     margin=BETTER_PP, margin_from="paper",
                     why="ALLoRA better on average by more than 0.1 pp: table 2 right's column averages of 0.00-0.10% "
                         "are what the paper calls 'no evident difference'") for n in OTHERS)
    + (Test("comparable_ALLoRA_D", "ALLoRA - ALLoRA+D: grid-mean final test accuracy (pp), paired by seed",
            "equivalent", margin=COMPARABLE_PP, margin_from="paper",
            why="the largest average the paper calls 'comparable': table 2 right, row Qwen2-0.5b:rott, 0.41% (a "
                "row averages one model and data set over eta^2, as our grid mean does over ranks and eta^2)"),),
    rule=Rule(reproduced=(*BEATS.values(), "comparable_ALLoRA_D"),
              partially=tuple(g for g in itertools.combinations(BEATS.values(), 3))),
    note="Partially reproduced: ALLoRA beats at least 3 of the 5 other methods (Holm-corrected). The paper names no "
         "optimizer (sec. 4.4 states l_b = 1e-4 for its LLMs only): the headline combines SGD and Adam at the "
         "shared base rates; the learning rate x1/3 and x3 are robustness protocols.",
    recalibrations=(Recalibration(
        old="reproduced if ALLoRA ranks first and every paired CI (incl. ALLoRA+D) is > 0; partially if it ranks "
            "first or beats half; no multiplicity correction over 12 intervals; figure reproduced only if Adam "
            "and SGD agree",
        new="5 one-sided tests ALLoRA - X > 0 and a TOST ALLoRA - ALLoRA+D within +-1 pp, Holm over the 6 per "
            "protocol; optimizer and learning rate as protocols",
        why="the paper calls ALLoRA and ALLoRA+D comparable, so demanding that ALLoRA beat it tests the opposite "
            "claim; 6 intervals at 95% each give a ~26% chance of one false pass"),
        Recalibration(
        old="ALLoRA - X > 0 pp; ALLoRA - ALLoRA+D within +-1 pp ('per-cell gaps up to 0.69 pp, rounded up'); Adam "
            "the headline ('LLM practice')",
        new="ALLoRA - X > 0.1 pp; ALLoRA - ALLoRA+D within +-0.41 pp; headline combined over SGD and Adam",
        why="issue 16: minimum effects from the paper's table 2 right (averages up to 0.10% are 'no evident "
            "difference', row averages up to 0.41% 'comparable'), not rounded; the paper names no optimizer"),))

_PLAUSIBLE = "the paper names no optimizer (sec. 4.4: l_b = 1e-4 for its LLMs): plausible"
PROTOCOLS = (
    Protocol("adam", {"optimizer": "adam", "l_b": 1e-3}, primary=True, plausible=True,
             note=f"{_PLAUSIBLE}; Adam at the shared base rate"),
    Protocol("sgd", {"optimizer": "sgd", "l_b": 0.03}, plausible=True,
             note=f"{_PLAUSIBLE}; SGD (the setting of the paper's argument; l_b as in allora-fig5-escape)"),
    Protocol("adam lr x1/3", {"optimizer": "adam", "l_b": round(1e-3 / 3, 8)}, note="base rate x1/3"),
    Protocol("adam lr x3", {"optimizer": "adam", "l_b": 3e-3}, note="base rate x3"),
)


def _grid(ctx):
    """(steps, ranks, eta2s): default is a reduced grid so that 10 seeds x 7 methods fit the CPU budget (--large:
    the paper's grid)."""
    return (ctx.pick(quick=30, default=100, large=300), ctx.pick(quick=(4, 16), default=(4, 64), large=(4, 8, 16, 32, 64)),
            ctx.pick(quick=(4.0,), default=(1.0, 4.0), large=(1.0, 2.0, 4.0)))


def _base(ctx):
    steps = _grid(ctx)[0]
    return base_config(ctx, "mnist", steps=steps, record_every=steps, recorders=("loss",),
                       optimizer=ctx.settings["optimizer"])


def variant_config(base, name: str, r: int, eta: float, l_b: float, p: float):
    """One cell of the toy tables, following ALLoRA sec. 4.4-4.5 and tables 6-7: LoRA and DoRA at lr eta l_b
    with a fixed scaling 1 and dropout p; LoRA x eta at lr l_b with scaling eta and dropout p; the adaptive family
    (ALLoRA, ALLoRA-OD, ASF-LoRA) at base lr l_b with eta and no dropout; ALLoRA+D the same with dropout p."""
    common = dict(r=r)
    if name == "LoRA":
        return base.replace(method="lora", scaling=1.0, lr=eta * l_b, dropout=p, **common)
    if name == "LoRA x eta":
        return base.replace(method="lora", scaling=float(eta), lr=l_b, dropout=p, **common)
    if name == "DoRA":
        return base.replace(method="dora", scaling=1.0, lr=eta * l_b, dropout=p, **common)
    method = {"ALLoRA": "allora", "ALLoRA+D": "allora+d", "ALLoRA-OD": "allora_od", "ASF-LoRA": "asf"}[name]
    return base.replace(method=method, eta=float(eta), lr=l_b, dropout=p if name == "ALLoRA+D" else 0.0, **common)


def configs(ctx) -> dict:
    base, (_, ranks, eta2s), l_b = _base(ctx), _grid(ctx), float(ctx.settings["l_b"])
    return {(n, r, e2): variant_config(base, n, r, float(np.sqrt(e2)), l_b, DROPOUT)
            for e2 in eta2s for r in ranks for n in VARIANTS}


def variants_table(acc: dict, cells: list, ranks, eta2s) -> dict:
    """Per-method accuracy, ranking and paired differences ALLoRA - X of one optimizer's grid (the verdict is
    :data:`CRITERION`'s).

    ``acc[name]`` is (seeds, cells) final test accuracy in %, diverged runs already replaced by chance (10%).
    The CI is over seeds (the independent unit: each seed has its own pretrained model and data split) of the
    grid-mean accuracy (or of the grid-mean paired difference)."""
    per_method = {n: ci_dict(acc[n].mean(axis=1)) for n in VARIANTS}
    order = sorted(VARIANTS, key=lambda n: -per_method[n]["mean"])
    others = [n for n in VARIANTS if n != "ALLoRA"]
    diffs = {n: ci_dict((acc["ALLoRA"] - acc[n]).mean(axis=1)) for n in others}
    for n in others:
        cell_means = (acc["ALLoRA"] - acc[n]).mean(axis=0)
        diffs[n]["cells_won"] = int(np.sum(cell_means > 0))
        diffs[n]["cells"] = len(cells)
        # the paper's table format: mean over seeds of ALLoRA - X per (eta^2, rank)
        diffs[n]["table_pp"] = {f"eta2={e2:g}": {f"r={r}": float(cell_means[cells.index((r, e2))]) for r in ranks}
                                for e2 in eta2s}
    sig_better = [n for n in others if diffs[n]["ci_low"] > 0]
    rank = order.index("ALLoRA") + 1
    return {
        "accuracy_pct": per_method,
        "ranking": order,
        "allora_rank": rank,
        "allora_minus_other_pp": diffs,
        "significantly_better_than": sig_better,
        "significantly_worse_than": [n for n in others if diffs[n]["ci_high"] < 0],
        "accuracy_by_rank_pct": {n: {f"r={r}": ci_dict(np.mean([acc[n][:, cells.index((r, e2))] for e2 in eta2s],
                                                                axis=0)) for r in ranks} for n in VARIANTS},
        "accuracy_by_eta2_pct": {n: {f"eta2={e2:g}": ci_dict(np.mean([acc[n][:, cells.index((r, e2))]
                                                                       for r in ranks], axis=0)) for e2 in eta2s}
                                 for n in VARIANTS},
    }


def measure(ctx, runs) -> Measurement:
    steps, ranks, eta2s = _grid(ctx)
    opt, l_b, base = ctx.settings["optimizer"], float(ctx.settings["l_b"]), _base(ctx)
    cells = [(r, e2) for e2 in eta2s for r in ranks]
    acc = {n: np.array([[math.nan if diverged(h) else 100.0 * float(h["test_acc"][-1]) for h in runs[(n, r, e2)]]
                        for r, e2 in cells]).T for n in VARIANTS}  # (seeds, cells)
    n_diverged = {n: int(np.isnan(acc[n]).sum()) for n in VARIANTS}
    acc = {n: np.where(np.isnan(a), 10.0, a) for n, a in acc.items()}  # diverged -> chance accuracy
    table = variants_table(acc, cells, ranks, eta2s)
    table.update({"optimizer": opt, "l_b": l_b, "diverged_runs": n_diverged,
                  "grid": {"ranks": list(ranks), "eta2": list(eta2s), "steps": steps, "n_seeds": len(ctx.seeds)}})
    samples = {BEATS[n]: (acc["ALLoRA"] - acc[n]).mean(axis=1) for n in OTHERS}
    samples["comparable_ALLoRA_D"] = (acc["ALLoRA"] - acc["ALLoRA+D"]).mean(axis=1)
    pm = table["accuracy_pct"]
    div = sum(n_diverged.values())
    summary = (f"{opt.upper()} l_b = {l_b:g}, {steps} steps, ranks {list(ranks)} x eta^2 {[float(e) for e in eta2s]}, "
               f"{len(ctx.seeds)} seeds: ALLoRA ranks {table['allora_rank']} of {len(VARIANTS)} at "
               f"{pm['ALLoRA']['mean']:.2f}% (best {table['ranking'][0]} {pm[table['ranking'][0]]['mean']:.2f}%); "
               f"ALLoRA - X (pp, {CI_PCT} CI): " + "; ".join(f"{n} {fmt_ci(d, '+.2f')}"
                                                      for n, d in table["allora_minus_other_pp"].items())
               + (f"; {div} diverged runs counted at chance (10%)" if div else "") + ".")
    key = {"allora_rank": table["allora_rank"], "best": table["ranking"][0],
           **{f"ALLoRA - {n} (pp)": d["mean"] for n, d in table["allora_minus_other_pp"].items()}}
    config = {"base": base.as_dict(), "ranks": list(ranks), "eta2": list(eta2s), "dropout": DROPOUT, "optimizer": opt,
              "l_b": l_b, "seeds": list(ctx.seeds),
              "variants": {
                  "LoRA": "method=lora, scaling=1.0, lr=eta*l_b, dropout=p",
                  "LoRA x eta": "method=lora, scaling=eta, lr=l_b, dropout=p",
                  "ALLoRA": "method=allora, eta, lr=l_b, dropout=0",
                  "ALLoRA+D": "method=allora+d, eta, lr=l_b, dropout=p",
                  "ALLoRA-OD": "method=allora_od, eta, lr=l_b, dropout=0",
                  "ASF-LoRA": "method=asf, eta, lr=l_b, dropout=0",
                  "DoRA": "method=dora, scaling=1.0, lr=eta*l_b, dropout=p"},
              "diverged_runs": "counted at chance accuracy (10%)",
              "reduced_grid": "default fidelity: ranks (4, 64) x eta^2 (1, 4), 100 steps (CPU budget with 10 seeds); "
                              "--large runs the paper's (4, 8, 16, 32, 64) x (1, 2, 4) with 300 steps"}
    numbers = {"optimizer": opt, "l_b": l_b, "steps": steps, "ranks": ranks, "eta2s": eta2s,
               **{k: table[k] for k in ("accuracy_by_rank_pct", "accuracy_by_eta2_pct", "allora_minus_other_pp")}}
    return Measurement(samples=samples, measured=table, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(3, width=4.3, height=3.5)
    palette = dict(zip(VARIANTS, colors(len(VARIANTS)), strict=True))
    opt, l_b = numbers["optimizer"].upper(), numbers["l_b"]
    for ax, (axis_vals, k, label, fmt_key) in zip(
            axes[0, :2], ((numbers["ranks"], "accuracy_by_rank_pct", "LoRA rank r", "r={}"),
                          (numbers["eta2s"], "accuracy_by_eta2_pct", "eta^2", "eta2={:g}")), strict=True):
        for j, n in enumerate(VARIANTS):
            d = [numbers[k][n][fmt_key.format(v)] for v in axis_vals]
            x = np.arange(len(axis_vals)) + (j - 3) * 0.06
            ax.errorbar(x, [v["mean"] for v in d], yerr=[[v["mean"] - v["ci_low"] for v in d],
                                                         [v["ci_high"] - v["mean"] for v in d]],
                        fmt="-o", ms=3, lw=1.8 if n == "ALLoRA" else 0.9, color=palette[n], label=n, capsize=2)
        ax.set_xticks(np.arange(len(axis_vals)), [f"{v:g}" for v in axis_vals])
        ax.set_xlabel(label)
        ax.set_ylabel(f"test accuracy after {numbers['steps']} steps (%)")
    axes[0, 0].set_title(f"{opt} l_b = {l_b:g}: mean over eta^2 ({CI_PCT} CI, seeds)", fontsize=9)
    axes[0, 1].set_title(f"{opt}: mean over ranks ({CI_PCT} CI, seeds)", fontsize=9)
    ax = axes[0, 2]
    others = [n for n in VARIANTS if n != "ALLoRA"]
    for i, n in enumerate(others):
        d = numbers["allora_minus_other_pp"][n]
        ax.errorbar([d["mean"]], [i], xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                    color=palette[n], capsize=3)
    ax.axvline(0.0, color="0.3", lw=1)
    ax.axvspan(-COMPARABLE_PP, COMPARABLE_PP, color="0.85", alpha=0.5, lw=0, label="ALLoRA+D equivalence margin")
    ax.set_yticks(range(len(others)), [f"ALLoRA - {n}" for n in others], fontsize=8)
    ax.set_xlabel("paired accuracy difference (percentage points)")
    ax.set_title(f"{opt}: grid mean, {CI_PCT} CI over seeds", fontsize=9)
    ax.legend(fontsize=6)
    axes[0, 0].legend(fontsize=6.5)
    return fig

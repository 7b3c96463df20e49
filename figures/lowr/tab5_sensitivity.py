"""LoWR tables 5-6: sensitivity to LoWR's hyper-parameters (tau, alpha, the rescaling period) against the LoRA
baseline, and LoWR + LoRA+ against LoRA+ (the shared runs of the LoWR figures), with a diagnosis of the runs that
diverge."""

from __future__ import annotations

import math

import numpy as np

from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_dict, ci_finite, fmt_ci, mean_ci
from figures.framework import Measurement, diverged, floats, require_datasets
from figures.lowr.protocol import (
    ALPHAS,
    CHANCE,
    DATASET,
    DIVERGED,
    DIVERGENCE_MECHANISM,
    GAIN_PP,
    GAIN_WHY,
    MAIN_LOWR,
    config_record,
    divergence_diagnosis,
    optimizer_protocols,
    rank,
    shared_config,
)
from figures.style import colors, new_figure

ID = "lowr-tab5-sensitivity"
PAPER = "LoWR tables 5-6"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("LoWR is robust to its hyper-parameters and moderate settings beat the LoRA baseline (table 5: with a "
         "finite threshold tau, over two alphas and rescaling every 1 or 5 steps), and LoWR + LoRA+ beats LoRA+ "
         "(table 6)")

LORA_PLUS_RATIO = 16.0  # LoRA+'s recommended lr ratio lambda = 2^4 (Hayou et al. 2024)

GRID = [(t, a, 1) for t in (math.inf, 10.0, 100.0) for a in ALPHAS] + [(math.inf, ALPHAS[0], 5),
                                                                            (10.0, ALPHAS[0], 5)]


def grid_of(ctx) -> list[tuple[float, float, int]]:
    """Every tau x alpha rescaling every step, plus every 5 steps at the main alpha for tau in {inf, 10}: 8 of the
    paper's 12 settings (the CPU budget with 10 seeds), the same at every fidelity (the criterion declares them)."""
    return list(GRID)


def moderate(grid) -> list[tuple[float, float, int]]:
    """The settings with a finite threshold tau: sec. 4.1 'the ratio ||a_i|| / ||b_i|| should be bounded'; table 5's
    tau = inf, every step is its one setting far below the baseline (83.00% vs 86.13%)."""
    return [g for g in grid if math.isfinite(g[0])]


def setting_name(tau: float, alpha: float, every: int) -> str:
    return f"noninferior_tau={tau:g}_alpha={alpha:g}_every={every}"


ROBUST_PP = 0.19  # table 5: the worst finite-tau setting, tau = 100, alpha = 0.01, every step: 85.94% vs 86.13%


def criterion(grid) -> Criterion:
    mod = moderate(grid)
    tests = tuple(Test(setting_name(*g), f"LoWR(tau={g[0]:g}, alpha={g[1]:g}, every {g[2]}) - LoRA: final test "
                       "accuracy (pp), paired by seed, a diverged seed at chance", "greater", margin=-ROBUST_PP,
                       margin_from="paper",
                       why=f"robust = no worse than -{ROBUST_PP:g} pp, table 5's worst finite-tau setting (tau = 100, "
                           "alpha = 0.01, every step: 85.94% vs the baseline's 86.13%), which the paper counts as "
                           "robust") for g in mod)
    tests += (Test("moderate_beats", f"mean over the {len(mod)} finite-tau settings of LoWR - LoRA: final test "
                   "accuracy (pp), paired by seed, a diverged seed at chance", "greater", margin=GAIN_PP,
                   margin_from="paper", why="'moderate hyperparameter setting typically achieves better "
                                            "performance' (app. A.2); " + GAIN_WHY),
              Test("plus_beats", "LoWR(main) + LoRA+ - LoRA+: final test accuracy (pp), paired by seed, a diverged "
                   "seed at chance", "greater", margin=GAIN_PP, margin_from="paper",
                   why="table 6: 86.19% -> 86.59% (+0.40 pp); " + GAIN_WHY))
    table5 = tuple(t.name for t in tests if t.name != "plus_beats")
    return Criterion(
        tests=tests, rule=Rule(reproduced=tuple(t.name for t in tests), partially=(table5, ("plus_beats",))),
        note="Partially reproduced: table 5's part (every finite-tau setting robust and their mean better than "
             "LoRA) or table 6's (LoWR + LoRA+ beats LoRA+). " + DIVERGED[0].upper() + DIVERGED[1:] + ". The tau = "
             "inf settings are run and reported, not tested: the paper claims moderate settings (table 5's own tau "
             "= inf, every step is 3.1 pp below its baseline). alpha is not scale-free (gamma - 1 grows with the 5th "
             "power of the channel norms), so the paper's DeBERTa values (1e-3, 1e-2) would do nothing here; the "
             "grid is its GSM8K one {0.1, 1}.",
        recalibrations=(
            Recalibration(
                old="reproduced if LoWR + LoRA+ beats LoRA+ (CI > 0) AND more than half of the 12 settings beat LoRA "
                    "(CI > 0); no multiplicity correction",
                new="non-inferiority (> -1 pp) of every setting and of LoWR + LoRA+, Holm over all of them; a "
                    "diverged seed counts at chance",
                why="the claim is 'matches or beats'; the old rule asked more than the paper's own table 5 shows (most "
                    "settings equal to the baseline), and 12 uncorrected intervals (withdrawn: see the next entry)"),
            Recalibration(
                old="claim 'LoWR + LoRA+ matches or beats LoRA+'; every setting incl. tau = inf and LoWR + LoRA+ "
                    "non-inferior at -1 pp (justified as '9 of 10 table-5 settings within 0.2 pp'); partially if the "
                    "main setting or LoWR + LoRA+ is non-inferior",
                new=f"the paper's claim restored: LoWR + LoRA+ - LoRA+ > {GAIN_PP:g} pp and the finite-tau settings' "
                    f"mean gain > {GAIN_PP:g} pp, each finite-tau setting > -{ROBUST_PP:g} pp (Holm over the 7); "
                    "partially if table 5's part or table 6's part holds; diverged seeds at chance",
                why="issue 16: the -1 pp margin was 2-5x the paper's effects and set after the 3-seed run failed; "
                    "table 5 has 5 of 10 settings within 0.2 pp, not 9; the margins now come from the paper's "
                    "tables (the smallest gain it calls an improvement, table 5's worst finite-tau setting)"),
        ))


CRITERION = criterion(GRID)
PROTOCOLS = optimizer_protocols()


def _keys(ctx) -> list[tuple]:
    return [()] + [(("lowr", g),) for g in grid_of(ctx)] + [(("lora_plus_ratio", LORA_PLUS_RATIO),),
                                                          (("lora_plus_ratio", LORA_PLUS_RATIO), ("lowr", MAIN_LOWR))]


def configs(ctx) -> dict:
    require_datasets(DATASET)
    return {k: shared_config(ctx, **ctx.settings, **dict(k)) for k in _keys(ctx)}


def measure(ctx, runs) -> Measurement:
    grid, keys, proto = grid_of(ctx), _keys(ctx), ctx.settings
    acc, diverged_at, diagnosis = {}, {}, {}
    for k in keys:
        vals = []
        for seed, h in zip(ctx.seeds, runs[k], strict=True):
            if diverged(h):
                diverged_at.setdefault(k, []).append(int(h["diverged_step"][0]))
                lowr = dict(k).get("lowr")
                if lowr is not None:
                    diagnosis.setdefault(repr(dict(k)), []).append(
                        {"seed": seed, "diverged_step": int(h["diverged_step"][0]),
                         **divergence_diagnosis(h, lowr[0], lowr[1])})
                vals.append(math.nan)
            else:
                vals.append(float(h["test_acc"][-1]))
        acc[k] = np.array(vals)

    def pp(a, b):  # paired difference in points, a diverged seed at chance
        return 100 * (np.where(np.isfinite(a), a, CHANCE) - np.where(np.isfinite(b), b, CHANCE))

    base = acc[()]
    rows, samples = [], {}
    for g in grid:
        a = acc[(("lowr", g),)]
        d = pp(a, base)
        samples[setting_name(*g)] = d
        rows.append({"tau": g[0], "alpha": g[1], "every": g[2], "test_acc": ci_finite(a),
                     "delta_vs_lora_pp": ci_dict(d), "diverged": int(np.sum(~np.isfinite(a))),
                     "diverged_at_steps": diverged_at.get((("lowr", g),), [])})
    plus, plus_lowr = acc[keys[-2]], acc[keys[-1]]
    samples["moderate_beats"] = np.mean([samples[setting_name(*g)] for g in moderate(grid)], axis=0)
    samples["plus_beats"] = pp(plus_lowr, plus)
    measured = {
        "rank": rank(ctx), "protocol": proto, "lora_test_acc": ci_finite(base), "grid": rows,
        "grid_settings": len(grid), "lora_plus_ratio": LORA_PLUS_RATIO, "lora_plus_test_acc": ci_finite(plus),
        "lora_plus_lowr_test_acc": ci_finite(plus_lowr), "lora_plus_lowr": list(MAIN_LOWR),
        "delta_lowr_plus_vs_lora_plus_pp": ci_dict(samples["plus_beats"]),
        "delta_moderate_mean_vs_lora_pp": ci_dict(samples["moderate_beats"]), "diverged_seed": DIVERGED,
        "lora_plus_lowr_diverged_at_steps": diverged_at.get(keys[-1], []),
        "divergence_diagnosis": diagnosis,
        "divergence_mechanism": DIVERGENCE_MECHANISM,
    }

    n_div = sum(r["diverged"] for r in rows)
    summary = (f"{ctx.protocol.name}: rank {rank(ctx)}, {len(ctx.seeds)} seeds, {len(grid)} settings: LoRA "
               f"{100 * np.nanmean(base):.2f}%; LoWR - LoRA (pp): "
               + "; ".join(f"tau={r['tau']:g}, alpha={r['alpha']:g}, every {r['every']}: "
                           f"{fmt_ci(r['delta_vs_lora_pp'])}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
                           for r in rows)
               + f". Mean over the finite-tau settings: {fmt_ci(measured['delta_moderate_mean_vs_lora_pp'])} pp"
               + f". LoWR + LoRA+ - LoRA+: {fmt_ci(measured['delta_lowr_plus_vs_lora_plus_pp'])} pp"
               + (f" ({len(measured['lora_plus_lowr_diverged_at_steps'])}/{len(ctx.seeds)} diverged, at steps "
                  f"{measured['lora_plus_lowr_diverged_at_steps']})" if measured["lora_plus_lowr_diverged_at_steps"]
                  else "")
               + "." + (" Before each divergence: " + "; ".join(
                   f"{k}: max ||a||/||b|| {np.median([d['first']['max_a_over_b'] for d in v]):.3g} -> "
                   f"{np.median([d['last']['max_a_over_b'] for d in v]):.3g}, max ||a_i|| "
                   f"{np.median([d['first']['max_norm_a'] for d in v]):.3g} -> "
                   f"{np.median([d['last']['max_norm_a'] for d in v]):.3g}, max gamma-1 per step -> "
                   f"{np.median([d['last']['max_gamma_minus_1'] for d in v]):.3g} (medians over diverged seeds)"
                   for k, v in diagnosis.items()) + ". Mechanism: " + measured["divergence_mechanism"]
                   if diagnosis else "")
               + (f" {n_div} LoWR runs diverged." if n_div else ""))
    key = {"settings_robust_point": int(sum(r["delta_vs_lora_pp"]["mean"] > -ROBUST_PP for r in rows)),
           "moderate_gain_pp": measured["delta_moderate_mean_vs_lora_pp"]["mean"],
           "diverged_runs": n_div + len(measured["lora_plus_lowr_diverged_at_steps"])}
    config = config_record(ctx, grid=[list(g) for g in grid], lora_plus_ratio=LORA_PLUS_RATIO,
                           lora_plus_lowr=list(MAIN_LOWR), protocol=proto, diverged_seed="counted at chance (10%)")
    numbers = {"grid": grid, "rows": [{"delta": r["delta_vs_lora_pp"], "diverged": r["diverged"]} for r in rows],
               "n_seeds": len(ctx.seeds), "protocol": ctx.protocol.name, "lora_pct": 100 * np.nanmean(base),
               "plus": [{"band": mean_ci(100 * v[np.isfinite(v)]) if np.isfinite(v).any() else None,
                         "diverged": int(np.sum(~np.isfinite(v))), "n": int(v.size)} for v in (plus, plus_lowr)]}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=5.0, height=3.6, gridspec_kw={"width_ratios": [3, 1]})
    ax, cl = axes[0, 0], colors(3)
    # the y range of the settings without a diverged seed and the margin; a setting whose mean lies below (its
    # diverged seeds at chance) is an arrow at the bottom with its mean, so the margin stays readable
    kept = [r["delta"] for r in numbers["rows"] if not r["diverged"]] or [r["delta"] for r in numbers["rows"]]
    lo = min(-ROBUST_PP, *(d["ci_low"] for d in kept))
    hi = max(GAIN_PP, *(d["ci_high"] for d in kept))
    ylo, yhi = lo - 0.35 * (hi - lo), hi + 0.15 * (hi - lo)
    for i, row in enumerate(numbers["rows"]):
        d = row["delta"]
        col = cl[2] if d["ci_low"] > -ROBUST_PP else cl[1]
        div = f"{row['diverged']}/{numbers['n_seeds']} diverged" if row["diverged"] else ""
        if d["mean"] < ylo:
            ax.plot(i, ylo, marker="v", ms=8, color=col, clip_on=False)
            ax.annotate(f"mean {d['mean']:.1f}\n(off scale)\n{div}".strip(), (i, ylo), xytext=(0, 6),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6, color=col)
            continue
        ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o", capsize=3,
                    color=col)
        if div:
            ax.annotate(div.replace(" ", "\n"), (i, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=6, color=cl[1])
    ax.set_ylim(ylo, yhi)
    ax.axhline(0, color="grey", lw=1)
    ax.axhline(-ROBUST_PP, color="grey", lw=1, ls="--", label=f"robust: > -{ROBUST_PP:g} pp (table 5)")
    ax.axhline(GAIN_PP, color="grey", lw=1, ls=":", label=f"better: > {GAIN_PP:g} pp (table 2)")
    ax.set_xticks(range(len(numbers["grid"])), [f"tau={float(t):g}\nalpha={a:g}\nevery {e}"
                                                 + ("" if math.isfinite(float(t)) else "\n(reported)")
                                                 for t, a, e in numbers["grid"]], fontsize=6)
    ax.set_ylabel(f"test accuracy, LoWR - LoRA\n(points, {CI_PCT} CI;\ndiverged seeds at chance)", fontsize=8)
    ax.set_title(f"table 5 analogue, {numbers['protocol']} (LoRA: {numbers['lora_pct']:.2f}%)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[0, 1]
    for i, p in enumerate(numbers["plus"]):
        if p["band"] is not None:
            m, lo, hi = floats(p["band"])
            ax.errorbar(i, m, yerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color=cl[i])
        if p["diverged"]:
            ax.annotate(f"{p['diverged']}/{p['n']}\ndiverged", (i, 0.5), xycoords=("data", "axes fraction"),
                        ha="center", fontsize=7, color=cl[1])
    ax.set_xticks([0, 1], ["LoRA+", "LoWR +\nLoRA+"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"table 6 (ratio {LORA_PLUS_RATIO:g})", fontsize=9)
    return fig

"""ALLoRA fig. 5 (right): the escape from BA = 0 of ALLoRA (base lr l_b) against LoRA at eta l_b and at l_b, and
the late growth of the row norms of s BA."""

from __future__ import annotations

import math

import numpy as np

from figures.allora.protocol import ETA2, OPTIMIZER_UNSTATED, SGD_LR, escape_step, row_norm_curve
from figures.criteria import (
    CI_PCT,
    CONFIDENCE,
    Criterion,
    Recalibration,
    Rule,
    Test,
    ci_dict,
    fmt_ci,
    mean_ci,
)
from figures.framework import Measurement, Protocol, diverged
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-fig5-escape"
PAPER = "ALLoRA fig. 5 (right)"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("ALLoRA (base lr l_b) escapes BA = 0 as fast as LoRA at lr eta*l_b, then its row norms taper off; LoRA at "
         "l_b gets there much more slowly")

METHODS = ("ALLoRA (l_b, eta)", "LoRA (eta l_b)", "LoRA (l_b)")
TAU_FRAC, LATE_FROM = 0.25, 0.5

CRITERION = Criterion(
    tests=(
        Test("escape_as_fast", "log(steps of ALLoRA / steps of LoRA at eta l_b) to reach 0.25 x ALLoRA's final "
             "mean row norm of s BA (per seed; a run that never reaches it counts at the horizon)", "equivalent",
             margin=math.log(1.25), margin_from="theory",
             why="escape time ~ 1/lr at B = 0 (analysis.adaptive.allora_grads: ALLoRA's step is LoRA's at eta l_b), "
                 "so the two LoRA references are log eta = log 2 = 0.69 apart; 'matches' must sit within a third of "
                 "that distance (log 2 / 3 = 0.23 >= log 1.25 = 0.22)"),
        Test("lora_lb_slower", "log(steps of LoRA at l_b / steps of ALLoRA) (per seed, censored at the horizon)",
             "greater", margin=math.log(1.25), margin_from="theory",
             why="'much more slowly': slower by more than the band within which ALLoRA counts as 'as fast' "
                 "(log 1.25, above); theory predicts log eta = log 2 under SGD; censoring is conservative"),
        Test("tapers_off", "late log-log growth exponent of the row norm (steps >= half the horizon), ALLoRA minus "
             "LoRA at eta l_b (per seed)", "less", margin=0.0, margin_from="theory",
             why="a sign: the paper ('tapers off into a measured move') gives no size, and the exponent of a "
                 "constant-lr run is the reference"),
        Test("step1_closed_form", "SANITY: |log(step-1 row norm of ALLoRA / the LoRA run its closed form predicts)| "
             "(SGD: LoRA at eta l_b; Adam: LoRA at l_b, Adam cancels the common factor eta)", "less", margin=0.01,
             why="analysis.adaptive.allora_grads at B = 0: equal up to float32 rounding", method="exact",
             role="sanity"),
    ),
    rule=Rule(reproduced=("escape_as_fast", "lora_lb_slower", "tapers_off"),
              partially=(("escape_as_fast",), ("tapers_off",))),
    note="The paper never names its optimizer (its fig. 5 right is an LLM run, Snowflake Arctic XS on Rotten "
         "Tomatoes, sec. 4): the headline is combined over SGD and Adam at their default rates (the headline "
         "policy). Its argument (a common gradient factor eta acts as a learning rate) is the SGD one; under Adam "
         "the factor cancels at step 1 (the sanity row), which predicts a failure there, but a prediction of ours "
         "does not remove Adam from what the paper could mean.",
    recalibrations=(
        Recalibration(old="reproduced only if SGD AND Adam reproduce; escape if the geometric-mean ratio <= 1.25",
                      new="headline at SGD, Adam and learning rates x1/3, x3 as protocols; 'as fast as' by TOST "
                          "within +-log 1.25; Holm over the 3 claim tests",
                      why="our own closed form shows Adam cancels eta, so requiring Adam tests the optimizer, not "
                          "the claim; a point estimate below 1.25 is not evidence of equivalence"),
        Recalibration(old="headline at SGD alone (chosen after the Adam protocol failed); 'LoRA at l_b is slower' "
                          "with margin 0",
                      new="headline combined over the plausible protocols SGD lr x1 and Adam lr x1 (both fail -> not "
                          "reproduced, one -> partially); 'much more slowly' needs a log ratio > log 1.25; margins "
                          "declared with their source (theory)",
                      why="issue 16: the paper names no optimizer, so the headline must not depend on which one "
                          "failed; 'much more slowly' is a size, the band of 'as fast' is the smallest that "
                          "separates the two"),))

BASE_LR = {"sgd": SGD_LR, "adam": 1e-3}
PROTOCOLS = tuple(
    Protocol(f"{opt} lr x{tag}", {"optimizer": opt, "l_b": round(BASE_LR[opt] * f, 6)},
             primary=(opt == "sgd" and f == 1.0), plausible=(f == 1.0),
             note=("SGD: the setting of the paper's argument (drawn)" if opt == "sgd"
                   else "Adam: cancels ALLoRA's factor eta at step 1 (closed form)")
             + (f"; plausible: {OPTIMIZER_UNSTATED}" if f == 1.0 else f"; base rate x{tag}"))
    for opt in ("sgd", "adam") for f, tag in ((1.0, "1"), (1 / 3, "1/3"), (3.0, "3")))


def paired(values) -> dict:
    """ci_dict of a 1-D sample that may contain inf (censored): inf entries make the interval unbounded."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if np.all(np.isfinite(v)):
        return ci_dict(v)
    return {"mean": float(np.mean(v)), "ci_low": float(np.min(v)), "ci_high": float("inf"), "n": int(v.size),
            "confidence": CONFIDENCE, "censored": int(np.sum(~np.isfinite(v)))}


def loglog_slope(steps: np.ndarray, values: np.ndarray, start: float) -> float:
    """Least-squares slope of log(value) on log(step) over steps >= start (the late-phase growth exponent)."""
    keep = (steps >= start) & (values > 0)
    return float(np.polyfit(np.log(steps[keep]), np.log(values[keep]), 1)[0])


def _base(ctx):
    return base_config(ctx, "mnist", steps=ctx.pick(quick=60, default=400), record_every=1, recorders=("rows",))


def configs(ctx) -> dict:
    """The three runs per seed. LoRA uses scaling 1.0 (a float), so that at BA = 0 its gradients equal ALLoRA's
    divided by eta: like is compared with like."""
    base, eta = _base(ctx), float(np.sqrt(ETA2))
    opt, lr = ctx.settings["optimizer"], float(ctx.settings["l_b"])
    common = dict(optimizer=opt, dropout=0.0)
    return {"ALLoRA (l_b, eta)": base.replace(method="allora", eta=eta, lr=lr, **common),
            "LoRA (eta l_b)": base.replace(method="lora", scaling=1.0, lr=eta * lr, **common),
            "LoRA (l_b)": base.replace(method="lora", scaling=1.0, lr=lr, **common)}


def measure(ctx, runs) -> Measurement:
    base = _base(ctx)
    steps, opt, lr = base.steps, ctx.settings["optimizer"], float(ctx.settings["l_b"])
    t_cross, slope, final, first = ({n: [] for n in METHODS} for _ in range(4))
    for i in range(len(ctx.seeds)):
        if any(diverged(runs[name][i]) for name in METHODS):  # a diverged seed is missing (NaN, counted as excluded)
            for vals in (t_cross, slope, final, first):
                for name in METHODS:
                    vals[name].append(math.nan)
            continue
        tau = TAU_FRAC * row_norm_curve(runs[METHODS[0]][i])[1][-1]
        for name in METHODS:
            s, v = row_norm_curve(runs[name][i])
            t_cross[name].append(escape_step(s, v, tau))
            slope[name].append(loglog_slope(s, v, LATE_FROM * steps))
            final[name].append(v[-1])
            first[name].append(v[1])  # after one step from B = 0
    a, hi, lo = (np.asarray(t_cross[n]) for n in METHODS)
    ac, hic, loc = (np.minimum(t, steps) for t in (a, hi, lo))  # censored at the horizon
    sa, shi, slo = (np.asarray(slope[n]) for n in METHODS)
    f_a, f_hi, f_lo = (np.asarray(first[n]) for n in METHODS)
    step1_ref = f_hi if opt == "sgd" else f_lo
    samples = {"escape_as_fast": np.log(ac / hic), "lora_lb_slower": np.log(loc / ac), "tapers_off": sa - shi,
               "step1_closed_form": float(np.nanmax(np.abs(np.log(f_a / step1_ref))))}
    measured = {
        "optimizer": opt, "l_b": lr, "eta2": ETA2, "steps": steps,
        "threshold": f"{TAU_FRAC} x ALLoRA's final mean row norm (per seed)",
        "late_phase": f"steps >= {LATE_FROM} x {steps}",
        "escape_step": {n: paired(t_cross[n]) for n in METHODS},
        "censored_runs": {n: int(np.sum(np.isinf(np.asarray(t_cross[n])))) for n in METHODS},
        "diverged_seeds": int(np.sum(np.isnan(np.asarray(t_cross[METHODS[0]])))),
        "escape_ratio_allora_over_lora_eta_lb": ci_dict(ac / hic),
        "escape_ratio_lora_lb_over_allora": ci_dict(loc / ac),
        "late_loglog_slope": {n: ci_dict(slope[n]) for n in METHODS},
        "late_slope_allora_minus_lora_eta_lb": ci_dict(sa - shi),
        "late_slope_allora_minus_lora_lb": ci_dict(sa - slo),
        "final_row_norm": {n: ci_dict(final[n]) for n in METHODS},
        "step1_row_norm_ratio_allora_over_lora_eta_lb": ci_dict(f_a / f_hi),
        "step1_row_norm_ratio_allora_over_lora_lb": ci_dict(f_a / f_lo),
    }
    summary = (f"{opt.upper()} l_b = {lr:g}, eta^2 = {ETA2:g}, {steps} steps, {len(ctx.seeds)} seeds: ALLoRA "
               f"reaches {TAU_FRAC:g} x its final row norm after "
               f"{fmt_ci(measured['escape_ratio_allora_over_lora_eta_lb'], '.2f')} x the steps of LoRA at eta l_b; "
               f"LoRA at l_b needs {fmt_ci(measured['escape_ratio_lora_lb_over_allora'], '.2f')} x ALLoRA's; late "
               f"growth exponent ALLoRA - LoRA(eta l_b) {fmt_ci(measured['late_slope_allora_minus_lora_eta_lb'], '.2f')}"
               f"; step-1 norm ratio ALLoRA / LoRA(eta l_b) "
               f"{measured['step1_row_norm_ratio_allora_over_lora_eta_lb']['mean']:.4f}, / "
               f"LoRA(l_b) {measured['step1_row_norm_ratio_allora_over_lora_lb']['mean']:.4f}.")
    key = {"time_ratio_vs_lora_eta_lb": measured["escape_ratio_allora_over_lora_eta_lb"]["mean"],
           "time_ratio_lora_lb_vs_allora": measured["escape_ratio_lora_lb_over_allora"]["mean"],
           "late_exponent_gap": measured["late_slope_allora_minus_lora_eta_lb"]["mean"]}
    config = {"base": base.as_dict(), "eta2": ETA2, "optimizer": opt, "l_b": lr, "seeds": list(ctx.seeds),
              "runs": {"ALLoRA (l_b, eta)": "method=allora, lr=l_b, eta", "LoRA (eta l_b)":
                       "method=lora, scaling=1.0, lr=eta*l_b", "LoRA (l_b)": "method=lora, scaling=1.0, lr=l_b"},
              "dropout": 0.0, "threshold_fraction": TAU_FRAC, "late_phase_from": LATE_FROM}
    curves = {}
    ok = [i for i in range(len(ctx.seeds)) if not any(diverged(runs[n][i]) for n in METHODS)]
    for name in METHODS:  # geometric mean over the seeds without a diverged run and its CI (log space), from step 1
        vals = np.stack([row_norm_curve(runs[name][i])[1] for i in ok])
        curves[name] = [np.exp(v) for v in mean_ci(np.log(vals[:, 1:]))]
    numbers = {"step": row_norm_curve(runs[METHODS[0]][ok[0]])[0][1:], "curves": curves, "optimizer": opt, "l_b": lr,
               "threshold": float(np.mean([TAU_FRAC * row_norm_curve(runs[METHODS[0]][i])[1][-1] for i in ok])),
               "late_from": LATE_FROM * steps, "escape": {n: mean_ci(t) for n, t in zip(METHODS, (ac, hic, loc), strict=True)}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, width=4.3, height=3.5)
    palette = dict(zip(METHODS, colors(3), strict=True))
    ax = axes[0, 0]
    for name, (m, lo, hi) in numbers["curves"].items():
        ax.plot(numbers["step"], m, color=palette[name], label=name)
        ax.fill_between(numbers["step"], lo, hi, color=palette[name], alpha=0.25, lw=0)
    ax.axhline(numbers["threshold"], color="0.4", ls=":", lw=1, label=f"threshold ({TAU_FRAC:g} x ALLoRA final)")
    ax.axvline(numbers["late_from"], color="0.7", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"mean row norm of s BA (mean over layers)\n(geometric mean over seeds, {CI_PCT} CI)")
    ax.set_title(f"{numbers['optimizer'].upper()}, l_b = {numbers['l_b']:g}, eta^2 = {ETA2:g}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[0, 1]
    for j, (name, (m, lo, hi)) in enumerate(numbers["escape"].items()):
        ax.errorbar([j], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=palette[name], capsize=3)
    ax.set_xticks(range(3), METHODS, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("steps to reach the threshold\n(censored at the horizon)")
    return fig

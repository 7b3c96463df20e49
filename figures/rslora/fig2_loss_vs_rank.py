"""rsLoRA fig. 2 on the toy: the final fine-tuning loss against the rank, LoRA (alpha/r) vs rsLoRA (alpha/sqrt(r)),
with the same alpha, on the MNIST MLP with LoRA on every layer (the shared rank sweep of
:mod:`figures.rslora.protocol`)."""

from __future__ import annotations

import math

import numpy as np

from figures.criteria import Criterion, Recalibration, Rule, Test, ci_finite, fmt_ci
from figures.framework import Measurement, diverged, require_datasets
from figures.rslora.protocol import (
    FLAT_SLOPE,
    FLAT_WHY,
    GAIN_WHY,
    METHOD_COLOR,
    METHOD_LABEL,
    METHODS,
    MNIST_PROTOCOLS,
    band,
    draw_band,
    final_loss,
    line_style,
    mean_and_seeds,
    mnist_ranks,
    opt_label,
    rank_palette,
    rank_sweep,
    seed_slopes,
    stack,
    sweep_config,
)
from figures.style import new_figure

ID = "rslora-fig2-loss-vs-rank"
PAPER = "rsLoRA fig. 2"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = "with the same alpha, fine-tuning loss improves with rank for rsLoRA but hardly for LoRA"

CRITERION = Criterion(
    tests=(
        Test("rs_improves", "rsLoRA: per-seed slope of ln(final training loss) vs ln r", "less", margin=-FLAT_SLOPE,
             margin_from="paper", why=GAIN_WHY),
        Test("lora_flat", "LoRA: per-seed slope of ln(final training loss) vs ln r", "equivalent",
             margin=FLAT_SLOPE, margin_from="paper", why=FLAT_WHY + " ('hardly improves')"),
        Test("rs_steeper", "per-seed slope difference rsLoRA - LoRA (paired)", "less", margin=-FLAT_SLOPE,
             margin_from="paper", why=f"difference < -{FLAT_SLOPE:.2g}: rank helps rsLoRA more than LoRA, by "
                                      "at least app. B.4's gap over r = 4..2048"),
        Test("training_learns", "ln(final / initial training loss), LoRA at the lowest rank", "less", margin=0.0,
             role="sanity", why="fine-tuning lowers the loss at all"),
    ),
    rule=Rule(reproduced=("rs_improves", "lora_flat"), partially=(("rs_improves", "rs_steeper"),)),
    recalibrations=(
        Recalibration(
            old="slope of the absolute final loss vs ln r; reproduced if rsLoRA's CI < 0 and LoRA's CI includes 0 "
                "(or > 0)",
            new="slope of ln(final loss) vs ln r; rsLoRA one-sided t < 0 and LoRA TOST |slope| < ln 1.1 / ln 2 (Holm)",
            why="the absolute loss saturates near 0, so its slopes hardly differ while the log-loss slopes are an "
                "order apart; 'the CI includes 0' accepts the null and gets harder to pass with more seeds"),
        Recalibration(
            old="LoRA 'flat': TOST |slope| < ln 1.1 / ln 2 = 0.1375 (10% per doubling of r); rsLoRA's slope and the "
                "paired difference < 0",
            new=f"LoRA 'flat': TOST |slope| < {FLAT_SLOPE:.4f}; rsLoRA's slope and the paired difference < "
                f"-{FLAT_SLOPE:.4f}",
            why="issue 16: the 0.1375 band was set after a 3-seed interval was seen and counted a significant 32% "
                "fall over r = 4..256 as flat. The new band is the paper's: app. B.4's gap (perplexity 1.863 vs "
                "1.836), the smallest loss difference the paper counts, spread over its ranks 4..2048"),
    ),
)
PROTOCOLS = MNIST_PROTOCOLS


def configs(ctx) -> dict:
    require_datasets("mnist")
    return rank_sweep(ctx)


def measure(ctx, runs) -> Measurement:
    ranks = mnist_ranks(ctx)
    logr = np.log(ranks)
    n = len(ctx.seeds)
    final = {m: np.array([[final_loss(runs[m, r][i]) for r in ranks] for i in range(n)]) for m in METHODS}
    test = {m: np.array([[float(runs[m, r][i]["test_loss"][-1]) if not diverged(runs[m, r][i]) else math.nan
                          for r in ranks] for i in range(n)]) for m in METHODS}
    log_slopes = {m: seed_slopes(logr, np.log(final[m])) for m in METHODS}
    abs_slopes = {m: seed_slopes(logr, final[m]) for m in METHODS}
    init = np.array([float(h["train_loss"][0]) for h in runs["lora", ranks[0]]])
    measured = {"final_train_loss": {m: {str(r): ci_finite(final[m][:, j]) for j, r in enumerate(ranks)}
                                     for m in METHODS},
                "final_test_loss": {m: {str(r): ci_finite(test[m][:, j]) for j, r in enumerate(ranks)} for m in METHODS},
                "slope_log_final_loss_per_log_rank": {m: ci_finite(log_slopes[m]) for m in METHODS},
                "slope_difference_rslora_minus_lora": ci_finite(log_slopes["rslora"] - log_slopes["lora"]),
                "slope_final_loss_per_log_rank (old rule, absolute loss)": {m: ci_finite(abs_slopes[m])
                                                                            for m in METHODS},
                "diverged_runs": {m: int(sum(diverged(h) for r in ranks for h in runs[m, r])) for m in METHODS},
                "ranks": list(ranks)}
    samples = {"rs_improves": log_slopes["rslora"], "lora_flat": log_slopes["lora"],
               "rs_steeper": log_slopes["rslora"] - log_slopes["lora"],
               "training_learns": np.log(final["lora"][:, 0] / init)}
    sl = measured["slope_log_final_loss_per_log_rank"]
    fl = measured["final_train_loss"]
    summary = (f"Slope of ln(final training loss) vs ln r: LoRA {fmt_ci(sl['lora'])}, rsLoRA {fmt_ci(sl['rslora'])}; "
               f"final loss at r = {ranks[0]} / {ranks[-1]}: LoRA {fl['lora'][str(ranks[0])]['mean']:.3g} / "
               f"{fl['lora'][str(ranks[-1])]['mean']:.3g}, rsLoRA {fl['rslora'][str(ranks[0])]['mean']:.3g} / "
               f"{fl['rslora'][str(ranks[-1])]['mean']:.3g} ({opt_label(ctx.settings)}).")
    key = {"slope LoRA": sl["lora"]["mean"], "slope rsLoRA": sl["rslora"]["mean"]}
    numbers = {"label": opt_label(ctx.settings), "ranks": ranks, "final": final, "slope": sl,
               "curves": {m: [band(*stack(runs[m, r], "train_loss")) for r in ranks] for m in METHODS}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=sweep_config(ctx), draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=4.6, height=3.6)
    ranks = numbers["ranks"]
    ax = axes[0, 0]
    for m in METHODS:
        for c, r, b in zip(rank_palette(m, len(ranks)), ranks, numbers["curves"][m], strict=True):
            draw_band(ax, b, c, line_style(m), f"{m} r={r}")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("training loss (cross-entropy, fine-tune set)")
    ax.set_title(numbers["label"], fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[0, 1]
    for m in METHODS:
        mean_and_seeds(ax, ranks, numbers["final"][m], METHOD_COLOR[m], line_style(m),
                       f"{METHOD_LABEL[m]}\ndlnL/dln r = {fmt_ci(numbers['slope'][m], '.2g')}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("final training loss (dots: seeds)")
    ax.legend(fontsize=6)
    return fig

"""rsLoRA app. B.4 on the toy: a learning-rate sweep for low-rank LoRA (r = 4) against high-rank rsLoRA at the
default learning rate."""

from __future__ import annotations

import math

import numpy as np

from figures.criteria import Criterion, Recalibration, Rule, Test, ci_finite, fmt_ci
from figures.framework import Measurement, diverged, require_datasets
from figures.rslora.protocol import (
    B4_GAP,
    B4_LOG_LOSS_RATIO,
    METHOD_COLOR,
    MNIST_PROTOCOLS,
    final_loss,
    log_ratio,
    mean_and_seeds,
    mnist_config,
    mnist_ranks,
    opt_label,
)
from figures.style import new_figure

ID = "rslora-b4-lr-sweep"
PAPER = "rsLoRA app. B.4"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = "the best learning rate for low-rank LoRA (r = 4) cannot match high-rank rsLoRA at the default rate"

LOW_RANK = 4

CRITERION = Criterion(
    tests=(
        Test("gap", "per-seed ln(final loss of LoRA r=4 at its best lr / rsLoRA's at the highest rank and the "
                    "default lr) (paired)", "greater", margin=B4_LOG_LOSS_RATIO, margin_from="paper",
             why=f"the paper's own effect: {B4_GAP}; the best lr is picked on the same runs, which favours LoRA, "
                 "so the test is conservative"),
        Test("best_lr_interior", "steps between the best lr and the nearer edge of the lr grid", "greater",
             margin=0.0, method="exact", role="sanity",
             why="a best lr at the edge of the grid means the sweep may have missed LoRA's optimum"),
    ),
    rule=Rule(reproduced=("gap",)),
    recalibrations=(
        Recalibration(
            old="reproduced if the paired final-loss gap has a 95% CI > 0; partially if only its mean is > 0",
            new="one-sided t on the paired log-loss ratio; no partial credit",
            why="on saturated losses a positive mean with an interval across 0 is no evidence; the log ratio "
                "compares relative losses, as the paper's perplexities"),
        Recalibration(
            old="mean ln(loss ratio) > 0 (the log ratio adopted after the absolute gap's interval crossed 0)",
            new=f"mean ln(loss ratio) > {B4_LOG_LOSS_RATIO:.4f}, judged at the paper's protocol (Adam) alone",
            why="issue 16: the rule from app. B.4's claim and numbers: the paper reports perplexity 1.863 (LoRA r = "
                "4, best of 6 lrs) vs 1.836 (rsLoRA r = 2048, default lr), a log loss ratio of 0.0237; a ratio of "
                "losses is the form that transfers from the LLM's loss scale to the toy's. The headline is the "
                "paper's AdamW protocol (sec. 4); SGD and the horizons are robustness"),
    ),
)

# B.4 sweeps the learning rate itself: the grid varies the optimizer and the horizon only
PROTOCOLS = tuple(p for p in MNIST_PROTOCOLS if "lr" not in p.name)


def _lrs(ctx) -> tuple[float, ...]:
    factors = ctx.pick(quick=(1.0, 10.0), default=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                       large=(0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0))
    return tuple(float(ctx.settings["lr"]) * f for f in factors)


def configs(ctx) -> dict:
    require_datasets("mnist")
    runs = {lr: mnist_config(ctx, ctx.settings, r=LOW_RANK, scaling="lora", lr=lr) for lr in _lrs(ctx)}
    return {**runs, "rslora": mnist_config(ctx, ctx.settings, r=mnist_ranks(ctx)[-1], scaling="rslora")}


def measure(ctx, allruns) -> Measurement:
    hi_r, lo_r, lrs = mnist_ranks(ctx)[-1], LOW_RANK, _lrs(ctx)
    default_lr = float(ctx.settings["lr"])
    lora = {lr: allruns[lr] for lr in lrs}
    rsl = allruns["rslora"]
    fl = {lr: np.array([final_loss(h) for h in v]) for lr, v in lora.items()}
    frs = np.array([final_loss(h) for h in rsl])
    means = {lr: (float(np.mean(np.log(v))) if np.all(np.isfinite(v)) else math.inf) for lr, v in fl.items()}
    best = min(means, key=means.get)
    gap = log_ratio(fl[best], frs)
    ib = lrs.index(best)
    measured = {"lrs": list(lrs), "best_lr": best,
                "lora_r4_final_train_loss": {f"{lr:g}": ci_finite(v) for lr, v in fl.items()},
                "lora_r4_diverged": {f"{lr:g}": int(sum(diverged(h) for h in lora[lr])) for lr in lrs},
                "rslora_high_rank": {"r": hi_r, "lr": default_lr, "final_train_loss": ci_finite(frs)},
                "log_best_lora_over_rslora": ci_finite(gap)}
    samples = {"gap": gap, "best_lr_interior": float(min(ib, len(lrs) - 1 - ib))}
    r_ci = measured["rslora_high_rank"]["final_train_loss"]
    summary = (f"Best lr {best:.3g} (grid {lrs[0]:.3g}..{lrs[-1]:.3g}): LoRA r={lo_r} final loss "
               f"{fmt_ci(measured['lora_r4_final_train_loss'][f'{best:g}'])} vs rsLoRA r={hi_r} at lr {default_lr:g} "
               f"{fmt_ci(r_ci)}; ln ratio {fmt_ci(measured['log_best_lora_over_rslora'])} ({opt_label(ctx.settings)}).")
    key = {"best lr": best, "ln ratio": float(np.nanmean(gap))}
    base = mnist_config(ctx, ctx.settings, seed=ctx.seeds[0], r=lo_r, scaling="lora")
    config = {"base": base.as_dict(), "protocol": ctx.protocol.as_dict(),
              "varies": {"lr": list(lrs), "seed": list(ctx.seeds)},
              "reference": {"r": hi_r, "scaling": "rslora", "lr": default_lr}}
    fin = [lr for lr in lrs if np.isfinite(means[lr])]
    numbers = {"label": opt_label(ctx.settings), "optimizer": ctx.settings["optimizer"], "lo_r": lo_r, "hi_r": hi_r,
               "best": best, "default_lr": default_lr, "lrs": fin, "lora_final": np.array([fl[lr] for lr in fin]).T,
               "rslora": {"mean": r_ci["mean"], "min": float(frs.min()), "max": float(frs.max())}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(1, 1, width=5.0, height=3.6)
    ax = axes[0, 0]
    mean_and_seeds(ax, numbers["lrs"], numbers["lora_final"], METHOD_COLOR["lora"], "--",
                   f"LoRA r={numbers['lo_r']} (best lr {numbers['best']:.3g})")
    rs_ = numbers["rslora"]
    ax.axhline(rs_["mean"], color=METHOD_COLOR["rslora"],
               label=f"rsLoRA r={numbers['hi_r']}, lr {numbers['default_lr']:g} (band: seeds)")
    ax.axhspan(float(rs_["min"]), float(rs_["max"]), color=METHOD_COLOR["rslora"], alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"learning rate ({numbers['optimizer']})")
    ax.set_ylabel("final training loss (dots: seeds)")
    ax.set_title(numbers["label"], fontsize=8)
    ax.legend(fontsize=7, loc="upper center")
    return fig

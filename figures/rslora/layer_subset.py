"""rsLoRA app. B.5 / fig. 7, the attention-only ablation as adapters on a subset of the MNIST MLP's layers: does rank
still help rsLoRA and not LoRA, and does LoRA's gradient norm still collapse with rank?"""

from __future__ import annotations

import math

import numpy as np

from figures.criteria import CI_PCT, Criterion, Rule, Test, ci_finite, fmt_ci
from figures.framework import Measurement, Protocol, diverged, require_datasets
from figures.rslora.protocol import METHOD_COLOR, METHODS, errorbars, seed_slopes
from figures.style import new_figure
from toymodels.protocol import base_config

ID = "rslora-layer-subset"
PAPER = "rsLoRA app. B.5 / fig. 7"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("with adapters on a subset of layers (the attention-only analogue) as with all layers, larger ranks train "
         "better with rsLoRA and not with LoRA, and LoRA's gradient norm collapses with rank")

RECORDERS = ("loss", "norms", "grads", "moments")  # as figures/rslora.py's shared sweep (run cache shared)
SUBSETS = {"all": ("layers.0", "layers.1", "layers.2"), "hidden": ("layers.1",)}
LABEL = {"all": "all layers", "hidden": "hidden layer only (layers.1)"}

CRITERION = Criterion(
    tests=tuple(
        Test(f"{k}_rs_gain", f"{LABEL[k]}: ln(final train loss) at the highest rank minus at the lowest, rsLoRA "
             f"(per seed)", "less", margin=0.0, why="the claim is a direction: higher rank trains better",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS)
    + tuple(
        Test(f"{k}_lora_gains_less", f"{LABEL[k]}: LoRA's high-minus-low ln loss minus rsLoRA's (paired)",
             "greater", margin=0.0, why="LoRA gains less from rank than rsLoRA",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS)
    + tuple(
        Test(f"{k}_grad_collapse", f"{LABEL[k]}: exponent of r of the early adapter gradient norm, LoRA minus "
             f"rsLoRA (paired)", "less", margin=0.0,
             why="at init the norm scales as gamma_r sqrt(r): LoRA's exponent is 1/2 below rsLoRA's",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS),
    rule=Rule(reproduced=("hidden_rs_gain", "hidden_lora_gains_less", "hidden_grad_collapse"),
              partially=(("hidden_grad_collapse",), ("hidden_rs_gain",))),
    note="the subset is the claim (app. B.5); the all-layers rows are the reference the paper compares with "
         "('similar results') and are reported as sanity rows",
)

PROTOCOLS = (
    Protocol("adam", {}, primary=True, paper=True, note="the paper's AdamW at constant lr (weight decay 0): Adam 1e-3"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.05}, note="the paper's SGD runs (fig. 4 / app. B)"),
)




def _ranks(ctx) -> tuple[int, ...]:
    # up to the hidden width 256 (the toy's full rank); large goes beyond, as the paper's r = 2048 > hidden sizes
    return ctx.pick(quick=(4, 64), default=(4, 16, 64, 256), large=(4, 16, 64, 256, 1024))


def early_grad_norm(h: dict) -> float:
    """Adapter gradient norm (every adapted layer, A and B together) at the first record after step 0."""
    return float(np.sqrt(np.sum(np.asarray(h["grad_norm_A"][1]) ** 2 + np.asarray(h["grad_norm_B"][1]) ** 2)))


def configs(ctx) -> dict:
    require_datasets("mnist")
    return {(k, m, r): base_config(ctx, "mnist", recorders=RECORDERS, r=r, scaling=m, targets=SUBSETS[k],
                                   **ctx.settings) for k in SUBSETS for m in METHODS for r in _ranks(ctx)}


def measure(ctx, runs) -> Measurement:
    ranks = _ranks(ctx)
    logr = np.log(ranks)
    samples: dict = {}
    measured: dict = {"ranks": list(ranks), "subsets": {k: list(v) for k, v in SUBSETS.items()},
                      "protocol": ctx.settings}
    for k in SUBSETS:
        per, gain, gexp = {}, {}, {}
        for m in METHODS:
            hs = [runs[(k, m, r)] for r in ranks]
            loss = np.array([[math.nan if diverged(h) else float(h["train_loss"][-1]) for h in hh]
                             for hh in hs]).T  # (seeds, ranks)
            grad = np.array([[early_grad_norm(h) if len(h["step"]) > 1 else math.nan for h in hh] for hh in hs]).T
            gain[m] = np.log(loss[:, -1]) - np.log(loss[:, 0])
            gexp[m] = seed_slopes(logr, np.log(grad))
            per[m] = {"final_train_loss": {str(r): ci_finite(loss[:, j]) for j, r in enumerate(ranks)},
                      "log_loss_high_minus_low_rank": ci_finite(gain[m]), "early_grad_norm_exponent": ci_finite(gexp[m]),
                      "early_grad_norm": {str(r): ci_finite(grad[:, j]) for j, r in enumerate(ranks)},
                      "diverged": int(sum(diverged(h) for hh in hs for h in hh))}
        samples[f"{k}_rs_gain"] = gain["rslora"]
        samples[f"{k}_lora_gains_less"] = gain["lora"] - gain["rslora"]
        samples[f"{k}_grad_collapse"] = gexp["lora"] - gexp["rslora"]
        measured[k] = per
    parts = [f"{LABEL[k]}: ln loss r={ranks[-1]} minus r={ranks[0]}: rsLoRA "
             f"{fmt_ci(measured[k]['rslora']['log_loss_high_minus_low_rank'], '.2g')}, LoRA "
             f"{fmt_ci(measured[k]['lora']['log_loss_high_minus_low_rank'], '.2g')}; early grad-norm exponent rsLoRA "
             f"{fmt_ci(measured[k]['rslora']['early_grad_norm_exponent'], '.2g')}, LoRA "
             f"{fmt_ci(measured[k]['lora']['early_grad_norm_exponent'], '.2g')}" for k in SUBSETS]
    summary = "; ".join(parts) + "."
    first = next(iter(configs(ctx).values()))
    config = {"base": first.replace(seed=ctx.seeds[0]).as_dict(),
              "varies": {"targets": {k: list(v) for k, v in SUBSETS.items()}, "r": list(ranks),
                         "scaling": list(METHODS), "seed": list(ctx.seeds)}}
    key = {"hidden_rs_gain": measured["hidden"]["rslora"]["log_loss_high_minus_low_rank"]["mean"],
           "hidden_lora_gain": measured["hidden"]["lora"]["log_loss_high_minus_low_rank"]["mean"]}
    numbers = {"ranks": ranks, "protocol": ctx.protocol.name,
               **{q: {k: {m: [measured[k][m][q][str(r)] for r in ranks] for m in METHODS} for k in SUBSETS}
                  for q in ("final_train_loss", "early_grad_norm")}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=4.6, height=3.6)
    for k, ls in (("all", "-"), ("hidden", "--")):
        for m in METHODS:
            for ax, q in zip(axes[0], ("final_train_loss", "early_grad_norm"), strict=True):
                errorbars(ax, numbers["ranks"], numbers[q][k][m], marker="o", ls=ls, color=METHOD_COLOR[m],
                          label=f"{m}, {LABEL[k]}")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel(f"final training loss\n({CI_PCT} CI), {numbers['protocol']}")
    axes[0, 1].set_ylabel(f"adapter gradient norm\nat the first record ({CI_PCT} CI)")
    return fig

"""LoWR fig. 4: training loss and adapter gradient norm with and without LoWR, late in training (the shared runs of
the LoWR figures)."""

from __future__ import annotations

import math

import numpy as np

from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_finite, fmt_ci, mean_ci
from figures.framework import Measurement, diverged, require_datasets
from figures.lowr.protocol import (
    ALPHA_PROTOCOLS,
    DATASET,
    config_record,
    log_ratio,
    rank,
    shared_config,
)
from figures.style import colors, new_figure

ID = "lowr-fig4-loss-gradnorm"
PAPER = "LoWR fig. 4"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("with LoWR the fine-tuning loss is lower and the gradient norm larger than without, especially late in "
         "training")


def grad_total(h: dict) -> tuple[np.ndarray, np.ndarray]:
    """(total adapter gradient norm, B-part) per record, over all layers (record 0 has none: NaN)."""
    ga, gb = h["grad_norm_A"], h["grad_norm_B"]
    return np.sqrt((ga**2).sum(1) + (gb**2).sum(1)), np.sqrt((gb**2).sum(1))


def late_window(steps: np.ndarray) -> np.ndarray:
    """The records of the second half of training (step > last / 2), where fig. 4's claim is tested."""
    return steps > steps[-1] / 2


CHANCE_LOSS = math.log(10)  # cross-entropy of the uniform (chance) prediction over 10 classes
SIGN_WHY = ("fig. 4 is a plot without numbers and the text gives a direction only ('generally smaller' / 'generally "
            "larger'); theory gives no size either: LoWR's rescaling leaves the loss unchanged at the step it acts")

CRITERION = Criterion(
    tests=(
        Test("loss_lower", "mean training loss over the second half of training (whole fine-tune set), LoWR - LoRA "
             "(paired by seed)", "less", margin=0.0, margin_from="theory",
             why="the paper: lower loss with LoWR, 'indicating the efficacy of our LoWR'; " + SIGN_WHY),
        Test("grad_larger", "ln(mean gradient norm of all adapters over the second half, LoWR / LoRA) (paired by "
             "seed)", "greater", margin=0.0, margin_from="theory",
             why="the paper: larger gradient norm late in training; " + SIGN_WHY),
    ),
    rule=Rule(reproduced=("loss_lower", "grad_larger"), partially=(("loss_lower",),)),
    note="Partially reproduced: the loss is lower with LoWR (the efficacy the paper reads from fig. 4) while the "
         "gradient norm is not larger. A larger gradient norm alone earns nothing: LoWR produces it mechanically "
         "(it enlarges ||a_i||, and the gradient of b_i is proportional to a_i^T x, eq. 6). A diverged seed counts "
         "against its arm in the loss test at the loss of a chance prediction (ln 10), and is excluded from the "
         "gradient test (reported).",
    recalibrations=(
        Recalibration(
            old="CI of the late loss change < 0 and CI of the late gradient-norm ratio > 1 (a ratio of per-seed "
                "means, t-interval on the ratio); partially if one holds, uncorrected",
            new="one-sided paired t-tests on the loss change and on the log of the ratio, Holm over the 2; alpha "
                "scaled to the toy and the learning rate as protocols",
            why="'partially' passes on either of two tests: without a correction it is a 10% test; a ratio is "
                "tested on its log"),
        Recalibration(
            old="partially reproduced if the loss is lower OR the gradient norm is larger",
            new="partially reproduced only if the loss is lower; margins 0 declared from theory (the paper gives "
                "a direction only); a diverged seed counts at the chance loss ln 10 (was: excluded); Adam and SGD "
                "both plausible (the paper names no optimizer)",
            why="issue 16: the larger gradient norm is what LoWR's rescaling produces mechanically (eq. 6), so it "
                "earned partial credit while the loss was significantly higher with LoWR; a partial verdict must "
                "rest on evidence for the claim"),
    ))


PROTOCOLS = ALPHA_PROTOCOLS


def _split(ctx) -> tuple[dict, tuple]:
    settings = ctx.settings
    return settings, tuple(settings.pop("lowr"))


def configs(ctx) -> dict:
    require_datasets(DATASET)
    settings, lowr = _split(ctx)
    return {"LoRA": shared_config(ctx, **settings), "LoRA + LoWR": shared_config(ctx, lowr=lowr, **settings)}


def measure(ctx, runs) -> Measurement:
    settings, (tau, alpha, every) = _split(ctx)
    runs = {name: [None if diverged(h) else h for h in hs] for name, hs in runs.items()}  # None: excluded
    ok = [h for hs in runs.values() for h in hs if h is not None]
    steps = ok[0]["step"]
    late = late_window(steps)
    n = len(ctx.seeds)
    per = {}
    for name, hists in runs.items():
        p = {k: np.full((n, len(steps)), np.nan) for k in ("train_loss", "grad", "grad_B")}
        p["test_acc"] = np.full(n, np.nan)
        for s, h in enumerate(hists):
            if h is not None:
                p["train_loss"][s], (p["grad"][s], p["grad_B"][s]) = h["train_loss"], grad_total(h)
                p["test_acc"][s] = h["test_acc"][-1]
        p["late_grad"], p["late_grad_B"] = p["grad"][:, late].mean(1), p["grad_B"][:, late].mean(1)
        # a diverged seed counts, at the loss of a chance prediction (ln 10), against the arm that diverged
        p["late_loss"] = np.where([h is None for h in hists], CHANCE_LOSS, p["train_loss"][:, late].mean(1))
        per[name] = p
    lo_, lw = per["LoRA"], per["LoRA + LoWR"]
    samples = {"loss_lower": lw["late_loss"] - lo_["late_loss"],
               "grad_larger": np.log(lw["late_grad"] / lo_["late_grad"])}
    measured = {
        "lowr": {"tau": tau, "alpha": alpha, "every": every}, "rank": rank(ctx), "protocol": settings,
        "final_train_loss_lora": ci_finite(lo_["train_loss"][:, -1]),
        "final_train_loss_lowr": ci_finite(lw["train_loss"][:, -1]),
        "delta_late_mean_train_loss": ci_finite(samples["loss_lower"]),
        "late_grad_norm_lora": ci_finite(lo_["late_grad"]), "late_grad_norm_lowr": ci_finite(lw["late_grad"]),
        "late_grad_norm_ratio_geometric": log_ratio(samples["grad_larger"]),
        "late_grad_norm_B_ratio_geometric": log_ratio(np.log(lw["late_grad_B"] / lo_["late_grad_B"])),
        "final_test_acc_lora": ci_finite(lo_["test_acc"]), "final_test_acc_lowr": ci_finite(lw["test_acc"]),
        "late_window_steps": [float(steps[late][0]), float(steps[-1])],
        "diverged_runs": {k: int(np.sum(~np.isfinite(v["test_acc"]))) for k, v in per.items()},
    }
    summary = (f"LoWR (tau={tau:g}, alpha={alpha:g}) minus LoRA over the second half of training "
               f"({n} seeds, rank {rank(ctx)}, {ctx.protocol.name}): training loss "
               f"{fmt_ci(measured['delta_late_mean_train_loss'])} (final {measured['final_train_loss_lora']['mean']:.3g}"
               f" -> {measured['final_train_loss_lowr']['mean']:.3g}); gradient-norm ratio "
               f"{fmt_ci(measured['late_grad_norm_ratio_geometric'])} (B only "
               f"{fmt_ci(measured['late_grad_norm_B_ratio_geometric'])}); test accuracy "
               f"{measured['final_test_acc_lora']['mean']:.4f} -> {measured['final_test_acc_lowr']['mean']:.4f}.")
    key = {"delta_late_loss": measured["delta_late_mean_train_loss"]["mean"],
           "grad_ratio": measured["late_grad_norm_ratio_geometric"]["mean"]}
    numbers = {"tau": tau, "alpha": alpha, "late": [float(steps[late][0]), float(steps[-1])], "curves": {}}
    for name, p in per.items():  # geometric mean over the finite seeds and its CI in log space
        for q in ("train_loss", "grad", "grad_B"):
            vals, x = (p[q], steps) if q == "train_loss" else (p[q][:, 1:], steps[1:])  # no gradient at step 0
            vals = vals[np.all(np.isfinite(vals), axis=1)]
            numbers["curves"].setdefault(q, {})[name] = {"step": x, "band": [np.exp(v) for v in mean_ci(np.log(vals))]}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config_record(ctx, lowr={"tau": tau, "alpha": alpha, "every": every}, **settings),
                       draw=numbers)


def draw(numbers):
    fig, axes = new_figure(3, 1, width=3.8, height=3.2)
    cl = colors(2)
    for ax, (key, ylabel) in zip(axes[0], (("train_loss", "training loss (full fine-tune set)"),
                                           ("grad", "grad norm, all adapters (batch)"),
                                           ("grad_B", "grad norm of the lora_B's (batch)")), strict=True):
        for (name, c), col in zip(numbers["curves"][key].items(), cl, strict=True):
            m, lo, hi = c["band"]
            ax.plot(c["step"], m, color=col, label=name)
            ax.fill_between(c["step"], lo, hi, color=col, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(ylabel)
        ax.axvspan(*numbers["late"], color="grey", alpha=0.08)
    axes[0, 0].legend(fontsize=7, title=f"tau={numbers['tau']:g}, alpha={numbers['alpha']:g}\n(geo. mean, {CI_PCT} CI)",
                      title_fontsize=7)
    return fig

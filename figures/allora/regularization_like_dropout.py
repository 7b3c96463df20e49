"""ALLoRA sec. 4.2 / 6 (open question): does ALLoRA recover some of dropout's regularization, i.e. narrow the
generalization gap without giving up test accuracy (a method that merely fits less narrows the gap too)?"""

from __future__ import annotations

import math

import numpy as np
import torch

from analysis import dropout as closed
from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_dict, fmt_ci, mean_ci
from figures.framework import Measurement, Probe, Protocol, Runs, diverged, floats
from figures.style import colors, new_figure
from toymodels import TrainState
from toymodels.losses import evaluate
from toymodels.protocol import base_config

ID = "allora-regularization-like-dropout"
PAPER = "ALLoRA sec. 4.2, 6 (open question)"
KIND, CLAIM_ID = "hypothesis", ID  # hypothesis: the paper's own conjecture (sec. 6 open question)
CLAIM = ("ALLoRA may recover some regularisation effect of dropout (sec. 4.2 hypothesis; sec. 6: 'ALLoRA is "
         "implicitly a regularization'): it narrows the train-test gap without losing test accuracy")

RATE = 0.1
METHODS = ("LoRA", "LoRA + dropout", "ALLoRA")
EARLY_EPOCHS = (1, 2, 3)
# ALLoRA table 2 right: averages of 0.00-0.10% (ALLoRA - ALLoRA+D) are what the paper calls "no evident difference";
# a test-accuracy loss beyond 0.1 pp is a loss.
NO_DIFFERENCE_PP = 0.1

CRITERION = Criterion(
    tests=(
        Test("allora_gap", "generalization gap (test - train cross-entropy) at the end, ALLoRA minus LoRA (paired "
             "by seed)", "less", margin=0.0, margin_from="theory",
             why="the hypothesis is a direction ('some regularisation effect'), and the paper gives no size for it "
                 "(nor any cross-entropy number); the size that counts is carried by allora_test_acc. At eta = 1 "
                 "ALLoRA equals LoRA at B = 0, so the difference is the taper alone"),
        Test("allora_test_acc", "final test accuracy (pp), ALLoRA minus LoRA (paired by seed)", "greater",
             margin=-NO_DIFFERENCE_PP, margin_from="paper",
             why="a regularizer narrows the gap without costing test accuracy (a method that fits less narrows it "
                 "too, and tests worse): non-inferior within 0.1 pp, the largest average gap ALLoRA table 2 right "
                 "calls 'no evident difference' (0.10%)"),
        Test("dropout_gap", "generalization gap at the end, LoRA + dropout minus LoRA (paired by seed)", "less",
             role="sanity", why="the premise: dropout regularizes in this set-up"),
    ),
    rule=Rule(reproduced=("allora_gap", "allora_test_acc")),
    recalibrations=(Recalibration(
        old="od_early: mean < 0", new="od_early: mean < -0.1 pp",
        why="the first default run found -0.04 pp [-0.06, -0.02]: significant at 10 seeds but under one test "
            "image; a drag the paper could mean must be visible (margin fixed before the next regeneration)"),
        Recalibration(
        old="supported if allora_gap (< 0) and allora_penalty (ln dropout penalty, ALLoRA - LoRA < 0); partially "
            "(inconclusive) if either; od_early (ALLoRA-OD early accuracy) tested outside the rule; Adam the "
            "headline",
        new="supported if allora_gap < 0 and allora_test_acc > -0.1 pp (non-inferiority); no partial reading; "
            "the penalty is reported only; ALLoRA-OD leaves the figure; headline over SGD and Adam",
        why="issue 16: a smaller gap and a smaller penalty are passed by any method that simply fits less (ALLoRA "
            "tested worse than LoRA here); the test-accuracy margin is the paper's 'no evident difference' (table "
            "2 right); od_early compared accuracies at chance (epochs 1-3), and sec. 4.3's ALLoRA-OD conjecture is "
            "judged where the paper judges it, on final accuracy (allora-tab-variants, beats_ALLoRA_OD, table 4)"),),
    note="Closed form (analysis.allora_dynamics, proved in tests/analysis/test_allora_dynamics.py): ALLoRA's flow is "
         "linear in the loss gradient g = dL/d(BA), so it vanishes wherever g = 0 -- it has no penalty force, "
         "unlike dropout's expected flow (LoRA's flow minus the gradient of a penalty that acts at g = 0); its "
         "expected mini-batch step is its full-batch step. Any regularization by ALLoRA is therefore implicit "
         "(trajectory), which is what the runs measure. Dropout's exact penalty on each trajectory is reported, not "
         "tested (it is smaller for any adapter that moves less).",
)

_PLAUSIBLE = "ALLoRA names no optimizer (sec. 4.4 gives l_b = 1e-4 only): plausible"
PROTOCOLS = (
    Protocol("adam-eta1", {"optimizer": "adam", "lr": 1e-3, "eta": 1.0}, primary=True, plausible=True,
             note=f"{_PLAUSIBLE}; eta = 1 (table 6's eta^2 = 1): ALLoRA = LoRA at B = 0, the taper isolated; Adam"),
    Protocol("sgd-eta1", {"optimizer": "sgd", "lr": 0.03, "eta": 1.0}, plausible=True,
             note=f"{_PLAUSIBLE}; SGD, where ALLoRA's scale acts as a learning rate"),
    Protocol("adam-eta2", {"optimizer": "adam", "lr": 1e-3, "eta": 2.0},
             note="eta^2 = 4 (listing 1); LoRA at scaling 1 is then not matched at B = 0"),
    Protocol("adam-eta1 lr x1/3", {"optimizer": "adam", "lr": round(1e-3 / 3, 8), "eta": 1.0},
             note="learning rate x1/3"),
    Protocol("adam-eta1 lr x3", {"optimizer": "adam", "lr": 3e-3, "eta": 1.0}, note="learning rate x3"),
)


class EpochProbe(Probe):
    """Train / test loss and accuracy (dropout off) and, for the last layer, the exact expected penalty that
    bottleneck dropout at rate ``p_ref`` would add to the MSE of that layer (:func:`analysis.dropout.dropout_penalty`
    on the per-sample scale X / sqrt(N), X = the dropout-free features of the fine-tune set; the runs use
    cross-entropy, so this is dropout's penalty evaluated on each trajectory, not a term of its loss), at
    ``steps``. Prefix "ep_"."""

    prefix = "ep_"
    cache_name = "figures.allora_new.EpochProbe"  # its module until issue 15 (keeps the cached runs)

    def __init__(self, steps, p_ref: float):
        super().__init__(steps)
        self.p_ref = float(p_ref)

    def params(self) -> dict:
        return {"p_ref": self.p_ref}

    @torch.no_grad()
    def measure(self, state: TrainState) -> dict[str, float]:
        model, cfg = state.model, state.cfg
        out = {}
        for name, split in (("train", state.data.finetune), ("test", state.data.test)):
            loss, acc = evaluate(model, split, cfg.loss)
            out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
        was = model.training
        model.eval()
        X = model.features(state.data.finetune.x).double().cpu().numpy()
        model.train(was)
        last = state.layers[-1]
        X = X / math.sqrt(X.shape[0])
        A, B = last.lora_A.double().cpu().numpy(), last.lora_B.double().cpu().numpy()
        out["penalty"] = closed.dropout_penalty(X, A, B, self.p_ref, placement="bottleneck",
                                                scaling=float(last.scaling))
        return out


def _setup(ctx):
    """(base config, steps per epoch, probe steps: the early epochs, every half of the run and the last step)."""
    settings = ctx.settings
    settings.pop("eta")
    base = base_config(ctx, "mnist", recorders=(), placement="bottleneck", **settings)
    spe = max(1, base.n_finetune // base.batch_size)
    return base, spe, sorted({e * spe for e in EARLY_EPOCHS} | set(range(0, base.steps + 1, max(base.steps // 2, 1)))
                             | {base.steps})


def configs(ctx) -> dict:
    (base, _, probe_steps), eta = _setup(ctx), float(ctx.settings["eta"])
    probe = (EpochProbe(probe_steps, RATE),)
    return {"LoRA": Runs(base.replace(method="lora", scaling=1.0, dropout=0.0), callbacks=probe),
            "LoRA + dropout": Runs(base.replace(method="lora", scaling=1.0, dropout=RATE), callbacks=probe),
            "ALLoRA": Runs(base.replace(method="allora", eta=eta, dropout=0.0), callbacks=probe)}


def measure(ctx, runs) -> Measurement:
    eta, (base, spe, _) = float(ctx.settings["eta"]), _setup(ctx)
    rec = runs
    steps = rec["LoRA"][0]["ep_step"]

    def arr(n, k):
        out = np.full((len(ctx.seeds), len(steps)), np.nan)
        for i, h in enumerate(rec[n]):
            v = h.get(f"ep_{k}", np.array([]))
            out[i, :len(v)] = v
        return out

    gap = {n: arr(n, "test_loss") - arr(n, "train_loss") for n in METHODS}
    pen = {n: arr(n, "penalty") for n in METHODS}
    acc = {n: arr(n, "test_acc") for n in METHODS}
    d_gap = gap["ALLoRA"][:, -1] - gap["LoRA"][:, -1]
    d_acc = 100 * (acc["ALLoRA"][:, -1] - acc["LoRA"][:, -1])
    d_pen = np.log(pen["ALLoRA"][:, -1]) - np.log(pen["LoRA"][:, -1])
    d_dgap = gap["LoRA + dropout"][:, -1] - gap["LoRA"][:, -1]
    d_dacc = 100 * (acc["LoRA + dropout"][:, -1] - acc["LoRA"][:, -1])
    d_dpen = np.log(pen["LoRA + dropout"][:, -1]) - np.log(pen["LoRA"][:, -1])
    samples = {"allora_gap": d_gap, "allora_test_acc": d_acc, "dropout_gap": d_dgap}
    measured = {
        "eta": eta, "p_ref": RATE, "probe_steps": [int(v) for v in steps],
        "final_gap": {n: ci_dict(gap[n][:, -1]) for n in METHODS},
        "final_ln_penalty": {n: ci_dict(np.log(pen[n][:, -1])) for n in METHODS},
        "final_test_acc": {n: ci_dict(acc[n][:, -1]) for n in METHODS},
        "final_train_loss": {n: ci_dict(arr(n, "train_loss")[:, -1]) for n in METHODS},
        "allora_minus_lora_gap": ci_dict(d_gap), "allora_minus_lora_test_acc_pp": ci_dict(d_acc),
        "allora_minus_lora_ln_penalty": ci_dict(d_pen), "dropout_minus_lora_gap": ci_dict(d_dgap),
        "dropout_minus_lora_test_acc_pp": ci_dict(d_dacc), "dropout_minus_lora_ln_penalty": ci_dict(d_dpen),
        "diverged_runs": {n: int(sum(diverged(h) for h in rec[n])) for n in METHODS},
    }
    summary = (f"At the end ({base.steps} steps, {ctx.protocol.name}): generalization gap ALLoRA - LoRA "
               f"{fmt_ci(ci_dict(d_gap))} vs dropout (p = {RATE:g}) - LoRA {fmt_ci(ci_dict(d_dgap))}; test accuracy "
               f"ALLoRA - LoRA {fmt_ci(ci_dict(d_acc), '+.2f')} pp vs dropout - LoRA {fmt_ci(ci_dict(d_dacc), '+.2f')} "
               f"pp. Reported only: ln dropout penalty ALLoRA - LoRA {fmt_ci(ci_dict(d_pen))} vs dropout - LoRA "
               f"{fmt_ci(ci_dict(d_dpen))}.")
    key = {"allora_gap": float(np.nanmean(d_gap)), "allora_test_acc_pp": float(np.nanmean(d_acc)),
           "allora_penalty": float(np.nanmean(d_pen))}
    config = {"base": base.as_dict(), "eta": eta, "dropout_rate": RATE, "methods": {
        "LoRA": "method=lora, scaling=1", "LoRA + dropout": f"method=lora, scaling=1, dropout={RATE} "
        "(bottleneck)", "ALLoRA": "method=allora, eta"},
        "probe": "EpochProbe (train/test loss and accuracy, last-layer dropout penalty) at probe_steps"}
    numbers = {"protocol": ctx.protocol.name, "step": steps, "spe": spe,
               "gap": {n: mean_ci(gap[n]) for n in METHODS}, "ln_penalty": {n: mean_ci(np.log(pen[n][:, 1:]))
                                                                         for n in METHODS},
               "acc_pct": {n: mean_ci(100 * acc[n]) for n in METHODS}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(3, width=4.3, height=3.4)
    pal = dict(zip(METHODS, colors(len(METHODS)), strict=True))
    step = np.asarray(numbers["step"])
    for ax, key, lab in ((axes[0, 0], "gap", "generalization gap (test - train CE)"),
                         (axes[0, 1], "ln_penalty", f"ln dropout penalty, p = {RATE:g} (last layer)"),
                         (axes[0, 2], "acc_pct", "test accuracy (%)")):
        for n, band in numbers[key].items():
            mm, lo, hi = floats(band)  # NaN where a run diverged
            x = step if len(mm) == len(step) else step[1:]
            ax.plot(x, mm, "o-", ms=3, color=pal[n], label=n)
            ax.fill_between(x, lo, hi, color=pal[n], alpha=0.2, lw=0)
        ax.set(xlabel="step", ylabel=lab)
    axes[0, 2].set_xscale("symlog", linthresh=numbers["spe"])
    axes[0, 2].set_xticks(step, [f"{s:g}" for s in step], fontsize=7)  # the probe steps (0 and the early epochs)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(f"{numbers['protocol']}, {CI_PCT} CI over seeds", fontsize=9)
    return fig

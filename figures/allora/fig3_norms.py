"""ALLoRA fig. 3: dropout's effect on the norms of A and B, with the closed-form decay strengths of sec. 3.2
(bottleneck, MSE) traced along one run."""

from __future__ import annotations

import math

import numpy as np
import torch

from analysis import dropout as closed
from figures.allora.protocol import OPTIMIZER_UNSTATED, SGD_LR, last_layer_problem, log_ratio_ci
from figures.criteria import Criterion, Recalibration, Rule, Test, ci_dict
from figures.framework import Measurement, Probe, Protocol, Runs
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-fig3-norms"
PAPER = "ALLoRA fig. 3"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("dropout changes ||B|| far more than ||A|| (paper sec. 3.2: final ||A|| varies by ~30%, ||B|| by >500% "
         "across rates)")

RATES = (0.0, 0.1, 0.3, 0.5)
STRENGTH_RATE = 0.5  # the closed-form decay strengths are traced on one run (first seed) at this rate
PAPER_A, PAPER_B = 0.30, 5.0  # sec. 3.2: A's final norm varies "by about 30%", B's "by more than 500%"

CRITERION = Criterion(
    tests=(
        Test("far_more", "ln(spread(||B||) / spread(||A||)), spread = max/min - 1 of the final norm over p in "
             f"{RATES} (per seed)", "greater", margin=math.log(PAPER_B / PAPER_A), margin_from="paper",
             why="sec. 3.2 quantifies 'disproportionate': ||B|| varies by more than 500%, ||A|| by about 30%, a "
                 "ratio of at least 5 / 0.3 = 16.7"),
        Test("more", "spread(||B||) - spread(||A||) (per seed)", "greater", margin=PAPER_A, margin_from="paper",
             why="sec. 3.2 calls a ~30% variation of the final norm across rates 'minimal' ('barely impacting' "
                 "A): B's variation must exceed A's by more than that to count as an asymmetry"),
    ),
    rule=Rule(reproduced=("far_more", "more"), partially=(("more",),)),
    correction="none",
    note="Each verdict level is one conjunction of one-sided 5% tests, an intersection-union test: no multiplicity "
         "correction is needed. The paper names no optimizer (sec. 3.4): the headline is combined over Adam and "
         "SGD (the headline policy). The closed-form decay strengths (ALLoRA sec. 3.2) are for the MSE loss with "
         "dropout at the bottleneck: the 'MSE loss' protocol is where they describe the run exactly; with "
         "cross-entropy they are the MSE penalty at the run's weights.",
    recalibrations=(
        Recalibration(
            old="CI of spread(B) - spread(A) > 0 and the ratio of the seed-mean spreads >= 3 (a point estimate); "
                "600 steps, 3 seeds",
            new="one-sided t-test over 10 seeds of ln(spread_B / spread_A) > ln 3 (reproduced) and of spread_B - "
                "spread_A > 0 (partially); placement, loss (CE vs MSE) and per-layer vs summed norms as protocols; "
                "300 steps (the shared horizon of the figures, for the 15-minute budget; the runs go through the "
                "batched engine)",
            why="a threshold on a ratio of means has no error bar; the closed form is for MSE while the paper's task "
                "is classification, and 'the norm of A' may mean one layer or all"),
        Recalibration(
            old="ln(spread_B / spread_A) > ln 3 ('a lenient far more', no source); spread_B - spread_A > 0; headline "
                "at Adam, marked as the paper's protocol",
            new="ln(spread_B / spread_A) > ln(5 / 0.3) and spread_B - spread_A > 0.3, both from sec. 3.2's numbers; "
                "headline combined over Adam and SGD (plausible), the paper stating no optimizer",
            why="issue 16: every margin from the paper's numbers (~30% vs > 500%) or theory; a 'far more' of 3 was "
                "nobody's number; the paper names no optimizer"),))

PROTOCOLS = (
    Protocol("bottleneck, CE, summed", {"placement": "bottleneck", "loss": "ce", "norms": "summed"}, primary=True,
             plausible=True, note="Adam (lr 1e-3); MNIST classification as in the paper; dropout at the bottleneck "
                                  f"(its eq. 1); norms of all adapted layers together; plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("sgd", {"placement": "bottleneck", "loss": "ce", "norms": "summed", "optimizer": "sgd", "lr": SGD_LR},
             plausible=True, note=f"the primary protocol under SGD (lr {SGD_LR:g}); plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("input placement", {"placement": "input", "loss": "ce", "norms": "summed"},
             note="dropout on the adapter's input, as PEFT"),
    Protocol("MSE loss", {"placement": "bottleneck", "loss": "mse", "norms": "summed"},
             note="the loss of the closed-form penalty strengths"),
    Protocol("last layer only", {"placement": "bottleneck", "loss": "ce", "norms": "last"},
             note="norms of the last layer's A and B (the layer of the closed form); the primary protocol's runs"),
)


class DecayStrengths(Probe):
    """At the record steps: ``dist_A`` = ||A - A_0|| per layer, and the last layer's closed-form per-channel
    penalty strengths ``strength_A``, ``strength_B`` (:func:`analysis.dropout.penalty_strengths`, bottleneck
    formula, dropout-free features X of the whole fine-tune set scaled by 1/sqrt(N): per sample, as the engine's
    loss is a mean)."""

    prefix = "fig3_"
    version = 1
    cache_name = "figures.allora_dropout._DecayStrengths"  # its module until issue 15 (keeps the cached runs)

    def __init__(self):
        super().__init__(None)
        self.init: list[torch.Tensor] = []

    def reset(self) -> None:
        super().reset()
        self.init = []

    @torch.no_grad()
    def measure(self, state) -> dict[str, np.ndarray]:
        layers = state.layers
        if not self.init:
            self.init = [m.lora_A.detach().clone() for m in layers]
        prob = last_layer_problem(state.model, layers[-1], *state.data.finetune)
        X = prob["X"] / math.sqrt(prob["X"].shape[0])
        on_a, on_b = closed.penalty_strengths(X, prob["A"], prob["B"], state.cfg.dropout, scaling=float(prob["s"]))
        return {"dist_A": [(m.lora_A - a0).norm().item() for m, a0 in zip(layers, self.init, strict=True)],
                "strength_A": on_a, "strength_B": on_b}


def spread(final: np.ndarray) -> np.ndarray:
    """max / min - 1 over rates (axis 1), per seed (axis 0)."""
    return final.max(axis=1) / final.min(axis=1) - 1.0


def norm_of(norms: np.ndarray, which: str) -> np.ndarray:
    """Per record, the norm of fig. 3 from a run's per-layer norms (records x layers): ``summed`` = the Frobenius
    norm of all adapted layers together, sqrt(sum_l ||M_l||^2); ``last`` = the last layer's alone."""
    if which == "summed":
        return np.sqrt((norms**2).sum(axis=1))
    if which == "last":
        return norms[:, -1]
    raise ValueError(f"which must be 'summed' or 'last', got {which!r}")


def _base(ctx):
    settings = ctx.settings
    settings.pop("norms", None)
    return base_config(ctx, "mnist", steps=ctx.pick(quick=30, default=300), record_every=ctx.pick(quick=10, default=25),
                       recorders=("loss", "norms"), **settings)


def configs(ctx) -> dict:
    base = _base(ctx)
    runs: dict = {f"p={p:g}": base.replace(dropout=p) for p in RATES}
    if ctx.settings["placement"] == "bottleneck":  # one run traced with the closed-form strengths (a callback)
        runs["traced"] = Runs(base.replace(dropout=STRENGTH_RATE), callbacks=(DecayStrengths(),),
                              first_seed_only=True)
    return runs


def measure(ctx, runs) -> Measurement:
    settings = ctx.settings
    which, pl, steps = settings["norms"], settings["placement"], ctx.pick(quick=30, default=300)
    base = _base(ctx)
    hists = [[runs[f"p={p:g}"][i] for p in RATES] for i in range(len(ctx.seeds))]  # (seeds, rates)
    curves = {k: np.array([[norm_of(h[f"norm_{k}"], which) for h in row] for row in hists])
              for k in ("A", "B")}  # (seeds, rates, records)
    loss = np.array([[h["train_loss"] for h in row] for row in hists])
    finals = {k: v[:, :, -1] for k, v in curves.items()}  # (seeds, rates)
    spreads = {k: spread(v) for k, v in finals.items()}
    samples = {"far_more": np.log(spreads["B"] / spreads["A"]), "more": spreads["B"] - spreads["A"]}
    measured: dict = {"rates": RATES, "placement": pl, "loss": settings["loss"], "norms": which, "steps": steps}
    measured.update({f"final_{k}": {f"p={p:g}": ci_dict(v[:, i]) for i, p in enumerate(RATES)}
                     for k, v in finals.items()})
    measured.update({f"spread_{k}": ci_dict(v) for k, v in spreads.items()})
    measured["spread_B_minus_spread_A"] = ci_dict(samples["more"])
    measured["spread_B_over_spread_A"] = log_ratio_ci(spreads["B"], spreads["A"])
    numbers = {"step": runs["p=0"][0]["step"], "rates": RATES, "placement": pl, "loss": settings["loss"],
               "norms": which, "n_seeds": len(ctx.seeds), "first_seed": ctx.seeds[0],
               "norm_A": curves["A"].mean(axis=0),
               "norm_B": curves["B"].mean(axis=0), "train_loss": loss.mean(axis=0)}
    if "traced" in runs:  # the closed-form strengths on the last layer along one run: the paper's argument
        sh = {**runs["traced"][0], **DecayStrengths.of(runs["traced"][0])}
        on_a, on_b = sh["strength_A"].mean(axis=1), sh["strength_B"].mean(axis=1)
        numbers.update(strength_step=sh["step"], strength_A=on_a, strength_B=on_b)
        measured["strengths_first_seed"] = {
            "p": STRENGTH_RATE, "on_A_step0": float(on_a[0]), "on_B_step0": float(on_b[0]),
            "on_A_final": float(on_a[-1]), "on_B_final": float(on_b[-1]),
            "dist_A_final_summed": float(np.sqrt((sh["dist_A"][-1] ** 2).sum())),
            "exact_for_this_loss": settings["loss"] == "mse"}

    def pct(d):
        return f"{100 * d['mean']:.0f}% [{100 * d['ci_low']:.0f}, {100 * d['ci_high']:.0f}]"

    r = measured["spread_B_over_spread_A"]
    summary = (f"{base.optimizer.upper()} lr {base.lr:g}, {pl} placement, {settings['loss'].upper()} loss, {'total' if which == 'summed' else 'last-layer'} "
               f"norms after {steps} steps, {len(ctx.seeds)} seeds; spread over p in {RATES}: ||A|| "
               f"{pct(measured['spread_A'])}, ||B|| {pct(measured['spread_B'])}, ratio {r['ratio']:.2f} "
               f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] (paper ~30% vs >500%, ratio ~17).")
    if "traced" in runs:
        st = measured["strengths_first_seed"]
        summary += (f" Closed-form decay strengths on the last layer (MSE formula, p = {STRENGTH_RATE:g}, seed "
                    f"{ctx.seeds[0]}): at step 0 on A {st['on_A_step0']:.1g} (B = 0), on B {st['on_B_step0']:.3g}; "
                    f"at the end on B / on A = {st['on_B_final'] / st['on_A_final']:.0f}.")
    config = {"base": base.as_dict(), "rates": RATES, "seeds": list(ctx.seeds), "norms": which,
              "strengths": "analysis.dropout.penalty_strengths(X / sqrt(N), A, B, p) of layers.2 on one run (first "
                           "seed, p = 0.5), X = dropout-free features of the fine-tune set (bottleneck MSE closed "
                           "form)", "fidelity_note": "default 300 steps (was 600), batched engine, for the budget"}
    key = {"spread_A": measured["spread_A"]["mean"], "spread_B": measured["spread_B"]["mean"], "ratio": r["ratio"]}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 2, width=4.6, height=3.3)
    panels = axes.ravel()
    step = numbers["step"]
    for c, (i, p) in zip(colors(len(numbers["rates"])), enumerate(numbers["rates"]), strict=True):
        for ax, key in zip(panels[:3], ("norm_A", "norm_B", "train_loss"), strict=True):
            ax.plot(step, numbers[key][i], color=c, label=f"p = {p:g}")
    what = "3 layers" if numbers["norms"] == "summed" else "last layer"
    panels[0].set_ylabel(f"||A|| (Frobenius, {what})")
    panels[1].set_ylabel(f"||B|| (Frobenius, {what})")
    panels[2].set_ylabel(f"train loss ({numbers['loss'].upper()}, fine-tune set)")
    panels[2].set_yscale("log")
    panels[0].set_title(f"{numbers['placement']} placement, mean over {numbers['n_seeds']} seeds", fontsize=8)
    if "strength_step" in numbers:
        st_step, on_a, on_b = numbers["strength_step"], numbers["strength_A"], numbers["strength_B"]
        panels[3].plot(st_step, on_b, "-", label=f"on B, p = {STRENGTH_RATE:g}")
        # at step 0 (B = 0) the strength on A is exactly 0: not drawable on a log scale
        panels[3].plot(st_step[1:], on_a[1:], ":", label=f"on A, p = {STRENGTH_RATE:g}")
        panels[3].set_yscale("log")
        panels[3].legend(fontsize=6)
    panels[3].set_ylabel("decay strength per channel (mean over k)")
    panels[3].set_title(f"last layer, bottleneck MSE closed form (seed {numbers['first_seed']}):\n"
                        "on b_k v s^2 ||X a_k||^2 / N, on a_k v s^2 ||b_k||^2 (X^T X / N metric)", fontsize=7)
    for ax in panels:
        ax.set_xlabel("step")
    panels[0].legend(fontsize=6)
    return fig

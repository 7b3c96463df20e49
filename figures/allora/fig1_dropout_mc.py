"""ALLoRA fig. 1: the Monte Carlo error of the sampled dropout loss, against the exact E[L] and Std[L] of the
last layer's least-squares problem (:mod:`analysis.dropout`) after a short dropout-free fine-tune."""

from __future__ import annotations

import math

import numpy as np

from analysis import dropout as closed
from figures import seeds
from figures.allora.protocol import MSE_SGD_LR, OPTIMIZER_UNSTATED, last_layer_problem, log_ratio_ci
from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_dict, mean_ci
from figures.framework import Measurement, Probe, Protocol, Runs, Unavailable, real_datasets
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-fig1-dropout-mc"
PAPER = "ALLoRA fig. 1"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("the mean of n dropout realisations of the LoRA loss converges to E[L] only like Std[L]/sqrt(n): even after "
         "hundreds of realisations its error goes beyond the regularisation benefit it estimates (the dropout "
         "penalty)")

RATES = (0.05, 0.1, 0.2, 0.5)
N_REF = 256  # "after hundreds of realisations"
NOISE_FLOOR = 1.0  # fig. 1 caption: the noise goes "well beyond its regularization benefit"


def noise_test(p: float) -> str:
    return f"noise_over_penalty_p={p:g}"


CRITERION = Criterion(
    tests=(
        *(Test(noise_test(p), f"ln(mean |mean_n L - E[L]| at n = {N_REF} / dropout penalty), p = {p:g}, per problem "
               "seed", "greater", margin=math.log(NOISE_FLOOR), margin_from="paper",
               why="fig. 1's caption: after hundreds of realisations the estimate is still poor, 'random noise that "
                   "go well beyond its regularization benefit'; the benefit is the penalty E[L] - L(no dropout), so "
                   "the smallest effect that counts is noise = penalty (ratio 1)") for p in RATES),
        Test("bound_holds", "SANITY: max over seeds, rates and n of (mean |dev| - Std[L]/sqrt(n)) / SE", "less",
             margin=5.0, method="exact", role="sanity",
             why="app. A's bound follows from Jensen's inequality and cannot fail; 5 standard errors of the "
                 "Monte-Carlo estimator"),
        Test("clt_limit", "SANITY: max over rates of |mean |dev| / bound at n_max - sqrt(2/pi)| / SE (groups and "
             "seeds pooled)", "less", margin=5.0, method="exact", role="sanity",
             why="the CLT limit of the ratio; checks the Monte Carlo, not the claim"),
    ),
    rule=Rule(reproduced=tuple(noise_test(p) for p in RATES), partially=tuple((noise_test(p),) for p in RATES)),
    note="Partially reproduced: the noise exceeds the penalty at some rates only (Holm over the rates, so that a "
         "single passing rate is a 5% test too). The problem (A, B) comes from a short dropout-free fine-tune whose "
         "optimizer the paper does not name: the headline is combined over Adam and SGD on MNIST (the headline "
         "policy).",
    recalibrations=(
        Recalibration(
            old="reproduced if the mean |dev| never exceeds Std/sqrt(n) by more than 5 SE AND, at n = 256, the mean "
                "|dev| is >= 10% of the dropout penalty in every panel (one problem seed); partially if one holds",
            new="the bound and the CLT limit are sanity rows; the claim is a one-sided t-test over 10 problem seeds "
                "of ln(|dev| at n = 256 / penalty) > ln 0.1 per rate, Holm over the rates; partially if some rates "
                "pass; data sets as protocols",
            why="the bound is Jensen's inequality (it cannot fail, so it cannot carry half of a verdict); one "
                "problem seed gives no interval. E2's plan 'partially unless every rate is significantly below' "
                "cannot be declared as a rule of passed tests, and an inconclusive test is no partial support"),
        Recalibration(
            old="ln(|dev| at n = 256 / penalty) > ln 0.1 (10% of the penalty, a judgement); headline at the "
                "Adam-trained MNIST problem, marked as the paper's protocol; 2 protocols (data sets)",
            new="ln(|dev| at n = 256 / penalty) > 0: the noise exceeds the penalty, the yardstick of fig. 1's "
                "caption; headline over the Adam- and SGD-trained problems (plausible); + a 3x longer fine-tune",
            why="issue 16: a margin from the paper's words ('noise that go well beyond its regularization "
                "benefit'), not a judgement; the paper names no optimizer for the fine-tune; >= 4 protocols"),))

PROTOCOLS = (
    Protocol("mnist", {"dataset_index": 0}, primary=True, plausible=True,
             note=f"the paper's first column; problem fine-tuned by Adam (lr 1e-3); plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("mnist sgd", {"dataset_index": 0, "optimizer": "sgd", "lr": MSE_SGD_LR}, plausible=True,
             note=f"the paper's first column; problem fine-tuned by SGD (lr {MSE_SGD_LR:g}, below the MSE "
                  f"curvature bound, protocol.py); plausible: "
                  f"{OPTIMIZER_UNSTATED}"),
    Protocol("second data set", {"dataset_index": 1},
             note="the paper's CIFAR-10 column; Fashion-MNIST where CIFAR-10 is absent"),
    Protocol("mnist long fine-tune", {"dataset_index": 0, "problem_steps": 600},
             note="the problem after 600 fine-tuning steps instead of 200 (the paper: the Std 'may increase' as "
                  "training progresses)"),
)


class ProbeProblem(Probe):
    """The last layer's least-squares problem (:func:`figures.allora.protocol.last_layer_problem`) on the
    engine's probe batch."""

    prefix = "fig1_"
    version = 1
    cache_name = "figures.allora_dropout._ProbeProblem"  # its module until issue 15 (keeps the cached runs)

    def measure(self, state) -> dict[str, np.ndarray]:
        x, y = state.data.finetune
        return last_layer_problem(state.model, state.layers[-1], x[state.probe], y[state.probe])


def _dataset(ctx) -> tuple[str, dict]:
    names, notes = real_datasets(("mnist", "cifar10"))
    j = int(ctx.settings.get("dataset_index", 0))
    if j >= len(names):
        raise Unavailable(f"no data set number {j + 1} available here: {notes}")
    return names[j], notes


def _problem_config(ctx):
    """A short dropout-free last-layer LoRA fine-tune (MSE) whose final A, B define the problem (optimizer, lr and
    length from the protocol)."""
    train = {k: ctx.settings[k] for k in ("optimizer", "lr") if k in ctx.settings}
    return base_config(ctx, _dataset(ctx)[0], targets=("layers.2",), loss="mse", dropout=0.0, placement="bottleneck",
                       steps=ctx.pick(quick=20, default=int(ctx.settings.get("problem_steps", 200))), recorders=(),
                       **train)


def configs(ctx) -> dict:
    cfg = _problem_config(ctx)
    return {"problem": Runs(cfg, callbacks=(ProbeProblem([cfg.steps]),))}


def deviations(prob: dict[str, np.ndarray], p: float, grid: np.ndarray, groups: int, mc_seed: int) -> dict:
    """Monte Carlo of ALLoRA fig. 1 on one last-layer problem at rate ``p``: ``groups`` independent means of the
    first n of n_max = grid[-1] dropout realisations of L (:func:`analysis.dropout.sample_loss`), for each n of
    ``grid``. Returns the exact E[L], Std[L] and dropout penalty E[L] - L(p = 0), and per n the mean over groups
    of |mean_n - E[L]| (``mean_dev``), its standard error (``se``), the app. A bound Std/sqrt(n) and the CLT
    value sqrt(2/pi) Std/sqrt(n); ``ratio_n_max`` holds each group's |dev| / bound at n_max."""
    X, Y, W, A, B = (prob[k] for k in ("X", "Y", "W", "A", "B"))
    s = float(prob["s"])
    e_loss = closed.expected_loss(X, Y, W, A, B, p, scaling=s)
    std = math.sqrt(closed.loss_variance(X, Y, W, A, B, p, scaling=s))
    penalty = closed.dropout_penalty(X, A, B, p, scaling=s)
    n_max = int(grid[-1])
    # 1 MiB chunks: the (chunk N, r) x (r, d_out) products stay below OpenBLAS's threading threshold, which on a
    # busy 2-core machine made the default 4 MiB chunks ~9x slower (threads spinning); same draws, same numbers
    draws = closed.sample_loss(X, Y, W, A, B, p, groups * n_max, scaling=s, seed=mc_seed,
                               max_chunk_bytes=2**20).reshape(groups, n_max)
    running = np.cumsum(draws, axis=1)[:, grid - 1] / grid  # (groups, len(grid)): mean of the first n
    dev = np.abs(running - e_loss)
    bound = closed.deviation_bound(std, grid)
    return {"expected_loss": e_loss, "std_loss": std, "dropout_penalty": penalty, "mean_dev": dev.mean(axis=0),
            "se": dev.std(axis=0, ddof=1) / math.sqrt(groups), "bound": bound,
            "clt": closed.deviation_clt(std, grid), "ratio_n_max": dev[:, -1] / bound[-1],
            "z_grand_mean": float((draws.mean() - e_loss) / (draws.std(ddof=1) / math.sqrt(draws.size)))}


def measure(ctx, runs) -> Measurement:
    ds, notes = _dataset(ctx)
    j = int(ctx.settings.get("dataset_index", 0))
    n_max = ctx.pick(quick=64, default=1024)
    groups = ctx.pick(quick=16, default=32)  # per problem seed; was 200 groups on one seed
    n_ref = min(N_REF, n_max)
    grid = 2 ** np.arange(int(math.log2(n_max)) + 1)
    ref = int(np.flatnonzero(grid == n_ref)[0])
    probs = [{k: v[-1] for k, v in ProbeProblem.of(h).items()} for h in runs["problem"]]
    res: dict = {p: [deviations(prob, p, grid, groups, seeds.dropout_loss_draws(seed, j, i))
                     for seed, prob in zip(ctx.seeds, probs, strict=True)] for i, p in enumerate(RATES)}
    ratio = {p: np.array([d["mean_dev"][ref] / d["dropout_penalty"] for d in res[p]]) for p in RATES}
    z_bound = max(float(np.max((d["mean_dev"] - d["bound"]) / d["se"])) for p in RATES for d in res[p])
    clt_z, clt_ratio = {}, {}
    for p in RATES:
        pooled = np.concatenate([d["ratio_n_max"] for d in res[p]])
        clt_ratio[p] = float(pooled.mean())
        clt_z[p] = float(abs(pooled.mean() - math.sqrt(2 / math.pi)) / (pooled.std(ddof=1) / math.sqrt(pooled.size)))
    samples = {**{noise_test(p): np.log(ratio[p]) for p in RATES}, "bound_holds": z_bound,
               "clt_limit": max(clt_z.values())}
    measured: dict = {"notes": notes, "dataset": ds, "n_ref": n_ref, "groups_per_seed": groups, "n_max": n_max,
                      "n": grid, "max_z_above_bound": z_bound}
    for p in RATES:
        rs = res[p]
        measured[f"p={p:g}"] = {
            f"abs_dev_over_penalty_at_n={n_ref}": log_ratio_ci([d["mean_dev"][ref] for d in rs],
                                                               [d["dropout_penalty"] for d in rs]),
            f"abs_dev_over_expected_loss_at_n={n_ref}": log_ratio_ci([d["mean_dev"][ref] for d in rs],
                                                                     [d["expected_loss"] for d in rs]),
            f"ratio_to_bound_at_n={n_max}": clt_ratio[p], "z_ratio_vs_clt_limit": clt_z[p],
            "expected_loss": ci_dict([d["expected_loss"] for d in rs]),
            "std_loss": ci_dict([d["std_loss"] for d in rs]),
            "dropout_penalty": ci_dict([d["dropout_penalty"] for d in rs]),
            "max_abs_z_grand_mean_vs_expected_loss": float(max(abs(d["z_grand_mean"]) for d in rs)),
            "first_seed": {k: rs[0][k] for k in ("mean_dev", "se", "bound")},
        }
    parts = [f"p = {p:g}: {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
             for p in RATES for r in [measured[f"p={p:g}"][f"abs_dev_over_penalty_at_n={n_ref}"]]]
    pc = _problem_config(ctx)
    summary = (f"{ds}, problem after {pc.steps} {pc.optimizer.upper()} steps (lr {pc.lr:g}), {len(ctx.seeds)} "
               f"problem seeds, {groups} independent groups of n <= {n_max} realisations per "
               f"seed and rate. Mean |dev| at n = {n_ref} over the dropout penalty (geometric mean [{CI_PCT} CI]): "
               + "; ".join(parts) + f". Sanity: the largest excess over Std/sqrt(n) is {z_bound:+.1f} SE; the ratio "
               f"to the bound at n = {n_max} is {min(clt_ratio.values()):.3f}-{max(clt_ratio.values()):.3f} (CLT "
               f"limit {math.sqrt(2 / math.pi):.3f}).")
    config = {"problem": pc.as_dict(), "rates": RATES, "placement": "bottleneck",
              "groups_per_seed": groups, "n_max": n_max, "seeds": list(ctx.seeds),
              "mc_seed": seeds.SCHEMES["allora-fig1-dropout-mc"],
              "probe": "engine probe batch (the run's 'probe' stream), dropout-free features",
              "fidelity_note": "default: 32 groups per seed x 10 seeds (was 200 groups on one seed), for the budget"}
    key = {f"noise_over_penalty_p={p:g}": float(np.exp(np.log(ratio[p]).mean())) for p in RATES}
    numbers = {"dataset": ds, "first_seed": ctx.seeds[0], "n": grid, "n_ref": n_ref,
               "panels": {f"{p:g}": {k: res[p][0][k] for k in ("mean_dev", "se", "bound", "clt", "dropout_penalty")}
                          for p in RATES},
               "ratio_per_seed": {f"{p:g}": ratio[p] for p in RATES}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[ds], config=config,
                       draw=numbers)


def draw(numbers):
    rates = list(numbers["panels"])
    fig, axes = new_figure(len(rates) + 1, 1, width=3.2, height=3.0)
    c_emp, c_bound, c_clt, c_pen = colors(4)
    grid = np.asarray(numbers["n"])
    for i, p in enumerate(rates):
        d = {k: np.asarray(v) for k, v in numbers["panels"][p].items()}
        ax = axes[0, i]
        ax.errorbar(grid, d["mean_dev"], yerr=2 * d["se"], fmt="o", ms=3, color=c_emp, label="mean |dev| (+-2 SE)")
        ax.plot(grid, d["bound"], color=c_bound, label="Std[L]/sqrt(n) (app. A bound)")
        ax.plot(grid, d["clt"], "--", color=c_clt, label="sqrt(2/pi) Std[L]/sqrt(n) (CLT)")
        ax.axhline(d["dropout_penalty"], color=c_pen, ls=":", label="dropout penalty E[L] - L(no dropout) = claim margin")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{numbers['dataset']}, p = {p} (problem seed {numbers['first_seed']})", fontsize=8)
        ax.set_xlabel("n (dropout realisations averaged)")
        if i == 0:
            ax.set_ylabel("|mean_n L - E[L]| (loss units)")
            ax.legend(fontsize=5, loc="lower left")
    ax = axes[0, -1]
    for i, p in enumerate(rates):
        ratio = np.asarray(numbers["ratio_per_seed"][p])
        ax.scatter(np.full(ratio.size, i) + np.linspace(-0.15, 0.15, ratio.size), ratio, s=10, color=c_emp,
                   alpha=0.7)
        m, lo, hi = (np.exp(v) for v in mean_ci(np.log(ratio)))
        ax.errorbar(i + 0.3, m, yerr=[[m - lo], [hi - m]], fmt="D", color="k", capsize=3)
    ax.axhline(NOISE_FLOOR, color=c_pen, ls="-.", label=f"claim margin {NOISE_FLOOR:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rates)), [f"p = {p}" for p in rates])
    ax.set_ylabel(f"mean |dev| at n = {numbers['n_ref']}\n/ dropout penalty")
    ax.set_title(f"per problem seed (dots);\ngeometric mean, {CI_PCT} CI", fontsize=8)
    ax.legend(fontsize=6)
    return fig

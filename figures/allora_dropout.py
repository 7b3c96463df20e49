"""ALLoRA sec. 3.1-3.4: dropout with LoRA. Fig. 1 (Monte Carlo error of the dropout loss), fig. 2 (std of the
gradients across masks), fig. 3 (norms of A and B), fig. 4 (expected-loss vs sampled-dropout training) and
table 5 / fig. 5 left (accuracy vs epochs per dropout rate).

Placement: the paper's analysis (eq. 1) puts dropout at the bottleneck x A^T; figs. 1-4 use
``placement="bottleneck"`` (fig. 3 also reports PEFT's "input"); table 5 is the paper's LLM experiment run
with PEFT, so it uses ``"input"`` (see ERRATA.md D5).

Figs. 1-3 measure closed-form quantities of the live model during the engine's runs: their measurements are
engine callbacks (:class:`toymodels.callbacks.AtSteps` subclasses), cached with the run's history.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn

from analysis import dropout as closed
from figures import Context, Measurement, Protocol, figure
from figures._common import base_config, ci_dict, colors, mean_ci, new_figure, real_datasets
from figures.criteria import Criterion, Recalibration, Rule, Test
from toymodels import train as engine
from toymodels.callbacks import AtSteps
from toymodels.lora import LoRALinear

# ---------------------------------------------------------------------------------------------------- helpers


def _steps_per_epoch(cfg) -> int:
    return max(1, cfg.n_finetune // cfg.batch_size) if cfg.batch_size else 1


@torch.no_grad()
def _last_layer_problem(model, layer: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """The least-squares problem of the last layer (float64): X = penultimate features (dropout-free), Y =
    one-hot minus the bias (so the prediction is X W^T + s X A^T B^T), W, A, B and the scaling s."""
    was = model.training
    model.eval()
    X = model.features(x).double().cpu().numpy()
    model.train(was)
    Y = nn.functional.one_hot(y, layer.out_features).double().cpu().numpy() - layer.base.bias.double().cpu().numpy()
    return {"X": X, "Y": Y, "W": layer.base.weight.double().cpu().numpy(), "A": layer.lora_A.double().cpu().numpy(),
            "B": layer.lora_B.double().cpu().numpy(), "s": np.float64(layer.scaling)}


class _Measure(AtSteps):
    """A figure's measurement at chosen steps; :meth:`of` returns its part of a run's history, prefix removed."""

    version = 1  # bump when a measurement changes (it is part of the run-cache key)

    @classmethod
    def of(cls, hist: dict) -> dict[str, np.ndarray]:
        return {k[len(cls.prefix):]: v for k, v in hist.items() if k.startswith(cls.prefix)}


class _ProbeProblem(_Measure):
    """Fig. 1: the last layer's least-squares problem (:func:`_last_layer_problem`) on the probe batch."""

    prefix = "fig1_"

    def measure(self, state) -> dict[str, np.ndarray]:
        x, y = state.data.finetune
        return _last_layer_problem(state.model, state.layers[-1], x[state.probe], y[state.probe])


def _log_ratio_ci(num, den) -> dict:
    """CI over seeds of log(num / den), returned as ratios (geometric mean and its interval)."""
    d = ci_dict(np.log(np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)))
    return {"ratio": math.exp(d["mean"]), "ci_low": math.exp(d["ci_low"]), "ci_high": math.exp(d["ci_high"]),
            "n": d["n"], "confidence": d["confidence"]}


def _spearman(x, y) -> float:
    if np.ptp(np.asarray(y, dtype=np.float64)) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


# ------------------------------------------------------------------------------------------------------ fig. 1

FIG1_RATES = (0.05, 0.1, 0.2, 0.5)
FIG1_N_REF = 256  # "after hundreds of realisations"
FIG1_NOISE_FLOOR = 0.1  # the claim: the Monte Carlo error is still >= 10% of the dropout penalty at n = 256


def _fig1_problems(ctx: Context, dataset: str) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Per seed: A, B after a short dropout-free last-layer LoRA fine-tune (MSE), and the problem on the probe
    batch (one sweep, in parallel; the measurement is the :class:`_ProbeProblem` callback)."""
    cfg = base_config(ctx, dataset, targets=("layers.2",), loss="mse", dropout=0.0, placement="bottleneck",
                      steps=ctx.pick(quick=20, default=200), recorders=())
    hists = engine.run_sweep([cfg.replace(seed=s) for s in ctx.seeds], device=ctx.device, executor=ctx.executor,
                             workers=ctx.workers, progress=False, callbacks=[_ProbeProblem([cfg.steps])])
    return [{k: v[-1] for k, v in _ProbeProblem.of(h).items()} for h in hists], cfg.as_dict()


def fig1_deviations(prob: dict[str, np.ndarray], p: float, grid: np.ndarray, groups: int, mc_seed: int) -> dict:
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


def _fig1_name(p: float) -> str:
    return f"noise_over_penalty_p={p:g}"


FIG1_CRITERION = Criterion(
    tests=(
        *(Test(_fig1_name(p), f"ln(mean |mean_n L - E[L]| at n = {FIG1_N_REF} / dropout penalty), p = {p:g}, per "
               "problem seed", "greater", margin=math.log(FIG1_NOISE_FLOOR),
               why="the penalty E[L] - L(no dropout) is the regularisation the sampled loss estimates; a noise below "
                   "10% of it cannot change what is optimised qualitatively") for p in FIG1_RATES),
        Test("bound_holds", "SANITY: max over seeds, rates and n of (mean |dev| - Std[L]/sqrt(n)) / SE", "less",
             margin=5.0, method="exact", role="sanity",
             why="app. A's bound follows from Jensen's inequality and cannot fail; 5 standard errors of the "
                 "Monte-Carlo estimator"),
        Test("clt_limit", "SANITY: max over rates of |mean |dev| / bound at n_max - sqrt(2/pi)| / SE (groups and "
             "seeds pooled)", "less", margin=5.0, method="exact", role="sanity",
             why="the CLT limit of the ratio; checks the Monte Carlo, not the claim"),
    ),
    rule=Rule(reproduced=tuple(_fig1_name(p) for p in FIG1_RATES),
              partially=tuple((_fig1_name(p),) for p in FIG1_RATES)),
    note="Partially reproduced: the noise exceeds 10% of the penalty at some rates only (Holm over the rates, so "
         "that a single passing rate is a 5% test too).",
    recalibrations=(Recalibration(
        old="reproduced if the mean |dev| never exceeds Std/sqrt(n) by more than 5 SE AND, at n = 256, the mean "
            "|dev| is >= 10% of the dropout penalty in every panel (one problem seed); partially if one holds",
        new="the bound and the CLT limit are sanity rows; the claim is a one-sided t-test over 10 problem seeds of "
            "ln(|dev| at n = 256 / penalty) > ln 0.1 per rate, Holm over the rates; partially if some rates pass; "
            "data sets as protocols",
        why="the bound is Jensen's inequality (it cannot fail, so it cannot carry half of a verdict); one problem "
            "seed gives no interval. E2's plan 'partially unless every rate is significantly below' cannot be "
            "declared as a rule of passed tests, and an inconclusive test is no partial support"),))


@figure("allora-fig1-dropout-mc", paper="ALLoRA fig. 1",
        claim="the mean of n dropout realisations of the LoRA loss converges to E[L] only like Std[L]/sqrt(n): "
              "after hundreds of realisations the error is still large (compared with the dropout penalty it "
              "estimates)", criterion=FIG1_CRITERION,
        protocols=(Protocol("mnist", {"dataset_index": 0}, primary=True, paper=True, note="the paper's first column"),
                   Protocol("second data set", {"dataset_index": 1}, paper=True,
                            note="the paper's CIFAR-10 column; Fashion-MNIST where CIFAR-10 is absent")))
def dropout_mc(ctx: Context, protocol: Protocol) -> Measurement:
    names, notes = real_datasets(("mnist", "cifar10"))
    j = int(protocol.settings.get("dataset_index", 0))
    if j >= len(names):
        return Measurement(unavailable=f"no data set number {j + 1} available here: {notes}")
    ds = names[j]
    n_max = ctx.pick(quick=64, default=1024)
    groups = ctx.pick(quick=16, default=32)  # per problem seed; was 200 groups on one seed
    n_ref = min(FIG1_N_REF, n_max)
    grid = 2 ** np.arange(int(math.log2(n_max)) + 1)
    ref = int(np.flatnonzero(grid == n_ref)[0])
    res: dict = {p: [] for p in FIG1_RATES}  # per rate: one deviations dict per seed
    probs, cfg_dict = _fig1_problems(ctx, ds)
    for seed, prob in zip(ctx.seeds, probs, strict=True):
        for i, p in enumerate(FIG1_RATES):
            res[p].append(fig1_deviations(prob, p, grid, groups, mc_seed=1000 * seed + 10 * j + i))
    ratio = {p: np.array([d["mean_dev"][ref] / d["dropout_penalty"] for d in res[p]]) for p in FIG1_RATES}
    z_bound = max(float(np.max((d["mean_dev"] - d["bound"]) / d["se"])) for p in FIG1_RATES for d in res[p])
    clt_z, clt_ratio = {}, {}
    for p in FIG1_RATES:
        pooled = np.concatenate([d["ratio_n_max"] for d in res[p]])
        clt_ratio[p] = float(pooled.mean())
        clt_z[p] = float(abs(pooled.mean() - math.sqrt(2 / math.pi)) / (pooled.std(ddof=1) / math.sqrt(pooled.size)))
    samples = {**{_fig1_name(p): np.log(ratio[p]) for p in FIG1_RATES}, "bound_holds": z_bound,
               "clt_limit": max(clt_z.values())}
    measured: dict = {"notes": notes, "dataset": ds, "n_ref": n_ref, "groups_per_seed": groups, "n_max": n_max,
                      "n": grid, "max_z_above_bound": z_bound}
    for p in FIG1_RATES:
        rs = res[p]
        measured[f"p={p:g}"] = {
            f"abs_dev_over_penalty_at_n={n_ref}": _log_ratio_ci([d["mean_dev"][ref] for d in rs],
                                                                [d["dropout_penalty"] for d in rs]),
            f"abs_dev_over_expected_loss_at_n={n_ref}": _log_ratio_ci([d["mean_dev"][ref] for d in rs],
                                                                      [d["expected_loss"] for d in rs]),
            f"ratio_to_bound_at_n={n_max}": clt_ratio[p], "z_ratio_vs_clt_limit": clt_z[p],
            "expected_loss": ci_dict([d["expected_loss"] for d in rs]),
            "std_loss": ci_dict([d["std_loss"] for d in rs]),
            "dropout_penalty": ci_dict([d["dropout_penalty"] for d in rs]),
            "max_abs_z_grand_mean_vs_expected_loss": float(max(abs(d["z_grand_mean"]) for d in rs)),
            "first_seed": {k: rs[0][k] for k in ("mean_dev", "se", "bound")},
        }
    parts = [f"p = {p:g}: {r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
             for p in FIG1_RATES for r in [measured[f"p={p:g}"][f"abs_dev_over_penalty_at_n={n_ref}"]]]
    summary = (f"{ds}, {len(ctx.seeds)} problem seeds, {groups} independent groups of n <= {n_max} realisations per "
               f"seed and rate. Mean |dev| at n = {n_ref} over the dropout penalty (geometric mean [95% CI]): "
               + "; ".join(parts) + f". Sanity: the largest excess over Std/sqrt(n) is {z_bound:+.1f} SE; the ratio "
               f"to the bound at n = {n_max} is {min(clt_ratio.values()):.3f}-{max(clt_ratio.values()):.3f} (CLT "
               f"limit {math.sqrt(2 / math.pi):.3f}).")
    config = {"problem": cfg_dict, "rates": FIG1_RATES, "placement": "bottleneck", "groups_per_seed": groups,
              "n_max": n_max, "seeds": list(ctx.seeds), "mc_seed": "1000*seed + 10*dataset_index + rate_index",
              "probe": "engine probe batch (seed + 4), dropout-free features",
              "fidelity_note": "default: 32 groups per seed x 10 seeds (was 200 groups on one seed), for the budget"}
    key = {f"noise_over_penalty_p={p:g}": float(np.exp(np.log(ratio[p]).mean())) for p in FIG1_RATES}

    def plot():
        fig, axes = new_figure(len(FIG1_RATES) + 1, 1, width=3.2, height=2.8)
        c_emp, c_bound, c_clt, c_pen = colors(4)
        for i, p in enumerate(FIG1_RATES):
            d = res[p][0]
            ax = axes[0, i]
            ax.errorbar(grid, d["mean_dev"], yerr=2 * d["se"], fmt="o", ms=3, color=c_emp,
                        label="mean |dev| (+-2 SE)")
            ax.plot(grid, d["bound"], color=c_bound, label="Std[L]/sqrt(n) (app. A bound)")
            ax.plot(grid, d["clt"], "--", color=c_clt, label="sqrt(2/pi) Std[L]/sqrt(n) (CLT)")
            ax.axhline(d["dropout_penalty"], color=c_pen, ls=":", label="dropout penalty E[L] - L(no dropout)")
            ax.axhline(FIG1_NOISE_FLOOR * d["dropout_penalty"], color=c_pen, ls="-.", lw=0.8,
                       label=f"{FIG1_NOISE_FLOOR:g} x penalty (claim margin)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{ds}, p = {p:g} (problem seed {ctx.seeds[0]})", fontsize=8)
            ax.set_xlabel("n (dropout realisations averaged)")
            if i == 0:
                ax.set_ylabel("|mean_n L - E[L]| (loss units)")
                ax.legend(fontsize=5, loc="lower left")
        ax = axes[0, -1]
        for i, p in enumerate(FIG1_RATES):
            ax.scatter(np.full(ratio[p].size, i) + np.linspace(-0.15, 0.15, ratio[p].size), ratio[p], s=10,
                       color=c_emp, alpha=0.7)
            m, lo, hi = (np.exp(v) for v in mean_ci(np.log(ratio[p])))
            ax.errorbar(i + 0.3, m, yerr=[[m - lo], [hi - m]], fmt="D", color="k", capsize=3)
        ax.axhline(FIG1_NOISE_FLOOR, color=c_pen, ls="-.", label="claim margin 0.1")
        ax.set_yscale("log")
        ax.set_xticks(range(len(FIG1_RATES)), [f"p = {p:g}" for p in FIG1_RATES])
        ax.set_ylabel(f"mean |dev| at n = {n_ref} / dropout penalty")
        ax.set_title("per problem seed (dots); geometric mean, 95% CI", fontsize=8)
        ax.legend(fontsize=6)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[ds], config=config,
                       plot=plot)


# ------------------------------------------------------------------------------------------------------ fig. 2

FIG2_RATE = 0.2
_QUANTILES = {"mean": None, "median": 50.0, "q99": 99.0, "max": 100.0}


def _entry_stats(std: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics over entries (last axis) of per-entry stds: mean, median, 99th percentile, max."""
    out = {}
    for name, q in _QUANTILES.items():
        out[name] = std.mean(axis=-1) if q is None else np.percentile(std, q, axis=-1)
    return out


class _GradStdExact(_Measure):
    """Fig. 2's overlay (last layer, MSE, bottleneck dropout), on the probe batch at each epoch: ``epoch`` and the
    exact per-entry std of the gradients over masks, ``exact_A``, ``exact_B`` (:func:`analysis.dropout.
    grad_moments`, divided by N: the engine's loss is the batch mean); at ``mc_epochs`` also their Monte Carlo
    estimate over ``masks`` masks (``mc_A``, ``mc_B``, the standard errors of the variances ``mc_se_var_A``,
    ``mc_se_var_B``, and ``mc_epoch``), masks from the run's stream forked at offset 10000 + step."""

    prefix = "fig2_"

    def __init__(self, steps, *, spe: int, masks: int, mc_epochs):
        super().__init__(steps)
        self.spe, self.masks, self.mc_epochs = int(spe), int(masks), sorted(int(e) for e in mc_epochs)

    def params(self) -> dict:
        return {"spe": self.spe, "masks": self.masks, "mc_epochs": self.mc_epochs, "rate": FIG2_RATE}

    def measure(self, state) -> dict[str, np.ndarray]:
        model, layer, step = state.model, state.layers[-1], state.step
        x, y = state.data.finetune
        idx = state.probe
        prob = _last_layer_problem(model, layer, x[idx], y[idx])
        n = prob["X"].shape[0]
        _, var_a, _, var_b = closed.grad_moments(prob["X"], prob["Y"], prob["W"], prob["A"], prob["B"],
                                                 FIG2_RATE, scaling=float(prob["s"]))
        out = {"epoch": step // self.spe, "exact_A": np.sqrt(var_a).ravel() / n, "exact_B": np.sqrt(var_b).ravel() / n}
        if step // self.spe not in self.mc_epochs:
            return out
        with state.streams.fork(10_000 + step, x.device):
            h = model.features(x[idx]).detach()
            target = nn.functional.one_hot(y[idx], layer.out_features).to(h.dtype)
            gA, gB = [], []
            for _ in range(self.masks):
                loss = ((layer(h) - target) ** 2).sum(1).mean()
                a, b = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
                gA.append(a.double().flatten())
                gB.append(b.double().flatten())
        for name, g in (("A", torch.stack(gA).cpu().numpy()), ("B", torch.stack(gB).cpu().numpy())):
            var = g.var(axis=0, ddof=1)
            m4 = ((g - g.mean(axis=0)) ** 4).mean(axis=0)
            out[f"mc_{name}"] = np.sqrt(var)
            out[f"mc_se_var_{name}"] = np.sqrt(np.maximum(m4 - var**2, 0.0) / self.masks)
        out["mc_epoch"] = step // self.spe
        return out


def _fig2_exact(ctx: Context, seed: int, epochs: int) -> tuple[dict, dict]:
    """Last layer, MSE, bottleneck dropout: exact per-entry std (grad_moments) per epoch; MC std at the end."""
    cfg = base_config(ctx, "mnist", seed=seed, targets=("layers.2",), loss="mse", dropout=FIG2_RATE,
                      placement="bottleneck", recorders=())
    spe = _steps_per_epoch(cfg)
    cfg = cfg.replace(steps=epochs * spe, record_every=spe)
    masks = ctx.pick(quick=64, default=400)
    mc_epochs = sorted({0, epochs // 2, epochs})

    hist = engine.finetune(cfg, callbacks=[_GradStdExact([e * spe for e in range(epochs + 1)], spe=spe, masks=masks,
                                                         mc_epochs=mc_epochs)], device=ctx.device)
    return _GradStdExact.of(hist), {**cfg.as_dict(), "mc_masks": masks}


FIG2_CRITERION = Criterion(
    tests=(
        Test("heavier_tail", "log((q99 growth) / (mean growth)) of the per-entry std of second-layer B gradients, "
             "epoch 0 -> last (per seed)", "greater", margin=0.0,
             why="the distinctive claim: the tail grows relative to the mean (a direction)"),
        Test("mean_stable", "log(mean growth) of the per-entry std, epoch 0 -> last (per seed)", "equivalent",
             margin=float(np.log(2.0)),
             why="'the average decreases slightly': a factor 2 either way is the smallest change a log-scale panel "
                 "shows as more than slight"),
    ),
    rule=Rule(reproduced=("heavier_tail", "mean_stable"), partially=(("heavier_tail",),)),
    recalibrations=(Recalibration(
        old="reproduced if the q99 growth CI and the (q99/mean) growth CI are > 1 in every data set; partially if "
            "the q99 grows anywhere",
        new="heavier tail (q99/mean growth > 1) AND mean within a factor 2 (TOST), per data set as protocols; "
            "partially only if the tail gets heavier",
        why="the q99 also grows when the whole distribution grows (here the mean grows more than the tail), so "
            "'partially' rested on the part of the claim that is not distinctive"),))


@figure("allora-fig2-grad-std", paper="ALLoRA fig. 2",
        claim="over training, the tail of the per-entry std (across dropout masks) of second-layer gradients "
              "grows while its mean changes little", criterion=FIG2_CRITERION,
        protocols=(Protocol("mnist", {"dataset_index": 0}, primary=True, paper=True, note="the paper's left panel"),
                   Protocol("second data set", {"dataset_index": 1}, paper=True,
                            note="the paper's CIFAR-10 (right panel); Fashion-MNIST where CIFAR-10 is absent")))
def grad_std(ctx: Context, protocol: Protocol) -> Measurement:
    names, notes = real_datasets(("mnist", "cifar10"))
    epochs = ctx.pick(quick=15, default=30)
    n_masks = ctx.pick(quick=16, default=32)
    fig, axes = new_figure(2, 2, width=4.6, height=3.3)
    stat_colors = dict(zip(_QUANTILES, colors(len(_QUANTILES)), strict=True))
    measured: dict = {"notes": notes, "dropout": FIG2_RATE, "epochs": epochs}
    configs: dict = {}
    halves, post, seed_vals = {}, {}, {}
    for j, ds in enumerate(names):
        base = base_config(ctx, ds, dropout=FIG2_RATE, placement="bottleneck", recorders=("grad_std",),
                           grad_std_layer="layers.1", grad_std_masks=n_masks)
        spe = _steps_per_epoch(base)
        base = base.replace(steps=epochs * spe, record_every=spe)
        configs[ds] = base.as_dict()
        hists = engine.run_sweep([base.replace(seed=s) for s in ctx.seeds], device=ctx.device, progress=False,
                                 executor=ctx.executor, workers=ctx.workers)
        ep = hists[0]["step"] / spe
        per_seed = {"B": [_entry_stats(h["grad_std_B"]) for h in hists],
                    "A": [_entry_stats(h["grad_std_A"]) for h in hists]}
        ax = axes[0, j]
        for name, c in stat_colors.items():
            m, lo, hi = mean_ci(np.array([st[name] for st in per_seed["B"]]))
            ax.plot(ep, m, color=c, label=f"B entries: {name}")
            ax.fill_between(ep, lo, hi, color=c, alpha=0.2)
            if name in ("mean", "q99"):
                ma, _, _ = mean_ci(np.array([st[name] for st in per_seed["A"]]))
                ax.plot(ep[1:], ma[1:], ls="--", color=c, label=f"A entries: {name}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("std over masks of dL/d(entry)")
        ax.set_title(f"{ds}: layers.1 (second layer), p = {FIG2_RATE:g}", fontsize=8)
        ax.legend(fontsize=6)
        res = {}
        for mat, first in (("B", 0), ("A", 1)):  # A's gradient is exactly 0 at B = 0 (epoch 0): start at epoch 1
            sts = per_seed[mat]
            tail = [st["q99"][-1] / st["q99"][first] for st in sts]
            mean = [st["mean"][-1] / st["mean"][first] for st in sts]
            res[mat] = {
                "from_epoch": first,
                "q99_growth": _log_ratio_ci([st["q99"][-1] for st in sts], [st["q99"][first] for st in sts]),
                "max_growth": _log_ratio_ci([st["max"][-1] for st in sts], [st["max"][first] for st in sts]),
                "mean_growth": _log_ratio_ci([st["mean"][-1] for st in sts], [st["mean"][first] for st in sts]),
                "tail_over_mean_growth": _log_ratio_ci(tail, mean),
            }
        # informational, chosen after seeing the curves: growth measured from the end of B's escape from zero
        # (per seed, the epoch where the mean std peaks in the first third of training), not part of the verdict
        sts = per_seed["B"]
        starts = [int(np.argmax(st["mean"][: max(2, len(st["mean"]) // 3)])) for st in sts]
        res["B_after_escape_post_hoc"] = {"from_epoch": ci_dict([ep[k] for k in starts])}
        for name in ("q99", "max", "mean"):
            res["B_after_escape_post_hoc"][f"{name}_growth"] = _log_ratio_ci(
                [st[name][-1] for st in sts], [st[name][k] for st, k in zip(sts, starts, strict=True)])
        measured[ds] = res
        halves[ds] = res["B"]
        growth = {k: np.array([st[k][-1] / st[k][0] for st in per_seed["B"]]) for k in ("q99", "mean")}
        seed_vals[ds] = {"heavier_tail": np.log(growth["q99"] / growth["mean"]), "mean_stable": np.log(growth["mean"])}
        post[ds] = res["B_after_escape_post_hoc"]
    # exact overlay (last layer, MSE): grad_moments against Monte Carlo
    ex, ex_cfg = _fig2_exact(ctx, ctx.seeds[0], epochs)
    configs["exact_last_layer"] = ex_cfg
    ax = axes[1, 0]
    for name, c in stat_colors.items():
        ax.plot(ex["epoch"], _entry_stats(ex["exact_B"])[name], color=c, label=f"exact B: {name}")
        ax.plot(ex["mc_epoch"], _entry_stats(ex["mc_B"])[name], "o", color=c, ms=5, mfc="none")
        if name in ("mean", "q99"):
            ax.plot(ex["epoch"][1:], _entry_stats(ex["exact_A"])[name][1:], ls="--", color=c, label=f"exact A: {name}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("std over masks of dL/d(entry)")
    ax.set_title("mnist, layers.2 (last), MSE: exact (lines) vs MC (circles)", fontsize=8)
    ax.legend(fontsize=6)
    ax = axes[1, 1]
    zs, rel = [], []
    cA, cB = colors(2)
    for mat, c in (("A", cA), ("B", cB)):
        mc_std, ex_std = ex[f"mc_{mat}"], ex[f"exact_{mat}"][np.searchsorted(ex["epoch"], ex["mc_epoch"])]
        se = ex[f"mc_se_var_{mat}"]
        live = ex_std > 1e-9 * max(ex_std.max(), 1e-300)
        zs.append(np.abs(mc_std**2 - ex_std**2)[live] / np.maximum(se[live], 1e-300))
        rel.append(mc_std[live] / ex_std[live])
        last = ex_std[-1] > 0
        ax.loglog(ex_std[-1][last], mc_std[-1][last], ".", ms=3, color=c, label=f"{mat} entries, epoch {epochs}")
    lim = [min(a[a > 0].min() for a in (ex["exact_A"][-1], ex["exact_B"][-1])),
           max(ex["exact_A"][-1].max(), ex["exact_B"][-1].max())]
    ax.plot(lim, lim, "k--", lw=1, label="MC = exact")
    ax.set_xlabel("exact std (analysis.dropout.grad_moments)")
    ax.set_ylabel(f"Monte Carlo std ({ex_cfg['mc_masks']} masks)")
    ax.set_title("last layer: per-entry std, MC vs closed form", fontsize=8)
    ax.legend(fontsize=6)
    zs, rel = np.concatenate([z.ravel() for z in zs]), np.concatenate([r.ravel() for r in rel])
    exact_stats_B = _entry_stats(ex["exact_B"])
    measured["exact_last_layer"] = {
        "mc_vs_exact_max_abs_z_variance": float(zs.max()), "mc_vs_exact_entries": int(zs.size),
        "mc_vs_exact_fraction_abs_z_le_3": float(np.mean(zs <= 3)),
        "mc_over_exact_std_median": float(np.median(rel)), "mc_over_exact_std_p1_p99": np.percentile(rel, [1, 99]),
        "exact_B_q99_growth": float(exact_stats_B["q99"][-1] / exact_stats_B["q99"][0]),
        "exact_B_mean_growth": float(exact_stats_B["mean"][-1] / exact_stats_B["mean"][0]),
    }
    parts = [f"{ds}: q99 x{h['q99_growth']['ratio']:.2f} [{h['q99_growth']['ci_low']:.2f}, "
             f"{h['q99_growth']['ci_high']:.2f}], max x{h['max_growth']['ratio']:.2f}, mean x"
             f"{h['mean_growth']['ratio']:.2f} [{h['mean_growth']['ci_low']:.2f}, {h['mean_growth']['ci_high']:.2f}]"
             for ds, h in halves.items()]
    summary = (f"Second-layer B entries, epoch 0 -> {epochs}: " + "; ".join(parts)
               + ". Post hoc (not in the verdict), from the end of B's escape from zero (epoch of the early peak "
               "of the mean) to the last epoch: "
               + "; ".join(f"{ds}: q99 x{h['q99_growth']['ratio']:.2f} [{h['q99_growth']['ci_low']:.2f}, "
                           f"{h['q99_growth']['ci_high']:.2f}], mean x{h['mean_growth']['ratio']:.2f} "
                           f"[{h['mean_growth']['ci_low']:.2f}, {h['mean_growth']['ci_high']:.2f}]"
                           for ds, h in post.items())
               + f". Last layer (MSE): Monte Carlo std matches grad_moments (median MC/exact "
               f"{measured['exact_last_layer']['mc_over_exact_std_median']:.3f}, max |z| of the variance "
               f"{zs.max():.1f} over {zs.size} entry-checkpoints).")
    config = {"runs": configs, "seeds": list(ctx.seeds), "dropout": FIG2_RATE, "placement": "bottleneck",
              "grad_std_masks": n_masks}
    k = int(protocol.settings.get("dataset_index", 0))
    if k >= len(names):
        return Measurement(unavailable=f"no data set number {k + 1} available here: {notes}")
    ds = names[k]
    summary = f"Data set {ds}. " + summary
    key = {"q99_over_mean_growth": halves[ds]["tail_over_mean_growth"]["ratio"],
           "mean_growth": halves[ds]["mean_growth"]["ratio"]}
    return Measurement(samples=seed_vals[ds], measured=measured, summary=summary, key=key, datasets=names,
                       config=config, plot=lambda: fig)


# ------------------------------------------------------------------------------------------------------ fig. 3

FIG3_RATES = (0.0, 0.1, 0.3, 0.5)
FIG3_STRENGTH_RATE = 0.5  # the closed-form decay strengths are traced on one run (first seed) at this rate
FIG3_FAR_MORE = 3.0


class _DecayStrengths(_Measure):
    """Fig. 3, at the record steps: ``dist_A`` = ||A - A_0|| per layer, and the last layer's closed-form per-channel
    penalty strengths ``strength_A``, ``strength_B`` (:func:`analysis.dropout.penalty_strengths`, bottleneck
    formula, dropout-free features X of the whole fine-tune set scaled by 1/sqrt(N): per sample, as the engine's
    loss is a mean)."""

    prefix = "fig3_"

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
        prob = _last_layer_problem(state.model, layers[-1], *state.data.finetune)
        X = prob["X"] / math.sqrt(prob["X"].shape[0])
        on_a, on_b = closed.penalty_strengths(X, prob["A"], prob["B"], state.cfg.dropout, scaling=float(prob["s"]))
        return {"dist_A": [(m.lora_A - a0).norm().item() for m, a0 in zip(layers, self.init, strict=True)],
                "strength_A": on_a, "strength_B": on_b}


def _spread(final: np.ndarray) -> np.ndarray:
    """max / min - 1 over rates (axis 1), per seed (axis 0)."""
    return final.max(axis=1) / final.min(axis=1) - 1.0


def fig3_norm(norms: np.ndarray, which: str) -> np.ndarray:
    """Per record, the norm of fig. 3 from a run's per-layer norms (records x layers): ``summed`` = the Frobenius
    norm of all adapted layers together, sqrt(sum_l ||M_l||^2); ``last`` = the last layer's alone."""
    if which == "summed":
        return np.sqrt((norms**2).sum(axis=1))
    if which == "last":
        return norms[:, -1]
    raise ValueError(f"which must be 'summed' or 'last', got {which!r}")


FIG3_CRITERION = Criterion(
    tests=(
        Test("far_more", "ln(spread(||B||) / spread(||A||)), spread = max/min - 1 of the final norm over p in "
             f"{FIG3_RATES} (per seed)", "greater", margin=math.log(FIG3_FAR_MORE),
             why="the paper's ratio is ~17 (>500% vs ~30%); 3 is a lenient 'far more', far below it"),
        Test("more", "spread(||B||) - spread(||A||) (per seed)", "greater", margin=0.0,
             why="the direction of the asymmetry alone"),
    ),
    rule=Rule(reproduced=("far_more", "more"), partially=(("more",),)),
    correction="none",
    note="Each verdict level is one conjunction of one-sided 5% tests ('more' is implied by 'far_more'), an "
         "intersection-union test: no multiplicity correction is needed. The closed-form decay strengths "
         "(ALLoRA sec. 3.2) are for the MSE loss with dropout at the bottleneck: the 'MSE loss' protocol is where "
         "they describe the run exactly; with cross-entropy they are the MSE penalty at the run's weights.",
    recalibrations=(Recalibration(
        old="CI of spread(B) - spread(A) > 0 and the ratio of the seed-mean spreads >= 3 (a point estimate); "
            "600 steps, 3 seeds",
        new="one-sided t-test over 10 seeds of ln(spread_B / spread_A) > ln 3 (reproduced) and of spread_B - "
            "spread_A > 0 (partially); placement, loss (CE vs MSE) and per-layer vs summed norms as protocols; 300 "
            "steps (the shared horizon of the figures, for the 15-minute budget; the runs go through the batched "
            "engine)",
        why="a threshold on a ratio of means has no error bar; the closed form is for MSE while the paper's task is "
            "classification, and 'the norm of A' may mean one layer or all"),))

FIG3_PROTOCOLS = (
    Protocol("bottleneck, CE, summed", {"placement": "bottleneck", "loss": "ce", "norms": "summed"}, primary=True,
             paper=True, note="MNIST classification as in the paper; dropout at the bottleneck (its eq. 1); norms of "
                              "all adapted layers together"),
    Protocol("input placement", {"placement": "input", "loss": "ce", "norms": "summed"},
             note="dropout on the adapter's input, as PEFT"),
    Protocol("MSE loss", {"placement": "bottleneck", "loss": "mse", "norms": "summed"},
             note="the loss of the closed-form penalty strengths"),
    Protocol("last layer only", {"placement": "bottleneck", "loss": "ce", "norms": "last"},
             note="norms of the last layer's A and B (the layer of the closed form); the primary protocol's runs"),
)


@figure("allora-fig3-norms", paper="ALLoRA fig. 3",
        claim="dropout changes ||B|| far more than ||A|| (paper: final ||A|| varies by ~30%, ||B|| by >500% "
              "across rates)", criterion=FIG3_CRITERION, protocols=FIG3_PROTOCOLS)
def norms(ctx: Context, protocol: Protocol) -> Measurement:
    settings = dict(protocol.settings)
    which = settings.pop("norms", "summed")
    pl = settings["placement"]
    steps = ctx.pick(quick=30, default=300)
    base = base_config(ctx, "mnist", steps=steps, record_every=ctx.pick(quick=10, default=25),
                       recorders=("loss", "norms"), **settings)
    configs = [base.replace(seed=s, dropout=p) for s in ctx.seeds for p in FIG3_RATES]
    # plus, at the bottleneck, one run (first seed, p = 0.5) traced with the closed-form strengths (a callback);
    # the other runs have no custom callback and go to the batched engine, all in one parallel sweep
    traced = pl == "bottleneck"
    extra = [base.replace(seed=ctx.seeds[0], dropout=FIG3_STRENGTH_RATE)] if traced else []
    hists = engine.run_sweep(configs + extra, device=ctx.device, executor=ctx.executor, workers=ctx.workers,
                             progress=False, callbacks=[[]] * len(configs) + [[_DecayStrengths()]] * len(extra))
    n_r = len(FIG3_RATES)
    curves = {k: np.array([[fig3_norm(h[f"norm_{k}"], which) for h in hists[i * n_r:(i + 1) * n_r]]
                           for i in range(len(ctx.seeds))]) for k in ("A", "B")}  # (seeds, rates, records)
    loss = np.array([[h["train_loss"] for h in hists[i * n_r:(i + 1) * n_r]] for i in range(len(ctx.seeds))])
    step = hists[0]["step"]
    finals = {k: v[:, :, -1] for k, v in curves.items()}  # (seeds, rates)
    spreads = {k: _spread(v) for k, v in finals.items()}
    samples = {"far_more": np.log(spreads["B"] / spreads["A"]), "more": spreads["B"] - spreads["A"]}
    measured: dict = {"rates": FIG3_RATES, "placement": pl, "loss": settings["loss"], "norms": which, "steps": steps}
    measured.update({f"final_{k}": {f"p={p:g}": ci_dict(v[:, i]) for i, p in enumerate(FIG3_RATES)}
                     for k, v in finals.items()})
    measured.update({f"spread_{k}": ci_dict(v) for k, v in spreads.items()})
    measured["spread_B_minus_spread_A"] = ci_dict(samples["more"])
    measured["spread_B_over_spread_A"] = _log_ratio_ci(spreads["B"], spreads["A"])
    # the closed-form strengths on the last layer along one run (bottleneck formula): the paper's argument
    strengths = None
    if traced:
        sh = {**hists[-1], **_DecayStrengths.of(hists[-1])}
        on_a, on_b = sh["strength_A"].mean(axis=1), sh["strength_B"].mean(axis=1)
        strengths = (sh["step"], on_a, on_b)
        measured["strengths_first_seed"] = {
            "p": FIG3_STRENGTH_RATE, "on_A_step0": float(on_a[0]), "on_B_step0": float(on_b[0]),
            "on_A_final": float(on_a[-1]), "on_B_final": float(on_b[-1]),
            "dist_A_final_summed": float(np.sqrt((sh["dist_A"][-1] ** 2).sum())),
            "exact_for_this_loss": settings["loss"] == "mse"}

    def fmt(d):
        return f"{100 * d['mean']:.0f}% [{100 * d['ci_low']:.0f}, {100 * d['ci_high']:.0f}]"

    r = measured["spread_B_over_spread_A"]
    summary = (f"{pl} placement, {settings['loss'].upper()} loss, {'total' if which == 'summed' else 'last-layer'} "
               f"norms after {steps} steps, {len(ctx.seeds)} seeds; spread over p in {FIG3_RATES}: ||A|| "
               f"{fmt(measured['spread_A'])}, ||B|| {fmt(measured['spread_B'])}, ratio {r['ratio']:.2f} "
               f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] (paper ~30% vs >500%, ratio ~17).")
    if strengths is not None:
        st = measured["strengths_first_seed"]
        summary += (f" Closed-form decay strengths on the last layer (MSE formula, p = {FIG3_STRENGTH_RATE:g}, seed "
                    f"{ctx.seeds[0]}): at step 0 on A {st['on_A_step0']:.1g} (B = 0), on B {st['on_B_step0']:.3g}; "
                    f"at the end on B / on A = {st['on_B_final'] / st['on_A_final']:.0f}.")
    config = {"base": base.as_dict(), "rates": FIG3_RATES, "seeds": list(ctx.seeds), "norms": which,
              "strengths": "analysis.dropout.penalty_strengths(X / sqrt(N), A, B, p) of layers.2 on one run (first "
                           "seed, p = 0.5), X = dropout-free features of the fine-tune set (bottleneck MSE closed "
                           "form)", "fidelity_note": "default 300 steps (was 600), batched engine, for the budget"}
    key = {"spread_A": measured["spread_A"]["mean"], "spread_B": measured["spread_B"]["mean"],
           "ratio": r["ratio"]}

    def plot():
        fig, axes = new_figure(2, 2, width=4.6, height=3.3)
        panels = axes.ravel()
        for c, (i, p) in zip(colors(n_r), enumerate(FIG3_RATES), strict=True):
            for ax, vals in zip(panels[:3], (curves["A"], curves["B"], loss), strict=True):
                ax.plot(step, vals[:, i].mean(axis=0), color=c, label=f"p = {p:g}")
        what = "3 layers" if which == "summed" else "last layer"
        panels[0].set_ylabel(f"||A|| (Frobenius, {what})")
        panels[1].set_ylabel(f"||B|| (Frobenius, {what})")
        panels[2].set_ylabel(f"train loss ({settings['loss'].upper()}, fine-tune set)")
        panels[2].set_yscale("log")
        panels[0].set_title(f"{pl} placement, mean over {len(ctx.seeds)} seeds", fontsize=8)
        if strengths is not None:
            st_step, on_a, on_b = strengths
            panels[3].plot(st_step, on_b, "-", label=f"on B, p = {FIG3_STRENGTH_RATE:g}")
            # at step 0 (B = 0) the strength on A is exactly 0: not drawable on a log scale
            panels[3].plot(st_step[1:], on_a[1:], ":", label=f"on A, p = {FIG3_STRENGTH_RATE:g}")
            panels[3].set_yscale("log")
            panels[3].legend(fontsize=6)
        panels[3].set_ylabel("decay strength per channel (mean over k)")
        panels[3].set_title("last layer, bottleneck MSE closed form (seed 0): v s^2 ||X a_k||^2 / N on b_k,\n"
                            "v s^2 ||b_k||^2 on a_k (X^T X / N metric)", fontsize=7)
        for ax in panels:
            ax.set_xlabel("step")
        panels[0].legend(fontsize=6)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------------------ fig. 4

FIG4_RATES = (0.1, 0.3, 0.5)  # was (0.1, 0.2, 0.3, 0.5): three rates for the budget
FIG4_INTERIOR = 0.8  # "a few hundred steps" out of 1000: a peak in the last 20% of the horizon is not interior


def _fig4_rate(name: str, p: float) -> str:
    return f"{name}_p={p:g}"


def fig4_peak_tests(gaps: dict[float, np.ndarray], step: np.ndarray, horizon: int) -> tuple[dict, dict]:
    """The inputs of :data:`FIG4_CRITERION` from the test-loss gaps (sampled - expected), ``gaps[p]`` of shape
    (seeds, records) at the record steps ``step``: (a) ``increasing``: the smallest step between consecutive rates
    of the seed-mean per-seed peak gaps (exact), ``top_minus_bottom``: per-seed peak gap at the highest rate minus
    the lowest; (b) per rate, ``interior``: the step of the seed-mean curve's peak over the horizon (exact, in
    (0, 0.8)) and ``decline``: the gap at that step minus the final gap, per seed. Returns (samples, details)."""
    rates = sorted(gaps)
    peaks = np.array([gaps[p].max(axis=1) for p in rates])  # (rates, seeds)
    samples: dict = {"increasing": float(np.min(np.diff(peaks.mean(axis=1)))),
                     "top_minus_bottom": peaks[-1] - peaks[0]}
    details: dict = {}
    for p in rates:
        g = gaps[p]
        m = g.mean(axis=0)
        k = int(np.argmax(m))
        samples[_fig4_rate("interior", p)] = float(step[k] / horizon)
        samples[_fig4_rate("decline", p)] = g[:, k] - g[:, -1]
        details[p] = {"peak_step": float(step[k]), "peak_gap_mean_curve": float(m[k]), "per_seed_peak": peaks[
            rates.index(p)]}
    return samples, details


FIG4_CRITERION = Criterion(
    tests=(
        Test("increasing", f"smallest increase between consecutive rates {FIG4_RATES} of the seed-mean per-seed peak "
             "gap (test loss, sampled - expected)", "greater", margin=0.0, method="exact",
             why="'the gap consistently increases with the dropout rate' (an order, no threshold)"),
        Test("top_minus_bottom", f"per-seed peak gap at p = {FIG4_RATES[-1]:g} minus at p = {FIG4_RATES[0]:g}",
             "greater", margin=0.0, why="the increase must exceed the seed-to-seed noise"),
        *(Test(_fig4_rate("interior", p), f"step of the peak of the seed-mean gap curve / horizon, p = {p:g}",
               "equivalent", margin=(0.0, FIG4_INTERIOR), method="exact",
               why="'culminates after a few hundred training steps' of 1000: after step 0 and not in the last 20%")
          for p in FIG4_RATES),
        *(Test(_fig4_rate("decline", p), f"gap at that peak minus the final gap, p = {p:g} (per seed)", "greater",
               margin=0.0, why="'and then slowly goes down' (a direction)") for p in FIG4_RATES),
    ),
    rule=Rule(reproduced=("increasing", "top_minus_bottom", *(_fig4_rate(k, p) for k in ("interior", "decline")
                                                              for p in FIG4_RATES)),
              partially=(("increasing", "top_minus_bottom"),
                         tuple(_fig4_rate(k, p) for k in ("interior", "decline") for p in FIG4_RATES))),
    note="Partially reproduced: (a) the gap grows with the rate, or (b) it peaks inside the horizon and declines at "
         "every rate. Holm over the claim tests (the exact ones have p = 0 or 1).",
    recalibrations=(Recalibration(
        old="(a) seed means increasing and CI(peak(0.5) - peak(0.1)) > 0; (b) every rate: peak before 80% of the "
            "steps and CI(peak - final) > 0; 4 rates, 3 seeds",
        new="the same tests declared (exact order and peak position, one-sided t-tests), Holm over them; 3 rates "
            "(0.1, 0.3, 0.5) and 10 seeds; horizon and learning rate as protocols",
        why="declared rather than coded; the rate 0.2 is dropped for the 15-minute budget (the expected-loss runs "
            "cannot be batched)"),))

FIG4_PROTOCOLS = (
    Protocol("long horizon", {"steps": 1000, "lr": 1e-3}, primary=True,
             note="1000 steps, Adam lr 1e-3: the paper's 'few hundred steps' must fit well inside"),
    Protocol("short horizon", {"steps": 300, "lr": 1e-3}, note="300 steps (the shared horizon of the figures)"),
    Protocol("lr x1/3", {"steps": 1000, "lr": round(1e-3 / 3, 8)}, note="slower: the peak should move later"),
    Protocol("lr x3", {"steps": 1000, "lr": 3e-3}, note="faster: the peak should move earlier"),
)


@figure("allora-fig4-expected-vs-empirical", paper="ALLoRA fig. 4",
        claim="the test-loss gap between sampled-dropout and exact expected-loss training grows with the rate and "
              "peaks after a few hundred steps", criterion=FIG4_CRITERION, protocols=FIG4_PROTOCOLS)
def expected_vs_empirical(ctx: Context, protocol: Protocol) -> Measurement:
    steps = ctx.pick(quick=30, default=int(protocol.settings["steps"]))
    lr = float(protocol.settings["lr"])
    base = base_config(ctx, "mnist", targets=("layers.2",), loss="mse", placement="bottleneck", recorders=("loss",),
                       steps=steps, lr=lr, record_every=ctx.pick(quick=5, default=max(1, steps // 20)))
    configs = [base.replace(seed=s, dropout=p, expected_loss=e) for p in FIG4_RATES for s in ctx.seeds
               for e in (False, True)]
    hists = engine.run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False)
    it = iter(hists)
    gaps = {}
    for p in FIG4_RATES:
        rows = []
        for _ in ctx.seeds:
            emp, exp_ = next(it), next(it)
            rows.append(emp["test_loss"] - exp_["test_loss"])
        gaps[p] = np.asarray(rows)  # (seeds, records)
    step = hists[0]["step"]
    samples, details = fig4_peak_tests(gaps, step, steps)
    measured: dict = {"rates": FIG4_RATES, "steps": steps, "lr": lr}
    for p in FIG4_RATES:
        g, d = gaps[p], details[p]
        measured[f"p={p:g}"] = {
            "peak_gap_mean_curve": d["peak_gap_mean_curve"], "peak_step_mean_curve": d["peak_step"],
            "peak_gap_per_seed": ci_dict(d["per_seed_peak"]), "peak_step_per_seed": ci_dict(step[g.argmax(axis=1)]),
            "final_gap": ci_dict(g[:, -1]), "peak_minus_final": ci_dict(samples[_fig4_rate("decline", p)]),
            "mean_gap_over_steps": ci_dict(g.mean(axis=1))}
    pk = np.array([details[p]["per_seed_peak"] for p in FIG4_RATES])  # (rates, seeds)
    measured["peak_gap_highest_minus_lowest_rate"] = ci_dict(samples["top_minus_bottom"])
    measured["spearman_per_seed"] = ci_dict([_spearman(FIG4_RATES, pk[:, i]) for i in range(pk.shape[1])])
    test_mse = float(np.mean([h["test_loss"][-1] for h in hists]))
    summary = (f"{steps} steps, Adam lr {lr:g}, {len(ctx.seeds)} seeds: per-seed peak gaps (seed means) "
               + ", ".join(f"{v:.3g}" for v in pk.mean(axis=1)) + f" for p = {FIG4_RATES}; peak steps of the "
               f"seed-mean curves {[int(details[p]['peak_step']) for p in FIG4_RATES]}, peak - final gap "
               + ", ".join(_fmt_ci(measured[f'p={p:g}']['peak_minus_final']) for p in FIG4_RATES)
               + f" (test MSE itself ~{test_mse:.3g} at the end).")
    config = {"base": base.as_dict(), "rates": FIG4_RATES, "seeds": list(ctx.seeds),
              "pair": "expected_loss False (sampled masks) vs True (analysis.dropout closed form), same batches",
              "fidelity_note": "3 rates (was 4), records every steps/20, for the budget"}
    key = {"peak_steps": [int(details[p]["peak_step"]) for p in FIG4_RATES],
           "top_minus_bottom": float(samples["top_minus_bottom"].mean())}

    def plot():
        fig, axes = new_figure(2, 1, width=4.6, height=3.4)
        ax = axes[0, 0]
        for c, p in zip(colors(len(FIG4_RATES)), FIG4_RATES, strict=True):
            m, lo, hi = mean_ci(gaps[p])
            ax.plot(step, m, color=c, label=f"p = {p:g}")
            ax.fill_between(step, lo, hi, color=c, alpha=0.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(FIG4_INTERIOR * steps, color="grey", ls=":", lw=0.8, label="80% of the horizon")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("test-loss gap: sampled - expected (MSE)")
        ax.set_title(f"gap, mean and 95% CI over {len(ctx.seeds)} seeds (Adam lr {lr:g})", fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        m, lo, hi = mean_ci(pk.T)
        ax.errorbar(FIG4_RATES, m, yerr=[m - lo, hi - m], fmt="o-", capsize=3)
        ax.set_xlabel("dropout rate p")
        ax.set_ylabel("peak gap (per seed, mean and 95% CI)")
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


def _fmt_ci(d: dict) -> str:
    return f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"


# ------------------------------------------------------------------------------------------------------ table 5

TAB5_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)
TAB5_SHORT_EPOCHS = 3


TAB5_CRITERION = Criterion(
    tests=(
        Test("short_high_dropout_worse", f"acc(p={TAB5_RATES[-1]:g}) - acc(p=0) in pp at the short horizon (3/10 of "
             "the long one, the paper's epoch 3 of 10), paired by seed", "less", margin=0.0,
             why="the paper's table 5 shows signs (77.9 -> 77.2 at epoch 3), no threshold"),
        Test("long_high_dropout_better", f"acc(p={TAB5_RATES[-1]:g}) - acc(p=0) in pp at the long horizon, paired by "
             "seed", "greater", margin=0.0, why="the paper's table 5: 78.0 -> 80.7 at epoch 10 (a direction)"),
        Test("short_above_chance", "SANITY: mean test accuracy at the short horizon minus twice chance (0.2)",
             "greater", margin=0.0, role="sanity",
             why="a horizon at chance accuracy cannot rank the rates"),
    ),
    rule=Rule(reproduced=("short_high_dropout_worse", "long_high_dropout_better"),
              partially=(("short_high_dropout_worse",), ("long_high_dropout_better",))),
    recalibrations=(Recalibration(
        old="short horizon = epoch 3 (24 steps, chance-level accuracy); Spearman <= -0.7 / >= 0.7 and CI of the "
            "highest-vs-zero difference",
        new="short horizon = 3/10 of the long one (the paper's 3 of 10 epochs); one-sided paired tests of the "
            "highest-vs-zero difference, Holm over 2; sanity row: short horizon above twice chance",
        why="epoch 3 of 100 is 24 steps at ~12% accuracy: nothing can be ranked there; the paper's own horizon is "
            "a fraction of its long run"),))


@figure("allora-tab5-dropout-epochs", paper="ALLoRA table 5 / fig. 5 left",
        claim="high dropout gives the best accuracy after long fine-tuning and the worst after short fine-tuning",
        criterion=TAB5_CRITERION,
        protocols=(Protocol("input placement", {"placement": "input"}, primary=True,
                            note="dropout on the input of the adapter, as PEFT (the paper's LLM runs)"),
                   Protocol("bottleneck placement", {"placement": "bottleneck"}, note="ALLoRA eq. 1")))
def dropout_epochs(ctx: Context, protocol: Protocol) -> Measurement:
    epochs = ctx.pick(quick=15, default=100)
    base = base_config(ctx, "mnist", placement=protocol.settings["placement"], recorders=("loss",))
    spe = _steps_per_epoch(base)
    base = base.replace(steps=epochs * spe, record_every=spe)
    configs = [base.replace(seed=s, dropout=p) for p in TAB5_RATES for s in ctx.seeds]
    hists = engine.run_sweep(configs, device=ctx.device, progress=False, executor=ctx.executor, workers=ctx.workers)
    acc = np.asarray([h["test_acc"] for h in hists]).reshape(len(TAB5_RATES), len(ctx.seeds), -1)  # rate, seed, ep
    ep = hists[0]["step"] / spe
    short = int(np.flatnonzero(ep == TAB5_SHORT_EPOCHS)[0])
    # the paper compares epoch 3 with epoch 10 of 10; "paper ratio" (3/10 of the long horizon) is informational
    ratio_k = int(np.argmin(np.abs(ep - 0.3 * ep[-1])))
    horizons = {"short": short, "paper ratio": ratio_k, "long": len(ep) - 1}
    fig, axes = new_figure(2, 1, width=4.6, height=3.4)
    ax = axes[0, 0]
    for c, (i, p) in zip(colors(len(TAB5_RATES)), enumerate(TAB5_RATES), strict=True):
        m, lo, hi = mean_ci(acc[i])
        ax.plot(ep, 100 * m, color=c, label=f"p = {p:g}")
        ax.fill_between(ep, 100 * lo, 100 * hi, color=c, alpha=0.2)
    for h, k in horizons.items():
        ax.axvline(ep[k], color="k", ls=":", lw=0.8)
        ax.text(ep[k], ax.get_ylim()[0], f" {h}", fontsize=7, va="bottom")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, ep[-1])
    ax.set_xlabel(f"epoch ({base.n_finetune} fine-tuning images, {spe} steps per epoch)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    measured: dict = {"rates": TAB5_RATES, "epochs": epochs, "placement": "input"}
    ax = axes[0, 1]
    halves = {}
    for (h, k), mk in zip(horizons.items(), ("o-", "^-", "s-"), strict=True):
        a = acc[:, :, k]  # (rates, seeds)
        m, lo, hi = mean_ci(a.T)
        ax.errorbar(TAB5_RATES, 100 * m, yerr=[100 * (m - lo), 100 * (hi - m)], fmt=mk, capsize=3,
                    label=f"{h}: epoch {ep[k]:g}")
        rho = _spearman(TAB5_RATES, m)
        diff = ci_dict(a[-1] - a[0])
        measured[h] = {"epoch": float(ep[k]), **{f"acc_p={p:g}": ci_dict(a[i]) for i, p in enumerate(TAB5_RATES)},
                       "spearman_rate_vs_mean_acc": rho,
                       "spearman_per_seed": ci_dict([_spearman(TAB5_RATES, a[:, s]) for s in range(a.shape[1])]),
                       f"acc_p={TAB5_RATES[-1]:g}_minus_p=0": diff}
        halves[h] = (rho, diff)
    best = acc.max(axis=2)
    best_ep = ep[acc.argmax(axis=2)]
    measured["max_acc"] = {f"p={p:g}": ci_dict(best[i]) for i, p in enumerate(TAB5_RATES)}
    measured["epoch_of_max_acc"] = {f"p={p:g}": ci_dict(best_ep[i]) for i, p in enumerate(TAB5_RATES)}
    ax.set_xlabel("dropout rate p")
    ax.set_ylabel("test accuracy (%), mean and 95% CI")
    ax.legend(fontsize=7)
    rho_s, d_s = halves["short"]
    rho_l, d_l = halves["long"]
    samples = {"short_high_dropout_worse": 100 * (acc[-1, :, ratio_k] - acc[0, :, ratio_k]),
               "long_high_dropout_better": 100 * (acc[-1, :, -1] - acc[0, :, -1]),
               "short_above_chance": acc[:, :, ratio_k].mean(axis=0) - 0.2}
    summary = (f"Old short horizon (epoch {TAB5_SHORT_EPOCHS}): rho = {rho_s:.2f}, difference "
               f"{100 * d_s['mean']:+.2f} pp [{100 * d_s['ci_low']:+.2f}, {100 * d_s['ci_high']:+.2f}]; long: rho = "
               f"{rho_l:.2f}, difference {100 * d_l['mean']:+.2f} pp [{100 * d_l['ci_low']:+.2f}, "
               f"{100 * d_l['ci_high']:+.2f}] (input placement, as PEFT). Informational: at epoch {ep[ratio_k]:g} "
               f"(3/10 of the long horizon, the paper's 3 of 10) rho = {halves['paper ratio'][0]:.2f}, difference "
               f"{100 * halves['paper ratio'][1]['mean']:+.2f} pp; mean accuracy at epoch {TAB5_SHORT_EPOCHS} is "
               f"{100 * acc[:, :, short].mean():.1f}%.")
    config = {"base": base.as_dict(), "rates": TAB5_RATES, "seeds": list(ctx.seeds),
              "short_epoch": float(ep[ratio_k]), "old_short_epoch": TAB5_SHORT_EPOCHS, "long_epoch": epochs}
    key = {"short_diff_pp": float(samples["short_high_dropout_worse"].mean()),
           "long_diff_pp": float(samples["long_high_dropout_better"].mean())}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=lambda: fig)

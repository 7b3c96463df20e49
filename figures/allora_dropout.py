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

# transition (issue 15): the names of the figures that have their own file now, for the tests not yet moved
from figures.allora.fig1_dropout_mc import CRITERION as FIG1_CRITERION  # noqa: E402,F401
from figures.allora.fig1_dropout_mc import RATES as FIG1_RATES  # noqa: E402,F401
from figures.allora.fig1_dropout_mc import deviations as fig1_deviations  # noqa: E402,F401
from figures.allora.fig1_dropout_mc import noise_test as _fig1_name  # noqa: E402,F401
from figures.allora.fig3_norms import CRITERION as FIG3_CRITERION  # noqa: E402,F401
from figures.allora.fig3_norms import PROTOCOLS as FIG3_PROTOCOLS  # noqa: E402,F401
from figures.allora.fig3_norms import norm_of as fig3_norm  # noqa: E402,F401
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

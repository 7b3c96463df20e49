"""ALLoRA fig. 2: the std across dropout masks of the second layer's gradient entries over training, with the
closed form (:func:`analysis.dropout.grad_moments`) against Monte Carlo on the last layer (MSE, bottleneck)."""

from __future__ import annotations

import numpy as np

from figures.allora.probes import RATE, GradStdExact
from figures.allora.protocol import (
    OPTIMIZER_UNSTATED,
    SGD_LR,
    log_ratio_ci,
    steps_per_epoch,
)
from figures.criteria import Criterion, Recalibration, Rule, Test, ci_dict, mean_ci
from figures.framework import Measurement, Protocol, Runs, Unavailable, real_datasets
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-fig2-grad-std"
PAPER = "ALLoRA fig. 2"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("over training, the tail of the per-entry std (across dropout masks) of second-layer gradients grows while "
         "its mean changes little")

QUANTILES = {"mean": None, "median": 50.0, "q99": 99.0, "max": 100.0}

MINIMAL = 1.3  # sec. 3.2 calls a change of "about 30%" of a norm "minimal" ("barely impacting")

CRITERION = Criterion(
    tests=(
        Test("heavier_tail", "log((q99 growth) / (mean growth)) of the per-entry std of second-layer B gradients, "
             "epoch 0 -> last (per seed)", "greater", margin=float(np.log(MINIMAL)), margin_from="paper",
             why="'the tail significantly increases' relative to the average: by more than the ~30% change the "
                 "paper itself calls minimal (sec. 3.2, fig. 3: ||A|| 'only altering the final norm by about 30%')"),
        Test("mean_stable", "log(mean growth) of the per-entry std, epoch 0 -> last (per seed)", "equivalent",
             margin=float(np.log(MINIMAL)), margin_from="paper",
             why="'the average decreases slightly': within the ~30% change the paper calls minimal (sec. 3.2)"),
    ),
    rule=Rule(reproduced=("heavier_tail", "mean_stable"), partially=(("heavier_tail",),)),
    note="The paper names no optimizer (sec. 3.4): the headline is combined over Adam and SGD on MNIST (the "
         "headline policy; the figure's left panel). The second data set (CIFAR-10, or Fashion-MNIST where it is "
         "absent) and a 3x learning rate are robustness protocols.",
    recalibrations=(
        Recalibration(
            old="reproduced if the q99 growth CI and the (q99/mean) growth CI are > 1 in every data set; partially "
                "if the q99 grows anywhere",
            new="heavier tail (q99/mean growth > 1) AND mean within a factor 2 (TOST), per data set as protocols; "
                "partially only if the tail gets heavier",
            why="the q99 also grows when the whole distribution grows (here the mean grows more than the tail), so "
                "'partially' rested on the part of the claim that is not distinctive"),
        Recalibration(
            old="heavier tail: q99/mean growth > 1 (margin 0); mean stable: within a factor 2 (a judgement); "
                "headline at Adam on MNIST, marked as the paper's protocol; 2 protocols (data sets)",
            new="heavier tail: q99/mean growth > 1.3; mean stable: within a factor 1.3 (TOST); both from the ~30% "
                "the paper calls minimal (sec. 3.2); headline over Adam and SGD (plausible); 4 protocols",
            why="issue 16: margins from the paper's numbers, not a judgement; the paper names no optimizer; a "
                "training figure needs >= 4 protocols"),))

PROTOCOLS = (
    Protocol("mnist", {"dataset_index": 0}, primary=True, plausible=True,
             note=f"the paper's left panel, Adam lr 1e-3; plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("mnist sgd", {"dataset_index": 0, "optimizer": "sgd", "lr": SGD_LR}, plausible=True,
             note=f"the paper's left panel under SGD (lr {SGD_LR:g}); plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("second data set", {"dataset_index": 1},
             note="the paper's CIFAR-10 (right panel); Fashion-MNIST where CIFAR-10 is absent"),
    Protocol("mnist lr x3", {"dataset_index": 0, "lr": 3e-3}, note="Adam at 3x the learning rate: more progress "
                                                                     "in the same 30 epochs"),
)


def entry_stats(std: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics over entries (last axis) of per-entry stds: mean, median, 99th percentile, max."""
    return {name: std.mean(axis=-1) if q is None else np.percentile(std, q, axis=-1) for name, q in QUANTILES.items()}


def _runs(ctx) -> tuple[dict, list[str], dict, str]:
    """(configs, the data sets measured, data set notes, the protocol's data set). The Adam protocols at the default
    lr measure every data set (the paper's two panels; the runs are shared through the cache); a protocol that
    changes the optimizer or the lr measures its own data set only."""
    names, notes = real_datasets(("mnist", "cifar10"))
    k = int(ctx.settings.get("dataset_index", 0))
    if k >= len(names):
        raise Unavailable(f"no data set number {k + 1} available here: {notes}")
    train = {key: ctx.settings[key] for key in ("optimizer", "lr") if key in ctx.settings}
    shown = names if not train else [names[k]]
    epochs = ctx.pick(quick=15, default=30)
    runs = {}
    for ds in shown:
        base = base_config(ctx, ds, dropout=RATE, placement="bottleneck", recorders=("grad_std",),
                           grad_std_layer="layers.1", grad_std_masks=ctx.pick(quick=16, default=32), **train)
        spe = steps_per_epoch(base)
        runs[ds] = base.replace(steps=epochs * spe, record_every=spe)
    cfg = base_config(ctx, "mnist", seed=ctx.seeds[0], targets=("layers.2",), loss="mse", dropout=RATE,
                      placement="bottleneck", recorders=(), **train)
    spe = steps_per_epoch(cfg)
    cfg = cfg.replace(steps=epochs * spe, record_every=spe)
    probe = GradStdExact([e * spe for e in range(epochs + 1)], spe=spe, masks=ctx.pick(quick=64, default=400),
                         mc_epochs=sorted({0, epochs // 2, epochs}))
    runs["exact_last_layer"] = Runs(cfg, callbacks=(probe,), first_seed_only=True)
    return runs, shown, notes, names[k]


def configs(ctx) -> dict:
    return _runs(ctx)[0]


def _growth(sts, key, first=0):
    return log_ratio_ci([st[key][-1] for st in sts], [st[key][first] for st in sts])


def measure(ctx, runs) -> Measurement:
    cfgs, names, notes, own = _runs(ctx)
    epochs = ctx.pick(quick=15, default=30)
    measured: dict = {"notes": notes, "dropout": RATE, "epochs": epochs, "optimizer": cfgs[own].optimizer,
                      "lr": cfgs[own].lr}
    halves, post, seed_vals, numbers = {}, {}, {}, {"panels": {}}
    for ds in names:
        hists = runs[ds]
        spe = steps_per_epoch(cfgs[ds])
        ep = hists[0]["step"] / spe
        per_seed = {m: [entry_stats(h[f"grad_std_{m}"]) for h in hists] for m in ("B", "A")}
        panel = {"epoch": ep}
        for name in QUANTILES:
            panel[f"B_{name}"] = mean_ci(np.array([st[name] for st in per_seed["B"]]))
            if name in ("mean", "q99"):
                panel[f"A_{name}"] = mean_ci(np.array([st[name] for st in per_seed["A"]]))[0]
        numbers["panels"][ds] = panel
        res = {}
        for mat, first in (("B", 0), ("A", 1)):  # A's gradient is exactly 0 at B = 0 (epoch 0): start at epoch 1
            sts = per_seed[mat]
            res[mat] = {"from_epoch": first, **{f"{k}_growth": _growth(sts, k, first) for k in ("q99", "max", "mean")},
                        "tail_over_mean_growth": log_ratio_ci([st["q99"][-1] / st["q99"][first] for st in sts],
                                                              [st["mean"][-1] / st["mean"][first] for st in sts])}
        # informational, chosen after seeing the curves: growth measured from the end of B's escape from zero
        # (per seed, the epoch where the mean std peaks in the first third of training), not part of the verdict
        sts = per_seed["B"]
        starts = [int(np.argmax(st["mean"][: max(2, len(st["mean"]) // 3)])) for st in sts]
        res["B_after_escape_post_hoc"] = {"from_epoch": ci_dict([ep[k] for k in starts])}
        for name in ("q99", "max", "mean"):
            res["B_after_escape_post_hoc"][f"{name}_growth"] = log_ratio_ci(
                [st[name][-1] for st in sts], [st[name][k] for st, k in zip(sts, starts, strict=True)])
        measured[ds] = res
        halves[ds], post[ds] = res["B"], res["B_after_escape_post_hoc"]
        growth = {k: np.array([st[k][-1] / st[k][0] for st in per_seed["B"]]) for k in ("q99", "mean")}
        seed_vals[ds] = {"heavier_tail": np.log(growth["q99"] / growth["mean"]), "mean_stable": np.log(growth["mean"])}
    # exact overlay (last layer, MSE): grad_moments against Monte Carlo
    ex = GradStdExact.of(runs["exact_last_layer"][0])
    probe = cfgs["exact_last_layer"].callbacks[0]
    ex_cfg = {**cfgs["exact_last_layer"].config.as_dict(), "mc_masks": probe.masks}
    zs, rel, scatter = [], [], {}
    for mat in ("A", "B"):
        mc_std, ex_std = ex[f"mc_{mat}"], ex[f"exact_{mat}"][np.searchsorted(ex["epoch"], ex["mc_epoch"])]
        se = ex[f"mc_se_var_{mat}"]
        live = ex_std > 1e-9 * max(ex_std.max(), 1e-300)
        zs.append(np.abs(mc_std**2 - ex_std**2)[live] / np.maximum(se[live], 1e-300))
        rel.append(mc_std[live] / ex_std[live])
        last = ex_std[-1] > 0
        scatter[mat] = {"exact": ex_std[-1][last], "mc": mc_std[-1][last]}
    zs, rel = np.concatenate([z.ravel() for z in zs]), np.concatenate([r.ravel() for r in rel])
    exact_stats_B = entry_stats(ex["exact_B"])
    measured["exact_last_layer"] = {
        "mc_vs_exact_max_abs_z_variance": float(zs.max()), "mc_vs_exact_entries": int(zs.size),
        "mc_vs_exact_fraction_abs_z_le_3": float(np.mean(zs <= 3)),
        "mc_over_exact_std_median": float(np.median(rel)), "mc_over_exact_std_p1_p99": np.percentile(rel, [1, 99]),
        "exact_B_q99_growth": float(exact_stats_B["q99"][-1] / exact_stats_B["q99"][0]),
        "exact_B_mean_growth": float(exact_stats_B["mean"][-1] / exact_stats_B["mean"][0]),
    }
    numbers["exact"] = {"epoch": ex["epoch"], "mc_epoch": ex["mc_epoch"], "epochs": epochs, "masks": probe.masks,
                        "B": exact_stats_B, "mc_B": entry_stats(ex["mc_B"]), "A": entry_stats(ex["exact_A"]),
                        "scatter": scatter}

    def g(d):
        return f"x{d['ratio']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"

    summary = (f"Second-layer B entries, epoch 0 -> {epochs}: "
               + "; ".join(f"{ds}: q99 {g(h['q99_growth'])}, max x{h['max_growth']['ratio']:.2f}, mean "
                           f"{g(h['mean_growth'])}" for ds, h in halves.items())
               + ". Post hoc (not in the verdict), from the end of B's escape from zero (epoch of the early peak "
               "of the mean) to the last epoch: "
               + "; ".join(f"{ds}: q99 {g(h['q99_growth'])}, mean {g(h['mean_growth'])}" for ds, h in post.items())
               + f". Last layer (MSE): Monte Carlo std matches grad_moments (median MC/exact "
               f"{measured['exact_last_layer']['mc_over_exact_std_median']:.3f}, max |z| of the variance "
               f"{zs.max():.1f} over {zs.size} entry-checkpoints).")
    config = {"runs": {**{ds: cfgs[ds].as_dict() for ds in names}, "exact_last_layer": ex_cfg},
              "seeds": list(ctx.seeds), "dropout": RATE, "placement": "bottleneck",
              "grad_std_masks": ctx.pick(quick=16, default=32)}
    key = {"q99_over_mean_growth": halves[own]["tail_over_mean_growth"]["ratio"],
           "mean_growth": halves[own]["mean_growth"]["ratio"]}
    head = f"Data set {own}, {cfgs[own].optimizer.upper()} lr {cfgs[own].lr:g}. "
    return Measurement(samples=seed_vals[own], measured=measured, summary=head + summary, key=key,
                       datasets=names, config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 2, width=4.6, height=3.3)
    stat_colors = dict(zip(QUANTILES, colors(len(QUANTILES)), strict=True))
    for j, (ds, pn) in enumerate(numbers["panels"].items()):
        ax, ep = axes[0, j], np.asarray(pn["epoch"])
        for name, c in stat_colors.items():
            m, lo, hi = pn[f"B_{name}"]
            ax.plot(ep, m, color=c, label=f"B entries: {name}")
            ax.fill_between(ep, lo, hi, color=c, alpha=0.2)
            if f"A_{name}" in pn:
                ax.plot(ep[1:], pn[f"A_{name}"][1:], ls="--", color=c, label=f"A entries: {name}")
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel="std over masks of dL/d(entry)")
        ax.set_title(f"{ds}: layers.1 (second layer), p = {RATE:g}", fontsize=8)
        ax.legend(fontsize=6)
    ex, ax = numbers["exact"], axes[1, 0]
    for name, c in stat_colors.items():
        ax.plot(ex["epoch"], ex["B"][name], color=c, label=f"exact B: {name}")
        ax.plot(ex["mc_epoch"], ex["mc_B"][name], "o", color=c, ms=5, mfc="none")
        if name in ("mean", "q99"):
            ax.plot(ex["epoch"][1:], ex["A"][name][1:], ls="--", color=c, label=f"exact A: {name}")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="std over masks of dL/d(entry)")
    ax.set_title("mnist, layers.2 (last), MSE: exact (lines) vs MC (circles)", fontsize=8)
    ax.legend(fontsize=6)
    ax, lim = axes[1, 1], []
    for (mat, sc), c in zip(ex["scatter"].items(), colors(2), strict=True):
        ax.loglog(sc["exact"], sc["mc"], ".", ms=3, color=c, label=f"{mat} entries, epoch {ex['epochs']}")
        lim += [min(sc["exact"]), max(sc["exact"])]
    ax.plot([min(lim), max(lim)], [min(lim), max(lim)], "k--", lw=1, label="MC = exact")
    ax.set(xlabel="exact std (analysis.dropout.grad_moments)", ylabel=f"Monte Carlo std ({ex['masks']} masks)")
    ax.set_title("last layer: per-entry std, MC vs closed form", fontsize=8)
    ax.legend(fontsize=6)
    return fig

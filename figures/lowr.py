"""LoWR (seed 003): channel significance carried by B (fig. 2), LoWR's effect on the channels (fig. 3), on loss
and gradient norm (fig. 4), its hyper-parameter sensitivity and LoWR + LoRA+ (tables 5-6), and Prop. 4.1
(equivalent modules (nA, B/n) follow different trajectories; the first-step difference in closed form).

Toy analogue of the paper's LLM runs: the shared MNIST protocol (:func:`figures._common.base_config`: a
784-256-256-10 MLP pretrained on 4096 images, LoRA on all three layers fine-tuned on 512 pixel-permuted images,
Adam lr 1e-3), rank R = 32 (quick: 8) with scaling alpha / r = 1, so y = x W^T + x A^T B^T as in the paper's
y = (W + BA) x. Every figure of this module shares the same runs through the run cache (one FinetuneConfig per
setting and seed, with all the recorders the figures need).

LoWR's alpha is not scale-free: gamma - 1 = alpha (max ||b|| - ||b_i||) Var(||a|| ||b||) grows with the fourth
power of the channel norms, so the paper's values (GSM8K: alpha in {0.1, 1}; GLUE / table 5: {1e-4 ... 1e-2})
do not carry over to a model of another size. We use the GSM8K grid {0.1, 1} (main setting: tau = 10,
alpha = 0.1, the smaller value, rescaling every step) and report the per-step gamma - 1 it produces.
"""

from __future__ import annotations

import math

import numpy as np

from analysis import channels
from figures import Context, Measurement, Protocol, Result, figure
from figures._common import base_config, ci_dict, colors, mean_ci, new_figure, real_datasets
from figures.criteria import Criterion, Recalibration, Rule, Test
from toymodels.callbacks import CaptureLayerIO, ScaleAdapters, WeightSnapshots
from toymodels.train import finetune

DATASET = "mnist"
MAIN_LOWR = (10.0, 0.1, 1)  # (tau, alpha, every): tau from the paper's grid, alpha the smaller GSM8K value
ALPHAS = (0.1, 1.0)  # the paper's GSM8K grid (app. B.1)
LORA_PLUS_RATIO = 16.0  # LoRA+'s recommended lr ratio lambda = 2^4 (Hayou et al. 2024)
RECORDERS = ("loss", "norms", "grads", "channels")


# --------------------------------------------------------------------------------------------------- shared runs


def _sweep(ctx: Context, configs, **kwargs):
    """``toymodels.train.run_sweep`` with the context's device, executor and workers (where supported)."""
    import inspect

    from toymodels.train import run_sweep

    if "executor" in inspect.signature(run_sweep).parameters:
        kwargs.update(executor=ctx.executor, workers=ctx.workers)
    return run_sweep(list(configs), device=ctx.device, progress=False, **kwargs)


def _rank(ctx: Context) -> int:
    return ctx.pick(quick=8, default=32)


def _config(ctx: Context, seed: int, **changes):
    """The shared run of this module: rank R, s = alpha / r = 1, every recorder the LoWR figures use."""
    r = _rank(ctx)
    return base_config(ctx, DATASET, r=r, alpha=float(r), recorders=RECORDERS, record_every=ctx.pick(10, 10),
                       seed=seed, **changes)


def _runs(ctx: Context, **changes) -> list[dict]:
    """One cached run per seed of ``_config(**changes)``."""
    return [finetune(_config(ctx, s, **changes), device=ctx.device) for s in ctx.seeds]


def _no_data() -> Result | None:
    names, notes = real_datasets((DATASET,))
    if DATASET in names:
        return None
    return Result("unavailable", f"{DATASET} is missing: {notes.get(DATASET, '')}", {}, [], {}, None)


def _config_record(ctx: Context, **varies) -> dict:
    return {"base": _config(ctx, ctx.seeds[0]).as_dict(), "seeds": list(ctx.seeds), **varies}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _final_channels(hist: dict) -> tuple[np.ndarray, np.ndarray]:
    """(||a_i||, ||b_i||) after fine-tuning, each (layers, r)."""
    return hist["channel_a"][-1], hist["channel_b"][-1]


def _b_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the across-channel variance of log(||a|| ||b||) carried by log ||b||.

    var(log c) = cov(log c, log a) + cov(log c, log b) exactly (log c = log a + log b), so the two shares sum to 1;
    0.5 means A and B carry the channel differences equally, 1 that B carries all of them.
    """
    la, lb = np.log(a), np.log(b)
    lc = la + lb
    var = lc.var()
    return math.nan if var == 0 else float(np.mean((lc - lc.mean()) * (lb - lb.mean())) / var)


def _gamma_minus_one(a: np.ndarray, b: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    """gamma_i - 1 of LoWR eq. 12 for channel norms (a, b) (the closed form ``analysis.channels.lowr_gamma`` on
    diagonal factors, whose row / column norms are a and b), 0 for channels with ||a|| / ||b|| >= tau."""
    gamma = channels.lowr_gamma(np.diag(a), np.diag(b), alpha)
    ratio = np.divide(a, b, out=np.full_like(a, np.inf), where=b > 0)
    return np.where(ratio < tau, gamma - 1.0, 0.0)


def _ci_finite(values) -> dict:
    """:func:`ci_dict` over the finite values (diverged runs are NaN); NaNs with n = 0 when none is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "confidence": 0.95}
    return ci_dict(v)


def _points(d: dict) -> dict:
    """An accuracy CI dict in percentage points."""
    return {k: 100 * d[k] for k in ("mean", "ci_low", "ci_high")}


def _fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}g} [{d['ci_low']:.{digits}g}, {d['ci_high']:.{digits}g}]"


# ----------------------------------------------------------------------------------------------------- fig. 2


@figure("lowr-fig2-channel-corr", paper="LoWR fig. 2",
        claim="after fine-tuning, channel significance ||a_i|| ||b_i|| tracks ||b_i|| (Pearson r > 0.9 per layer): "
              "B carries the channel differences")
def channel_corr(ctx: Context) -> Result:
    if (res := _no_data()) is not None:
        return res
    hists = _runs(ctx)
    n_layers = hists[0]["channel_a"].shape[1]
    r_b = np.zeros((len(hists), n_layers))
    r_a = np.zeros_like(r_b)
    share = np.zeros_like(r_b)
    cv_a = np.zeros_like(r_b)
    cv_b = np.zeros_like(r_b)
    for s, h in enumerate(hists):
        a, b = _final_channels(h)
        for layer in range(n_layers):
            c = a[layer] * b[layer]
            r_b[s, layer] = _pearson(c, b[layer])
            r_a[s, layer] = _pearson(c, a[layer])
            share[s, layer] = _b_share(a[layer], b[layer])
            cv_a[s, layer] = a[layer].std() / a[layer].mean()
            cv_b[s, layer] = b[layer].std() / b[layer].mean()

    measured = {"rank": _rank(ctx), "layers": {}}
    for layer in range(n_layers):
        measured["layers"][f"layers.{layer}"] = {
            "pearson_sig_vs_b": ci_dict(r_b[:, layer]),
            "pearson_sig_vs_a": ci_dict(r_a[:, layer]),
            "b_share_of_log_sig_variance": ci_dict(share[:, layer]),
            "cv_a": ci_dict(cv_a[:, layer]),
            "cv_b": ci_dict(cv_b[:, layer]),
        }
    rb_low = np.array([measured["layers"][k]["pearson_sig_vs_b"]["ci_low"] for k in measured["layers"]])
    rb_mean = r_b.mean(0)
    sh_low = np.array([measured["layers"][k]["b_share_of_log_sig_variance"]["ci_low"] for k in measured["layers"]])
    corr_ok = bool(np.all(rb_low > 0.9)) if len(ctx.seeds) > 1 else bool(np.all(rb_mean > 0.9))
    b_dominates = bool(np.all(sh_low > 0.5))
    if corr_ok and b_dominates:
        verdict = "reproduced"
    elif corr_ok or np.any(rb_mean > 0.9):
        verdict = "partially reproduced"
    else:
        verdict = "not reproduced"
    measured["rule"] = ("reproduced if in every layer the CI of Pearson r(sig, ||b||) lies above 0.9 AND the CI of "
                        "B's share of var(log sig) lies above 0.5 (B, not A, carries the differences); partially "
                        "if only the correlation part holds or r > 0.9 in some layers; else not reproduced")

    fig, axes = new_figure(n_layers + 1, 1, width=3.4, height=3.2)
    seed_colors = colors(max(len(hists), 2))
    for layer in range(n_layers):
        ax = axes[0, layer]
        for s, h in enumerate(hists):
            a, b = _final_channels(h)
            ax.scatter(b[layer], a[layer] * b[layer], s=12, alpha=0.7, color=seed_colors[s],
                       label=f"seed {ctx.seeds[s]}")
        m = measured["layers"][f"layers.{layer}"]
        ax.text(0.03, 0.97, f"r(sig, ||b||) = {_fmt(m['pearson_sig_vs_b'])}\n"
                            f"r(sig, ||a||) = {_fmt(m['pearson_sig_vs_a'])}",
                transform=ax.transAxes, va="top", fontsize=7,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
        ax.set_xlabel("||b_i|| (column norm of lora_B)")
        ax.set_ylabel("||a_i|| ||b_i|| (channel significance)")
        ax.set_title(f"layers.{layer} (r = {_rank(ctx)})", fontsize=9)
        if layer == 0:
            ax.legend(fontsize=7, loc="lower right")
    ax = axes[0, n_layers]
    x = np.arange(n_layers)
    for off, (vals, label, col) in enumerate(((r_b, "r(sig, ||b_i||)", seed_colors[0]),
                                              (r_a, "r(sig, ||a_i||)", seed_colors[1]))):
        m, lo, hi = mean_ci(vals)
        ax.errorbar(x + (off - 0.5) * 0.2, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, color=col, label=label)
    m, lo, hi = mean_ci(share)
    ax.errorbar(x + 0.3, m, yerr=[m - lo, hi - m], fmt="s", capsize=3, color=colors(3)[2],
                label="B's share of var(log sig)")
    ax.axhline(0.9, color="grey", ls="--", lw=1, label="paper: r > 0.9")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x, [f"layers.{i}" for i in x])
    ax.set_ylabel("Pearson r / share (mean, 95% CI over seeds)")
    ax.set_title("per-layer summary", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")

    parts = [f"layers.{i}: r_b {rb_mean[i]:.3f} vs r_a {r_a.mean(0)[i]:.3f}, B share {share.mean(0)[i]:.2f}"
             for i in range(n_layers)]
    summary = (f"Pearson r of ||a_i|| ||b_i|| with ||b_i|| after fine-tuning (rank {_rank(ctx)}, mean over "
               f"{len(hists)} seeds): " + "; ".join(parts) + ". The paper's r > 0.9 holds" +
               ("" if corr_ok else " only partly") + ", but r with ||a_i|| is " +
               ("nearly as high" if np.all(r_a.mean(0) > 0.9) else "lower in some layers") +
               "; B's share of the log-significance variance " +
               ("exceeds 0.5 in every layer" if b_dominates else "does not exceed 0.5 (CI) in every layer") +
               f". Rule: {measured['rule']}.")
    return Result(verdict, summary, measured, [DATASET], _config_record(ctx), fig)


# ----------------------------------------------------------------------------------------------------- fig. 3


@figure("lowr-fig3-with-without", paper="LoWR fig. 3",
        claim="with LoWR every layer's mean channel significance ||a_i|| ||b_i|| rises and its spread across "
              "channels falls, while significance still tracks ||b_i||")
def with_without(ctx: Context) -> Result:
    if (res := _no_data()) is not None:
        return res
    tau, alpha, every = MAIN_LOWR
    base = _runs(ctx)
    lowr = _runs(ctx, lowr=MAIN_LOWR)
    n_layers = base[0]["channel_a"].shape[1]

    def stats_of(hists):
        mean = np.zeros((len(hists), n_layers))
        std, rb, ratio, gam = (np.zeros_like(mean) for _ in range(4))
        for s, h in enumerate(hists):
            a, b = _final_channels(h)
            for layer in range(n_layers):
                c = a[layer] * b[layer]
                mean[s, layer], std[s, layer] = c.mean(), c.std()
                rb[s, layer] = _pearson(c, b[layer])
                ratio[s, layer] = np.median(a[layer] / b[layer])
                # per-step rescaling strength over the run (records after step 0), median over records x channels
                g = [_gamma_minus_one(h["channel_a"][k, layer], h["channel_b"][k, layer], tau, alpha)
                     for k in range(1, len(h["step"]))]
                gam[s, layer] = np.median(np.concatenate(g))
        return mean, std, rb, ratio, gam

    m0, s0, rb0, q0, _ = stats_of(base)
    m1, s1, rb1, q1, g1 = stats_of(lowr)
    measured = {"lowr": {"tau": tau, "alpha": alpha, "every": every}, "rank": _rank(ctx), "layers": {}}
    up_mean = down_std = 0
    against = 0
    for layer in range(n_layers):
        d_mean, d_std = ci_dict(m1[:, layer] - m0[:, layer]), ci_dict(s1[:, layer] - s0[:, layer])
        measured["layers"][f"layers.{layer}"] = {
            "mean_sig_lora": ci_dict(m0[:, layer]), "mean_sig_lowr": ci_dict(m1[:, layer]),
            "std_sig_lora": ci_dict(s0[:, layer]), "std_sig_lowr": ci_dict(s1[:, layer]),
            "delta_mean_sig": d_mean, "delta_std_sig": d_std,
            "rel_change_mean_sig": ci_dict(m1[:, layer] / m0[:, layer] - 1),
            "rel_change_std_sig": ci_dict(s1[:, layer] / s0[:, layer] - 1),
            "pearson_sig_vs_b_lora": ci_dict(rb0[:, layer]), "pearson_sig_vs_b_lowr": ci_dict(rb1[:, layer]),
            "median_a_over_b_lora": ci_dict(q0[:, layer]), "median_a_over_b_lowr": ci_dict(q1[:, layer]),
            "median_gamma_minus_1_per_step": ci_dict(g1[:, layer]),
        }
        up_mean += d_mean["ci_low"] > 0
        down_std += d_std["ci_high"] < 0
        against += (d_mean["ci_high"] < 0) + (d_std["ci_low"] > 0)
    hits = up_mean + down_std
    if len(ctx.seeds) < 2:  # no CI: judge the signs of the single seed
        up_mean = int(np.sum(m1.mean(0) > m0.mean(0)))
        down_std = int(np.sum(s1.mean(0) < s0.mean(0)))
        hits = up_mean + down_std
    if hits == 2 * n_layers:
        verdict = "reproduced"
    elif hits == 0:
        verdict = "not reproduced"
    else:
        verdict = "partially reproduced"
    measured["layers_mean_up_ci"] = int(up_mean)
    measured["layers_std_down_ci"] = int(down_std)
    measured["tests_against_paper_ci"] = int(against)
    measured["rule"] = ("paired by seed (LoWR - LoRA): reproduced if in every layer the CI of the change of the mean "
                        "significance lies above 0 and that of its std across channels below 0; not reproduced if "
                        "none of these 2 x layers tests goes the paper's way; partially otherwise")

    fig, axes = new_figure(n_layers, 2, width=3.6, height=3.2)
    cl = colors(3)
    for layer in range(n_layers):
        ax = axes[0, layer]
        for hists, label, col in ((base, "LoRA", cl[0]), (lowr, f"LoRA + LoWR (tau={tau:g}, alpha={alpha:g})",
                                                           cl[1])):
            for s, h in enumerate(hists):
                a, b = _final_channels(h)
                ax.scatter(b[layer], a[layer] * b[layer], s=10, alpha=0.6, color=col,
                           label=label if s == 0 else None)
        ax.set_xlabel("||b_i||")
        ax.set_ylabel("||a_i|| ||b_i||")
        mm = measured["layers"][f"layers.{layer}"]
        ax.set_title(f"layers.{layer}: r(sig,||b||) {mm['pearson_sig_vs_b_lora']['mean']:.2f} -> "
                     f"{mm['pearson_sig_vs_b_lowr']['mean']:.2f}", fontsize=8)
        if layer == 0:
            ax.legend(fontsize=6)
    x = np.arange(n_layers)
    ax = axes[1, 0]
    for off, (mean, std, label, col) in enumerate(((m0, s0, "LoRA", cl[0]), (m1, s1, "LoRA + LoWR", cl[1]))):
        ax.bar(x + (off - 0.5) * 0.38, mean.mean(0), width=0.36, yerr=std.mean(0), capsize=3, color=col, label=label)
    ax.set_xticks(x, [f"layers.{i}" for i in x])
    ax.set_ylabel("mean ||a_i|| ||b_i|| (+- avg std)")
    ax.set_title("mean channel significance per layer", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for off, (vals, label, col) in enumerate(((m1 / m0 - 1, "mean significance", cl[1]),
                                              (s1 / s0 - 1, "std of significance", cl[2]))):
        m, lo, hi = mean_ci(100 * vals)
        ax.errorbar(x + (off - 0.5) * 0.2, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, color=col, label=label)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(x, [f"layers.{i}" for i in x])
    ax.set_ylabel("change with LoWR (%), 95% CI over seeds")
    ax.set_title("paper: mean up, std down", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    for off, (vals, label, col) in enumerate(((q0, "LoRA", cl[0]), (q1, "LoRA + LoWR", cl[1]))):
        xo = x + (off - 0.5) * 0.2
        for s_vals in vals:
            ax.scatter(xo, s_vals, s=10, color=col, alpha=0.5)
        ax.scatter(xo, np.exp(np.log(vals).mean(0)), s=40, marker="D", color=col, label=f"{label} (geo. mean; dots: seeds)")
    ax.axhline(tau, color="grey", ls="--", lw=1, label=f"tau = {tau:g}")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"layers.{i}" for i in x])
    ax.set_ylabel("median ||a_i|| / ||b_i||")
    ax.set_title("LoWR raises ||a||/||b|| up to ~tau", fontsize=8)
    ax.legend(fontsize=7)

    parts = []
    for layer in range(n_layers):
        mm = measured["layers"][f"layers.{layer}"]
        parts.append(f"layers.{layer}: mean sig {100 * mm['rel_change_mean_sig']['mean']:+.0f}% "
                     f"(delta {_fmt(mm['delta_mean_sig'], 2)}), std {100 * mm['rel_change_std_sig']['mean']:+.0f}% "
                     f"(delta {_fmt(mm['delta_std_sig'], 2)})")
    summary = (f"LoWR (tau={tau:g}, alpha={alpha:g}, every step; median gamma-1 per step "
               f"{', '.join(f'{v:.1e}' for v in g1.mean(0))} by layer) vs LoRA, rank {_rank(ctx)}, "
               f"{len(ctx.seeds)} seeds: " + "; ".join(parts) +
               f". Mean up (CI) in {up_mean}/{n_layers} layers, std down (CI) in {down_std}/{n_layers}. "
               f"Rule: {measured['rule']}.")
    return Result(verdict, summary, measured, [DATASET],
                  _config_record(ctx, lowr={"tau": tau, "alpha": alpha, "every": every}), fig)


# ----------------------------------------------------------------------------------------------------- fig. 4


def _grad_total(h: dict) -> tuple[np.ndarray, np.ndarray]:
    """(total adapter gradient norm, B-part) per record, over all layers (record 0 has none: NaN)."""
    ga, gb = h["grad_norm_A"], h["grad_norm_B"]
    return np.sqrt((ga**2).sum(1) + (gb**2).sum(1)), np.sqrt((gb**2).sum(1))


@figure("lowr-fig4-loss-gradnorm", paper="LoWR fig. 4",
        claim="with LoWR the fine-tuning loss is lower and the gradient norm larger than without, "
              "especially late in training")
def loss_gradnorm(ctx: Context) -> Result:
    if (res := _no_data()) is not None:
        return res
    tau, alpha, every = MAIN_LOWR
    runs = {"LoRA": _runs(ctx), "LoRA + LoWR": _runs(ctx, lowr=MAIN_LOWR)}
    steps = runs["LoRA"][0]["step"]
    late = steps > steps[-1] / 2
    per = {}
    for name, hists in runs.items():
        tot = np.array([_grad_total(h)[0] for h in hists])
        gb = np.array([_grad_total(h)[1] for h in hists])
        per[name] = {
            "train_loss": np.array([h["train_loss"] for h in hists]),
            "test_acc": np.array([h["test_acc"][-1] for h in hists]),
            "grad": tot, "grad_B": gb,
            "late_grad": tot[:, late].mean(1), "late_grad_B": gb[:, late].mean(1),
            "late_loss": np.array([h["train_loss"][late].mean() for h in hists]),
        }
    lo_, lw = per["LoRA"], per["LoRA + LoWR"]
    measured = {
        "lowr": {"tau": tau, "alpha": alpha, "every": every}, "rank": _rank(ctx),
        "final_train_loss_lora": ci_dict(lo_["train_loss"][:, -1]),
        "final_train_loss_lowr": ci_dict(lw["train_loss"][:, -1]),
        "delta_final_train_loss": ci_dict(lw["train_loss"][:, -1] - lo_["train_loss"][:, -1]),
        "delta_late_mean_train_loss": ci_dict(lw["late_loss"] - lo_["late_loss"]),
        "late_grad_norm_lora": ci_dict(lo_["late_grad"]), "late_grad_norm_lowr": ci_dict(lw["late_grad"]),
        "late_grad_norm_ratio": ci_dict(lw["late_grad"] / lo_["late_grad"]),
        "late_grad_norm_B_ratio": ci_dict(lw["late_grad_B"] / lo_["late_grad_B"]),
        "final_test_acc_lora": ci_dict(lo_["test_acc"]), "final_test_acc_lowr": ci_dict(lw["test_acc"]),
        "late_window_steps": [float(steps[late][0]), float(steps[-1])],
    }
    loss_ok = measured["delta_late_mean_train_loss"]["ci_high"] < 0
    grad_ok = measured["late_grad_norm_ratio"]["ci_low"] > 1
    if len(ctx.seeds) < 2:
        loss_ok = measured["delta_late_mean_train_loss"]["mean"] < 0
        grad_ok = measured["late_grad_norm_ratio"]["mean"] > 1
    verdict = "reproduced" if loss_ok and grad_ok else "partially reproduced" if loss_ok or grad_ok else \
        "not reproduced"
    measured["rule"] = ("paired by seed over the second half of training: reproduced if the CI of the change of the "
                        "mean training loss (full fine-tuning set) lies below 0 AND the CI of the ratio of mean "
                        "gradient norms (all adapters, mini-batch) lies above 1; partially if one holds")

    fig, axes = new_figure(3, 1, width=3.8, height=3.2)
    cl = colors(2)
    for (name, p), col in zip(per.items(), cl, strict=True):
        for ax, key, ylabel in ((axes[0, 0], "train_loss", "training loss (full fine-tune set)"),
                                (axes[0, 1], "grad", "grad norm, all adapters (batch)"),
                                (axes[0, 2], "grad_B", "grad norm of the lora_B's (batch)")):
            vals = p[key]
            x = steps
            if key != "train_loss":  # no gradient at step 0
                vals, x = vals[:, 1:], steps[1:]
            m, lo, hi = (np.exp(v) for v in mean_ci(np.log(vals)))  # geometric mean, CI in log space
            ax.plot(x, m, color=col, label=name)
            ax.fill_between(x, lo, hi, color=col, alpha=0.2)
            ax.set_yscale("log")
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel(ylabel)
    for ax in axes[0]:
        ax.axvspan(steps[late][0], steps[-1], color="grey", alpha=0.08)
    axes[0, 0].legend(fontsize=7, title=f"tau={tau:g}, alpha={alpha:g}\n(geo. mean, 95% CI)", title_fontsize=7)
    summary = (f"LoWR (tau={tau:g}, alpha={alpha:g}) minus LoRA over the second half of training "
               f"({len(ctx.seeds)} seeds, rank {_rank(ctx)}): training loss {_fmt(measured['delta_late_mean_train_loss'])}"
               f" (final {measured['final_train_loss_lora']['mean']:.3g} -> "
               f"{measured['final_train_loss_lowr']['mean']:.3g}); gradient-norm ratio "
               f"{_fmt(measured['late_grad_norm_ratio'])} (B only {_fmt(measured['late_grad_norm_B_ratio'])}); "
               f"test accuracy {measured['final_test_acc_lora']['mean']:.4f} -> "
               f"{measured['final_test_acc_lowr']['mean']:.4f}. Rule: {measured['rule']}.")
    return Result(verdict, summary, measured, [DATASET],
                  _config_record(ctx, lowr={"tau": tau, "alpha": alpha, "every": every}), fig)


# ---------------------------------------------------------------------------------------------- tables 5 and 6


TAB5_GRID = [(t, a, 1) for t in (math.inf, 10.0, 100.0) for a in ALPHAS] + [(math.inf, ALPHAS[0], 5),
                                                                            (10.0, ALPHAS[0], 5)]


def _grid(ctx: Context) -> list[tuple[float, float, int]]:
    """Every tau x alpha rescaling every step, plus every 5 steps at the main alpha for tau in {inf, 10}: 8 of the
    paper's 12 settings (the CPU budget with 10 seeds), the same at every fidelity (the criterion declares them)."""
    return list(TAB5_GRID)


def _setting_name(tau: float, alpha: float, every: int) -> str:
    return f"noninferior_tau={tau:g}_alpha={alpha:g}_every={every}"


NONINFERIORITY_PP = 1.0
CHANCE = 0.1  # a diverged seed counts at chance accuracy (10 classes)


def _tab5_criterion(grid) -> Criterion:
    why = (f"'matches or beats': the paper's table 5 has 9 of 10 settings within 0.2 pp below or above the "
           f"baseline (one, tau = inf every step, 3.1 pp below); -{NONINFERIORITY_PP:g} pp is a non-inferiority "
           "margin fixed before the 10-seed runs")
    tests = tuple(Test(_setting_name(*g), f"LoWR(tau={g[0]:g}, alpha={g[1]:g}, every {g[2]}) - LoRA: final test "
                       "accuracy (pp), paired by seed, a diverged seed at chance", "greater",
                       margin=-NONINFERIORITY_PP, why=why) for g in grid)
    tests += (Test("plus_noninferior", "LoWR(main) + LoRA+ - LoRA+: final test accuracy (pp), paired by seed, a "
                   "diverged seed at chance", "greater", margin=-NONINFERIORITY_PP, why=why),)
    main = _setting_name(*MAIN_LOWR)
    partially = tuple(g for g in ((main,), ("plus_noninferior",)) if g[0] in {t.name for t in tests})
    return Criterion(
        tests=tests, rule=Rule(reproduced=tuple(t.name for t in tests), partially=partially),
        note="Partially reproduced: the main setting (tau = 10, alpha = 0.1, every step) or LoWR + LoRA+ is "
             "non-inferior. alpha is not scale-free (gamma - 1 grows with the 5th power of the channel norms), so "
             "the paper's DeBERTa values (1e-3, 1e-2) would do nothing here; the grid is its GSM8K one {0.1, 1}.",
        recalibrations=(Recalibration(
            old="reproduced if LoWR + LoRA+ beats LoRA+ (CI > 0) AND more than half of the 12 settings beat LoRA "
                "(CI > 0); no multiplicity correction",
            new=f"non-inferiority (> -{NONINFERIORITY_PP:g} pp) of every setting and of LoWR + LoRA+, Holm over "
                "all of them; a diverged seed counts at chance",
            why="the claim is 'matches or beats'; the old rule asked more than the paper's own table 5 shows (most "
                "settings equal to the baseline), and 12 uncorrected intervals"),))


TAB5_PROTOCOLS = (
    Protocol("adam", {}, primary=True, note="the shared protocol (Adam lr 1e-3), the paper's GSM8K alpha grid"),
    Protocol("adam lr x1/3", {"lr": round(1e-3 / 3, 8)},
             note="diagnosis: does the divergence follow the learning rate (Adam's step x LoWR's rescaling)?"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.03}, note="diagnosis: a step size proportional to the gradient"),
)


def _divergence_diagnosis(hist: dict, tau: float, alpha: float) -> dict:
    """From a run's recorded channel norms (every record_every steps): max over layers and channels of
    ||a_i|| / ||b_i||, of ||a_i|| and of LoWR's per-step gamma_i - 1, at the first record after step 0 and at the
    last one before the run stopped."""
    a, b = hist["channel_a"], hist["channel_b"]  # (records, layers, r)

    def at(k):
        ratio = np.divide(a[k], b[k], out=np.full_like(a[k], np.inf), where=b[k] > 0)
        g = [_gamma_minus_one(a[k, i], b[k, i], tau, alpha) for i in range(a.shape[1])]
        return {"step": float(hist["step"][k]), "max_a_over_b": float(np.max(ratio)),
                "max_norm_a": float(np.max(a[k])), "max_gamma_minus_1": float(np.max(g))}

    return {"first": at(min(1, len(hist["step"]) - 1)), "last": at(len(hist["step"]) - 1)}


@figure("lowr-tab5-sensitivity", paper="LoWR tables 5-6",
        claim="LoWR matches or beats the LoRA baseline over tau in {inf, 10, 100}, two alphas and rescaling every "
              "1 or 5 steps, and LoWR + LoRA+ matches or beats LoRA+",
        criterion=_tab5_criterion(TAB5_GRID),
        protocols=TAB5_PROTOCOLS)
def sensitivity(ctx: Context, protocol: Protocol) -> Measurement:
    if (res := _no_data()) is not None:
        return Measurement(unavailable=res.summary)
    grid = _grid(ctx)
    proto = dict(protocol.settings)
    keys = [()] + [(("lowr", g),) for g in grid] + [(("lora_plus_ratio", LORA_PLUS_RATIO),),
                                                    (("lora_plus_ratio", LORA_PLUS_RATIO), ("lowr", MAIN_LOWR))]
    configs = [_config(ctx, s, **proto, **dict(k)) for k in keys for s in ctx.seeds]
    hists = iter(_sweep(ctx, configs, on_diverge="return"))
    acc, diverged_at, diagnosis = {}, {}, {}
    for k in keys:
        vals = []
        for seed in ctx.seeds:
            h = next(hists)
            if "diverged_step" in h:
                diverged_at.setdefault(k, []).append(int(h["diverged_step"][0]))
                lowr = dict(k).get("lowr")
                if lowr is not None:
                    diagnosis.setdefault(repr(dict(k)), []).append(
                        {"seed": seed, "diverged_step": int(h["diverged_step"][0]),
                         **_divergence_diagnosis(h, lowr[0], lowr[1])})
                vals.append(math.nan)
            else:
                vals.append(float(h["test_acc"][-1]))
        acc[k] = np.array(vals)

    def pp(a, b):  # paired difference in points, a diverged seed at chance
        return 100 * (np.where(np.isfinite(a), a, CHANCE) - np.where(np.isfinite(b), b, CHANCE))

    base = acc[()]
    rows, samples = [], {}
    for g in grid:
        a = acc[(("lowr", g),)]
        d = pp(a, base)
        samples[_setting_name(*g)] = d
        rows.append({"tau": g[0], "alpha": g[1], "every": g[2], "test_acc": _ci_finite(a),
                     "delta_vs_lora_pp": ci_dict(d), "diverged": int(np.sum(~np.isfinite(a))),
                     "diverged_at_steps": diverged_at.get((("lowr", g),), [])})
    plus, plus_lowr = acc[keys[-2]], acc[keys[-1]]
    samples["plus_noninferior"] = pp(plus_lowr, plus)
    measured = {
        "rank": _rank(ctx), "protocol": proto, "lora_test_acc": _ci_finite(base), "grid": rows,
        "grid_settings": len(grid), "lora_plus_ratio": LORA_PLUS_RATIO, "lora_plus_test_acc": _ci_finite(plus),
        "lora_plus_lowr_test_acc": _ci_finite(plus_lowr), "lora_plus_lowr": list(MAIN_LOWR),
        "delta_lowr_plus_vs_lora_plus_pp": ci_dict(samples["plus_noninferior"]),
        "lora_plus_lowr_diverged_at_steps": diverged_at.get(keys[-1], []),
        "divergence_diagnosis": diagnosis,
        "divergence_mechanism": (
            "LoWR multiplies a_i by gamma_i >= 1 and divides b_i by it at every step; the loss is invariant to this, "
            "so nothing pulls a_i / b_i back. With tau = inf no channel is ever exempt and the ratio grows "
            "geometrically (x gamma^2 per step); with tau finite a single step can still overshoot tau (gamma is "
            "unbounded). Adam's step on b_i is ~lr per entry whatever the scale, so its change of "
            "c_i = ||a_i|| ||b_i|| grows with ||a_i||: Var(c) and hence gamma jump, and the loop runs away. "
            "LoRA+ multiplies B's step by 16, so the runaway starts earlier. See the 'adam lr x1/3' and 'sgd' "
            "protocols and the per-run max ||a_i||/||b_i||, max ||a_i||, max gamma-1 before each divergence."),
    }

    n_div = sum(r["diverged"] for r in rows)
    summary = (f"{protocol.name}: rank {_rank(ctx)}, {len(ctx.seeds)} seeds, {len(grid)} settings: LoRA "
               f"{100 * np.nanmean(base):.2f}%; LoWR - LoRA (pp): "
               + "; ".join(f"tau={r['tau']:g}, alpha={r['alpha']:g}, every {r['every']}: "
                           f"{_fmt(r['delta_vs_lora_pp'])}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
                           for r in rows)
               + f". LoWR + LoRA+ - LoRA+: {_fmt(measured['delta_lowr_plus_vs_lora_plus_pp'])} pp"
               + (f" ({len(measured['lora_plus_lowr_diverged_at_steps'])}/{len(ctx.seeds)} diverged, at steps "
                  f"{measured['lora_plus_lowr_diverged_at_steps']})" if measured["lora_plus_lowr_diverged_at_steps"]
                  else "")
               + "." + (" Before each divergence: " + "; ".join(
                   f"{k}: max ||a||/||b|| {np.median([d['first']['max_a_over_b'] for d in v]):.3g} -> "
                   f"{np.median([d['last']['max_a_over_b'] for d in v]):.3g}, max ||a_i|| "
                   f"{np.median([d['first']['max_norm_a'] for d in v]):.3g} -> "
                   f"{np.median([d['last']['max_norm_a'] for d in v]):.3g}, max gamma-1 per step -> "
                   f"{np.median([d['last']['max_gamma_minus_1'] for d in v]):.3g} (medians over diverged seeds)"
                   for k, v in diagnosis.items()) + ". Mechanism: " + measured["divergence_mechanism"]
                   if diagnosis else "")
               + (f" {n_div} LoWR runs diverged." if n_div else ""))
    key = {"settings_noninferior_point": int(sum(r["delta_vs_lora_pp"]["mean"] > -NONINFERIORITY_PP for r in rows)),
           "diverged_runs": n_div + len(measured["lora_plus_lowr_diverged_at_steps"])}
    def plot():
        fig, axes = new_figure(2, 1, width=5.0, height=3.6, gridspec_kw={"width_ratios": [3, 1]})
        ax = axes[0, 0]
        labels = [f"tau={t:g}\nalpha={a:g}\nevery {e}" for t, a, e in grid]
        cl = colors(3)
        for i, row in enumerate(rows):
            d = row["delta_vs_lora_pp"]
            col = cl[2] if d["ci_low"] > -NONINFERIORITY_PP else cl[1]
            ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                        capsize=3, color=col)
            if row["diverged"]:
                ax.annotate(f"{row['diverged']}/{len(ctx.seeds)}\ndiverged", (i, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 4), textcoords="offset points", ha="center", fontsize=6, color=cl[1])
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(-NONINFERIORITY_PP, color="grey", lw=1, ls="--", label="non-inferiority margin")
        ax.set_xticks(range(len(grid)), labels, fontsize=6)
        ax.set_ylabel("test accuracy: LoWR - LoRA (points), 95% CI\n(diverged seeds at chance)")
        ax.set_title(f"table 5 analogue, {protocol.name} (LoRA: {100 * np.nanmean(base):.2f}%)", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[0, 1]
        for i, vals in enumerate((plus, plus_lowr)):
            fin = vals[np.isfinite(vals)]
            if fin.size:
                m, lo, hi = mean_ci(100 * fin)
                ax.errorbar(i, m, yerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color=cl[i])
            if fin.size < vals.size:
                ax.annotate(f"{vals.size - fin.size}/{vals.size}\ndiverged", (i, 0.5),
                            xycoords=("data", "axes fraction"), ha="center", fontsize=7, color=cl[1])
        ax.set_xticks([0, 1], ["LoRA+", "LoWR +\nLoRA+"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"table 6 (ratio {LORA_PLUS_RATIO:g})", fontsize=9)
        return fig

    config = _config_record(ctx, grid=[list(g) for g in grid], lora_plus_ratio=LORA_PLUS_RATIO,
                            lora_plus_lowr=list(MAIN_LOWR), protocol=proto, diverged_seed="counted at chance (10%)")
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------------- Prop. 4.1


def _snapshot_steps(warmup: int, steps: int) -> list[int]:
    """Steps (from the rescaling at ``warmup``) at which prop41 keeps the adapters: 0-5 and ~30 log-spaced up to
    ``steps`` (the curves are drawn on a log axis; this keeps each cached run a few MB at rank 32)."""
    rel = {0, 1, 2, 3, 4, 5, steps} | {int(round(v)) for v in np.geomspace(1, steps, 30)}
    return [warmup + k for k in sorted(rel) if k <= steps]


def _prop41_run(ctx: Context, seed: int, n: float, *, warmup: int, steps: int, lr: float, targets) -> dict:
    """One engine run of Prop. 4.1: float64, full-batch SGD (deterministic, stateless), LoRA on ``targets`` (the
    frozen first layer's features are computed once by the engine), ``warmup`` steps from the standard start
    (B = 0) to a generic module, then (A, B) -> (nA, B/n) and ``steps`` more. History: ``batch_loss`` (the
    full-batch loss of every step), adapter snapshots (``snapshot_*``), each LoRA layer's (X, G = dL/dy) of the
    first step after the rescaling (``io_*``)."""
    cfg = _config(ctx, seed).replace(targets=tuple(targets), optimizer="sgd", lr=lr, batch_size=None,
                                     dtype="float64", steps=warmup + steps, recorders=(), record_every=warmup + steps)
    callbacks = [ScaleAdapters(warmup, n), WeightSnapshots(_snapshot_steps(warmup, steps)),
                 CaptureLayerIO([warmup + 1])]
    return finetune(cfg, callbacks=callbacks, device=ctx.device)


def _effective(hist: dict, scalings: list[float]) -> list[list[np.ndarray]]:
    """s B A of every LoRA layer at every snapshot: [snapshot][layer]."""
    return [[s * hist[f"snapshot_B{i}"][t] @ hist[f"snapshot_A{i}"][t] for i, s in enumerate(scalings)]
            for t in range(len(hist["snapshot_step"]))]


@figure("lowr-prop41-equivalent", paper="LoWR Prop. 4.1",
        claim="two equivalent modules (nA, B/n) trained from the same start follow different trajectories; the "
              "first-step difference of their effective weights is (n^2 - 1) a_term + (1/n^2 - 1) b_term")
def equivalent(ctx: Context) -> Result:
    if (res := _no_data()) is not None:
        return res
    ns = ctx.pick(quick=(0.5, 2.0), default=(0.5, 2.0, 4.0))
    warmup = ctx.pick(quick=5, default=20)
    steps = ctx.pick(quick=30, default=200)
    lr = 0.05
    r = _rank(ctx)
    targets = ("layers.1", "layers.2")  # LoRA on the top two layers; the frozen first layer's features are fixed
    rel_err, g_err = [], []
    first_pred = {n: [] for n in ns}  # closed-form ||diff|| / ||s BA|| after one step, per seed (all layers)
    dist = {n: [] for n in (1.0, *ns)}  # per seed: relative distance of the effective weights vs steps
    losses = {n: [] for n in (1.0, *ns)}
    scal = [1.0] * len(targets)  # alpha = r: s = 1 in every adapted layer
    for seed in ctx.seeds:
        runs = {n: _prop41_run(ctx, seed, n, warmup=warmup, steps=steps, lr=lr, targets=targets) for n in (1.0, *ns)}
        ref = runs[1.0]
        snap_t = ref["snapshot_step"].astype(int) - warmup  # steps since the rescaling
        eff = {n: _effective(h, scal) for n, h in runs.items()}  # [snapshot][layer]
        for n, h in runs.items():
            ref_norm = [math.sqrt(sum(float(np.linalg.norm(w) ** 2) for w in eff[1.0][k])) for k in range(len(snap_t))]
            d = [math.sqrt(sum(float(np.linalg.norm(e - w) ** 2) for e, w in zip(eff[n][k], eff[1.0][k], strict=True)))
                 / ref_norm[k] for k in range(len(snap_t))]
            d[0] = 0.0  # the same module at the rescaling (as the lock-step loop reported it)
            dist[n].append(d)
            losses[n].append(h["batch_loss"][warmup:])
        # Prop. 4.1 in closed form: s(B_n'A_n' - B_n A_n) - s(B'A' - BA), from the reference (A, B, X, G) after the
        # warm-up; normalised like the measured distance (by ||s B'A'|| after the step)
        k1 = int(np.flatnonzero(snap_t == 1)[0])
        ref_norm1 = math.sqrt(sum(float(np.linalg.norm(w) ** 2) for w in eff[1.0][k1]))
        for n in ns:
            diff_sq = 0.0
            for i in range(len(targets)):
                X, G = ref[f"io_X{i}"][0], ref[f"io_G{i}"][0]
                closed = channels.equivalent_update_difference(ref[f"snapshot_A{i}"][0], ref[f"snapshot_B{i}"][0], X, G,
                                                               lr, n, scal[i])
                got = (eff[n][k1][i] - eff[n][0][i]) - (eff[1.0][k1][i] - eff[1.0][0][i])
                rel_err.append(float(np.linalg.norm(got - closed) / np.linalg.norm(closed)))
                g_err.append(float(np.abs(runs[n][f"io_G{i}"][0] - G).max() / np.abs(G).max()))
                diff_sq += float(np.linalg.norm(closed) ** 2)
            first_pred[n].append(math.sqrt(diff_sq) / ref_norm1)
    dist_arr = {n: np.array(v) for n, v in dist.items()}
    max_err = max(rel_err)
    measured = {
        "dtype": "float64", "lr": lr, "optimizer": "full-batch SGD", "warmup_steps": warmup, "steps": steps,
        "rank": r, "ns": list(ns),
        "first_step_rel_error_vs_closed_form_max": max_err,
        "first_step_rel_error_vs_closed_form_median": float(np.median(rel_err)),
        "dL_dy_equal_at_step_0_max_rel": max(g_err),
        "n": {},
        "control_n1_max_distance": float(dist_arr[1.0].max()),
    }
    diverged = True
    for n in ns:
        dn = dist_arr[n]
        measured["n"][f"{n:g}"] = {
            "first_step_rel_distance_closed_form": ci_dict(first_pred[n]),
            "first_step_rel_distance_measured": ci_dict(dn[:, 1]),
            "final_rel_distance": ci_dict(dn[:, -1]),
            "final_train_loss": ci_dict([v[-1] for v in losses[n]]),
        }
        diverged &= bool(dn[:, -1].min() >= 0.05)
    measured["final_train_loss_n1"] = ci_dict([v[-1] for v in losses[1.0]])
    closed_ok = max_err <= 1e-9
    verdict = "reproduced" if closed_ok and diverged else "partially reproduced" if closed_ok or diverged else \
        "not reproduced"
    measured["rule"] = ("reproduced if the measured first-step difference matches the closed form to a relative error "
                        "<= 1e-9 (float64) for every n and layer AND for every n != 1 and seed the effective weights "
                        "end >= 5% apart (relative Frobenius distance); partially if one holds")

    fig, axes = new_figure(2, 1, width=4.4, height=3.4)
    cl = colors(len(ns))
    ax = axes[0, 0]
    t = np.arange(steps + 1)
    for n, col in zip(ns, cl, strict=False):  # distances at the snapshot steps (0-5, then log-spaced)
        m, lo, hi = (np.exp(v) for v in mean_ci(np.log(dist_arr[n][:, 1:])))  # geometric, log-space CI
        ax.plot(snap_t[1:], m, color=col, label=f"n = {n:g}")
        ax.fill_between(snap_t[1:], lo, hi, color=col, alpha=0.25)
        ax.plot([1], [np.mean(first_pred[n])], marker="x", ms=9, color="black", ls="none",
                label="closed form, step 1" if n == ns[0] else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (full batch)")
    ax.set_ylabel("||s B_n A_n - s B A||_F / ||s B A||_F (all layers)")
    ax.set_title(f"equivalent modules (nA, B/n) diverge; n = 1: max {measured['control_n1_max_distance']:.0e}",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for n, col in zip((1.0, *ns), ["black", *cl[:len(ns)]], strict=True):
        m, lo, hi = (np.exp(v) for v in mean_ci(np.log(np.array(losses[n]))))
        ax.plot(t[1:], m, color=col, ls="--" if n == 1.0 else "-", lw=1.0 if n == 1.0 else 1.5,
                label=f"n = {n:g}" + (" (A, B)" if n == 1.0 else ""))
        if n != 1.0:
            ax.fill_between(t[1:], lo, hi, color=col, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (full batch)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"first-step error vs closed form: max {max_err:.1e}", fontsize=8)
    ax.legend(fontsize=7)
    parts = [f"n={n:g}: step 1 {measured['n'][f'{n:g}']['first_step_rel_distance_measured']['mean']:.2e} "
             f"(closed form {measured['n'][f'{n:g}']['first_step_rel_distance_closed_form']['mean']:.2e}), "
             f"end {_fmt(measured['n'][f'{n:g}']['final_rel_distance'])}" for n in ns]
    summary = (f"float64, full-batch SGD lr {lr:g}, rank {r} LoRA on {', '.join(targets)} (layers.0 frozen), from a "
               f"module after {warmup} SGD steps: the first-step "
               f"difference of s BA between (nA, B/n) and (A, B) matches (n^2-1) a_term + (1/n^2-1) b_term to "
               f"{max_err:.1e} (max relative error over n, layers, seeds). Relative distance of the effective weights: "
               + "; ".join(parts) + f" after {steps} steps (n = 1 control: {measured['control_n1_max_distance']:.0e})."
               f" Rule: {measured['rule']}.")
    config = _config_record(ctx, prop41={"dtype": "float64", "lr": lr, "optimizer": "sgd full batch",
                                         "warmup_steps": warmup, "steps": steps, "ns": list(ns), "rank": r,
                                         "targets": list(targets), "batch": "full fine-tune set"})
    return Result(verdict, summary, measured, [DATASET], config, fig)

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


def _config(ctx: Context, seed: int, dataset: str = DATASET, **changes):
    """The shared run of this module: rank R, s = alpha / r = 1, every recorder the LoWR figures use."""
    r = _rank(ctx)
    return base_config(ctx, dataset, r=r, alpha=float(r), recorders=RECORDERS, record_every=ctx.pick(10, 10),
                       seed=seed, **changes)


def _seed_runs(ctx: Context, **changes) -> list[dict]:
    """One cached run per seed of ``_config(**changes)``, through ``run_sweep`` (LoRA runs batched); a diverged
    run comes back truncated, with its ``diverged_step``."""
    return _sweep(ctx, [_config(ctx, s, **changes) for s in ctx.seeds], on_diverge="return")


def _missing(dataset: str) -> str | None:
    """Why ``dataset`` cannot be used here, or None."""
    names, notes = real_datasets((dataset,))
    return None if dataset in names else f"{dataset} is missing: {notes.get(dataset, '')}"


def _no_data() -> Result | None:
    why = _missing(DATASET)
    return None if why is None else Result("unavailable", why, {}, [], {}, None)


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

LAYERS = ("layers.0", "layers.1", "layers.2")  # the adapted layers of the shared protocol (3 linear layers)
FIG2_R = 0.9  # the paper's number


def _nan_if_diverged(hists: list[dict]) -> list[dict | None]:
    """None for a diverged run (its seed is excluded, and counted, by the criterion), the history otherwise."""
    return [None if "diverged_step" in h else h for h in hists]


def channel_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Across the channels of one layer (a = ||a_i||, b = ||b_i||): Pearson r of the significance a b with b and
    with a, B's share of var(log sig) (:func:`_b_share`), the mean and the std of the significance."""
    c = a * b
    return {"r_b": _pearson(c, b), "r_a": _pearson(c, a), "share": _b_share(a, b), "mean": float(c.mean()),
            "std": float(c.std())}


def _layer_stats(hists: list[dict | None], n_layers: int) -> dict[str, np.ndarray]:
    """:func:`channel_stats` of the final channels, (seeds, layers) per statistic; NaN rows for diverged runs."""
    out = {k: np.full((len(hists), n_layers), np.nan) for k in ("r_b", "r_a", "share", "mean", "std")}
    for s, h in enumerate(hists):
        if h is None:
            continue
        a, b = _final_channels(h)
        for layer in range(n_layers):
            for k, v in channel_stats(a[layer], b[layer]).items():
                out[k][s, layer] = v
    return out


FIG2_CRITERION = Criterion(
    tests=(
        *(Test(f"tracks_b_{ln}", f"Pearson r(||a_i|| ||b_i||, ||b_i||) over the channels of {ln} after fine-tuning "
               "(per seed)", "greater", margin=FIG2_R, why="the paper's r > 0.9") for ln in LAYERS),
        *(Test(f"b_carries_{ln}", f"B's share of the variance of log(||a_i|| ||b_i||) over the channels of {ln} "
               "(per seed)", "greater", margin=0.5,
               why="0.5 = A and B carry the channel differences equally; r(sig, ||a||) is also high here, so the "
                   "correlation alone does not say that B carries them") for ln in LAYERS),
    ),
    rule=Rule(reproduced=(*(f"tracks_b_{ln}" for ln in LAYERS), *(f"b_carries_{ln}" for ln in LAYERS)),
              partially=(tuple(f"tracks_b_{ln}" for ln in LAYERS),)),
    correction="none",
    note="Each verdict level is one conjunction of one-sided 5% tests over the layers (an intersection-union "
         "test; the 'partially' set is a subset of the 'reproduced' one): no multiplicity correction is needed.",
    recalibrations=(Recalibration(
        old="CI of r > 0.9 and CI of B's share > 0.5 in every layer; partially if the correlation part holds OR "
            "r > 0.9 (point estimate) in some layer",
        new="the same tests declared, as an intersection-union test over the layers; partially only if the "
            "correlation holds (CI) in every layer; data set as a protocol",
        why="a point estimate above 0.9 in one layer is no evidence; 'partially' rests on the tested part"),))


@figure("lowr-fig2-channel-corr", paper="LoWR fig. 2",
        claim="after fine-tuning, channel significance ||a_i|| ||b_i|| tracks ||b_i|| (Pearson r > 0.9 per layer): "
              "B carries the channel differences", criterion=FIG2_CRITERION,
        protocols=(Protocol("mnist", {"dataset": "mnist"}, primary=True,
                            note="the shared protocol (rank 32); the paper's fig. 2 is an LLM"),
                   Protocol("fashion-mnist", {"dataset": "fashion-mnist"}, note="another data set, same protocol")))
def channel_corr(ctx: Context, protocol: Protocol) -> Measurement:
    ds = protocol.settings["dataset"]
    if (why := _missing(ds)) is not None:
        return Measurement(unavailable=why)
    hists = _nan_if_diverged(_seed_runs(ctx, dataset=ds))
    n_layers = len(LAYERS)
    st = _layer_stats(hists, n_layers)
    samples = {**{f"tracks_b_{ln}": st["r_b"][:, i] for i, ln in enumerate(LAYERS)},
               **{f"b_carries_{ln}": st["share"][:, i] for i, ln in enumerate(LAYERS)}}
    measured: dict = {"rank": _rank(ctx), "dataset": ds, "diverged_runs": sum(h is None for h in hists), "layers": {}}
    for i, ln in enumerate(LAYERS):
        measured["layers"][ln] = {
            "pearson_sig_vs_b": _ci_finite(st["r_b"][:, i]), "pearson_sig_vs_a": _ci_finite(st["r_a"][:, i]),
            "b_share_of_log_sig_variance": _ci_finite(st["share"][:, i])}
    parts = [f"{ln}: r_b {np.nanmean(st['r_b'][:, i]):.3f} vs r_a {np.nanmean(st['r_a'][:, i]):.3f}, B share "
             f"{np.nanmean(st['share'][:, i]):.2f}" for i, ln in enumerate(LAYERS)]
    summary = (f"{ds}, rank {_rank(ctx)}, {len(ctx.seeds)} seeds (mean over seeds): " + "; ".join(parts) + ".")
    key = {f"r_b_{ln}": float(np.nanmean(st["r_b"][:, i])) for i, ln in enumerate(LAYERS)}

    def plot():
        fig, axes = new_figure(n_layers + 1, 1, width=3.4, height=3.2)
        seed_colors = colors(max(len(hists), 2))
        for layer in range(n_layers):
            ax = axes[0, layer]
            for s, h in enumerate(hists):
                if h is None:
                    continue
                a, b = _final_channels(h)
                ax.scatter(b[layer], a[layer] * b[layer], s=8, alpha=0.6, color=seed_colors[s],
                           label=f"seed {ctx.seeds[s]}" if s < 3 else None)
            m = measured["layers"][LAYERS[layer]]
            ax.text(0.03, 0.97, f"r(sig, ||b||) = {_fmt(m['pearson_sig_vs_b'])}\n"
                                f"r(sig, ||a||) = {_fmt(m['pearson_sig_vs_a'])}",
                    transform=ax.transAxes, va="top", fontsize=7,
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
            ax.set_xlabel("||b_i|| (column norm of lora_B)")
            ax.set_ylabel("||a_i|| ||b_i|| (channel significance)")
            ax.set_title(f"{LAYERS[layer]} (r = {_rank(ctx)}, {ds})", fontsize=9)
            if layer == 0:
                ax.legend(fontsize=7, loc="lower right")
        ax = axes[0, n_layers]
        x = np.arange(n_layers)
        for off, (key_, label, col) in enumerate((("r_b", "r(sig, ||b_i||)", seed_colors[0]),
                                                  ("r_a", "r(sig, ||a_i||)", seed_colors[1]))):
            m, lo, hi = mean_ci(st[key_])
            ax.errorbar(x + (off - 0.5) * 0.2, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, color=col, label=label)
        m, lo, hi = mean_ci(st["share"])
        ax.errorbar(x + 0.3, m, yerr=[m - lo, hi - m], fmt="s", capsize=3, color=colors(3)[2],
                    label="B's share of var(log sig)")
        ax.axhline(FIG2_R, color="grey", ls="--", lw=1, label="paper: r > 0.9")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(x, list(LAYERS))
        ax.set_ylabel("Pearson r / share (mean, 95% CI over seeds)")
        ax.set_title("per-layer summary", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[ds],
                       config=_config_record(ctx, dataset=ds), plot=plot)


# ----------------------------------------------------------------------------------------------------- fig. 3

SCALED_ALPHA = 1.0
LOWR_PROTOCOLS = (
    Protocol("alpha 0.1 (paper)", {"lowr": MAIN_LOWR}, primary=True, paper=True,
             note="tau = 10, alpha = 0.1 (the smaller of the paper's GSM8K values), rescaling every step"),
    Protocol("alpha 1 (scaled)", {"lowr": (MAIN_LOWR[0], SCALED_ALPHA, MAIN_LOWR[2])},
             note="alpha scaled to the toy's weight scale: a per-step gamma - 1 ~ ln(tau) / (2T) = 3.8e-3 lets "
                  "||a_i|| / ||b_i|| move by a factor tau over T = 300 steps; at alpha = 0.1 the median gamma - 1 "
                  "is 1.3e-3, 3e-4, 0 by layer (3-seed runs, before the 10-seed ones), so alpha ~ 0.3-1.3: we take "
                  "1, the paper's other GSM8K value (the runs are shared with lowr-tab5)"),
)


def _fig3_name(kind: str, layer: str) -> str:
    return f"{kind}_{layer}"


FIG3_CRITERION = Criterion(
    tests=(
        *(Test(_fig3_name("mean_up", ln), f"mean over the channels of {ln} of ||a_i|| ||b_i||, LoWR - LoRA (paired "
               "by seed)", "greater", margin=0.0, why="the paper: LoWR raises every layer's mean significance (a "
               "direction)") for ln in LAYERS),
        *(Test(_fig3_name("std_down", ln), f"std over the channels of {ln} of ||a_i|| ||b_i||, LoWR - LoRA (paired "
               "by seed)", "less", margin=0.0, why="the paper: LoWR narrows the spread (a direction)")
          for ln in LAYERS),
    ),
    rule=Rule(reproduced=(*(_fig3_name("mean_up", ln) for ln in LAYERS), *(_fig3_name("std_down", ln)
                                                                           for ln in LAYERS)),
              partially=tuple((_fig3_name(k, ln),) for k in ("mean_up", "std_down") for ln in LAYERS)),
    note="Partially reproduced: some of the 2 x 3 tests pass (Holm over the 6). A diverged run excludes its seed "
         "(reported as n_excluded). That significance still tracks ||b_i|| with LoWR is reported, not tested "
         "(lowr-fig2 tests it without LoWR).",
    recalibrations=(Recalibration(
        old="counts of layers whose paired CI goes the paper's way (mean up, std down), uncorrected; "
            "reproduced if all 2 x layers, not if none",
        new="the same 6 paired one-sided tests, Holm over them; alpha scaled to the toy's weight scale as a "
            "protocol",
        why="6 uncorrected intervals; at the paper's alpha the rescaling barely acts on the toy (gamma - 1 per "
            "step 1e-3 and below), so whether LoWR does anything here is a protocol question"),))


@figure("lowr-fig3-with-without", paper="LoWR fig. 3",
        claim="with LoWR every layer's mean channel significance ||a_i|| ||b_i|| rises and its spread across "
              "channels falls, while significance still tracks ||b_i||", criterion=FIG3_CRITERION,
        protocols=LOWR_PROTOCOLS)
def with_without(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _missing(DATASET)) is not None:
        return Measurement(unavailable=why)
    lowr_setting = tuple(protocol.settings["lowr"])
    tau, alpha, every = lowr_setting
    base = _nan_if_diverged(_seed_runs(ctx))
    lowr = _nan_if_diverged(_seed_runs(ctx, lowr=lowr_setting))
    n_layers = len(LAYERS)
    st0, st1 = _layer_stats(base, n_layers), _layer_stats(lowr, n_layers)
    m0, s0, m1, s1 = st0["mean"], st0["std"], st1["mean"], st1["std"]
    gam = np.full((len(lowr), n_layers), np.nan)  # per-step rescaling strength: median over records x channels
    ratio = {k: np.full((len(lowr), n_layers), np.nan) for k in ("LoRA", "LoWR")}
    for s, (h0, h1) in enumerate(zip(base, lowr, strict=True)):
        for layer in range(n_layers):
            if h1 is not None:
                g = [_gamma_minus_one(h1["channel_a"][k, layer], h1["channel_b"][k, layer], tau, alpha)
                     for k in range(1, len(h1["step"]))]
                gam[s, layer] = np.median(np.concatenate(g))
            for name, h in (("LoRA", h0), ("LoWR", h1)):
                if h is not None:
                    a, b = _final_channels(h)
                    ratio[name][s, layer] = np.median(a[layer] / b[layer])
    samples = {**{_fig3_name("mean_up", ln): m1[:, i] - m0[:, i] for i, ln in enumerate(LAYERS)},
               **{_fig3_name("std_down", ln): s1[:, i] - s0[:, i] for i, ln in enumerate(LAYERS)}}
    target = math.log(tau) / (2 * _config(ctx, ctx.seeds[0]).steps)
    measured: dict = {"lowr": {"tau": tau, "alpha": alpha, "every": every}, "rank": _rank(ctx), "layers": {},
                      "diverged_runs": {"LoRA": sum(h is None for h in base), "LoWR": sum(h is None for h in lowr)},
                      "gamma_minus_1_target_ln_tau_over_2T": target}
    for i, ln in enumerate(LAYERS):
        measured["layers"][ln] = {
            "mean_sig_lora": _ci_finite(m0[:, i]), "mean_sig_lowr": _ci_finite(m1[:, i]),
            "std_sig_lora": _ci_finite(s0[:, i]), "std_sig_lowr": _ci_finite(s1[:, i]),
            "delta_mean_sig": _ci_finite(m1[:, i] - m0[:, i]), "delta_std_sig": _ci_finite(s1[:, i] - s0[:, i]),
            "rel_change_mean_sig": _ci_finite(m1[:, i] / m0[:, i] - 1),
            "rel_change_std_sig": _ci_finite(s1[:, i] / s0[:, i] - 1),
            "pearson_sig_vs_b_lora": _ci_finite(st0["r_b"][:, i]), "pearson_sig_vs_b_lowr": _ci_finite(st1["r_b"][:, i]),
            "median_a_over_b_lora": _ci_finite(ratio["LoRA"][:, i]),
            "median_a_over_b_lowr": _ci_finite(ratio["LoWR"][:, i]),
            "median_gamma_minus_1_per_step": _ci_finite(gam[:, i])}
    parts = []
    for ln in LAYERS:
        mm = measured["layers"][ln]
        parts.append(f"{ln}: mean sig {100 * mm['rel_change_mean_sig']['mean']:+.1f}% "
                     f"(delta {_fmt(mm['delta_mean_sig'], 2)}), std {100 * mm['rel_change_std_sig']['mean']:+.1f}% "
                     f"(delta {_fmt(mm['delta_std_sig'], 2)})")
    summary = (f"LoWR (tau={tau:g}, alpha={alpha:g}, every {every}; median gamma-1 per step "
               f"{', '.join(f'{v:.1e}' for v in np.nanmean(gam, axis=0))} by layer, target ln(tau)/2T = "
               f"{target:.1e}) vs LoRA, rank {_rank(ctx)}, {len(ctx.seeds)} seeds: " + "; ".join(parts) + "."
               + (f" Diverged: {measured['diverged_runs']}." if sum(measured["diverged_runs"].values()) else ""))
    key = {f"rel_change_mean_{ln}": measured["layers"][ln]["rel_change_mean_sig"]["mean"] for ln in LAYERS}

    def plot():
        fig, axes = new_figure(n_layers, 2, width=3.6, height=3.2)
        cl = colors(3)
        for layer in range(n_layers):
            ax = axes[0, layer]
            for hists, label, col in ((base, "LoRA", cl[0]),
                                      (lowr, f"LoRA + LoWR (tau={tau:g}, alpha={alpha:g})", cl[1])):
                first = True
                for h in hists:
                    if h is None:
                        continue
                    a, b = _final_channels(h)
                    ax.scatter(b[layer], a[layer] * b[layer], s=6, alpha=0.4, color=col,
                               label=label if first else None)
                    first = False
            ax.set_xlabel("||b_i||")
            ax.set_ylabel("||a_i|| ||b_i||")
            mm = measured["layers"][LAYERS[layer]]
            ax.set_title(f"{LAYERS[layer]}: r(sig,||b||) {mm['pearson_sig_vs_b_lora']['mean']:.2f} -> "
                         f"{mm['pearson_sig_vs_b_lowr']['mean']:.2f}", fontsize=8)
            if layer == 0:
                ax.legend(fontsize=6)
        x = np.arange(n_layers)
        ax = axes[1, 0]
        for off, (mean, std, label, col) in enumerate(((m0, s0, "LoRA", cl[0]), (m1, s1, "LoRA + LoWR", cl[1]))):
            ax.bar(x + (off - 0.5) * 0.38, np.nanmean(mean, 0), width=0.36, yerr=np.nanmean(std, 0), capsize=3,
                   color=col, label=label)
        ax.set_xticks(x, list(LAYERS))
        ax.set_ylabel("mean ||a_i|| ||b_i|| (+- avg std)")
        ax.set_title("mean channel significance per layer", fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[1, 1]
        for off, (vals, label, col) in enumerate(((m1 / m0 - 1, "mean significance", cl[1]),
                                                  (s1 / s0 - 1, "std of significance", cl[2]))):
            ok = np.all(np.isfinite(vals), axis=1)
            m, lo, hi = mean_ci(100 * vals[ok])
            ax.errorbar(x + (off - 0.5) * 0.2, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, color=col, label=label)
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(x, list(LAYERS))
        ax.set_ylabel("change with LoWR (%), 95% CI over seeds")
        ax.set_title("paper: mean up, std down", fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[1, 2]
        for off, (name, col) in enumerate((("LoRA", cl[0]), ("LoWR", cl[1]))):
            vals = ratio[name]
            xo = x + (off - 0.5) * 0.2
            for s_vals in vals:
                ax.scatter(xo, s_vals, s=10, color=col, alpha=0.5)
            ax.scatter(xo, np.exp(np.nanmean(np.log(vals), 0)), s=40, marker="D", color=col,
                       label=f"{name} (geo. mean; dots: seeds)")
        ax.axhline(tau, color="grey", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.set_yscale("log")
        ax.set_xticks(x, list(LAYERS))
        ax.set_ylabel("median ||a_i|| / ||b_i||")
        ax.set_title("LoWR raises ||a||/||b|| up to ~tau", fontsize=8)
        ax.legend(fontsize=7)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=_config_record(ctx, lowr={"tau": tau, "alpha": alpha, "every": every}), plot=plot)


# ----------------------------------------------------------------------------------------------------- fig. 4


def _grad_total(h: dict) -> tuple[np.ndarray, np.ndarray]:
    """(total adapter gradient norm, B-part) per record, over all layers (record 0 has none: NaN)."""
    ga, gb = h["grad_norm_A"], h["grad_norm_B"]
    return np.sqrt((ga**2).sum(1) + (gb**2).sum(1)), np.sqrt((gb**2).sum(1))


def late_window(steps: np.ndarray) -> np.ndarray:
    """The records of the second half of training (step > last / 2), where fig. 4's claim is tested."""
    return steps > steps[-1] / 2


FIG4_CRITERION = Criterion(
    tests=(
        Test("loss_lower", "mean training loss over the second half of training (whole fine-tune set), LoWR - LoRA "
             "(paired by seed)", "less", margin=0.0, why="the paper: lower loss with LoWR (a direction)"),
        Test("grad_larger", "ln(mean gradient norm of all adapters over the second half, LoWR / LoRA) (paired by "
             "seed)", "greater", margin=0.0, why="the paper: larger gradient norm late in training (a direction)"),
    ),
    rule=Rule(reproduced=("loss_lower", "grad_larger"), partially=(("loss_lower",), ("grad_larger",))),
    note="Partially reproduced: one of the two (Holm over the 2). A diverged run excludes its seed.",
    recalibrations=(Recalibration(
        old="CI of the late loss change < 0 and CI of the late gradient-norm ratio > 1 (a ratio of per-seed means, "
            "t-interval on the ratio); partially if one holds, uncorrected",
        new="one-sided paired t-tests on the loss change and on the log of the ratio, Holm over the 2; alpha scaled "
            "to the toy and the learning rate as protocols",
        why="'partially' passes on either of two tests: without a correction it is a 10% test; a ratio is tested "
            "on its log"),))


@figure("lowr-fig4-loss-gradnorm", paper="LoWR fig. 4",
        claim="with LoWR the fine-tuning loss is lower and the gradient norm larger than without, "
              "especially late in training", criterion=FIG4_CRITERION,
        protocols=(*LOWR_PROTOCOLS,
                   Protocol("lr x1/3", {"lowr": MAIN_LOWR, "lr": round(1e-3 / 3, 8)},
                            note="Adam lr 1e-3 / 3 (the runs of lowr-tab5's protocol of that name)"),
                   Protocol("lr x3", {"lowr": MAIN_LOWR, "lr": 3e-3}, note="Adam lr 3e-3")))
def loss_gradnorm(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _missing(DATASET)) is not None:
        return Measurement(unavailable=why)
    settings = dict(protocol.settings)
    lowr_setting = tuple(settings.pop("lowr"))
    tau, alpha, every = lowr_setting
    runs = {"LoRA": _nan_if_diverged(_seed_runs(ctx, **settings)),
            "LoRA + LoWR": _nan_if_diverged(_seed_runs(ctx, lowr=lowr_setting, **settings))}
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
                p["train_loss"][s], (p["grad"][s], p["grad_B"][s]) = h["train_loss"], _grad_total(h)
                p["test_acc"][s] = h["test_acc"][-1]
        p["late_grad"], p["late_grad_B"] = p["grad"][:, late].mean(1), p["grad_B"][:, late].mean(1)
        p["late_loss"] = p["train_loss"][:, late].mean(1)
        per[name] = p
    lo_, lw = per["LoRA"], per["LoRA + LoWR"]
    samples = {"loss_lower": lw["late_loss"] - lo_["late_loss"],
               "grad_larger": np.log(lw["late_grad"] / lo_["late_grad"])}
    measured = {
        "lowr": {"tau": tau, "alpha": alpha, "every": every}, "rank": _rank(ctx), "protocol": settings,
        "final_train_loss_lora": _ci_finite(lo_["train_loss"][:, -1]),
        "final_train_loss_lowr": _ci_finite(lw["train_loss"][:, -1]),
        "delta_late_mean_train_loss": _ci_finite(samples["loss_lower"]),
        "late_grad_norm_lora": _ci_finite(lo_["late_grad"]), "late_grad_norm_lowr": _ci_finite(lw["late_grad"]),
        "late_grad_norm_ratio_geometric": _log_ratio(samples["grad_larger"]),
        "late_grad_norm_B_ratio_geometric": _log_ratio(np.log(lw["late_grad_B"] / lo_["late_grad_B"])),
        "final_test_acc_lora": _ci_finite(lo_["test_acc"]), "final_test_acc_lowr": _ci_finite(lw["test_acc"]),
        "late_window_steps": [float(steps[late][0]), float(steps[-1])],
        "diverged_runs": {k: int(np.sum(~np.isfinite(v["test_acc"]))) for k, v in per.items()},
    }
    summary = (f"LoWR (tau={tau:g}, alpha={alpha:g}) minus LoRA over the second half of training "
               f"({n} seeds, rank {_rank(ctx)}, {protocol.name}): training loss "
               f"{_fmt(measured['delta_late_mean_train_loss'])} (final {measured['final_train_loss_lora']['mean']:.3g}"
               f" -> {measured['final_train_loss_lowr']['mean']:.3g}); gradient-norm ratio "
               f"{_fmt(measured['late_grad_norm_ratio_geometric'])} (B only "
               f"{_fmt(measured['late_grad_norm_B_ratio_geometric'])}); test accuracy "
               f"{measured['final_test_acc_lora']['mean']:.4f} -> {measured['final_test_acc_lowr']['mean']:.4f}.")
    key = {"delta_late_loss": measured["delta_late_mean_train_loss"]["mean"],
           "grad_ratio": measured["late_grad_norm_ratio_geometric"]["mean"]}

    def plot():
        fig, axes = new_figure(3, 1, width=3.8, height=3.2)
        cl = colors(2)
        for (name, p), col in zip(per.items(), cl, strict=True):
            for ax, key_, ylabel in ((axes[0, 0], "train_loss", "training loss (full fine-tune set)"),
                                     (axes[0, 1], "grad", "grad norm, all adapters (batch)"),
                                     (axes[0, 2], "grad_B", "grad norm of the lora_B's (batch)")):
                vals, x = p[key_], steps
                if key_ != "train_loss":  # no gradient at step 0
                    vals, x = vals[:, 1:], steps[1:]
                vals = vals[np.all(np.isfinite(vals), axis=1)]
                m, lo, hi = (np.exp(v) for v in mean_ci(np.log(vals)))  # geometric mean, CI in log space
                ax.plot(x, m, color=col, label=name)
                ax.fill_between(x, lo, hi, color=col, alpha=0.2)
                ax.set_yscale("log")
                ax.set_xlabel("fine-tuning step")
                ax.set_ylabel(ylabel)
        for ax in axes[0]:
            ax.axvspan(steps[late][0], steps[-1], color="grey", alpha=0.08)
        axes[0, 0].legend(fontsize=7, title=f"tau={tau:g}, alpha={alpha:g}\n(geo. mean, 95% CI)", title_fontsize=7)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=_config_record(ctx, lowr={"tau": tau, "alpha": alpha, "every": every}, **settings),
                       plot=plot)


def _log_ratio(logs) -> dict:
    """A CI dict of a ratio from per-seed logs (geometric mean and interval), finite seeds only."""
    d = _ci_finite(logs)
    return {k: (math.exp(d[k]) if k in ("mean", "ci_low", "ci_high") and math.isfinite(d[k]) else d[k]) for k in d}


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
        # a record taken while the run was blowing up can hold inf / NaN norms: gamma is then undefined (NaN)
        g = [float(np.max(_gamma_minus_one(a[k, i], b[k, i], tau, alpha)))
             if np.isfinite(a[k, i]).all() and np.isfinite(b[k, i]).all() else math.nan for i in range(a.shape[1])]
        finite = [v for v in g if not math.isnan(v)]
        return {"step": float(hist["step"][k]), "max_a_over_b": float(np.max(ratio)),
                "max_norm_a": float(np.max(a[k])), "max_gamma_minus_1": max(finite) if finite else math.nan}

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


def _prop41_config(ctx: Context, seed: int, *, warmup: int, steps: int, lr: float, targets):
    """Prop. 4.1's run: float64, full-batch SGD (deterministic, stateless), LoRA on ``targets`` (the frozen first
    layer's features are computed once by the engine), ``warmup + steps`` steps, no recorder."""
    return _config(ctx, seed).replace(targets=tuple(targets), optimizer="sgd", lr=lr, batch_size=None,
                                      dtype="float64", steps=warmup + steps, recorders=(),
                                      record_every=warmup + steps)


def _prop41_callbacks(n: float, warmup: int, steps: int) -> list:
    """``warmup`` steps from the standard start (B = 0) to a generic module, then (A, B) -> (nA, B/n) and ``steps``
    more. History: ``batch_loss`` (the full-batch loss of every step), adapter snapshots (``snapshot_*``), each
    LoRA layer's (X, G = dL/dy) of the first step after the rescaling (``io_*``)."""
    return [ScaleAdapters(warmup, n), WeightSnapshots(_snapshot_steps(warmup, steps)), CaptureLayerIO([warmup + 1])]


def _prop41_runs(ctx: Context, ns, *, warmup: int, steps: int, lr: float, targets) -> dict:
    """Every (seed, n) run of Prop. 4.1 (:func:`_prop41_config`, :func:`_prop41_callbacks`) in one parallel sweep."""
    keys = [(s, n) for s in ctx.seeds for n in ns]
    configs = [_prop41_config(ctx, s, warmup=warmup, steps=steps, lr=lr, targets=targets) for s, _ in keys]
    hists = _sweep(ctx, configs, callbacks=[_prop41_callbacks(n, warmup, steps) for _, n in keys])
    return dict(zip(keys, hists, strict=True))


def _effective(hist: dict, scalings: list[float]) -> list[list[np.ndarray]]:
    """s B A of every LoRA layer at every snapshot: [snapshot][layer]."""
    return [[s * hist[f"snapshot_B{i}"][t] @ hist[f"snapshot_A{i}"][t] for i, s in enumerate(scalings)]
            for t in range(len(hist["snapshot_step"]))]


PROP41_APART = 0.05  # final relative distance of the effective weights that counts as "a different trajectory"
PROP41_NS = (0.5, 2.0, 4.0)


def _prop41_name(n: float) -> str:
    return f"apart_n={n:g}"


PROP41_CRITERION = Criterion(
    tests=(
        *(Test(_prop41_name(n), f"ln(relative distance ||s B_n A_n - s B A||_F / ||s B A||_F after the last step), "
               f"n = {n:g} (per seed)", "greater", margin=math.log(PROP41_APART),
               why="5% is ten times the float32 noise floor of a fine-tune (the runs are float64: the n = 1 "
                   "control stays at exactly 0)") for n in PROP41_NS),
        Test("closed_form", "SANITY: max relative error of the measured first-step difference of s BA against "
             "(n^2 - 1) a_term + (1/n^2 - 1) b_term (analysis.channels), over n, layers and seeds", "less",
             margin=1e-9, method="exact", role="sanity",
             why="an identity of one SGD step in float64: it cannot fail short of a bug"),
    ),
    rule=Rule(reproduced=tuple(_prop41_name(n) for n in PROP41_NS),
              partially=tuple((_prop41_name(n),) for n in PROP41_NS)),
    note="Partially reproduced: the modules end apart for some n only (Holm over the n).",
    recalibrations=(Recalibration(
        old="reproduced if the closed form matches to 1e-9 AND every seed's final distance is >= 5% for every n; "
            "partially if one holds",
        new="the closed form is a sanity row; the claim is a one-sided t-test over 10 seeds of the log final "
            "distance > ln 0.05 per n, Holm over the n; 50 steps after the rescaling (was 200)",
        why="the first-step identity cannot fail (it is algebra), so it cannot carry half of a verdict; the minimum "
            "over seeds is no test; 50 steps for the 15-minute budget (float64, full batch, rank 32)"),))


@figure("lowr-prop41-equivalent", paper="LoWR Prop. 4.1",
        claim="two equivalent modules (nA, B/n) trained from the same start follow different trajectories; the "
              "first-step difference of their effective weights is (n^2 - 1) a_term + (1/n^2 - 1) b_term",
        criterion=PROP41_CRITERION,
        protocols=(Protocol("full-batch SGD", {}, primary=True, paper=True,
                            note="Prop. 4.1's setting: plain gradient descent (deterministic, stateless)"),))
def equivalent(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _missing(DATASET)) is not None:
        return Measurement(unavailable=why)
    ns = PROP41_NS
    warmup = ctx.pick(quick=5, default=20)
    steps = ctx.pick(quick=30, default=50)
    lr = 0.05
    r = _rank(ctx)
    targets = ("layers.1", "layers.2")  # LoRA on the top two layers; the frozen first layer's features are fixed
    rel_err, g_err = [], []
    first_pred = {n: [] for n in ns}  # closed-form ||diff|| / ||s BA|| after one step, per seed (all layers)
    dist = {n: [] for n in (1.0, *ns)}  # per seed: relative distance of the effective weights vs steps
    losses = {n: [] for n in (1.0, *ns)}
    scal = [1.0] * len(targets)  # alpha = r: s = 1 in every adapted layer
    all_runs = _prop41_runs(ctx, (1.0, *ns), warmup=warmup, steps=steps, lr=lr, targets=targets)
    for seed in ctx.seeds:
        runs = {n: all_runs[(seed, n)] for n in (1.0, *ns)}
        ref = runs[1.0]
        snap_t = ref["snapshot_step"].astype(int) - warmup  # steps since the rescaling
        eff = {n: _effective(h, scal) for n, h in runs.items()}  # [snapshot][layer]
        ref_norm = [math.sqrt(sum(float(np.linalg.norm(w) ** 2) for w in eff[1.0][k])) for k in range(len(snap_t))]
        for n, h in runs.items():
            d = [math.sqrt(sum(float(np.linalg.norm(e - w) ** 2) for e, w in zip(eff[n][k], eff[1.0][k], strict=True)))
                 / ref_norm[k] for k in range(len(snap_t))]
            d[0] = 0.0  # the same module at the rescaling (as the lock-step loop reported it)
            dist[n].append(d)
            losses[n].append(h["batch_loss"][warmup:])
        # Prop. 4.1 in closed form: s(B_n'A_n' - B_n A_n) - s(B'A' - BA), from the reference (A, B, X, G) after the
        # warm-up; normalised like the measured distance (by ||s B'A'|| after the step)
        k1 = int(np.flatnonzero(snap_t == 1)[0])
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
            first_pred[n].append(math.sqrt(diff_sq) / ref_norm[k1])
    dist_arr = {n: np.array(v) for n, v in dist.items()}
    max_err = max(rel_err)
    samples = {_prop41_name(n): np.log(dist_arr[n][:, -1]) for n in ns}
    samples["closed_form"] = max_err
    measured = {
        "dtype": "float64", "lr": lr, "optimizer": "full-batch SGD", "warmup_steps": warmup, "steps": steps,
        "rank": r, "ns": list(ns),
        "first_step_rel_error_vs_closed_form_max": max_err,
        "first_step_rel_error_vs_closed_form_median": float(np.median(rel_err)),
        "dL_dy_equal_at_step_0_max_rel": max(g_err),
        "n": {},
        "control_n1_max_distance": float(dist_arr[1.0].max()),
    }
    for n in ns:
        dn = dist_arr[n]
        measured["n"][f"{n:g}"] = {
            "first_step_rel_distance_closed_form": ci_dict(first_pred[n]),
            "first_step_rel_distance_measured": ci_dict(dn[:, 1]),
            "final_rel_distance": ci_dict(dn[:, -1]),
            "final_rel_distance_geometric": _log_ratio(np.log(dn[:, -1])),
            "final_train_loss": ci_dict([v[-1] for v in losses[n]]),
        }
    measured["final_train_loss_n1"] = ci_dict([v[-1] for v in losses[1.0]])
    parts = [f"n={n:g}: step 1 {measured['n'][f'{n:g}']['first_step_rel_distance_measured']['mean']:.2e} "
             f"(closed form {measured['n'][f'{n:g}']['first_step_rel_distance_closed_form']['mean']:.2e}), "
             f"end {_fmt(measured['n'][f'{n:g}']['final_rel_distance'])}" for n in ns]
    summary = (f"float64, full-batch SGD lr {lr:g}, rank {r} LoRA on {', '.join(targets)} (layers.0 frozen), from a "
               f"module after {warmup} SGD steps, {len(ctx.seeds)} seeds: the first-step difference of s BA between "
               f"(nA, B/n) and (A, B) matches (n^2-1) a_term + (1/n^2-1) b_term to {max_err:.1e} (max relative error "
               "over n, layers, seeds). Relative distance of the effective weights: " + "; ".join(parts)
               + f" after {steps} steps (n = 1 control: {measured['control_n1_max_distance']:.0e}).")
    config = _config_record(ctx, prop41={"dtype": "float64", "lr": lr, "optimizer": "sgd full batch",
                                         "warmup_steps": warmup, "steps": steps, "ns": list(ns), "rank": r,
                                         "targets": list(targets), "batch": "full fine-tune set",
                                         "fidelity_note": "50 steps after the rescaling (was 200), for the budget"})
    key = {f"final_distance_n={n:g}": measured["n"][f"{n:g}"]["final_rel_distance_geometric"]["mean"] for n in ns}

    def plot():
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
        ax.axhline(PROP41_APART, color="grey", ls=":", lw=1, label="claim margin 5%")
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
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, plot=plot)

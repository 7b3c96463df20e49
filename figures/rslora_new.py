"""rsLoRA (seed 002) claims that the original figures do not test: the inductive argument after Thm. 3.2 (adapters
on every layer of a deep network), "holds at any point in the learning trajectory", and the attention-only ablation
(app. B.5 / fig. 7) as adapters on a subset of the MLP's layers.

Theorem 3.2 (our convention, f(x) = gamma_r B A x, A = lora_A (r, d), B = lora_B (d_out, r), B_0 = 0): after n SGD
steps the m-th moments of the adapter output and of the loss gradient into its input are Theta((gamma_r^2 r)^m) as
r -> infinity at fixed width d, so with gamma_r = alpha r^-beta the root-mean-square (m = 2, square root) scales as
r^(1 - 2 beta): exponent 0 for rsLoRA (beta = 1/2), -1 for LoRA (beta = 1). ERRATA.md (rank stabilization, item 2)
shows that this holds only for r >> d (for r << d the dropped terms give r^(1/2 - 2 beta)); the deep-network
figures here therefore use a narrow MLP (width 4, synthetic Gaussian task, ``dataset="synthetic"``) and ranks
32..512 >> d, trained with plain SGD (the theorem's optimizer); the multilayer figure measures it both with ReLU
and without activation (a deep linear network, ``FinetuneConfig(activation="identity")``). The rank-subset figure uses the MNIST protocol
(:func:`figures._common.base_config`) and Adam, like the paper's fig. 7.

Exponents are fitted per seed (least squares of log RMS against log r) and summarised over seeds with a t-interval;
"equivalent to p" means the 90% CI lies inside [p - margin, p + margin] (two one-sided tests at 5%, TOST).
"""

from __future__ import annotations

import math

import numpy as np
import seaborn as sns

from analysis import rank_scaling as rs
from figures import Context, Measurement, Protocol, figure
from figures._common import base_config, new_figure
from figures.criteria import Criterion, Rule, Test, ci_dict
from toymodels import data as datasets
from toymodels.train import FinetuneConfig, run_sweep

METHODS = ("lora", "rslora")
METHOD_LABEL = {"lora": "LoRA (alpha/r)", "rslora": "rsLoRA (alpha/sqrt(r))"}
METHOD_COLOR = {"lora": sns.color_palette("colorblind")[1], "rslora": sns.color_palette("colorblind")[0]}
PREDICTED_RMS_EXPONENT = {"lora": -1.0, "rslora": 0.0}  # 1 - 2 beta, Thm. 3.2 for r >> d
MARGIN = 0.15  # equivalence margin on an RMS exponent (the finite-rank bias at r_min = 32, d = 4 is 0.03)

# the deep narrow network of the multilayer and trajectory figures: width 4 (r >> d), 4 layers, every layer adapted
DEEP_WIDTHS = (4, 4, 4, 4, 4)
DEEP_LR = 0.05  # plain SGD (the theorem's optimizer); stable for every rank and both scalings here
DEEP_ALPHA = 1.0
TRAJECTORY_STEPS = (1, 10, 100, 1000)  # the n


# ------------------------------------------------------------------------------------------------ statistics


def seed_slopes(x, Y) -> np.ndarray:
    """Least-squares slope of each row of ``Y`` (seeds x points) against ``x``; NaN for a row with a non-finite
    value. For exponents pass x = log r and Y = log moment."""
    x = np.asarray(x, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    if x.ndim != 1 or Y.shape[1] != x.size or x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"Y must have one column per x value (>= 2 distinct), got Y {Y.shape} and x {x.shape}")
    xc = x - x.mean()
    out = np.full(Y.shape[0], math.nan)
    ok = np.all(np.isfinite(Y), axis=1)
    out[ok] = (Y[ok] - Y[ok].mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    return out


def _ci(values) -> dict:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    return ci_dict(v)


def _fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}g} [{d['ci_low']:.{digits}g}, {d['ci_high']:.{digits}g}]"


def _errorbars(ax, x, cis: list[dict], **kw):
    mean = np.array([v["mean"] for v in cis])
    ax.errorbar(x, mean, yerr=[mean - [v["ci_low"] for v in cis], [v["ci_high"] for v in cis] - mean], capsize=3,
                **kw)


# --------------------------------------------------------------------------------------------- shared runs


DEEP_PROTOCOLS = (
    Protocol("sgd", {"optimizer": "sgd", "lr": DEEP_LR}, primary=True, paper=True,
             note="the proof's optimizer (plain SGD), a step size stable at every rank"),
    Protocol("sgd-small-lr", {"optimizer": "sgd", "lr": 0.01},
             note="a 5x smaller step: the theorem's O(gamma^3) remainders shrink"),
    Protocol("adam", {"optimizer": "adam", "lr": 1e-3},
             note="the paper's experiments use AdamW; Adam normalises the update, outside the theorem's setting"),
)


def deep_ranks(ctx: Context) -> tuple[int, ...]:
    return ctx.pick(quick=(32, 128), default=(32, 128, 512), large=(32, 128, 512, 2048))


def deep_config(seed: int, *, r: int, scaling: str, steps: int, **settings) -> FinetuneConfig:
    """The narrow deep MLP (synthetic task, width 4, every layer adapted), SGD (or ``settings``) for ``steps``
    steps, recorded at the start and at the end only (the moments of every layer's adapter output on the
    fine-tune set). The same config at every fidelity: the network is tiny."""
    cfg = FinetuneConfig(
        dataset="synthetic", widths=DEEP_WIDTHS, targets=tuple(f"layers.{i}" for i in range(len(DEEP_WIDTHS) - 1)),
        n_pretrain=512, n_finetune=256, n_test=256, pretrain_steps=200, task_shift="permute",
        r=r, alpha=DEEP_ALPHA, scaling=scaling, optimizer="sgd", lr=DEEP_LR, batch_size=32, steps=steps,
        record_every=steps, recorders=("loss", "moments"), seed=seed)
    return cfg.replace(**settings) if settings else cfg


def _deep_runs(ctx: Context, steps, settings: dict) -> dict:
    """{n: {(method, r): [history per seed]}} of the deep network after n steps, for each n in ``steps`` (one
    sweep for all of them, run cache)."""
    keys = [(n, m, r, s) for n in steps for m in METHODS for r in deep_ranks(ctx) for s in ctx.seeds]
    hists = run_sweep([deep_config(s, r=r, scaling=m, steps=n, **settings) for n, m, r, s in keys],
                      device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False)
    out: dict = {n: {} for n in steps}
    for (n, m, r, _), h in zip(keys, hists, strict=True):
        out[n].setdefault((m, r), []).append(h)
    return out


def layer_rms(runs: dict, method: str, ranks) -> np.ndarray:
    """(seeds, ranks, layers): RMS of each layer's adapter output at the run's last record (sqrt of the
    ``out_second`` recorder: mean over fine-tune samples and output entries of f(x)^2)."""
    return np.stack([np.stack([np.sqrt(np.asarray(h["out_second"][-1])) for h in runs[method, r]]) for r in ranks],
                    axis=1)


# ------------------------------------------------------------------------------------------- multilayer

N_DEEP_LAYERS = len(DEEP_WIDTHS) - 1
MULTILAYER_STEPS = 100
# the two deep networks of the issue ("a deep MLP (linear and ReLU)"): network -> toymodels.mlp activation
NETWORKS = {"relu": "relu", "linear": "identity"}
NETWORK_LABEL = {"relu": "ReLU MLP", "linear": "deep linear network (no activation)"}
_WHY_EQ = (f"+-{MARGIN}: a quarter-decade of RMS change over r = 32..512 is 'Theta(1)' for exponent 0; the "
           f"finite-rank bias of the one-layer closed form is 0.03 at r >= 32, d = 4")


def _multilayer_tests(net: str) -> tuple[Test, ...]:
    label = NETWORK_LABEL[net]
    return (
        tuple(Test(f"{net}_rslora_{i}", f"{label}: exponent of r of layers.{i}'s adapter-output RMS, rsLoRA "
                   "(per seed)", "equivalent", margin=MARGIN, why=_WHY_EQ) for i in range(N_DEEP_LAYERS))
        + tuple(Test(f"{net}_lora_{i}", f"{label}: exponent of r of layers.{i}'s adapter-output RMS, LoRA "
                     "(per seed)", "equivalent", margin=(-1 - MARGIN, -1 + MARGIN),
                     why=_WHY_EQ.replace("exponent 0", "exponent -1 (the theorem)"))
                for i in range(N_DEEP_LAYERS))
        + tuple(Test(f"{net}_gap_{i}", f"{label}, layers.{i}: rsLoRA's exponent minus LoRA's (paired by seed)",
                     "greater", margin=0.0, why="the weaker, directional form: rsLoRA is flatter in r than LoRA")
                for i in range(N_DEEP_LAYERS)))


MULTILAYER = Criterion(
    tests=tuple(t for net in NETWORKS for t in _multilayer_tests(net)),
    rule=Rule(reproduced=tuple(f"{net}_{m}_{i}" for net in NETWORKS for m in ("rslora", "lora")
                               for i in range(N_DEEP_LAYERS)),
              partially=(tuple(f"{net}_gap_{i}" for net in NETWORKS for i in range(N_DEEP_LAYERS)),)),
    note="exponents fitted per seed by least squares of ln RMS on ln r; every layer of the deep network adapted; "
         "the same seeds, data and ranks for the ReLU MLP and the deep linear network (Holm over both)",
)


def multilayer_runs(ctx: Context, settings: dict) -> dict:
    """{network: {(method, r): [history per seed]}} of the deep networks of :data:`NETWORKS` after
    :data:`MULTILAYER_STEPS` steps (one sweep for both; the ReLU runs are :func:`deep_config`'s, run cache shared
    with rslora-trajectory's n = 100)."""
    keys = [(net, m, r, s) for net in NETWORKS for m in METHODS for r in deep_ranks(ctx) for s in ctx.seeds]
    cfgs = [deep_config(s, r=r, scaling=m, steps=MULTILAYER_STEPS, **{**settings, "activation": NETWORKS[net]})
            for net, m, r, s in keys]
    hists = run_sweep(cfgs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False)
    out: dict = {net: {} for net in NETWORKS}
    for (net, m, r, _), h in zip(keys, hists, strict=True):
        out[net].setdefault((m, r), []).append(h)
    return out


@figure("rslora-multilayer", paper="rsLoRA sec. 3 (after thm. 3.2)",
        claim="applied inductively through a deep network (linear and ReLU) with adapters on every layer, every "
              "layer's adapter output RMS scales as r^(1-2beta): rank-independent for rsLoRA (exponent 0), r^-1 "
              "for LoRA (r >> width)",
        criterion=MULTILAYER, protocols=DEEP_PROTOCOLS)
def multilayer(ctx: Context, protocol: Protocol) -> Measurement:
    ranks = deep_ranks(ctx)
    runs = multilayer_runs(ctx, protocol.settings)
    logr = np.log(ranks)
    samples: dict = {}
    networks: dict = {}
    rms: dict = {}
    for net in NETWORKS:
        rms[net] = {m: layer_rms(runs[net], m, ranks) for m in METHODS}  # (seeds, ranks, layers)
        slopes = {m: np.stack([seed_slopes(logr, np.log(rms[net][m][:, :, i])) for i in range(N_DEEP_LAYERS)],
                              axis=1) for m in METHODS}  # (seeds, layers)
        layers = {}
        for i in range(N_DEEP_LAYERS):
            samples[f"{net}_rslora_{i}"] = slopes["rslora"][:, i]
            samples[f"{net}_lora_{i}"] = slopes["lora"][:, i]
            samples[f"{net}_gap_{i}"] = slopes["rslora"][:, i] - slopes["lora"][:, i]
            layers[f"layers.{i}"] = {m: {"rms_exponent": _ci(slopes[m][:, i]),
                                         "rms": {str(r): _ci(rms[net][m][:, j, i]) for j, r in enumerate(ranks)}}
                                     for m in METHODS}
        networks[net] = {"activation": NETWORKS[net], "layers": layers,
                         "mean_exponent_over_layers": {m: float(np.nanmean(slopes[m])) for m in METHODS}}
    measured = {"ranks": list(ranks), "widths": list(DEEP_WIDTHS), "steps": MULTILAYER_STEPS,
                "protocol": protocol.settings, "alpha": DEEP_ALPHA, "networks": networks}

    def net_summary(net):
        lay = networks[net]["layers"]
        return f"{NETWORK_LABEL[net]}: " + "; ".join(
            f"layers.{i}: rsLoRA {_fmt(lay[f'layers.{i}']['rslora']['rms_exponent'], 2)}, LoRA "
            f"{_fmt(lay[f'layers.{i}']['lora']['rms_exponent'], 2)}" for i in range(N_DEEP_LAYERS))

    summary = (f"Exponent of r of each layer's adapter-output RMS after {MULTILAYER_STEPS} steps (width "
               f"{DEEP_WIDTHS[0]}, r = {list(ranks)}, {len(ctx.seeds)} seeds; theorem 0 rsLoRA, -1 LoRA). "
               + ". ".join(net_summary(net) for net in NETWORKS) + ".")

    def plot():
        fig, axes = new_figure(2, len(NETWORKS), width=4.6, height=3.4)
        for row, net in enumerate(NETWORKS):
            lay = networks[net]["layers"]
            ax = axes[row, 0]
            for m in METHODS:
                shades = sns.color_palette("Oranges" if m == "lora" else "Blues", N_DEEP_LAYERS + 2)[2:]
                for i in range(N_DEEP_LAYERS):
                    ax.plot(ranks, np.exp(np.log(rms[net][m][:, :, i]).mean(0)), marker="o",
                            ls="--" if m == "lora" else "-", color=shades[i], label=f"{m}, layers.{i}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rank r")
            ax.set_ylabel(f"adapter-output RMS after {MULTILAYER_STEPS} steps (geo. mean)", fontsize=7)
            ax.set_title(f"{NETWORK_LABEL[net]}: width {DEEP_WIDTHS[0]}, {N_DEEP_LAYERS} adapted layers, "
                         f"{protocol.name}", fontsize=8)
            ax.legend(fontsize=6, ncol=2)
            ax = axes[row, 1]
            x = np.arange(N_DEEP_LAYERS)
            for off, m in ((-0.1, "lora"), (0.1, "rslora")):
                _errorbars(ax, x + off, [lay[f"layers.{i}"][m]["rms_exponent"] for i in range(N_DEEP_LAYERS)],
                           fmt="o", color=METHOD_COLOR[m], label=METHOD_LABEL[m])
                ax.axhspan(PREDICTED_RMS_EXPONENT[m] - MARGIN, PREDICTED_RMS_EXPONENT[m] + MARGIN,
                           color=METHOD_COLOR[m], alpha=0.12)
            ax.set_xticks(x, [f"layers.{i}" for i in x])
            ax.set_ylabel("exponent of r (95% CI over seeds)")
            ax.set_title(f"{NETWORK_LABEL[net].split(' (')[0]}; bands: theorem +- equivalence margin", fontsize=8)
            ax.legend(fontsize=7)
        return fig

    config = {"base": deep_config(ctx.seeds[0], r=ranks[0], scaling="lora", steps=MULTILAYER_STEPS,
                                  **protocol.settings).as_dict(),
              "varies": {"activation": list(NETWORKS.values()), "r": list(ranks), "scaling": list(METHODS),
                         "seed": list(ctx.seeds)}}
    key = {f"{net}_{m}": networks[net]["mean_exponent_over_layers"][m] for net in NETWORKS for m in METHODS}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["synthetic"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------- trajectory


EXACT_D, EXACT_LR = 4, 0.05


def exact_trajectory_exponents(seed: int, *, d: int, ranks, steps, lr: float, alpha: float = 1.0,
                               d_out: int = 4) -> dict:
    """Exponents of r of the exact moments over A0 (:func:`analysis.rank_scaling.sgd_moments`, the proof's linear
    loss) after each n in ``steps``, for LoRA and rsLoRA: ``rms_out`` (sqrt E||f(x)||^2), ``rms_grad_in``
    (sqrt E||grad_x||^2) and ``mean_out`` (||E f(x)||, same exponent 1 - 2 beta). Inputs x_k, output gradients
    v_k and the evaluation point (x, v): unit vectors from ``seed``; every n uses the first n steps of the same
    trajectory. Returns {method: {key: [exponent per n]}}."""
    rng = np.random.default_rng(seed)

    def unit(*shape):
        z = rng.standard_normal(shape)
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    xs, vs, x, v = unit(max(steps), d), unit(max(steps), d_out), unit(d), unit(d_out)
    logr = np.log(np.asarray(ranks, dtype=np.float64))
    out: dict = {}
    for m in METHODS:
        res: dict = {"rms_out": [], "rms_grad_in": [], "mean_out": []}
        for n in steps:
            vals: dict = {k: [] for k in res}
            for r in ranks:
                e = rs.sgd_moments(xs[:n], vs[:n], x, v, r=r, gamma=rs.gamma(r, alpha, m), lr=lr)
                vals["rms_out"].append(math.sqrt(e["second_out"]))
                vals["rms_grad_in"].append(math.sqrt(e["second_grad_in"]))
                vals["mean_out"].append(float(np.linalg.norm(e["mean_out"])))
            for k in res:
                res[k].append(float(seed_slopes(logr, np.log(vals[k]))[0]))
        out[m] = res
    return out


def _trajectory_steps(ctx: Context) -> tuple[int, ...]:
    return ctx.pick(quick=(1, 10), default=TRAJECTORY_STEPS)


def _trajectory_criterion(steps) -> Criterion:
    tests = []
    for m in METHODS:
        t = PREDICTED_RMS_EXPONENT[m]
        for n in steps:
            tests.append(Test(f"exact_{m}_n{n}", f"exponent of r of the exact output RMS after n={n} steps, {m} "
                              f"(per seed = per input trajectory)", "equivalent", margin=(t - MARGIN, t + MARGIN),
                              why=f"theorem: {t:g}; margin +-{MARGIN} as in rslora-multilayer"))
    for m in METHODS:
        t = PREDICTED_RMS_EXPONENT[m]
        for n in steps:
            tests.append(Test(f"trained_{m}_n{n}", f"exponent of r of the trained network's layer-averaged "
                              f"adapter-output RMS after n={n} steps, {m} (per seed)", "equivalent",
                              margin=(t - MARGIN, t + MARGIN), why=f"theorem: {t:g}"))
    for n in steps:
        tests.append(Test(f"gap_n{n}", f"trained: rsLoRA's exponent minus LoRA's after n={n} steps (paired)",
                          "greater", margin=0.0, why="directional form of the claim"))
    exact = tuple(f"exact_{m}_n{n}" for m in METHODS for n in steps)
    trained = tuple(f"trained_{m}_n{n}" for m in METHODS for n in steps)
    return Criterion(tests=tuple(tests), rule=Rule(reproduced=exact + trained,
                                                   partially=(exact, tuple(f"gap_n{n}" for n in steps))),
                     note="exact part: one adapter, d = 4, r = 256..4096 (r >> d); trained part: the deep width-4 "
                          "ReLU network of rslora-multilayer, r = 32..512")


@figure("rslora-trajectory", paper="rsLoRA thm. 3.2 ('at any point in the learning trajectory')",
        claim="the rank exponents of the adapter moments are the same after n = 1, 10, 100 and 1000 SGD steps: "
              "0 for rsLoRA, -1 (RMS) for LoRA (r >> width)",
        criterion=_trajectory_criterion(TRAJECTORY_STEPS), protocols=DEEP_PROTOCOLS)
def trajectory(ctx: Context, protocol: Protocol) -> Measurement:
    steps = _trajectory_steps(ctx)
    exact_ranks = ctx.pick(quick=(256, 1024, 4096), default=(256, 512, 1024, 2048, 4096))
    exact = [exact_trajectory_exponents(s, d=EXACT_D, ranks=exact_ranks, steps=steps, lr=EXACT_LR) for s in ctx.seeds]
    ranks = deep_ranks(ctx)
    logr = np.log(ranks)
    trained = _deep_runs(ctx, steps, protocol.settings)
    samples: dict = {}
    measured: dict = {"steps": list(steps), "protocol": protocol.settings,
                      "exact": {"d": EXACT_D, "ranks": list(exact_ranks), "lr": EXACT_LR, "alpha": 1.0},
                      "trained": {"ranks": list(ranks), "widths": list(DEEP_WIDTHS)}}
    tr_slopes = {}
    for m in METHODS:
        ex = {}
        for key in ("rms_out", "rms_grad_in", "mean_out"):
            per_n = np.array([e[m][key] for e in exact])  # (seeds, n)
            ex[key] = {str(n): _ci(per_n[:, j]) for j, n in enumerate(steps)}
            if key == "rms_out":
                for j, n in enumerate(steps):
                    samples[f"exact_{m}_n{n}"] = per_n[:, j]
        measured["exact"][m] = ex
        tr = {}
        for n in steps:
            sl = seed_slopes(logr, np.log(layer_rms(trained[n], m, ranks)).mean(axis=2))  # geo. mean over layers
            tr_slopes[m, n] = sl
            samples[f"trained_{m}_n{n}"] = sl
            tr[str(n)] = _ci(sl)
        measured["trained"][m] = tr
    for n in steps:
        samples[f"gap_n{n}"] = tr_slopes["rslora", n] - tr_slopes["lora", n]
    # the quick grid lacks n = 1000: its tests get the n = 100 values (declared once for the contract's n)
    for n in TRAJECTORY_STEPS:
        if n not in steps:
            for k in [k for k in samples if k.endswith(f"_n{steps[-1]}")]:
                samples[k.replace(f"_n{steps[-1]}", f"_n{n}")] = samples[k]
    parts = [f"n={n}: exact output RMS rsLoRA {measured['exact']['rslora']['rms_out'][str(n)]['mean']:.3f}, LoRA "
             f"{measured['exact']['lora']['rms_out'][str(n)]['mean']:.3f}; trained rsLoRA "
             f"{_fmt(measured['trained']['rslora'][str(n)], 2)}, LoRA {_fmt(measured['trained']['lora'][str(n)], 2)}"
             for n in steps]
    summary = "Exponents of r of the adapter RMS along the trajectory: " + "; ".join(parts) + "."

    def plot():
        fig, axes = new_figure(2, 1, width=4.6, height=3.6)
        for m in METHODS:
            for key, ls in (("rms_out", "-"), ("rms_grad_in", "--"), ("mean_out", ":")):
                axes[0, 0].plot(steps, [measured["exact"][m][key][str(n)]["mean"] for n in steps], marker="o", ls=ls,
                                color=METHOD_COLOR[m], label=f"{m}: {key}")
            _errorbars(axes[0, 1], steps, [measured["trained"][m][str(n)] for n in steps], marker="o",
                       color=METHOD_COLOR[m], label=METHOD_LABEL[m])
            for ax in axes[0]:
                ax.axhspan(PREDICTED_RMS_EXPONENT[m] - MARGIN, PREDICTED_RMS_EXPONENT[m] + MARGIN,
                           color=METHOD_COLOR[m], alpha=0.12)
        for ax in axes[0]:
            ax.set_xscale("log")
            ax.set_xlabel("step n")
            ax.set_ylabel("exponent of r (mean over seeds)")
            ax.legend(fontsize=6)
        axes[0, 0].set_title(f"exact moments, one adapter, d = {EXACT_D}, r = {exact_ranks[0]}..{exact_ranks[-1]}",
                             fontsize=8)
        axes[0, 1].set_title(f"trained width-{DEEP_WIDTHS[0]} ReLU MLP, r = {list(ranks)}, {protocol.name} (95% CI)",
                             fontsize=8)
        return fig

    config = {"base": deep_config(ctx.seeds[0], r=ranks[0], scaling="lora", steps=steps[0],
                                  **protocol.settings).as_dict(),
              "varies": {"steps": list(steps), "r": list(ranks), "scaling": list(METHODS), "seed": list(ctx.seeds)},
              "exact": {"d": EXACT_D, "ranks": list(exact_ranks), "lr": EXACT_LR, "inputs": "unit vectors per seed"}}
    key = {f"trained_rslora_n{n}": measured["trained"]["rslora"][str(n)]["mean"] for n in steps}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["synthetic"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------- layer subset


SUBSET_RECORDERS = ("loss", "norms", "grads", "moments")  # as figures/rslora.py's shared sweep (run cache shared)
SUBSETS = {"all": ("layers.0", "layers.1", "layers.2"), "hidden": ("layers.1",)}
SUBSET_LABEL = {"all": "all layers", "hidden": "hidden layer only (layers.1)"}

LAYER_SUBSET = Criterion(
    tests=tuple(
        Test(f"{k}_rs_gain", f"{SUBSET_LABEL[k]}: ln(final train loss) at the highest rank minus at the lowest, rsLoRA "
             f"(per seed)", "less", margin=0.0, why="the claim is a direction: higher rank trains better",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS)
    + tuple(
        Test(f"{k}_lora_gains_less", f"{SUBSET_LABEL[k]}: LoRA's high-minus-low ln loss minus rsLoRA's (paired)",
             "greater", margin=0.0, why="LoRA gains less from rank than rsLoRA",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS)
    + tuple(
        Test(f"{k}_grad_collapse", f"{SUBSET_LABEL[k]}: exponent of r of the early adapter gradient norm, LoRA minus "
             f"rsLoRA (paired)", "less", margin=0.0,
             why="at init the norm scales as gamma_r sqrt(r): LoRA's exponent is 1/2 below rsLoRA's",
             role="claim" if k == "hidden" else "sanity")
        for k in SUBSETS),
    rule=Rule(reproduced=("hidden_rs_gain", "hidden_lora_gains_less", "hidden_grad_collapse"),
              partially=(("hidden_grad_collapse",), ("hidden_rs_gain",))),
    note="the subset is the claim (app. B.5); the all-layers rows are the reference the paper compares with "
         "('similar results') and are reported as sanity rows",
)

SUBSET_PROTOCOLS = (
    Protocol("adam", {}, primary=True, paper=True, note="the paper's AdamW at constant lr (weight decay 0): Adam 1e-3"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.05}, note="the paper's SGD runs (fig. 4 / app. B)"),
)


def _subset_ranks(ctx: Context) -> tuple[int, ...]:
    # up to the hidden width 256 (the toy's full rank); large goes beyond, as the paper's r = 2048 > hidden sizes
    return ctx.pick(quick=(4, 64), default=(4, 16, 64, 256), large=(4, 16, 64, 256, 1024))


def early_grad_norm(h: dict) -> float:
    """Adapter gradient norm (every adapted layer, A and B together) at the first record after step 0."""
    return float(np.sqrt(np.sum(np.asarray(h["grad_norm_A"][1]) ** 2 + np.asarray(h["grad_norm_B"][1]) ** 2)))


@figure("rslora-layer-subset", paper="rsLoRA app. B.5 / fig. 7",
        claim="with adapters on a subset of layers (the attention-only analogue) as with all layers, larger ranks "
              "train better with rsLoRA and not with LoRA, and LoRA's gradient norm collapses with rank",
        criterion=LAYER_SUBSET, protocols=SUBSET_PROTOCOLS)
def layer_subset(ctx: Context, protocol: Protocol) -> Measurement:
    ok, why = datasets.available("mnist", probe_network=False)
    if not ok:
        return Measurement(unavailable=f"MNIST is not available here: {why}")
    ranks = _subset_ranks(ctx)
    logr = np.log(ranks)
    keys = [(k, m, r, s) for k in SUBSETS for m in METHODS for r in ranks for s in ctx.seeds]
    cfgs = [base_config(ctx, "mnist", seed=s, recorders=SUBSET_RECORDERS, r=r, scaling=m, targets=SUBSETS[k],
                        **protocol.settings) for k, m, r, s in keys]
    hists = run_sweep(cfgs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False,
                      on_diverge="return")
    runs: dict = {}
    for (k, m, r, _), h in zip(keys, hists, strict=True):
        runs.setdefault((k, m, r), []).append(h)
    samples: dict = {}
    measured: dict = {"ranks": list(ranks), "subsets": {k: list(v) for k, v in SUBSETS.items()},
                      "protocol": protocol.settings}
    for k in SUBSETS:
        per, gain, gexp = {}, {}, {}
        for m in METHODS:
            hs = [runs[k, m, r] for r in ranks]
            loss = np.array([[math.nan if "diverged_step" in h else float(h["train_loss"][-1]) for h in hh]
                             for hh in hs]).T  # (seeds, ranks)
            grad = np.array([[early_grad_norm(h) if len(h["step"]) > 1 else math.nan for h in hh] for hh in hs]).T
            gain[m] = np.log(loss[:, -1]) - np.log(loss[:, 0])
            gexp[m] = seed_slopes(logr, np.log(grad))
            per[m] = {"final_train_loss": {str(r): _ci(loss[:, j]) for j, r in enumerate(ranks)},
                      "log_loss_high_minus_low_rank": _ci(gain[m]), "early_grad_norm_exponent": _ci(gexp[m]),
                      "early_grad_norm": {str(r): _ci(grad[:, j]) for j, r in enumerate(ranks)},
                      "diverged": int(sum("diverged_step" in h for hh in hs for h in hh))}
        samples[f"{k}_rs_gain"] = gain["rslora"]
        samples[f"{k}_lora_gains_less"] = gain["lora"] - gain["rslora"]
        samples[f"{k}_grad_collapse"] = gexp["lora"] - gexp["rslora"]
        measured[k] = per
    parts = [f"{SUBSET_LABEL[k]}: ln loss r={ranks[-1]} minus r={ranks[0]}: rsLoRA "
             f"{_fmt(measured[k]['rslora']['log_loss_high_minus_low_rank'], 2)}, LoRA "
             f"{_fmt(measured[k]['lora']['log_loss_high_minus_low_rank'], 2)}; early grad-norm exponent rsLoRA "
             f"{_fmt(measured[k]['rslora']['early_grad_norm_exponent'], 2)}, LoRA "
             f"{_fmt(measured[k]['lora']['early_grad_norm_exponent'], 2)}" for k in SUBSETS]
    summary = "; ".join(parts) + "."

    def plot():
        fig, axes = new_figure(2, 1, width=4.6, height=3.6)
        for k, ls in (("all", "-"), ("hidden", "--")):
            for m in METHODS:
                _errorbars(axes[0, 0], ranks, [measured[k][m]["final_train_loss"][str(r)] for r in ranks],
                           marker="o", ls=ls, color=METHOD_COLOR[m], label=f"{m}, {SUBSET_LABEL[k]}")
                _errorbars(axes[0, 1], ranks, [measured[k][m]["early_grad_norm"][str(r)] for r in ranks],
                           marker="o", ls=ls, color=METHOD_COLOR[m], label=f"{m}, {SUBSET_LABEL[k]}")
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rank r")
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel(f"final training loss (95% CI), {protocol.name}")
        axes[0, 1].set_ylabel("adapter gradient norm at the first record (95% CI)")
        return fig

    config = {"base": cfgs[0].as_dict(), "varies": {"targets": {k: list(v) for k, v in SUBSETS.items()},
                                                    "r": list(ranks), "scaling": list(METHODS),
                                                    "seed": list(ctx.seeds)}}
    key = {"hidden_rs_gain": measured["hidden"]["rslora"]["log_loss_high_minus_low_rank"]["mean"],
           "hidden_lora_gain": measured["hidden"]["lora"]["log_loss_high_minus_low_rank"]["mean"]}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)

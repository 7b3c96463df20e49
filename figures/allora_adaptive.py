"""ALLoRA sec. 3.3-4: the escape from zero (fig. 5 right), the adaptive function (fig. 6), the ripple effect
(Prop. 1) and the variants' accuracy (toy analogue of tables 1, 2, 4)."""

from __future__ import annotations

import inspect
import itertools
import math

import numpy as np

from analysis import ripple
from figures import Context, Measurement, Protocol, figure
from figures._common import base_config, ci_dict, colors, mean_ci, new_figure
from figures.criteria import Criterion, Recalibration, Rule, Test

SANITY_NOTE = ("Sanity check, not a test of an empirical claim: the figure evaluates a closed form (or a "
               "construction that attains a proved bound), so its test cannot fail short of a code bug.")


def _sweep(ctx: Context, configs, **kwargs):
    """``toymodels.train.run_sweep`` with the context's device, executor and workers (where supported)."""
    from toymodels.train import run_sweep

    if "executor" in inspect.signature(run_sweep).parameters:
        kwargs.update(executor=ctx.executor, workers=ctx.workers)
    return run_sweep(list(configs), device=ctx.device, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------- shared helpers


def _paired(values) -> dict:
    """ci_dict of a 1-D sample that may contain inf (censored): inf entries make the interval unbounded."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if np.all(np.isfinite(v)):
        return ci_dict(v)
    return {"mean": float(np.mean(v)), "ci_low": float(np.min(v)), "ci_high": float("inf"), "n": int(v.size),
            "confidence": 0.95, "censored": int(np.sum(~np.isfinite(v)))}


def _first_crossing(steps: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """The first (fractional) step at which ``values`` reaches ``threshold``, interpolated linearly in log(value)
    between records; inf if never reached."""
    above = np.nonzero(values >= threshold)[0]
    if above.size == 0:
        return float("inf")
    k = int(above[0])
    if k == 0 or values[k - 1] <= 0:
        return float(steps[k])
    lo, hi = np.log(values[k - 1]), np.log(values[k])
    frac = (np.log(threshold) - lo) / (hi - lo) if hi > lo else 1.0
    return float(steps[k - 1] + frac * (steps[k] - steps[k - 1]))


def _loglog_slope(steps: np.ndarray, values: np.ndarray, start: float) -> float:
    """Least-squares slope of log(value) on log(step) over steps >= start (the late-phase growth exponent)."""
    keep = (steps >= start) & (values > 0)
    return float(np.polyfit(np.log(steps[keep]), np.log(values[keep]), 1)[0])


# ------------------------------------------------------------------------------------------------- fig. 5 right

_ESCAPE_METHODS = ("ALLoRA (l_b, eta)", "LoRA (eta l_b)", "LoRA (l_b)")


def _escape_configs(base, optimizer: str, lr: float, eta: float, seed: int) -> dict:
    """The three runs of fig. 5 right for one optimizer / base rate / seed. LoRA uses scaling 1.0 (a float),
    so that at BA = 0 its gradients equal ALLoRA's divided by eta: like is compared with like."""
    common = dict(optimizer=optimizer, seed=seed, dropout=0.0)
    return {
        "ALLoRA (l_b, eta)": base.replace(method="allora", eta=eta, lr=lr, **common),
        "LoRA (eta l_b)": base.replace(method="lora", scaling=1.0, lr=eta * lr, **common),
        "LoRA (l_b)": base.replace(method="lora", scaling=1.0, lr=lr, **common),
    }


FIG5_ETA2 = 4.0  # listing 1: 1/eta^2 = 1/4
FIG5_TAU_FRAC, FIG5_LATE_FROM = 0.25, 0.5

FIG5_CRITERION = Criterion(
    tests=(
        Test("escape_as_fast", "log(steps of ALLoRA / steps of LoRA at eta l_b) to reach 0.25 x ALLoRA's final "
             "mean row norm of s BA (per seed; a run that never reaches it counts at the horizon)", "equivalent",
             margin=math.log(1.25),
             why="eta = 2 puts the two LoRA references log 2 = 0.69 apart; +-log 1.25 = 0.22 is a third of that"),
        Test("lora_lb_slower", "log(steps of LoRA at l_b / steps of ALLoRA) (per seed, censored at the horizon)",
             "greater", margin=0.0, why="the claim is a direction ('much more slowly'); censoring is conservative"),
        Test("tapers_off", "late log-log growth exponent of the row norm (steps >= half the horizon), ALLoRA minus "
             "LoRA at eta l_b (per seed)", "less", margin=0.0, why="the claim is a direction: ALLoRA's growth slows"),
        Test("step1_closed_form", "SANITY: |log(step-1 row norm of ALLoRA / the LoRA run its closed form predicts)| "
             "(SGD: LoRA at eta l_b; Adam: LoRA at l_b, Adam cancels the common factor eta)", "less", margin=0.01,
             why="analysis.adaptive.allora_grads at B = 0: equal up to float32 rounding", role="sanity"),
    ),
    rule=Rule(reproduced=("escape_as_fast", "lora_lb_slower", "tapers_off"),
              partially=(("escape_as_fast",), ("tapers_off",))),
    note="The paper never names its optimizer. Its argument (a common gradient factor eta acts as a learning rate) "
         "is the SGD one: under Adam the factor cancels (step-1 sanity row), so Adam is shown as a protocol whose "
         "failure is predicted by the closed form, not as the headline.",
    recalibrations=(
        Recalibration(old="reproduced only if SGD AND Adam reproduce; escape if the geometric-mean ratio <= 1.25",
                      new="headline at SGD, Adam and learning rates x1/3, x3 as protocols; 'as fast as' by TOST "
                          "within +-log 1.25; Holm over the 3 claim tests",
                      why="our own closed form shows Adam cancels eta, so requiring Adam tests the optimizer, not "
                          "the claim; a point estimate below 1.25 is not evidence of equivalence"),))

_FIG5_BASE_LR = {"sgd": 0.03, "adam": 1e-3}
FIG5_PROTOCOLS = tuple(
    Protocol(f"{opt} lr x{tag}", {"optimizer": opt, "l_b": round(_FIG5_BASE_LR[opt] * f, 6)},
             primary=(opt == "sgd" and f == 1.0),
             note=("SGD: the setting of the paper's argument (primary; the paper names no optimizer)" if opt == "sgd"
                   else "Adam: cancels ALLoRA's factor eta (closed form), so the escape claim is expected to fail")
             + ("" if f == 1.0 else f"; base rate x{tag}"))
    for opt in ("sgd", "adam") for f, tag in ((1.0, "1"), (1 / 3, "1/3"), (3.0, "3")))


@figure("allora-fig5-escape", paper="ALLoRA fig. 5 (right)",
        claim="ALLoRA (base lr l_b) escapes BA = 0 as fast as LoRA at lr eta*l_b, then its row norms taper off; "
              "LoRA at l_b gets there much more slowly",
        criterion=FIG5_CRITERION, protocols=FIG5_PROTOCOLS)
def escape(ctx: Context, protocol: Protocol) -> Measurement:
    eta = float(np.sqrt(FIG5_ETA2))
    steps = ctx.pick(quick=60, default=400)
    opt, lr = protocol.settings["optimizer"], float(protocol.settings["l_b"])
    base = base_config(ctx, "mnist", steps=steps, record_every=1, recorders=("rows",))
    keys, configs = [], []
    for seed in ctx.seeds:
        for name, cfg in _escape_configs(base, opt, lr, eta, seed).items():
            keys.append((seed, name))
            configs.append(cfg)
    runs = dict(zip(keys, _sweep(ctx, configs), strict=True))

    def curve(h):  # mean over LoRA layers of the mean row norm of s BA
        return h["step"], h["row_norm_BA"].mean(axis=1)

    t_cross, slope, final, first = ({n: [] for n in _ESCAPE_METHODS} for _ in range(4))
    for seed in ctx.seeds:
        tau = FIG5_TAU_FRAC * curve(runs[(seed, _ESCAPE_METHODS[0])])[1][-1]
        for name in _ESCAPE_METHODS:
            s, v = curve(runs[(seed, name)])
            t_cross[name].append(_first_crossing(s, v, tau))
            slope[name].append(_loglog_slope(s, v, FIG5_LATE_FROM * steps))
            final[name].append(v[-1])
            first[name].append(v[1])  # after one step from B = 0
    a, hi, lo = (np.asarray(t_cross[n]) for n in _ESCAPE_METHODS)
    ac, hic, loc = (np.minimum(t, steps) for t in (a, hi, lo))  # censored at the horizon
    sa, shi, slo = (np.asarray(slope[n]) for n in _ESCAPE_METHODS)
    f_a, f_hi, f_lo = (np.asarray(first[n]) for n in _ESCAPE_METHODS)
    step1_ref = f_hi if opt == "sgd" else f_lo
    samples = {"escape_as_fast": np.log(ac / hic), "lora_lb_slower": np.log(loc / ac), "tapers_off": sa - shi,
               "step1_closed_form": float(np.max(np.abs(np.log(f_a / step1_ref))))}
    samples["step1_closed_form"] = float(samples["step1_closed_form"])
    measured = {
        "optimizer": opt, "l_b": lr, "eta2": FIG5_ETA2, "steps": steps,
        "threshold": f"{FIG5_TAU_FRAC} x ALLoRA's final mean row norm (per seed)",
        "late_phase": f"steps >= {FIG5_LATE_FROM} x {steps}",
        "escape_step": {n: _paired(t_cross[n]) for n in _ESCAPE_METHODS},
        "censored_runs": {n: int(np.sum(~np.isfinite(np.asarray(t_cross[n])))) for n in _ESCAPE_METHODS},
        "escape_ratio_allora_over_lora_eta_lb": ci_dict(ac / hic),
        "escape_ratio_lora_lb_over_allora": ci_dict(loc / ac),
        "late_loglog_slope": {n: ci_dict(slope[n]) for n in _ESCAPE_METHODS},
        "late_slope_allora_minus_lora_eta_lb": ci_dict(sa - shi),
        "late_slope_allora_minus_lora_lb": ci_dict(sa - slo),
        "final_row_norm": {n: ci_dict(final[n]) for n in _ESCAPE_METHODS},
        "step1_row_norm_ratio_allora_over_lora_eta_lb": ci_dict(f_a / f_hi),
        "step1_row_norm_ratio_allora_over_lora_lb": ci_dict(f_a / f_lo),
    }

    def fmt(d):
        return f"{d['mean']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"

    summary = (f"{opt.upper()} l_b = {lr:g}, eta^2 = {FIG5_ETA2:g}, {steps} steps, {len(ctx.seeds)} seeds: ALLoRA "
               f"reaches {FIG5_TAU_FRAC:g} x its final row norm after "
               f"{fmt(measured['escape_ratio_allora_over_lora_eta_lb'])} x the steps of LoRA at eta l_b; LoRA at "
               f"l_b needs {fmt(measured['escape_ratio_lora_lb_over_allora'])} x ALLoRA's; late growth exponent "
               f"ALLoRA - LoRA(eta l_b) {fmt(measured['late_slope_allora_minus_lora_eta_lb'])}; step-1 norm ratio "
               f"ALLoRA / LoRA(eta l_b) {measured['step1_row_norm_ratio_allora_over_lora_eta_lb']['mean']:.4f}, / "
               f"LoRA(l_b) {measured['step1_row_norm_ratio_allora_over_lora_lb']['mean']:.4f}.")
    key = {"time_ratio_vs_lora_eta_lb": measured["escape_ratio_allora_over_lora_eta_lb"]["mean"],
           "time_ratio_lora_lb_vs_allora": measured["escape_ratio_lora_lb_over_allora"]["mean"],
           "late_exponent_gap": measured["late_slope_allora_minus_lora_eta_lb"]["mean"]}

    def plot():
        fig, axes = new_figure(2, width=4.3, height=3.5)
        palette = dict(zip(_ESCAPE_METHODS, colors(3), strict=True))
        ax = axes[0, 0]
        taus = []
        for name in _ESCAPE_METHODS:
            vals = np.stack([curve(runs[(seed, name)])[1] for seed in ctx.seeds])
            s = curve(runs[(ctx.seeds[0], name)])[0]
            m, lo_, hi_ = (np.exp(v) for v in mean_ci(np.log(vals[:, 1:])))  # geometric mean, CI in log space
            ax.plot(s[1:], m, color=palette[name], label=name)
            ax.fill_between(s[1:], lo_, hi_, color=palette[name], alpha=0.25, lw=0)
            if name == _ESCAPE_METHODS[0]:
                taus = FIG5_TAU_FRAC * vals[:, -1]
        ax.axhline(float(np.mean(taus)), color="0.4", ls=":", lw=1,
                   label=f"threshold ({FIG5_TAU_FRAC:g} x ALLoRA final)")
        ax.axvline(FIG5_LATE_FROM * steps, color="0.7", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("mean row norm of s BA (mean over layers)\n(geometric mean over seeds, 95% CI)")
        ax.set_title(f"{opt.upper()}, l_b = {lr:g}, eta^2 = {FIG5_ETA2:g}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[0, 1]
        for j, (name, t) in enumerate(zip(_ESCAPE_METHODS, (ac, hic, loc), strict=True)):
            m, lo_, hi_ = mean_ci(t)
            ax.errorbar([j], [m], yerr=[[m - lo_], [hi_ - m]], fmt="o", color=palette[name], capsize=3)
        ax.set_xticks(range(3), _ESCAPE_METHODS, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("steps to reach the threshold (censored at the horizon)")
        return fig

    config = {"base": base.as_dict(), "eta2": FIG5_ETA2, "optimizer": opt, "l_b": lr, "seeds": list(ctx.seeds),
              "runs": {"ALLoRA (l_b, eta)": "method=allora, lr=l_b, eta", "LoRA (eta l_b)":
                       "method=lora, scaling=1.0, lr=eta*l_b", "LoRA (l_b)": "method=lora, scaling=1.0, lr=l_b"},
              "dropout": 0.0, "threshold_fraction": FIG5_TAU_FRAC, "late_phase_from": FIG5_LATE_FROM}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------------- Prop. 1


def _prefix_terms(Ws, As, Bs, x, eta: float) -> dict[str, np.ndarray]:
    """output (eta and 0), product and AM-GM bounds, and C ||x||, of every prefix chain (depth 1..L), via analysis.ripple."""

    out = {k: [] for k in ("output", "output0", "product", "amgm", "C_x")}
    for depth in range(1, len(Ws) + 1):
        W, A, B = Ws[:depth], As[:depth], Bs[:depth]
        out["output"].append(ripple.output_norm(W, A, B, eta, x))
        out["output0"].append(ripple.output_norm(W, A, B, 0.0, x))
        out["product"].append(ripple.product_bound(W, A, B, eta, x))
        out["amgm"].append(ripple.amgm_bound(W, A, B, eta, x))
        out["C_x"].append(float(np.prod([np.linalg.norm(w, 2) for w in W]) * np.linalg.norm(x)))
    return {k: np.asarray(v) for k, v in out.items()}


PROP1_CRITERION = Criterion(
    tests=(Test("tight_rate_error", "SANITY: max relative error of the tight instance's fitted log-growth rates "
                "(normalised output and amplification) and of its bounds, against log(1 + eta m)", "less",
                margin=1e-9, method="exact", why="a construction that attains the bound: float64 rounding only"),
           Test("bound_excess", "SANITY: max relative excess of any random chain over the product / AM-GM bounds",
                "less", margin=1e-9, method="exact", why="a proved inequality: float64 rounding only")),
    rule=Rule(reproduced=("tight_rate_error", "bound_excess")), correction="none", note=SANITY_NOTE,
    recalibrations=(Recalibration(old="reproduced if the tight rates match and no chain exceeds the bounds",
                                  new="same tests, labelled sanity checks",
                                  why="an identity and a theorem evaluated numerically cannot fail: they check the "
                                      "corrected rate (1 + eta m_bar, ERRATA.md), not training"),))


@figure("allora-prop1-ripple", paper="ALLoRA Prop. 1 (sec. 3.3)", criterion=PROP1_CRITERION,
        protocols=(Protocol("closed form", {}, primary=True, note="sanity check: synthetic chains, no training"),),
        claim="with a constant scaling eta the output norm ||f_L(x)|| can grow exponentially in depth L, at rate "
              "(1 + eta m_bar) per layer in the worst case")
def ripple_depth(ctx: Context, protocol: Protocol) -> Measurement:

    L_max = ctx.pick(quick=8, default=16)
    d, r, m = 16, 4, 0.5
    etas = (1.0, float(np.sqrt(2.0)), 2.0)  # eta^2 in {1, 2, 4}
    n_random = ctx.pick(quick=20, default=200)
    depths = np.arange(1, L_max + 1)
    measured: dict = {"m": m, "d": d, "r": r, "L_max": L_max, "n_random_instances": n_random}

    # tight instance: every inequality an equality; rate fitted on log(||f_L|| / (C ||x||)) = L log(1 + eta m)
    tight = {}
    worst_rate_err = worst_gap = 0.0
    for eta in etas:
        terms = _prefix_terms(*ripple.tight_instance(L_max, d, r, eta, m, seed=ctx.seeds[0]), eta)
        y = np.log(terms["output"] / terms["C_x"])
        rate = float(np.polyfit(depths, y, 1)[0])
        gap = float(np.max(np.abs(terms["amgm"] / terms["output"] - 1)))
        gap_prod = float(np.max(np.abs(terms["product"] / terms["output"] - 1)))
        tight[eta] = terms
        worst_rate_err = max(worst_rate_err, abs(rate / np.log1p(eta * m) - 1),
                             abs(float(np.polyfit(depths, np.log(terms["output"] / terms["output0"]), 1)[0])
                                 / np.log1p(eta * m) - 1))
        worst_gap = max(worst_gap, gap, gap_prod)
        raw = float(np.polyfit(depths, np.log(terms["output"]), 1)[0])
        amp_rate = float(np.polyfit(depths, np.log(terms["output"] / terms["output0"]), 1)[0])
        measured[f"tight eta={eta:.4g}"] = {
            "fitted_log_rate_normalised": rate, "log(1+eta m)": float(np.log1p(eta * m)),
            "paper_log(1+eta)": float(np.log1p(eta)),
            "fitted_log_rate_raw_output": raw,  # includes the log-growth of C = prod ||W_l||
            "fitted_log_rate_amplification": amp_rate,  # of ||f_L||_eta / ||f_L||_{eta=0}
            "max_rel_gap_output_vs_amgm": gap, "max_rel_gap_output_vs_product": gap_prod,
        }

    # random instances: how far below the bounds a generic chain sits
    eta_r = etas[-1]
    ratios_out, ratios_prod, rates, amps, amp_rates = [], [], [], [], []
    max_excess = 0.0
    for k in range(n_random):
        rng = np.random.default_rng([ctx.seeds[0], k])
        t = _prefix_terms(*ripple.random_chain(rng, L_max, d, r, m), eta_r)
        ratios_out.append(t["output"] / t["amgm"])
        ratios_prod.append(t["product"] / t["amgm"])
        rates.append(float(np.polyfit(depths, np.log(t["output"] / t["C_x"]), 1)[0]))
        amps.append(t["output"] / t["output0"])  # the ripple: amplification by the adapters
        amp_rates.append(float(np.polyfit(depths, np.log(amps[-1]), 1)[0]))
        max_excess = max(max_excess, float(np.max(t["output"] / t["product"])) - 1, float(np.max(t["product"] /
                                                                                                t["amgm"])) - 1)
    ratios_out, ratios_prod, rates, amps = (np.asarray(v) for v in (ratios_out, ratios_prod, rates, amps))
    per_layer_shortfall = np.log(ratios_out[:, -1]) / L_max
    measured[f"random eta={eta_r:g}"] = {
        "output_over_amgm_at_L_max": {"median": float(np.median(ratios_out[:, -1])),
                                      "q05": float(np.quantile(ratios_out[:, -1], 0.05)),
                                      "q95": float(np.quantile(ratios_out[:, -1], 0.95)),
                                      "max": float(np.max(ratios_out))},
        "log_shortfall_per_layer": ci_dict(per_layer_shortfall),
        "fitted_log_rate_normalised": ci_dict(rates),
        "fitted_log_rate_amplification": ci_dict(amp_rates),  # of ||f_L||_eta / ||f_L||_{eta=0}
        "amplification_at_L_max": {"median": float(np.median(amps[:, -1])),
                                   "q05": float(np.quantile(amps[:, -1], 0.05)),
                                   "q95": float(np.quantile(amps[:, -1], 0.95))},
        "log(1+eta m)": float(np.log1p(eta_r * m)),
        "max_relative_excess_over_bounds": max_excess,  # <= 0 up to rounding if the corrected chain holds
    }
    measured["tight_max_rel_rate_error"] = worst_rate_err
    measured["tight_max_rel_gap"] = worst_gap

    fig, axes = new_figure(3, width=4.4, height=3.6)
    ax = axes[0, 0]
    for color, eta in zip(colors(len(etas)), etas, strict=True):
        terms = tight[eta]
        ax.plot(depths, terms["output"] / terms["C_x"], "o", color=color, ms=4,
                label=f"tight instance, eta^2 = {eta**2:.0f}")
        ax.plot(depths, (1 + eta * m) ** depths, "-", color=color, lw=1,
                label="AM-GM bound (1 + eta m)^L")
        ax.plot(depths, (1 + eta) ** depths, ":", color=color, lw=1)
    ax.plot([], [], ":", color="0.4", label="paper's Theta((1 + eta)^L)")
    ax.set_yscale("log")
    ax.set_xlabel("depth L (layers)")
    ax.set_ylabel("||f_L(x)|| / (C ||x||), C = prod ||W_l||")
    ax.set_title(f"tight instance (m = {m:g}): bound attained", fontsize=9)
    ax.legend(fontsize=6.5)
    ax = axes[0, 1]
    c0, c1, c2 = colors(3)
    tight_amp = tight[eta_r]["output"] / tight[eta_r]["output0"]
    ax.plot(depths, tight_amp, "o", color=c2, ms=4, label="tight instance")
    ax.plot(depths, (1 + eta_r * m) ** depths, "-", color=c2, lw=1, label="(1 + eta m)^L")
    ax.plot(depths, np.median(amps, axis=0), color=c0, label=f"{n_random} random chains (median)")
    ax.fill_between(depths, np.quantile(amps, 0.05, axis=0), np.quantile(amps, 0.95, axis=0), color=c0,
                    alpha=0.25, lw=0, label="5-95% of random chains")
    ax.set_yscale("log")
    ax.set_xlabel("depth L (layers)")
    ax.set_ylabel("||f_L(x)|| with LoRA / without (eta = 0)")
    ax.set_title(f"ripple: amplification by the adapters, eta^2 = {eta_r**2:.0f}", fontsize=9)
    ax.legend(fontsize=6.5)
    ax = axes[0, 2]
    for arr, color, label in ((ratios_out, c0, "||f_L(x)|| / AM-GM bound"), (ratios_prod, c1, "product bound / "
                                                                                                "AM-GM bound")):
        ax.plot(depths, np.median(arr, axis=0), color=color, label=f"{label} (median)")
        ax.fill_between(depths, np.quantile(arr, 0.05, axis=0), np.quantile(arr, 0.95, axis=0), color=color,
                        alpha=0.25, lw=0, label="5-95% of instances")
    ax.axhline(1.0, color="0.3", lw=1, ls="--", label="bound attained (tight instance)")
    ax.set_yscale("log")
    ax.set_xlabel("depth L (layers)")
    ax.set_ylabel("ratio to C (1 + eta m_bar)^L ||x||")
    ax.set_title(f"{n_random} random chains, eta^2 = {eta_r**2:.0f}, m_l ~ m U(0.5, 1.5)", fontsize=9)
    ax.legend(fontsize=6.5)
    rnd = measured[f"random eta={eta_r:g}"]
    summary = (
        f"On the tight instance the fitted log-growth rate of ||f_L(x)|| / (C ||x||) equals log(1 + eta m) to "
        f"{worst_rate_err:.1e} (relative) for eta^2 in {{1, 2, 4}} (m = {m:g}), and the product and AM-GM bounds "
        f"are attained to {worst_gap:.1e}: worst-case growth is exponential at rate 1 + eta m_bar (not the "
        f"paper's 1 + eta; see ERRATA.md). Random chains (eta^2 = {eta_r**2:.0f}) never exceed the bounds (max "
        f"relative excess {max_excess:.1e}) and sit a median factor {rnd['output_over_amgm_at_L_max']['median']:.2e}"
        f" below the AM-GM bound at L = {L_max} (log shortfall {rnd['log_shortfall_per_layer']['mean']:.3f} per "
        f"layer); their amplification by the adapters grows at log-rate "
        f"{rnd['fitted_log_rate_amplification']['mean']:.3f} per layer vs the worst case "
        f"{rnd['log(1+eta m)']:.3f}.")
    config = {"depths": [1, L_max], "d": d, "r": r, "m": m, "etas": list(etas), "tight_seed": ctx.seeds[0],
              "random": {"n": n_random, "eta": eta_r, "rng": "numpy default_rng([seed, k]), k < n",
                         "W": "N(0, 1/d)", "A": "N(0, 1/d)", "B": "Gaussian rescaled to m_l = m U(0.5, 1.5)"}}
    samples = {"tight_rate_error": float(max(worst_rate_err, worst_gap)), "bound_excess": float(max_excess)}
    return Measurement(samples=samples, measured=measured, summary=summary, key=samples, datasets=[],
                       config=config, plot=lambda: fig)


# ------------------------------------------------------------------------------------------------- tables 1, 2, 4

_VARIANTS = ("LoRA", "LoRA x eta", "ALLoRA", "ALLoRA+D", "ALLoRA-OD", "ASF-LoRA", "DoRA")


def _variant_config(base, name: str, r: int, eta: float, l_b: float, seed: int, p: float):
    """One cell of the toy tables, following ALLoRA sec. 4.4-4.5 and tables 6-7: LoRA and DoRA at lr eta l_b
    with a fixed scaling 1 and dropout p; LoRA x eta at lr l_b with scaling eta and dropout p; the adaptive family
    (ALLoRA, ALLoRA-OD, ASF-LoRA) at base lr l_b with eta and no dropout; ALLoRA+D the same with dropout p."""
    common = dict(r=r, seed=seed)
    if name == "LoRA":
        return base.replace(method="lora", scaling=1.0, lr=eta * l_b, dropout=p, **common)
    if name == "LoRA x eta":
        return base.replace(method="lora", scaling=float(eta), lr=l_b, dropout=p, **common)
    if name == "DoRA":
        return base.replace(method="dora", scaling=1.0, lr=eta * l_b, dropout=p, **common)
    method = {"ALLoRA": "allora", "ALLoRA+D": "allora+d", "ALLoRA-OD": "allora_od", "ASF-LoRA": "asf"}[name]
    return base.replace(method=method, eta=float(eta), lr=l_b, dropout=p if name == "ALLoRA+D" else 0.0, **common)


def _variants_table(acc: dict, cells: list, ranks, eta2s) -> dict:
    """Per-method accuracy, ranking and paired differences ALLoRA - X of one optimizer's grid (the verdict is
    :data:`VARIANTS_CRITERION`'s).

    ``acc[name]`` is (seeds, cells) final test accuracy in %, diverged runs already replaced by chance (10%).
    The CI is over seeds (the independent unit: each seed has its own pretrained model and data split) of the
    grid-mean accuracy (or of the grid-mean paired difference)."""
    per_method = {n: ci_dict(acc[n].mean(axis=1)) for n in _VARIANTS}
    order = sorted(_VARIANTS, key=lambda n: -per_method[n]["mean"])
    others = [n for n in _VARIANTS if n != "ALLoRA"]
    diffs = {n: ci_dict((acc["ALLoRA"] - acc[n]).mean(axis=1)) for n in others}
    for n in others:
        cell_means = (acc["ALLoRA"] - acc[n]).mean(axis=0)
        diffs[n]["cells_won"] = int(np.sum(cell_means > 0))
        diffs[n]["cells"] = len(cells)
        # the paper's table format: mean over seeds of ALLoRA - X per (eta^2, rank)
        diffs[n]["table_pp"] = {f"eta2={e2:g}": {f"r={r}": float(cell_means[cells.index((r, e2))]) for r in ranks}
                                for e2 in eta2s}
    sig_better = [n for n in others if diffs[n]["ci_low"] > 0]
    rank = order.index("ALLoRA") + 1
    return {
        "accuracy_pct": per_method,
        "ranking": order,
        "allora_rank": rank,
        "allora_minus_other_pp": diffs,
        "significantly_better_than": sig_better,
        "significantly_worse_than": [n for n in others if diffs[n]["ci_high"] < 0],
        "accuracy_by_rank_pct": {n: {f"r={r}": ci_dict(np.mean([acc[n][:, cells.index((r, e2))] for e2 in eta2s],
                                                                axis=0)) for r in ranks} for n in _VARIANTS},
        "accuracy_by_eta2_pct": {n: {f"eta2={e2:g}": ci_dict(np.mean([acc[n][:, cells.index((r, e2))]
                                                                       for r in ranks], axis=0)) for e2 in eta2s}
                                 for n in _VARIANTS},
    }


_OTHERS = tuple(n for n in _VARIANTS if n not in ("ALLoRA", "ALLoRA+D"))
_BEATS = {n: "beats_" + n.replace(" x ", "_x_").replace("-", "_").replace(" ", "_") for n in _OTHERS}

VARIANTS_CRITERION = Criterion(
    tests=tuple(Test(_BEATS[n], f"ALLoRA - {n}: grid-mean final test accuracy (pp), paired by seed", "greater",
                     margin=0.0, why="the paper's claim is a direction (ALLoRA better on average)") for n in _OTHERS)
    + (Test("comparable_ALLoRA_D", "ALLoRA - ALLoRA+D: grid-mean final test accuracy (pp), paired by seed",
            "equivalent", margin=1.0,
            why="the paper calls per-cell gaps of up to 0.69 pp (averages <= 0.41 pp) 'comparable' (table 2 "
                "right); rounded up to 1 pp, fixed before the 10-seed runs"),),
    rule=Rule(reproduced=(*_BEATS.values(), "comparable_ALLoRA_D"),
              partially=tuple(g for g in itertools.combinations(_BEATS.values(), 3))),
    note="Partially reproduced: ALLoRA beats at least 3 of the 5 other methods (Holm-corrected). The paper's "
         "optimizer is unnamed (LLM practice: AdamW); Adam is the primary protocol, SGD a protocol.",
    recalibrations=(Recalibration(
        old="reproduced if ALLoRA ranks first and every paired CI (incl. ALLoRA+D) is > 0; partially if it ranks "
            "first or beats half; no multiplicity correction over 12 intervals; figure reproduced only if Adam "
            "and SGD agree",
        new="5 one-sided tests ALLoRA - X > 0 and a TOST ALLoRA - ALLoRA+D within +-1 pp, Holm over the 6 per "
            "protocol; optimizer and learning rate as protocols",
        why="the paper calls ALLoRA and ALLoRA+D comparable, so demanding that ALLoRA beat it tests the opposite "
            "claim; 6 intervals at 95% each give a ~26% chance of one false pass"),))

VARIANTS_PROTOCOLS = (
    Protocol("adam", {"optimizer": "adam", "l_b": 1e-3}, primary=True,
             note="Adam at the shared base rate (LLM practice; the paper names no optimizer)"),
    Protocol("sgd", {"optimizer": "sgd", "l_b": 0.03},
             note="SGD (the setting of the paper's argument; l_b as in allora-fig5-escape)"),
    Protocol("adam lr x1/3", {"optimizer": "adam", "l_b": round(1e-3 / 3, 8)}, note="base rate x1/3"),
    Protocol("adam lr x3", {"optimizer": "adam", "l_b": 3e-3}, note="base rate x3"),
)


@figure("allora-tab-variants", paper="ALLoRA tables 1, 2, 4",
        claim="after short fine-tuning ALLoRA has the best accuracy on average among LoRA, LoRA x eta, ALLoRA-OD, "
              "ASF-LoRA and DoRA, and is comparable to ALLoRA+D, over ranks and eta^2 in {1, 2, 4}",
        criterion=VARIANTS_CRITERION, protocols=VARIANTS_PROTOCOLS)
def variants(ctx: Context, protocol: Protocol) -> Measurement:
    steps = ctx.pick(quick=30, default=100, large=300)
    # default: a reduced grid so that 10 seeds x 7 methods fit the CPU budget (--large: the paper's grid)
    ranks = ctx.pick(quick=(4, 16), default=(4, 64), large=(4, 8, 16, 32, 64))
    eta2s = ctx.pick(quick=(4.0,), default=(1.0, 4.0), large=(1.0, 2.0, 4.0))
    p = 0.05
    opt, l_b = protocol.settings["optimizer"], float(protocol.settings["l_b"])
    base = base_config(ctx, "mnist", steps=steps, record_every=steps, recorders=("loss",), optimizer=opt)
    cells = [(r, e2) for e2 in eta2s for r in ranks]
    index, configs = [], []
    for i, seed in enumerate(ctx.seeds):
        for j, (r, e2) in enumerate(cells):
            for n in _VARIANTS:
                index.append((n, i, j))
                configs.append(_variant_config(base, n, r, float(np.sqrt(e2)), l_b, seed, p))
    hists = _sweep(ctx, configs, on_diverge="return")
    acc = {n: np.empty((len(ctx.seeds), len(cells))) for n in _VARIANTS}
    for (n, i, j), h in zip(index, hists, strict=True):
        acc[n][i, j] = math.nan if "diverged_step" in h else 100.0 * float(h["test_acc"][-1])
    diverged = {n: int(np.isnan(acc[n]).sum()) for n in _VARIANTS}
    acc = {n: np.where(np.isnan(a), 10.0, a) for n, a in acc.items()}  # diverged -> chance accuracy
    table = _variants_table(acc, cells, ranks, eta2s)
    table.update({"optimizer": opt, "l_b": l_b, "diverged_runs": diverged,
                  "grid": {"ranks": list(ranks), "eta2": list(eta2s), "steps": steps, "n_seeds": len(ctx.seeds)}})
    samples = {_BEATS[n]: (acc["ALLoRA"] - acc[n]).mean(axis=1) for n in _OTHERS}
    samples["comparable_ALLoRA_D"] = (acc["ALLoRA"] - acc["ALLoRA+D"]).mean(axis=1)

    def fmt(d):
        return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"

    pm = table["accuracy_pct"]
    div = sum(diverged.values())
    summary = (f"{opt.upper()} l_b = {l_b:g}, {steps} steps, ranks {list(ranks)} x eta^2 {[float(e) for e in eta2s]}, "
               f"{len(ctx.seeds)} seeds: ALLoRA ranks {table['allora_rank']} of {len(_VARIANTS)} at "
               f"{pm['ALLoRA']['mean']:.2f}% (best {table['ranking'][0]} {pm[table['ranking'][0]]['mean']:.2f}%); "
               "ALLoRA - X (pp, 95% CI): " + "; ".join(f"{n} {fmt(d)}" for n, d in table["allora_minus_other_pp"].items())
               + (f"; {div} diverged runs counted at chance (10%)" if div else "") + ".")
    key = {"allora_rank": table["allora_rank"], "best": table["ranking"][0],
           **{f"ALLoRA - {n} (pp)": d["mean"] for n, d in table["allora_minus_other_pp"].items()}}

    def plot():
        fig, axes = new_figure(3, width=4.3, height=3.5)
        palette = dict(zip(_VARIANTS, colors(len(_VARIANTS)), strict=True))
        for ax, (axis_vals, k, label, fmt_key) in zip(
                axes[0, :2], ((ranks, "accuracy_by_rank_pct", "LoRA rank r", "r={}"),
                              (eta2s, "accuracy_by_eta2_pct", "eta^2", "eta2={:g}")), strict=True):
            for j, n in enumerate(_VARIANTS):
                d = [table[k][n][fmt_key.format(v)] for v in axis_vals]
                x = np.arange(len(axis_vals)) + (j - 3) * 0.06
                ax.errorbar(x, [v["mean"] for v in d], yerr=[[v["mean"] - v["ci_low"] for v in d],
                                                             [v["ci_high"] - v["mean"] for v in d]],
                            fmt="-o", ms=3, lw=1.8 if n == "ALLoRA" else 0.9, color=palette[n], label=n, capsize=2)
            ax.set_xticks(np.arange(len(axis_vals)), [f"{v:g}" for v in axis_vals])
            ax.set_xlabel(label)
            ax.set_ylabel(f"test accuracy after {steps} steps (%)")
        axes[0, 0].set_title(f"{opt.upper()} l_b = {l_b:g}: mean over eta^2 (95% CI, seeds)", fontsize=9)
        axes[0, 1].set_title(f"{opt.upper()}: mean over ranks (95% CI, seeds)", fontsize=9)
        ax = axes[0, 2]
        others = [n for n in _VARIANTS if n != "ALLoRA"]
        for i, n in enumerate(others):
            d = table["allora_minus_other_pp"][n]
            ax.errorbar([d["mean"]], [i], xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                        color=palette[n], capsize=3)
        ax.axvline(0.0, color="0.3", lw=1)
        ax.axvspan(-1.0, 1.0, color="0.85", alpha=0.5, lw=0, label="ALLoRA+D equivalence margin")
        ax.set_yticks(range(len(others)), [f"ALLoRA - {n}" for n in others], fontsize=8)
        ax.set_xlabel("paired accuracy difference (percentage points)")
        ax.set_title(f"{opt.upper()}: grid mean, 95% CI over seeds", fontsize=9)
        ax.legend(fontsize=6)
        axes[0, 0].legend(fontsize=6.5)
        return fig

    config = {"base": base.as_dict(), "ranks": list(ranks), "eta2": list(eta2s), "dropout": p, "optimizer": opt,
              "l_b": l_b, "seeds": list(ctx.seeds),
              "variants": {
                  "LoRA": "method=lora, scaling=1.0, lr=eta*l_b, dropout=p",
                  "LoRA x eta": "method=lora, scaling=eta, lr=l_b, dropout=p",
                  "ALLoRA": "method=allora, eta, lr=l_b, dropout=0",
                  "ALLoRA+D": "method=allora+d, eta, lr=l_b, dropout=p",
                  "ALLoRA-OD": "method=allora_od, eta, lr=l_b, dropout=0",
                  "ASF-LoRA": "method=asf, eta, lr=l_b, dropout=0",
                  "DoRA": "method=dora, scaling=1.0, lr=eta*l_b, dropout=p"},
              "diverged_runs": "counted at chance accuracy (10%)",
              "reduced_grid": "default fidelity: ranks (4, 64) x eta^2 (1, 4), 100 steps (CPU budget with 10 seeds); "
                              "--large runs the paper's (4, 8, 16, 32, 64) x (1, 2, 4) with 300 steps"}
    return Measurement(samples=samples, measured=table, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)

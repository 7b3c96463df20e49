"""ALLoRA fig. 4: sampled-dropout training against training on the exact expected loss
(:mod:`analysis.dropout`'s closed form), the test-loss gap over steps per dropout rate."""

from __future__ import annotations

import numpy as np

from figures.allora.protocol import spearman
from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_dict, fmt_ci, mean_ci
from figures.framework import Measurement, Protocol
from figures.style import colors, new_figure
from toymodels.protocol import base_config

ID = "allora-fig4-expected-vs-empirical"
PAPER = "ALLoRA fig. 4"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("the test-loss gap between sampled-dropout and exact expected-loss training grows with the rate and peaks "
         "after a few hundred steps")

RATES = (0.1, 0.3, 0.5)  # was (0.1, 0.2, 0.3, 0.5): three rates for the budget
INTERIOR = 0.8  # "a few hundred steps" out of 1000: a peak in the last 20% of the horizon is not interior


def rate_test(name: str, p: float) -> str:
    return f"{name}_p={p:g}"


CRITERION = Criterion(
    tests=(
        Test("increasing", f"smallest increase between consecutive rates {RATES} of the seed-mean per-seed peak "
             "gap (test loss, sampled - expected)", "greater", margin=0.0, method="exact",
             why="'the gap consistently increases with the dropout rate' (an order, no threshold)"),
        Test("top_minus_bottom", f"per-seed peak gap at p = {RATES[-1]:g} minus at p = {RATES[0]:g}",
             "greater", margin=0.0, why="the increase must exceed the seed-to-seed noise"),
        *(Test(rate_test("interior", p), f"step of the peak of the seed-mean gap curve / horizon, p = {p:g}",
               "equivalent", margin=(0.0, INTERIOR), method="exact",
               why="'culminates after a few hundred training steps' of 1000: after step 0 and not in the last 20%")
          for p in RATES),
        *(Test(rate_test("decline", p), f"gap at that peak minus the final gap, p = {p:g} (per seed)", "greater",
               margin=0.0, why="'and then slowly goes down' (a direction)") for p in RATES),
    ),
    rule=Rule(reproduced=("increasing", "top_minus_bottom", *(rate_test(k, p) for k in ("interior", "decline")
                                                              for p in RATES)),
              partially=(("increasing", "top_minus_bottom"),
                         tuple(rate_test(k, p) for k in ("interior", "decline") for p in RATES))),
    note="Partially reproduced: (a) the gap grows with the rate, or (b) it peaks inside the horizon and declines at "
         "every rate. Holm over the claim tests (the exact ones have p = 0 or 1).",
    recalibrations=(Recalibration(
        old="(a) seed means increasing and CI(peak(0.5) - peak(0.1)) > 0; (b) every rate: peak before 80% of the "
            "steps and CI(peak - final) > 0; 4 rates, 3 seeds",
        new="the same tests declared (exact order and peak position, one-sided t-tests), Holm over them; 3 rates "
            "(0.1, 0.3, 0.5) and 10 seeds; horizon and learning rate as protocols",
        why="declared rather than coded; the rate 0.2 is dropped for the 15-minute budget (the expected-loss runs "
            "cannot be batched)"),))

PROTOCOLS = (
    Protocol("long horizon", {"steps": 1000, "lr": 1e-3}, primary=True,
             note="1000 steps, Adam lr 1e-3: the paper's 'few hundred steps' must fit well inside"),
    Protocol("short horizon", {"steps": 300, "lr": 1e-3}, note="300 steps (the shared horizon of the figures)"),
    Protocol("lr x1/3", {"steps": 1000, "lr": round(1e-3 / 3, 8)}, note="slower: the peak should move later"),
    Protocol("lr x3", {"steps": 1000, "lr": 3e-3}, note="faster: the peak should move earlier"),
)



def peak_tests(gaps: dict[float, np.ndarray], step: np.ndarray, horizon: int) -> tuple[dict, dict]:
    """The inputs of :data:`CRITERION` from the test-loss gaps (sampled - expected), ``gaps[p]`` of shape (seeds,
    records) at the record steps ``step``: (a) ``increasing``: the smallest step between consecutive rates of the
    seed-mean per-seed peak gaps (exact), ``top_minus_bottom``: per-seed peak gap at the highest rate minus the
    lowest; (b) per rate, ``interior``: the step of the seed-mean curve's peak over the horizon (exact, in
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
        samples[rate_test("interior", p)] = float(step[k] / horizon)
        samples[rate_test("decline", p)] = g[:, k] - g[:, -1]
        details[p] = {"peak_step": float(step[k]), "peak_gap_mean_curve": float(m[k]),
                      "per_seed_peak": peaks[rates.index(p)]}
    return samples, details


def _base(ctx):
    steps = ctx.pick(quick=30, default=int(ctx.settings["steps"]))
    return base_config(ctx, "mnist", targets=("layers.2",), loss="mse", placement="bottleneck", recorders=("loss",),
                       steps=steps, lr=float(ctx.settings["lr"]),
                       record_every=ctx.pick(quick=5, default=max(1, steps // 20)))


def configs(ctx) -> dict:
    base = _base(ctx)  # sampled masks (expected_loss False) vs the closed form (True), same batches
    return {(p, e): base.replace(dropout=p, expected_loss=e) for p in RATES for e in (False, True)}


def measure(ctx, runs) -> Measurement:
    base = _base(ctx)
    steps, lr = base.steps, base.lr
    gaps = {p: np.asarray([emp["test_loss"] - exp_["test_loss"] for emp, exp_ in  # (seeds, records)
                           zip(runs[(p, False)], runs[(p, True)], strict=True)]) for p in RATES}
    step = runs[(RATES[0], False)][0]["step"]
    samples, details = peak_tests(gaps, step, steps)
    measured: dict = {"rates": RATES, "steps": steps, "lr": lr}
    for p in RATES:
        g, d = gaps[p], details[p]
        measured[f"p={p:g}"] = {
            "peak_gap_mean_curve": d["peak_gap_mean_curve"], "peak_step_mean_curve": d["peak_step"],
            "peak_gap_per_seed": ci_dict(d["per_seed_peak"]), "peak_step_per_seed": ci_dict(step[g.argmax(axis=1)]),
            "final_gap": ci_dict(g[:, -1]), "peak_minus_final": ci_dict(samples[rate_test("decline", p)]),
            "mean_gap_over_steps": ci_dict(g.mean(axis=1))}
    pk = np.array([details[p]["per_seed_peak"] for p in RATES])  # (rates, seeds)
    measured["peak_gap_highest_minus_lowest_rate"] = ci_dict(samples["top_minus_bottom"])
    measured["spearman_per_seed"] = ci_dict([spearman(RATES, pk[:, i]) for i in range(pk.shape[1])])
    test_mse = float(np.mean([h["test_loss"][-1] for p in RATES for hs in zip(runs[(p, False)], runs[(p, True)],
                                                                                strict=True) for h in hs]))
    summary = (f"{steps} steps, Adam lr {lr:g}, {len(ctx.seeds)} seeds: per-seed peak gaps (seed means) "
               + ", ".join(f"{v:.3g}" for v in pk.mean(axis=1)) + f" for p = {RATES}; peak steps of the "
               f"seed-mean curves {[int(details[p]['peak_step']) for p in RATES]}, peak - final gap "
               + ", ".join(fmt_ci(measured[f'p={p:g}']['peak_minus_final']) for p in RATES)
               + f" (test MSE itself ~{test_mse:.3g} at the end).")
    config = {"base": base.as_dict(), "rates": RATES, "seeds": list(ctx.seeds),
              "pair": "expected_loss False (sampled masks) vs True (analysis.dropout closed form), same batches",
              "fidelity_note": "3 rates (was 4), records every steps/20, for the budget"}
    key = {"peak_steps": [int(details[p]["peak_step"]) for p in RATES],
           "top_minus_bottom": float(samples["top_minus_bottom"].mean())}
    numbers = {"step": step, "steps": steps, "lr": lr, "n_seeds": len(ctx.seeds),
               "gap": {f"{p:g}": mean_ci(gaps[p]) for p in RATES}, "peak": mean_ci(pk.T)}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=4.6, height=3.4)
    ax = axes[0, 0]
    for c, (p, (m, lo, hi)) in zip(colors(len(numbers["gap"])), numbers["gap"].items(), strict=True):
        ax.plot(numbers["step"], m, color=c, label=f"p = {p}")
        ax.fill_between(numbers["step"], lo, hi, color=c, alpha=0.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(INTERIOR * numbers["steps"], color="grey", ls=":", lw=0.8, label="80% of the horizon")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test-loss gap: sampled - expected (MSE)")
    ax.set_title(f"gap, mean and {CI_PCT} CI over {numbers['n_seeds']} seeds (Adam lr {numbers['lr']:g})", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    m, lo, hi = (np.asarray(v) for v in numbers["peak"])
    ax.errorbar([float(p) for p in numbers["gap"]], m, yerr=[m - lo, hi - m], fmt="o-", capsize=3)
    ax.set_xlabel("dropout rate p")
    ax.set_ylabel(f"peak gap per seed\n(mean and {CI_PCT} CI)")
    return fig

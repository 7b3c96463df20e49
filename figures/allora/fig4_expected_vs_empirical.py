"""ALLoRA fig. 4: sampled-dropout training against training on the exact expected loss
(:mod:`analysis.dropout`'s closed form), the test-loss gap over steps per dropout rate."""

from __future__ import annotations

import numpy as np

from figures.allora.protocol import MSE_SGD_LR, OPTIMIZER_UNSTATED, spearman
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
WINDOW = (0.2, 0.5)  # "culminates after a few hundred training steps": steps 200-500 of the 1000-step horizon
END_FROM = 0.9  # the end of the horizon: the last 10% of the steps
PAIRS = tuple(zip(RATES[:-1], RATES[1:], strict=True))


def rate_test(name: str, p: float) -> str:
    return f"{name}_p={p:g}"


def pair_test(lo: float, hi: float) -> str:
    return f"increasing_p={lo:g}->{hi:g}"


_SIGN = "a sign: the paper (sec. 3.4, fig. 4) gives no size for it"
CRITERION = Criterion(
    tests=(
        *(Test(pair_test(lo, hi), f"mean test-loss gap (sampled - expected) over steps {WINDOW[0]:g}-{WINDOW[1]:g} of "
               f"the horizon at p = {hi:g} minus at p = {lo:g} (per seed)", "greater", margin=0.0,
               margin_from="theory", why=f"'the gap consistently increases with the Dropout rate': {_SIGN}")
          for lo, hi in PAIRS),
        *(Test(rate_test("decline", p), f"mean gap over steps {WINDOW[0]:g}-{WINDOW[1]:g} of the horizon minus the "
               f"mean gap over its last {1 - END_FROM:.0%}, p = {p:g} (per seed)", "greater", margin=0.0,
               margin_from="theory", why=f"'culminates after a few hundred training steps and then slowly goes "
                                         f"down': {_SIGN}") for p in RATES),
    ),
    rule=Rule(reproduced=(*(pair_test(lo, hi) for lo, hi in PAIRS), *(rate_test("decline", p) for p in RATES)),
              partially=(tuple(pair_test(lo, hi) for lo, hi in PAIRS), tuple(rate_test("decline", p) for p in RATES))),
    note="Partially reproduced: (a) the gap grows with the rate (every consecutive pair), or (b) it is larger after "
         "a few hundred steps than at the end, at every rate. Holm over the claim tests. The window is fixed in "
         "advance (steps 200-500 of 1000), not located on the measured curves. The paper names no optimizer "
         "(sec. 3.4): the headline is combined over Adam and SGD (the headline policy).",
    recalibrations=(
        Recalibration(
            old="(a) seed means increasing and CI(peak(0.5) - peak(0.1)) > 0; (b) every rate: peak before 80% of "
                "the steps and CI(peak - final) > 0; 4 rates, 3 seeds",
            new="the same tests declared (exact order and peak position, one-sided t-tests), Holm over them; 3 "
                "rates (0.1, 0.3, 0.5) and 10 seeds; horizon and learning rate as protocols",
            why="declared rather than coded; the rate 0.2 is dropped for the 15-minute budget (the expected-loss "
                "runs cannot be batched)"),
        Recalibration(
            old="'increasing': exact test of the order of the seed-mean peak gaps, plus a t-test of peak(0.5) - "
                "peak(0.1); 'interior': exact test of the seed-mean curve's argmax position; 'decline': gap at that "
                "argmax minus the final gap, per seed; headline at Adam alone; a 300-step protocol",
            new="per-seed t-tests (Holm): for each consecutive pair of rates, the gap over a fixed window (steps "
                "20%-50% of the horizon) grows with the rate; at each rate, the window gap exceeds the gap over the "
                "last 10%; headline over Adam and SGD (plausible); SGD replaces the 300-step protocol",
            why="issue 16: exact tests on noisy seed-mean curves cannot tell noise from an effect, and a peak located "
                "on the same curves it is tested on is biased towards a decline; the paper names no optimizer; a "
                "300-step horizon cannot show a decline after 'a few hundred steps'"),))

PROTOCOLS = (
    Protocol("adam", {"steps": 1000, "lr": 1e-3}, primary=True, plausible=True,
             note=f"1000 steps, Adam lr 1e-3: the paper's 'few hundred steps' fit well inside; plausible: "
                  f"{OPTIMIZER_UNSTATED}"),
    Protocol("sgd", {"steps": 1000, "lr": MSE_SGD_LR, "optimizer": "sgd"}, plausible=True,
             note=f"1000 steps, SGD lr {MSE_SGD_LR:g} (below the MSE curvature bound, protocol.py); plausible: {OPTIMIZER_UNSTATED}"),
    Protocol("lr x1/3", {"steps": 1000, "lr": round(1e-3 / 3, 8)}, note="Adam, slower: the peak should move later"),
    Protocol("lr x3", {"steps": 1000, "lr": 3e-3}, note="Adam, faster: the peak should move earlier"),
)


def window_tests(gaps: dict[float, np.ndarray], step: np.ndarray, horizon: int) -> tuple[dict, dict]:
    """The inputs of :data:`CRITERION` from the test-loss gaps (sampled - expected), ``gaps[p]`` of shape (seeds,
    records) at the record steps ``step``: per seed, W_p = the mean gap over the records in the window
    ``WINDOW`` x horizon and E_p = the mean gap over the records from ``END_FROM`` x horizon on; ``increasing``
    per consecutive pair W_hi - W_lo, ``decline`` per rate W_p - E_p. Returns (samples, details)."""
    step = np.asarray(step, dtype=np.float64)
    win = (step >= WINDOW[0] * horizon) & (step <= WINDOW[1] * horizon)
    end = step >= END_FROM * horizon
    if not win.any() or not end.any():
        raise ValueError(f"no record in the window {WINDOW} or the end (>= {END_FROM}) of a {horizon}-step horizon")
    w = {p: gaps[p][:, win].mean(axis=1) for p in gaps}
    e = {p: gaps[p][:, end].mean(axis=1) for p in gaps}
    rates = sorted(gaps)
    samples: dict = {pair_test(lo, hi): w[hi] - w[lo] for lo, hi in zip(rates[:-1], rates[1:], strict=True)}
    samples.update({rate_test("decline", p): w[p] - e[p] for p in rates})
    return samples, {p: {"window_gap": w[p], "end_gap": e[p]} for p in rates}


def _base(ctx):
    steps = ctx.pick(quick=30, default=int(ctx.settings["steps"]))
    return base_config(ctx, "mnist", targets=("layers.2",), loss="mse", placement="bottleneck", recorders=("loss",),
                       steps=steps, lr=float(ctx.settings["lr"]), optimizer=ctx.settings.get("optimizer", "adam"),
                       record_every=ctx.pick(quick=5, default=max(1, steps // 20)))


def configs(ctx) -> dict:
    base = _base(ctx)  # sampled masks (expected_loss False) vs the closed form (True), same batches
    return {(p, e): base.replace(dropout=p, expected_loss=e) for p in RATES for e in (False, True)}


def measure(ctx, runs) -> Measurement:
    base = _base(ctx)
    steps, lr, opt = base.steps, base.lr, base.optimizer
    gaps = {p: np.asarray([emp["test_loss"] - exp_["test_loss"] for emp, exp_ in  # (seeds, records)
                           zip(runs[(p, False)], runs[(p, True)], strict=True)]) for p in RATES}
    step = runs[(RATES[0], False)][0]["step"]
    samples, details = window_tests(gaps, step, steps)
    measured: dict = {"rates": RATES, "steps": steps, "lr": lr, "optimizer": opt,
                      "window_steps": [WINDOW[0] * steps, WINDOW[1] * steps], "end_from_step": END_FROM * steps}
    for p in RATES:
        g, d = gaps[p], details[p]
        measured[f"p={p:g}"] = {
            "window_gap": ci_dict(d["window_gap"]), "end_gap": ci_dict(d["end_gap"]),
            "window_minus_end": ci_dict(samples[rate_test("decline", p)]),
            # descriptive only (not tested: located on the same noisy curves)
            "peak_step_per_seed": ci_dict(step[g.argmax(axis=1)]), "peak_step_mean_curve": float(step[g.mean(0).argmax()]),
            "mean_gap_over_steps": ci_dict(g.mean(axis=1))}
    for lo, hi in PAIRS:
        measured[pair_test(lo, hi)] = ci_dict(samples[pair_test(lo, hi)])
    wg = np.array([details[p]["window_gap"] for p in RATES])  # (rates, seeds)
    measured["spearman_per_seed"] = ci_dict([spearman(RATES, wg[:, i]) for i in range(wg.shape[1])])
    test_mse = float(np.mean([h["test_loss"][-1] for p in RATES for hs in zip(runs[(p, False)], runs[(p, True)],
                                                                                strict=True) for h in hs]))
    summary = (f"{steps} steps, {opt.upper()} lr {lr:g}, {len(ctx.seeds)} seeds: gap over steps "
               f"{WINDOW[0] * steps:g}-{WINDOW[1] * steps:g} "
               + ", ".join(fmt_ci(measured[f"p={p:g}"]["window_gap"]) for p in RATES) + f" for p = {RATES}; window "
               "minus end gap " + ", ".join(fmt_ci(measured[f"p={p:g}"]["window_minus_end"]) for p in RATES)
               + f" (test MSE itself ~{test_mse:.3g} at the end).")
    config = {"base": base.as_dict(), "rates": RATES, "seeds": list(ctx.seeds), "window": WINDOW,
              "end_from": END_FROM,
              "pair": "expected_loss False (sampled masks) vs True (analysis.dropout closed form), same batches",
              "fidelity_note": "3 rates (was 4), records every steps/20, for the budget"}
    key = {"window_gap": [float(details[p]["window_gap"].mean()) for p in RATES],
           "window_minus_end": [float(samples[rate_test("decline", p)].mean()) for p in RATES]}
    numbers = {"step": step, "steps": steps, "lr": lr, "optimizer": opt, "n_seeds": len(ctx.seeds),
               "gap": {f"{p:g}": mean_ci(gaps[p]) for p in RATES}, "window": mean_ci(wg.T),
               "end": mean_ci(np.array([details[p]["end_gap"] for p in RATES]).T)}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=4.6, height=3.4)
    ax, steps = axes[0, 0], numbers["steps"]
    for c, (p, (m, lo, hi)) in zip(colors(len(numbers["gap"])), numbers["gap"].items(), strict=True):
        ax.plot(numbers["step"], m, color=c, label=f"p = {p}")
        ax.fill_between(numbers["step"], lo, hi, color=c, alpha=0.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvspan(WINDOW[0] * steps, WINDOW[1] * steps, color="grey", alpha=0.12, label="window ('a few hundred steps')")
    ax.axvspan(END_FROM * steps, steps, color="grey", alpha=0.3, label="end of the horizon")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test-loss gap: sampled - expected (MSE)")
    ax.set_title(f"gap, mean and {CI_PCT} CI over {numbers['n_seeds']} seeds "
                 f"({numbers.get('optimizer', 'adam').upper()} lr {numbers['lr']:g})", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    rates = [float(p) for p in numbers["gap"]]
    for key, fmt, label in (("window", "o-", "window"), ("end", "s--", "end of the horizon")):
        m, lo, hi = (np.asarray(v) for v in numbers[key])
        ax.errorbar(rates, m, yerr=[m - lo, hi - m], fmt=fmt, capsize=3, label=label)
    ax.set_xlabel("dropout rate p")
    ax.set_ylabel(f"mean gap per seed\n(mean and {CI_PCT} CI)")
    ax.legend(fontsize=7)
    return fig

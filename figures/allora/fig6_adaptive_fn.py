"""ALLoRA fig. 6: the adaptive function 1/sqrt(|x| + 1/eta^2) of ALLoRA's per-row scale (a closed form: a sanity
check, no training)."""

from __future__ import annotations

import numpy as np

from analysis import adaptive
from figures.allora.protocol import SANITY_NOTE
from figures.criteria import Criterion, Recalibration, Rule, Test
from figures.framework import Measurement, Protocol
from figures.style import colors, new_figure

ID = "allora-fig6-adaptive-fn"
PAPER = "ALLoRA fig. 6"
KIND, CLAIM_ID = "check", ID  # check: a closed form evaluated against itself: no data, cannot fail
CLAIM = "1/sqrt(|x| + 1/eta^2) equals eta at x = 0 and tapers off as |x| grows (eta^2 in {1, 2, 4})"

ETA2S = (1.0, 2.0, 4.0)

CRITERION = Criterion(
    tests=(Test("identity_error", "SANITY: max |error| of f(0) = eta and f(3/eta^2) = eta/2 over eta^2 in {1, 2, "
                "4}, plus 1 if f is not strictly decreasing on x >= 0", "less", margin=1e-12, method="exact",
                why="a closed-form identity: float64 rounding only"),),
    rule=Rule(reproduced=("identity_error",)), note=SANITY_NOTE,
    recalibrations=(Recalibration(old="reproduced if the identities hold", new="same test, labelled a sanity check",
                                  why="a closed form evaluated on a grid cannot fail: it is not evidence for a "
                                      "claim about training"),))

PROTOCOLS = (Protocol("closed form", {}, primary=True, note="sanity check: no training, no seeds"),)


def configs(ctx) -> dict:
    return {}  # a closed form: no runs


def measure(ctx, runs) -> Measurement:
    x = np.linspace(-4, 4, 801)
    measured, curves = {}, {}
    err = 0.0
    for eta2 in ETA2S:
        eta = np.sqrt(eta2)
        y = adaptive.adaptive_function(x, eta)
        curves[f"{eta2:g}"] = y[::4]  # every 4th point of the grid is enough to draw
        peak = float(y[np.argmin(np.abs(x))])
        # halving point: |x| where the rate is eta/2, i.e. |x| + 1/eta^2 = 4/eta^2 -> |x| = 3/eta^2
        half = float(adaptive.adaptive_function(3.0 / eta2, eta))
        measured[f"eta2={eta2:g}"] = {"value_at_0": peak, "eta": float(eta), "value_at_3/eta^2": half}
        err = max(err, abs(peak - eta), abs(half - eta / 2)) + (0.0 if np.all(np.diff(y[x >= 0]) < 0) else 1.0)
    summary = ("At x = 0 the factor equals eta for every eta^2 (max error "
               f"{max(abs(v['value_at_0'] - v['eta']) for v in measured.values()):.1e}), it halves at |x| = 3/eta^2 "
               "and decreases strictly with |x|: it decays like |x|^-1/2, not like 1/|x| (see ERRATA.md).")
    return Measurement(samples={"identity_error": err}, measured=measured, summary=summary,
                       key={"identity_error": err}, datasets=[], config={"x_range": [-4, 4]},
                       draw={"x": x[::4], "f": curves})


def draw(numbers):
    fig, axes = new_figure()
    ax = axes[0, 0]
    for color, (eta2, y) in zip(colors(len(numbers["f"])), numbers["f"].items(), strict=True):
        ax.plot(numbers["x"], y, color=color, label=f"eta^2 = {eta2}")
    ax.set_xlabel("x (row norm ||(BA)_i,:|| or output |f_i|)")
    ax.set_ylabel("adaptive factor 1/sqrt(|x| + 1/eta^2)")
    ax.legend()
    return fig

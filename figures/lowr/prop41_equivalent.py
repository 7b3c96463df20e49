"""LoWR Prop. 4.1: two equivalent modules (nA, B/n) trained from the same start follow different trajectories; the
first-step difference of their effective weights in closed form (:func:`analysis.channels.
equivalent_update_difference`)."""

from __future__ import annotations

import math

import numpy as np

from analysis import channels
from figures.criteria import Criterion, Recalibration, Rule, Test, ci_dict, fmt_ci, mean_ci
from figures.framework import Measurement, Protocol, Runs, require_datasets
from figures.lowr.protocol import DATASET, config_record, log_ratio, rank, shared_config
from figures.style import colors, new_figure
from toymodels.callbacks import CaptureLayerIO, ScaleAdapters, WeightSnapshots

ID = "lowr-prop41-equivalent"
PAPER = "LoWR Prop. 4.1"
KIND, CLAIM_ID = "check", ID  # check: the first-step difference follows from the algebra of (nA, B/n)
CLAIM = ("two equivalent modules (nA, B/n) trained from the same start follow different trajectories; the "
         "first-step difference of their effective weights is (n^2 - 1) a_term + (1/n^2 - 1) b_term")

APART = 0.05  # final relative distance of the effective weights that counts as "a different trajectory"
NS = (0.5, 2.0, 4.0)


def apart_test(n: float) -> str:
    return f"apart_n={n:g}"


CRITERION = Criterion(
    tests=(
        *(Test(apart_test(n), f"ln(relative distance ||s B_n A_n - s B A||_F / ||s B A||_F after the last step), "
               f"n = {n:g} (per seed)", "greater", margin=math.log(APART), margin_from="theory",
               why="5% is ten times the float32 noise floor of a fine-tune (the runs are float64: the n = 1 "
                   "control stays at exactly 0)") for n in NS),
        Test("closed_form", "SANITY: max relative error of the measured first-step difference of s BA against "
             "(n^2 - 1) a_term + (1/n^2 - 1) b_term (analysis.channels), over n, layers and seeds", "less",
             margin=1e-9, method="exact", role="sanity",
             why="an identity of one SGD step in float64: it cannot fail short of a bug"),
    ),
    rule=Rule(reproduced=tuple(apart_test(n) for n in NS),
              partially=tuple((apart_test(n),) for n in NS)),
    note="Partially reproduced: the modules end apart for some n only (Holm over the n).",
    recalibrations=(Recalibration(
        old="reproduced if the closed form matches to 1e-9 AND every seed's final distance is >= 5% for every n; "
            "partially if one holds",
        new="the closed form is a sanity row; the claim is a one-sided t-test over 10 seeds of the log final "
            "distance > ln 0.05 per n, Holm over the n; 50 steps after the rescaling (was 200)",
        why="the first-step identity cannot fail (it is algebra), so it cannot carry half of a verdict; the minimum "
            "over seeds is no test; 50 steps for the 15-minute budget (float64, full batch, rank 32)"),))


PROTOCOLS = (Protocol("full-batch SGD", {}, primary=True, paper=True,
                      note="Prop. 4.1's setting: plain gradient descent (deterministic, stateless)"),)


def snapshot_steps(warmup: int, steps: int) -> list[int]:
    """Steps (from the rescaling at ``warmup``) at which prop41 keeps the adapters: 0-5 and ~30 log-spaced up to
    ``steps`` (the curves are drawn on a log axis; this keeps each cached run a few MB at rank 32)."""
    rel = {0, 1, 2, 3, 4, 5, steps} | {int(round(v)) for v in np.geomspace(1, steps, 30)}
    return [warmup + k for k in sorted(rel) if k <= steps]


def run_config(ctx, *, warmup: int, steps: int, lr: float, targets):
    """Prop. 4.1's run: float64, full-batch SGD (deterministic, stateless), LoRA on ``targets`` (the frozen first
    layer's features are computed once by the engine), ``warmup + steps`` steps, no recorder."""
    return shared_config(ctx).replace(targets=tuple(targets), optimizer="sgd", lr=lr, batch_size=None,
                                      dtype="float64", steps=warmup + steps, recorders=(),
                                      record_every=warmup + steps)


def run_callbacks(n: float, warmup: int, steps: int) -> list:
    """``warmup`` steps from the standard start (B = 0) to a generic module, then (A, B) -> (nA, B/n) and ``steps``
    more. History: ``batch_loss`` (the full-batch loss of every step), adapter snapshots (``snapshot_*``), each
    LoRA layer's (X, G = dL/dy) of the first step after the rescaling (``io_*``)."""
    return [ScaleAdapters(warmup, n), WeightSnapshots(snapshot_steps(warmup, steps)), CaptureLayerIO([warmup + 1])]


def effective(hist: dict, scalings: list[float]) -> list[list[np.ndarray]]:
    """s B A of every LoRA layer at every snapshot: [snapshot][layer]."""
    return [[s * hist[f"snapshot_B{i}"][t] @ hist[f"snapshot_A{i}"][t] for i, s in enumerate(scalings)]
            for t in range(len(hist["snapshot_step"]))]


def _setting(ctx) -> tuple[int, int, float, tuple[str, ...]]:
    """(warm-up steps, steps after the rescaling, SGD lr, adapted layers: the top two, the frozen first layer's
    features are fixed)."""
    return ctx.pick(quick=5, default=20), ctx.pick(quick=30, default=50), 0.05, ("layers.1", "layers.2")


def configs(ctx) -> dict:
    require_datasets(DATASET)
    warmup, steps, lr, targets = _setting(ctx)
    cfg = run_config(ctx, warmup=warmup, steps=steps, lr=lr, targets=targets)
    return {n: Runs(cfg, callbacks=tuple(run_callbacks(n, warmup, steps))) for n in (1.0, *NS)}


def measure(ctx, all_runs) -> Measurement:
    ns = NS
    warmup, steps, lr, targets = _setting(ctx)
    r = rank(ctx)
    rel_err, g_err = [], []
    first_pred = {n: [] for n in ns}  # closed-form ||diff|| / ||s BA|| after one step, per seed (all layers)
    dist = {n: [] for n in (1.0, *ns)}  # per seed: relative distance of the effective weights vs steps
    losses = {n: [] for n in (1.0, *ns)}
    scal = [1.0] * len(targets)  # alpha = r: s = 1 in every adapted layer
    for i_seed in range(len(ctx.seeds)):
        runs = {n: all_runs[n][i_seed] for n in (1.0, *ns)}
        ref = runs[1.0]
        snap_t = ref["snapshot_step"].astype(int) - warmup  # steps since the rescaling
        eff = {n: effective(h, scal) for n, h in runs.items()}  # [snapshot][layer]
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
    samples = {apart_test(n): np.log(dist_arr[n][:, -1]) for n in ns}
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
            "final_rel_distance_geometric": log_ratio(np.log(dn[:, -1])),
            "final_train_loss": ci_dict([v[-1] for v in losses[n]]),
        }
    measured["final_train_loss_n1"] = ci_dict([v[-1] for v in losses[1.0]])
    parts = [f"n={n:g}: step 1 {measured['n'][f'{n:g}']['first_step_rel_distance_measured']['mean']:.2e} "
             f"(closed form {measured['n'][f'{n:g}']['first_step_rel_distance_closed_form']['mean']:.2e}), "
             f"end {fmt_ci(measured['n'][f'{n:g}']['final_rel_distance'])}" for n in ns]
    summary = (f"float64, full-batch SGD lr {lr:g}, rank {r} LoRA on {', '.join(targets)} (layers.0 frozen), from a "
               f"module after {warmup} SGD steps, {len(ctx.seeds)} seeds: the first-step difference of s BA between "
               f"(nA, B/n) and (A, B) matches (n^2-1) a_term + (1/n^2-1) b_term to {max_err:.1e} (max relative error "
               "over n, layers, seeds). Relative distance of the effective weights: " + "; ".join(parts)
               + f" after {steps} steps (n = 1 control: {measured['control_n1_max_distance']:.0e}).")
    config = config_record(ctx, prop41={"dtype": "float64", "lr": lr, "optimizer": "sgd full batch",
                                         "warmup_steps": warmup, "steps": steps, "ns": list(ns), "rank": r,
                                         "targets": list(targets), "batch": "full fine-tune set",
                                         "fidelity_note": "50 steps after the rescaling (was 200), for the budget"})
    key = {f"final_distance_n={n:g}": measured["n"][f"{n:g}"]["final_rel_distance_geometric"]["mean"] for n in ns}

    numbers = {"steps": steps, "snap_t": snap_t, "max_err": max_err, "apart": APART,
               "control": measured["control_n1_max_distance"],
               "distance": {f"{n:g}": [np.exp(v) for v in mean_ci(np.log(dist_arr[n][:, 1:]))] for n in ns},
               "first_pred": {f"{n:g}": float(np.mean(first_pred[n])) for n in ns},
               "loss": {f"{n:g}": [np.exp(v) for v in mean_ci(np.log(np.array(losses[n])))] for n in (1.0, *ns)}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(2, 1, width=4.4, height=3.4)
    ns = list(numbers["distance"])
    cl = colors(len(ns))
    snap_t = np.asarray(numbers["snap_t"])
    ax = axes[0, 0]
    for j, (n, col) in enumerate(zip(ns, cl, strict=False)):  # distances at the snapshot steps (0-5, log-spaced)
        m, lo, hi = numbers["distance"][n]
        ax.plot(snap_t[1:], m, color=col, label=f"n = {n}")
        ax.fill_between(snap_t[1:], lo, hi, color=col, alpha=0.25)
        ax.plot([1], [numbers["first_pred"][n]], marker="x", ms=9, color="black", ls="none",
                label="closed form, step 1" if j == 0 else None)
    ax.axhline(numbers["apart"], color="grey", ls=":", lw=1, label="claim margin 5%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (full batch)")
    ax.set_ylabel("||s B_n A_n - s B A||_F / ||s B A||_F\n(all layers)")
    ax.set_title(f"equivalent modules (nA, B/n) diverge; n = 1: max {numbers['control']:.0e}", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    t = np.arange(numbers["steps"] + 1)
    for n, col in zip(numbers["loss"], ["black", *cl[:len(ns)]], strict=True):
        m, lo, hi = numbers["loss"][n]
        ax.plot(t[1:], m, color=col, ls="--" if n == "1" else "-", lw=1.0 if n == "1" else 1.5,
                label=f"n = {n}" + (" (A, B)" if n == "1" else ""))
        if n != "1":
            ax.fill_between(t[1:], lo, hi, color=col, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step (full batch)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"first-step error vs closed form: max {numbers['max_err']:.1e}", fontsize=8)
    ax.legend(fontsize=7)
    return fig

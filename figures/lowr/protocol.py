"""What the LoWR figures share: the data set, LoWR's main setting, the MNIST protocol with s = alpha / r = 1 (and
its shared runs: one config per setting and seed with every recorder the figures need, so the figures share them
through the run cache), the protocols, and the channel statistics.

Toy analogue of the paper's LLM runs: the shared MNIST protocol (a 784-256-256-10 MLP pretrained on 4096 images,
LoRA on all three layers fine-tuned on 512 pixel-permuted images, Adam lr 1e-3), rank R = 32 (quick: 8) with
scaling alpha / r = 1, so y = x W^T + x A^T B^T as in the paper's y = (W + BA) x. Shapes: A = lora_A (r, d_in),
B = lora_B (d_out, r); channel i is (a_i = A[i, :], b_i = B[:, i]).

LoWR's alpha is not scale-free: gamma - 1 = alpha (max ||b|| - ||b_i||) Var(||a|| ||b||) grows with the fourth
power of the channel norms, so the paper's values (GSM8K: alpha in {0.1, 1}; GLUE / table 5: {1e-4 ... 1e-2}) do not
carry over to a model of another size. We use the GSM8K grid {0.1, 1} (main setting: tau = 10, alpha = 0.1, the
smaller value, rescaling every step) and report the per-step gamma - 1 it produces.
"""

from __future__ import annotations

import math

import numpy as np

from analysis import channels
from figures.criteria import ci_finite
from figures.framework import Protocol
from toymodels.protocol import base_config

DATASET = "mnist"
MAIN_LOWR = (10.0, 0.1, 1)  # (tau, alpha, every): tau from the paper's grid, alpha the smaller GSM8K value
ALPHAS = (0.1, 1.0)  # the paper's GSM8K grid (app. B.1)
SCALED_ALPHA = 1.0
RECORDERS = ("loss", "norms", "grads", "channels")
LAYERS = ("layers.0", "layers.1", "layers.2")  # the adapted layers of the shared protocol (3 linear layers)

# ------------------------------------------------------------------ protocols and the headline policy (issue 16)
ADAM_LR = 1e-3  # the toy's Adam learning rate (FinetuneConfig's default)
SGD_LR = 0.05  # the project's SGD learning rate (the rsLoRA figures' too)
OPTIMIZER_UNSTATED = (
    "the LoWR paper names no optimizer: app. B.1 (GSM8K) gives lr 3e-4, a cosine schedule, batch 16 and 6 epochs, app. "
    "B and B.2 follow 'the setting in Li et al. [17]' (LoftQ's defaults), table 6 'the LoRA+ hyperparameter "
    "settings'; so Adam and SGD at their default learning rates are both plausible and the headline combines them")


def optimizer_protocols(**fixed) -> tuple[Protocol, ...]:
    """Adam (the primary one) and SGD at their default learning rates, both ``plausible`` (:data:`OPTIMIZER_UNSTATED`),
    then Adam with the learning rate x1/3 and x3; ``fixed`` settings (e.g. ``lowr``) in every one. The same
    settings in every LoWR figure, so the figures share their runs through the run cache."""
    return (
        Protocol("adam", dict(fixed), primary=True, plausible=True,
                 note=f"Adam lr {ADAM_LR:g} (the toy's default); plausible: " + OPTIMIZER_UNSTATED),
        Protocol("sgd", {**fixed, "optimizer": "sgd", "lr": SGD_LR}, plausible=True,
                 note=f"plain SGD lr {SGD_LR:g} (LoWR's argument, eq. 7-11, is about gradient steps); plausible: "
                      "the paper names no optimizer"),
        Protocol("adam lr x1/3", {**fixed, "lr": round(ADAM_LR / 3, 8)}, note="learning rate x1/3"),
        Protocol("adam lr x3", {**fixed, "lr": 3 * ADAM_LR}, note="learning rate x3"),
    )


ALPHA_PROTOCOLS = (  # of lowr-fig3-with-without and lowr-fig4-loss-gradnorm
    *optimizer_protocols(lowr=MAIN_LOWR),
    Protocol("alpha 1 (scaled)", {"lowr": (MAIN_LOWR[0], SCALED_ALPHA, MAIN_LOWR[2])},
             note="alpha scaled to the toy's weight scale: a per-step gamma - 1 ~ ln(tau) / (2T) = 3.8e-3 lets "
                  "||a_i|| / ||b_i|| move by a factor tau over T = 300 steps; at alpha = 0.1 the median gamma - 1 "
                  "is 1.3e-3, 3e-4, 0 by layer (3-seed runs, before the 10-seed ones), so alpha ~ 0.3-1.3: we take "
                  "1, the paper's other GSM8K value (the runs are shared with lowr-tab5)"),
)

TRAINING_PROTOCOLS = (  # of lowr-effective-rank, lowr-plugin-inits (all but the last of lowr-mechanism)
    *optimizer_protocols(),
    Protocol("lowr-every-5", {"lowr_every": 5}, note="rescaling every 5 steps (app. A, table 5)"),
)

# ------------------------------------------------------------ the paper's effect sizes (minimum effects, issue 16)
GAIN_PP = 0.10  # accuracy points
GAIN_WHY = ("0.1 pp: the smallest accuracy gain the paper presents as an improvement (table 2: OLoRA, Llama-2-7b, "
            "rank 64, 4-bit, 39.55% -> 39.65% with LoWR, in bold; table 4's smallest is 0.13 (F1), table 3's 0.18 "
            "(STS-B)); table 5's finite-tau settings gain 0.15 pp on average, table 6 0.40 pp: both clear it")
CHANCE = 0.1  # test accuracy of a diverged run: chance (10 classes)
DIVERGED = ("a diverged seed counts at chance (10%) in either arm: a run that blew up leaves non-finite weights and "
            "a constant prediction, which is what a user of the method would get; dropping it would credit the "
            "method with the runs that survived, while at chance one diverged seed of ten costs ~7 pp")


def accuracy_pp(hists) -> np.ndarray:
    """Final test accuracy in points per seed, a diverged run at chance (:data:`DIVERGED`)."""
    return np.array([100 * (CHANCE if "diverged_step" in h else float(h["test_acc"][-1])) for h in hists])


R_PAPER = 0.9  # fig. 2: Pearson r(||a_i|| ||b_i||, ||b_i||) 'larger than 0.9'
B_SHARE = R_PAPER**2  # 0.81
B_SHARE_WHY = ("0.81 = 0.9^2: fig. 2's 'mainly reflects on ||b_i||' with Pearson r > 0.9; with ln||a_i|| and "
               "ln||b_i|| independent, B's share of var(ln ||a_i|| ||b_i||) is exactly r(ln sig, ln ||b||)^2, so the "
               "paper's r = 0.9 is a share of 0.81 (0.5 would be A and B carrying the differences equally)")


def rank(ctx) -> int:
    """The rank R of the shared runs."""
    return ctx.pick(quick=8, default=32)


def shared_config(ctx, dataset: str = DATASET, **changes):
    """The shared run of the LoWR figures (no seed: the framework fans the seeds out): rank R, s = alpha / r = 1,
    every recorder the figures use, records every 10 steps."""
    r = rank(ctx)
    return base_config(ctx, dataset, r=r, alpha=float(r), recorders=RECORDERS, record_every=10, **changes)


def config_record(ctx, **varies) -> dict:
    """The JSON "config" of a figure on the shared runs."""
    return {"base": shared_config(ctx).replace(seed=ctx.seeds[0]).as_dict(), "seeds": list(ctx.seeds), **varies}


def unit_scale_config(ctx, r: int, **changes):
    """The MNIST protocol with rank r, s = alpha / r = 1, the loss and channel recorders (no seed: the framework
    fans the seeds out)."""
    return base_config(ctx, DATASET, r=r, alpha=float(r), recorders=("loss", "channels"), **changes)


def split_settings(settings: dict) -> tuple[dict, tuple[float, float, int]]:
    """(FinetuneConfig changes, LoWR's (tau, alpha, every)) from a protocol's settings (``lowr_every``)."""
    s = dict(settings)
    every = int(s.pop("lowr_every", MAIN_LOWR[2]))
    return s, (MAIN_LOWR[0], MAIN_LOWR[1], every)


# ------------------------------------------------------------------------------------------ channel statistics


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def final_channels(hist: dict) -> tuple[np.ndarray, np.ndarray]:
    """(||a_i||, ||b_i||) after fine-tuning, each (layers, r)."""
    return hist["channel_a"][-1], hist["channel_b"][-1]


def b_share(a, b) -> float:
    """Share of the across-channel variance of log(||a_i|| ||b_i||) carried by log ||b_i||.

    var(log c) = cov(log c, log a) + cov(log c, log b) exactly (log c = log a + log b), so the two shares sum to 1;
    0.5 means A and B carry the channel differences equally, 1 that B carries all of them.
    """
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    lc = la + lb
    var = lc.var()
    return math.nan if var == 0 else float(np.mean((lc - lc.mean()) * (lb - lb.mean())) / var)


def channel_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Across the channels of one layer (a = ||a_i||, b = ||b_i||): Pearson r of the significance a b with b and
    with a, B's share of var(log sig) (:func:`b_share`), the mean and the std of the significance."""
    c = a * b
    return {"r_b": pearson(c, b), "r_a": pearson(c, a), "share": b_share(a, b), "mean": float(c.mean()),
            "std": float(c.std())}


def layer_stats(hists: list, n_layers: int) -> dict[str, np.ndarray]:
    """:func:`channel_stats` of the final channels, (seeds, layers) per statistic; NaN rows where ``hists`` holds
    None (a diverged run)."""
    out = {k: np.full((len(hists), n_layers), np.nan) for k in ("r_b", "r_a", "share", "mean", "std")}
    for s, h in enumerate(hists):
        if h is None:
            continue
        a, b = final_channels(h)
        for layer in range(n_layers):
            for k, v in channel_stats(a[layer], b[layer]).items():
                out[k][s, layer] = v
    return out


def gamma_minus_one(a: np.ndarray, b: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    """gamma_i - 1 of LoWR eq. 12 for channel norms (a, b) (the closed form ``analysis.channels.lowr_gamma`` on
    diagonal factors, whose row / column norms are a and b), 0 for channels with ||a|| / ||b|| >= tau."""
    gamma = channels.lowr_gamma(np.diag(a), np.diag(b), alpha)
    ratio = np.divide(a, b, out=np.full_like(a, np.inf), where=b > 0)
    return np.where(ratio < tau, gamma - 1.0, 0.0)


def log_ratio(logs) -> dict:
    """A CI dict of a ratio from per-seed logs (geometric mean and interval), finite seeds only."""
    d = ci_finite(logs)
    return {k: (math.exp(d[k]) if k in ("mean", "ci_low", "ci_high") and math.isfinite(d[k]) else d[k]) for k in d}


# ---------------------------------------------------------------------- divergence (lowr-tab5-sensitivity)

DIVERGENCE_MECHANISM = (
    "LoWR multiplies a_i by gamma_i >= 1 and divides b_i by it at every step; the loss is invariant to this, "
    "so nothing pulls a_i / b_i back. With tau = inf no channel is ever exempt and the ratio grows "
    "geometrically (x gamma^2 per step); with tau finite a single step can still overshoot tau (gamma is "
    "unbounded). Adam's step on b_i is ~lr per entry whatever the scale, so its change of "
    "c_i = ||a_i|| ||b_i|| grows with ||a_i||: Var(c) and hence gamma jump, and the loop runs away. "
    "LoRA+ multiplies B's step by 16, so the runaway starts earlier. See the 'adam lr x1/3' and 'sgd' "
    "protocols and the per-run max ||a_i||/||b_i||, max ||a_i||, max gamma-1 before each divergence.")


def divergence_diagnosis(hist: dict, tau: float, alpha: float) -> dict:
    """From a run's recorded channel norms (every record_every steps): max over layers and channels of
    ||a_i|| / ||b_i||, of ||a_i|| and of LoWR's per-step gamma_i - 1, at the first record after step 0 and at the
    last one before the run stopped."""
    a, b = hist["channel_a"], hist["channel_b"]  # (records, layers, r)

    def at(k):
        ratio = np.divide(a[k], b[k], out=np.full_like(a[k], np.inf), where=b[k] > 0)
        # a record taken while the run was blowing up can hold inf / NaN norms: gamma is then undefined (NaN)
        g = [float(np.max(gamma_minus_one(a[k, i], b[k, i], tau, alpha)))
             if np.isfinite(a[k, i]).all() and np.isfinite(b[k, i]).all() else math.nan for i in range(a.shape[1])]
        finite = [v for v in g if not math.isnan(v)]
        return {"step": float(hist["step"][k]), "max_a_over_b": float(np.max(ratio)),
                "max_norm_a": float(np.max(a[k])), "max_gamma_minus_1": max(finite) if finite else math.nan}

    return {"first": at(min(1, len(hist["step"]) - 1)), "last": at(len(hist["step"]) - 1)}

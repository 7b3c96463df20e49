"""What the rsLoRA figures share: the two scalings compared, Thm. 3.2's predicted exponents and the equivalence
margin on an exponent, the deep narrow network of the multilayer and trajectory figures, the per-seed slope, and
the MNIST rank sweep of figs. 2, 3, 6, 8, 9 and app. B.4 (its protocols, configs and what they read of a run).

Theorem 3.2 (our convention, f(x) = gamma_r B A x, A = lora_A (r, d), B = lora_B (d_out, r), B_0 = 0): after n SGD
steps the m-th moments of the adapter output and of the loss gradient into its input are Theta((gamma_r^2 r)^m) as
r -> infinity at fixed width d, so with gamma_r = alpha r^-beta the root-mean-square (m = 2, square root) scales as
r^(1 - 2 beta): exponent 0 for rsLoRA (beta = 1/2), -1 for LoRA (beta = 1). ERRATA.md (rank stabilization, item 2)
shows that this holds only for r >> d (for r << d the dropped terms give r^(1/2 - 2 beta)); the deep-network
figures therefore use a narrow MLP (width 4, synthetic Gaussian task) and ranks 32..512 >> d, trained with plain
SGD (the theorem's optimizer). Exponents are fitted per seed (least squares of log RMS against log r) and
summarised over seeds with a t-interval; "equivalent to p" means the 90% CI lies inside [p - margin, p + margin].
"""

from __future__ import annotations

import math

import numpy as np
import seaborn as sns

from figures.framework import Protocol, diverged, floats
from toymodels import FinetuneConfig
from toymodels.protocol import base_config

METHODS = ("lora", "rslora")
METHOD_LABEL = {"lora": "LoRA (alpha/r)", "rslora": "rsLoRA (alpha/sqrt(r))"}
METHOD_COLOR = {"lora": sns.color_palette("colorblind")[1], "rslora": sns.color_palette("colorblind")[0]}
PREDICTED_RMS_EXPONENT = {"lora": -1.0, "rslora": 0.0}  # 1 - 2 beta, Thm. 3.2 for r >> d
MARGIN = 0.15  # equivalence margin on an RMS exponent: see MARGIN_WHY
MARGIN_WHY = ("+-0.15 around the theorem's exponent (0 rsLoRA, -1 LoRA) keeps the two methods' bands 0.7 "
              "apart and each 0.35 clear of the r << d regime's exponent r^(1/2 - 2 beta) (1/2 lower, ERRATA rank "
              "stabilization 2), so a pass identifies the exponent; the one-layer closed form's finite-rank bias at "
              "r >= 32, d = 4 is 0.03, well inside")
GAP_MARGIN = 1.0 - 2 * MARGIN  # smallest rsLoRA-minus-LoRA exponent gap that counts: the bands' distance
GAP_WHY = (f"the theorem's gap is 1 (exponents 0 and -1); {GAP_MARGIN:.2g} = 1 - 2 x {MARGIN}, the gap "
           f"left when both exponents sit at the inner edges of their equivalence bands")

# ----------------------------------------------------------------- the paper's effect sizes (margins, issue 16)
# The only fine-tuning numbers the rsLoRA paper prints are app. B.4's: LoRA at r = 4 and its best learning rate
# reaches perplexity 1.863, which "cannot match" rsLoRA at r = 2048 and the default rate, 1.836. In losses (loss =
# ln perplexity: 0.6222 vs 0.6076) that is a log ratio ln(0.6222 / 0.6076) = 0.0237: the smallest loss difference the
# paper presents as a real one. A ratio of losses transfers from an LLM's loss scale to the toy's; a difference does
# not. Its rank sweeps span r = 4..2048 (figs. 2-9, ln(2048 / 4) = ln 512): a slope in ln r is a total change over
# that range divided by ln 512.
B4_LOG_LOSS_RATIO = math.log(math.log(1.863) / math.log(1.836))
PAPER_LOG_RANK_RANGE = math.log(2048 / 4)
FLAT_SLOPE = B4_LOG_LOSS_RATIO / PAPER_LOG_RANK_RANGE  # 0.0038 per unit ln r: the B.4 gap over r = 4..2048
FLAT_WHY = (f"|slope| < {FLAT_SLOPE:.2g} = ln(ln 1.863 / ln 1.836) / ln(2048/4): over the paper's ranks "
            f"4..2048 the loss changes by less than app. B.4's gap (perplexity 1.863 vs 1.836, a {B4_LOG_LOSS_RATIO:.3f} "
            "log loss ratio), the smallest loss difference the paper counts as one; fig. 2: LoRA's ranks 'converge "
            "to a similar loss'")
GAIN_WHY = (f"slope < -{FLAT_SLOPE:.2g}: a gain over r = 4..2048 at least app. B.4's gap (perplexity 1.863 vs "
            f"1.836, log loss ratio {B4_LOG_LOSS_RATIO:.3f}), the smallest improvement the paper counts")
B4_GAP = (f"app. B.4's gap (perplexity 1.863 vs 1.836, a log ratio of losses ln(ln 1.863 / ln 1.836) = "
          f"{B4_LOG_LOSS_RATIO:.3f}), the smallest loss difference the paper presents as a real one")
# Figs. 3-5 and app. B.1-B.2 judge norms by orders of magnitude: rsLoRA's stay "approximately within the same order
# of magnitude" across r = 4..2048, LoRA's are "different orders of magnitude" (fig. 5) and "collapse".
ORDER_SLOPE = math.log(10) / PAPER_LOG_RANK_RANGE  # 0.369: a factor 10 over r = 4..2048
ORDER_WHY = (f"{ORDER_SLOPE:.3f} = ln 10 / ln(2048/4), one order of magnitude over the paper's ranks 4..2048 "
             "(figs. 3-5: rsLoRA's norms 'within the same order of magnitude', LoRA's 'different orders of "
             "magnitude')")

# the deep narrow network of the multilayer and trajectory figures: width 4 (r >> d), 4 layers, every layer adapted
DEEP_WIDTHS = (4, 4, 4, 4, 4)
N_DEEP_LAYERS = len(DEEP_WIDTHS) - 1
DEEP_LR = 0.05  # plain SGD (the theorem's optimizer); stable for every rank and both scalings here
DEEP_ALPHA = 1.0

DEEP_PROTOCOLS = (
    Protocol("sgd", {"optimizer": "sgd", "lr": DEEP_LR}, primary=True, paper=True,
             note="the paper's protocol for this claim: Thm. 3.2 is proved for SGD (app. A: 'B_n, A_n after the n'th "
                  "SGD update'); a step size stable at every rank"),
    Protocol("sgd-small-lr", {"optimizer": "sgd", "lr": 0.01},
             note="a 5x smaller step: the theorem's O(gamma^3) remainders shrink"),
    Protocol("sgd lr x3", {"optimizer": "sgd", "lr": 3 * DEEP_LR}, note="learning rate x3"),
    Protocol("adam", {"optimizer": "adam", "lr": 1e-3},
             note="the paper's experiments use AdamW; Adam normalises the update, outside the theorem's setting"),
)


def deep_ranks(ctx) -> tuple[int, ...]:
    return ctx.pick(quick=(32, 128), default=(32, 128, 512), large=(32, 128, 512, 2048))


def deep_config(*, r: int, scaling: str, steps: int, seed: int = 0, **settings) -> FinetuneConfig:
    """The narrow deep MLP (synthetic task, width 4, every layer adapted), SGD (or ``settings``) for ``steps``
    steps, recorded at the start and at the end only (the moments of every layer's adapter output on the
    fine-tune set). The same config at every fidelity: the network is tiny."""
    cfg = FinetuneConfig(
        dataset="synthetic", widths=DEEP_WIDTHS, targets=tuple(f"layers.{i}" for i in range(len(DEEP_WIDTHS) - 1)),
        n_pretrain=512, n_finetune=256, n_test=256, pretrain_steps=200, task_shift="permute",
        r=r, alpha=DEEP_ALPHA, scaling=scaling, optimizer="sgd", lr=DEEP_LR, batch_size=32, steps=steps,
        record_every=steps, recorders=("loss", "moments"), seed=seed)
    return cfg.replace(**settings) if settings else cfg


def layer_rms(runs: dict, method: str, ranks) -> np.ndarray:
    """(seeds, ranks, layers): RMS of each layer's adapter output at the run's last record (sqrt of the
    ``out_second`` recorder: mean over fine-tune samples and output entries of f(x)^2); ``runs[method, r]`` holds
    one history per seed."""
    return np.stack([np.stack([np.sqrt(np.asarray(h["out_second"][-1])) for h in runs[method, r]]) for r in ranks],
                    axis=1)


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


def errorbars(ax, x, cis: list[dict], **kw):
    """Means and intervals (at ``figures.criteria.CONFIDENCE``) of a list of CI dicts (``figures.criteria.ci_dict``) as error bars."""
    mean = np.array([v["mean"] for v in cis], dtype=np.float64)
    ax.errorbar(x, mean, yerr=[mean - np.array([v["ci_low"] for v in cis], dtype=np.float64),
                               np.array([v["ci_high"] for v in cis], dtype=np.float64) - mean], capsize=3, **kw)


# ------------------------------------------------------------------------ the MNIST rank sweep (figs. 2-9, B.4)
# The 784-256-256-10 MLP with LoRA on every layer (MNIST, pixel-permutation task shift). The training figures share
# one rank sweep per protocol (identical configs, so the run cache serves fig2, fig3, fig6's and fig8's references,
# fig9 and B.4 from the same runs); every config records the same recorders. A run that blows up (non-finite loss)
# stops, is cached with ``diverged_step``, and comes back truncated at its last record.

RECORDERS = ("loss", "norms", "grads", "moments")
ADAM_LR = 1e-3  # the toy's Adam learning rate (base_config's default), standing in for the paper's AdamW 5e-5
SGD_LR = 0.05  # "a high but stable learning rate" (paper app. B.1): the largest of {0.01, 0.05} stable at r = 4..256
SIGN_WHY = "sign test: spike factors are heavy-tailed and a diverged run is an infinite spike (counted, not dropped)"

_PAPER_NOTE = ("the paper's protocol (sec. 4: 'the AdamW optimizer with the HuggingFace default learning rate of "
               ".00005 on a constant learning rate schedule'; weight decay 0, HuggingFace's default, i.e. Adam); lr "
               "scaled to the toy")


def _protocol(name, optimizer, lr, horizon=1.0, *, primary=False, paper=False, note=""):
    return Protocol(name, {"optimizer": optimizer, "lr": lr, "horizon": horizon}, primary=primary, paper=paper,
                    note=note)


# The grid a careful reader would question, kept small enough for 10 seeds on 2 cores (see BENCHMARKS.md):
# lr x1/3 and x3 around the paper's optimizer, SGD at its base lr, and the horizon x1/3 and x2.
MNIST_PROTOCOLS = (
    _protocol("adam", "adam", ADAM_LR, primary=True, paper=True, note=_PAPER_NOTE),
    _protocol("adam lr/3", "adam", ADAM_LR / 3, note="learning rate x1/3"),
    _protocol("adam lr x3", "adam", ADAM_LR * 3, note="learning rate x3"),
    _protocol("sgd", "sgd", SGD_LR, note="the theorem's optimizer (paper app. B.1)"),
    _protocol("adam short", "adam", ADAM_LR, 1 / 3, note="horizon x1/3"),
    _protocol("adam long", "adam", ADAM_LR, 2.0, note="horizon x2"),
)


def mnist_ranks(ctx) -> tuple[int, ...]:
    return ctx.pick(quick=(4, 16, 64), default=(4, 16, 64, 256), large=(4, 16, 64, 256, 1024, 2048))


def mnist_config(ctx, settings: dict | None = None, **overrides) -> FinetuneConfig:
    """The shared fine-tuning config at this fidelity, under a protocol's ``settings`` (optimizer, lr, horizon:
    steps and record spacing scaled together, so every protocol has the same number of records); None: the
    base config (Adam, its default lr)."""
    cfg = base_config(ctx, "mnist", recorders=RECORDERS)
    if settings is not None:
        h = float(settings.get("horizon", 1.0))
        cfg = cfg.replace(optimizer=settings["optimizer"], lr=float(settings["lr"]),
                          steps=max(1, round(cfg.steps * h)), record_every=max(1, round(cfg.record_every * h)))
    return cfg.replace(**overrides)


def rank_sweep(ctx) -> dict:
    """{(method, r): config} of the shared rank sweep under ``ctx``'s protocol."""
    return {(m, r): mnist_config(ctx, ctx.settings, r=r, scaling=m) for m in METHODS for r in mnist_ranks(ctx)}


def sweep_config(ctx) -> dict:
    """The JSON ``config`` of the shared rank sweep."""
    base = mnist_config(ctx, ctx.settings, seed=ctx.seeds[0], r=mnist_ranks(ctx)[0], scaling="lora")
    return {"base": base.as_dict(), "protocol": ctx.protocol.as_dict(),
            "varies": {"r": list(mnist_ranks(ctx)), "scaling": list(METHODS), "seed": list(ctx.seeds)}}


def opt_label(settings: dict) -> str:
    h = float(settings.get("horizon", 1.0))
    return f"{settings['optimizer']} lr {settings['lr']:.3g}" + ("" if h == 1 else f", horizon x{h:.3g}")


def final_loss(h) -> float:
    """The final training loss; +inf for a diverged run (its loss blew up: the worst loss, not a missing one)."""
    return math.inf if diverged(h) or "train_loss" not in h else float(h["train_loss"][-1])


def spike(h) -> float:
    """Largest rise of the (full fine-tune set) training loss above its running minimum: max_t L_t / min_{s<=t} L_s
    over the records; 1 for a monotone curve, inf for a run that blew up."""
    if diverged(h):
        return math.inf
    loss = np.asarray(h["train_loss"])
    return float(np.max(loss / np.minimum.accumulate(loss)))


def log_ratio(a, b) -> np.ndarray:
    """ln(a / b) per seed; +inf where a is infinite (a diverged run) and b finite, NaN where both are."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(a) - np.log(b)


def grad_norm(h) -> np.ndarray:
    """Global norm of all adapter gradients (all layers, A and B) per record; NaN at step 0 (no step yet)."""
    return np.sqrt(np.sum(np.asarray(h["grad_norm_A"]) ** 2 + np.asarray(h["grad_norm_B"]) ** 2, axis=1))


def stack(hists, key) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, records)) truncated to the shortest history (diverged runs are shorter)."""
    n = min(len(h["step"]) for h in hists)
    return np.asarray(hists[0]["step"][:n]), np.stack([np.asarray(h[key])[:n] for h in hists])


def band(steps, curves) -> dict:
    """The numbers of one curve over seeds for :func:`draw_band`: mean, min and max per record."""
    Y = np.asarray(curves, dtype=np.float64)
    return {"steps": np.asarray(steps), "mean": Y.mean(0), "min": Y.min(0), "max": Y.max(0), "n": Y.shape[0]}


def draw_band(ax, b: dict, color, ls, label):
    """Mean over seeds with the min-max band (records where all seeds are finite), from :func:`band`'s numbers."""
    ax.plot(b["steps"], floats(b["mean"]), color=color, ls=ls, label=label, lw=1.3)
    if b["n"] > 1:
        ax.fill_between(b["steps"], floats(b["min"]), floats(b["max"]), color=color, alpha=0.15, lw=0)


def mean_and_seeds(ax, x, Y, color, ls, label):
    """Mean over seeds (line, markers) and each seed (small dots): honest on a log axis, where a t-interval
    can reach below 0 (the CIs are in the JSON)."""
    Y = floats(Y)
    ax.plot(x, np.nanmean(Y, axis=0), color=color, ls=ls, marker="o", label=label)
    for y in Y:
        ax.plot(x, y, color=color, ls="none", marker=".", ms=4, alpha=0.5)


def rank_palette(method: str, n: int) -> list:
    """Sequential shades (light = low rank, dark = high rank): oranges for LoRA, blues for rsLoRA (as the paper's
    copper vs blue-green), both distinguishable under colour-blindness; LoRA is also dashed."""
    return sns.color_palette("Oranges" if method == "lora" else "Blues", n + 2)[2:]


def line_style(method: str) -> str:
    return "--" if method == "lora" else "-"

"""What the rsLoRA figures share: the two scalings compared, Thm. 3.2's predicted exponents and the equivalence
margin on an exponent, the deep narrow network of the multilayer and trajectory figures, and the per-seed slope.

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

from figures.framework import Protocol
from toymodels.train import FinetuneConfig

METHODS = ("lora", "rslora")
METHOD_LABEL = {"lora": "LoRA (alpha/r)", "rslora": "rsLoRA (alpha/sqrt(r))"}
METHOD_COLOR = {"lora": sns.color_palette("colorblind")[1], "rslora": sns.color_palette("colorblind")[0]}
PREDICTED_RMS_EXPONENT = {"lora": -1.0, "rslora": 0.0}  # 1 - 2 beta, Thm. 3.2 for r >> d
MARGIN = 0.15  # equivalence margin on an RMS exponent (the finite-rank bias at r_min = 32, d = 4 is 0.03)

# the deep narrow network of the multilayer and trajectory figures: width 4 (r >> d), 4 layers, every layer adapted
DEEP_WIDTHS = (4, 4, 4, 4, 4)
N_DEEP_LAYERS = len(DEEP_WIDTHS) - 1
DEEP_LR = 0.05  # plain SGD (the theorem's optimizer); stable for every rank and both scalings here
DEEP_ALPHA = 1.0

DEEP_PROTOCOLS = (
    Protocol("sgd", {"optimizer": "sgd", "lr": DEEP_LR}, primary=True, paper=True,
             note="the proof's optimizer (plain SGD), a step size stable at every rank"),
    Protocol("sgd-small-lr", {"optimizer": "sgd", "lr": 0.01},
             note="a 5x smaller step: the theorem's O(gamma^3) remainders shrink"),
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
    """Means and 95% intervals of a list of CI dicts (``figures.criteria.ci_dict``) as error bars."""
    mean = np.array([v["mean"] for v in cis], dtype=np.float64)
    ax.errorbar(x, mean, yerr=[mean - np.array([v["ci_low"] for v in cis], dtype=np.float64),
                               np.array([v["ci_high"] for v in cis], dtype=np.float64) - mean], capsize=3, **kw)

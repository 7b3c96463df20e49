"""What the ALLoRA figures share: the paper's constants, the runs of table 5 (two figures read the same cached
runs), and the measurements several figures make (the last layer's least-squares problem, the escape step).

Placement: the paper's analysis (eq. 1) puts dropout at the bottleneck x A^T; figs. 1-4 use
``placement="bottleneck"``; table 5 is the paper's LLM experiment run with PEFT, so it uses ``"input"`` (see
ERRATA.md D5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn

from analysis import allora_dynamics as dyn
from analysis import ripple
from figures import seeds
from figures.framework import Protocol
from toymodels.lora import LoRALinear
from toymodels.protocol import base_config

ETA2 = 4.0  # listing 1: 1/eta^2 = 1/4
SANITY_NOTE = ("Sanity check, not a test of an empirical claim: the figure evaluates a closed form (or a "
               "construction that attains a proved bound), so its test cannot fail short of a code bug.")

TAB5_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)  # table 5's dropout rates
TAB5_EPOCHS = 100  # of the fine-tune set (quick: 15)


def steps_per_epoch(cfg) -> int:
    """Optimizer steps per pass over the fine-tune set (1 for full-batch training)."""
    return max(1, cfg.n_finetune // cfg.batch_size) if cfg.batch_size else 1


TAB5_TRAINING = ("placement", "optimizer", "lr")  # the protocol settings that change table 5's runs


def tab5_runs(ctx, placement: str, optimizer: str = "adam", lr: float = 1e-3):
    """The runs of table 5 (allora-tab5-dropout-epochs and allora-tab5-best-epoch read the same cached runs):
    ``TAB5_EPOCHS`` epochs of the fine-tune set, one record per epoch, dropout at ``placement``, ``optimizer`` at
    ``lr``, one config per rate of :data:`TAB5_RATES`. Returns (base config, steps per epoch, {"p=<rate>": config}).
    Both figures pass their protocol's :data:`TAB5_TRAINING` settings, so a protocol of the same name runs the same
    configs in both."""
    base = base_config(ctx, "mnist", placement=placement, optimizer=optimizer, lr=float(lr), recorders=("loss",))
    spe = steps_per_epoch(base)
    base = base.replace(steps=ctx.pick(quick=15, default=TAB5_EPOCHS) * spe, record_every=spe)
    return base, spe, {f"p={p:g}": base.replace(dropout=p) for p in TAB5_RATES}


def tab5_protocols(**extra):
    """The training protocols of table 5 (shared by its two figures): the paper names no optimizer for its
    Qwen2-0.5B runs (sec. 3.4, table 5), so SGD and Adam at the shared rates are the plausible ones; Adam's rate x1/3
    and x3 and dropout at the bottleneck (ALLoRA eq. 1) are robustness protocols. ``extra``: settings every
    protocol adds (a figure's own knobs)."""
    why = "ALLoRA names no optimizer for table 5 (sec. 3.4: Qwen2-0.5B, Bias in Bios, 10 epochs): plausible"
    peft = {"placement": "input"}  # dropout on the adapter's input, as PEFT (the paper's LLM runs)
    return (
        Protocol("adam", {**peft, "optimizer": "adam", "lr": 1e-3, **extra}, primary=True, plausible=True,
                 note=f"{why}; Adam at the shared rate, dropout on the adapter's input as PEFT"),
        Protocol("sgd", {**peft, "optimizer": "sgd", "lr": 0.03, **extra}, plausible=True,
                 note=f"{why}; SGD at the shared rate (allora-fig5-escape's), dropout as PEFT"),
        Protocol("adam lr x1/3", {**peft, "optimizer": "adam", "lr": round(1e-3 / 3, 8), **extra},
                 note="learning rate x1/3"),
        Protocol("adam lr x3", {**peft, "optimizer": "adam", "lr": 3e-3, **extra}, note="learning rate x3"),
        Protocol("bottleneck placement", {"placement": "bottleneck", "optimizer": "adam", "lr": 1e-3, **extra},
                 note="dropout at the bottleneck (ALLoRA eq. 1), Adam"),
    )


def tab5_training(settings: dict) -> dict:
    """The settings of ``settings`` that change table 5's runs (:data:`TAB5_TRAINING`)."""
    return {k: settings[k] for k in TAB5_TRAINING}


@torch.no_grad()
def last_layer_problem(model, layer: LoRALinear, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """The least-squares problem of the last layer (float64): X = penultimate features (dropout-free), Y =
    one-hot minus the bias (so the prediction is X W^T + s X A^T B^T), W, A, B and the scaling s."""
    was = model.training
    model.eval()
    X = model.features(x).double().cpu().numpy()
    model.train(was)
    Y = nn.functional.one_hot(y, layer.out_features).double().cpu().numpy() - layer.base.bias.double().cpu().numpy()
    return {"X": X, "Y": Y, "W": layer.base.weight.double().cpu().numpy(), "A": layer.lora_A.double().cpu().numpy(),
            "B": layer.lora_B.double().cpu().numpy(), "s": np.float64(layer.scaling)}


def row_norm_curve(hist: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean over the LoRA layers of the mean row norm of s BA) of a run recorded with "rows"."""
    return hist["step"], hist["row_norm_BA"].mean(axis=1)


def escape_step(steps: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """The first (fractional) step at which ``values`` reaches ``threshold``, interpolated linearly in log(value)
    between records; inf if it is never reached (censor it at the horizon where a number is needed:
    ``min(t, horizon)``)."""
    above = np.nonzero(values >= threshold)[0]
    if above.size == 0:
        return float("inf")
    k = int(above[0])
    if k == 0 or values[k - 1] <= 0:
        return float(steps[k])
    lo, hi = np.log(values[k - 1]), np.log(values[k])
    frac = (np.log(threshold) - lo) / (hi - lo) if hi > lo else 1.0
    return float(steps[k - 1] + frac * (steps[k] - steps[k - 1]))


def log_ratio_ci(num, den) -> dict:
    """CI over seeds of log(num / den), returned as ratios (geometric mean and its interval)."""
    from figures.criteria import ci_dict

    d = ci_dict(np.log(np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)))
    return {"ratio": math.exp(d["mean"]), "ci_low": math.exp(d["ci_low"]), "ci_high": math.exp(d["ci_high"]),
            "n": d["n"], "confidence": d["confidence"]}


def spearman(x, y) -> float:
    """Spearman's rank correlation (0 for a constant ``y``)."""
    if np.ptp(np.asarray(y, dtype=np.float64)) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


# The optimizer: the ALLoRA paper names none (sec. 3.4's MNIST experiments state the data, the model and the
# sizes only), so a figure that trains is judged over the plausible protocols (figures.framework.HEADLINE_POLICY):
# Adam at the engine's default lr (LLM practice) and SGD at the lr the ALLoRA figures use for SGD.
SGD_LR = 0.03
# SGD on the last layer's MSE loss (figs. 1 and 4): the loss's curvature in the layer's weight is 2 lambda_max(S),
# S = mean h h^T of the penultimate features, ~500-710 on the default pretrained MLP (seeds 0-2; pretraining
# statistics only, no fine-tuning), so plain GD is stable below 2 / L ~ 3e-3 and the textbook step 1 / L is ~1.4e-3
# to 2e-3 (SGD_LR = 0.03, set for cross-entropy whose curvature in the logits is <= 1/2, diverges there)
MSE_SGD_LR = 1e-3
OPTIMIZER_UNSTATED = "the ALLoRA paper names no optimizer (sec. 3.4 states data, model and sizes only)"


def random_chain(seed: int, L: int, d: int, r: int, m: float):
    """The ripple chain of allora-ripple-adaptive: :func:`analysis.ripple.random_chain` from
    :func:`figures.seeds.ripple_chain`, and a Gaussian output gradient (d,)."""
    rng = seeds.ripple_chain(seed)
    Ws, As, Bs, x = ripple.random_chain(rng, L, d, r, m)
    return Ws, As, Bs, x, rng.standard_normal(d)


def chain_amplification(Ws, As, Bs, x, g, method: str, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(forward, input-gradient) amplification by the adapters at every depth, vs the adapter-free chain."""
    zeros = [np.zeros_like(B) for B in Bs]
    fwd, bwd = [], []
    for depth in range(1, len(Ws) + 1):
        W, A, B = Ws[:depth], As[:depth], Bs[:depth]
        on = dyn.chain_response(W, A, B, x, g, method, eta)
        off = dyn.chain_response(W, A, zeros[:depth], x, g, "allora", eta)
        fwd.append(on["forward"][-1] / off["forward"][-1])
        bwd.append(on["input_grad"][0] / off["input_grad"][0])
    return np.asarray(fwd), np.asarray(bwd)


def ripple_chains(seed_list, L: int, d: int, r: int, m: float, eta: float):
    """Prop. 1's chains for allora-ripple-adaptive: per seed a random chain (:func:`random_chain`), the forward and
    input-gradient amplification at every depth for LoRA x eta, ALLoRA and ASF-LoRA; and the tight instance
    (:func:`analysis.ripple.tight_instance`), where LoRA x eta grows at ln(1 + eta m) per layer and ALLoRA at
    ln(1 + m). Returns ({"fwd"|"bwd": {method: (seeds, depth)}}, {method: tight amplification}, max relative error
    of the tight instance's fitted per-layer log-rate)."""
    chain = {k: {n: [] for n in ("lora", "allora", "asf")} for k in ("fwd", "bwd")}
    for s in seed_list:
        Ws, As, Bs, x, g = random_chain(s, L, d, r, m)
        for meth in ("lora", "allora", "asf"):
            f, b = chain_amplification(Ws, As, Bs, x, g, meth, eta)
            chain["fwd"][meth].append(f)
            chain["bwd"][meth].append(b)
    chain = {k: {n: np.asarray(v) for n, v in d_.items()} for k, d_ in chain.items()}
    Ws, As, Bs, x = ripple.tight_instance(L=L, d=d, r=r, eta=eta, m=m, seed=seed_list[0])
    depths, tight, err = np.arange(1, L + 1), {}, 0.0
    for meth, rate in (("lora", math.log1p(eta * m)), ("allora", math.log1p(m))):
        tight[meth] = chain_amplification(Ws, As, Bs, x, x, meth, eta)[0]
        err = max(err, abs(float(np.polyfit(depths, np.log(tight[meth]), 1)[0]) - rate) / rate)
    return chain, tight, err

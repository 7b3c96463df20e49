"""ALLoRA claims that no earlier figure tested (issue 10): the ripple effect under ALLoRA and ASF-LoRA (sec. 3.3,
4.2-4.3), the zero-initialised A of sec. 3.2, table 5's epoch of maximal accuracy, and the open question of sec.
4.2 / 6 (does ALLoRA regularize like dropout?) with the ALLoRA-OD early-epoch conjecture of sec. 4.3 / 5.1.

Closed forms come from :mod:`analysis.allora_dynamics` (derived and proved there), :mod:`analysis.ripple` and
:mod:`analysis.dropout`; runs come from the engine (one ``run_sweep`` per figure and protocol), the measurements the
engine does not record from the callbacks below (:class:`RippleProbe`, :class:`EpochProbe`: their runs go through
the loop, ``finetune(cfg, callbacks=...)``, in parallel).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from analysis import allora_dynamics as dyn
from analysis import dropout as closed
from analysis import ripple
from figures import Context, Measurement, Protocol, figure
from figures._common import base_config, colors, new_figure
from figures.criteria import Criterion, Estimate, Recalibration, Rule, Test, ci_dict, mean_ci
from toymodels.callbacks import AtSteps
from toymodels.train import TrainState, loss_fn

ETA2 = 4.0  # listing 1: 1/eta^2 = 1/4


def _sweep(ctx: Context, configs, **options):
    """One ``run_sweep`` (cached, parallel per ``ctx``); ``options``: ``callbacks``, ``on_diverge``, ..."""
    from toymodels.train import run_sweep

    return run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False,
                     **options)


def _fmt(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    return (f"{scale * d['mean']:.{digits}g} [{scale * d['ci_low']:.{digits}g}, "
            f"{scale * d['ci_high']:.{digits}g}]")


# ------------------------------------------------------------------------------------------------ callbacks


class RippleProbe(AtSteps):
    """Depth-wise ripple of the trained adapters on the whole fine-tune set, with dropout off (eval mode):
    per layer l, ``dev`` = ||z_l - z_l^0|| / ||z_l^0|| (z_l the pre-activation output of layer l with the adapters,
    z_l^0 without them: the frozen model), ``amp`` = ||z_l|| / ||z_l^0||, and ``grad_amp`` = ||J_l^T u|| / its
    frozen-model value, the gradient that reaches the input of layer l (l = 0: the data) when the same output
    gradient u = dL/dz_L of the frozen model is sent back through the adapted and the frozen network (a fixed u,
    as the chain's grad_out: the fit of the adapted model does not enter). For ALLoRA the backward is the
    engine's own (sec. 4.2: the input gradient is not rescaled). Prefix "ripple_"."""

    prefix = "ripple_"
    version = 1

    def measure(self, state: TrainState) -> dict[str, np.ndarray]:
        model, cfg = state.model, state.cfg
        x, y = state.data.finetune
        was = model.training
        model.eval()
        try:
            def forward(adapted: bool):
                h = x.detach().clone().requires_grad_(True)
                ins, outs = [], []
                for i, layer in enumerate(model.layers):
                    ins.append(h)
                    z = layer(h) if (adapted or not hasattr(layer, "base")) else layer.base(h)
                    outs.append(z)
                    h = torch.relu(z) if i < len(model.layers) - 1 else z
                return ins, outs

            ins0, outs0 = forward(False)
            logits0 = outs0[-1].detach().requires_grad_(True)
            u = torch.autograd.grad(loss_fn(cfg.loss, logits0, y), logits0)[0]
            zs, grads = {}, {}
            for adapted, (ins, outs) in ((True, forward(True)), (False, (ins0, outs0))):
                g = torch.autograd.grad(outs[-1], ins, grad_outputs=u)
                zs[adapted] = [z.detach() for z in outs]
                grads[adapted] = [float(v.norm()) for v in g]
            pairs = list(zip(zs[True], zs[False], strict=True))
            return {"dev": np.array([float((a - b).norm() / b.norm()) for a, b in pairs]),
                    "amp": np.array([float(a.norm() / b.norm()) for a, b in pairs]),
                    "grad_amp": np.array(grads[True]) / np.array(grads[False])}
        finally:
            model.train(was)


class EpochProbe(AtSteps):
    """Train / test loss and accuracy (dropout off) and, for the last layer, the exact expected penalty that
    bottleneck dropout at rate ``p_ref`` would add to the MSE of that layer (:func:`analysis.dropout.dropout_penalty`
    on the per-sample scale X / sqrt(N), X = the dropout-free features of the fine-tune set; the runs use
    cross-entropy, so this is dropout's penalty evaluated on each trajectory, not a term of its loss), at
    ``steps``. Prefix "ep_"."""

    prefix = "ep_"

    def __init__(self, steps, p_ref: float):
        super().__init__(steps)
        self.p_ref = float(p_ref)

    def params(self) -> dict:
        return {"p_ref": self.p_ref}

    @torch.no_grad()
    def measure(self, state: TrainState) -> dict[str, float]:
        from toymodels.train import evaluate

        model, cfg = state.model, state.cfg
        out = {}
        for name, split in (("train", state.data.finetune), ("test", state.data.test)):
            loss, acc = evaluate(model, split, cfg.loss)
            out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
        was = model.training
        model.eval()
        X = model.features(state.data.finetune.x).double().cpu().numpy()
        model.train(was)
        last = state.layers[-1]
        X = X / math.sqrt(X.shape[0])
        A, B = last.lora_A.double().cpu().numpy(), last.lora_B.double().cpu().numpy()
        out["penalty"] = closed.dropout_penalty(X, A, B, self.p_ref, placement="bottleneck",
                                                scaling=float(last.scaling))
        return out


# ------------------------------------------------------------------------------------- allora-ripple-adaptive

RIPPLE_METHODS = ("LoRA x eta", "ALLoRA", "ASF-LoRA")

RIPPLE_CRITERION = Criterion(
    tests=(
        Test("chain_fwd", "multilinear chain (random, m_l ~ 0.5 U(0.5, 1.5), L = 16): ln(||f_L|| amplification by "
             "the adapters), LoRA x eta minus ALLoRA (per seed)", "greater",
             why="Prop. 1's ripple is the forward growth; ALLoRA removes eta from the forward"),
        Test("chain_bwd", "same chain: ln(input-gradient amplification), LoRA x eta minus ALLoRA (per seed)",
             "greater", why="sec. 4.2: ALLoRA's input gradient is not rescaled"),
        Test("mlp_fwd", "trained MLP: ln(relative output deviation of the logits from the frozen model), LoRA x eta "
             "minus ALLoRA (paired by seed)", "greater", why="the ripple in a trained network is the deviation "
             "the adapters cause at the output"),
        Test("mlp_bwd", "trained MLP: ln(amplification of the input gradient J^T u over the frozen model, u the "
             "frozen model's dL/dlogits), LoRA x eta minus ALLoRA (paired by seed)", "greater",
             why="gradient amplification through depth, for a fixed output gradient as in the chain"),
        Test("asf_fwd", "trained MLP: ln(relative output deviation), ASF-LoRA minus ALLoRA (paired by seed)",
             "greater", why="the paper's conjecture (sec. 4.3): ASF-LoRA, which scales the output, causes a ripple"),
        Test("tight_rate", "tight instance: relative error of the fitted per-layer log-rate vs ln(1 + eta m) for LoRA x eta and "
             "vs ln(1 + m) for ALLoRA (max)", "less", margin=1e-9, method="exact", role="sanity",
             why="closed form check of analysis.allora_dynamics.chain_response against analysis.ripple"),
    ),
    rule=Rule(reproduced=("chain_fwd", "chain_bwd", "mlp_fwd", "mlp_bwd", "asf_fwd"),
              partially=(("chain_fwd", "chain_bwd"), ("mlp_fwd", "mlp_bwd"))),
    note="eta^2 = 4 (listing 1). LoRA x eta: scaling eta at base lr l_b; ALLoRA and ASF-LoRA: eta, base lr l_b, no "
         "dropout (ALLoRA table 7's pairing). At eta = 1 LoRA x eta and ALLoRA have the same forward and input "
         "gradient (the reduction is exactly the removal of eta from the forward).",
)

RIPPLE_PROTOCOLS = (
    Protocol("adam", {"optimizer": "adam", "lr": 1e-3}, primary=True,
             note="the paper names no optimizer; Adam at the shared base rate, as the other ALLoRA figures"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.03},
             note="SGD (l_b as allora-fig5-escape): ALLoRA's gradient scale is a learning rate only here"),
)


def _ripple_config(base, name: str, eta: float, seed: int):
    if name == "LoRA x eta":
        return base.replace(method="lora", scaling=float(eta), seed=seed)
    return base.replace(method="allora" if name == "ALLoRA" else "asf", eta=float(eta), seed=seed)


def _random_chain(seed: int, L: int, d: int, r: int, m: float):
    """:func:`analysis.ripple.random_chain` from the stream ``[seed, 20]``, and a Gaussian output gradient (d,)."""
    rng = np.random.default_rng([seed, 20])
    Ws, As, Bs, x = ripple.random_chain(rng, L, d, r, m)
    return Ws, As, Bs, x, rng.standard_normal(d)


def _chain_amplification(Ws, As, Bs, x, g, method: str, eta: float) -> tuple[np.ndarray, np.ndarray]:
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


@figure("allora-ripple-adaptive", paper="ALLoRA sec. 3.3, 4.2-4.3",
        claim="ALLoRA reduces the ripple effect (identity output adaptor, unscaled input gradient, tapering per-row "
              "scale) compared with a constant scaling eta (LoRA x eta); ASF-LoRA, which scales the output, causes "
              "one (conjecture)",
        criterion=RIPPLE_CRITERION, protocols=RIPPLE_PROTOCOLS)
def ripple_adaptive(ctx: Context, protocol: Protocol) -> Measurement:
    eta = math.sqrt(ETA2)
    L, d, r, m = ctx.pick(quick=8, default=16), 16, 4, 0.5
    # --- closed form: chains, one per seed
    chain = {k: {n: [] for n in ("lora", "allora", "asf")} for k in ("fwd", "bwd")}
    for s in ctx.seeds:
        Ws, As, Bs, x, g = _random_chain(s, L, d, r, m)
        for meth in ("lora", "allora", "asf"):
            f, b = _chain_amplification(Ws, As, Bs, x, g, meth, eta)
            chain["fwd"][meth].append(f)
            chain["bwd"][meth].append(b)
    chain = {k: {n: np.asarray(v) for n, v in d_.items()} for k, d_ in chain.items()}  # (seeds, depth)
    d_fwd = np.log(chain["fwd"]["lora"][:, -1]) - np.log(chain["fwd"]["allora"][:, -1])
    d_bwd = np.log(chain["bwd"]["lora"][:, -1]) - np.log(chain["bwd"]["allora"][:, -1])
    # tight instance: LoRA x eta grows at ln(1 + eta m) per layer, ALLoRA at ln(1 + m)
    Ws, As, Bs, x = ripple.tight_instance(L=L, d=d, r=r, eta=eta, m=m, seed=ctx.seeds[0])
    depths = np.arange(1, L + 1)
    tight_err = 0.0
    tight = {}
    for meth, rate in (("lora", math.log1p(eta * m)), ("allora", math.log1p(m))):
        f, _ = _chain_amplification(Ws, As, Bs, x, x, meth, eta)
        tight[meth] = f
        slope = float(np.polyfit(depths, np.log(f), 1)[0])
        tight_err = max(tight_err, abs(slope - rate) / rate)
    # --- trained MLP
    base = base_config(ctx, "mnist", recorders=(), dropout=0.0, **protocol.settings)
    probe_step = base.steps
    keys = [(s, n) for s in ctx.seeds for n in RIPPLE_METHODS]
    hists = _sweep(ctx, [_ripple_config(base, n, eta, s) for s, n in keys], callbacks=[RippleProbe([probe_step])],
                   on_diverge="return")
    vals = {n: {"dev": [], "amp": [], "grad_amp": []} for n in RIPPLE_METHODS}
    diverged = {n: 0 for n in RIPPLE_METHODS}
    for (_, n), h in zip(keys, hists, strict=True):
        if "diverged_step" in h or "ripple_dev" not in h:
            diverged[n] += 1
            for k in vals[n]:
                vals[n][k].append(np.full(len(base.widths) - 1, np.nan))
            continue
        for k in vals[n]:
            vals[n][k].append(h[f"ripple_{k}"][-1])
    vals = {n: {k: np.asarray(v) for k, v in d_.items()} for n, d_ in vals.items()}  # (seeds, layers)
    lv = {n: {k: np.log(v) for k, v in d_.items()} for n, d_ in vals.items()}
    mlp_fwd = lv["LoRA x eta"]["dev"][:, -1] - lv["ALLoRA"]["dev"][:, -1]
    mlp_bwd = lv["LoRA x eta"]["grad_amp"][:, 0] - lv["ALLoRA"]["grad_amp"][:, 0]
    asf_fwd = lv["ASF-LoRA"]["dev"][:, -1] - lv["ALLoRA"]["dev"][:, -1]
    samples = {"chain_fwd": d_fwd, "chain_bwd": d_bwd, "mlp_fwd": mlp_fwd, "mlp_bwd": mlp_bwd, "asf_fwd": asf_fwd,
               "tight_rate": tight_err}
    measured = {
        "eta2": ETA2, "chain": {"L": L, "d": d, "r": r, "m": m},
        "chain_ln_fwd_amp_at_L": {n: ci_dict(np.log(chain["fwd"][n][:, -1])) for n in chain["fwd"]},
        "chain_ln_bwd_amp_at_L": {n: ci_dict(np.log(chain["bwd"][n][:, -1])) for n in chain["bwd"]},
        "chain_fwd_lora_minus_allora": ci_dict(d_fwd), "chain_bwd_lora_minus_allora": ci_dict(d_bwd),
        "tight_max_rel_rate_error": tight_err,
        "mlp_relative_deviation_per_layer": {n: {f"layer{i}": ci_dict(vals[n]["dev"][:, i])
                                                 for i in range(vals[n]["dev"].shape[1])} for n in RIPPLE_METHODS},
        "mlp_input_grad_amplification_per_layer": {n: {f"layer{i}": ci_dict(vals[n]["grad_amp"][:, i])
                                                       for i in range(vals[n]["grad_amp"].shape[1])}
                                                   for n in RIPPLE_METHODS},
        "mlp_ln_dev_lora_minus_allora": ci_dict(mlp_fwd), "mlp_ln_gradamp_lora_minus_allora": ci_dict(mlp_bwd),
        "mlp_ln_dev_asf_minus_allora": ci_dict(asf_fwd), "diverged_runs": diverged,
    }
    summary = (f"Chain (L = {L}, eta^2 = {ETA2:g}): ln forward amplification LoRA x eta - ALLoRA "
               f"{_fmt(ci_dict(d_fwd))}, input gradient {_fmt(ci_dict(d_bwd))}; ASF-LoRA's chain amplification "
               f"{_fmt(measured['chain_ln_fwd_amp_at_L']['asf'])} (ALLoRA "
               f"{_fmt(measured['chain_ln_fwd_amp_at_L']['allora'])}). Trained MLP ({protocol.name}, {base.steps} "
               f"steps): ln relative logit deviation LoRA x eta - ALLoRA {_fmt(ci_dict(mlp_fwd))}, ln input-gradient "
               f"amplification {_fmt(ci_dict(mlp_bwd))}; ASF-LoRA - ALLoRA {_fmt(ci_dict(asf_fwd))}.")
    key = {"chain_fwd": float(np.mean(d_fwd)), "mlp_fwd": float(np.nanmean(mlp_fwd)),
           "asf_fwd": float(np.nanmean(asf_fwd))}
    config = {"base": base.as_dict(), "eta2": ETA2, "methods": {"LoRA x eta": "method=lora, scaling=eta",
                                                                "ALLoRA": "method=allora, eta",
                                                                "ASF-LoRA": "method=asf, eta"},
              "probe": "RippleProbe at the last step, whole fine-tune set, eval mode",
              "chain": "random chains numpy default_rng([seed, 20]); tight instance analysis.ripple.tight_instance"}

    def plot():
        fig, axes = new_figure(3, width=4.3, height=3.4)
        pal = dict(zip(("lora", "allora", "asf"), colors(3), strict=True))
        names = {"lora": "LoRA x eta", "allora": "ALLoRA", "asf": "ASF-LoRA"}
        ax = axes[0, 0]
        for meth in ("lora", "allora", "asf"):
            mm, lo, hi = mean_ci(np.log(chain["fwd"][meth]))
            ax.plot(depths, np.exp(mm), color=pal[meth], label=f"{names[meth]} (random chains)")
            ax.fill_between(depths, np.exp(lo), np.exp(hi), color=pal[meth], alpha=0.2, lw=0)
        for meth in ("lora", "allora"):
            ax.plot(depths, tight[meth], "o", ms=3, color=pal[meth], label=f"{names[meth]} (tight instance)")
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_ylabel("||f_L(x)|| / ||f_L(x)||_(no adapter)")
        ax.set_title(f"chain of Prop. 1, eta^2 = {ETA2:g}, m = {m:g}", fontsize=9)
        ax.legend(fontsize=6.5)
        ax = axes[0, 1]
        for meth in ("lora", "allora", "asf"):
            mm, lo, hi = mean_ci(np.log(chain["bwd"][meth]))
            ax.plot(depths, np.exp(mm), color=pal[meth], label=names[meth])
            ax.fill_between(depths, np.exp(lo), np.exp(hi), color=pal[meth], alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_ylabel("||dL/dx|| / no-adapter value")
        ax.set_title("input-gradient amplification (chain)", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[0, 2]
        layers = np.arange(vals["ALLoRA"]["dev"].shape[1])
        for meth in ("lora", "allora", "asf"):
            v = vals[names[meth]]["dev"]
            mm, lo, hi = mean_ci(np.log(v[np.all(np.isfinite(v), axis=1)]))
            ax.errorbar(layers, np.exp(mm), yerr=[np.exp(mm) - np.exp(lo), np.exp(hi) - np.exp(mm)], fmt="o-",
                        color=pal[meth], capsize=3, label=names[meth])
        ax.set_yscale("log")
        ax.set_xticks(layers, [f"layer {i}" for i in layers])
        ax.set_ylabel("||z_l - z_l^0|| / ||z_l^0|| (fine-tune set)")
        ax.set_title(f"trained MLP ({protocol.name}), 95% CI over seeds", fontsize=9)
        ax.legend(fontsize=7)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------------ allora-zero-init-a

ZERO_A_RATE = 0.3
ESCAPE_FRACTION = 0.25

ZERO_A_CRITERION = Criterion(
    tests=(
        Test("mirror_closed_form", "closed form at init, last layer of each seed's pretrained MLP (bottleneck, p = "
             f"{ZERO_A_RATE:g}): 1 if the usual init gives strength 0 on A, > 0 on B, grad_A E[L] = 0, grad_B != 0 "
             "and A = 0 gives the mirror (strength 0 on B, > 0 on A, grad_B = 0, grad_A != 0) for every seed",
             "greater", margin=0.5, method="exact", why="the argument of sec. 3.2 with A and B swapped"),
        Test("same_escape", "ln(escape step with A = 0, B random / escape step with the usual init), no dropout "
             "(paired by seed)", "equivalent", margin=math.log(1.5),
             why="'the same slow training dynamic appears': within a factor 1.5 either way"),
        Test("dropout_slows_zero_a", f"ln(escape step at p = {ZERO_A_RATE:g} / at p = 0), A = 0 init (paired by "
             "seed)", "greater", why="sec. 3.2: dropout further slows the escape, now of A"),
        Test("dropout_slows_usual", f"ln(escape step at p = {ZERO_A_RATE:g} / at p = 0), usual init (paired by "
             "seed)", "greater", role="sanity", why="the original argument (allora-fig3 / fig5 test it)"),
    ),
    rule=Rule(reproduced=("mirror_closed_form", "same_escape", "dropout_slows_zero_a"),
              partially=(("mirror_closed_form",),)),
    note=f"Escape step: first step at which the mean row norm of s BA (mean over the 3 layers) reaches "
         f"{ESCAPE_FRACTION:g} x the final value of the usual-init, dropout-free run of the same seed (interpolated "
         "in log between records); a run that never reaches it counts at the horizon (censored, conservative for "
         "'slows'). The A = 0 init draws B with the law of PEFT's A entries (toymodels.lora init='zero_a'), so the "
         "first step's expected product update equals the usual init's.",
)

ZERO_A_PROTOCOLS = (
    Protocol("sgd-bottleneck", {"optimizer": "sgd", "lr": 0.03, "placement": "bottleneck"}, primary=True, paper=True,
             note="the paper's analysis: plain gradient steps, dropout at the bottleneck (eq. 1)"),
    Protocol("sgd-input", {"optimizer": "sgd", "lr": 0.03, "placement": "input"},
             note="PEFT's placement: the penalty is a function of BA only, symmetric in the init"),
    Protocol("adam-bottleneck", {"optimizer": "adam", "lr": 1e-3, "placement": "bottleneck"},
             note="Adam normalises the first steps' gradient scale"),
)


def _first_crossing(steps: np.ndarray, values: np.ndarray, threshold: float, horizon: float) -> float:
    """First (log-interpolated) step at which values >= threshold; ``horizon`` if never (censored)."""
    above = np.nonzero(values >= threshold)[0]
    if above.size == 0:
        return float(horizon)
    k = int(above[0])
    if k == 0 or values[k - 1] <= 0:
        return float(steps[k])
    lo, hi = np.log(values[k - 1]), np.log(values[k])
    frac = (np.log(threshold) - lo) / (hi - lo) if hi > lo else 1.0
    return float(steps[k - 1] + frac * (steps[k] - steps[k - 1]))


def _init_closed_form(cfg, p: float) -> dict:
    """Penalty strengths and expected-loss gradients of the last layer at initialisation (bottleneck)."""
    from toymodels.train import build_finetune_model, protocol_data

    model = build_finetune_model(cfg, torch.device("cpu"))
    data = protocol_data(cfg, torch.device("cpu"))
    x, y = data.finetune
    layer = model.layers[-1]
    with torch.no_grad():
        X = model.features(x).double().numpy() / math.sqrt(len(y))
        Y = (torch.nn.functional.one_hot(y, layer.out_features).double() - layer.base.bias.double()).numpy()
        Y = Y / math.sqrt(len(y))
    W = layer.base.weight.double().detach().numpy()
    A, B = layer.lora_A.double().detach().numpy(), layer.lora_B.double().detach().numpy()
    s = float(layer.scaling)
    on_A, on_B = closed.penalty_strengths(X, A, B, p, scaling=s)
    gA, gB = closed.expected_loss_grad(X, Y, W, A, B, p, scaling=s)
    return {"on_A": float(on_A.sum()), "on_B": float(on_B.sum()), "grad_A": float(np.linalg.norm(gA)),
            "grad_B": float(np.linalg.norm(gB))}


@figure("allora-zero-init-a", paper="ALLoRA sec. 3.2",
        claim="if A is zero-initialised instead of B, the argument still holds: the same slow escape from zero "
              "(now of A), and dropout's regularization then falls on A",
        criterion=ZERO_A_CRITERION, protocols=ZERO_A_PROTOCOLS)
def zero_init_a(ctx: Context, protocol: Protocol) -> Measurement:
    steps = ctx.pick(quick=30, default=150)
    base = base_config(ctx, "mnist", steps=steps, record_every=1, recorders=("rows",), **protocol.settings)
    inits = ("kaiming", "zero_a")
    rates = (0.0, ZERO_A_RATE)
    # closed form at init (no training)
    cf = {i: [_init_closed_form(base.replace(seed=s, init=i), ZERO_A_RATE) for s in ctx.seeds] for i in inits}
    tiny = 1e-12
    mirror = all(c["on_A"] <= tiny and c["on_B"] > tiny and c["grad_A"] <= tiny and c["grad_B"] > tiny
                 for c in cf["kaiming"]) and all(c["on_B"] <= tiny and c["on_A"] > tiny and c["grad_B"] <= tiny
                                                 and c["grad_A"] > tiny for c in cf["zero_a"])
    keys = [(i, p, s) for i in inits for p in rates for s in ctx.seeds]
    hists = dict(zip(keys, _sweep(ctx, [base.replace(init=i, dropout=p, seed=s) for i, p, s in keys]),
                     strict=True))

    def curve(h):
        return h["step"], h["row_norm_BA"].mean(axis=1)

    t = {(i, p): [] for i in inits for p in rates}
    for s in ctx.seeds:
        tau = ESCAPE_FRACTION * curve(hists[("kaiming", 0.0, s)])[1][-1]
        for i in inits:
            for p in rates:
                st, v = curve(hists[(i, p, s)])
                t[(i, p)].append(_first_crossing(st, v, tau, steps))
    t = {k: np.asarray(v) for k, v in t.items()}
    same = np.log(t[("zero_a", 0.0)] / t[("kaiming", 0.0)])
    slow_z = np.log(t[("zero_a", ZERO_A_RATE)] / t[("zero_a", 0.0)])
    slow_u = np.log(t[("kaiming", ZERO_A_RATE)] / t[("kaiming", 0.0)])
    samples = {"mirror_closed_form": float(mirror), "same_escape": same, "dropout_slows_zero_a": slow_z,
               "dropout_slows_usual": slow_u}
    measured = {
        "closed_form_at_init": {i: {k: ci_dict([c[k] for c in cf[i]]) for k in ("on_A", "on_B", "grad_A", "grad_B")}
                                for i in inits},
        "mirror_holds_every_seed": mirror,
        "escape_step": {f"{i} p={p:g}": ci_dict(t[(i, p)]) for i in inits for p in rates},
        "censored": {f"{i} p={p:g}": int(np.sum(t[(i, p)] >= steps)) for i in inits for p in rates},
        "ln_escape_zero_a_over_usual": ci_dict(same), "ln_dropout_slowdown_zero_a": ci_dict(slow_z),
        "ln_dropout_slowdown_usual": ci_dict(slow_u),
    }
    k0 = measured["closed_form_at_init"]
    summary = (f"At init (p = {ZERO_A_RATE:g}, bottleneck): usual init strength on A {k0['kaiming']['on_A']['mean']:.1g}, "
               f"on B {k0['kaiming']['on_B']['mean']:.3g}; A = 0: on A {k0['zero_a']['on_A']['mean']:.3g}, on B "
               f"{k0['zero_a']['on_B']['mean']:.1g} (mirror in every seed: {mirror}). Escape ({protocol.name}): ln(step "
               f"A = 0 / step usual) {_fmt(ci_dict(same))}; dropout slowdown ln ratio, A = 0 {_fmt(ci_dict(slow_z))}, "
               f"usual {_fmt(ci_dict(slow_u))}.")
    key = {"same_escape": float(np.mean(same)), "slow_zero_a": float(np.mean(slow_z))}
    config = {"base": base.as_dict(), "inits": inits, "rates": rates, "escape_fraction": ESCAPE_FRACTION}

    def plot():
        fig, axes = new_figure(2, width=4.5, height=3.4)
        ax = axes[0, 0]
        for c, (i, p) in zip(colors(4), [(i, p) for i in inits for p in rates], strict=True):
            v = np.stack([curve(hists[(i, p, s)])[1] for s in ctx.seeds])
            st = curve(hists[(i, p, ctx.seeds[0])])[0]
            mm, lo, hi = (np.exp(a) for a in mean_ci(np.log(v[:, 1:])))
            ax.plot(st[1:], mm, color=c, ls="-" if i == "kaiming" else "--",
                    label=f"{'usual (B = 0)' if i == 'kaiming' else 'A = 0, B random'}, p = {p:g}")
            ax.fill_between(st[1:], lo, hi, color=c, alpha=0.2, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean row norm of s BA (3 layers)")
        ax.set_title(f"escape from zero ({protocol.name})", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        labels, vals_ = [], []
        for i in inits:
            for k in ("on_A", "on_B"):
                labels.append(f"{'usual' if i == 'kaiming' else 'A = 0'}\n{k.replace('_', ' ')}")
                vals_.append(max(np.mean([c[k] for c in cf[i]]), 1e-20))
        ax.bar(range(4), vals_, color=[colors(2)[0], colors(2)[1]] * 2)
        ax.set_yscale("log")
        ax.set_xticks(range(4), labels, fontsize=7)
        ax.set_ylabel("dropout's decay strength at init (sum over k)")
        ax.set_title(f"closed form, p = {ZERO_A_RATE:g} (exact zeros drawn at 1e-20)", fontsize=9)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


# ------------------------------------------------------------------------------------- allora-tab5-best-epoch

TAB5_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)  # as allora-tab5-dropout-epochs (the runs are shared through the cache)

TAB5_CRITERION = Criterion(
    tests=(
        Test("page", "Page's L trend test of the epoch of maximal test accuracy across the ordered dropout rates "
             "(seeds as blocks, mid-ranks for ties), as a standard normal statistic", "greater", method="z",
             why="an ordered alternative: 'increases with the dropout rate'"),
        Test("slope", "per-seed least-squares slope of the epoch of maximal accuracy on the rate (epochs per unit "
             "rate)", "greater", why="the size and sign of the trend, paired by seed"),
        Test("horizon", "share of (seed, rate) cells whose maximum is at the last epoch (censored by the horizon)",
             "less", margin=0.5, method="exact", role="sanity",
             why="when most maxima sit at the horizon the trend is an artefact of the horizon"),
    ),
    rule=Rule(reproduced=("page", "slope"), partially=(("page",), ("slope",))),
    note="Epoch of maximal accuracy: the first epoch attaining the maximum (ties -> earliest) of the test-accuracy "
         "curve, optionally smoothed by a centred moving average (protocol setting `smooth`) and cut at a horizon "
         "(`horizon`, a fraction of the run).",
)

TAB5_PROTOCOLS = (
    Protocol("raw", {"smooth": 1, "horizon": 1.0, "placement": "input"}, primary=True, paper=True,
             note="the paper's table 5: argmax of the accuracy per epoch; dropout on the adapter's input (PEFT)"),
    Protocol("smoothed-5", {"smooth": 5, "horizon": 1.0, "placement": "input"},
             note="argmax of a 5-epoch moving average (noise of single epochs)"),
    Protocol("half-horizon", {"smooth": 1, "horizon": 0.5, "placement": "input"},
             note="the first half of the run only (the horizon's effect)"),
    Protocol("bottleneck", {"smooth": 1, "horizon": 1.0, "placement": "bottleneck"},
             note="dropout at the bottleneck (ALLoRA eq. 1); the runs of allora-tab5-dropout-epochs' protocol"),
)


def tab5_configs(ctx: Context, placement: str = "input"):
    """The runs of allora-tab5-dropout-epochs (same configs, so the run cache shares them): ``epochs`` epochs of
    the fine-tune set, one record per epoch, dropout at ``placement``."""
    epochs = ctx.pick(quick=15, default=100)
    base = base_config(ctx, "mnist", placement=placement, recorders=("loss",))
    spe = max(1, base.n_finetune // base.batch_size) if base.batch_size else 1
    base = base.replace(steps=epochs * spe, record_every=spe)
    return base, spe, [base.replace(seed=s, dropout=p) for p in TAB5_RATES for s in ctx.seeds]


def best_epochs(acc: np.ndarray, epochs: np.ndarray, smooth: int = 1, horizon: float = 1.0) -> np.ndarray:
    """Epoch of maximal accuracy per curve. ``acc`` (..., records) with ``epochs`` (records,); records after
    ``horizon`` x the last epoch are dropped; a centred moving average of ``smooth`` records (odd, >= 1; the
    ends use the available neighbours) is applied first; ties go to the earliest epoch."""
    if not (isinstance(smooth, int) and smooth >= 1 and smooth % 2 == 1):
        raise ValueError(f"smooth must be an odd integer >= 1, got {smooth!r}")
    if not 0 < horizon <= 1:
        raise ValueError(f"horizon must be in (0, 1], got {horizon!r}")
    acc = np.asarray(acc, dtype=np.float64)
    epochs = np.asarray(epochs, dtype=np.float64)
    keep = epochs <= horizon * epochs[-1] + 1e-9
    acc, epochs = acc[..., keep], epochs[keep]
    if smooth > 1:
        half = smooth // 2
        padded = np.full(acc.shape[:-1] + (acc.shape[-1] + 2 * half,), np.nan)
        padded[..., half:half + acc.shape[-1]] = acc
        windows = np.stack([padded[..., k:k + acc.shape[-1]] for k in range(smooth)])
        acc = np.nanmean(windows, axis=0)
    return epochs[np.argmax(acc, axis=-1)]


def page_z(data: np.ndarray) -> float:
    """Page's L test (blocks = rows, ordered treatments = columns, increasing alternative) as a standard normal
    statistic z = Phi^-1(1 - p) with p from :func:`scipy.stats.page_trend_test` (asymptotic; mid-ranks for ties)."""
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] < 3:
        raise ValueError(f"data must be (blocks >= 2, treatments >= 3), got shape {data.shape}")
    p = float(stats.page_trend_test(data, method="asymptotic").pvalue)
    return float(stats.norm.isf(min(max(p, 1e-300), 1.0)))


def per_seed_slopes(rates, best: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``best`` (seeds, rates) on ``rates``, one per seed."""
    x = np.asarray(rates, dtype=np.float64)
    xc = x - x.mean()
    return (np.asarray(best, dtype=np.float64) - np.asarray(best).mean(axis=1, keepdims=True)) @ xc / (xc @ xc)


@figure("allora-tab5-best-epoch", paper="ALLoRA table 5",
        claim="the epoch of maximal accuracy increases with the dropout rate",
        criterion=TAB5_CRITERION, protocols=TAB5_PROTOCOLS)
def tab5_best_epoch(ctx: Context, protocol: Protocol) -> Measurement:
    base, spe, configs = tab5_configs(ctx, protocol.settings["placement"])
    hists = _sweep(ctx, configs)
    acc = np.asarray([h["test_acc"] for h in hists]).reshape(len(TAB5_RATES), len(ctx.seeds), -1)
    ep = hists[0]["step"] / spe
    smooth, horizon = int(protocol.settings["smooth"]), float(protocol.settings["horizon"])
    best = best_epochs(acc, ep, smooth, horizon).T  # (seeds, rates)
    last = ep[ep <= horizon * ep[-1] + 1e-9][-1]
    censored = float(np.mean(best >= last))
    z = page_z(best)
    slopes = per_seed_slopes(TAB5_RATES, best)
    samples = {"page": Estimate(z, 1.0), "slope": slopes, "horizon": censored}
    measured = {"rates": TAB5_RATES, "epochs": float(ep[-1]), "horizon_epoch": float(last),
                "smooth": smooth, "epoch_of_max": {f"p={p:g}": ci_dict(best[:, j]) for j, p in enumerate(TAB5_RATES)},
                "median_epoch_of_max": {f"p={p:g}": float(np.median(best[:, j])) for j, p in enumerate(TAB5_RATES)},
                "page_z": z, "slope_epochs_per_unit_rate": ci_dict(slopes), "censored_share": censored,
                "paper_table5": {"rates": [0.0, 0.05, 0.1, 0.2, 0.4], "epoch_of_max": [6, 8, 8, 9, 10],
                                 "of_epochs": 10}}
    summary = ("Epoch of maximal test accuracy (mean over seeds) "
               + ", ".join(f"p={p:g}: {best[:, j].mean():.1f}" for j, p in enumerate(TAB5_RATES))
               + f" (of {last:g} epochs; paper 6, 8, 8, 9, 10 of 10); Page z = {z:.2f}, per-seed slope "
               f"{_fmt(ci_dict(slopes))} epochs per unit rate; {100 * censored:.0f}% of maxima at the horizon.")
    key = {"page_z": z, "slope": float(slopes.mean()), "censored": censored}
    config = {"base": base.as_dict(), "rates": TAB5_RATES, "steps_per_epoch": spe, "smooth": smooth,
              "horizon": horizon, "runs": "identical to allora-tab5-dropout-epochs (shared cache)"}

    def plot():
        fig, axes = new_figure(2, width=4.5, height=3.4)
        ax = axes[0, 0]
        for s in range(best.shape[0]):
            ax.plot(TAB5_RATES, best[s], "-", color="0.75", lw=0.8)
        mm, lo, hi = mean_ci(best)
        ax.errorbar(TAB5_RATES, mm, yerr=[mm - lo, hi - mm], fmt="o-", color=colors(1)[0], capsize=3,
                    label="mean, 95% CI (grey: seeds)")
        ax.axhline(last, color="k", ls=":", lw=0.8, label="horizon")
        ax.set_xlabel("dropout rate p")
        ax.set_ylabel("epoch of maximal test accuracy")
        ax.set_title(f"{protocol.name}: Page z = {z:.2f}", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[0, 1]
        ax.plot(TAB5_RATES, [6, 8, 8, 9, 10], "s-", color=colors(2)[1], label="paper (of 10 epochs)")
        ax.plot(TAB5_RATES, 10 * mm / last, "o-", color=colors(1)[0], label=f"toy, rescaled to 10 (of {last:g})")
        ax.set_xlabel("dropout rate p")
        ax.set_ylabel("epoch of max (scaled to a 10-epoch horizon)")
        ax.legend(fontsize=7)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)


# --------------------------------------------------------------------------- allora-regularization-like-dropout

REG_RATE = 0.1
REG_METHODS = ("LoRA", "LoRA + dropout", "ALLoRA", "ALLoRA-OD")
EARLY_EPOCHS = (1, 2, 3)
OD_MARGIN = 0.001  # accuracy (fraction): 0.1 pp, two test images of 2000

REG_CRITERION = Criterion(
    tests=(
        Test("allora_gap", "generalization gap (test - train cross-entropy) at the end, ALLoRA minus LoRA (paired "
             "by seed)", "less", why="a regularizer narrows the gap; at eta = 1 ALLoRA equals LoRA at B = 0, so "
             "the difference is the taper alone"),
        Test("allora_penalty", f"ln(dropout's exact expected penalty (p = {REG_RATE:g}, last layer) at the end), "
             "ALLoRA minus LoRA (paired by seed)", "less",
             why="'recovers some regularisation effect of dropout': a smaller value of dropout's own penalty"),
        Test("od_early", f"test accuracy at epochs {EARLY_EPOCHS} (mean), ALLoRA-OD minus ALLoRA (paired by seed)",
             "less", margin=-OD_MARGIN, why="the conjecture of sec. 4.3 / 5.1: ALLoRA-OD's noise drags down early "
             "epochs, by more than 2 test images in 2000 (0.1 pp; the paper's table 4 gap is 0.4 pp); tested and "
             "reported, not part of the verdict on ALLoRA"),
        Test("dropout_gap", "generalization gap at the end, LoRA + dropout minus LoRA (paired by seed)", "less",
             role="sanity", why="the premise: dropout regularizes in this set-up"),
        Test("dropout_penalty", "ln(penalty at the end), LoRA + dropout minus LoRA (paired by seed)", "less",
             role="sanity", why="dropout lowers its own penalty"),
    ),
    rule=Rule(reproduced=("allora_gap", "allora_penalty"), partially=(("allora_gap",), ("allora_penalty",))),
    recalibrations=(Recalibration(
        old="od_early: mean < 0", new=f"od_early: mean < -{100 * OD_MARGIN:g} pp",
        why="the first default run found -0.04 pp [-0.06, -0.02]: significant at 10 seeds but under one test "
            "image; a drag the paper could mean must be visible (margin fixed before the next regeneration)"),),
    note="Closed form (analysis.allora_dynamics, proved in tests/analysis/test_allora_dynamics.py): ALLoRA's flow is "
         "linear in the loss gradient g = dL/d(BA), so it vanishes wherever g = 0 -- it has no penalty force, "
         "unlike dropout's expected flow (LoRA's flow minus the gradient of a penalty that acts at g = 0); its "
         "expected mini-batch step is its full-batch step; ALLoRA-OD is exactly LoRA on a reshaped loss psi. Any "
         "regularization by ALLoRA is therefore implicit (trajectory), which is what the runs measure.",
)

REG_PROTOCOLS = (
    Protocol("adam-eta1", {"optimizer": "adam", "lr": 1e-3, "eta": 1.0}, primary=True,
             note="eta = 1 (table 6's eta^2 = 1): ALLoRA = LoRA at B = 0, the taper isolated; Adam"),
    Protocol("sgd-eta1", {"optimizer": "sgd", "lr": 0.03, "eta": 1.0},
             note="SGD, where ALLoRA's scale acts as a learning rate"),
    Protocol("adam-eta2", {"optimizer": "adam", "lr": 1e-3, "eta": 2.0},
             note="eta^2 = 4 (listing 1); LoRA at scaling 1 is then not matched at B = 0"),
)


def _reg_config(base, name: str, eta: float, seed: int):
    if name == "LoRA":
        return base.replace(method="lora", scaling=1.0, dropout=0.0, seed=seed)
    if name == "LoRA + dropout":
        return base.replace(method="lora", scaling=1.0, dropout=REG_RATE, seed=seed)
    return base.replace(method="allora" if name == "ALLoRA" else "allora_od", eta=eta, dropout=0.0, seed=seed)


@figure("allora-regularization-like-dropout", paper="ALLoRA sec. 4.2, 6 (open question); sec. 4.3, 5.1",
        claim="ALLoRA recovers some of dropout's regularization (sec. 4.2 hypothesis); ALLoRA-OD's noise lowers "
              "early-epoch accuracy (sec. 4.3 conjecture)",
        criterion=REG_CRITERION, protocols=REG_PROTOCOLS)
def regularization_like_dropout(ctx: Context, protocol: Protocol) -> Measurement:
    settings = dict(protocol.settings)
    eta = float(settings.pop("eta"))
    base = base_config(ctx, "mnist", recorders=(), placement="bottleneck", **settings)
    spe = max(1, base.n_finetune // base.batch_size)
    probe_steps = sorted({e * spe for e in EARLY_EPOCHS} | set(range(0, base.steps + 1, max(base.steps // 2, 1)))
                         | {base.steps})
    keys = [(s, n) for s in ctx.seeds for n in REG_METHODS]
    hists = _sweep(ctx, [_reg_config(base, n, eta, s) for s, n in keys],
                   callbacks=[EpochProbe(probe_steps, REG_RATE)], on_diverge="return")
    rec = {n: [] for n in REG_METHODS}
    for (_, n), h in zip(keys, hists, strict=True):
        rec[n].append(h)
    steps = rec["LoRA"][0]["ep_step"]

    def arr(n, k):
        out = np.full((len(ctx.seeds), len(steps)), np.nan)
        for i, h in enumerate(rec[n]):
            v = h.get(f"ep_{k}", np.array([]))
            out[i, :len(v)] = v
        return out

    gap = {n: arr(n, "test_loss") - arr(n, "train_loss") for n in REG_METHODS}
    pen = {n: arr(n, "penalty") for n in REG_METHODS}
    acc = {n: arr(n, "test_acc") for n in REG_METHODS}
    early = np.isin(steps, [e * spe for e in EARLY_EPOCHS])
    d_gap = gap["ALLoRA"][:, -1] - gap["LoRA"][:, -1]
    d_pen = np.log(pen["ALLoRA"][:, -1]) - np.log(pen["LoRA"][:, -1])
    d_od = acc["ALLoRA-OD"][:, early].mean(axis=1) - acc["ALLoRA"][:, early].mean(axis=1)
    d_dgap = gap["LoRA + dropout"][:, -1] - gap["LoRA"][:, -1]
    d_dpen = np.log(pen["LoRA + dropout"][:, -1]) - np.log(pen["LoRA"][:, -1])
    samples = {"allora_gap": d_gap, "allora_penalty": d_pen, "od_early": d_od, "dropout_gap": d_dgap,
               "dropout_penalty": d_dpen}
    measured = {
        "eta": eta, "p_ref": REG_RATE, "probe_steps": [int(v) for v in steps],
        "final_gap": {n: ci_dict(gap[n][:, -1]) for n in REG_METHODS},
        "final_ln_penalty": {n: ci_dict(np.log(pen[n][:, -1])) for n in REG_METHODS},
        "final_test_acc": {n: ci_dict(acc[n][:, -1]) for n in REG_METHODS},
        "early_test_acc": {n: ci_dict(acc[n][:, early].mean(axis=1)) for n in REG_METHODS},
        "allora_minus_lora_gap": ci_dict(d_gap), "allora_minus_lora_ln_penalty": ci_dict(d_pen),
        "dropout_minus_lora_gap": ci_dict(d_dgap), "dropout_minus_lora_ln_penalty": ci_dict(d_dpen),
        "od_minus_allora_early_acc": ci_dict(d_od),
        "diverged_runs": {n: int(sum("diverged_step" in h for h in rec[n])) for n in REG_METHODS},
    }
    summary = (f"At the end ({base.steps} steps, {protocol.name}): generalization gap ALLoRA - LoRA "
               f"{_fmt(ci_dict(d_gap))} vs dropout (p = {REG_RATE:g}) - LoRA {_fmt(ci_dict(d_dgap))}; ln dropout "
               f"penalty ALLoRA - LoRA {_fmt(ci_dict(d_pen))} vs dropout - LoRA {_fmt(ci_dict(d_dpen))}. Early "
               f"accuracy (epochs {EARLY_EPOCHS}) ALLoRA-OD - ALLoRA {_fmt(ci_dict(d_od), 100)} pp.")
    key = {"allora_gap": float(np.nanmean(d_gap)), "allora_penalty": float(np.nanmean(d_pen)),
           "od_early_pp": float(100 * np.nanmean(d_od))}
    config = {"base": base.as_dict(), "eta": eta, "dropout_rate": REG_RATE, "methods": {
        "LoRA": "method=lora, scaling=1", "LoRA + dropout": f"method=lora, scaling=1, dropout={REG_RATE} "
        "(bottleneck)", "ALLoRA": "method=allora, eta", "ALLoRA-OD": "method=allora_od, eta"},
        "probe": "EpochProbe (train/test loss and accuracy, last-layer dropout penalty) at probe_steps"}

    def plot():
        fig, axes = new_figure(3, width=4.3, height=3.4)
        pal = dict(zip(REG_METHODS, colors(4), strict=True))
        for ax, data, lab in ((axes[0, 0], gap, "generalization gap (test - train CE)"),
                              (axes[0, 1], {n: np.log(v[:, 1:]) for n, v in pen.items()},
                               f"ln dropout penalty, p = {REG_RATE:g} (last layer)"),
                              (axes[0, 2], {n: 100 * v for n, v in acc.items()}, "test accuracy (%)")):
            x = steps if data is not None and next(iter(data.values())).shape[1] == len(steps) else steps[1:]
            for n in REG_METHODS:
                mm, lo, hi = mean_ci(data[n])
                ax.plot(x, mm, "o-", ms=3, color=pal[n], label=n)
                ax.fill_between(x, lo, hi, color=pal[n], alpha=0.2, lw=0)
            ax.set_xlabel("step")
            ax.set_ylabel(lab)
        axes[0, 2].set_xscale("symlog", linthresh=spe)
        axes[0, 0].legend(fontsize=7)
        axes[0, 0].set_title(f"{protocol.name}, 95% CI over seeds", fontsize=9)
        return fig

    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=["mnist"],
                       config=config, plot=plot)

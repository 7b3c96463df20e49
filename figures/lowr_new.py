"""LoWR (seed 003) claims that the original figures do not test: the title's "effective rank utilization", the
mechanism of sec. 3.3 ("the input of each layer is generally more stable than the output gradient", hence the
channel differences sit in B), and LoWR as a plug-in on other initialisations (tables 2-4: PiSSA, OLoRA).

Toy analogue: the shared MNIST protocol (:func:`figures._common.base_config`: 784-256-256-10 MLP, LoRA on every
layer, Adam lr 1e-3) with s = alpha / r = 1 (the paper's y = (W + BA) x) and LoWR's main setting of
``figures/lowr.py`` (tau = 10, alpha = 0.1, every step). Measurements inside a run are callbacks
(:class:`toymodels.train.Callback`); they never change the training (no RNG draws, no parameter updates).
Each figure and protocol runs one ``run_sweep`` (cached, parallel per the context); the runs with callbacks go
through the loop (``finetune(cfg, callbacks=...)``).

Shapes: A = lora_A (r, d_in), B = lora_B (d_out, r), s B A (d_out, d_in); channel i is (a_i = A[i, :], b_i = B[:, i]).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from figures import Context, Measurement, Protocol, figure
from figures._common import base_config, colors, new_figure, real_datasets
from figures.criteria import Criterion, Rule, Test, ci_dict
from toymodels.train import Callback, run_sweep

DATASET = "mnist"
MAIN_LOWR = (10.0, 0.1, 1)  # (tau, alpha, every): as figures/lowr.py


# --------------------------------------------------------------------------------------------- measures


def effective_rank(sv) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = sigma_i / sum_j sigma_j (H the Shannon entropy, nats);
    in [1, number of nonzero sigma]. ``sv``: singular values (>= 0, NaN entries ignored)."""
    s = _sv(sv)
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(sv) -> float:
    """||M||_F^2 / ||M||_2^2 = sum sigma_i^2 / max sigma^2, in [1, rank]."""
    s = _sv(sv)
    return float(np.sum(s**2) / np.max(s) ** 2)


def top_share(sv, k: int) -> float:
    """Share of the singular mass in the top ``k`` values: sum_{i <= k} sigma_(i) / sum sigma (sorted descending)."""
    s = np.sort(_sv(sv))[::-1]
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return float(s[:k].sum() / s.sum())


def _sv(sv) -> np.ndarray:
    s = np.asarray(sv, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0 or np.any(s < 0) or not np.any(s > 0):
        raise ValueError("sv must hold nonnegative singular values, not all zero")
    return s


def b_share(a, b) -> float:
    """Share of the across-channel variance of log(||a_i|| ||b_i||) carried by log ||b_i|| (cov(log c, log b) /
    var(log c); the A and B shares sum to 1). 0.5: A and B carry the channel differences equally."""
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    lc = la + lb
    var = lc.var()
    return math.nan if var == 0 else float(np.mean((lc - lc.mean()) * (lb - lb.mean())) / var)


def relative_change(new: np.ndarray, old: np.ndarray) -> float:
    """||new - old||_F / ||old||_F (inf when old = 0 and new != 0, 0 when both are 0)."""
    d, n = float(np.linalg.norm(new - old)), float(np.linalg.norm(old))
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


# -------------------------------------------------------------------------------------------- callbacks


class AdapterSpectrum(Callback):
    """At the end of the run: the singular values of every layer's s B A (``ba_sv``, layers x r, NaN-padded where
    min(d_out, d_in) < r)."""

    version = 1

    def reset(self) -> None:
        self._sv: np.ndarray | None = None

    def on_train_end(self, state) -> None:
        r = max(m.r for m in state.layers)
        out = np.full((len(state.layers), r), math.nan)
        with torch.no_grad():
            for i, m in enumerate(state.layers):
                sv = torch.linalg.svdvals((m.scaling * (m.lora_B @ m.lora_A)).double()).cpu().numpy()
                out[i, : min(m.r, sv.size)] = sv[: m.r]
        self._sv = out

    def result(self) -> dict:
        return {} if self._sv is None else {"ba_sv": self._sv}


class ProbeStability(Callback):
    """At every record: each LoRA layer's input X (N, d_in) and output gradient G = dL/dy (N, d_out) on the run's
    fixed probe mini-batch (eval mode, gradients by ``torch.autograd.grad`` on the outputs only: the parameters'
    ``.grad`` and the RNG are untouched), and their relative change since the previous record:
    ``input_change`` / ``grad_change`` (records - 1, layers) = ||X_t - X_{t-1}||_F / ||X_{t-1}||_F (same for G)."""

    version = 1

    def reset(self) -> None:
        self._prev: list | None = None
        self._dx: list = []
        self._dg: list = []

    def on_record(self, state) -> None:
        x, y = state.data.finetune.x[state.probe], state.data.finetune.y[state.probe]
        store: list = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: store.append((inp[0].detach(), out)))
                 for m in state.layers]
        was = state.model.training
        state.model.eval()
        try:
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(state.model(x), y)
                grads = torch.autograd.grad(loss, [o for _, o in store])
        finally:
            for h in hooks:
                h.remove()
            state.model.train(was)
        now = [(xi.cpu().double().numpy(), g.detach().cpu().double().numpy())
               for (xi, _), g in zip(store, grads, strict=True)]
        if self._prev is not None:
            self._dx.append([relative_change(a[0], b[0]) for a, b in zip(now, self._prev, strict=True)])
            self._dg.append([relative_change(a[1], b[1]) for a, b in zip(now, self._prev, strict=True)])
        self._prev = now

    def result(self) -> dict:
        return {"input_change": np.asarray(self._dx, dtype=np.float64),
                "grad_change": np.asarray(self._dg, dtype=np.float64)}


# ---------------------------------------------------------------------------------------------- helpers


def _config(ctx: Context, seed: int, r: int, **changes):
    """The MNIST protocol with rank r, s = alpha / r = 1, the loss and channel recorders."""
    return base_config(ctx, DATASET, r=r, alpha=float(r), recorders=("loss", "channels"), seed=seed, **changes)


def _sweep(ctx: Context, configs, **options):
    """One ``run_sweep`` (cached, parallel per ``ctx``); ``options``: ``callbacks``, ``on_diverge``, ..."""
    return run_sweep(configs, device=ctx.device, executor=ctx.executor, workers=ctx.workers, progress=False,
                     **options)


def _no_data() -> str | None:
    names, notes = real_datasets((DATASET,))
    return None if DATASET in names else f"{DATASET} is missing: {notes.get(DATASET, '')}"


def _ci(values) -> dict:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    return ci_dict(v) if v.size else {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}


def _fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}g} [{d['ci_low']:.{digits}g}, {d['ci_high']:.{digits}g}]"


LOWR_PROTOCOLS = (
    Protocol("adam", {}, primary=True, paper=True, note="the paper fine-tunes with AdamW (LoRA's defaults): Adam 1e-3"),
    Protocol("lowr-every-5", {"lowr_every": 5}, note="rescaling every 5 steps (app. A, table 5)"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.05}, note="plain SGD: LoWR's argument (eq. 10-11) is about SGD steps"),
)


def _split(settings: dict) -> tuple[dict, int]:
    """(FinetuneConfig changes, LoWR's every) from a protocol's settings."""
    s = dict(settings)
    every = int(s.pop("lowr_every", MAIN_LOWR[2]))
    return s, every


# ------------------------------------------------------------------------------------- effective rank


def _erank_ranks(ctx: Context) -> tuple[int, ...]:
    return ctx.pick(quick=(8, 32), default=(8, 32, 128))


def _erank_criterion(ranks) -> Criterion:
    tests = [Test(f"erank_gain_r{r}", f"r={r}: effective rank of s BA with LoWR minus without (mean over the two "
                  f"hidden-width layers, paired by seed)", "greater", margin=0.0,
                  why="the title's claim is a direction: LoWR uses more of the allocated rank") for r in ranks]
    tests += [Test(f"stable_gain_r{r}", f"r={r}: stable rank of s BA with LoWR minus without (paired)", "greater",
                   margin=0.0, why="a second, variance-weighted notion of utilisation") for r in ranks]
    tests += [Test(f"top_share_drop_r{r}", f"r={r}: share of singular mass in the top r/4 values, LoWR minus without "
                   f"(paired)", "less", margin=0.0, why="less mass concentrated in the leading channels")
              for r in ranks]
    er = tuple(f"erank_gain_r{r}" for r in ranks)
    return Criterion(tests=tuple(tests),
                     rule=Rule(reproduced=er + tuple(f"stable_gain_r{r}" for r in ranks),
                               partially=tuple((n,) for n in er) + ((f"stable_gain_r{ranks[-1]}",),)),
                     note="layers.0 (784 -> 256) and layers.1 (256 -> 256); layers.2 (256 -> 10) has rank <= 10 and "
                          "is reported only")


ERANK_RANKS = (8, 32, 128)


@figure("lowr-effective-rank", paper="LoWR title / sec. 4.2.2",
        claim="LoWR raises the effective rank utilisation of the adapters: higher effective rank (entropy of the "
              "singular values) and stable rank of s BA, less singular mass in the top channels, at every rank",
        criterion=_erank_criterion(ERANK_RANKS), protocols=LOWR_PROTOCOLS)
def effective_rank_figure(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _no_data()) is not None:
        return Measurement(unavailable=why)
    ranks = _erank_ranks(ctx)
    changes, every = _split(protocol.settings)
    lowr = (MAIN_LOWR[0], MAIN_LOWR[1], every)
    keys = [(r, name, s) for r in ranks for name in ("lora", "lowr") for s in ctx.seeds]
    hists = _sweep(ctx, [_config(ctx, s, r, **changes, **({"lowr": lowr} if name == "lowr" else {}))
                         for r, name, s in keys], callbacks=[AdapterSpectrum()])
    sv: dict = {}
    for (r, name, _), h in zip(keys, hists, strict=True):
        sv.setdefault((name, r), []).append(h["ba_sv"])
    sv = {k: np.stack(v) for k, v in sv.items()}  # (seeds, layers, r)
    n_layers = sv["lora", ranks[0]].shape[1]
    hidden = [0, 1]
    metrics = {"effective_rank": lambda v, r: effective_rank(v), "stable_rank": lambda v, r: stable_rank(v),
               "top_share": lambda v, r: top_share(v, max(1, r // 4))}
    vals = {(k, name, r): np.array([[f(sv[name, r][s, i], r) for i in range(n_layers)]
                                    for s in range(len(ctx.seeds))])
            for k, f in metrics.items() for name in ("lora", "lowr") for r in ranks}  # (seeds, layers)
    samples, measured = {}, {"ranks": list(ranks), "lowr": list(lowr), "protocol": protocol.settings, "rank": {}}
    for r in ranks:
        d = {k: vals[k, "lowr", r][:, hidden].mean(1) - vals[k, "lora", r][:, hidden].mean(1) for k in metrics}
        samples[f"erank_gain_r{r}"] = d["effective_rank"]
        samples[f"stable_gain_r{r}"] = d["stable_rank"]
        samples[f"top_share_drop_r{r}"] = d["top_share"]
        measured["rank"][str(r)] = {
            k: {"lora": {f"layers.{i}": _ci(vals[k, "lora", r][:, i]) for i in range(n_layers)},
                "lowr": {f"layers.{i}": _ci(vals[k, "lowr", r][:, i]) for i in range(n_layers)},
                "lowr_minus_lora_hidden_layers": _ci(d[k])} for k in metrics}
    for r in ERANK_RANKS:  # the quick grid lacks the largest rank: its tests get the largest rank run
        for k in ("erank_gain", "stable_gain", "top_share_drop"):
            samples.setdefault(f"{k}_r{r}", samples[f"{k}_r{ranks[-1]}"])
    parts = [f"r={r}: effective rank {vals['effective_rank', 'lora', r][:, hidden].mean():.3g} -> "
             f"{vals['effective_rank', 'lowr', r][:, hidden].mean():.3g} (gain "
             f"{_fmt(measured['rank'][str(r)]['effective_rank']['lowr_minus_lora_hidden_layers'], 2)}), stable rank "
             f"{vals['stable_rank', 'lora', r][:, hidden].mean():.3g} -> {vals['stable_rank', 'lowr', r][:, hidden].mean():.3g}"
             f", top-r/4 share {vals['top_share', 'lora', r][:, hidden].mean():.3f} -> "
             f"{vals['top_share', 'lowr', r][:, hidden].mean():.3f}" for r in ranks]
    summary = (f"LoWR (tau={lowr[0]:g}, alpha={lowr[1]:g}, every {lowr[2]}) vs LoRA, layers.0-1, {len(ctx.seeds)} seeds: "
               + "; ".join(parts) + ".")

    def plot():
        fig, axes = new_figure(3, 1, width=3.8, height=3.3)
        cl = colors(2)
        for ax, k, label in zip(axes[0], metrics, ("effective rank exp H(sigma/sum sigma)", "stable rank",
                                                   "share of sum sigma in the top r/4"), strict=True):
            for off, (name, col) in enumerate((("lora", cl[0]), ("lowr", cl[1]))):
                cis = [_ci(vals[k, name, r][:, hidden].mean(1)) for r in ranks]
                m = np.array([c["mean"] for c in cis])
                ax.errorbar(np.array(ranks) * (1 + 0.06 * (off - 0.5)), m,
                            yerr=[m - [c["ci_low"] for c in cis], [c["ci_high"] for c in cis] - m], marker="o",
                            capsize=3, color=col, label="LoRA" if name == "lora" else "LoRA + LoWR")
            if k != "top_share":
                ax.plot(ranks, ranks, color="grey", ls=":", lw=1, label="r (full use)")
                ax.set_yscale("log", base=2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r")
            ax.set_ylabel(label + " (layers.0-1, 95% CI)", fontsize=7)
            ax.legend(fontsize=6)
        return fig

    config = {"base": _config(ctx, ctx.seeds[0], ranks[0], **changes).as_dict(),
              "varies": {"r": list(ranks), "lowr": [None, list(lowr)], "seed": list(ctx.seeds)},
              "callbacks": ["AdapterSpectrum"]}
    key = {f"erank_gain_r{r}": float(np.mean(samples[f"erank_gain_r{r}"])) for r in ranks}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, plot=plot)


# ----------------------------------------------------------------------------------------------- mechanism


MECH_RANK = 32
MECHANISM = Criterion(
    tests=(
        Test("stable_layers.1", "layers.1: ln(relative change of the output gradient / relative change of the input "
             "between records, probe batch), mean over records (per seed)", "greater", margin=0.0,
             why="sec. 3.3: inputs are more stable than output gradients"),
        Test("stable_layers.2", "layers.2: the same log ratio", "greater", margin=0.0,
             why="sec. 3.3, the last layer"),
        Test("b_share_standard", "B's share of the across-channel variance of ln(||a_i|| ||b_i||), mean over layers, "
             "usual init (A random, B = 0)", "greater", margin=0.5, why="fig. 2: the differences sit in B"),
        Test("b_share_swapped", "the same share with the initialisations swapped (A = 0, B random)", "greater",
             margin=0.5, why="if the mechanism (stable inputs), not the zero-init asymmetry, puts the differences in "
                             "B, they stay in B when B starts random and A at zero"),
    ),
    rule=Rule(reproduced=("stable_layers.1", "stable_layers.2", "b_share_standard", "b_share_swapped"),
              partially=(("stable_layers.1", "stable_layers.2"), ("b_share_standard",))),
    note="layers.0's input is the data itself (frozen, change 0): reported, not tested",
)


@figure("lowr-mechanism", paper="LoWR sec. 3.3",
        claim="layer inputs are more stable than output gradients during fine-tuning, so channel differences sit in "
              "B, also when the initialisations are swapped (A = 0, B random), which separates the mechanism from "
              "the zero-init asymmetry",
        criterion=MECHANISM, protocols=(LOWR_PROTOCOLS[0], LOWR_PROTOCOLS[2]))
def mechanism(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _no_data()) is not None:
        return Measurement(unavailable=why)
    changes, _ = _split(protocol.settings)
    r = ctx.pick(quick=8, default=MECH_RANK)
    keys = [(init, s) for init in ("kaiming", "zero_a") for s in ctx.seeds]
    hists = _sweep(ctx, [_config(ctx, s, r, init=init, record_every=10, **changes) for init, s in keys],
                   callbacks=[ProbeStability()])
    runs: dict = {}
    for (init, _), h in zip(keys, hists, strict=True):
        runs.setdefault(init, []).append(h)
    n_layers = runs["kaiming"][0]["channel_a"].shape[1]
    measured: dict = {"rank": r, "protocol": protocol.settings, "inits": {}}
    samples: dict = {}
    for init, hs in runs.items():
        ratio = np.array([[float(np.mean(np.log(h["grad_change"][:, i] / h["input_change"][:, i])))
                           if i > 0 else math.nan for i in range(n_layers)] for h in hs])
        dx = np.array([h["input_change"].mean(0) for h in hs])
        dg = np.array([h["grad_change"].mean(0) for h in hs])
        share = np.array([[b_share(h["channel_a"][-1][i], h["channel_b"][-1][i]) for i in range(n_layers)]
                          for h in hs])
        measured["inits"][init] = {
            f"layers.{i}": {"input_change_per_record": _ci(dx[:, i]), "grad_change_per_record": _ci(dg[:, i]),
                            "log_grad_over_input_change": _ci(ratio[:, i]), "b_share": _ci(share[:, i])}
            for i in range(n_layers)}
        measured["inits"][init]["b_share_mean_over_layers"] = _ci(share.mean(1))
        if init == "kaiming":
            samples["stable_layers.1"], samples["stable_layers.2"] = ratio[:, 1], ratio[:, 2]
            samples["b_share_standard"] = share.mean(1)
        else:
            samples["b_share_swapped"] = share.mean(1)
    mk = measured["inits"]
    summary = (f"Rank {r}, {len(ctx.seeds)} seeds, change between records 10 steps apart (probe batch): input "
               f"{_fmt(mk['kaiming']['layers.1']['input_change_per_record'], 2)} vs output gradient "
               f"{_fmt(mk['kaiming']['layers.1']['grad_change_per_record'], 2)} (layers.1), "
               f"{_fmt(mk['kaiming']['layers.2']['input_change_per_record'], 2)} vs "
               f"{_fmt(mk['kaiming']['layers.2']['grad_change_per_record'], 2)} (layers.2); B's share of the channel "
               f"differences: usual init {_fmt(mk['kaiming']['b_share_mean_over_layers'], 2)}, swapped init (A = 0) "
               f"{_fmt(mk['zero_a']['b_share_mean_over_layers'], 2)}.")

    def plot():
        fig, axes = new_figure(2, 1, width=4.4, height=3.4)
        cl = colors(4)
        ax = axes[0, 0]
        steps = runs["kaiming"][0]["step"][1:]
        for i, ls in ((1, "-"), (2, "--")):
            for key, col, lab in (("input_change", cl[0], "input X"), ("grad_change", cl[1], "output gradient G")):
                Y = np.array([h[key][:, i] for h in runs["kaiming"]])
                ax.plot(steps, np.exp(np.log(Y).mean(0)), color=col, ls=ls, label=f"{lab}, layers.{i}")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("relative change since the previous record")
        ax.set_title("usual init, probe batch (geo. mean over seeds)", fontsize=8)
        ax.legend(fontsize=6)
        ax = axes[0, 1]
        x = np.arange(n_layers)
        for off, (init, col) in enumerate((("kaiming", cl[2]), ("zero_a", cl[3]))):
            cis = [mk[init][f"layers.{i}"]["b_share"] for i in range(n_layers)]
            m = np.array([c["mean"] for c in cis])
            ax.errorbar(x + (off - 0.5) * 0.2, m, yerr=[m - [c["ci_low"] for c in cis], [c["ci_high"] for c in cis] - m],
                        fmt="o", capsize=3, color=col, label="A random, B = 0" if init == "kaiming" else "A = 0, B random")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(x, [f"layers.{i}" for i in x])
        ax.set_ylabel("B's share of var(log ||a_i|| ||b_i||) (95% CI)")
        ax.legend(fontsize=7)
        return fig

    config = {"base": _config(ctx, ctx.seeds[0], r, record_every=10, **changes).as_dict(),
              "varies": {"init": ["kaiming", "zero_a"], "seed": list(ctx.seeds)}, "callbacks": ["ProbeStability"]}
    key = {"b_share_standard": float(np.mean(samples["b_share_standard"])),
           "b_share_swapped": float(np.mean(samples["b_share_swapped"]))}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, plot=plot)


# -------------------------------------------------------------------------------------------- plug-in inits


PLUGIN_RANK = 8  # <= 10 = min(d_out, d_in) of the last layer, which PiSSA / OLoRA need
PLUGIN_INITS = {"vanilla": "kaiming", "pissa": "pissa", "olora": "olora"}
PLUGIN = Criterion(
    tests=tuple(Test(f"gain_{k}", f"final test accuracy, {k} + LoWR minus {k} (paired by seed)", "greater",
                     margin=0.0, why="tables 2-4: LoWR improves each initialisation as a plug-in")
                for k in PLUGIN_INITS),
    rule=Rule(reproduced=("gain_pissa", "gain_olora"),
              partially=(("gain_pissa",), ("gain_olora",), ("gain_vanilla",))),
    note="vanilla LoRA is table 2's first row; the claim tested is the plug-in on PiSSA and OLoRA",
)


@figure("lowr-plugin-inits", paper="LoWR tables 2-4",
        claim="LoWR as a plug-in improves other initialisations (PiSSA's principal singular init, OLoRA's "
              "orthonormal QR init), each against itself without LoWR",
        criterion=PLUGIN, protocols=LOWR_PROTOCOLS)
def plugin_inits(ctx: Context, protocol: Protocol) -> Measurement:
    if (why := _no_data()) is not None:
        return Measurement(unavailable=why)
    changes, every = _split(protocol.settings)
    lowr = (MAIN_LOWR[0], MAIN_LOWR[1], every)
    keys = [(k, w, s) for k in PLUGIN_INITS for w in (False, True) for s in ctx.seeds]
    cfgs = [_config(ctx, s, PLUGIN_RANK, init=PLUGIN_INITS[k], **changes, **({"lowr": lowr} if w else {}))
            for k, w, s in keys]
    hists = _sweep(ctx, cfgs, on_diverge="return")
    acc: dict = {}
    for (k, w, _), h in zip(keys, hists, strict=True):
        acc.setdefault((k, w), []).append(math.nan if "diverged_step" in h else float(h["test_acc"][-1]))
    acc = {k: np.array(v) for k, v in acc.items()}
    samples = {f"gain_{k}": acc[k, True] - acc[k, False] for k in PLUGIN_INITS}
    measured = {"rank": PLUGIN_RANK, "lowr": list(lowr), "protocol": protocol.settings,
                "test_acc": {k: {"without": _ci(acc[k, False]), "with_lowr": _ci(acc[k, True]),
                                 "gain_points": _ci(100 * samples[f"gain_{k}"])} for k in PLUGIN_INITS}}
    summary = ("Final test accuracy without -> with LoWR (rank 8, all layers, " + f"{len(ctx.seeds)} seeds): "
               + "; ".join(f"{k} {100 * np.nanmean(acc[k, False]):.2f}% -> {100 * np.nanmean(acc[k, True]):.2f}% "
                           f"(gain {_fmt(measured['test_acc'][k]['gain_points'], 2)} points)" for k in PLUGIN_INITS)
               + ".")

    def plot():
        fig, axes = new_figure(1, 1, width=5.0, height=3.6)
        ax = axes[0, 0]
        cl = colors(2)
        for j, k in enumerate(PLUGIN_INITS):
            for off, w in enumerate((False, True)):
                v = 100 * acc[k, w]
                ax.scatter(np.full(v.size, j + (off - 0.5) * 0.3), v, s=10, color=cl[off], alpha=0.6,
                           label=("with LoWR" if w else "without") if j == 0 else None)
                ax.errorbar(j + (off - 0.5) * 0.3, np.nanmean(v), fmt="D", color=cl[off], ms=6)
        ax.set_xticks(range(len(PLUGIN_INITS)), list(PLUGIN_INITS))
        ax.set_ylabel("final test accuracy (%), dots: seeds")
        ax.set_title(f"LoWR tau={lowr[0]:g}, alpha={lowr[1]:g}, every {lowr[2]}; {protocol.name}", fontsize=8)
        ax.legend(fontsize=7)
        return fig

    config = {"base": cfgs[0].as_dict(), "varies": {"init": PLUGIN_INITS, "lowr": [None, list(lowr)],
                                                    "seed": list(ctx.seeds)}}
    key = {f"gain_{k}_points": float(np.nanmean(100 * samples[f"gain_{k}"])) for k in PLUGIN_INITS}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, plot=plot)

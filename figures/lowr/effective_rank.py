"""LoWR title / sec. 4.2.2: "effective rank utilization": the spectrum of s BA at the end of fine-tuning with and
without LoWR (effective rank, stable rank, share of the top channels), at several ranks."""

from __future__ import annotations

import math

import numpy as np
import torch

from figures.criteria import CI_PCT, Criterion, Recalibration, Rule, Test, ci_finite, fmt_ci
from figures.framework import CacheNamed, Measurement, Runs, require_datasets
from figures.lowr.protocol import DATASET, TRAINING_PROTOCOLS, split_settings, unit_scale_config
from figures.style import colors, new_figure
from toymodels import Callback

ID = "lowr-effective-rank"
PAPER = "LoWR title / sec. 4.2.2"
KIND, CLAIM_ID = "claim", ID  # claim: an empirical statement of the paper, judged on measurements
CLAIM = ("LoWR raises the effective rank utilisation of the adapters: higher effective rank (entropy of the "
         "singular values) and stable rank of s BA, at every rank")

RANKS = (8, 32, 128)
HIDDEN = [0, 1]  # layers.0 (784 -> 256) and layers.1 (256 -> 256); layers.2 (256 -> 10) has rank <= 10
CHANNEL = 1.0  # the smallest gain that counts: one more channel in use
CHANNEL_WHY = ("theory: both ranks count channels (1 <= rank <= r), and the claim is that LoWR puts more of the "
               "allocated channels to use ('eliminating insignificant channels without reducing the rank'): a gain "
               "under one channel uses no further channel; the paper prints no rank numbers")


def criterion(ranks) -> Criterion:
    tests = [Test(f"erank_gain_r{r}", f"r={r}: effective rank of s BA with LoWR minus without (mean over the two "
                  f"hidden-width layers, paired by seed)", "greater", margin=CHANNEL, margin_from="theory",
                  why=CHANNEL_WHY) for r in ranks]
    tests += [Test(f"stable_gain_r{r}", f"r={r}: stable rank of s BA with LoWR minus without (paired)", "greater",
                   margin=CHANNEL, margin_from="theory", why="a second, variance-weighted count of the channels in "
                   "use; " + CHANNEL_WHY) for r in ranks]
    er, sr = tuple(f"erank_gain_r{r}" for r in ranks), tuple(f"stable_gain_r{r}" for r in ranks)
    return Criterion(tests=tuple(tests), rule=Rule(reproduced=er + sr, partially=(er, sr)),
                     note="Partially reproduced: one of the two ranks rises by a channel or more at every rank "
                          "(Holm over the 6). layers.0 (784 -> 256) and layers.1 (256 -> 256); layers.2 (256 -> 10) "
                          "has rank <= 10 and is reported only; the share of the singular mass in the top r/4 values "
                          "is reported only.",
                     recalibrations=(Recalibration(
                         old="effective-rank, stable-rank and top-r/4-share changes tested against 0 (no minimum "
                             "effect); partially if the effective rank rises at any one rank or the stable rank at "
                             "the largest",
                         new="effective and stable rank gains > 1 channel (theory) at every rank, Holm over the 6; "
                             "partially if one of the two holds at every rank; the top share reported only; Adam and "
                             "SGD both plausible, learning rate x1/3 and x3 as protocols",
                         why="issue 16: gains of 4% or less counted; a gain under one channel puts no further channel "
                             "to use; a single rank is no evidence for 'at every rank'"),))


CRITERION = criterion(RANKS)
PROTOCOLS = TRAINING_PROTOCOLS


def _sv(sv) -> np.ndarray:
    s = np.asarray(sv, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0 or np.any(s < 0) or not np.any(s > 0):
        raise ValueError("sv must hold nonnegative singular values, not all zero")
    return s


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


METRICS = {"effective_rank": lambda v, r: effective_rank(v), "stable_rank": lambda v, r: stable_rank(v),
           "top_share": lambda v, r: top_share(v, max(1, r // 4))}


class AdapterSpectrum(CacheNamed, Callback):
    """At the end of the run: the singular values of every layer's s B A (``ba_sv``, layers x r, NaN-padded where
    min(d_out, d_in) < r)."""

    version = 1
    cache_name = "figures.lowr_new.AdapterSpectrum"  # its module until issue 15 (keeps the cached runs)

    def reset(self) -> None:
        self._sv: np.ndarray | None = None

    def on_train_end(self, state) -> None:
        r = max(m.r for m in state.layers)
        out = np.full((len(state.layers), r), math.nan)
        with torch.no_grad():
            for i, m in enumerate(state.layers):
                ba = (m.scaling * (m.lora_B @ m.lora_A)).double()
                if not torch.isfinite(ba).all():  # a diverged run: no spectrum (NaN row; the run was never cached)
                    continue
                sv = torch.linalg.svdvals(ba).cpu().numpy()
                out[i, : min(m.r, sv.size)] = sv[: m.r]
        self._sv = out

    def result(self) -> dict:
        return {} if self._sv is None else {"ba_sv": self._sv}


def _ranks(ctx) -> tuple[int, ...]:
    return ctx.pick(quick=(8, 32), default=RANKS)


def configs(ctx) -> dict:
    require_datasets(DATASET)
    changes, lowr = split_settings(ctx.settings)
    return {(r, name): Runs(unit_scale_config(ctx, r, **changes, **({"lowr": lowr} if name == "lowr" else {})),
                            callbacks=(AdapterSpectrum(),))
            for r in _ranks(ctx) for name in ("lora", "lowr")}


def measure(ctx, runs) -> Measurement:
    ranks, (changes, lowr) = _ranks(ctx), split_settings(ctx.settings)
    sv = {(name, r): np.stack([h["ba_sv"] for h in runs[(r, name)]]) for r in ranks for name in ("lora", "lowr")}
    n_layers = sv["lora", ranks[0]].shape[1]
    def metric(f, v, r):  # a diverged run has no spectrum (an all-NaN row): its value is missing
        return f(v, r) if np.isfinite(v).any() else math.nan

    vals = {(k, name, r): np.array([[metric(f, sv[name, r][s, i], r) for i in range(n_layers)]
                                    for s in range(len(ctx.seeds))])
            for k, f in METRICS.items() for name in ("lora", "lowr") for r in ranks}  # (seeds, layers)
    samples, measured = {}, {"ranks": list(ranks), "lowr": list(lowr), "protocol": ctx.settings, "rank": {}}
    for r in ranks:
        d = {k: vals[k, "lowr", r][:, HIDDEN].mean(1) - vals[k, "lora", r][:, HIDDEN].mean(1) for k in METRICS}
        samples[f"erank_gain_r{r}"] = d["effective_rank"]
        samples[f"stable_gain_r{r}"] = d["stable_rank"]
        samples[f"top_share_drop_r{r}"] = d["top_share"]
        measured["rank"][str(r)] = {
            k: {"lora": {f"layers.{i}": ci_finite(vals[k, "lora", r][:, i]) for i in range(n_layers)},
                "lowr": {f"layers.{i}": ci_finite(vals[k, "lowr", r][:, i]) for i in range(n_layers)},
                "lowr_minus_lora_hidden_layers": ci_finite(d[k])} for k in METRICS}
    for r in RANKS:  # the quick grid lacks the largest rank: its tests get the largest rank run
        for k in ("erank_gain", "stable_gain", "top_share_drop"):
            samples.setdefault(f"{k}_r{r}", samples[f"{k}_r{ranks[-1]}"])

    def hid(k, name, r):
        return np.nanmean(vals[k, name, r][:, HIDDEN])  # over the seeds that did not diverge

    parts = [f"r={r}: effective rank {hid('effective_rank', 'lora', r):.3g} -> {hid('effective_rank', 'lowr', r):.3g} "
             f"(gain {fmt_ci(measured['rank'][str(r)]['effective_rank']['lowr_minus_lora_hidden_layers'], '.2g')}), "
             f"stable rank {hid('stable_rank', 'lora', r):.3g} -> {hid('stable_rank', 'lowr', r):.3g}, top-r/4 share "
             f"{hid('top_share', 'lora', r):.3f} -> {hid('top_share', 'lowr', r):.3f}" for r in ranks]
    summary = (f"LoWR (tau={lowr[0]:g}, alpha={lowr[1]:g}, every {lowr[2]}) vs LoRA, layers.0-1, {len(ctx.seeds)} seeds: "
               + "; ".join(parts) + ".")
    config = {"base": unit_scale_config(ctx, ranks[0], **changes).replace(seed=ctx.seeds[0]).as_dict(),
              "varies": {"r": list(ranks), "lowr": [None, list(lowr)], "seed": list(ctx.seeds)},
              "callbacks": ["AdapterSpectrum"]}
    key = {f"erank_gain_r{r}": float(np.mean(samples[f"erank_gain_r{r}"])) for r in ranks}
    numbers = {"ranks": ranks, "ci": {k: {name: [ci_finite(vals[k, name, r][:, HIDDEN].mean(1)) for r in ranks]
                                          for name in ("lora", "lowr")} for k in METRICS}}
    return Measurement(samples=samples, measured=measured, summary=summary, key=key, datasets=[DATASET],
                       config=config, draw=numbers)


def draw(numbers):
    fig, axes = new_figure(3, 1, width=3.8, height=3.3)
    cl, ranks = colors(2), np.asarray(numbers["ranks"])
    for ax, k, label in zip(axes[0], METRICS, ("effective rank exp H(sigma/sum sigma)", "stable rank",
                                               "share of sum sigma in the top r/4"), strict=True):
        for off, (name, col) in enumerate((("lora", cl[0]), ("lowr", cl[1]))):
            cis = numbers["ci"][k][name]
            m = np.array([c["mean"] for c in cis])
            ax.errorbar(ranks * (1 + 0.06 * (off - 0.5)), m,
                        yerr=[m - [c["ci_low"] for c in cis], [c["ci_high"] for c in cis] - m], marker="o",
                        capsize=3, color=col, label="LoRA" if name == "lora" else "LoRA + LoWR")
        if k != "top_share":
            ax.plot(ranks, ranks, color="grey", ls=":", lw=1, label="r (full use)")
            ax.set_yscale("log", base=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(label + f"\n(layers.0-1, {CI_PCT} CI)", fontsize=8)
        ax.legend(fontsize=6)
    return fig

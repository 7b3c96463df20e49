"""Every flag of the diagnosis, declared once as data: name, kind, rule, threshold, one-line explanation.

The report (:func:`diagnose.diagnose_adapter`), its JSON, the table's legend (``lora-theory diagnose --explain``),
``--fail-on`` and :class:`diagnose.AdapterMonitor` / :func:`diagnose.DiagnoseCallback` all read :data:`FLAGS`; a
layer flag's ``test`` is the only code of its rule. Two kinds:

- ``problem``: something is likely wrong with the adapter or with how it is used (a dead layer, a lost module, an
  update larger than the frozen weight, the wrong base model); what CI would fail on (``--fail-on problems``);
- ``note``: a fact worth knowing that is not a fault (DoRA present, patterns in force, a scale below 1/4).

A layer flag tests the per-layer facts of :func:`layer_facts`; one whose fact is unknown (``None``: no base model,
no calibration batch, the test abstained) is not raised. An adapter flag (``scope="adapter"``) is raised by the
report's own checks (missing modules, base fingerprint, merged model, init, unsupported layers, patterns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FLAGS", "Flag", "default_thresholds", "layer_facts", "raised_layer_flags", "legend", "resolve_fail_on"]


@dataclass(frozen=True)
class Flag:
    """One flag. ``rule`` is the condition in words with ``{t}`` standing for the threshold (if any)."""

    name: str
    kind: str  # "problem" | "note"
    scope: str  # "layer" | "adapter"
    rule: str
    explanation: str
    threshold: float | None = None
    needs: str = "adapter"  # what must be given for the flag to be tested: "adapter", "base", "calibration"
    test: Callable[[dict, float | None], bool | None] | None = None  # layer flags: facts, threshold -> raised

    def rule_text(self, threshold: float | None = None) -> str:
        t = self.threshold if threshold is None else threshold
        return self.rule.format(t=f"{t:g}" if isinstance(t, int | float) else t)

    def describe(self, threshold: float | None = None) -> str:
        """'rule: explanation' with the threshold in force, one line."""
        return f"{self.rule_text(threshold)}: {self.explanation}"


def _known(*values) -> bool:
    return all(v is not None for v in values)


FLAGS: tuple[Flag, ...] = (
    # ---- problems
    Flag("dead_adapter", "problem", "layer", "B == 0 or RMS entry of s*B@A < {t}",
         "the layer's update is (numerically) zero: never trained, B stuck at its zero init, or lost in saving",
         threshold=1e-6, test=lambda f, t: f["b_exactly_zero"] or f["rms_update"] < t),
    Flag("update_dominates", "problem", "layer", "m = ||s*B@A||_2 / ||W||_2 >= {t}",
         "the update outweighs the frozen weight (ALLoRA sec. 3.3: the ripple bound's factor 1 + m >= 2 per layer)",
         threshold=1.0, needs="base", test=lambda f, t: None if f["m"] is None else f["m"] >= t),
    Flag("scale_large", "problem", "layer", "scaling > {t}",
         "the scale, not the learned weights, sets the update's size (each adapted layer multiplies the ripple bound "
         "by 1 + s||BA||/||W||, ALLoRA sec. 3.3)", threshold=8.0, test=lambda f, t: abs(f["scaling"]) > t),
    Flag("missing_modules", "problem", "adapter", "a module the adapter targets has neither lora_A nor lora_B saved",
         "the saved adapter is incomplete (a lost shard or a filtered state dict); PEFT would warn 'missing adapter "
         "keys' and run those modules unadapted"),
    Flag("base_mismatch", "problem", "adapter",
         "the base given differs from the adapter config's base_model_name_or_path or its weight fingerprint",
         "the quantities that use W (m, ripple, intruders, calibration) may be computed against the wrong model",
         needs="base"),
    Flag("adapter_not_applied", "problem", "adapter",
         "relative change of the model's output on the calibration batch < {t}",
         "the adapter loads but does not change the outputs: it is not applied in the forward pass",
         threshold=1e-6, needs="calibration"),
    # ---- notes
    Flag("scale_small", "note", "layer", "scaling < {t}",
         "the update s*B@A is shrunk; with Adam (steps ~ lr whatever the gradient) it learns 1/s times slower than "
         "at s = 1 (PEFT's default alpha = r gives 1)", threshold=0.25, test=lambda f, t: abs(f["scaling"]) < t),
    Flag("rank_exceeds_dims", "note", "layer", "r > min(d_in, d_out)",
         "B@A has rank <= min(d_in, d_out): r - min(d_in, d_out) channels are redundant",
         test=lambda f, t: f["r"] > min(f["d_in"], f["d_out"])),
    Flag("dora", "note", "layer", "a DoRA magnitude vector is saved",
         "the effective update is m*(W + s*B@A)/||W + s*B@A||_row - W; the norms reported are those of s*B@A",
         test=lambda f, t: f["dora"]),
    Flag("intruder_dimensions", "note", "layer",
         "a top-k singular direction of W + s*B@A has |cos| < {t} with every singular direction of W",
         "new directions, not in W (the 'intruder dimensions' of LoRA vs full fine-tuning, Shuttleworth et al. "
         "2024); counted only where W's spectrum is not flat", threshold=0.5, needs="base",
         test=lambda f, t: None if f["intruder_count"] is None else f["intruder_count"] > 0 and not f["dead"]),
    Flag("intruder_abstained", "note", "layer",
         "a top-k direction of W + s*B@A has >= 1/eps^2 singular values of W within ||s*B@A||_2 of its own and "
         "less than 1 - eps^2 of its energy in span(B)",
         "W's spectrum is flat there: a rotation of W's own directions would look new, so the intruder test gives "
         "no verdict for those directions", needs="base",
         test=lambda f, t: None if f["intruder_abstained"] is None else f["intruder_abstained"] > 0),
    Flag("dropout_below_noise", "note", "layer", "n* > {t} dropout realisations (steps)",
         "on this batch the dropout penalty is smaller than the Monte-Carlo noise Std/sqrt(n) until n* steps "
         "(ALLoRA app. A): lora_dropout acts as noise more than as a penalty", threshold=100, needs="calibration",
         test=lambda f, t: None if f["steps_to_resolve"] is None else f["steps_to_resolve"] > t),
    Flag("only_b_learned", "note", "layer",
         "every entry of A within PEFT's init bound 1/sqrt(d_in) and ||A||_F^2 within 5 sd of its init mean r/3",
         "A looks as initialised (Kaiming uniform): only B learned (LoRA-FA by design, or A frozen by mistake)",
         test=lambda f, t: f["a_at_init"] and not f["b_exactly_zero"]),
    Flag("merge_loses_update", "note", "layer", "predicted bf16 rounding error of W + s*B@A > {t} of ||s*B@A||",
         "merging into a bfloat16 base keeps the update only roughly; merge in float32 or keep the adapter apart",
         threshold=0.1, needs="base", test=lambda f, t: None if f["merge_bf16"] is None else f["merge_bf16"] > t),
    Flag("unsupported_layer", "note", "adapter", "LoRA weights of a layer that is not a linear map",
         "embedding, convolution or parameter LoRA: named in 'unsupported', not analysed"),
    Flag("patterns_in_force", "note", "adapter", "rank_pattern or alpha_pattern is set",
         "some layers have their own r or alpha (the table's r and s columns show each layer's own)"),
    Flag("merged_model", "note", "adapter", "the PeftModel's LoRA layers are merged into the base weights",
         "the base weight was recovered as W_merged - s*B@A (PEFT's unmerge) for the analysis"),
    Flag("init_changes_base", "note", "adapter",
         "init_lora_weights is pissa / olora / loftq / eva / corda and no converted adapter was saved",
         "these inits subtract the initial adapter from W; the saved adapter's base is not the given W, so the "
         "quantities that use W are withheld (they need the initial adapter, or save_pretrained with "
         "path_initial_model_for_weight_conversion)", needs="base"),
    Flag("rslora_engine_factor", "note", "adapter", "use_rslora is set",
         "an engine that ignores use_rslora scales by alpha/r instead of alpha/sqrt(r): sqrt(r) times too weak; "
         "lora-theory diagnose --bake writes an adapter with the scale folded into B"),
)

_BY_NAME = {f.name: f for f in FLAGS}
assert len(_BY_NAME) == len(FLAGS), "flag names must be unique"


def flag(name: str) -> Flag:
    return _BY_NAME[name]


def default_thresholds() -> dict[str, float]:
    """{flag name: default threshold} for every flag that has one."""
    return {f.name: f.threshold for f in FLAGS if f.threshold is not None}


def layer_facts(*, b_exactly_zero: bool, norm_update: float, scaling: float, r: int, d_in: int, d_out: int,
                dora: bool = False, m: float | None = None, intruder_count: int | None = None,
                intruder_abstained: int | None = None, steps_to_resolve: int | None = None,
                a_at_init: bool | None = None, merge_bf16: float | None = None) -> dict:
    """The facts the layer flags test (``None`` = unknown: not tested)."""
    rms = norm_update / math.sqrt(d_in * d_out)
    return {"b_exactly_zero": bool(b_exactly_zero), "rms_update": rms, "scaling": float(scaling), "r": int(r),
            "d_in": int(d_in), "d_out": int(d_out), "dora": bool(dora), "m": m, "intruder_count": intruder_count,
            "intruder_abstained": intruder_abstained, "steps_to_resolve": steps_to_resolve, "a_at_init": a_at_init,
            "merge_bf16": merge_bf16}


def raised_layer_flags(facts: dict, thresholds: dict[str, float] | None = None) -> list[str]:
    """Names of the layer flags raised by ``facts``, in :data:`FLAGS` order (problems first)."""
    th = {**default_thresholds(), **(thresholds or {})}
    facts = {**facts, "dead": facts["b_exactly_zero"] or facts["rms_update"] < th["dead_adapter"]}
    out = []
    for f in FLAGS:
        if f.scope == "layer" and f.test(facts, th.get(f.name)):
            out.append(f.name)
    return out


def resolve_fail_on(spec: str) -> set[str]:
    """``--fail-on`` value -> flag names: comma-separated names, ``problems``, ``notes`` or ``any``.

    Raises ``ValueError`` naming the unknown entry.
    """
    names: set[str] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in ("problems", "notes"):
            names |= {f.name for f in FLAGS if f.kind + "s" == item}
        elif item == "any":
            names |= set(_BY_NAME)
        elif item in _BY_NAME:
            names.add(item)
        else:
            raise ValueError(f"unknown flag {item!r}; use problems, notes, any or one of {', '.join(_BY_NAME)}")
    if not names:
        raise ValueError("empty flag list; use problems, notes, any or flag names separated by commas")
    return names


def legend(thresholds: dict[str, float] | None = None) -> list[str]:
    """One line per flag, problems first: 'name (kind): rule: explanation', thresholds in force."""
    th = {**default_thresholds(), **(thresholds or {})}
    return [f"{f.name} ({f.kind}): {f.describe(th.get(f.name))}" for f in FLAGS]

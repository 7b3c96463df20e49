"""The terminal table, its legend and the PNG of a :class:`diagnose.report.Report`.

The default table fits ``width`` columns (100): layer, r, s, ||sBA||, m and the layer's problems; ``wide`` adds
every column (norms, ranks, the papers' quantities, calibration). :func:`legend` explains every column and every
flag (``lora-theory diagnose --explain``); the flags' text comes from :mod:`diagnose.flags`.
"""

from __future__ import annotations

import re
from pathlib import Path

from diagnose.flags import legend as flag_legend

__all__ = ["table", "plot", "short_name", "legend", "COLUMNS"]

#: Every column of the table: (header, meaning). The narrow table shows the first five and the problems.
COLUMNS = (
    ("layer", "module path without PEFT's base_model.model. and the model's own model./transformer. prefix"),
    ("r", "the layer's rank (rank_pattern applied)"),
    ("s", "the layer's scaling: lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora (alpha_pattern applied)"),
    ("||sBA||", "Frobenius norm of the update s*B@A"),
    ("m", "||s*B@A||_2 / ||W||_2: the update against the frozen weight (ALLoRA sec. 3.3); needs --base"),
    ("||A||", "Frobenius norm of lora_A (r, d_in)"),
    ("||B||", "Frobenius norm of lora_B (d_out, r)"),
    ("st.rank", "stable rank ||sBA||_F^2 / ||sBA||_2^2 of the update"),
    ("eff.rank", "effective rank exp(entropy of the normalised singular values) of the update"),
    ("s*sqrt(r)", "rsLoRA's gamma_r*sqrt(r) (= alpha under rsLoRA): the constant Thm. 3.2 keeps Theta(1)"),
    ("regime", "rsLoRA Thm. 3.2 regime from (d_in + 1 - 1.2)/r: large_rank (<= 0.1, the theorem applies), "
               "small_rank (>= 10, most fine-tuning: moments go like r^-1 even under rsLoRA), intermediate"),
    ("ALLoRA f", "smallest ALLoRA factor 1/sqrt(||row of sBA|| + 1/eta^2) over the rows (eta at start)"),
    ("LoWR cv", "coefficient of variation of LoWR's channel significances ||a_i|| ||b_i||"),
    ("intr", "intruder dimensions among the top-k directions of W + sBA (abstained ones not counted); --base"),
    ("p", "lora_dropout (probability of zeroing)"),
    ("penalty", "exact expected dropout penalty on the calibration batch (ALLoRA sec. 3.1)"),
    ("Std", "its exact standard deviation over dropout masks"),
    ("n*", "fewest steps for which Std/sqrt(n) falls below the penalty (ALLoRA app. A)"),
    ("problems", "the layer's problem flags (see below); notes are listed under the table"),
)
_HELP = dict(COLUMNS)


def short_name(name: str) -> str:
    """Drop PEFT's ``base_model.model.`` and the model's own ``model.`` / ``transformer.`` prefixes for display."""
    for prefix in ("base_model.model.", "model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _cells(lay, wide: bool, has_base: bool, has_cal: bool) -> dict:
    q = lay.quantities
    base = lay.base or {}
    c = {"layer": short_name(lay.name), "r": str(lay.r), "s": _fmt(lay.scaling), "||sBA||": _fmt(q["norm_BA"]),
         "m": _fmt(base.get("m")) if has_base else None}
    if wide:
        c.update({"||A||": _fmt(q["norm_A"]), "||B||": _fmt(q["norm_B"]), "st.rank": _fmt(q["stable_rank"]),
                  "eff.rank": _fmt(q["effective_rank"]), "s*sqrt(r)": _fmt(q["rslora"]["gamma_sqrt_r"]),
                  "regime": q["rslora"]["regime"], "ALLoRA f": _fmt(q["allora"]["factor_summary"]["min"]),
                  "LoWR cv": _fmt(q["lowr"]["coefficient_of_variation"])})
        if has_base:
            c["intr"] = str(base["intruder"]["count"]) if base else "-"
        if has_cal:
            cal = lay.calibration or {}
            c.update({"p": _fmt(cal.get("p")), "penalty": _fmt(cal.get("penalty")), "Std": _fmt(cal.get("std")),
                      "n*": _fmt(cal.get("steps_to_resolve"))})
    c["problems"] = ",".join(lay.problems) or "-"
    return {k: v for k, v in c.items() if v is not None}


def _clip_left(text: str, n: int) -> str:
    return text if len(text) <= n else "~" + text[len(text) - n + 1:]


def table(report, *, wide: bool = False, width: int = 100) -> str:
    """The per-layer table (narrow: fits ``width`` columns; ``wide``: every column), then one line per problem and
    note raised (with its rule), the patterns in force, unsupported layers and ripple stacks."""
    has_base = any(lay.base is not None for lay in report.layers)
    has_cal = any(lay.calibration is not None for lay in report.layers)
    rows = [_cells(lay, wide, has_base, has_cal) for lay in report.layers]
    head = list(rows[0]) if rows else ["layer", "r", "s", "||sBA||", "problems"]
    widths = {h: max([len(h)] + [len(r[h]) for r in rows]) for h in head}
    if not wide:  # fit the width: shorten the layer names from the left, then the problems text
        other = sum(widths[h] + 2 for h in head if h not in ("layer", "problems"))
        widths["layer"] = max(12, min(widths["layer"], width - other - max(8, min(widths["problems"], 30)) - 2))
        widths["problems"] = max(8, width - other - widths["layer"] - 2)
    lines = [f"adapter: {report.source}"]
    lines.append("  ".join(h.ljust(widths[h]) for h in head).rstrip())
    for r in rows:
        cells = [_clip_left(r[h], widths[h]) if h == "layer" else r[h][: widths[h]] for h in head]
        lines.append("  ".join(c.ljust(widths[h]) for c, h in zip(cells, head, strict=True)).rstrip())
    return "\n".join(lines + [""] + _footer(report, width if not wide else None))


def _wrap(text: str, width: int | None, indent: str = "    ") -> list[str]:
    if width is None or len(text) <= width:
        return [text]
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent=indent)


def _footer(report, width: int | None) -> list[str]:
    lines = []
    for kind in ("problem", "note"):
        for name, info in report.flag_details.items():
            if info["kind"] != kind:
                continue
            where = f" ({len(info['layers'])} layers)" if info["layers"] else ""
            lines += _wrap(f"{kind} {name}{where}: {info['rule']}: {info['explanation']}", width)
            if info["layers"] and name in ("missing_modules", "unsupported_layer", "base_mismatch"):
                shown = ", ".join(short_name(n) for n in info["layers"][:6])
                lines += _wrap(f"    {shown}{' ...' if len(info['layers']) > 6 else ''}", width)
    if report.settings.get("rank_pattern") or report.settings.get("alpha_pattern"):
        lines += _wrap(f"patterns in force: rank_pattern {report.settings['rank_pattern']}, alpha_pattern "
                       f"{report.settings['alpha_pattern']} (r and s above are each layer's own)", width)
    for u in report.unsupported:
        lines += _wrap(f"unsupported {u['kind']}: {short_name(u['name'])}: {u['reason']}", width)
    for st in report.stacks or []:
        lines += _wrap(f"ripple {short_name(st['stack'])} (L={st['depth']}): prod(1+m_l) = "
                       f"{st['ripple_product']:.4g}, (1+m_bar)^L = {st['ripple_amgm']:.4g}", width)
    if report.other_tensors:
        lines.append(f"other saved tensors (not LoRA A/B): {len(report.other_tensors)}, e.g. {report.other_tensors[0]}")
    for msg in report.messages:
        lines += _wrap(msg, width)
    if not report.flags:
        lines.append("no problem and no note raised")
    return lines


def legend(thresholds: dict | None = None) -> str:
    """Every column and every flag explained (``lora-theory diagnose --explain``)."""
    lines = ["Columns (the narrow default shows layer, r, s, ||sBA||, m and problems; --wide shows all):"]
    lines += [f"  {h:<10} {text}" for h, text in COLUMNS]
    lines += ["", "Flags (problem: likely a fault, what --fail-on problems fails on; note: worth knowing):"]
    lines += [f"  {line}" for line in flag_legend(thresholds)]
    return "\n".join(lines)


_ROLE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "c_attn", "attn.c_proj",
               "out_proj", "dense", "gate_proj", "up_proj", "gate_up_proj", "down_proj", "fc1", "fc2", "c_fc",
               "mlp.c_proj", "w1", "w3", "w2")


def _role_rank(role: str) -> tuple:
    for i, key in enumerate(_ROLE_ORDER):
        if role.endswith(key):
            return (i, role)
    return (len(_ROLE_ORDER), role)


def plot(report, path) -> Path:
    """A layer x module heatmap in forward order: log10 ||sBA|| and m (with a base; else ALLoRA's min factor);
    cells of layers with a problem are marked. Layers without a numeric index form one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {}
    for lay in report.layers:
        name = short_name(lay.name)
        m = re.match(r"^(.*?)(\d+)\.(.+)$", name)
        depth, role = (int(m[2]), m[3]) if m else (name, "(layer)")
        cells[(depth, role)] = lay
    depths = sorted({d for d, _ in cells}, key=lambda d: (isinstance(d, str), d))
    roles = sorted({r for _, r in cells}, key=_role_rank)
    has_base = any(lay.base is not None for lay in report.layers)
    panels = [("log10 ||s B A||_F", lambda lay: np.log10(max(lay.norm_BA, 1e-30)))]
    if has_base:
        panels.append(("m = ||sBA||_2 / ||W||_2", lambda lay: lay.base["m"] if lay.base and lay.base["m"] is not None
                       else np.nan))
    else:
        panels.append((f"ALLoRA min factor (eta={report.settings['eta']:g})",
                       lambda lay: lay.quantities["allora"]["factor_summary"]["min"]))
    h = min(14.0, 2.0 + 0.22 * len(depths))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 + 1.1 * len(roles) * len(panels), h),
                             layout="constrained", squeeze=False)
    for ax, (title, value) in zip(axes[0], panels, strict=True):
        grid = np.full((len(depths), len(roles)), np.nan)
        for (d, r), lay in cells.items():
            grid[depths.index(d), roles.index(r)] = value(lay)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        for (d, r), lay in cells.items():
            if lay.problems:
                ax.text(roles.index(r), depths.index(d), "x", ha="center", va="center", color="crimson", fontsize=9)
        ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=8)
        step = max(1, len(depths) // 24)
        ax.set_yticks(range(0, len(depths), step), [str(d) for d in depths[::step]], fontsize=8)
        ax.set_ylabel("layer (forward order)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"lora-theory diagnose: {Path(report.source).name if report.source else ''} "
                 f"(x: a problem flag)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

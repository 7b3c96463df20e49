"""Terminal table (rich when installed, else plain text) and the PNG of a :class:`diagnose.report.Report`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["table", "plot", "short_name"]


def short_name(name: str) -> str:
    """Drop PEFT's ``base_model.model.`` and the model's own ``model.`` / ``transformer.`` prefixes for display."""
    for prefix in ("base_model.model.", "model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _rows(report) -> tuple[list[str], list[list[str]]]:
    head = ["layer", "r", "scaling", "s*sqrt(r)", "regime", "||A||", "||B||", "||sBA||", "st.rank", "eff.rank",
            "ALLoRA min f", "LoWR cv"]
    has_base = any(lay.base is not None for lay in report.layers)
    has_cal = any(lay.calibration is not None and "penalty" in lay.calibration for lay in report.layers)
    if has_base:
        head += ["m", "intruders"]
    if has_cal:
        head += ["p", "penalty", "Std", "n*"]
    head.append("flags")
    rows = []
    for lay in report.layers:
        q = lay.quantities
        row = [short_name(lay.name), str(lay.r), _fmt(lay.scaling), _fmt(q["rslora"]["gamma_sqrt_r"]),
               q["rslora"]["regime"], _fmt(q["norm_A"]), _fmt(q["norm_B"]), _fmt(q["norm_BA"]),
               _fmt(q["stable_rank"]), _fmt(q["effective_rank"]), _fmt(q["allora"]["factor_summary"]["min"]),
               _fmt(q["lowr"]["coefficient_of_variation"])]
        if has_base:
            row += [_fmt(lay.base["m"]), str(lay.base["intruder"]["count"])] if lay.base else ["-", "-"]
        if has_cal:
            cal = lay.calibration or {}
            row += [_fmt(cal.get("p")), _fmt(cal.get("penalty")), _fmt(cal.get("std")),
                    _fmt(cal.get("steps_to_resolve"))]
        row.append(",".join(lay.flags) or "-")
        rows.append(row)
    return head, rows


def _footer(report) -> list[str]:
    lines = []
    for flag, info in report.flag_details.items():
        lines.append(f"{flag} ({len(info['layers'])}): {info['explanation']}")
    for u in report.unsupported:
        lines.append(f"unsupported {u['kind']}: {u['name']}: {u['reason']}")
    for st in report.stacks or []:
        lines.append(f"ripple {short_name(st['stack'])} (L={st['depth']}): prod(1+m_l) = {st['ripple_product']:.4g}, "
                     f"(1+m_bar)^L = {st['ripple_amgm']:.4g}")
    if report.other_tensors:
        lines.append(f"other saved tensors (not LoRA A/B): {len(report.other_tensors)}, e.g. {report.other_tensors[0]}")
    lines += report.notes
    return lines


def table(report) -> str:
    """The per-layer table plus one line per flag (with its rule), unsupported layer and ripple stack."""
    head, rows = _rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join([f"adapter: {report.source}", *lines, "", *_footer(report)])
    import io

    tab = Table(title=f"adapter: {report.source}")
    for h in head:
        tab.add_column(h, no_wrap=True)
    for r in rows:
        tab.add_row(*r)
    buf = io.StringIO()
    need = sum(max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head))
    console = Console(file=buf, width=max(120, need + 3 * len(head) + 1), force_jupyter=False,  # to the buffer
                      color_system=None)  # wide enough never to truncate
    console.print(tab)
    for line in _footer(report):
        console.print(line, markup=False)
    return buf.getvalue()


def plot(report, path) -> Path:
    """Per-layer bars: scaling and s*sqrt(r); ||A||, ||B||, ||sBA||; effective and stable rank vs r; m or flags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = report.layers
    names = [short_name(lay.name) for lay in layers]
    x = np.arange(len(layers))
    fig, axes = plt.subplots(4, 1, figsize=(max(6.0, 0.5 * len(layers) + 3), 11), sharex=True)
    w = 0.38
    axes[0].bar(x - w / 2, [lay.scaling for lay in layers], w, label="scaling s")
    axes[0].bar(x + w / 2, [lay.quantities["rslora"]["gamma_sqrt_r"] for lay in layers], w, label="s sqrt(r) (rsLoRA)")
    axes[0].set_ylabel("scale")
    axes[0].legend(fontsize=8)
    w3 = 0.27
    for k, (key, label) in enumerate((("norm_A", "||A||"), ("norm_B", "||B||"), ("norm_BA", "||s BA||"))):
        vals = [max(lay.quantities[key], 1e-30) for lay in layers]
        axes[1].bar(x + (k - 1) * w3, vals, w3, label=label)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("Frobenius norm")
    axes[1].legend(fontsize=8)
    axes[2].bar(x - w / 2, [lay.quantities["effective_rank"] for lay in layers], w, label="effective rank")
    axes[2].bar(x + w / 2, [lay.quantities["stable_rank"] for lay in layers], w, label="stable rank")
    axes[2].plot(x, [lay.r for lay in layers], "k_", markersize=14, label="r")
    axes[2].set_ylabel("rank of s BA")
    axes[2].legend(fontsize=8)
    if any(lay.base is not None for lay in layers):
        axes[3].bar(x, [lay.base["m"] if lay.base else 0.0 for lay in layers])
        axes[3].set_ylabel("m = ||sBA||/||W||")
    else:
        axes[3].bar(x, [lay.quantities["allora"]["factor_summary"]["min"] for lay in layers])
        axes[3].set_ylabel(f"ALLoRA min factor (eta={report.settings['eta']:g})")
    for i, lay in enumerate(layers):
        if lay.flags:
            axes[3].annotate(",".join(lay.flags), (i, 0), xytext=(0, 3), textcoords="offset points", rotation=90,
                             fontsize=7, ha="center", va="bottom", color="crimson")
    axes[3].set_xticks(x)
    axes[3].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"lora-theory diagnose: {Path(report.source).name if report.source else ''}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The one plot style of the figures: seaborn's white grid with the colour-blind palette, constrained layout
(labels and the title get the room they need), and a title that names the paper's figure, the figure id, the
headline verdict and the protocol it was measured under. ``draw`` functions use :func:`new_figure` and
:func:`colors`; :func:`save_png` (called by the framework) adds the title and writes the file."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a screen

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"
DPI = 110
LEGEND_SIZE = 6.5  # legends inside small panels
TITLE_SIZE = 8.5  # panel titles


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.4, **kwargs):
    """A figure with ``nrows x ncols`` axes (always a 2-D array), ``width x height`` inches per panel, in the
    shared style and with constrained layout."""
    sns.set_theme(style="whitegrid", palette=PALETTE, context="paper")
    kwargs.setdefault("layout", "constrained")
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)
    return fig, axes


def colors(n: int) -> list:
    """``n`` colours of the shared (colour-blind) palette."""
    return sns.color_palette(PALETTE, n)


def title(paper: str, fig_id: str, verdict: str | None = None, protocol: str | None = None) -> str:
    """The figure's title: ``<paper>: <id>`` and, when known, the headline verdict and its protocol."""
    text = f"{paper}: {fig_id}"
    if verdict:
        text += f"\n{verdict}" + (f" at protocol '{protocol}'" if protocol else "")
    return text


def save_png(fig, path: Path, heading: str) -> None:
    """Add ``heading`` as the figure's title, write ``path`` atomically (a temporary file, then a rename) and
    close the figure."""
    fig.suptitle(heading, fontsize=9)
    if fig.get_layout_engine() is None:  # a figure made without new_figure
        fig.set_layout_engine("constrained")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    plt.close(fig)

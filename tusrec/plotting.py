"""Figure conventions shared by ``./evaluate show`` and the ranking report: titles and the
red SYNTHETIC DATA label that every figure made from simulated scans carries."""

from __future__ import annotations

import textwrap

from matplotlib.figure import Figure, SubFigure

SYNTHETIC_LABEL = "SYNTHETIC DATA"


def synthetic_label(fig: Figure | SubFigure, x: float, y: float) -> None:
    """The red label, its top-left corner at (x, y) in figure fractions."""
    fig.text(
        x,
        y,
        SYNTHETIC_LABEL,
        color="white",
        fontsize=12,
        fontweight="bold",
        ha="left",
        va="top",
        bbox={"facecolor": "#c00000", "edgecolor": "none", "boxstyle": "square,pad=0.2"},
    )


def stamp(fig: Figure, title: str, synthetic: bool) -> None:
    """Figure title (wrapped to the figure's width), with the SYNTHETIC DATA label on a
    line of its own above it when synthetic."""
    width = fig.get_size_inches()[0]
    text = textwrap.fill(title, max(30, int(width * 8.5)))
    if synthetic:
        text = "\n" + text  # the empty first line is where the label goes
    sup = fig.suptitle(text, fontsize=13, fontweight="bold", x=0.01, ha="left", va="top", linespacing=2.0)
    if synthetic:
        synthetic_label(fig, 0.01, sup.get_position()[1])

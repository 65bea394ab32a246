"""Figure conventions shared by ``./evaluate show`` and the ranking report: titles and the
red SYNTHETIC DATA label that every figure made from simulated scans carries."""

from __future__ import annotations

import textwrap
from functools import cache

from matplotlib.figure import Figure, SubFigure
from matplotlib.layout_engine import ConstrainedLayoutEngine

SYNTHETIC_LABEL = "SYNTHETIC DATA"
LABEL_POINTS = 12  # the label's font size
TITLE_POINTS = 13
_PAD = 0.2  # the label's box padding, in font sizes


def synthetic_label(fig: Figure | SubFigure, x: float, y: float):
    """The red label, its top-left corner at (x, y) in figure fractions; returns the Text."""
    return fig.text(
        x,
        y,
        SYNTHETIC_LABEL,
        color="white",
        fontsize=LABEL_POINTS,
        fontweight="bold",
        ha="left",
        va="top",
        bbox={"facecolor": "#c00000", "edgecolor": "none", "boxstyle": f"square,pad={_PAD}"},
    )


@cache
def label_width_inches() -> float:
    """The label's width with its box (inches): the title starts to its right."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    width, _, _ = RendererAgg(10, 10, 72).get_text_width_height_descent(
        SYNTHETIC_LABEL, FontProperties(size=LABEL_POINTS, weight="bold"), ismath=False
    )
    return (width + 2 * _PAD * LABEL_POINTS) / 72  # points at 72 dpi


def _layout(width_inches: float, synthetic: bool) -> tuple[float, float, int]:
    """(title x, label x, characters a title line) for a figure this wide: the title begins
    right of the label, so the two never overlap."""
    left = 0.1 + (label_width_inches() + 0.15 if synthetic else 0.0)
    chars = max(30, int((width_inches - left) * 8.5))  # about 8.5 bold 13 pt characters an inch
    return left / width_inches, 0.1 / width_inches, chars


def title_line(sub: Figure | SubFigure, title: str, synthetic: bool, y: float) -> None:
    """``stamp`` for a subfigure (constrained layout keeps no room for a subfigure's
    suptitle): the title's top at y (subfigure fraction), the label before it."""
    x, label_x, chars = _layout(sub.figure.get_size_inches()[0], synthetic)
    sub.text(x, y, textwrap.fill(title, chars), fontsize=TITLE_POINTS, fontweight="bold", ha="left", va="top")
    if synthetic:
        synthetic_label(sub, label_x, y)


def stamp(fig: Figure, title: str, synthetic: bool) -> None:
    """Figure title (wrapped to the figure's width) with the SYNTHETIC DATA label before it
    on its first line, when synthetic. The title is the suptitle (constrained layout keeps
    room for it); the label is placed at its top, left of the title's start."""
    x, label_x, chars = _layout(fig.get_size_inches()[0], synthetic)
    sup = fig.suptitle(
        textwrap.fill(title, chars), fontsize=TITLE_POINTS, fontweight="bold", x=x, ha="left", va="top"
    )
    if synthetic:
        # Constrained layout keeps room for the suptitle only when its y is left to it, and
        # then moves it up to one h_pad below the top: the label goes where it will be.
        engine = fig.get_layout_engine()
        if isinstance(engine, ConstrainedLayoutEngine):
            y = 1 - engine.get()["h_pad"] / fig.get_size_inches()[1]
        else:
            y = sup.get_position()[1]
        synthetic_label(fig, label_x, y)

"""The figures of the ranking report (matplotlib, no pyplot: each function returns a
``matplotlib.figure.Figure`` the caller saves; nothing global is touched).

Teams are always drawn in the order of the ranking (best first) and in the same colour in
every figure. With ``synthetic`` every figure says SYNTHETIC DATA in red.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from tusrec.plotting import stamp
from tusrec.ranking.rank import ERRORS, Ranking
from tusrec.ranking.stats import FACTOR_LABELS, LEVEL_LABELS, Bootstrap, Pairwise

_halo = [withStroke(linewidth=4, foreground="white")]  # keeps a line visible over a dense cloud

SCORE_LABELS = {
    "FS": "final score FS",
    "GS": "global score GS",
    "LS": "local score LS",
    "PS": "pixel score PS",
    "LMS": "landmark score LMS",
}
ERROR_LABELS = {
    "GPE": "GPE (mm)",
    "GLE": "GLE (mm)",
    "LPE": "LPE (mm)",
    "LLE": "LLE (mm)",
}


def team_colours(n: int) -> list:
    """n distinct colours (tab10 up to 10 teams, tab20 up to 20, then a cycle of hues)."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        # tab20 pairs a dark and a light shade; take the dark ones first so neighbours differ
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [colormaps["tab20"](order[i]) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def _names(teams: list[str], ranking: Ranking) -> list[str]:
    return [teams[t] for t in ranking.order]


def _wrap(name: str, width: int = 16) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# --------------------------------------------------------------------------- stability


def blob_plot(boots: dict[str, Bootstrap], ranking: Ranking, title: str, synthetic: bool = False) -> Figure:
    """Bubble area = how often a team takes each rank over the resamples; black cross =
    median rank; black bar = 2.5-97.5 % rank interval; one panel per bootstrap level."""
    order = ranking.order
    t = len(order)
    colours = team_colours(t)
    cell = max(0.45, min(0.8, 9.0 / t))  # inches per team on both axes
    width = max(5.0, cell * t + 1.6)
    # one panel as wide as the legend below it needs (five entries, each a cell wide)
    fig = Figure(
        figsize=(max(len(boots) * width, 5 * cell + 7.5) + 0.5, max(4.2, cell * t + 2.4)),
        layout="constrained",
    )
    axes = fig.subplots(1, len(boots), squeeze=False)[0]
    # a bubble of frequency 1 fills about 85 % of a cell (area in points^2)
    smax = (0.85 * cell * 72) ** 2
    for ax, (level, boot) in zip(axes, boots.items(), strict=True):
        freq = boot.frequencies[order]  # (T teams in rank order, T ranks)
        lo, hi = boot.interval
        med = boot.median[order]
        x = np.arange(1, t + 1)
        ax.plot([0.5, t + 0.5], [0.5, t + 0.5], color="0.85", lw=1, zorder=0)
        for k in range(t):
            ranks = np.flatnonzero(freq[k] > 0) + 1
            ax.scatter(
                np.full(len(ranks), x[k]),
                ranks,
                s=freq[k, ranks - 1] * smax,
                color=colours[k],
                alpha=0.75,
                edgecolors="none",
            )
            ax.plot([x[k], x[k]], [lo[order[k]], hi[order[k]]], color="black", lw=1.2)
        ax.scatter(x, med, marker="x", color="black", s=60, lw=1.8, zorder=3)
        ax.set_xlim(0.5, t + 0.5)
        ax.set_ylim(t + 0.5, 0.5)
        ax.set_xticks(x, [_wrap(ranking.teams[k]) for k in order], rotation=40, ha="right")
        ax.set_yticks(x)
        ax.set_ylabel("rank")
        ax.set_title(
            f"{level}-level bootstrap ({boot.resamples:,} resamples of the {level}s)",
            fontsize=11,
        )
        ax.grid(axis="y", color="0.92", lw=0.8)
    handles = [
        Line2D([], [], ls="", marker="o", color="0.5", alpha=0.75, markersize=np.sqrt(f * smax))
        for f in (0.1, 0.5, 1.0)
    ]
    handles.append(Line2D([], [], ls="", marker="x", color="black", markersize=8, mew=1.8))
    handles.append(Line2D([], [], color="black", lw=1.2))
    # the largest key bubble is as wide as a cell: space the entries by its size (in font units)
    pad = np.sqrt(smax) / 10 / 2 + 0.6
    fig.legend(
        handles,
        ["10 % of resamples", "50 %", "100 %", "median rank", "2.5-97.5 % rank interval"],
        loc="outside lower center",
        ncol=5,
        frameon=False,
        borderpad=pad * 0.6,
        handlelength=pad * 1.2,
        handletextpad=pad * 0.6,
        columnspacing=pad,
    )
    stamp(fig, title, synthetic)
    return fig


def tau_violins(boots: dict[str, Bootstrap], title: str, synthetic: bool = False) -> Figure:
    """Kendall's tau between each resample's ranking and the full one, per level."""
    fig = Figure(figsize=(9.0, 5.0), layout="constrained")
    ax = fig.subplots()
    levels = list(boots)
    data = [b.tau[np.isfinite(b.tau)] for b in boots.values()]
    lowest = min((d.min() for d in data if len(d)), default=1.0)
    for i, d in enumerate(data, start=1):
        if len(d) == 0:
            ax.text(i, 0.8, "undefined\n(one team)", ha="center", va="center", color="0.4")
            continue
        colour = team_colours(2)[i - 1]
        if np.ptp(d) > 0:
            parts = ax.violinplot(d, positions=[i], widths=0.7, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(colour)
                body.set_alpha(0.45)
            # tau takes few distinct values with few teams: show them, jittered sideways
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(d))
            ax.scatter(i + jitter, d, s=5, color=colour, alpha=0.25, edgecolors="none")
        else:  # every resample gives the same tau: a KDE is undefined, show the value
            ax.plot([i - 0.3, i + 0.3], [d[0], d[0]], color=team_colours(2)[i - 1], lw=4)
        q1, med, q3 = np.quantile(d, [0.25, 0.5, 0.75])
        ax.plot([i, i], [q1, q3], color="black", lw=3)
        ax.scatter([i], [med], color="white", edgecolors="black", zorder=3, s=40)
        ax.text(
            i + 0.38,
            min(med, 0.93),  # below the frame's top when every tau is 1
            f"median {med:.3f}\n{100 * np.mean(d == 1):.0f} % identical",
            va="center",
            fontsize=9,
        )
    ax.set_xticks(range(1, len(levels) + 1), [f"{lv}-level bootstrap" for lv in levels])
    ax.set_xlim(0.4, len(levels) + 0.9)
    # at least 0.6..1, so a tau of 1 everywhere reads as a line at the top, not a band
    ax.set_ylim(max(-1.02, min(0.6, lowest - 0.05)), 1.02)
    ax.set_ylabel("Kendall's tau with the full ranking")
    ax.grid(axis="y", color="0.92")
    stamp(fig, title, synthetic)
    return fig


def _histograms(ax, means: np.ndarray, teams: list[int], colours: dict, lo: np.ndarray, hi: np.ndarray):
    """Density histograms of the bootstrap means of ``teams`` (columns of means (B, T)) on
    shared bins, each team's 2.5-97.5 % percentile interval as dashed lines."""
    values = [means[:, t][np.isfinite(means[:, t])] for t in teams]
    every = np.concatenate(values) if values else np.array([])
    if not len(every):
        return
    left, right = float(every.min()), float(every.max())
    if right - left < 1e-9:  # every resample the same: one narrow bin around it
        left, right = left - 5e-4, right + 5e-4
    edges = np.linspace(left, right, 61)
    for t, v in zip(teams, values, strict=True):
        if not len(v):
            continue
        density, _ = np.histogram(v, edges, density=True)
        ax.stairs(density, edges, fill=True, color=colours[t], alpha=0.25, lw=0)
        ax.stairs(density, edges, color=colours[t], lw=1.5, gid=f"team {t}")
        for x in (lo[t], hi[t]):
            ax.axvline(x, color=colours[t], lw=1.0, ls="--")
    ax.set_xlabel("mean final score FS over the resampled scans")
    ax.set_ylim(bottom=0)
    ax.grid(color="0.93")


def sampling_histograms(
    table: pd.DataFrame, means: np.ndarray, ranking: Ranking, title: str, synthetic: bool = False
) -> Figure:
    """The bootstrap distribution of each team's mean FS: a density histogram of its mean
    over the resamples (``means``: (B, T), teams in data order) and, dashed, its 2.5 and
    97.5 % percentiles (the interval of ``table``, sampling_distribution, in rank order).
    The means of resampled scans stay within the score's range, and so does all that is
    drawn. When the leaders are too close to tell apart at the scale of all teams, a second
    panel zooms on the teams within 8 standard errors of the leader."""
    order = list(ranking.order)
    palette = team_colours(len(order))
    colours = {t: palette[k] for k, t in enumerate(order)}
    lo = np.full(len(order), np.nan)
    hi = np.full(len(order), np.nan)
    lo[order], hi[order] = table["ci_2.5%"].to_numpy(float), table["ci_97.5%"].to_numpy(float)
    mean = table["mean"].to_numpy(float)
    se = table["se"].to_numpy(float)
    top = np.nanmax(mean) if np.isfinite(mean).any() else 0.0
    reach = 8 * (np.nanmax(se) if np.isfinite(se).any() else 0.0)
    close = [order[k] for k in range(len(table)) if np.isfinite(mean[k]) and mean[k] >= top - reach]
    zoom = 1 < len(close) < len(table)
    fig = Figure(figsize=(15 if zoom else 11, 5.5), layout="constrained")
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False, width_ratios=[1.4, 1] if zoom else None)[0]
    _histograms(axes[0], means, order, colours, lo, hi)
    axes[0].set_ylabel("density")
    axes[0].set_title("all teams", fontsize=11)
    if zoom:
        _histograms(axes[1], means, close, colours, lo, hi)
        axes[1].set_title(f"zoom: the {len(close)} teams within 8 standard errors of the leader", fontsize=11)
    handles = [
        Patch(
            facecolor=colours[t],
            edgecolor=colours[t],
            alpha=0.6,
            label=f"{row['rank']}. {_wrap(row['team'], 24)}  {row['mean']:.3f} "
            f"[{row['ci_2.5%']:.3f}, {row['ci_97.5%']:.3f}]",
        )
        for t, (_, row) in zip(order, table.iterrows(), strict=True)
    ]
    # below the panels: at the right it would reach up into the title
    fig.legend(
        handles=handles,
        title="rank. team  mean FS [2.5 %, 97.5 % percentile of the resampled means] (dashed lines)",
        loc="outside lower center",
        ncol=min(len(table), 4),
        fontsize=9,
        frameon=False,
    )
    stamp(fig, title, synthetic)
    return fig


# --------------------------------------------------------------------------- significance


def _significance_panel(ax, pw: Pairwise, order: np.ndarray, labels: list[str], alpha: float, annotate: bool):
    sig = pw.significant(alpha)[np.ix_(order, order)]
    p = pw.p_holm[np.ix_(order, order)]
    t = len(order)
    img = np.where(sig, 1.0, 0.0)
    img[np.eye(t, dtype=bool)] = 0.5
    cmap = ListedColormap(["#f2f2f2", "#bdbdbd", "#1f5fa6"])
    ax.imshow(img, cmap=cmap, vmin=0, vmax=1, aspect="equal")
    ax.set_xticks(range(t), labels, rotation=40, ha="right")
    ax.set_yticks(range(t), labels)
    ax.set_xticks(np.arange(t + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(t + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    if annotate:
        for i in range(t):
            for j in range(t):
                if i != j and np.isfinite(p[i, j]):
                    text = "<0.001" if p[i, j] < 0.001 else f"{p[i, j]:.3f}"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if sig[i, j] else "0.3",
                    )
    ax.set_xlabel("... than this team")
    ax.set_ylabel("this team is better ...")


def significance_map(
    results: list[Pairwise],
    ranking: Ranking,
    metric: str,
    title: str,
    alpha: float = 0.05,
    synthetic: bool = False,
) -> Figure:
    """Blue where the row team is significantly better than the column team (one-sided
    Wilcoxon, Holm-adjusted p < alpha), per level, teams in rank order; adjusted p in the
    cells when there are at most 12 teams."""
    order = ranking.order
    t = len(order)
    labels = [_wrap(ranking.teams[k]) for k in order]
    chosen = [r for r in results if r.metric == metric]
    side = max(4.5, 0.55 * t + 2.0)
    # at least as wide as the title and the label need on one line
    fig = Figure(figsize=(max(len(chosen) * side + 0.5, 7.5), side + 0.9), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, pw in zip(axes, chosen, strict=True):
        _significance_panel(ax, pw, order, labels, alpha, annotate=t <= 12)
        ax.set_title(
            f"{metric}, {pw.level} level (n = {int(np.nanmax(pw.n)) if pw.n.size else 0})", fontsize=11
        )
    caption = (
        f"blue: row team significantly better than column team (one-sided Wilcoxon signed-rank, "
        f"Holm-adjusted p < {alpha}); grey: the team itself" + ("; numbers: adjusted p" if t <= 12 else "")
    )
    # wrapped to the figure's width (about 15 characters an inch at 9 points)
    fig.supxlabel(textwrap.fill(caption, int(fig.get_size_inches()[0] * 15)), fontsize=9)
    stamp(fig, title, synthetic)
    return fig


def significance_grid(
    results: list[Pairwise], ranking: Ranking, title: str, alpha: float = 0.05, synthetic: bool = False
) -> Figure:
    """The significance map of every score and error at both levels: one row of scores
    and one of errors per level; teams labelled by their rank."""
    order = ranking.order
    t = len(order)
    by = {(r.level, r.metric): r for r in results}
    levels = list(dict.fromkeys(r.level for r in results))
    groups = [
        [m for m in SCORE_LABELS if any(r.metric == m for r in results)],
        [m for m in ERROR_LABELS if any(r.metric == m for r in results)],
    ]
    groups = [g for g in groups if g]
    ncols = max(len(g) for g in groups)
    side = max(2.6, min(3.4, 0.14 * t + 1.8))
    nrows = len(levels) * len(groups)
    fig = Figure(figsize=(side * ncols + 1.2, side * nrows + 1.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    labels = [str(int(ranking.ranks[k])) for k in order]
    small = 7 if t > 10 else 9
    for a, level in enumerate(levels):
        for g, metrics in enumerate(groups):
            row = a * len(groups) + g
            for b in range(ncols):
                ax = axes[row, b]
                if b >= len(metrics):
                    ax.set_axis_off()
                    continue
                metric = metrics[b]
                _significance_panel(ax, by[(level, metric)], order, labels, alpha, annotate=False)
                ax.tick_params(labelsize=small)
                ax.set_xlabel("")
                ax.set_ylabel("")
                ax.set_title(f"{metric}, {level} level", fontsize=10.5)
                for lab in ax.get_xticklabels():
                    lab.set_rotation(90 if t > 10 else 0)
                    lab.set_ha("center")
    key = ", ".join(f"{ranking.ranks[k]} = {_wrap(ranking.teams[k], 20)}" for k in order)
    fig.supxlabel(
        textwrap.fill(f"teams by rank: {key}", int((side * ncols + 1.2) * 11))
        + f"\nblue: row team significantly better than column team (Holm-adjusted p < {alpha}); "
        "grey: the team itself",
        fontsize=9,
    )
    stamp(fig, title, synthetic)
    return fig


# --------------------------------------------------------------------------- distributions


def _log_scale(ax, axis: str) -> None:
    """A log ``axis`` ('x' or 'y') labelled in plain numbers at 1, 2 and 5 a decade:
    matplotlib's default labels every minor tick of a span under two decades in
    scientific notation, and the labels overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _log_useful(values: list[np.ndarray]) -> bool:
    v = np.concatenate([x[np.isfinite(x) & (x > 0)] for x in values]) if values else np.array([])
    return len(v) > 0 and np.quantile(v, 0.99) / max(np.quantile(v, 0.01), 1e-12) > 50


def box_plots(
    panels: dict[str, np.ndarray],
    labels: dict[str, str],
    ranking: Ranking,
    title: str,
    synthetic: bool = False,
    log: bool = False,
) -> Figure:
    """Horizontal box plots per team (best on top), one panel per metric. panels: name ->
    (T, n) values (NaN left out). ``log``: log axis where the values span > 50x."""
    order = ranking.order
    t = len(order)
    colours = team_colours(t)
    fig = Figure(figsize=(3.4 * len(panels) + 1.6, max(3.5, 0.38 * t + 1.8)), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels.items(), strict=True):
        series = [values[k][np.isfinite(values[k])] for k in order]
        present = [i for i, s in enumerate(series) if len(s)]
        if present:
            bp = ax.boxplot(
                [series[i] for i in present],
                positions=[i + 1 for i in present],
                orientation="horizontal",
                widths=0.6,
                patch_artist=True,
                flierprops={"markersize": 2.5, "alpha": 0.4},
                medianprops={"color": "black"},
            )
            for patch, i in zip(bp["boxes"], present, strict=True):
                patch.set_facecolor(colours[i])
                patch.set_alpha(0.7)
            means = [series[i].mean() for i in present]
            ax.scatter(
                means, [i + 1 for i in present], marker="D", s=18, color="white", edgecolors="black", zorder=3
            )
        if log and _log_useful(series):
            _log_scale(ax, "x")
        ax.set_title(labels.get(name, name), fontsize=11)
        ax.grid(axis="x", color="0.92")
    axes[0].set_yticks(range(1, t + 1), [f"{ranking.ranks[k]}. {_wrap(ranking.teams[k])}" for k in order])
    axes[0].set_ylim(t + 0.6, 0.4)
    fig.supxlabel("box: quartiles; line: median; diamond: mean; dots: outliers", fontsize=9)
    stamp(fig, title, synthetic)
    return fig


SHOW_POINTS = 12  # boxes of at most this many scans also show each scan as a dot


def pattern_plot(
    panels: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    ranking: Ranking,
    title: str,
    synthetic: bool = False,
) -> Figure:
    """Grouped box plots: per scan-pattern factor (rows) and metric (columns), one group of
    boxes per level of the factor, one box per team (in rank order, its colour). No line
    joins the levels: they are categories, not a scale.

    panels: metric -> (T, n) per-scan values (FS: failures 0; errors: NaN where not
    scored); labels: factor -> (n,) level of each scan ('' = none; stats.pattern_labels).
    """
    factors = list(labels)
    metrics = list(panels)
    order = ranking.order
    t = len(order)
    colours = team_colours(t)
    most = max((len(set(v) - {""}) for v in labels.values()), default=1)
    width = min(6.5, max(3.3, 0.055 * t * most + 1.6))
    fig = Figure(figsize=(width * len(metrics) + 0.6, 2.9 * max(1, len(factors)) + 1.6), layout="constrained")
    axes = fig.subplots(max(1, len(factors)), len(metrics), squeeze=False)
    box = 0.8 / t  # a group spans 0.8 of the distance between levels
    for a, factor in enumerate(factors):
        levels = sorted(set(labels[factor]) - {""})
        for b, metric in enumerate(metrics):
            ax = axes[a, b]
            values = panels[metric]
            every = []
            for k, team in enumerate(order):
                series, where = [], []
                for i, level in enumerate(levels):
                    v = values[team, labels[factor] == level]
                    v = v[np.isfinite(v)]
                    if len(v):
                        series.append(v)
                        where.append(i - 0.4 + box * (k + 0.5))
                        every.append(v)
                if not series:
                    continue
                bp = ax.boxplot(
                    series,
                    positions=where,
                    widths=box * 0.85,
                    patch_artist=True,
                    manage_ticks=False,
                    flierprops={"markersize": 2, "alpha": 0.4, "markeredgecolor": colours[k]},
                    medianprops={"color": "black", "lw": 1.0},
                    whiskerprops={"color": colours[k]},
                    capprops={"color": colours[k]},
                    boxprops={"lw": 0.6},
                )
                for patch in bp["boxes"]:
                    patch.set_facecolor(colours[k])
                    patch.set_alpha(0.75)
                for v, x in zip(series, where, strict=True):
                    if len(v) <= SHOW_POINTS:  # few scans: a box alone hides how few
                        jitter = np.random.default_rng(len(v)).uniform(-0.25, 0.25, len(v)) * box
                        ax.scatter(
                            x + jitter, v, s=14, color=colours[k], edgecolors="black", lw=0.5, zorder=3
                        )
            for i in range(1, len(levels)):
                ax.axvline(i - 0.5, color="0.85", lw=0.8)  # separates the groups
            ax.set_xticks(range(len(levels)), [LEVEL_LABELS.get(v, v) for v in levels], fontsize=8)
            ax.set_xlim(-0.5, len(levels) - 0.5)
            if metric != "FS" and _log_useful(every):
                _log_scale(ax, "y")
            if a == 0:
                ax.set_title(SCORE_LABELS.get(metric, ERROR_LABELS.get(metric, metric)), fontsize=11)
            if b == 0:
                ax.set_ylabel(FACTOR_LABELS.get(factor, factor), fontsize=11, fontweight="bold")
            ax.grid(axis="y", color="0.93")
    handles = [
        Patch(
            facecolor=colours[k], alpha=0.75, label=f"{ranking.ranks[team]}. {_wrap(ranking.teams[team], 22)}"
        )
        for k, team in enumerate(order)
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(t, 10),
        fontsize=9,
        frameon=False,
        title="team (rank); boxes: quartiles, line: median, whiskers 1.5 IQR; small dots: outliers, "
        f"outlined dots: every scan of a box of at most {SHOW_POINTS}; FS over all scans (failures 0), "
        "errors over scored scans",
        title_fontsize=9,
    )
    stamp(fig, title, synthetic)
    return fig


def length_plot(
    length: np.ndarray,
    errors: np.ndarray,
    ranking: Ranking,
    corr: pd.DataFrame,
    title: str,
    synthetic: bool = False,
) -> Figure:
    """Each error against scan length: one colour per team, a line through each team's
    median error in eight length bins, log error axis; the panel title gives the median
    over the teams of their Pearson r (per scan and per subject). length: (n,) mm;
    errors: (T, n, 4) mm."""
    order = ranking.order
    colours = team_colours(len(order))
    fig = Figure(figsize=(17, 4.8), layout="constrained")
    axes = fig.subplots(1, 4, squeeze=False)[0]
    n_ok = int(np.isfinite(length).sum())
    marker = 40 if n_ok < 50 else 22 if n_ok < 300 else 12  # visible, yet a cloud of 768 stays readable
    lines = 0
    for e, (ax, name) in enumerate(zip(axes, ERRORS, strict=True)):
        values = []
        # worst team first, so the best teams (the interesting ones) are drawn on top
        for k, t in reversed(list(enumerate(order))):
            y = errors[t, :, e]
            ok = np.isfinite(y) & np.isfinite(length)
            values.append(y[ok])
            ax.scatter(
                length[ok],
                y[ok],
                s=marker,
                alpha=0.6,
                color=colours[k],
                edgecolors="none",
                label=f"{ranking.ranks[t]}. {_wrap(ranking.teams[t], 22)}",
            )
            # the trend through the cloud: the team's median error in bins of scan length
            # holding equal numbers of scans (8 bins, fewer when there are under 16 scans;
            # at least 2 scans a bin, so no line below 4 scans)
            nbins = min(8, int(ok.sum()) // 2)
            if nbins >= 2:
                edges = np.quantile(length[ok], np.linspace(0, 1, nbins + 1))
                bins = np.clip(np.searchsorted(edges, length[ok], side="right") - 1, 0, nbins - 1)
                mids = [np.median(length[ok][bins == b]) for b in range(nbins) if (bins == b).any()]
                meds = [np.median(y[ok][bins == b]) for b in range(nbins) if (bins == b).any()]
                ax.plot(mids, meds, color=colours[k], lw=2.2, path_effects=_halo)
                lines += 1
        if any(len(v) for v in values) and min(v.min() for v in values if len(v)) > 0:
            _log_scale(ax, "y")  # teams differ by factors: a log axis separates them
        rs = corr[(corr["error"] == name) & (corr["level"] == "scan")]["r"].to_numpy(float)
        rs_subj = corr[(corr["error"] == name) & (corr["level"] == "subject")]["r"].to_numpy(float)
        med = f"{np.nanmedian(rs):.2f}" if np.isfinite(rs).any() else "n/a"
        text = f"{name}: r = {med} (scans)"
        if np.isfinite(rs_subj).any():  # undefined with fewer than 3 subjects: not said
            text += f", {np.nanmedian(rs_subj):.2f} (subjects)"
        ax.set_title(text, fontsize=10.5)
        ax.set_xlabel("scan length (mm)")
        ax.set_ylabel(ERROR_LABELS[name])
        ax.grid(color="0.93")
    handles, labels = axes[0].get_legend_handles_labels()
    handles, labels = handles[::-1], labels[::-1]
    handles = [Line2D([], [], ls="", marker="o", color=h.get_facecolor()[0], alpha=0.8) for h in handles]
    # centred at the right: in the upper corner a long legend would reach into the title
    fig.legend(handles, labels, loc="outside right center", fontsize=9, frameon=False, title="team (rank)")
    caption = "dots: scans; r: Pearson correlation of scan length with the error, median over the teams"
    if lines:
        caption += (
            "; lines: each team's median error in up to eight bins of scan length, each bin "
            "holding the same number of scans (at least 2)"
        )
    else:
        caption += "; too few scans a team (under 4) for a trend line of binned medians"
    fig.supxlabel(caption, fontsize=9)
    stamp(fig, title, synthetic)
    return fig


def bump_chart(table: pd.DataFrame, title: str, synthetic: bool = False) -> Figure:
    """Each team's rank under each ranking method (columns '<method> rank' of the
    sensitivity table, teams in the chosen method's order)."""
    cols = [c for c in table.columns if c.endswith(" rank")]
    t = len(table)
    colours = team_colours(t)
    fig = Figure(figsize=(max(8.0, 2.3 * len(cols) + 4.5), max(4.0, 0.42 * t + 1.8)), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(cols))
    for k, row in enumerate(table.itertuples(index=False)):
        ranks = table.iloc[k][cols].to_numpy(float)
        ax.plot(x, ranks, marker="o", ms=7, lw=2, color=colours[k])
        ax.text(
            x[0] - 0.08,
            ranks[0],
            _wrap(str(row.team), 22),
            ha="right",
            va="center",
            fontsize=9,
            color="0.15",  # the light shades of tab20 are unreadable as text
        )
        ax.text(
            x[-1] + 0.08,
            ranks[-1],
            _wrap(str(row.team), 22),
            ha="left",
            va="center",
            fontsize=9,
            color="0.15",  # the light shades of tab20 are unreadable as text
        )
    ax.set_xticks(x, [c.removesuffix(" rank").replace(" FS", "\n(aggregate then rank)") for c in cols])
    ax.set_xlim(-1.1, len(cols) - 1 + 1.1)
    ax.set_ylim(t + 0.5, 0.5)
    ax.set_yticks(range(1, t + 1))
    ax.set_ylabel("rank")
    ax.grid(axis="y", color="0.93")
    stamp(fig, title, synthetic)
    return fig

"""The figures of ``./evaluate show``: a scan's trajectory and its reconstruction.

matplotlib without pyplot (each function returns a Figure the caller saves). Every
figure is titled with the scan and says SYNTHETIC DATA in red when the data are
synthetic (``tusrec.plotting``, as the ranking report). Coordinates are the first frame's image mm:
x along the image columns, y along the rows (depth, drawn downwards), z = x cross y
(out of the first frame's plane).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter

from tusrec.plotting import stamp, title_line
from tusrec.show.poses import DENSE, PredictedPoses
from tusrec.show.volume import Volume, frame_corners_mm

TRUE_COLOUR = "0.15"
PRED_COLOUR = "#d95f02"
GAP_COLOUR = "#e7298a"
OUTLINES = 12  # frame outlines drawn along the scan (every k-th frame)


def ordinal(k: int) -> str:
    """1 -> '1st', 2 -> '2nd', 13 -> '13th'."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def header(sub, title: str, synthetic: bool) -> None:
    """Title and SYNTHETIC DATA label (as the report's ``stamp`` draws them) in a subfigure
    of their own: with subfigures, constrained layout keeps no room for a suptitle."""
    title_line(sub, title, synthetic, 0.8)


def outline_step(n_frames: int, outlines: int = OUTLINES) -> int:
    """k such that every k-th frame's outline is drawn (about ``outlines`` of them)."""
    return max(1, math.ceil((n_frames - 1) / outlines))


def _outline(ax, c: np.ndarray, colour, lw: float, alpha: float = 1.0) -> None:
    """Draw one frame's border from its corners (4, 3) in image_corners order."""
    loop = c[[0, 1, 3, 2, 0]]
    ax.plot(loop[:, 0], loop[:, 2], loop[:, 1], color=colour, lw=lw, alpha=alpha)


def _equal_box(ax, points: np.ndarray) -> None:
    """Equal mm per unit on the three axes (plotted as x, z, y: see trajectory_figure)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1.0) * 1.05
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[2] - half, centre[2] + half)
    ax.set_zlim(centre[1] + half, centre[1] - half)  # depth downwards, as in the image
    ax.set_box_aspect((1, 1, 1))


def trajectory_figure(
    key: str,
    poses: PredictedPoses,
    true_global: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    synthetic: bool = False,
    team: str | None = None,
) -> Figure:
    """Left: the four image corners of every frame in 3D (tracks), with the outline of
    every k-th frame, true against predicted, in the first frame's image mm. Right: GPE
    and LPE per frame (with the file's expected error per frame over the LPE, both mm, when
    it holds one), and the file's per-frame uncertainty when it holds one.

    true_global: (N-1, 4, 4) T(i->0); T_scale: (4, 4); image_size: (H, W).
    """
    true_c = frame_corners_mm(true_global, T_scale, image_size)  # (N, 4, 3)
    pred_c = frame_corners_mm(poses.global_, T_scale, image_size)
    n = len(true_c)
    step = outline_step(n)
    fig = Figure(figsize=(15, 7.6), layout="constrained")
    has_unc = poses.uncertainty is not None or poses.uncertainty_translation is not None
    rows = 3 if has_unc else 2
    gs = fig.add_gridspec(rows, 2, width_ratios=[1.25, 1])
    ax3 = fig.add_subplot(gs[:, 0], projection="3d")
    # plotted as (x, z, y) so that depth (y) is the vertical axis, pointing down
    for c, colour in ((true_c, TRUE_COLOUR), (pred_c, PRED_COLOUR)):
        for corner in range(4):
            ax3.plot(c[:, corner, 0], c[:, corner, 2], c[:, corner, 1], color=colour, lw=1.0, alpha=0.8)
        for i in range(0, n, step):
            _outline(ax3, c[i], colour, 1.6 if i == 0 else 0.9, 1.0 if i == 0 else 0.55)
        _outline(ax3, c[-1], colour, 1.6)
    finite = np.concatenate([true_c.reshape(-1, 3), pred_c.reshape(-1, 3)])
    _equal_box(ax3, finite[np.isfinite(finite).all(axis=1)])
    ax3.set_xlabel("x: image columns (mm)")
    ax3.set_ylabel("z: out of frame 0's plane (mm)")
    ax3.set_zlabel("y: depth (mm)")
    ax3.view_init(elev=22, azim=-58)
    ax3.set_title(
        f"image corners of all {n} frames (lines) and every {ordinal(step)} frame's border,\n"
        "in frame 0's image mm",
        fontsize=10.5,
    )
    ax3.legend(
        [Line2D([], [], color=TRUE_COLOUR, lw=2), Line2D([], [], color=PRED_COLOUR, lw=2)],
        ["true poses", "predicted poses" + (" (rigid fit of the DDFs)" if poses.form == DENSE else "")],
        loc="upper left",
        bbox_to_anchor=(0.0, 1.0),
        fontsize=9,
        frameon=True,
    )
    frames = np.arange(1, n)
    # the file's expected error per frame is the LPE's own quantity (the mean point
    # distance of T(i->i-1)), so it is drawn over the LPE
    panels = [
        (poses.gpe, None, "GPE per frame (mm)", f"global pixel error: mean {poses.gpe.mean():.2f} mm"),
        (
            poses.lpe,
            poses.expected_error,
            "LPE per frame (mm)",
            f"local pixel error: mean {poses.lpe.mean():.3f} mm",
        ),
    ]
    axes = []
    for r, (values, expected, ylabel, title) in enumerate(panels):
        ax = fig.add_subplot(gs[r, 1], sharex=axes[0] if axes else None)
        ax.plot(frames, values, color=PRED_COLOUR, lw=1.4, label="error")
        top = float(np.max(values))
        if expected is not None:
            source = f": {poses.expected_error_source}" if poses.expected_error_source else ""
            ax.plot(frames, expected, color="#1b9e77", lw=1.2, ls="--", label=f"expected (file{source})")
            top = max(top, float(np.max(expected)))
            ax.legend(loc="upper right", fontsize=8.5, frameon=True)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10.5)
        # room above the largest value: a constant error would otherwise sit on the frame
        ax.set_ylim(0, max(top * 1.08, 1e-6))
        ax.grid(color="0.92")
        axes.append(ax)
    if has_unc:
        ax = fig.add_subplot(gs[2, 1], sharex=axes[0])
        handles = []
        if poses.uncertainty is not None:
            handles += ax.plot(frames, poses.uncertainty, color="#1b9e77", lw=1.4, label="rotation (rad²)")
            ax.set_ylabel("rotation (rad²)", color="#1b9e77")
        if poses.uncertainty_translation is not None:
            twin = ax.twinx() if poses.uncertainty is not None else ax
            handles += twin.plot(
                frames, poses.uncertainty_translation, color="#7570b3", lw=1.4, label="translation (mm)"
            )
            twin.set_ylabel("translation (mm)", color="#7570b3")
            twin.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        if poses.uncertainty is not None:
            # a plain 'x 1e-7' offset would sit on the panel's title
            ax.yaxis.set_major_formatter(
                FormatStrFormatter("%.1e" if poses.uncertainty.max() < 1e-2 else "%.3g")
            )
        what = " and ".join(
            f"{h.get_label()}, {side} axis" for h, side in zip(handles, ("left", "right"), strict=False)
        )
        ax.set_title(f"per-frame uncertainty in the file: {what}", fontsize=10.5)
        ax.grid(color="0.92")
        axes.append(ax)
    axes[-1].set_xlabel("frame index")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    lines = f"{key}{f' ({team})' if team else ''}: trajectory, true against predicted"
    if poses.form == DENSE and poses.residual_global is not None:
        lines += (
            f" - dense DDFs, poses by a rigid fit (RMS residual: median "
            f"{np.median(poses.residual_global):.2g}, max {poses.residual_global.max():.2g} mm)"
        )
    else:
        lines += " - compact file (transforms)"
    stamp(fig, lines, synthetic)
    return fig


def projection(volume: Volume, axis: int) -> np.ndarray:
    """Maximum-intensity projection of a volume along ``axis``: (the other two axes, in
    increasing order) float32, NaN where no pixel fell anywhere along the ray."""
    filled = np.isfinite(volume.values).any(axis=axis)
    mip = np.where(np.isfinite(volume.values), volume.values, -np.inf).max(axis=axis)
    return np.where(filled, mip, np.nan).astype(np.float32)


VIEWS = (  # (axis projected along, horizontal axis, vertical axis, what the view is)
    (2, 0, 1, "seen along z: frame 0's plane, depth down"),
    (0, 2, 1, "seen along x: out of plane (z) against depth"),
    (1, 0, 2, "seen from above (along y)"),
)
AXIS = "xyz"


def reconstruction_figure(
    key: str,
    true_volume: Volume,
    pred_volume: Volume,
    synthetic: bool = False,
    team: str | None = None,
    pixel_step: int = 2,
) -> Figure:
    """Maximum-intensity projections of the volume compounded with the true poses (left)
    and with the predicted poses (right), on the same grid, along each axis of frame 0's
    image mm (one row per axis). A gap between consecutive frames wider than the volume's
    hole filling reaches (Volume.gaps) is marked with an x midway between the frames'
    centres, and the caption says how many and the widest."""
    g = true_volume.grid
    cmap = colormaps["gray"].with_extremes(bad="#16213a")
    extent = [g.extent(a) for a in range(3)]
    size = [hi - lo for lo, hi in extent]
    # each row as tall as its view's aspect needs at 7 inches a panel, within limits
    heights = [min(5.5, max(1.6, 7.0 * size[v] / max(size[h], 1e-6))) for _, h, v, _ in VIEWS]
    fig = Figure(figsize=(16, sum(heights) + 2.4), layout="constrained")
    top, *rows = fig.subfigures(len(VIEWS) + 1, 1, height_ratios=[0.8, *heights])
    image = None
    for row, (cut, hor, ver, name) in zip(rows, VIEWS, strict=True):
        axes = row.subplots(1, 2, sharex=True, sharey=True)
        for ax, vol, label in zip(
            axes, (true_volume, pred_volume), ("true poses", "predicted poses"), strict=True
        ):
            plane = projection(vol, cut)  # axes: the two others, in increasing order
            if hor < ver:
                plane = plane.T  # image rows run along the vertical axis
            (h0, h1), (v0, v1) = extent[hor], extent[ver]
            image = ax.imshow(
                plane,
                cmap=cmap,
                vmin=0,
                vmax=255,
                extent=(h0, h1, v1, v0),
                origin="upper",
                interpolation="nearest",
                aspect="equal",
            )
            if len(vol.gaps):  # real gaps between frames: marked where they are, not hidden
                ax.scatter(
                    vol.gap_mid[:, hor],
                    vol.gap_mid[:, ver],
                    marker="x",
                    s=50,
                    lw=1.8,
                    color=GAP_COLOUR,
                    gid="gaps",
                    label=f"gap between frames (> {vol.reach_mm:.1f} mm)",
                )
                ax.legend(loc="upper right", fontsize=8, frameon=True)
            if ver == 2:
                ax.invert_yaxis()  # z upwards in the view from above
            ax.set_xlabel(f"{AXIS[hor]} (mm)")
            ax.set_ylabel(f"{AXIS[ver]} (mm)")
            ax.set_title(f"{label}: {name}", fontsize=10)
        row.colorbar(image, ax=axes, shrink=0.9, label="max intensity (0-255)", aspect=12)
    dropped = pred_volume.outside / max(pred_volume.splatted, 1)
    note = (
        f"maximum-intensity projections; voxel {g.voxel_mm:.2f} mm, grid {g.shape[0]} x {g.shape[1]} x "
        f"{g.shape[2]}, nearest-voxel splatting of every {ordinal(pixel_step)} row and column of pixels"
    )
    if true_volume.fill:
        note += (
            f", an empty voxel given the mean of those splatted within {true_volume.fill} voxel(s) "
            f"(closes gaps between neighbouring frames under {true_volume.reach_mm:.1f} mm)"
        )
    note += "; dark blue: no pixel on the ray; axes in frame 0's image mm"
    for label, vol in (("true", true_volume), ("predicted", pred_volume)):
        if len(vol.gaps):
            k = int(np.argmax(vol.gap_mm))
            note += (
                f"\n{label} poses: {len(vol.gaps)} gap(s) between consecutive frames wider than that "
                f"(x, left empty; widest {vol.gap_mm[k]:.1f} mm, between frames {vol.gaps[k]} and "
                f"{vol.gaps[k] + 1})"
            )
    if dropped > 0:
        note += f"; {100 * dropped:.1f} % of the predicted pixels fall outside the region shown"
    # wrapped to the figure's width (about 15 characters an inch at 9 points)
    width = int(fig.get_size_inches()[0] * 15)
    fig.supxlabel("\n".join(textwrap.fill(line, width) for line in note.split("\n")), fontsize=9)
    title = f"{key}{f' ({team})' if team else ''}: frames compounded with the true and the predicted poses"
    header(top, title, synthetic)
    return fig

"""``./evaluate show PRED --data DATA --out DIR``: per scan, the trajectory and the
reconstruction as PNGs, a summary table (show.csv) and one self-contained show.html.

Which scans: ``--scans KEY ...``; by default every scan of the data, or, when there are
more than ``max_scans``, the ``max_scans`` with the largest GPE (taken from a metrics.csv
of ``./evaluate score`` with ``--metrics``, else measured here, which reads every file).
"""

from __future__ import annotations

import base64
import html
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tusrec.data import Scan, TusrecData, TusrecDataError, atomic_path, write_csv
from tusrec.ddf import GroundTruth
from tusrec.show.poses import DEFAULT_PIXEL_STEP as FIT_STEP
from tusrec.show.poses import PredictedPoses, ShowError, read_poses
from tusrec.show.volume import DEFAULT_MAX_VOXELS, DEFAULT_PIXEL_STEP, DEFAULT_VOXEL_MM, compound

DEFAULT_MAX_SCANS = 6


@dataclass
class ShownScan:
    """One scan's figures and numbers (figures None when the file could not be shown)."""

    key: str
    row: dict
    trajectory: Path | None = None
    reconstruction: Path | None = None
    label: str = ""


def _save(fig, path: Path, dpi: int) -> Path:
    """PNG with a 256-colour palette (median cut: the octree method bands the greys into ~16
    levels): greyscale volumes and a few line colours lose nothing visible, and the file is
    about half the size (the pages inline every image)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def show_scan(
    path: Path,
    scan: Scan,
    gt: GroundTruth,
    out: Path,
    synthetic: bool = False,
    team: str | None = None,
    voxel_mm: float = DEFAULT_VOXEL_MM,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    pixel_step: int = DEFAULT_PIXEL_STEP,
    poses: PredictedPoses | None = None,
    prefix: str = "",
    dpi: int = 75,
) -> ShownScan:
    """Both figures of one scan into ``out`` (<prefix><key>_trajectory.png,
    <prefix><key>_reconstruction.png); a file that cannot be shown gives a row saying why."""
    from tusrec.show.figures import reconstruction_figure, trajectory_figure

    t0 = time.perf_counter()
    row: dict = {"key": scan.key, "frames": scan.n_frames}
    try:
        poses = poses or read_poses(path, scan, gt, FIT_STEP)
    except ShowError as err:
        row.update(status="not shown", message=str(err))
        return ShownScan(scan.key, row)
    t_poses = time.perf_counter() - t0
    ts = gt.calib.T_scale
    true_vol, pred_vol = compound(scan, [gt.global_, poses.global_], ts, voxel_mm, max_voxels, pixel_step)
    t_volumes = time.perf_counter() - t0 - t_poses
    trajectory = _save(
        trajectory_figure(scan.key, poses, gt.global_, ts, scan.image_size, synthetic, team),
        out / f"{prefix}{scan.key}_trajectory.png",
        dpi,
    )
    reconstruction = _save(
        reconstruction_figure(scan.key, true_vol, pred_vol, synthetic, team, pixel_step),
        out / f"{prefix}{scan.key}_reconstruction.png",
        dpi,
    )
    g = true_vol.grid
    row.update(
        status="ok",
        form=poses.form,
        model=poses.model,
        GPE=float(poses.gpe.mean()),
        LPE=float(poses.lpe.mean()),
        fit_residual_median_mm=(
            float(np.median(poses.residual_global)) if poses.residual_global is not None else math.nan
        ),
        fit_residual_max_mm=float(poses.residual_global.max())
        if poses.residual_global is not None
        else math.nan,
        voxel_mm=g.voxel_mm,
        grid="x".join(str(s) for s in g.shape),
        outside_fraction=pred_vol.outside / max(pred_vol.splatted, 1),
        # hole filling's reach, and the pairs of frames further apart (left empty, marked)
        fill_voxels=true_vol.fill,
        gaps_true=len(true_vol.gaps),
        gaps_predicted=len(pred_vol.gaps),
        poses_s=t_poses,
        volumes_s=t_volumes,
        seconds=time.perf_counter() - t0,
        message="",
    )
    return ShownScan(scan.key, row, trajectory, reconstruction)


def choose_scans(
    data: TusrecData,
    keys: list[str] | None,
    max_scans: int,
    gpe: dict[str, float] | None,
) -> list[Scan]:
    """The scans to show: ``keys`` if given; all if at most ``max_scans``; else the
    ``max_scans`` with the largest GPE (``gpe``: key -> mm; scans without one go last)."""
    if keys:
        return data.select(keys)
    scans = data.scans
    if len(scans) <= max_scans or gpe is None:
        return scans
    ordered = sorted(scans, key=lambda s: -gpe.get(s.key, -math.inf))  # stable: data order on ties
    return ordered[:max_scans]


def metrics_gpe(path: Path) -> dict[str, float]:
    """key -> GPE (mm) of the scored scans of a metrics.csv (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise TusrecDataError(f"{path}: cannot read the metrics table ({err})") from None
    if not {"key", "GPE"} <= set(table.columns):
        raise TusrecDataError(f"{path}: not a metrics.csv of `evaluate score` (no key/GPE columns)")
    return {str(k): float(v) for k, v in zip(table["key"], table["GPE"], strict=True) if np.isfinite(v)}


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1500px; padding: 0 20px; color: #222; line-height: 1.45; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.synthetic { background: #c00000; color: white; font-weight: bold; font-size: 22px; padding: 10px 16px;
             border-radius: 6px; margin: 12px 0; letter-spacing: 1px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13px; }
th, td { border: 1px solid #d4d4d4; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f3f7; } img { max-width: 100%; border: 1px solid #e4e4e4; margin: 8px 0 20px; }
"""


def img_html(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


SUMMARY_COLUMNS = (
    "key",
    "status",
    "form",
    "frames",
    "GPE",
    "LPE",
    "fit_residual_max_mm",
    "voxel_mm",
    "seconds",
)


def summary_table_html(shown: list[ShownScan]) -> str:
    rows = pd.DataFrame([s.row for s in shown])
    cols = [c for c in SUMMARY_COLUMNS if c in rows.columns]
    if any(s.label for s in shown):
        rows.insert(0, "which", [s.label for s in shown])
        cols = ["which", *cols]
    return rows[cols].to_html(index=False, border=0, na_rep="n/a", float_format=lambda v: f"{v:.3f}")


def scans_html(shown: list[ShownScan], heading: str = "h2") -> list[str]:
    """The figures of each shown scan, images inlined."""
    parts = []
    for s in shown:
        label = f"{s.label}: " if s.label else ""
        parts.append(f"<{heading}>{html.escape(label + s.key)}</{heading}>")
        if s.trajectory is None:
            parts.append(f"<p>Not shown: {html.escape(str(s.row.get('message', '')))}</p>")
            continue
        parts.append(img_html(s.trajectory, f"{s.key}: trajectory"))
        parts.append(img_html(s.reconstruction, f"{s.key}: reconstruction"))
    return parts


EXPLANATION = (
    "<p>Per scan: the <b>trajectory</b> (the four image corners of every frame in the first frame's "
    "image mm, true against predicted, with the per-frame GPE and LPE and the file's per-frame "
    "uncertainty when it holds one) and the <b>reconstruction</b> (the frames compounded into one voxel "
    "volume with the true poses and with the predicted poses, on the same grid, cut by three orthogonal "
    "planes; an empty voxel between neighbouring frames is given the mean of the voxels around it, and a "
    "gap between consecutive frames wider than that reaches is left empty and marked x). Dense files "
    "(GP/LP) are shown through each frame's least-squares rigid fit of its DDF "
    "(the RMS fit residual is reported: 0 mm for a rigid prediction); compact files through their "
    "matrices. Per-frame GPE and LPE are computed from the file as scoring does (docs/conventions.md).</p>"
)


def show_html(shown: list[ShownScan], title: str, synthetic: bool) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}{' (SYNTHETIC DATA)' if synthetic else ''}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if synthetic:
        parts.append(
            '<div class="synthetic" id="synthetic">SYNTHETIC DATA - these results are not real</div>'
        )
    parts.append(EXPLANATION)
    parts.append(summary_table_html(shown))
    parts += scans_html(shown)
    parts.append("</body></html>")
    return "\n".join(parts)


def show_predictions(
    predictions: Path,
    data: TusrecData,
    out: Path,
    keys: list[str] | None = None,
    max_scans: int = DEFAULT_MAX_SCANS,
    metrics: Path | None = None,
    synthetic: bool = False,
    title: str | None = None,
    voxel_mm: float = DEFAULT_VOXEL_MM,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    pixel_step: int = DEFAULT_PIXEL_STEP,
) -> list[ShownScan]:
    """Everything ``./evaluate show`` writes into ``out``; returns the shown scans."""
    predictions, out = Path(predictions), Path(out)
    if not predictions.is_dir():
        raise TusrecDataError(f"{predictions}: predictions folder not found")
    calib = data.calibration
    scans = data.select(keys) if keys else data.scans
    if not scans:
        raise TusrecDataError(f"{data.root}: no scans found")
    data.require_ground_truth(scans, "showing needs the transfs/ folder of the validation layout")
    out.mkdir(parents=True, exist_ok=True)
    poses: dict[str, PredictedPoses] = {}
    truths: dict[str, GroundTruth] = {}
    gpe = metrics_gpe(metrics) if metrics is not None else None
    if not keys and len(scans) > max_scans and gpe is None:
        gpe = {}
        for scan in scans:  # the worst are found by measuring every file (poses are kept)
            truths[scan.key] = GroundTruth.from_scan(scan, calib)
            try:
                poses[scan.key] = read_poses(predictions / f"{scan.key}.h5", scan, truths[scan.key])
                gpe[scan.key] = float(poses[scan.key].gpe.mean())
            except ShowError:
                gpe[scan.key] = math.inf  # an unreadable file is shown first, with why
    chosen = choose_scans(data, keys, max_scans, gpe)
    shown = []
    for scan in chosen:
        gt = truths.get(scan.key) or GroundTruth.from_scan(scan, calib)
        shown.append(
            show_scan(
                predictions / f"{scan.key}.h5",
                scan,
                gt,
                out,
                synthetic,
                None,
                voxel_mm,
                max_voxels,
                pixel_step,
                poses.get(scan.key),
            )
        )
    table = pd.DataFrame([s.row for s in shown])
    write_csv(table, out / "show.csv")
    page = show_html(shown, title or f"Trajectories and reconstructions: {predictions.name}", synthetic)
    with atomic_path(out / "show.html") as tmp:
        tmp.write_text(page)
    return shown


def add_show(show) -> None:
    """``./evaluate show``'s options (tusrec.cli imports this module only to run it)."""
    show.description = (
        "For each chosen scan of DATA (with ground truth): the trajectory (the four "
        "image corners of every frame in 3D, true against predicted, in the first frame's image "
        "mm; per-frame GPE and LPE; the file's per-frame uncertainty) and the reconstruction (the "
        "frames compounded into one voxel volume with the true and with the predicted poses, as "
        "maximum-intensity projections side by side). Dense files are shown through a rigid fit "
        "of each frame's DDF (residual reported), compact files through their matrices. Writes "
        "<key>_trajectory.png, <key>_reconstruction.png, show.csv and a self-contained show.html "
        "into --out. Conventions: docs/conventions.md."
    )
    show.add_argument("predictions", type=Path, help="predictions folder (<key>.h5, dense or compact)")
    show.add_argument("--data", type=Path, required=True, help="data folder with ground truth")
    show.add_argument("--out", type=Path, required=True, help="folder for the figures and show.html")
    show.add_argument("--scans", nargs="+", default=None, metavar="KEY", help="only these scan keys")
    show.add_argument(
        "--max-scans",
        type=int,
        default=DEFAULT_MAX_SCANS,
        help="without --scans: all scans if at most this many, else the ones with the largest GPE "
        "(default: %(default)s)",
    )
    show.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics.csv of `evaluate score` to pick the worst scans by (default: measure every file)",
    )
    show.add_argument(
        "--voxel-mm",
        type=float,
        default=DEFAULT_VOXEL_MM,
        help="voxel edge in mm, grown when the grid would exceed --max-voxels (default: %(default)s)",
    )
    show.add_argument(
        "--max-voxels",
        type=int,
        default=DEFAULT_MAX_VOXELS,
        help="the most voxels a volume may have: memory and time grow with it (default: %(default)s)",
    )
    show.add_argument(
        "--pixel-step",
        type=int,
        default=DEFAULT_PIXEL_STEP,
        help="compound every n-th row and column of pixels (default: %(default)s)",
    )
    show.add_argument(
        "--title", default=None, help="page title (default: 'Trajectories and reconstructions: PREDICTIONS')"
    )
    show.add_argument(
        "--synthetic", action="store_true", help="label every figure and the page SYNTHETIC DATA"
    )
    show.set_defaults(run=run_show)


def run_show(args) -> int:
    from tusrec.data import open_data

    positive = args.voxel_mm > 0 and math.isfinite(args.voxel_mm)  # NaN and inf are neither
    if args.max_scans < 1 or args.pixel_step < 1 or not positive or args.max_voxels < 1:
        print(
            "error: --max-scans, --pixel-step, --voxel-mm and --max-voxels must be positive (and finite)",
            file=sys.stderr,
        )
        return 2
    data = open_data(args.data)
    shown = show_predictions(
        args.predictions,
        data,
        args.out,
        args.scans,
        args.max_scans,
        args.metrics,
        args.synthetic,
        args.title,
        args.voxel_mm,
        args.max_voxels,
        args.pixel_step,
    )
    bad = [s for s in shown if s.trajectory is None]
    for s in shown:
        r = s.row
        if s.trajectory is None:
            print(f"{s.key}: not shown: {r['message']}", file=sys.stderr)
        else:
            print(f"{s.key}: {r['form']}, GPE {r['GPE']:.3f} mm, LPE {r['LPE']:.3f} mm, {r['seconds']:.1f} s")
    print(f"wrote {len(shown) - len(bad)} scan(s) to {args.out / 'show.html'}")
    return 1 if bad else 0

"""Predicted frame poses and per-frame errors of one predictions file, either form.

A predictions file ``<key>.h5`` is *dense* (GP, LP (N-1, 3, H*W) DDFs; ``form`` "ddf" or
absent) or *compact* (``form`` = "transforms": ``transforms_global`` T(i->0) and/or
``transforms_local`` T(i->i-1), (N-1, 4, 4); docs/conventions.md). What is shown:

* dense: each frame's pose is the least-squares rigid fit (Kabsch, through
  ``scipy.spatial.transform.Rotation.align_vectors``) of the points p + DDF(p) to the
  points p, p the image-mm positions of a grid of pixels (every ``pixel_step``-th row
  and column); the RMS distance of the fitted points to p + DDF(p) is the *fit residual*
  (mm): 0 for a rigid prediction, larger where the DDF is not a rigid motion. The
  per-frame GPE/LPE are computed from the file's own DDFs at every pixel, as scoring does.
* compact: the poses are the file's matrices (missing ones derived as the spec says:
  local[i] = inv(G[i-1]) @ G[i], or global = running product of locals); the per-frame
  GPE/LPE are those of the DDFs the matrices generate (``tusrec.ddf.pixel_ddfs``).

Everything a submission controls is hostile: ``check_prediction_file`` is the one place
that decides whether a file may be read (it is where the strict read policy will plug in).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tusrec.data import (
    EXPECTED_ERROR_SOURCES,
    PREDICTION_PER_FRAME_SETS,
    PREDICTION_PIXEL_SETS,
    Scan,
    TusrecDataError,
    open_h5,
)
from tusrec.ddf import DEFAULT_CHUNK, GroundTruth, pixel_ddfs
from tusrec.geometry import compose_local, local_from_global
from tusrec.scoring.metrics import _norm_sums
from tusrec.scoring.policy import as_text, read_attribute, read_attributes

DENSE, COMPACT = "ddf", "transforms"
TRANSFORM_SETS = ("transforms_global", "transforms_local")
OPTIONAL_SETS = PREDICTION_PER_FRAME_SETS
LAST_ROW_TOLERANCE = 1e-6  # the compact spec's tolerance on (0, 0, 0, 1)
# matrices a derivation inverts must be well conditioned (1 / condition number above this)
INVERTIBLE_RCOND = 1e-12
DEFAULT_PIXEL_STEP = 8  # fit on every 8th row and column: 60 x 80 = 4,800 points a frame


class ShowError(ValueError):
    """A predictions file that cannot be shown (missing, not a plain file, malformed)."""


def file_form(f: h5py.File) -> str:
    """DENSE when the file holds GP and LP (scored on them whatever ``form`` says),
    COMPACT when it declares form="transforms" and has no GP/LP."""
    if all(name in f for name in PREDICTION_PIXEL_SETS):
        return DENSE
    form = f.attrs.get("form", None)
    if isinstance(form, bytes):
        form = form.decode("utf-8", "replace")
    if form == COMPACT:
        return COMPACT
    raise ShowError(f"{f.filename}: no dataset 'GP' (and no attribute form='transforms')")


def _plain_file(path: Path) -> None:
    """Refuse links and anything that is not a regular file (never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ShowError(f"{path}: no prediction file") from None
    if stat.S_ISLNK(st.st_mode):
        raise ShowError(f"{path}: is a symbolic link (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise ShowError(f"{path}: not a regular file")


def _hard_dataset(f: h5py.File, name: str) -> h5py.Dataset | None:
    """The dataset ``name`` if it is a plain one: no soft or external link, no external
    or virtual storage (which would read files outside the predictions file)."""
    link = f.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise ShowError(f"{f.filename}: '{name}' is a link ({type(link).__name__}; not followed)")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise ShowError(f"{f.filename}: '{name}' is not a dataset")
    if ds.is_virtual or ds.external:
        raise ShowError(f"{f.filename}: '{name}' stores its data outside the file")
    return ds


def _check_matrices(m: np.ndarray, name: str, n: int, where: str) -> list[str]:
    if m.shape != (n - 1, 4, 4):
        return [f"{where}: '{name}' has shape {m.shape}, expected {(n - 1, 4, 4)}"]
    if not np.isfinite(m).all():
        bad = int(np.flatnonzero(~np.isfinite(m).all(axis=(1, 2)))[0]) + 1
        return [f"{where}: '{name}' has NaN or Inf values (first in frame {bad})"]
    off = np.abs(m[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    if (off > LAST_ROW_TOLERANCE).any():
        bad = int(np.flatnonzero(off > LAST_ROW_TOLERANCE)[0]) + 1
        return [f"{where}: '{name}' frame {bad}: last row is not (0, 0, 0, 1) within {LAST_ROW_TOLERANCE}"]
    return []


def _invertible(m: np.ndarray) -> np.ndarray:
    """Per matrix (n, 4, 4): whether it is safely invertible (reciprocal condition number)."""
    with np.errstate(all="ignore"):
        cond = np.linalg.cond(m)
    return np.isfinite(cond) & (1.0 / cond > INVERTIBLE_RCOND)


def check_prediction_file(path: Path, scan: Scan) -> tuple[str, list[str]]:
    """(form, problems) of one predictions file, before any of it is used.

    The file must be a regular file (links are not followed), HDF5, opened read-only.
    Dense files: ``tusrec.scoring.score.check_structure`` (datasets, shapes, dtypes; GL/LL
    are not needed here, so K is not checked). Compact files: the matrices' shapes, finite
    values, last rows within 1e-6 of (0, 0, 0, 1), and invertibility of the matrices a
    derivation needs. Values of dense arrays are checked as they are read.
    """
    from tusrec.scoring.score import check_structure

    path = Path(path)
    _plain_file(path)
    n = scan.n_frames
    with open_h5(path) as f:
        form = file_form(f)
        if form == DENSE:
            # every dataset the checks or the reading touch, before any of them is opened
            for name in (*PREDICTION_PIXEL_SETS, "GL", "LL", *TRANSFORM_SETS, *OPTIONAL_SETS):
                _hard_dataset(f, name)
        else:
            for name in OPTIONAL_SETS:
                _hard_dataset(f, name)
            present = [name for name in TRANSFORM_SETS if _hard_dataset(f, name) is not None]
            if not present:
                return form, [f"{path}: form 'transforms' without transforms_global or transforms_local"]
            problems = []
            for name in present:
                ds = f[name]
                if ds.dtype.kind != "f":
                    problems.append(f"{path}: '{name}' has dtype {ds.dtype}, expected float64")
                    continue
                if tuple(ds.shape) != (n - 1, 4, 4):
                    problems.append(f"{path}: '{name}' has shape {tuple(ds.shape)}, expected {(n - 1, 4, 4)}")
                    continue
                problems += _check_matrices(ds[()].astype(np.float64), name, n, str(path))
            if problems:
                return form, problems
            if present == ["transforms_global"]:
                bad = ~_invertible(f["transforms_global"][()].astype(np.float64)[:-1])
                if bad.any():
                    first = int(np.flatnonzero(bad)[0]) + 1
                    return form, [f"{path}: transforms_global frame {first} is not invertible"]
            return form, []
    # GL/LL are not shown, so the scan's K is not needed (None skips them)
    return DENSE, check_structure(path, scan, None)


@dataclass
class PredictedPoses:
    """What ``read_poses`` recovers from one predictions file (entry k is frame k+1).

    global_, local: (N-1, 4, 4) float64, T(i->0) and T(i->i-1) in image mm.
    gpe, lpe: (N-1,) per-frame mean pixel error (mm) against the ground truth.
    residual_global, residual_local: (N-1,) RMS fit residual (mm); dense files only.
    uncertainty: (N-1,) rad^2 and uncertainty_translation: (N-1,) mm, when the file has them.
    expected_error: (N-1,) mm, the predictor's expected LPE per frame, when the file has it.
    """

    form: str
    global_: np.ndarray
    local: np.ndarray
    gpe: np.ndarray
    lpe: np.ndarray
    residual_global: np.ndarray | None = None
    residual_local: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_translation: np.ndarray | None = None
    expected_error: np.ndarray | None = None
    # where the expected error came from: 'error model' or 'error heads' (the predictor's
    # attribute expected_error_source); '' when the file names neither
    expected_error_source: str = ""
    model: str = ""


def fit_grid(height: int, width: int, step: int) -> np.ndarray:
    """Flat indices (row-major, as GP's last axis) of every ``step``-th row and column,
    centred in the image: (P,) int64."""
    rows = np.arange((height - 1) % step // 2, height, step)
    cols = np.arange((width - 1) % step // 2, width, step)
    return (rows[:, None] * width + cols[None, :]).reshape(-1)


def rigid_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid transforms mapping source points onto target points, per frame.

    source: (P, 3) mm, the same points for every frame; target: (n, P, 3) mm.
    Returns (T (n, 4, 4) float64, rms residual (n,) mm). The rotation is scipy's
    Rotation.align_vectors of the centred point sets (Kabsch); t = mean(target) - R mean(source).
    """
    from scipy.spatial.transform import Rotation

    source = np.asarray(source, np.float64)
    mean_s = source.mean(axis=0)
    centred_s = source - mean_s
    out = np.tile(np.eye(4), (len(target), 1, 1))
    residual = np.empty(len(target))
    for k, pts in enumerate(np.asarray(target, np.float64)):
        mean_t = pts.mean(axis=0)
        rot, _ = Rotation.align_vectors(pts - mean_t, centred_s)
        R = rot.as_matrix()
        out[k, :3, :3] = R
        out[k, :3, 3] = mean_t - R @ mean_s
        residual[k] = np.sqrt(np.mean(np.sum((centred_s @ R.T + mean_t - pts) ** 2, axis=1)))
    return out, residual


def _frame_errors(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per frame, the mean over pixels of ||pred - true||: (n, 3, P) float32 each -> (n,)
    mm (the difference in float32, as scoring takes it; sums in float64)."""
    return _norm_sums(pred - true) / pred.shape[2]


def _read_dense(f: h5py.File, gt: GroundTruth, step: int, chunk: int) -> PredictedPoses:
    h, w = gt.image_size
    ts = gt.calib.T_scale
    n = gt.n_frames - 1
    grid = fit_grid(h, w, step)
    y, x = np.divmod(grid, w)
    source = np.stack([(x + 1) * ts[0, 0], (y + 1) * ts[1, 1], np.zeros(len(grid))], axis=1)  # (P, 3) mm
    poses, residuals, errors = {}, {}, {}
    buffer = np.empty((min(chunk, n), 3, h * w), np.float32)
    for name, truth in (("GP", gt.global_), ("LP", gt.local)):
        ds = f[name]
        fitted = np.empty((n, 4, 4))
        res = np.empty(n)
        err = np.empty(n)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = buffer[: stop - start]
            if ds.dtype == np.float32:
                ds.read_direct(block, np.s_[start:stop])
            else:  # float64 or float16 files are accepted by the checks: read and round
                block[...] = ds[start:stop]
            if not np.isfinite(block).all():
                bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))[0]) + 1
                raise ShowError(f"{f.filename}: '{name}' has NaN or Inf values (first in frame {bad})")
            true = pixel_ddfs(truth[start:stop], ts, h, w)
            err[start:stop] = _frame_errors(block, true)
            target = source[None] + np.swapaxes(block[:, :, grid], 1, 2).astype(np.float64)
            fitted[start:stop], res[start:stop] = rigid_fit(source, target)
        poses[name], residuals[name], errors[name] = fitted, res, err
    return PredictedPoses(
        DENSE,
        poses["GP"],
        poses["LP"],
        errors["GP"],
        errors["LP"],
        residuals["GP"],
        residuals["LP"],
    )


def _read_compact(f: h5py.File, gt: GroundTruth, chunk: int) -> PredictedPoses:
    glob = f["transforms_global"][()].astype(np.float64) if "transforms_global" in f else None
    local = f["transforms_local"][()].astype(np.float64) if "transforms_local" in f else None
    if local is None:
        local = local_from_global(glob)
    if glob is None:
        glob = compose_local(local)
    h, w = gt.image_size
    ts = gt.calib.T_scale
    errors = []
    for pred, truth in ((glob, gt.global_), (local, gt.local)):
        err = np.empty(len(pred))
        for s in range(0, len(pred), chunk):
            e = min(s + chunk, len(pred))
            # the DDF is affine in (T - I): the difference of the two fields is the field of
            # pred - true + I (as tusrec.scoring.metrics.transform_pixel_error computes it)
            diff = pred[s:e] - truth[s:e] + np.eye(4)
            err[s:e] = _norm_sums(pixel_ddfs(diff, ts, h, w)) / (h * w)
        errors.append(err)
    return PredictedPoses(COMPACT, glob, local, *errors)


def _optional(f: h5py.File, name: str, n: int) -> np.ndarray | None:
    ds = _hard_dataset(f, name)
    if ds is None or tuple(ds.shape) != (n,) or ds.dtype.kind != "f":
        return None
    values = ds[()].astype(np.float64)
    return values if np.isfinite(values).all() else None


def read_poses(
    path: Path, scan: Scan, gt: GroundTruth, pixel_step: int = DEFAULT_PIXEL_STEP, chunk: int = DEFAULT_CHUNK
) -> PredictedPoses:
    """Poses, per-frame errors and uncertainty of one predictions file (see the module
    docstring). Raises ShowError when the file cannot be used."""
    path = Path(path)
    try:
        form, problems = check_prediction_file(path, scan)
    except TusrecDataError as err:
        raise ShowError(str(err)) from None
    if problems:
        raise ShowError("; ".join(problems))
    with open_h5(path) as f:
        poses = _read_dense(f, gt, pixel_step, chunk) if form == DENSE else _read_compact(f, gt, chunk)
        n = gt.n_frames - 1
        poses.uncertainty = _optional(f, "uncertainty", n)
        poses.uncertainty_translation = _optional(f, "uncertainty_translation_mm", n)
        poses.expected_error = _optional(f, "expected_error_mm", n)
        # A submission's attributes, read as the scorer reads them (size and shape checked,
        # never raising); of the expected error's source only the two values ./predict
        # writes are shown.
        source = as_text(read_attribute(f, "expected_error_source")[0])
        poses.expected_error_source = source if source in EXPECTED_ERROR_SOURCES else ""
        poses.model = read_attributes(f).model
    return poses

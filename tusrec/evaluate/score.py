"""Validate and score a predictions folder against a data folder with ground truth.

The predictions format (written by ``predict``; see the README):

    <predictions>/<key>.h5     GP (N-1, 3, H*W), LP (N-1, 3, H*W) float32 chunked by frame,
                               GL (3, K), LL (3, K); optional transforms_global,
                               transforms_local (N-1, 4, 4), uncertainty (N-1);
                               attributes runtime_seconds, model
    <predictions>/predictions.csv   key, frames, status (ok/failed/timeout), seconds, device, message

Load -> validate -> score -> aggregate. Every scan of the data gets one row; a scan
whose prediction failed, timed out or cannot be scored keeps its row with a status and
no numbers (the ranking scores it 0). One bad scan never stops the others.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from tusrec.data import (
    MANIFEST_FILE,
    PREDICTION_LANDMARK_SETS,
    PREDICTION_PIXEL_SETS,
    Scan,
    TusrecData,
    TusrecDataError,
    atomic_path,
    open_h5,
    read_manifest,
)
from tusrec.ddf import DEFAULT_CHUNK, GroundTruth
from tusrec.evaluate.metrics import PredictionValueError, landmark_errors, pixel_errors, scan_length_mm

OK, FAILED, TIMEOUT, INVALID, MISSING = "ok", "failed", "timeout", "invalid", "missing"
ERRORS = ("GPE", "GLE", "LPE", "LLE")
METRICS_H5_SETS = (*ERRORS, "time_elapsed")
STATUSES = (OK, FAILED, TIMEOUT, MISSING, INVALID)
# What metrics.csv says about each scan besides its errors.
DESCRIPTIVE = (
    "subject",
    "scan",
    "protocol",
    "arm",
    "orientation",
    "shape",
    "direction",
    "frames",
    "scan_length_mm",
)
TABLE_ORDER = (
    "key",
    *DESCRIPTIVE,
    "status",
    *ERRORS,
    "runtime_s",
    *(f"{e}_identity" for e in ERRORS),
    "message",
)


@dataclass
class Problem:
    """One thing wrong with a predictions folder, for one scan (or the folder: key None)."""

    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


# --------------------------------------------------------------------------- validation


def prediction_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"{key}.h5"


def check_structure(path: Path, scan: Scan, n_landmarks: int | None = -1) -> list[str]:
    """Problems with the datasets of one prediction file (shapes, dtypes), without
    reading the dense arrays. n_landmarks: K of the scan (None: no landmarks; -1: read
    them from the scan)."""
    n, h, w = scan.shape
    if n_landmarks == -1:
        n_landmarks = len(scan.read_landmarks()) if scan.has_landmarks else None
    problems = []
    try:
        with open_h5(path) as f:
            for name in PREDICTION_PIXEL_SETS:
                problems += _check_set(f, name, (n - 1, 3, h * w))
            for name in PREDICTION_LANDMARK_SETS:
                if n_landmarks is None:
                    continue
                problems += _check_set(f, name, (3, n_landmarks))
            for name, shape in (("transforms_global", (n - 1, 4, 4)), ("transforms_local", (n - 1, 4, 4))):
                if name in f:
                    problems += _check_set(f, name, shape)
            if "uncertainty" in f:
                problems += _check_set(f, "uncertainty", (n - 1,))
    except TusrecDataError as err:
        problems.append(str(err))
    return problems


def _check_set(f: h5py.File, name: str, shape: tuple) -> list[str]:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        return [f"{f.filename}: no dataset '{name}' (expected float32 {shape})"]
    ds = f[name]
    out = []
    if tuple(ds.shape) != shape:
        out.append(f"{f.filename}: '{name}' has shape {tuple(ds.shape)}, expected {shape}")
    if ds.dtype.kind != "f":
        out.append(f"{f.filename}: '{name}' has dtype {ds.dtype}, expected float32")
    return out


def check_finite(path: Path) -> list[str]:
    """Read every float dataset of a prediction file chunk by chunk; report NaN/Inf."""
    problems = []
    with open_h5(path) as f:
        for name in (*PREDICTION_PIXEL_SETS, *PREDICTION_LANDMARK_SETS):
            if name not in f:
                continue
            ds = f[name]
            step = DEFAULT_CHUNK if ds.ndim == 3 else len(ds)
            for start in range(0, len(ds), step):
                block = ds[start : start + step]
                finite = np.isfinite(block).reshape(len(block), -1)
                if not finite.all():
                    where = ""
                    if ds.ndim == 3:
                        where = f" (first in frame {start + 1 + int(np.flatnonzero(~finite.all(axis=1))[0])})"
                    problems.append(f"{path}: '{name}' has NaN or Inf values{where}")
                    break
    return problems


def check_predictions(folder: str | Path, data: TusrecData, values: bool = True) -> list[Problem]:
    """Everything wrong with a predictions folder, scan by scan.

    Checks: the folder exists and has predictions; every scan of the data has a file or a
    manifest row saying it failed; no file belongs to no scan; the manifest (if any) names
    only known scans, agrees with the files and has the right frame counts; every file is
    HDF5 with the right datasets, shapes and float dtype; with ``values``, no NaN or Inf.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [Problem(None, f"{folder}: predictions folder not found")]
    files = {p.stem: p for p in folder.glob("*.h5")}
    if not files and not (folder / MANIFEST_FILE).exists():
        return [Problem(None, f"{folder}: empty predictions folder (expected <key>.h5 files)")]
    problems: list[Problem] = []
    try:
        manifest = read_manifest(folder)
    except TusrecDataError as err:
        problems.append(Problem(None, str(err)))
        manifest = None
    known = set(data.keys)
    for key in sorted(set(files) - known):
        problems.append(Problem(key, f"{files[key]} belongs to no scan of {data.root}"))
    if manifest is not None:
        for key in sorted(set(manifest.index) - known):
            problems.append(Problem(key, f"{folder / MANIFEST_FILE}: row for unknown scan {key!r}"))
    for scan in data.scans:
        key = scan.key
        row = manifest.loc[key] if manifest is not None and key in manifest.index else None
        status = str(row["status"]) if row is not None else None
        if status is not None and status not in (OK, FAILED, TIMEOUT):
            problems.append(Problem(key, f"manifest status {status!r}; expected ok, failed or timeout"))
        if key not in files:
            if status in (FAILED, TIMEOUT):
                continue  # declared: the scan scores 0, but the folder is consistent
            where = " (the manifest says ok)" if status == OK else ""
            problems.append(Problem(key, f"no prediction file {prediction_path(folder, key)}{where}"))
            continue
        if manifest is not None and row is None:
            problems.append(Problem(key, f"{files[key].name} has no row in {MANIFEST_FILE}"))
        if (
            row is not None
            and "frames" in row
            and not pd.isna(row["frames"])
            and int(row["frames"]) != scan.n_frames
        ):
            problems.append(
                Problem(key, f"manifest says {int(row['frames'])} frames, the scan has {scan.n_frames}")
            )
        structure = check_structure(files[key], scan)
        problems += [Problem(key, m) for m in structure]
        if values and not structure:
            problems += [Problem(key, m) for m in check_finite(files[key])]
    return problems


# --------------------------------------------------------------------------- scoring


def _signature(*paths: Path | None) -> list:
    """What a cached score depends on: size and modification time of each input file."""
    out = []
    for p in paths:
        if p is not None and Path(p).exists():
            st = Path(p).stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def scan_row(scan: Scan) -> dict:
    """The descriptive part of a scan's row: key, subject, pattern, frames."""
    return {
        "key": scan.key,
        "subject": scan.subject,
        "scan": scan.name,
        **scan.pattern.as_dict(),
        "frames": scan.n_frames,
    }


def score_scan(
    path: Path, scan: Scan, gt: GroundTruth, landmarks: np.ndarray | None, chunk: int = DEFAULT_CHUNK
) -> dict:
    """Errors of one prediction file (raises PredictionValueError / TusrecDataError if it
    cannot be scored). Returns the four errors, their identity counterparts and the
    runtime recorded in the file."""
    problems = check_structure(path, scan, None if landmarks is None else len(landmarks))
    if problems:
        raise PredictionValueError("; ".join(problems))
    ts = gt.calib.T_scale
    out: dict = {}
    try:
        _score_datasets(path, gt, landmarks, chunk, ts, out)
    except PredictionValueError as err:
        raise PredictionValueError(f"{path}: {err}") from None
    return out


def _score_datasets(path: Path, gt: GroundTruth, landmarks, chunk: int, ts: np.ndarray, out: dict) -> None:
    with open_h5(path) as f, ThreadPoolExecutor(max_workers=2) as pool:
        # GP and LP side by side: numpy releases the GIL in the arithmetic, which is
        # most of the work, so two cores score nearly twice as fast.
        pending = {
            name: pool.submit(pixel_errors, f[name], transforms, ts, gt.image_size, chunk, name)
            for name, transforms in (("GP", gt.global_), ("LP", gt.local))
        }
        for name, future in pending.items():
            pair = future.result()
            out[f"{name}E"], out[f"{name}E_identity"] = pair.error, pair.identity
        for name, transforms in (("GL", gt.global_), ("LL", gt.local)):
            if landmarks is None:
                out[f"{name}E"] = out[f"{name}E_identity"] = math.nan
                continue
            pair = landmark_errors(f[name][()], transforms, ts, landmarks, name)
            out[f"{name}E"], out[f"{name}E_identity"] = pair.error, pair.identity
        out["runtime_file_s"] = float(f.attrs.get("runtime_seconds", math.nan))
        out["model"] = str(f.attrs.get("model", ""))


def score_predictions(
    folder: str | Path,
    data: TusrecData,
    out_dir: str | Path,
    chunk: int = DEFAULT_CHUNK,
    keys: list[str] | None = None,
) -> pd.DataFrame:
    """Score every scan; write metrics.csv and the organisers' metrics.h5 into out_dir.

    Per scan results are cached in out_dir/scans/<key>.json together with the sizes and
    times of the files they came from, so a rerun scores only what changed.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise TusrecDataError(f"{folder}: predictions folder not found")
    if not any(folder.glob("*.h5")) and not (folder / MANIFEST_FILE).exists():
        raise TusrecDataError(f"{folder}: empty predictions folder (expected <key>.h5 files)")
    scans = data.select(keys)
    missing_gt = [s.key for s in scans if not s.has_tforms]
    if missing_gt:
        raise TusrecDataError(
            f"{data.root}: no ground truth for {len(missing_gt)} scan(s) (e.g. {missing_gt[0]}): "
            "scoring needs the transfs/ folder of the validation layout"
        )
    manifest = read_manifest(folder)
    calib = data.calibration
    cache_dir = out_dir / "scans"
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scan in tqdm(scans, desc="score", unit="scan", disable=None):
        path = prediction_path(folder, scan.key)
        mrow = manifest.loc[scan.key] if manifest is not None and scan.key in manifest.index else None
        signature = _signature(path, scan.tforms_path, scan.landmark_path, folder / MANIFEST_FILE)
        cache = cache_dir / f"{scan.key}.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("signature") == signature:
                rows.append(cached["row"])
                continue
        row = _score_one(scan, path, mrow, calib, chunk)
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({"signature": signature, "row": row}))
        rows.append(row)
    table = pd.DataFrame(rows)
    write_metrics(table, out_dir)
    return table


def _score_one(scan: Scan, path: Path, mrow, calib, chunk: int) -> dict:
    row = scan_row(scan)
    row.update({e: math.nan for e in ERRORS})
    row.update({"status": OK, "message": "", "runtime_s": math.nan})
    if mrow is not None and "seconds" in mrow and not pd.isna(mrow["seconds"]):
        row["runtime_s"] = float(mrow["seconds"])
    try:
        gt = GroundTruth.from_scan(scan, calib)
        row["scan_length_mm"] = scan_length_mm(gt.local, calib.T_scale, scan.image_size)
        landmarks = scan.read_landmarks() if scan.has_landmarks else None
    except TusrecDataError as err:
        row.update(status=INVALID, message=f"ground truth unreadable: {err}")
        return row
    declared = str(mrow["status"]) if mrow is not None else None
    if declared in (FAILED, TIMEOUT):
        message = mrow.get("message", "")
        row.update(status=declared, message="" if pd.isna(message) else str(message))
        return row
    if not path.exists():
        row.update(status=MISSING, message=f"no prediction file {path.name}")
        return row
    try:
        row.update(score_scan(path, scan, gt, landmarks, chunk))
    except (PredictionValueError, TusrecDataError) as err:
        row.update(status=INVALID, message=str(err))
        for e in ERRORS:
            row[e] = math.nan
        return row
    if math.isnan(row["runtime_s"]):
        row["runtime_s"] = row["runtime_file_s"]
    if landmarks is None:
        row["message"] = "no landmarks in the data: GLE and LLE not scored"
    if mrow is not None:
        message = mrow.get("message", "")
        if not pd.isna(message) and str(message):
            row["message"] = str(message)
    return row


def write_metrics(table: pd.DataFrame, out_dir: Path) -> None:
    """metrics.csv (every column) and metrics.h5 (the organisers' datasets: one value per
    scan, NaN where the scan was not scored, plus the scan keys)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = [c for c in TABLE_ORDER if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    with atomic_path(out_dir / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "metrics.h5") as tmp, h5py.File(tmp, "w") as f:
        for name in ERRORS:
            f.create_dataset(name, data=table[name].to_numpy(dtype=np.float64))
        f.create_dataset("time_elapsed", data=table["runtime_s"].to_numpy(dtype=np.float64))
        f.create_dataset("keys", data=np.array(table["key"].tolist(), dtype=h5py.string_dtype()))


def summary(table: pd.DataFrame) -> str:
    """Mean and sample sd (ddof 1, as the leaderboard and the challenge's tables report it)
    of each error and the runtime over the scored scans, and status counts."""
    ok = table[table["status"] == OK]
    lines = [f"{len(ok)} of {len(table)} scans scored"]
    counts = table["status"].value_counts()
    others = {k: int(v) for k, v in counts.items() if k != OK}
    if others:
        lines[0] += " (" + ", ".join(f"{v} {k}" for k, v in others.items()) + ")"
    lines.append("  mean and sd over the scored scans (sd: sample standard deviation, ddof 1)")
    for name in (*ERRORS, "runtime_s"):
        values = ok[name].dropna()
        unit = "s" if name == "runtime_s" else "mm"
        if len(values):
            sd = f"{values.std(ddof=1):.4f}" if len(values) > 1 else "n/a (one scan)"
            lines.append(f"  {name:9} {values.mean():9.4f} {unit:2}  sd {sd}")
        else:
            lines.append(f"  {name:9}       n/a")
    return "\n".join(lines)

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

import contextlib
import json
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from tusrec.data import (
    MANIFEST_FILE,
    PREDICTION_LANDMARK_SETS,
    PREDICTION_PER_FRAME_SETS,
    PREDICTION_PIXEL_SETS,
    Scan,
    TusrecData,
    TusrecDataError,
    atomic_path,
    read_manifest,
    write_csv,
)
from tusrec.ddf import DEFAULT_CHUNK, GroundTruth, landmark_ddfs
from tusrec.geometry import compose_local
from tusrec.scoring import worker
from tusrec.scoring.metrics import (
    PredictionValueError,
    landmark_errors,
    pixel_errors,
    rigid_pixel_errors,
    scan_length_mm,
)
from tusrec.scoring.policy import (
    FORM_DENSE,
    FORM_TRANSFORMS,
    PolicyError,
    clean_text,
    compression_problem,
    link_kind,
    open_dataset,
    open_prediction,
    parse_declared,
    read_attributes,
    regular_file_problem,
)
from tusrec.scoring.readahead import WINDOW_BYTES, ReadAhead

OK, FAILED, TIMEOUT, INVALID, MISSING = "ok", "failed", "timeout", "invalid", "missing"
TRANSFORM_SETS = ("transforms_global", "transforms_local")
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


def _pixel_shape(scan_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    n, h, w = scan_shape
    return (n - 1, 3, h * w)


def _structure_problems(f: h5py.File, scan_shape: tuple, n_landmarks: int | None) -> list[str]:
    """Policy problems of every dataset of an open file that its form names (no data read)."""
    n = scan_shape[0]
    attrs = read_attributes(f)
    dense = any(link_kind(f, name) is not None for name in PREDICTION_PIXEL_SETS)
    problems = []
    wanted: list[tuple[str, tuple, bool]] = []  # (name, shape, required)
    if dense or attrs.form != FORM_TRANSFORMS:
        wanted += [(name, _pixel_shape(scan_shape), True) for name in PREDICTION_PIXEL_SETS]
    elif not any(link_kind(f, name) is not None for name in TRANSFORM_SETS):
        problems.append(f"{_name(f)}: form='transforms' but no dataset {' or '.join(TRANSFORM_SETS)}")
    if n_landmarks is not None:
        required = dense or attrs.form != FORM_TRANSFORMS
        wanted += [(name, (3, n_landmarks), required) for name in PREDICTION_LANDMARK_SETS]
    wanted += [(name, (n - 1, 4, 4), False) for name in TRANSFORM_SETS]
    wanted += [(name, (n - 1,), False) for name in PREDICTION_PER_FRAME_SETS]
    for name, shape, required in wanted:
        if not required and link_kind(f, name) is None:
            continue
        try:
            open_dataset(f, name, shape)
        except PolicyError as err:
            problems.append(str(err))
    if not problems:
        problem = compression_problem(f, [name for name, _, _ in wanted])
        if problem:
            problems.append(problem)
    return problems


def _name(f: h5py.File) -> str:
    return getattr(f, "_policy_name", None) or str(f.filename)


def check_structure(path: Path, scan: Scan, n_landmarks: int | None = -1) -> list[str]:
    """Problems with the datasets of one prediction file under the read policy (links,
    storage, filters, shapes, dtypes, chunk layout), without reading the arrays.
    n_landmarks: K of the scan (None: no landmarks; -1: read them from the scan)."""
    if n_landmarks == -1:
        n_landmarks = len(scan.read_landmarks()) if scan.has_landmarks else None
    try:
        with open_prediction(path) as f:
            return _structure_problems(f, scan.shape, n_landmarks)
    except TusrecDataError as err:
        return [str(err)]


def check_finite(path: Path) -> list[str]:
    """Read every float dataset of a prediction file chunk by chunk; report NaN/Inf.

    Only datasets that pass the read policy are read (check_structure reports the rest).
    """
    problems = []
    with open_prediction(path) as f:
        for name in (*PREDICTION_PIXEL_SETS, *PREDICTION_LANDMARK_SETS, *TRANSFORM_SETS):
            if link_kind(f, name) != "hard" or not isinstance(f[name], h5py.Dataset):
                continue
            try:
                ds = open_dataset(f, name, f[name].shape)
            except PolicyError:
                continue  # check_structure reports it
            # Blocks of whole chunks (a chunk is decompressed once), about DEFAULT_CHUNK frames.
            span = ds.chunks[0] if ds.chunks else 1
            step = -(-DEFAULT_CHUNK // span) * span if ds.ndim == 3 else max(len(ds), 1)
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


def check_file(
    path: str | Path, scan_shape: tuple, n_landmarks: int | None, values: bool = True
) -> list[str]:
    """check_structure + check_finite of one file (the worker runs this; never raises
    for a bad file: every problem is a message)."""
    path = Path(path)
    try:
        with open_prediction(path) as f:
            problems = _structure_problems(f, scan_shape, n_landmarks)
    except TusrecDataError as err:
        return [str(err)]
    if values and not problems:
        problems += check_finite(path)
        if not problems:
            try:
                with open_prediction(path) as f:
                    _read_compact(f, scan_shape)  # transforms: last rows, invertibility
            except (TusrecDataError, PredictionValueError) as err:
                problems.append(str(err))
    return problems


MAX_STRAY_LISTED = 20  # a folder of a million stray files is named by a count, not listed


def stray_entries(folder: str | Path) -> list[str]:
    """What a predictions folder holds besides <key>.h5 files and predictions.csv (notes,
    logs, folders, links...), which checking and scoring ignore: one line each, at most
    MAX_STRAY_LISTED and then a count. Names are printed as text (clean_text); nothing is
    followed or opened."""
    folder = Path(folder)
    lines, count = [], 0
    try:
        entries = os.scandir(folder)
    except OSError:
        return []
    with entries:
        for entry in entries:
            if entry.name == MANIFEST_FILE or entry.name.endswith(".h5"):
                continue
            count += 1
            if count <= MAX_STRAY_LISTED:
                name = clean_text(str(folder / entry.name), 300)
                lines.append(f"{name}: not a prediction file (<key>.h5) nor {MANIFEST_FILE}; ignored")
    if count > MAX_STRAY_LISTED:
        more = count - MAX_STRAY_LISTED
        lines.append(f"{folder}: {more} more entries that are not prediction files; ignored")
    return lines


def check_predictions(
    folder: str | Path, data: TusrecData, values: bool = True, limits: ScoreLimits | None = None
) -> list[Problem]:
    """Everything wrong with a predictions folder, scan by scan.

    Checks: the folder exists and has predictions; every scan of the data has a file or a
    manifest row saying it failed; no file belongs to no scan; the manifest (if any) names
    only known scans, agrees with the files and has the right frame counts; every file is
    a regular HDF5 file whose datasets pass the read policy (tusrec.scoring.policy); with
    ``values``, no NaN or Inf and valid transforms. Each file is read in a bounded worker
    process (``limits``), so a hostile file costs its own scan a problem, nothing more.
    """
    limits = limits or ScoreLimits()
    folder = Path(folder)
    if not folder.is_dir():
        return [Problem(None, f"{folder}: predictions folder not found")]
    files = {p.stem: p for p in folder.glob("*.h5")}
    if not files and not os.path.lexists(folder / MANIFEST_FILE):
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
        for key in sorted(set(manifest.index) - known, key=str):
            problems.append(
                Problem(key, f"{folder / MANIFEST_FILE}: row for unknown scan {clean_text(key, 80)!r}")
            )
    for scan in data.scans:
        key = scan.key
        row = manifest.loc[key] if manifest is not None and key in manifest.index else None
        declared = parse_declared(row)
        if declared.problem:
            problems.append(Problem(key, declared.problem))
        if row is not None and declared.frames_given and declared.frames is None:
            problems.append(
                Problem(
                    key, f"manifest frames={clean_text(str(row.get('frames')), 40)!r} is not a frame count"
                )
            )
        problems += [Problem(key, note) for note in declared.notes]
        if key not in files:
            if declared.status in (FAILED, TIMEOUT):
                continue  # declared: the scan scores 0, but the folder is consistent
            where = " (the manifest says ok)" if declared.status == OK else ""
            problems.append(Problem(key, f"no prediction file {prediction_path(folder, key)}{where}"))
            continue
        if manifest is not None and row is None:
            problems.append(Problem(key, f"{files[key].name} has no row in {MANIFEST_FILE}"))
        if declared.frames is not None and declared.frames != scan.n_frames:
            problems.append(
                Problem(key, f"manifest says {declared.frames} frames, the scan has {scan.n_frames}")
            )
        n_landmarks = len(scan.read_landmarks()) if scan.has_landmarks else None
        job = (str(files[key]), scan.shape, n_landmarks, values)
        result, failure = run_bounded(check_file, job, limits, limits.seconds_for(scan.shape))
        messages = [f"{files[key]}: {failure}"] if failure else result
        problems += [Problem(key, m) for m in messages]
    return problems


# --------------------------------------------------------------------------- bounded worker


@dataclass(frozen=True)
class ScoreLimits:
    """Bounds of the worker process that reads one team's file.

    memory_mb: address-space cap of the worker (RLIMIT_AS, MiB). time_s: wall-time cap
    (None: base_s + s_per_gigapixel * (N-1)*H*W / 1e9, i.e. proportional to the scan).
    chunk: frames per scoring chunk. readahead_mb: how far ahead of the scorer the kernel
    is asked to read a dense file (per pixel set, MiB of page cache; 0: not asked;
    tusrec.scoring.readahead). isolate=False reads in this process (debugging only).
    """

    memory_mb: int = 2048
    time_s: float | None = None
    # Generous: the dense benchmark scores N = 1,600 at 480x640 in 19 s on an idle 2-core
    # machine; these give 148 s at N = 150 and 415 s at N = 1,600, room for a loaded host.
    base_s: float = 120.0
    s_per_gigapixel: float = 600.0
    chunk: int = DEFAULT_CHUNK
    readahead_mb: int = WINDOW_BYTES >> 20
    isolate: bool = True

    def seconds_for(self, scan_shape: tuple[int, int, int]) -> float:
        if self.time_s is not None:
            return float(self.time_s)
        n, h, w = scan_shape
        return self.base_s + self.s_per_gigapixel * (n - 1) * h * w / 1e9


def run_bounded(fn, args: tuple, limits: ScoreLimits, seconds: float):
    """fn(*args) in a bounded worker (tusrec.scoring.worker) with limits.memory_mb of
    address space and ``seconds`` of wall time.

    Returns (result, None) or (None, reason): the reason says why there is no result
    (fn raised for a bad file, the worker ran out of time, was killed or crashed).
    fn must be a module-level function; args are sent by pickle, the result comes back
    as JSON (numbers, strings, lists, dicts).
    """
    if not limits.isolate:
        try:
            return fn(*args), None
        except (TusrecDataError, PredictionValueError) as err:
            return None, str(err)
        except Exception as err:
            return None, f"unreadable ({type(err).__name__}: {clean_text(str(err), 300)})"
    kind, value = worker.SERVER.run(fn.__module__, fn.__qualname__, args, limits.memory_mb, seconds)
    return (value, None) if kind == "ok" else (None, value)


# --------------------------------------------------------------------------- scoring


def file_signature(*paths: Path | None) -> list:
    """What a cached score depends on: size and modification time of each input file.

    lstat: a link is described as itself (the policy refuses it anyway), never by its target.
    """
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.lstat(p)
        except OSError:
            continue
        out.append([str(p), st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode)])
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


def _read_transforms(f: h5py.File, name: str, n: int) -> np.ndarray | None:
    """transforms_global / transforms_local as float64 (N-1, 4, 4), checked (None if absent)."""
    if link_kind(f, name) is None:
        return None
    t = np.asarray(open_dataset(f, name, (n - 1, 4, 4))[()], dtype=np.float64)
    if not np.isfinite(t).all():
        raise PredictionValueError(f"{_name(f)}: '{name}' has NaN or Inf values")
    bad = np.flatnonzero(np.abs(t[:, 3, :] - [0.0, 0.0, 0.0, 1.0]).max(axis=1) > 1e-6)
    if len(bad):
        raise PredictionValueError(
            f"{_name(f)}: '{name}' frame {bad[0] + 1}: last row {t[bad[0], 3].tolist()} is not (0, 0, 0, 1)"
        )
    return t


def _read_compact(f: h5py.File, scan_shape: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """(global, local) (N-1, 4, 4) float64 of a compact file, each derived from the other
    when absent (the compact-form spec); None for a dense file."""
    n = scan_shape[0]
    if any(link_kind(f, name) is not None for name in PREDICTION_PIXEL_SETS):
        return None
    glob = _read_transforms(f, "transforms_global", n)
    local = _read_transforms(f, "transforms_local", n)
    if glob is None and local is None:
        raise PolicyError(f"{_name(f)}: form='transforms' but no dataset {' or '.join(TRANSFORM_SETS)}")
    if local is None:
        # local[i] = inv(G[i-1]) @ G[i], G[-1] = I: every G but the last is inverted.
        cond = np.linalg.cond(glob[:-1]) if n > 2 else np.ones(0)
        bad = np.flatnonzero(~(cond < 1e12))
        if len(bad):
            raise PredictionValueError(
                f"{_name(f)}: 'transforms_global' frame {bad[0] + 1} is not invertible (needed to derive LP)"
            )
        local = glob.copy()
        local[1:] = np.linalg.inv(glob[:-1]) @ glob[1:]
    if glob is None:
        glob = compose_local(local)
    return glob, local


def score_prediction_file(
    path: str | Path,
    scan_shape: tuple[int, int, int],
    gt: GroundTruth,
    landmarks: np.ndarray | None,
    chunk: int = DEFAULT_CHUNK,
    readahead_bytes: int = WINDOW_BYTES,
) -> dict:
    """Errors of one prediction file under the read policy, dense or compact.

    scan_shape: (N, H, W). gt: the scan's ground truth. landmarks: (K, 3) or None.
    readahead_bytes: the read-ahead window of a dense file's GP and LP (0: none).
    Returns GPE/GLE/LPE/LLE, their identity counterparts, runtime_file_s, model, form and
    notes (list of str). Raises PolicyError / PredictionValueError / TusrecDataError.
    This is what the bounded worker runs; it opens nothing but ``path``.
    """
    path = Path(path)
    ts = gt.calib.T_scale
    out: dict = {}
    with open_prediction(path) as f:
        problems = _structure_problems(f, scan_shape, None if landmarks is None else len(landmarks))
        if problems:
            raise PolicyError("; ".join(problems))
        attrs = read_attributes(f)
        notes = list(attrs.notes)
        compact = _read_compact(f, scan_shape)
        if compact is None:
            sources = {name: f[name] for name in PREDICTION_PIXEL_SETS}
            if attrs.form == FORM_TRANSFORMS:
                notes.append("form='transforms' but the file holds GP and LP: scored on its dense arrays")
            elif attrs.form not in (None, FORM_DENSE):
                notes.append(f"unknown form {attrs.form!r} ignored: scored on its dense arrays")
            # Read blocks of whole file chunks, so that each chunk is read once.
            spans = {f[name].chunks[0] if f[name].chunks else 1 for name in sources}
            span = spans.pop() if len(spans) == 1 else 1
            step = -(-chunk // span) * span  # chunk rounded up to whole chunks (< chunk + 16)
            # The disk reads the next frames while these are scored (only a hint to the kernel).
            prefetch = ReadAhead(f._policy_fd, readahead_bytes) if readahead_bytes > 0 else None
        else:
            # Rigid: the errors follow from the matrices (metrics.rigid_pixel_errors),
            # without generating either dense field.
            glob, local = compact
            sources = {"GP": glob, "LP": local}
            step = chunk
            prefetch = None
        out["form"] = FORM_DENSE if compact is None else FORM_TRANSFORMS
        try:
            with ThreadPoolExecutor(max_workers=2) as pool, contextlib.ExitStack() as stack:
                if prefetch is not None:
                    stack.callback(prefetch.close)
                # GP and LP side by side: numpy releases the GIL in the arithmetic, which is
                # most of the work, so two cores score nearly twice as fast.
                pending = {}
                for name, transforms in (("GP", gt.global_), ("LP", gt.local)):
                    args = (sources[name], transforms, ts, gt.image_size, step, name)
                    if compact is None:
                        pending[name] = pool.submit(pixel_errors, *args, prefetch)
                    else:
                        pending[name] = pool.submit(rigid_pixel_errors, *args)
                for name, future in pending.items():
                    pair = future.result()
                    out[f"{name}E"], out[f"{name}E_identity"] = pair.error, pair.identity
            for name, transforms, own in (("GL", gt.global_, 0), ("LL", gt.local, 1)):
                if landmarks is None:
                    out[f"{name}E"] = out[f"{name}E_identity"] = math.nan
                    continue
                if compact is not None and link_kind(f, name) is None:
                    pred = landmark_ddfs(compact[own], ts, landmarks)  # derived at the landmarks
                else:
                    pred = f[name][()]
                pair = landmark_errors(pred, transforms, ts, landmarks, name)
                out[f"{name}E"], out[f"{name}E_identity"] = pair.error, pair.identity
        except PredictionValueError as err:
            raise PredictionValueError(f"{path}: {err}") from None
        out["runtime_file_s"] = attrs.runtime_seconds
        out["model"] = attrs.model
        out["notes"] = notes
    return out


def score_scan(
    path: Path, scan: Scan, gt: GroundTruth, landmarks: np.ndarray | None, chunk: int = DEFAULT_CHUNK
) -> dict:
    """Errors of one prediction file, in this process (raises PredictionValueError /
    TusrecDataError if it cannot be scored). Returns the four errors, their identity
    counterparts and the runtime recorded in the file. Untrusted files go through
    score_file, which runs this in a bounded worker."""
    out = score_prediction_file(path, scan.shape, gt, landmarks, chunk)
    out.pop("notes", None)
    return out


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def score_file(scan: Scan, path: str | Path, declared, calib, *, limits: ScoreLimits | None = None) -> dict:
    """The metrics row (TABLE_ORDER columns, plus runtime_file_s, model, form) of one scan.

    path: the scan's prediction file (it may be missing, a link, anything). declared:
    the team's manifest row (pandas Series / dict, any cell types) or an outcome the
    runner imposes ({'status': 'failed'|'timeout', 'message', 'seconds'}), or None;
    parsed defensively (tusrec.scoring.policy.parse_declared). calib: the data's
    Calibration. The file is read, under the read policy, in a worker process with
    ``limits`` (memory and wall-time caps) that is handed only this path, the scan's
    ground truth and landmarks; a worker that fails, dies or runs out of time makes the
    scan ``invalid`` with the reason. Never raises for anything the team controls.
    """
    limits = limits or ScoreLimits()
    path = Path(path)
    row = scan_row(scan)
    row.update({e: math.nan for e in ERRORS})
    row.update({f"{e}_identity": math.nan for e in ERRORS})
    row.update({"status": OK, "message": "", "runtime_s": math.nan})
    d = parse_declared(declared)
    try:
        gt = GroundTruth.from_scan(scan, calib)
        row["scan_length_mm"] = scan_length_mm(gt.local, calib.T_scale, scan.image_size)
        landmarks = scan.read_landmarks() if scan.has_landmarks else None
    except TusrecDataError as err:
        row.update(status=INVALID, message=f"ground truth unreadable: {err}")
        return row
    row["runtime_s"] = d.seconds
    if d.status == INVALID:
        row.update(status=INVALID, message=_join(d.problem, *d.notes))
        return row
    if d.status in (FAILED, TIMEOUT):
        row.update(status=d.status, message=_join(d.message, *d.notes))
        return row
    if not os.path.lexists(path):
        row.update(status=MISSING, message=_join(f"no prediction file {path.name}", *d.notes))
        return row
    problem = regular_file_problem(path)
    if problem:
        row.update(status=INVALID, message=_join(problem, *d.notes))
        return row
    job = (str(path), scan.shape, gt, landmarks, limits.chunk, int(limits.readahead_mb) << 20)
    result, failure = run_bounded(score_prediction_file, job, limits, limits.seconds_for(scan.shape))
    if failure is not None:
        why = failure if str(path) in failure else f"{path}: {failure}"
        row.update(status=INVALID, message=_join(why, *d.notes))
        return row
    notes = result.pop("notes")
    row.update(result)
    if math.isnan(row["runtime_s"]) and not d.notes:
        row["runtime_s"] = row["runtime_file_s"]
    default = "no landmarks in the data: GLE and LLE not scored" if landmarks is None else ""
    row["message"] = _join(d.message or default, *d.notes, *notes)
    return row


@dataclass
class ScoringJob:
    """One scan's scoring as score_predictions plans it: run() scores the file with
    score_file (bounded worker, read policy), caches the row atomically at ``cache`` and
    returns it. The same jobs run in this process or, one unit each, on a Dask cluster
    (tusrec.cluster), so both paths give the same rows and caches."""

    scan: Scan
    path: Path
    declared: object  # the team's manifest row (pandas Series) or None
    calib: object
    limits: ScoreLimits
    cache: Path
    signature: list
    note: str = ""

    def run(self) -> dict:
        row = score_file(self.scan, self.path, self.declared, self.calib, limits=self.limits)
        if self.note:
            row["message"] = _join(row["message"], self.note)
        with atomic_path(self.cache) as tmp:
            tmp.write_text(json.dumps({"signature": self.signature, "row": row}))
        return row


@dataclass
class ScoringPlan:
    """What a scoring of a predictions folder needs done: the scans in table order, the
    rows already cached (by key) and a job for every other scan."""

    scans: list[Scan]
    rows: dict[str, dict]
    jobs: list[ScoringJob]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([self.rows[s.key] for s in self.scans if s.key in self.rows])


def plan_scoring(
    folder: str | Path,
    data: TusrecData,
    out_dir: str | Path,
    limits: ScoreLimits,
    keys: list[str] | None = None,
) -> ScoringPlan:
    """Check the folder and the ground truth, read the cached rows of out_dir/scans/ whose
    input files (sizes and times) are unchanged, and plan a job for every other scan."""
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise TusrecDataError(f"{folder}: predictions folder not found")
    if not any(folder.glob("*.h5")) and not os.path.lexists(folder / MANIFEST_FILE):
        raise TusrecDataError(f"{folder}: empty predictions folder (expected <key>.h5 files)")
    scans = data.select(keys)
    data.require_ground_truth(scans, "scoring needs the transfs/ folder of the validation layout")
    try:
        manifest, manifest_note = read_manifest(folder), ""
    except TusrecDataError as err:  # the team's manifest is the team's problem
        manifest, manifest_note = None, f"manifest ignored: {err}"
    calib = data.calibration
    cache_dir = out_dir / "scans"
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = ScoringPlan(scans, {}, [])
    for scan in scans:
        path = prediction_path(folder, scan.key)
        mrow = manifest.loc[scan.key] if manifest is not None and scan.key in manifest.index else None
        signature = file_signature(path, scan.tforms_path, scan.landmark_path, folder / MANIFEST_FILE)
        signature.append(["limits", limits.memory_mb, limits.chunk])
        cache = cache_dir / f"{scan.key}.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("signature") == signature:
                plan.rows[scan.key] = cached["row"]
                continue
        plan.jobs.append(ScoringJob(scan, path, mrow, calib, limits, cache, signature, manifest_note))
    return plan


def score_predictions(
    folder: str | Path,
    data: TusrecData,
    out_dir: str | Path,
    chunk: int = DEFAULT_CHUNK,
    keys: list[str] | None = None,
    limits: ScoreLimits | None = None,
    client=None,
) -> pd.DataFrame:
    """Score every scan; write metrics.csv and the organisers' metrics.h5 into out_dir.

    Every file is untrusted: each is scored by score_file in a bounded worker (limits;
    its chunk is ``chunk``). Per scan results are cached in out_dir/scans/<key>.json
    together with the sizes and times of the files they came from, so a rerun scores
    only what changed. With a Dask ``client`` each planned job is one unit on the
    cluster (``score_unit``): the same plan, jobs, rows, order and files (a scan cached
    by either path is not scored again by the other).
    """
    limits = replace(limits or ScoreLimits(), chunk=chunk or DEFAULT_CHUNK)
    plan = plan_scoring(folder, data, out_dir, limits, keys)
    done = None
    if client is not None:
        from tusrec.cluster import fail_if_units_failed, map_units

        done = map_units(
            client,
            score_unit,
            [(job.scan.key, (job,)) for job in plan.jobs],
            "score",
            plan.rows.__setitem__,
            total=len(plan.scans),
            done=len(plan.rows),
        )
    else:
        for job in tqdm(
            plan.jobs, desc="score", unit="scan", initial=len(plan.rows), total=len(plan.scans), disable=None
        ):
            plan.rows[job.scan.key] = job.run()
    table = plan.table()
    write_metrics(table, Path(out_dir))
    if done is not None:
        fail_if_units_failed(done, "scoring")  # after writing what was done: a rerun does the rest
    return table


def score_unit(job: ScoringJob) -> dict:
    """One (team, scan) scoring as a cluster unit: the serial path's own job; the row."""
    return job.run()


def write_metrics(table: pd.DataFrame, out_dir: Path) -> None:
    """metrics.csv (every column) and metrics.h5 (the organisers' datasets: one value per
    scan, NaN where the scan was not scored, plus the scan keys)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = [c for c in TABLE_ORDER if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    write_csv(table, out_dir / "metrics.csv")
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

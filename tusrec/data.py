"""Read, validate and write the TUS-REC data layouts (docs/conventions.md section 1).

Training layout (both editions)::

    <root>/frames_transfs/<sub>/<scan>.h5   'frames' (N,H,W) uint8, 'tforms' (N,4,4) float32
    <root>/landmarks/landmark_<sub>.h5
    <root>/calib_matrix.csv

Validation / test layout (what a submission container sees)::

    <root>/frames/<sub>/<scan>.h5           'frames'
    <root>/transfs/<sub>/<scan>.h5          'tforms' (absent at test time)
    <root>/landmark/landmark_<sub>.h5       (2024 spelling)  or  <root>/landmarks/... (2025)
    <root>/calib_matrix.csv
    <root>/dataset_keys.h5                  key names 'sub<sub>__<scan>'

Every reader validates what it returns and raises :class:`TusrecDataError` naming the
file, the dataset and what was expected. Every writer writes to a temporary name and
renames when complete, so a failure never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from tusrec.geometry import Calibration, CalibrationError, read_calibration, write_calibration

TRAIN = "train"
EVAL = "eval"  # the validation / test layout
LANDMARK_DIRS = ("landmark", "landmarks")  # 2024 spelling, 2025 spelling
CALIB_FILE = "calib_matrix.csv"
KEYS_FILE = "dataset_keys.h5"

# The scan names of each protocol (docs/conventions.md 1.2), in the order arm, orientation, shape,
# direction.
SCAN_NAMES_2024 = tuple(
    f"{arm}_{orientation}_{shape}_{direction}"
    for arm in ("LH", "RH")
    for orientation in ("Par", "Per")
    for shape in ("L", "C", "S")
    for direction in ("DtP", "PtD")
)
SCAN_NAMES_2025 = ("LH_rotation", "RH_rotation")

_NAME_2024 = re.compile(r"^(LH|RH)_(Par|Per)_(L|C|S)_(DtP|PtD)$")
_NAME_2025 = re.compile(r"^(LH|RH)_rotation$")
_KEY = re.compile(r"^sub(\d{3})__(.+)$")
_SUBJECT = re.compile(r"^\d{3}$")


class TusrecDataError(ValueError):
    """A data file is missing or does not hold what TUS-REC expects."""


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class ScanPattern:
    """What a scan name says about how it was acquired.

    2024 names ``{LH|RH}_{Par|Per}_{L|C|S}_{DtP|PtD}``: arm, probe orientation relative
    to the sweep (parallel / perpendicular), trajectory shape (straight Line / C / S),
    direction (distal-to-proximal / proximal-to-distal). 2025 names ``{LH|RH}_rotation``.
    Fields a name does not carry are None; ``protocol`` is '2024', '2025' or 'unknown'.
    """

    protocol: str
    arm: str | None = None
    orientation: str | None = None
    shape: str | None = None
    direction: str | None = None

    @classmethod
    def from_name(cls, name: str) -> ScanPattern:
        if m := _NAME_2024.fullmatch(name):
            return cls("2024", *m.groups())
        if m := _NAME_2025.fullmatch(name):
            return cls("2025", arm=m.group(1))
        return cls("unknown")

    def as_dict(self) -> dict[str, str | None]:
        return {
            "protocol": self.protocol,
            "arm": self.arm,
            "orientation": self.orientation,
            "shape": self.shape,
            "direction": self.direction,
        }


def scan_key(subject: str | int, name: str) -> str:
    """The dataset_keys.h5 key of a scan: ``sub050__LH_Par_C_DtP``."""
    return f"sub{int(subject):03d}__{name}"


def parse_scan_key(key: str) -> tuple[str, str]:
    """``sub050__LH_Par_C_DtP`` -> ('050', 'LH_Par_C_DtP')."""
    m = _KEY.fullmatch(key)
    if not m:
        raise TusrecDataError(
            f"scan key {key!r} is not of the form 'sub<3 digits>__<scan name>', e.g. 'sub050__LH_Par_C_DtP'"
        )
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- h5 access


@contextmanager
def open_h5(path: Path, mode: str = "r") -> Iterator[h5py.File]:
    """Open an HDF5 file, turning h5py's errors into ones that name the file."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise TusrecDataError(f"{path}: file not found")
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise TusrecDataError(f"{path}: cannot be opened as an HDF5 file ({err})") from None
    try:
        yield f
    finally:
        f.close()


def h5_has_dataset(path: Path, name: str) -> bool:
    """Whether ``path`` is an HDF5 file holding a dataset ``name`` (False if no file)."""
    if not Path(path).is_file():
        return False
    with open_h5(path) as f:
        return isinstance(f.get(name), h5py.Dataset)


def _dataset(f: h5py.File, name: str, expected: str) -> h5py.Dataset:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise TusrecDataError(
            f"{f.filename}: no dataset '{name}' (expected {expected}); it has {sorted(f.keys()) or 'nothing'}"
        )
    return f[name]


def check_frames_dataset(ds: h5py.Dataset | np.ndarray, where: str) -> tuple[int, int, int]:
    """Check frames are uint8 (N, H, W) with N >= 2; return (N, H, W)."""
    if ds.dtype != np.uint8 or ds.ndim != 3:
        raise TusrecDataError(
            f"{where}: 'frames' must be uint8 of shape (N, H, W), got {ds.dtype} of shape {tuple(ds.shape)}"
        )
    if ds.shape[0] < 2:
        raise TusrecDataError(f"{where}: 'frames' has {ds.shape[0]} frame(s); a scan needs at least 2")
    return tuple(int(s) for s in ds.shape)


def check_tforms(tforms: np.ndarray, n_frames: int | None, where: str) -> np.ndarray:
    """Check tracker transforms (N, 4, 4): shape, N matching the frames, finite, invertible.

    Returns them as float64 (N, 4, 4).
    """
    tforms = np.asarray(tforms)
    if tforms.ndim != 3 or tforms.shape[1:] != (4, 4):
        raise TusrecDataError(f"{where}: 'tforms' must have shape (N, 4, 4), got {tforms.shape}")
    if n_frames is not None and tforms.shape[0] != n_frames:
        raise TusrecDataError(
            f"{where}: 'tforms' has {tforms.shape[0]} transforms but the scan has "
            f"{n_frames} frames; expected one (4, 4) transform per frame"
        )
    tforms = tforms.astype(np.float64)
    bad = ~np.isfinite(tforms).all(axis=(1, 2))
    if bad.any():
        raise TusrecDataError(
            f"{where}: 'tforms' has non-finite values in frame(s) {np.flatnonzero(bad)[:10].tolist()}"
        )
    # A tracker pose is rigid, so |det| is 1; anything near 0 cannot be inverted.
    singular = np.abs(np.linalg.det(tforms)) < 1e-6
    if singular.any():
        raise TusrecDataError(
            f"{where}: 'tforms' is singular in frame(s) {np.flatnonzero(singular)[:10].tolist()}; "
            "expected rigid tool-to-camera transforms"
        )
    return tforms


def check_landmarks(landmarks: np.ndarray, n_frames: int, height: int, width: int, where: str) -> np.ndarray:
    """Check a (K, 3) landmark table (frame index 0-based in 1..N-1, x in 1..W, y in 1..H).

    Returns it as int64 (K, 3).
    """
    lm = np.asarray(landmarks)
    if lm.ndim != 2 or lm.shape[1] != 3 or lm.shape[0] == 0:
        raise TusrecDataError(
            f"{where}: landmarks must have shape (K, 3) with K >= 1 (frame, x, y), got {lm.shape}"
        )
    if not np.issubdtype(lm.dtype, np.integer) and not (np.isfinite(lm).all() and np.all(lm == np.round(lm))):
        raise TusrecDataError(f"{where}: landmarks must be integers, got {lm.dtype}")
    lm = lm.astype(np.int64)
    f, x, y = lm.T
    for what, values, lo, hi in (
        ("frame index", f, 1, n_frames - 1),
        ("x", x, 1, width),
        ("y", y, 1, height),
    ):
        out = (values < lo) | (values > hi)
        if out.any():
            k = int(np.flatnonzero(out)[0])
            raise TusrecDataError(
                f"{where}: landmark {k} has {what} {int(values[k])}, outside {lo}..{hi} "
                f"(frame index is 0-based and never 0; x, y are 1-based pixels)"
            )
    return lm


# --------------------------------------------------------------------------- scans


@dataclass
class Scan:
    """One scan of a data folder. Nothing is read until asked for."""

    subject: str
    name: str
    frames_path: Path
    tforms_path: Path | None = None
    landmark_path: Path | None = None

    @property
    def key(self) -> str:
        return scan_key(self.subject, self.name)

    @property
    def pattern(self) -> ScanPattern:
        return ScanPattern.from_name(self.name)

    @cached_property
    def shape(self) -> tuple[int, int, int]:
        """(N, H, W) of the frames, validated."""
        with open_h5(self.frames_path) as f:
            ds = _dataset(f, "frames", "uint8 (N, H, W)")
            return check_frames_dataset(ds, f"{self.frames_path}")

    @property
    def n_frames(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def read_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames start..stop-1: (n, H, W) uint8."""
        with open_h5(self.frames_path) as f:
            ds = _dataset(f, "frames", "uint8 (N, H, W)")
            check_frames_dataset(ds, f"{self.frames_path}")
            return ds[start:stop]

    def iter_frames(self, chunk: int = 64, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first index, frames (n, H, W) uint8) chunk by chunk, from ``start``.

        Holds one chunk in memory at a time (a 1,600-frame scan is 470 MB).
        """
        with open_h5(self.frames_path) as f:
            ds = _dataset(f, "frames", "uint8 (N, H, W)")
            n = check_frames_dataset(ds, f"{self.frames_path}")[0]
            for s in range(start, n, chunk):
                yield s, ds[s : s + chunk]

    def read_tforms(self) -> np.ndarray:
        """Tracker transforms tool -> camera, validated: (N, 4, 4) float64."""
        if self.tforms_path is None:
            raise TusrecDataError(
                f"scan {self.key}: no ground-truth transforms (no 'transfs/' file for it; "
                "they are hidden in the test layout)"
            )
        path = self.tforms_path
        with open_h5(path) as f:
            ds = _dataset(f, "tforms", "float (N, 4, 4)")
            tforms = ds[()]
        return check_tforms(tforms, self.n_frames, f"{path}")

    @property
    def has_tforms(self) -> bool:
        return self.tforms_path is not None and self.tforms_path.is_file()

    def read_landmarks(self) -> np.ndarray:
        """The scan's landmarks, validated: (K, 3) int64 rows (frame index, x, y)."""
        if self.landmark_path is None or not self.landmark_path.is_file():
            raise TusrecDataError(
                f"scan {self.key}: landmark file {self.landmark_path} not found "
                f"(expected landmark_{self.subject}.h5 with a dataset '{self.name}')"
            )
        with open_h5(self.landmark_path) as f:
            lm = _dataset(f, self.name, "integer (K, 3) rows of (frame, x, y)")[()]
        n, h, w = self.shape
        return check_landmarks(lm, n, h, w, f"{self.landmark_path} dataset '{self.name}'")

    @property
    def has_landmarks(self) -> bool:
        return self.landmark_path is not None and h5_has_dataset(self.landmark_path, self.name)


@dataclass
class TusrecData:
    """A TUS-REC data folder in either layout. ``scans`` are in key order."""

    root: Path
    layout: str
    scans: list[Scan] = field(default_factory=list)

    @cached_property
    def calibration(self) -> Calibration:
        try:
            return read_calibration(self.root / CALIB_FILE)
        except CalibrationError as err:
            raise TusrecDataError(str(err)) from None

    @property
    def calibration_path(self) -> Path:
        return self.root / CALIB_FILE

    def scan(self, key: str) -> Scan:
        for s in self.scans:
            if s.key == key:
                return s
        raise TusrecDataError(f"{self.root}: no scan with key {key!r}")

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.scans]

    def select(self, keys: list[str] | None) -> list[Scan]:
        """The scans with these keys (all scans if None); an unknown key is an error."""
        return [self.scan(k) for k in keys] if keys else list(self.scans)

    def require_ground_truth(self, scans: list[Scan], why: str) -> None:
        """Raise, naming the first, if any of ``scans`` has no tforms; ``why`` ends the
        message (what needs the transfs/ folder)."""
        missing = [s.key for s in scans if not s.has_tforms]
        if missing:
            raise TusrecDataError(
                f"{self.root}: no ground truth for {len(missing)} scan(s) (e.g. {missing[0]}): {why}"
            )

    def landmark_path(self, subject: str) -> Path:
        """Where landmark_<sub>.h5 of a subject is (or is to be written)."""
        return self.root / landmark_dir(self.root, self.layout) / f"landmark_{subject}.h5"


def landmark_dir(root: Path, layout: str) -> str:
    """The landmark folder name in use under ``root``: an existing 'landmark' or
    'landmarks' (either spelling is accepted), else 'landmarks'."""
    if layout == TRAIN:
        return "landmarks"
    for name in LANDMARK_DIRS:
        if (root / name).is_dir():
            return name
    return "landmarks"


def detect_layout(root: Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise TusrecDataError(f"{root}: data folder not found")
    if (root / "frames_transfs").is_dir():
        return TRAIN
    if (root / "frames").is_dir():
        return EVAL
    raise TusrecDataError(
        f"{root}: not a TUS-REC data folder: expected 'frames_transfs/' (training layout) "
        "or 'frames/' (validation/test layout)"
    )


def open_data(root: str | Path) -> TusrecData:
    """Open a TUS-REC data folder (training or validation/test layout).

    The validation/test layout takes its scans from dataset_keys.h5 when present
    (every key must have its frames file), else from the files under frames/.
    """
    root = Path(root)
    layout = detect_layout(root)
    frames_dir = root / ("frames_transfs" if layout == TRAIN else "frames")
    lm_dir = root / landmark_dir(root, layout)

    def make_scan(subject: str, name: str) -> Scan:
        frames_path = frames_dir / subject / f"{name}.h5"
        if layout == TRAIN:
            tforms_path = frames_path
        else:
            tforms_path = root / "transfs" / subject / f"{name}.h5"
            if not tforms_path.is_file():
                tforms_path = None
        return Scan(subject, name, frames_path, tforms_path, lm_dir / f"landmark_{subject}.h5")

    scans = []
    keys_file = root / KEYS_FILE
    if layout == EVAL and keys_file.exists():
        with open_h5(keys_file) as f:
            keys = list(f.keys())
        for key in keys:
            try:
                subject, name = parse_scan_key(key)
            except TusrecDataError as err:
                raise TusrecDataError(f"{keys_file}: {err}") from None
            scan = make_scan(subject, name)
            if not scan.frames_path.is_file():
                raise TusrecDataError(
                    f"{keys_file}: key {key!r} has no frames file (expected {scan.frames_path})"
                )
            scans.append(scan)
    else:
        for sub_dir in sorted(p for p in frames_dir.iterdir() if p.is_dir()):
            if not _SUBJECT.fullmatch(sub_dir.name):
                continue
            for path in sorted(sub_dir.glob("*.h5")):
                scans.append(make_scan(sub_dir.name, path.stem))
    scans.sort(key=lambda s: s.key)
    return TusrecData(root, layout, scans)


# --------------------------------------------------------------------------- writing


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, e.g. a Slurm job's or a container's
    cpuset; the machine's count where the system has no affinity call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


# A cell a spreadsheet would run as a formula (OWASP, CSV injection): text starting with
# one of these. Team-controlled text (a manifest message, a model name, a team name)
# reaches the organisers' tables, which are opened in spreadsheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def inert_cell(value):
    """A table cell that no spreadsheet runs: text starting with = + - @ tab or carriage
    return gets a leading single quote (OWASP's rule; the text stays readable). A carriage
    return inside text becomes a line feed: the CSV writer quotes a cell holding a line
    feed but not one holding a bare CR, which a spreadsheet reads as a new row (whose
    first cell would escape the rule). Anything that is not text (numbers, NaN, None) is
    returned as it is, so a negative number stays a number."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_STARTS):
        value = "'" + value
    return value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value


def inert_table(table):
    """A copy of a pandas DataFrame with every text cell, column label and index label
    passed through inert_cell; numeric columns are not touched."""
    from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype

    table = table.copy()
    for i in range(table.shape[1]):  # by position: labels may repeat
        column = table.iloc[:, i]
        dtype = column.dtype
        if not (is_numeric_dtype(dtype) or is_bool_dtype(dtype) or is_datetime64_any_dtype(dtype)):
            table.isetitem(i, column.map(inert_cell))
    table.columns = table.columns.map(inert_cell)
    table.index = table.index.map(inert_cell)
    return table


def write_csv(table, path: str | Path, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV at ``path`` atomically, every text cell and label
    made inert (inert_table). kwargs go to DataFrame.to_csv (index defaults to False).
    Every CSV the kit writes goes through here."""
    kwargs.setdefault("index", False)
    path = Path(path)
    with atomic_path(path) as tmp:
        inert_table(table).to_csv(tmp, **kwargs)
    return path


def write_scan(
    root: str | Path,
    layout: str,
    subject: str | int,
    name: str,
    frames: np.ndarray | Iterable[np.ndarray],
    tforms: np.ndarray,
) -> Scan:
    """Write one scan in ``layout`` (TRAIN or EVAL), validating as it goes.

    frames: (N, H, W) uint8, or an iterable of (n, H, W) uint8 chunks adding up to N
    (so long scans never sit in memory whole). tforms: (N, 4, 4), stored as float32 like
    the real data. Nothing is left behind if anything is invalid.
    """
    root = Path(root)
    subject = f"{int(subject):03d}"
    if isinstance(frames, np.ndarray):
        frames = [frames]
    if layout == TRAIN:
        frames_path = root / "frames_transfs" / subject / f"{name}.h5"
        tforms_path = frames_path
    elif layout == EVAL:
        frames_path = root / "frames" / subject / f"{name}.h5"
        tforms_path = root / "transfs" / subject / f"{name}.h5"
    else:
        raise ValueError(f"layout must be {TRAIN!r} or {EVAL!r}, got {layout!r}")
    tforms = check_tforms(tforms, None, f"{tforms_path} (scan {scan_key(subject, name)})")
    n = tforms.shape[0]

    with atomic_path(frames_path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = None
            written = 0
            for chunk in frames:
                chunk = np.asarray(chunk)
                if chunk.dtype != np.uint8 or chunk.ndim != 3:
                    raise TusrecDataError(
                        f"{frames_path}: frames must be uint8 (n, H, W) chunks, "
                        f"got {chunk.dtype} {chunk.shape}"
                    )
                if ds is None:
                    h, w = chunk.shape[1:]
                    ds = f.create_dataset("frames", (n, h, w), np.uint8, chunks=(1, h, w))
                if chunk.shape[1:] != ds.shape[1:] or written + len(chunk) > n:
                    raise TusrecDataError(
                        f"{frames_path}: frame chunk of shape {chunk.shape} does not fit "
                        f"'frames' {ds.shape} at frame {written}"
                    )
                ds[written : written + len(chunk)] = chunk
                written += len(chunk)
            if ds is None or written != n:
                raise TusrecDataError(
                    f"{frames_path}: got {written} frames for {n} tforms; expected one per frame"
                )
            check_frames_dataset(ds, str(frames_path))
            if layout == TRAIN:
                f.create_dataset("tforms", data=tforms.astype(np.float32))
        if layout == EVAL:
            with atomic_path(tforms_path) as tmp_t, h5py.File(tmp_t, "w") as f:
                f.create_dataset("tforms", data=tforms.astype(np.float32))
    return Scan(subject, name, frames_path, tforms_path)


def write_landmarks(path: str | Path, landmarks: dict[str, np.ndarray]) -> None:
    """Add or replace scans' landmark datasets in landmark_<sub>.h5 (docs/conventions.md 1.3).

    landmarks: scan name -> (K, 3) integer rows (frame index, x, y). Datasets already in
    the file for other scans are kept. The file is rewritten atomically.
    """
    path = Path(path)
    existing: dict[str, np.ndarray] = {}
    if path.exists():
        with open_h5(path) as f:
            existing = {k: f[k][()] for k in f}
    existing.update(landmarks)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name in sorted(existing):
            lm = np.asarray(existing[name])
            if lm.ndim != 2 or lm.shape[1] != 3:
                raise TusrecDataError(f"{path}: landmarks of {name!r} must be (K, 3), got {lm.shape}")
            f.create_dataset(name, data=lm.astype(np.int64))


def write_dataset_keys(root: str | Path, keys: Iterable[str]) -> None:
    """Write dataset_keys.h5: one (empty) dataset per scan key; only the names matter."""
    path = Path(root) / KEYS_FILE
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in sorted(set(keys)):
            parse_scan_key(key)
            f.create_dataset(key, data=np.int8(0))


def write_data_calibration(root: str | Path, calib: Calibration) -> None:
    """Write <root>/calib_matrix.csv."""
    Path(root).mkdir(parents=True, exist_ok=True)
    write_calibration(Path(root) / CALIB_FILE, calib)


# --------------------------------------------------------------------------- predictions
# A predictions folder holds, per scan, <key>.h5 in one of two forms, and the manifest
# predictions.csv. Dense (attribute form = 'ddf'; the challenge's official form): float32
# GP (N-1, 3, H*W) and LP (N-1, 3, H*W) chunked by frame, GL (3, K), LL (3, K), plus the
# transforms below when the predictor had them. Compact (form = 'transforms'): no GP/LP;
# transforms_global T(i->0) and transforms_local T(i->i-1), (N-1, 4, 4) float64 in image
# mm, GL and LL. Either may hold per-frame extras (N-1,) float32, PREDICTION_PER_FRAME_SETS:
# the rotation disagreement (rad^2), the translation spread (mm) and the expected error (mm);
# attributes 'runtime_seconds', 'model'.

PREDICTION_PIXEL_SETS = ("GP", "LP")
PREDICTION_LANDMARK_SETS = ("GL", "LL")
PREDICTION_TRANSFORM_SETS = ("transforms_global", "transforms_local")
PREDICTION_PER_FRAME_SETS = ("uncertainty", "uncertainty_translation_mm", "expected_error_mm")
# attribute 'expected_error_source': where expected_error_mm came from (the registered
# ensemble's error model, or the members' error heads)
EXPECTED_ERROR_SOURCES = ("error model", "error heads")
DDF_FORM = "ddf"
TRANSFORMS_FORM = "transforms"
PREDICTION_FORMS = (DDF_FORM, TRANSFORMS_FORM)
MANIFEST_FILE = "predictions.csv"
MANIFEST_COLUMNS = ("key", "frames", "status", "seconds", "device", "message")


class PredictionWriter:
    """Write one scan's predictions file, frame chunk by frame chunk.

    Use as a context manager: the file appears under its final name only when the
    block ends without error and it is complete: in the dense form (``form='ddf'``) every
    frame of GP and LP was written; in the compact form (``form='transforms'``) both
    transform sets were. With ``started_at`` (a time.perf_counter() value), the attribute
    runtime_seconds is the time from then until the file is complete.
    """

    def __init__(
        self,
        path: str | Path,
        n_frames: int,
        image_size: tuple[int, int],
        attrs: dict | None = None,
        started_at: float | None = None,
        form: str = DDF_FORM,
    ):
        if form not in PREDICTION_FORMS:
            raise ValueError(f"prediction form {form!r}; expected one of {PREDICTION_FORMS}")
        self.path = Path(path)
        self.started_at = started_at
        self.n_frames = n_frames
        self.hw = image_size[0] * image_size[1]
        self.form = form
        self.attrs = {**(attrs or {}), "form": form}
        self._written = {name: np.zeros(n_frames - 1, bool) for name in self._required}

    @property
    def _required(self) -> tuple[str, ...]:
        return PREDICTION_PIXEL_SETS if self.form == DDF_FORM else PREDICTION_TRANSFORM_SETS

    def __enter__(self) -> PredictionWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = h5py.File(self._tmp, "w")
        if self.form == DDF_FORM:
            shape = (self.n_frames - 1, 3, self.hw)
            for name in PREDICTION_PIXEL_SETS:
                self._file.create_dataset(name, shape, np.float32, chunks=(1, 3, self.hw))
        return self

    def write_pixels(self, start: int, gp: np.ndarray, lp: np.ndarray) -> None:
        """GP and LP of frames start+1 .. start+n: each (n, 3, H*W) mm (dense form only)."""
        for name, arr in (("GP", gp), ("LP", lp)):
            stop = start + len(arr)
            self._file[name][start:stop] = arr
            self._written[name][start:stop] = True

    def write_landmarks(self, gl: np.ndarray, ll: np.ndarray) -> None:
        """GL and LL: each (3, K) mm."""
        for name, arr in (("GL", gl), ("LL", ll)):
            self._file.create_dataset(name, data=np.asarray(arr, dtype=np.float32))

    def write_transforms(self, global_: np.ndarray, local: np.ndarray) -> None:
        """transforms_global T(i->0) and transforms_local T(i->i-1): each (N-1, 4, 4) in image mm.

        Kept in float64: the DDFs are generated from float64 transforms, and a float32
        copy would move a pixel 100 mm from the origin by up to ~1e-5 mm.
        """
        for name, arr in (("transforms_global", global_), ("transforms_local", local)):
            arr = np.asarray(arr, dtype=np.float64)
            if arr.shape != (self.n_frames - 1, 4, 4):
                raise ValueError(f"{name} has shape {arr.shape}, expected {(self.n_frames - 1, 4, 4)}")
            self._file.create_dataset(name, data=arr)
            if name in self._written:
                self._written[name][:] = True

    def write_array(self, name: str, arr: np.ndarray) -> None:
        """An optional float32 extra, e.g. uncertainty (N-1,)."""
        self._file.create_dataset(name, data=np.asarray(arr, dtype=np.float32))

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = False
        try:
            if exc_type is None:
                missing = {k: int((~v).sum()) for k, v in self._written.items() if not v.all()}
                if missing:
                    raise TusrecDataError(f"{self.path}: frames not written: {missing}")
                for k, v in self.attrs.items():
                    self._file.attrs[k] = v
                if self.started_at is not None:
                    self._file.attrs["runtime_seconds"] = time.perf_counter() - self.started_at
                complete = True
        finally:
            self._file.close()
            if complete:
                self._tmp.replace(self.path)
            else:
                self._tmp.unlink(missing_ok=True)


def write_manifest(folder: str | Path, rows: list[dict]) -> Path:
    """Write (replace) predictions.csv: one row per scan with MANIFEST_COLUMNS.

    status is 'ok', 'failed' or 'timeout'; seconds the prediction's wall time. Extra
    keys of the rows become extra columns after the standard ones.
    """
    import pandas as pd

    path = Path(folder) / MANIFEST_FILE
    extra = sorted({k for r in rows for k in r} - set(MANIFEST_COLUMNS))
    return write_csv(pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *extra]), path)


MAX_MANIFEST_BYTES = 8 * 2**20  # ~10,000 rows of 800 characters; a real one is ~100 B a row


def read_manifest(folder: str | Path):
    """predictions.csv as a pandas DataFrame indexed by key (None if there is none).

    The manifest may come from a team: it must be a regular file (a link is not
    followed) of at most MAX_MANIFEST_BYTES; otherwise, or if it is not a readable CSV
    with key and status columns and unique keys, TusrecDataError. Cell values are as
    pandas parses them (any type): tusrec.scoring.policy.parse_declared reads them.
    """
    import stat

    import pandas as pd

    path = Path(folder) / MANIFEST_FILE
    if not os.path.lexists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        why = "a symbolic link, not a regular file" if os.path.islink(path) else err.strerror
        raise TusrecDataError(f"{path}: cannot be read ({why})") from None
    with os.fdopen(fd, "rb") as raw:
        st = os.fstat(raw.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TusrecDataError(f"{path}: not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise TusrecDataError(
                f"{path}: {st.st_size} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}"
            )
        try:
            table = pd.read_csv(raw, dtype={"key": str, "status": str, "device": str, "message": str})
        except Exception as err:  # pandas raises several types for malformed CSV
            raise TusrecDataError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in ("key", "status") if c not in table.columns]
    if missing:
        raise TusrecDataError(f"{path}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    if table["key"].duplicated().any():
        dup = table["key"][table["key"].duplicated()].tolist()
        raise TusrecDataError(f"{path}: duplicate key(s) {dup[:5]}")
    return table.set_index("key")

"""Every scan of a TRAIN-layout folder, preprocessed as the predictor does.

Each scan is read once with inputs.read_scan_input, exactly as the predictor reads it:
frames cropped to the field of view and area-resized to the model's input size, kept as
uint8, and the native-resolution speckle decorrelation maps (also uint8) for every frame
step the frame-skip augmentation can draw. 64 x 80 is 5 KB a frame and map.

The native-resolution pass costs about 10 ms a frame, so with ``cache_dir`` each scan's
input is kept on disk as plain .npy files (one per array kind and scan, input size and
frame steps in the name) and a small .json (crop box, the source file's size and mtime)
written last: reruns, resumed runs and members trained in parallel processes read it
back instead of recomputing. The arrays are opened memory-mapped (np.load with
mmap_mode='r'), so every process and data-loader worker reading one cache shares the
same pages of the page cache: the real 2024 training set (about 9 GB of cache) is held
once in memory, not once per process, and pages not in use can be dropped by the kernel.
Without ``cache_dir`` the arrays are in each process's own memory (fine for small sets).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tusrec.data import TRAIN, TusrecDataError, open_data
from tusrec.geometry import Calibration, frame_transforms
from tusrec.model.inputs import ScanInput, read_scan_input
from tusrec.train.config import TrainError


@dataclass
class CachedScan:
    """One scan: frames (N, h, w) uint8 after crop + resize; decorrelation: frame step k ->
    (N, h, w) uint8 maps (inputs.ScanInput); ``local`` (N-1, 4, 4) and
    ``global_`` (N-1, 4, 4) float64 ground truth T(i->i-1) and T(i->0) in image mm (entry k
    is frame k+1); ``box`` (top, bottom, left, right) the crop in original pixels
    (0-based, end exclusive); ``image_size`` (H, W) of the original frames."""

    key: str
    subject: str
    frames: np.ndarray
    decorrelation: dict[int, np.ndarray]
    local: np.ndarray
    global_: np.ndarray
    box: tuple[int, int, int, int]
    image_size: tuple[int, int]

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    # A memory-mapped array pickles as its file name, not its contents: a scan sent to a
    # process started by spawn (or forkserver) maps the same file instead of copying it.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["frames"] = _pickle_array(self.frames)
        state["decorrelation"] = {k: _pickle_array(v) for k, v in self.decorrelation.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        state["frames"] = _unpickle_array(state["frames"])
        state["decorrelation"] = {k: _unpickle_array(v) for k, v in state["decorrelation"].items()}
        self.__dict__.update(state)

    def normalised(self, steps: int = 1) -> np.ndarray:
        """The scan as the predictor gives it to the network: (N, C, h, w) float32, with the
        decorrelation channels of frame steps 1..``steps`` (ScanInput.network_input)."""
        return ScanInput(self.frames, self.decorrelation, self.box).network_input(steps)


@dataclass
class TrainData:
    """All scans of a data root with its calibration."""

    root: Path
    scans: list[CachedScan]
    calib: Calibration

    @property
    def subjects(self) -> list[str]:
        return sorted({s.subject for s in self.scans})

    def of_subjects(self, subjects: list[str]) -> list[CachedScan]:
        keep = set(subjects)
        return [s for s in self.scans if s.subject in keep]


def _pickle_array(a: np.ndarray):
    if isinstance(a, np.memmap) and a.filename is not None:
        return ("mmap", str(a.filename))
    return a


def _unpickle_array(a):
    if isinstance(a, tuple) and a[0] == "mmap":
        return np.load(a[1], mmap_mode="r")
    return a


def _source_signature(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, then rename: readers never see a partial file, and
    a process still mapping the old file keeps its (unlinked) pages."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, np.ascontiguousarray(array))
    tmp.replace(path)


def cache_files(cache_dir: Path, key: str, size: tuple[int, int], steps: tuple[int, ...]) -> dict:
    """The files of one scan's cache entry: {"meta": .json, "frames": .npy, k: .npy}."""
    tag = f"{size[0]}x{size[1]}-steps{''.join(map(str, steps)) or '0'}"
    base = Path(cache_dir) / f"{key}-{tag}"
    files = {"meta": base.with_suffix(".json"), "frames": Path(f"{base}.frames.npy")}
    files.update({k: Path(f"{base}.ncc{k}.npy") for k in steps})
    return files


def _read_cached(files: dict, steps: tuple[int, ...], signature: list[int]) -> ScanInput | None:
    """The cache entry memory-mapped, or None when absent, stale or unreadable."""
    try:
        meta = json.loads(files["meta"].read_text())
        if meta.get("signature") != signature:
            return None
        frames = np.load(files["frames"], mmap_mode="r")
        maps = {k: np.load(files[k], mmap_mode="r") for k in steps}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, partial or from another version: rebuild
    if any(m.shape != frames.shape for m in maps.values()):
        return None
    return ScanInput(frames, maps, tuple(int(v) for v in meta["box"]))


def cached_scan_input(
    scan, size: tuple[int, int], steps: tuple[int, ...], cache_dir: Path | None
) -> ScanInput:
    """read_scan_input, through ``cache_dir`` when given: the scan's entry (cache_files)
    is memory-mapped while the scan's frames file keeps its size and mtime, and rebuilt
    (each file atomically, the .json last) otherwise. Without ``cache_dir``: in memory."""
    if cache_dir is None:
        return read_scan_input(scan, size, steps, chunk=128)
    files = cache_files(Path(cache_dir), scan.key, size, steps)
    signature = _source_signature(scan.frames_path)
    cached = _read_cached(files, steps, signature)
    if cached is not None:
        return cached
    inputs = read_scan_input(scan, size, steps, chunk=128)
    files["meta"].parent.mkdir(parents=True, exist_ok=True)
    files["meta"].unlink(missing_ok=True)  # the entry is invalid until its arrays are all written
    _save_npy(files["frames"], inputs.frames)
    for k in steps:
        _save_npy(files[k], inputs.decorrelation[k])
    meta = {"key": scan.key, "box": list(inputs.box), "signature": signature}
    tmp = files["meta"].with_name(f"{files['meta'].name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta) + "\n")
    tmp.replace(files["meta"])
    return _read_cached(files, steps, signature) or inputs


def load_cache(
    data_root: str | Path,
    input_size: tuple[int, int],
    keys: list[str] | None = None,
    progress: bool = False,
    steps: tuple[int, ...] = (),
    cache_dir: str | Path | None = None,
) -> TrainData:
    """Read (and preprocess) every scan of a TRAIN-layout folder, or only ``keys``, with
    decorrelation maps for the frame steps ``steps`` (none when empty); through per-scan
    files in ``cache_dir`` when given (cached_scan_input)."""
    data = open_data(data_root)
    if data.layout != TRAIN:
        raise TusrecDataError(f"{data_root}: training needs the training layout (frames_transfs/)")
    if not data.scans:
        raise TusrecDataError(f"{data_root}: no scans")
    calib = data.calibration
    scans = []
    for scan in tqdm(data.select(keys), desc="cache", unit="scan", disable=not progress):
        inputs = cached_scan_input(scan, tuple(input_size), tuple(steps), cache_dir)
        global_, local = frame_transforms(scan.read_tforms(), calib)
        scans.append(
            CachedScan(
                scan.key,
                scan.subject,
                inputs.frames,
                inputs.decorrelation,
                local,
                global_,
                inputs.box,
                scan.image_size,
            )
        )
    return TrainData(Path(data_root), scans, calib)


def split_subjects(
    subjects: list[str], val_subjects: list[str] | float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split subject ids into (train, validation); scans never cross the split.

    val_subjects: explicit ids (each must exist) or a fraction (rounded, at least one
    when > 0, drawn with ``seed``). At least one subject always stays for training.
    """
    subjects = sorted(subjects)
    if isinstance(val_subjects, list | tuple):
        val = sorted({f"{int(s):03d}" for s in val_subjects})
        missing = set(val) - set(subjects)
        if missing:
            have = ", ".join(subjects) if len(subjects) <= 4 else f"{subjects[0]}-{subjects[-1]}"
            raise TrainError(
                f"validation subjects {sorted(missing)} are not in the data (it has {len(subjects)} "
                f"subject(s): {have}): pass --val-subjects with ids it has (e.g. --val-subjects "
                f"{subjects[-1]}) or a fraction (e.g. --val-subjects 0.1)"
            )
    else:
        frac = float(val_subjects)
        count = 0 if frac <= 0 else max(1, round(frac * len(subjects)))
        count = min(count, len(subjects) - 1)
        rng = np.random.default_rng(seed)
        val = sorted(rng.permutation(subjects)[:count].tolist())
    train = [s for s in subjects if s not in set(val)]
    if not train:
        raise TrainError("no subject left for training: hold out fewer validation subjects")
    return train, val

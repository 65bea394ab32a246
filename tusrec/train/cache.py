"""Every scan of a TRAIN-layout folder in memory, preprocessed as the predictor does.

Each scan is read once with inputs.read_scan_input, exactly as the predictor reads it:
frames cropped to the field of view and area-resized to the model's input size, kept as
uint8, and the native-resolution speckle decorrelation maps (also uint8) for every frame
step the frame-skip augmentation can draw. 64 x 80 is 5 KB a frame and map.

The native-resolution pass costs about 10 ms a frame, so with ``cache_dir`` each scan's
input is also kept on disk (one .npz per scan, input size and frame steps in the name,
the source file's size and mtime inside): reruns, resumed runs and members trained in
parallel processes read it back instead of recomputing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tusrec.data import TRAIN, TusrecDataError, open_data
from tusrec.geometry import Calibration, frame_transforms
from tusrec.model.inputs import ScanInput, read_scan_input


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

    def normalised(self) -> np.ndarray:
        """The scan as the predictor gives it to the network: (N, C, h, w) float32."""
        return ScanInput(self.frames, self.decorrelation, self.box).network_input()


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


def _source_signature(path: Path) -> np.ndarray:
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def cached_scan_input(
    scan, size: tuple[int, int], steps: tuple[int, ...], cache_dir: Path | None
) -> ScanInput:
    """read_scan_input, through a per-scan file in ``cache_dir`` when given: reused while
    the scan's frames file keeps its size and mtime, rewritten (atomically) otherwise."""
    if cache_dir is None:
        return read_scan_input(scan, size, steps, chunk=128)
    tag = f"{size[0]}x{size[1]}-steps{''.join(map(str, steps)) or '0'}"
    path = Path(cache_dir) / f"{scan.key}-{tag}.npz"
    signature = _source_signature(scan.frames_path)
    if path.is_file():
        try:
            with np.load(path) as z:
                if np.array_equal(z["signature"], signature):
                    maps = {k: z[f"decorrelation{k}"] for k in steps}
                    return ScanInput(z["frames"], maps, tuple(int(v) for v in z["box"]))
        except (OSError, KeyError, ValueError):
            pass  # unreadable or from another version: rebuild
    inputs = read_scan_input(scan, size, steps, chunk=128)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {f"decorrelation{k}": v for k, v in inputs.decorrelation.items()}
    np.savez(tmp, frames=inputs.frames, box=np.array(inputs.box), signature=signature, **arrays)
    tmp.replace(path)
    return inputs


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
            raise ValueError(f"validation subjects {sorted(missing)} are not in the data {subjects}")
    else:
        frac = float(val_subjects)
        count = 0 if frac <= 0 else max(1, round(frac * len(subjects)))
        count = min(count, len(subjects) - 1)
        rng = np.random.default_rng(seed)
        val = sorted(rng.permutation(subjects)[:count].tolist())
    train = [s for s in subjects if s not in set(val)]
    if not train:
        raise ValueError("no subject left for training")
    return train, val

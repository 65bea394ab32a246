"""Every scan of a TRAIN-layout folder in memory, preprocessed as the predictor does.

Frames are cropped to the field of view (ensemble.field_of_view_box of the first 32
frames, as tusrec.predict.core.Predictor) and resized by area averaging to the model's
input size, kept as uint8: cv2 returns uint8 for uint8 input, so (u8 - INTENSITY_MEAN) /
INTENSITY_STD is exactly ensemble.preprocess. 64 x 80 is 5 KB a frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tusrec.data import TRAIN, TusrecDataError, open_data
from tusrec.geometry import Calibration, frame_transforms
from tusrec.model.ensemble import INTENSITY_MEAN, INTENSITY_STD, field_of_view_box

FOV_FRAMES = 32  # frames the predictor looks at for the field of view


@dataclass
class CachedScan:
    """One scan: frames (N, h, w) uint8 after crop + resize; ``local`` (N-1, 4, 4) and
    ``global_`` (N-1, 4, 4) float64 ground truth T(i->i-1) and T(i->0) in image mm (entry k
    is frame k+1); ``box`` (top, bottom, left, right) the crop in original pixels
    (0-based, end exclusive); ``image_size`` (H, W) of the original frames."""

    key: str
    subject: str
    frames: np.ndarray
    local: np.ndarray
    global_: np.ndarray
    box: tuple[int, int, int, int]
    image_size: tuple[int, int]

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def normalised(self) -> np.ndarray:
        """Frames as the network sees them: (N, h, w) float32, what ensemble.preprocess gives."""
        return normalise(self.frames)


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


def normalise(frames):
    """uint8-range frames (numpy or torch) -> float32 (x - INTENSITY_MEAN) / INTENSITY_STD."""
    if isinstance(frames, np.ndarray):
        return (frames.astype(np.float32) - INTENSITY_MEAN) / INTENSITY_STD
    return (frames.float() - INTENSITY_MEAN) / INTENSITY_STD


def crop_resize_u8(frames: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """ensemble.preprocess without the normalisation: (n, H, W) uint8 -> (n, h, w) uint8."""
    top, bottom, left, right = box
    h, w = size
    out = np.empty((len(frames), h, w), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame[top:bottom, left:right], (w, h), interpolation=cv2.INTER_AREA)
    return out


def load_cache(
    data_root: str | Path, input_size: tuple[int, int], keys: list[str] | None = None, progress: bool = False
) -> TrainData:
    """Read (and preprocess) every scan of a TRAIN-layout folder, or only ``keys``."""
    data = open_data(data_root)
    if data.layout != TRAIN:
        raise TusrecDataError(f"{data_root}: training needs the training layout (frames_transfs/)")
    if not data.scans:
        raise TusrecDataError(f"{data_root}: no scans")
    calib = data.calibration
    scans = []
    for scan in tqdm(data.select(keys), desc="cache", unit="scan", disable=not progress):
        box = field_of_view_box(scan.read_frames(0, min(scan.n_frames, FOV_FRAMES)))
        frames = np.concatenate(
            [crop_resize_u8(chunk, box, tuple(input_size)) for _, chunk in scan.iter_frames(128)]
        )
        global_, local = frame_transforms(scan.read_tforms(), calib)
        scans.append(CachedScan(scan.key, scan.subject, frames, local, global_, box, scan.image_size))
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

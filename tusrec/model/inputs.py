"""Scan preprocessing shared by training and prediction: what a network sees of a scan.

Field-of-view crop, area resize to the model's input size, fixed intensity
normalisation, and the native-resolution speckle decorrelation maps. The predictor
(tusrec.predict) and the training cache (tusrec.train.cache) both read a scan with
read_scan_input, so a member trains on exactly the inputs it is later given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# Fixed intensity normalisation (uint8 -> roughly zero mean, unit spread on B-mode data).
INTENSITY_MEAN, INTENSITY_STD = 40.0, 40.0


def field_of_view_box(frames: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the pixels non-zero in any of ``frames``
    (n, H, W): the ultrasound fan. The whole image if all are zero."""
    seen = (frames > 0).any(axis=0)
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    if len(rows) == 0:
        return 0, frames.shape[1], 0, frames.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def preprocess_u8(frames: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop to the field of view and resize by area averaging: (n, H, W) uint8 -> (n, h, w)
    uint8 with size = (h, w). Any input image size works: the network only sees ``size``."""
    top, bottom, left, right = box
    h, w = size
    out = np.empty((len(frames), h, w), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame[top:bottom, left:right], (w, h), interpolation=cv2.INTER_AREA)
    return out


def normalise_frames(frames):
    """uint8-range frames (numpy or torch) -> float32 (x - INTENSITY_MEAN) / INTENSITY_STD."""
    if isinstance(frames, np.ndarray):
        return (frames.astype(np.float32) - INTENSITY_MEAN) / INTENSITY_STD
    return (frames.float() - INTENSITY_MEAN) / INTENSITY_STD


def preprocess(frames: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop, resize and normalise: (n, H, W) uint8 -> (n, h, w) float32."""
    return normalise_frames(preprocess_u8(frames, box, size))


# ----------------------------------------------------------- speckle decorrelation maps
#
# Out-of-plane motion shows in ultrasound as speckle decorrelation between neighbouring
# frames, but speckle is a fine-grained pattern (a pixel or two at 480 x 640) that the
# area-averaged network input (64 x 80: 6-8 pixels per input pixel) wipes out. So the
# decorrelation is measured at native resolution, as one normalised cross-correlation
# (NCC) per input pixel's block of native pixels, and given to the local encoder as a
# second channel. It is stored as uint8 (NCC in [-1, 1] -> 0..255), the same in training
# and prediction, so both see bit-identical inputs.

NCC_MIN_VARIANCE = 1.0  # a block flatter than this (outside the fan) has no defined NCC -> 0
NCC_MEAN, NCC_STD = 0.5, 0.25  # network input = (NCC - NCC_MEAN) / NCC_STD
NCC_NO_PAIR = 255  # encoded NCC 1.0 ("no evidence of motion") for a frame with no partner


def encode_ncc(ncc: np.ndarray) -> np.ndarray:
    """NCC in [-1, 1] -> uint8 0..255 (steps of 1/127.5)."""
    return np.clip(np.rint((np.asarray(ncc, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def normalise_ncc(encoded):
    """uint8 encoded NCC (numpy or torch) -> float32 network input (NCC - NCC_MEAN) / NCC_STD."""
    x = encoded.astype(np.float32) if isinstance(encoded, np.ndarray) else encoded.float()
    return (x / 127.5 - 1.0 - NCC_MEAN) / NCC_STD


def block_moments(crop: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block mean and variance (h, w) float32 of an image crop (H', W') float32 over
    the blocks that area-resizing to ``size`` = (h, w) averages (INTER_AREA moments)."""
    h, w = size
    mean = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
    return mean, cv2.resize(crop * crop, (w, h), interpolation=cv2.INTER_AREA) - mean * mean


def block_ncc(a: np.ndarray, b: np.ndarray, size: tuple[int, int], moments=None) -> np.ndarray:
    """NCC of two images a, b (H', W') float32 over the blocks that area-resizing to
    ``size`` = (h, w) averages: cov / sqrt(var_a var_b), each moment a block mean.
    ``moments``: (block_moments(a), block_moments(b)) when already known. Returns (h, w)
    float32 in [-1, 1], 0 where a block is flat (variance below NCC_MIN_VARIANCE)."""
    h, w = size
    (ea, va), (eb, vb) = moments or (block_moments(a, size), block_moments(b, size))
    cov = cv2.resize(a * b, (w, h), interpolation=cv2.INTER_AREA) - ea * eb
    ok = (va > NCC_MIN_VARIANCE) & (vb > NCC_MIN_VARIANCE)
    out = np.zeros((h, w), np.float32)
    out[ok] = cov[ok] / np.sqrt(va[ok] * vb[ok])
    return np.clip(out, -1.0, 1.0)


def decorrelation_u8(
    frames: np.ndarray,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    steps: tuple[int, ...] = (1,),
    before: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Encoded block NCC of each frame with the frame k before it, for each k in ``steps``.

    frames (n, H, W) uint8, consecutive frames of a scan; before: the (up to max(steps))
    frames that precede them in the scan, None at the scan's start. Returns k -> (n, h, w)
    uint8; a frame with no partner k frames back gets NCC_NO_PAIR (the caller of a whole
    scan replaces those, see fill_scan_start). Each frame's block moments are computed
    once and shared by all its pairs.
    """
    top, bottom, left, right = box
    h, w = size
    prev = [] if before is None or not steps else list(before[-max(steps) :])
    crops = [f[top:bottom, left:right].astype(np.float32) for f in [*prev, *frames]]
    moments = [block_moments(c, size) for c in crops]
    out = {k: np.full((len(frames), h, w), NCC_NO_PAIR, np.uint8) for k in steps}
    for j in range(len(frames)):
        i = len(prev) + j
        for k in steps:
            if i >= k:
                ncc = block_ncc(crops[i - k], crops[i], size, (moments[i - k], moments[i]))
                out[k][j] = encode_ncc(ncc)
    return out


def fill_scan_start(maps: np.ndarray, step: int) -> np.ndarray:
    """Frames 0..step-1 of a scan have no frame ``step`` before them: give them the NCC of
    the pair (j, j+step) instead (NCC is symmetric: that is maps[j + step]). In place."""
    n = len(maps)
    for j in range(min(step, n)):
        if j + step < n:
            maps[j] = maps[j + step]
    return maps


FOV_FRAMES = 32  # frames the field of view is found from


@dataclass
class ScanInput:
    """A scan as the networks see it, before normalisation.

    frames (N, h, w) uint8: cropped to the field of view ``box`` (top, bottom, left,
    right; original 0-based pixels, end exclusive) and resized; decorrelation: step k ->
    (N, h, w) uint8 encoded block NCC of frame j with frame j-k (frames j < k: with j+k).
    """

    frames: np.ndarray
    decorrelation: dict[int, np.ndarray]
    box: tuple[int, int, int, int]
    # read_scan_input's ``also``: its result on every chunk of full-resolution frames,
    # concatenated in frame order (None without it)
    also: np.ndarray | None = None

    def network_input(self, steps: int = 1) -> np.ndarray:
        """(N, C, h, w) float32: normalised frames, then the decorrelation channels of frame
        steps 1, 2, ..., ``steps`` that were computed, up to the first missing one (so that
        channel c is always step c, ModelConfig.frame_steps)."""
        channels = [normalise_frames(self.frames)]
        for k in range(1, steps + 1):
            if k not in self.decorrelation:
                break
            channels.append(normalise_ncc(self.decorrelation[k]))
        return np.stack(channels, axis=1)


def read_scan_input(
    scan,
    size: tuple[int, int],
    steps: tuple[int, ...] = (1,),
    chunk: int = 64,
    workers: int = 1,
    also: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ScanInput:
    """Read a scan (data.Scan) chunk by chunk into a ScanInput of input size ``size`` (h, w),
    with decorrelation maps for each frame step in ``steps`` (none when empty).

    ``workers`` chunks are read and preprocessed at a time, in threads (OpenCV and numpy
    release the GIL): each chunk reads the max(steps) frames before it as well, so the
    result is the same, bit for bit, whatever ``workers`` and ``chunk``. At most
    ``workers`` chunks of full-resolution frames are in memory at a time.

    also: a per-frame function of a chunk (n, H, W) uint8 -> (n, ...), run on the same
    full-resolution frames (ScanInput.also), so that whoever needs the scan another way
    (the predictor's registration) does not read it a second time."""
    from concurrent.futures import ThreadPoolExecutor

    box = field_of_view_box(scan.read_frames(0, min(scan.n_frames, FOV_FRAMES)))
    keep = max(steps, default=0)

    def one(start: int):
        lo = max(0, start - keep)
        frames = scan.read_frames(lo, start + chunk)
        before, part = (frames[: start - lo] if start > lo else None), frames[start - lo :]
        extra = also(part) if also is not None else None
        return preprocess_u8(part, box, size), decorrelation_u8(part, box, size, steps, before), extra

    starts = range(0, scan.n_frames, chunk)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(one, starts))
    else:
        parts = [one(s) for s in starts]
    frames = np.concatenate([f for f, _, _ in parts])
    decorrelation = {k: fill_scan_start(np.concatenate([m[k] for _, m, _ in parts]), k) for k in steps}
    extra = np.concatenate([e for _, _, e in parts]) if also is not None else None
    return ScanInput(frames, decorrelation, box, extra)


def global_indices(n_frames: int, count: int) -> np.ndarray:
    """``count`` frame indices spread evenly over the scan, first and last included."""
    return np.unique(np.round(np.linspace(0, n_frames - 1, count)).astype(int))


def scan_positions(indices: np.ndarray, n_frames: int) -> np.ndarray:
    """Frame (or transition) indices -> scan positions in [0, 1]."""
    return np.asarray(indices, np.float32) / max(n_frames - 1, 1)


# ------------------------------------------------------------------ what the name says
#
# Speckle decorrelation measures how far the probe moved out of plane, not in which
# direction; with sweeps in both directions (and the reversal augmentation) a network
# that sees only the images cannot tell +z from -z, and its loss is lowest when it
# predicts no out-of-plane motion. The scan's name is part of the data format and says
# the direction: in a distal-to-proximal sweep the probe moves towards the elbow, which
# fixes the sign of the elevational motion for a given probe orientation. A member with
# ModelConfig.scan_conditioning gets this code; a name that does not parse gets zeros
# ("unknown"), which training also shows it (AugmentConfig.forget_name).

SCAN_CODE_SIZE = 4  # [direction, parallel, perpendicular, rotation]


def scan_code(name: str | None, reverse: bool = False) -> np.ndarray:
    """(4,) float32 code of a scan name for conditioning a member:
    [direction, Par, Per, rotation]. direction is +1 for DtP, -1 for PtD, negated when
    the scan is played backwards (``reverse``: a reversed DtP sweep is a PtD sweep), 0
    for rotation scans; the others are one-hot flags. A name of neither protocol
    (or None) gives all zeros: the member falls back to what the images alone say."""
    from tusrec.data import ScanPattern

    code = np.zeros(SCAN_CODE_SIZE, np.float32)
    pattern = ScanPattern.from_name(name or "")
    if pattern.protocol == "2024":
        sign = 1.0 if pattern.direction == "DtP" else -1.0
        code[0] = -sign if reverse else sign
        code[1 if pattern.orientation == "Par" else 2] = 1.0
    elif pattern.protocol == "2025":
        code[3] = 1.0
    return code

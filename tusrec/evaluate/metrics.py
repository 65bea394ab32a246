"""Per-scan errors GPE, GLE, LPE, LLE (docs/conventions.md section 3), in bounded memory.

    GPE = mean over frames 1..N-1 and all pixels of || GP_true - GP_pred ||_2   (mm)
    LPE = the same with LP;  GLE, LLE = mean over the K landmarks (mm)

The true fields are generated a chunk of frames at a time from the ground-truth
transforms and compared with the predicted arrays read chunk by chunk (numpy arrays or
h5py datasets alike): neither a true nor a predicted GP/LP is ever held whole. Each pass
also yields the error of the identity prediction (all-zero DDFs), i.e. the mean true
displacement norm, which the 2025 normalisation needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tusrec.ddf import DEFAULT_CHUNK, landmark_ddfs, pixel_ddfs
from tusrec.geometry import Calibration, frame_transforms, image_corners, read_calibration


class PredictionValueError(ValueError):
    """A predicted array holds NaN or Inf, or has the wrong shape."""


@dataclass(frozen=True)
class ErrorPair:
    """A mean error (mm) of a prediction and of the identity prediction."""

    error: float
    identity: float


def _read_chunk(pred, start: int, stop: int, buffer: np.ndarray) -> np.ndarray:
    """Frames start..stop-1 of a (N-1, 3, H*W) array or h5py dataset into ``buffer``."""
    out = buffer[: stop - start]
    if hasattr(pred, "read_direct") and pred.dtype == out.dtype:
        pred.read_direct(out, np.s_[start:stop])
    else:
        out[...] = pred[start:stop]
    return out


def _norm_sums(d: np.ndarray) -> np.ndarray:
    """Per frame, the sum over pixels of the Euclidean norm: (n, 3, P) -> (n,) float64.

    einsum over the size-3 axis; far faster than norm routines that reduce a strided axis.
    """
    return np.sqrt(np.einsum("fcp,fcp->fp", d, d)).sum(axis=1, dtype=np.float64)


def pixel_errors(
    pred,
    transforms: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    chunk: int = DEFAULT_CHUNK,
    name: str = "GP",
) -> ErrorPair:
    """Mean per-pixel error of a dense prediction against the fields of ``transforms``.

    pred: (N-1, 3, H*W) mm (numpy array or h5py dataset). transforms: (N-1, 4, 4) true
    T(i->0) (for GP) or T(i->i-1) (for LP). Raises PredictionValueError on a wrong shape
    or a non-finite value (naming the first bad frame).
    """
    h, w = image_size
    n = len(transforms)
    if tuple(pred.shape) != (n, 3, h * w):
        raise PredictionValueError(f"'{name}' has shape {tuple(pred.shape)}, expected {(n, 3, h * w)}")
    size = min(chunk, n)
    block_buf = np.empty((size, 3, h * w), dtype=np.float32)
    true_buf = np.empty((size, 3, h * w), dtype=np.float32)
    err_sum = 0.0
    identity_sum = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = _read_chunk(pred, start, stop, block_buf)
        true = pixel_ddfs(transforms[start:stop], T_scale, h, w, out=true_buf[: stop - start])
        identity_sum += float(_norm_sums(true).sum())
        block -= true
        errors = _norm_sums(block)
        if not np.isfinite(errors).all():
            # NaN and Inf make their frame's sum non-finite; so can a finite value whose
            # square overflows float32, which float64 settles.
            bad = np.flatnonzero(~np.isfinite(_read_chunk(pred, start, stop, block_buf)).all(axis=(1, 2)))
            if len(bad):
                raise PredictionValueError(
                    f"'{name}' has NaN or Inf values (first in frame {start + bad[0] + 1})"
                )
            errors = _norm_sums(block.astype(np.float64) - true)
        err_sum += float(errors.sum())
    count = n * h * w
    return ErrorPair(err_sum / count, identity_sum / count)


def transform_pixel_error(
    pred: np.ndarray,
    true: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    chunk: int = 8,
    dtype=np.float64,
) -> float:
    """GPE/LPE of predicted transforms, without writing or reading dense arrays (mm).

    pred, true: (N-1, 4, 4). The DDF is affine in (T - I), so the difference of the two
    fields is the field of pred - true + I; produced a chunk of frames at a time in
    ``dtype`` (float32: ~3x faster, and as exact as the float32 DDFs the evaluator reads).
    Equals pixel_errors() of the dense prediction (training validates with it).
    """
    h, w = image_size
    diff = np.asarray(pred, np.float64) - np.asarray(true, np.float64) + np.eye(4)
    total = sum(
        float(_norm_sums(pixel_ddfs(diff[s : s + chunk], T_scale, h, w, dtype=dtype)).sum())
        for s in range(0, len(diff), chunk)
    )
    return total / (len(diff) * h * w)


def landmark_errors(
    pred, transforms: np.ndarray, T_scale: np.ndarray, landmarks: np.ndarray, name: str = "GL"
) -> ErrorPair:
    """Mean error over the landmarks: pred (3, K) mm, landmarks (K, 3) rows (frame, x, y)."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != (3, len(landmarks)):
        raise PredictionValueError(f"'{name}' has shape {pred.shape}, expected {(3, len(landmarks))}")
    if not np.isfinite(pred).all():
        raise PredictionValueError(f"'{name}' has NaN or Inf values")
    true = landmark_ddfs(transforms, T_scale, landmarks)
    return ErrorPair(
        float(np.linalg.norm(pred - true, axis=0).mean()),
        float(np.linalg.norm(true, axis=0).mean()),
    )


def scan_length_mm(local: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]) -> float:
    """Scan length: the distance travelled by the four image corners, summed over
    consecutive frames and averaged over the corners (mm). local: (N-1, 4, 4) T(i->i-1)."""
    h, w = image_size
    corners = image_corners(h, w)  # (4, 4): columns are the corner pixels
    moved = ((np.asarray(local) - np.eye(4)) @ T_scale @ corners)[:, :3]  # (N-1, 3, 4)
    return float(np.linalg.norm(moved, axis=1).sum(axis=0).mean())


def metrics_for_scan(
    pred_GP,
    pred_GL,
    pred_LP,
    pred_LL,
    frames,
    tforms: np.ndarray,
    landmark: np.ndarray,
    calib: Calibration | str | Path,
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """The four errors of one scan, for use inside the organisers' evaluation template.

    pred_GP, pred_LP: (N-1, 3, H*W); pred_GL, pred_LL: (3, K) (numpy arrays or h5py
    datasets, mm). frames: (N, H, W) (only its shape is used). tforms: (N, 4, 4) tool ->
    camera. landmark: (K, 3) rows (frame, x, y). calib: a Calibration or the path of
    calib_matrix.csv. Returns {'GPE', 'GLE', 'LPE', 'LLE'} in mm.
    """
    if not isinstance(calib, Calibration):
        calib = read_calibration(calib)
    image_size = tuple(frames.shape[1:3])
    glob, local = frame_transforms(tforms, calib)
    ts = calib.T_scale
    landmark = np.asarray(landmark, dtype=np.int64)
    return {
        "GPE": pixel_errors(pred_GP, glob, ts, image_size, chunk, "GP").error,
        "GLE": landmark_errors(pred_GL, glob, ts, landmark, "GL").error,
        "LPE": pixel_errors(pred_LP, local, ts, image_size, chunk, "LP").error,
        "LLE": landmark_errors(pred_LL, local, ts, landmark, "LL").error,
    }

"""Per-scan errors GPE, GLE, LPE, LLE (docs/conventions.md section 3), in bounded memory.

    GPE = mean over frames 1..N-1 and all pixels of || GP_true - GP_pred ||_2   (mm)
    LPE = the same with LP;  GLE, LLE = mean over the K landmarks (mm)

The true fields are generated a frame and a tile of image rows at a time from the
ground-truth transforms and compared with the predicted arrays, read a chunk of frames at
a time (numpy arrays or h5py datasets alike) or generated from predicted transforms
(a compact file): neither a true nor a predicted GP/LP is ever held whole. Each pass
also yields the error of the identity prediction (all-zero DDFs), i.e. the mean true
displacement norm, which the 2025 normalisation needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tusrec.ddf import DEFAULT_CHUNK, ddf_coefficients, landmark_ddfs, pixel_ddfs
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


TILE_ROWS = 48  # image rows per tile: a (3, 48, 640) float32 tile is 369 KB, in L2 cache


def field_terms(transforms: np.ndarray, T_scale: np.ndarray, height: int, width: int):
    """The separable float32 terms of the DDFs of ``transforms`` (n, 4, 4):
    along_row (n, 3, W) and down_column (n, 3, H), whose broadcast float32 sum is
    exactly tusrec.ddf.pixel_ddfs (the same arithmetic, term by term; a test holds it)."""
    coef = ddf_coefficients(transforms, T_scale)  # (n, 3, 3)
    x = np.arange(1, width + 1, dtype=np.float64)
    y = np.arange(1, height + 1, dtype=np.float64)
    along_row = (coef[:, :, 0, None] * x + coef[:, :, 2, None]).astype(np.float32)
    down_column = (coef[:, :, 1, None] * y).astype(np.float32)
    return along_row, down_column


class TransformField:
    """A dense GP or LP given by its frame transforms, never materialised.

    transforms: (N-1, 4, 4) float64; the field is (N-1, 3, H*W) float32 mm, the values
    tusrec.ddf.pixel_ddfs gives (as the ground truth and the kit's dense files have them),
    so pixel_errors scores it exactly as the dense file written from the same matrices.
    """

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, transforms: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]):
        self.transforms = np.asarray(transforms, dtype=np.float64)
        self.T_scale = T_scale
        self.h, self.w = image_size
        self.shape = (len(self.transforms), 3, self.h * self.w)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel) -> np.ndarray:
        return pixel_ddfs(self.transforms[sel], self.T_scale, self.h, self.w)


def _tile_norm_sum(d: np.ndarray, sq: np.ndarray, out: np.ndarray) -> float:
    """Sum over a tile's pixels of the Euclidean norm: d (3, R, W) float32, float64 sum.

    Squares in float32 (as the dense comparison always has), rows summed pairwise in
    float32 (640 values), the rest in float64: a float64 sum of every pixel costs more
    than the rest of the pass. sq (3, R, W) and out (R, W) are scratch.
    """
    np.multiply(d, d, out=sq)
    np.add(sq[0], sq[1], out=out)
    out += sq[2]
    np.sqrt(out, out=out)
    return float(out.sum(axis=1).sum(dtype=np.float64))


def _generated_rows(
    a: np.ndarray, b: np.ndarray, r0: int, r1: int, true: np.ndarray, out: np.ndarray
) -> None:
    """out = predicted rows r0..r1-1 - true: the prediction made exactly as pixel_ddfs
    makes it (float32 terms, one float32 sum), then the float32 difference."""
    np.add(a[:, None, :], b[:, r0:r1, None], out=out)
    out -= true


def _stored_rows(frame: np.ndarray, r0: int, r1: int, true: np.ndarray, out: np.ndarray) -> None:
    """out = stored rows r0..r1-1 of a frame (3, H, W) - true (float32)."""
    np.subtract(frame[:, r0:r1], true, out=out)


def _frame_sums(diff_rows, true_a, true_b, h: int, tiles: dict) -> tuple[float, float]:
    """(sum of ||pred - true||, sum of ||true||) over one frame's pixels, float64.

    diff_rows(r0, r1, true, out) fills out (3, r1-r0, W) with predicted minus true rows;
    the true rows are true_a[:, None, :] + true_b[:, r0:r1, None] (float32, as pixel_ddfs
    makes them).
    Tiles of TILE_ROWS rows keep every pass in cache. A non-finite error sum is returned
    as is (the caller checks).
    """
    err = ident = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # the caller settles non-finite sums
        for r0 in range(0, h, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, h)
            p, t, sq, out = (a[..., : r1 - r0, :] for a in tiles.values())
            np.add(true_a[:, None, :], true_b[:, r0:r1, None], out=t)
            ident += _tile_norm_sum(t, sq, out)
            diff_rows(r0, r1, t, p)
            err += _tile_norm_sum(p, sq, out)
    return err, ident


def pixel_errors(
    pred,
    transforms: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    chunk: int = DEFAULT_CHUNK,
    name: str = "GP",
    prefetch=None,
) -> ErrorPair:
    """Mean per-pixel error of a dense prediction against the fields of ``transforms``.

    pred: (N-1, 3, H*W) mm: a numpy array, an h5py dataset (read ``chunk`` frames at a
    time) or a TransformField (a compact prediction, generated tile by tile). transforms:
    (N-1, 4, 4) true T(i->0) (for GP) or T(i->i-1) (for LP). The true field is generated
    a frame and a tile of rows at a time (float32, the values of tusrec.ddf.pixel_ddfs),
    so memory is one chunk of the prediction whatever N. Raises PredictionValueError on
    a wrong shape or a non-finite value (naming the first bad frame). prefetch: called
    as prefetch(pred, start, stop) before each block of a stored prediction is read (a
    tusrec.scoring.readahead.ReadAhead: the kernel reads ahead while this computes).
    """
    h, w = image_size
    n = len(transforms)
    if tuple(pred.shape) != (n, 3, h * w):
        raise PredictionValueError(f"'{name}' has shape {tuple(pred.shape)}, expected {(n, 3, h * w)}")
    rows = min(TILE_ROWS, h)
    tiles = {
        "p": np.empty((3, rows, w), np.float32),
        "t": np.empty((3, rows, w), np.float32),
        "sq": np.empty((3, rows, w), np.float32),
        "out": np.empty((rows, w), np.float32),
    }
    compact = isinstance(pred, TransformField)
    block_buf = None if compact else np.empty((min(chunk, n), 3, h * w), dtype=np.float32)
    err_sum = identity_sum = 0.0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        true_a, true_b = field_terms(transforms[start:stop], T_scale, h, w)
        if compact:
            pred_a, pred_b = field_terms(pred.transforms[start:stop], pred.T_scale, h, w)
        else:
            if prefetch is not None:
                prefetch(pred, start, stop)
            block = _read_chunk(pred, start, stop, block_buf).reshape(stop - start, 3, h, w)
        for k in range(stop - start):
            if compact:
                rows_of = partial(_generated_rows, pred_a[k], pred_b[k])
            else:
                rows_of = partial(_stored_rows, block[k])
            err, ident = _frame_sums(rows_of, true_a[k], true_b[k], h, tiles)
            identity_sum += ident
            if not math.isfinite(err):
                frame = block[k] if not compact else pred[start + k : start + k + 1][0].reshape(3, h, w)
                if not np.isfinite(frame).all():
                    raise PredictionValueError(
                        f"'{name}' has NaN or Inf values (first in frame {start + k + 1})"
                    )
                # A finite value whose square overflows float32: float64 settles it.
                true = (true_a[k][:, None, :] + true_b[k][:, :, None]).astype(np.float64)
                err = float(np.sqrt(((frame.astype(np.float64) - true) ** 2).sum(axis=0)).sum())
            err_sum += err
    count = n * h * w
    return ErrorPair(err_sum / count, identity_sum / count)


def row_forms(M: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine fields as a sum of squares per image row, for n frames at once.

    M (n, 3, 3) float64: field k is e(x, y) = M[k, :, 0] x + M[k, :, 1] y + M[k, :, 2]
    (mm; x, y 1-based pixels). With u = M[k, :, 0] and a row's constant c_y = M[k, :, 1] y
    + M[k, :, 2], |e|^2 = (|u| x + u.c_y / |u|)^2 + |u x c_y|^2 / |u|^2: a square plus a
    non-negative term, so evaluating it per pixel in float32 cancels nothing (the expanded
    quadratic would, near the pixels where e vanishes). Returns float64 slope (n,), offset
    (n, H) and rest (n, H): |e(x, y)|^2 = (slope x + offset[y-1])^2 + rest[y-1].
    """
    u = M[:, :, 0]  # (n, 3)
    y = np.arange(1, height + 1, dtype=np.float64)
    c = M[:, None, :, 1] * y[None, :, None] + M[:, None, :, 2]  # (n, H, 3)
    slope = np.sqrt((u * u).sum(axis=1))
    moving = slope > 0.0  # where u = 0 the error does not change along a row
    unit = np.divide(u, slope[:, None], out=np.zeros_like(u), where=moving[:, None])
    offset = np.einsum("nhc,nc->nh", c, unit)
    rest = np.where(moving[:, None], (np.cross(unit[:, None, :], c) ** 2).sum(axis=2), (c * c).sum(axis=2))
    return slope, offset, rest


# Rows whose norm comes closer than this to a zero (the complex distance, in pixels, of
# the branch points of sqrt((a x + b)^2 + m) from the row) are summed pixel by pixel; the
# others by Euler-Maclaurin, whose remainder after the x^5 term is then below ~1e-9 of
# the row's slope (tests check both against a float64 sum of every pixel).
NEAR_ZERO_PX = 4.0
# Beyond this many row widths the zero is so far that the norm is constant along the row
# to 1e-12 (relative): the row's sum is W times its middle value.
FLAT_WIDTHS = 1e6
NEAR_ROWS_BLOCK = 512  # near rows evaluated at a time: (512, W) float64 scratch


def row_norm_sums(slope: np.ndarray, offset: np.ndarray, rest: np.ndarray, width: int) -> np.ndarray:
    """Per image row, sum_{x=1..W} sqrt((slope x + offset)^2 + rest) (row_forms' terms).

    slope (n,) >= 0, offset and rest (n, H) float64 (rest >= 0) -> (n, H) float64. With t =
    slope x + offset, f(x) = sqrt(t^2 + rest) is analytic except at its branch points
    x = (-offset +- i sqrt(rest)) / slope: where they lie far from the row (more than
    NEAR_ZERO_PX pixels) the sum is the integral of f (closed form) plus the
    Euler-Maclaurin corrections up to the fifth derivative at the row's ends; where they
    lie near it (the norm nearly vanishes in the row), every pixel is summed.
    """
    a = slope[:, None]
    w = float(width)
    middle = (w + 1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        x0 = -offset / a  # inf or nan where slope = 0: flat
        d = np.sqrt(rest) / a
        distance = np.hypot(np.maximum(np.maximum(1.0 - x0, x0 - w), 0.0), d)
    flat = ~(np.abs(x0 - middle) < FLAT_WIDTHS * w)
    near = ~flat & (distance < NEAR_ZERO_PX)
    # Euler-Maclaurin on every row (most are smooth; the others are overwritten below,
    # so what it gives there, inf or nan included, is never used).
    s, b, m = a, offset, rest
    ends = [s * x + b for x in (1.0, w)]  # t at x = 1 and x = W

    def antiderivative(t):  # in t: its derivative is sqrt(t^2 + m)
        log_part = np.where(m > 0, m * np.arcsinh(t / np.sqrt(m)), 0.0)
        return 0.5 * (t * np.sqrt(t * t + m) + log_part)

    def odd_derivatives(t):  # first, third and fifth derivative of f in x (d/dx = s d/dt)
        inv = 1.0 / np.sqrt(t * t + m)
        inv2 = inv * inv
        first = s * t * inv
        third = first * (s * s) * (-3.0 * m) * (inv2 * inv2)
        fifth = third * (s * s) * (-5.0) * (3.0 * m - 4.0 * t * t) * (inv2 * inv2)
        return first, third, fifth

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        integral = (antiderivative(ends[1]) - antiderivative(ends[0])) / s
        f1, fw = (np.sqrt(t * t + m) for t in ends)
        d1, dw = odd_derivatives(ends[0]), odd_derivatives(ends[1])
        out = (
            integral
            + 0.5 * (f1 + fw)
            + (dw[0] - d1[0]) / 12.0
            - (dw[1] - d1[1]) / 720.0
            + (dw[2] - d1[2]) / 30240.0
        )
    out[flat] = w * np.sqrt((a * middle + offset) ** 2 + rest)[flat]
    k, r = np.nonzero(near)
    x = np.arange(1, width + 1, dtype=np.float64)
    for i in range(0, len(k), NEAR_ROWS_BLOCK):
        kk, rr = k[i : i + NEAR_ROWS_BLOCK], r[i : i + NEAR_ROWS_BLOCK]
        t = slope[kk, None] * x + offset[kk, rr, None]
        out[kk, rr] = np.sqrt(t * t + rest[kk, rr, None]).sum(axis=1)
    return out


def field_norm_sums(M: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per frame, the sum over every pixel of |M (x, y, 1)| (mm): M (n, 3, 3) float64
    affine fields (row_forms) -> (n,) float64. Each field is scaled to a largest
    coefficient of 1 first (the norm is homogeneous), so no square overflows; a field too
    large for float64 sums to inf."""
    scale = np.abs(M).max(axis=(1, 2))
    ok = np.isfinite(scale) & (scale > 0)
    sums = np.where(np.isfinite(scale), 0.0, np.inf)
    if ok.any():
        slope, offset, rest = row_forms(M[ok] / scale[ok, None, None], height)
        sums[ok] = row_norm_sums(slope, offset, rest, width).sum(axis=1) * scale[ok]
    return sums


def rigid_pixel_errors(
    pred: np.ndarray,
    transforms: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    chunk: int = DEFAULT_CHUNK,
    name: str = "GP",
) -> ErrorPair:
    """Mean per-pixel error of predicted transforms (a compact prediction) against the
    fields of ``transforms``, and the identity's: GPE or LPE without any dense field.

    pred, transforms: (N-1, 4, 4) float64, predicted and true T(i->0) (GP) or T(i->i-1)
    (LP), taken ``chunk`` frames at a time (the arguments of pixel_errors). The error at
    pixel p is DDF_pred(p) - DDF_true(p) = ((T_pred - T_true) T_scale p)[:3], affine in
    (x, y): its norm is summed a row at a time (row_forms, row_norm_sums), in float64,
    where generating both float32 fields and comparing them (pixel_errors of a
    TransformField) makes some twenty passes over every pixel. Both are within float32
    rounding of the exact value, so the dense file written from the same matrices scores
    within 1e-5 mm of this (tests hold it).
    """
    h, w = image_size
    pred = np.asarray(pred, dtype=np.float64)
    transforms = np.asarray(transforms, dtype=np.float64)
    if pred.shape != transforms.shape:
        raise PredictionValueError(f"'{name}' transforms: shape {pred.shape}, expected {transforms.shape}")
    ts = np.asarray(T_scale, dtype=np.float64)
    err_sum = identity_sum = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # a field beyond float64 sums to inf
        for start in range(0, len(pred), chunk):
            p, t = pred[start : start + chunk], transforms[start : start + chunk]
            # Columns x, y and the constant of the fields (z = 0 drops column 2).
            error = ((p - t) @ ts)[:, :3][:, :, [0, 1, 3]]
            identity = ((t - np.eye(4)) @ ts)[:, :3][:, :, [0, 1, 3]]
            err_sum += float(field_norm_sums(error, h, w).sum())
            identity_sum += float(field_norm_sums(identity, h, w).sum())
    count = len(pred) * h * w
    return ErrorPair(err_sum / count, identity_sum / count)


def frame_pixel_errors(
    pred: np.ndarray, true: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Per frame, the mean per-pixel error (mm) of predicted rigid transforms against the
    true ones: (N, 4, 4), (N, 4, 4) -> (N,) float64, exact in float64 (rigid_pixel_errors'
    row sums; their mean over frames is its LPE or GPE)."""
    h, w = image_size
    diff = (np.asarray(pred, np.float64) - np.asarray(true, np.float64)) @ np.asarray(T_scale, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return field_norm_sums(diff[:, :3][:, :, [0, 1, 3]], h, w) / (h * w)


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

"""In-plane motion from image registration: each frame registered rigidly onto the one before.

The members learn the main motion that the scan's name and the speckle decorrelation give
(tx of a parallel sweep, tz of a perpendicular one) and nothing of the rest of the in-plane
motion: their recovery of ty and rz, and of tx outside the parallel sweeps, is about 0
(``research.validation``). That motion lies in the image plane, where the speckle and the
anatomy move with the tissue, so classical registration measures it directly. Each pair
of neighbouring frames is registered by OpenCV's enhanced correlation coefficient
(``cv2.findTransformECC``, Euclidean motion), started from the network's own estimate, and
only the in-plane part (tx, ty, rz) of the network's T(i->i-1) is replaced; its
out-of-plane part (tz, rx, ry), which no 2D registration sees, is kept
(``with_in_plane``).

Two things keep the registration honest on ultrasound:

* the frames are resampled to square pixels (REGISTRATION_SPACING_MM on both axes), so
  that a rigid motion in image mm is a rigid motion of the pixel grid (the 2024 data's
  pixels are 0.229 x 0.221 mm);
* each frame is divided by the scan's mean frame blurred by REGISTRATION_GAIN_SIGMA_MM:
  what does not move with the tissue (the depth gain, shadows of the probe) would
  otherwise pull every estimate towards no motion. The blur keeps the speckle and the
  anatomy out of the divisor, which on a short or slow scan would otherwise hold them.
  Only the field of view, eroded by REGISTRATION_MARGIN_MM (its edge stays put too), is
  compared.

A pair that OpenCV cannot register (its correlation does not converge, or a blank frame)
keeps the network's in-plane estimate for that transition, and so does a pair that ECC
leaves less alike than the network's estimate did (its masked correlation lower than at
the start), or that ECC moved more than REGISTRATION_MAX_CORRECTION_MM from the start at
any corner of the image. ECC climbs from its start, but on a pair it cannot register it
ends at another optimum; on the simulated parallel sweeps, whose tissue repeats along the
sweep, a tx several mm off. On the fresh validation subject 013 (26 scans of 300 frames)
69 of 7,774 pairs ended less alike, and there the network's in-plane estimate was the
better one (pair LPE 0.158 against 0.230 mm); of the others, 31 moved a corner more
than 2 mm, and there it was too (0.24 against 0.49). The bound was chosen on 013 among
0.75, 1, 1.5 and 2 mm (LPE lowest at 2) and confirmed on subject 012 (32 pairs, 0.29
against 0.43): GPE -0.5 % and -0.4 %, LPE -0.6 % and -0.4 % on 013 and 012, beyond the
first rule.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

# roma-based (no scipy: the submission image has only the predictor's libraries)
from tusrec.geometry import Calibration, matrix_to_pose6, pose6_to_matrix

# Where the predictor takes the in-plane motion (tx, ty, rz) from: the members' combined
# estimate; this registration started from it; or the registration except for the
# parallel sweep's own motion, tx, which the members learn from the name's direction and
# the registration underestimates (keeps_sweep_tx).
IN_PLANE_SOURCES = ("network", "registration", "registration-except-sweep")
DEFAULT_IN_PLANE = "registration-except-sweep"

REGISTRATION_SPACING_MM = 0.45  # square pixels of the registered frames (about half the native)
REGISTRATION_MARGIN_MM = 5.0  # field-of-view erosion: the fan's edge does not move with the tissue
REGISTRATION_GAIN_SIGMA_MM = 3.0  # the static gain pattern: the mean frame at this blur
# A registration that moves some corner of the image farther than this from where the
# start (the network's estimate) put it is taken for a false optimum (module docstring).
REGISTRATION_MAX_CORRECTION_MM = 2.0
REGISTRATION_ITERATIONS = 50
REGISTRATION_EPS = 1e-6


@dataclass
class SquareFrames:
    """A scan's frames resampled to square pixels (``square_frames``).

    frames: (N, h, w) uint8; pixel u (0-based column, row) is at image mm
    ``pixel_mm * u + origin`` (tusrec.geometry.pixel_grid's 1-based convention).
    """

    frames: np.ndarray
    pixel_mm: np.ndarray  # (2,) mm per pixel along x and y (equal up to rounding)
    origin: np.ndarray  # (2,) mm


def square_size(
    image_size: tuple[int, int], calib: Calibration, spacing_mm: float = REGISTRATION_SPACING_MM
) -> tuple[int, int]:
    """(h', w') of a frame of ``image_size`` (H, W) resampled to square pixels of
    ``spacing_mm``."""
    sx, sy = calib.pixel_spacing_mm
    height, width = image_size
    return max(8, round(height * sy / spacing_mm)), max(8, round(width * sx / spacing_mm))


def resample_square(block: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames (n, H, W) uint8 -> (n, h', w') uint8 of ``size`` (square_size) by area
    averaging, frame by frame (so any split of a scan into blocks gives the same frames)."""
    h2, w2 = size
    small = np.empty((len(block), h2, w2), np.uint8)
    for i, frame in enumerate(block):
        small[i] = cv2.resize(frame, (w2, h2), interpolation=cv2.INTER_AREA)
    return small


def square_grid(frames: np.ndarray, image_size: tuple[int, int], calib: Calibration) -> SquareFrames:
    """Resampled frames (n, h', w') (resample_square) of a scan of ``image_size`` (H, W),
    with where their pixels lie in image mm."""
    height, width = image_size
    h2, w2 = frames.shape[1:]
    ratio = np.array([width / w2, height / h2])
    # cv2.resize: destination pixel u samples source 0-based x = (u + 0.5) * W / W' - 0.5,
    # and source pixel x is at (x + 1) * s mm.
    spacing = np.array(calib.pixel_spacing_mm, np.float64)
    return SquareFrames(frames, spacing * ratio, spacing * ((ratio - 1.0) / 2.0 + 1.0))


def square_frames(
    chunks: Iterable[np.ndarray], calib: Calibration, spacing_mm: float = REGISTRATION_SPACING_MM
) -> SquareFrames:
    """Frames resampled to square pixels of ``spacing_mm`` by area averaging.

    chunks: consecutive (n_i, H, W) uint8 blocks of one scan (the whole scan as one
    block, or Scan.iter_frames' blocks, so that a long scan is never held at native size).
    """
    out, image_size = [], None
    for block in chunks:
        if image_size is None:
            image_size = block.shape[1:]
            size = square_size(image_size, calib, spacing_mm)
        out.append(resample_square(block, size))
    if image_size is None:
        raise ValueError("no frames to register")
    return square_grid(np.concatenate(out), image_size, calib)


def registration_mask(fov: np.ndarray, pixel_mm: np.ndarray, margin_mm: float = REGISTRATION_MARGIN_MM):
    """The compared region: the field of view ``fov`` (h, w) bool (pixels non-zero in any
    frame: the fan), eroded by ``margin_mm``. -> (h, w) uint8 0/1."""
    k = max(1, round(margin_mm / float(pixel_mm.min())))
    return cv2.erode(fov.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8))


def static_gain(
    frames: np.ndarray, fov: np.ndarray, pixel_mm: np.ndarray, sigma_mm: float = REGISTRATION_GAIN_SIGMA_MM
):
    """What stays put in the image: the mean frame blurred by ``sigma_mm`` inside the field
    of view ``fov`` (a normalised convolution, so the fan's edge does not darken it), at
    least 1. frames: (N, h, w) uint8 -> (h, w) float32, the divisor of every frame."""
    sigma = sigma_mm / float(pixel_mm.min())
    mean = frames.mean(axis=0, dtype=np.float64).astype(np.float32)
    weight = cv2.GaussianBlur(fov.astype(np.float32), (0, 0), sigma)
    blurred = cv2.GaussianBlur(mean, (0, 0), sigma) / np.maximum(weight, 1e-3)
    return np.maximum(blurred, 1.0).astype(np.float32)


def in_plane_angle(R: np.ndarray) -> np.ndarray:
    """The angle (rad) of the rotation about the image normal z closest to each rotation
    (Procrustes in 2D) of matrices (..., k, k), k >= 2 (rigid 4 x 4, rotations, 2 x 2
    linear parts alike): (...)."""
    return np.arctan2(R[..., 1, 0] - R[..., 0, 1], R[..., 0, 0] + R[..., 1, 1])


def _prepared(square: SquareFrames) -> tuple[np.ndarray, np.ndarray] | None:
    """The comparison mask (h, w) uint8 and the static gain (h, w) float32 of a scan's
    square frames; None when the eroded field of view is too small to register on."""
    fov = (square.frames > 0).any(axis=0)
    mask = registration_mask(fov, square.pixel_mm)
    if int(mask.sum()) < 64:
        return None
    return mask, static_gain(square.frames, fov, square.pixel_mm)


def _flattened_pair(frames: np.ndarray, k: int, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames k + 1 (ECC's template) and k (its input) divided by the static gain ``flat``:
    (h, w) float32 each."""
    return frames[k + 1].astype(np.float32) / flat, frames[k].astype(np.float32) / flat


def rotation_2d(angle: float) -> np.ndarray:
    """The (2, 2) rotation by ``angle`` rad about the image normal."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def image_corners_mm(square: SquareFrames) -> np.ndarray:
    """The 4 corner pixels of the square frames in image mm: (4, 2)."""
    h, w = square.frames.shape[1:]
    pixels = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    return pixels * square.pixel_mm + square.origin


def largest_displacement_mm(a: np.ndarray, b: np.ndarray, points_mm: np.ndarray) -> float:
    """How far apart two in-plane motions a, b = (angle rad, tx mm, ty mm) put any of the
    points (k, 2) in image mm: max_k |R_a p_k + t_a - (R_b p_k + t_b)| in mm. Over an image's
    corners this is the largest over the whole image (the norm of an affine map is convex)."""

    def moved(q):
        return points_mm @ rotation_2d(q[0]).T + np.asarray(q[1:3])

    return float(np.linalg.norm(moved(a) - moved(b), axis=1).max())


def _each_pair(one, pairs: int, workers: int) -> None:
    """Call ``one(k)`` for k = 0 .. pairs - 1, on ``workers`` threads when more than 1
    (each pair is computed alone, so the results do not depend on the number)."""
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(pairs)))
    else:
        for k in range(pairs):
            one(k)


def pixel_warp(in_plane: np.ndarray, pixel_mm: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The (2, 3) float32 pixel warp of the square frames that is the rigid motion
    ``in_plane`` = (angle rad, tx mm, ty mm) in image mm.

    In image mm q = D u + c, a rigid motion q' = R q + t is the pixel warp
    u' = (D^-1 R D) u + D^-1 (R c + t - c); ECC warps its template (frame i) onto its input
    (frame i-1), which is T(i->i-1)."""
    angle, t = in_plane[0], np.asarray(in_plane[1:3], np.float64)
    D, Dinv = np.diag(pixel_mm), np.diag(1.0 / pixel_mm)
    R = rotation_2d(angle)
    warp = np.zeros((2, 3), np.float32)
    warp[:, :2] = Dinv @ R @ D
    warp[:, 2] = Dinv @ (R @ origin + t - origin)
    return warp


def register_in_plane(
    square: SquareFrames,
    initial: np.ndarray | None = None,
    deadline: float | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The in-plane motion T(i->i-1) of each pair of neighbouring frames, in image mm.

    square: the scan (square_frames), N frames; initial: (N-1, 4, 4) transforms to start
    from (their in-plane part; None: no motion); deadline: time.perf_counter() time after
    which no pair is started; workers: threads (OpenCV releases the GIL; each pair is
    registered alone, so the result does not depend on the number).

    Returns (in_plane (N-1, 3) float64: angle about the image normal (rad), tx, ty (mm);
    registered (N-1,) bool). A pair that did not register keeps the start's in-plane
    values: no convergence, a blank frame, the deadline, a correction of more than
    REGISTRATION_MAX_CORRECTION_MM at a corner of the image, or less alike after ECC than
    at the start (pair_decorrelation's measure, on its warp).
    """
    frames, pixel_mm, origin = square.frames, square.pixel_mm, square.origin
    n = len(frames)
    if initial is None:
        initial = np.tile(np.eye(4), (max(n - 1, 0), 1, 1))
    initial = np.asarray(initial, np.float64)
    if len(initial) != n - 1:
        raise ValueError(f"{len(initial)} start transforms for {n} frames; expected {n - 1}")
    result = np.stack([in_plane_angle(initial), initial[:, 0, 3], initial[:, 1, 3]], axis=1)
    registered = np.zeros(n - 1, bool)
    if n < 2:
        return result, registered
    prepared = _prepared(square)
    if prepared is None:
        return result, registered
    mask, flat = prepared
    inside = mask.astype(bool)
    corners = image_corners_mm(square)
    D, Dinv = np.diag(pixel_mm), np.diag(1.0 / pixel_mm)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, REGISTRATION_ITERATIONS, REGISTRATION_EPS)

    def one(k: int) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            return
        start = pixel_warp(result[k], pixel_mm, origin)
        template, moving = _flattened_pair(frames, k, flat)
        try:
            _, warp = cv2.findTransformECC(
                template, moving, start.copy(), cv2.MOTION_EUCLIDEAN, criteria, mask, 1
            )
        except cv2.error:
            return
        if not np.all(np.isfinite(warp)):
            return
        M = D @ warp[:, :2].astype(np.float64) @ Dinv
        fitted = np.array([in_plane_angle(M), *(D @ warp[:, 2].astype(np.float64) + origin - M @ origin)])
        if largest_displacement_mm(fitted, result[k], corners) > REGISTRATION_MAX_CORRECTION_MM:
            return
        # Judged on the warp pair_decorrelation will use, so that its value after the
        # registration is never above the start's.
        after = _warped_decorrelation(template, moving, pixel_warp(fitted, pixel_mm, origin), inside)
        if after > _warped_decorrelation(template, moving, start, inside):
            return
        result[k] = fitted
        registered[k] = True

    _each_pair(one, n - 1, workers)
    return result, registered


def keeps_sweep_tx(source: str, name: str | None) -> bool:
    """Whether ``source`` keeps the network's tx for the scan ``name``: the sweep motion of
    a 2024 parallel sweep, under 'registration-except-sweep'."""
    from tusrec.data import ScanPattern

    if source != "registration-except-sweep" or name is None:
        return False
    pattern = ScanPattern.from_name(name)
    return pattern.protocol == "2024" and pattern.orientation == "Par"


def with_in_plane(local: np.ndarray, in_plane: np.ndarray, keep_tx: bool = False) -> np.ndarray:
    """Rigid transforms with their in-plane part replaced.

    local: (N, 4, 4) T(i->i-1) in image mm; in_plane: (N, 3) (angle rad about z, tx mm,
    ty mm). The rotation vector's z component becomes the angle and the translation's x
    and y become tx, ty (y only with ``keep_tx``); rx, ry and tz are kept. Returns
    (N, 4, 4) float64.
    """
    local = np.asarray(local, np.float64)
    if len(local) == 0:
        return local.copy()
    pose = matrix_to_pose6(local)  # (N, 6): rotation vector, translation
    pose[:, 2] = in_plane[:, 0]
    out = local.copy()
    out[:, :3, :3] = pose6_to_matrix(pose)[:, :3, :3]
    if keep_tx:
        out[:, 1, 3] = in_plane[:, 2]
    else:
        out[:, :2, 3] = in_plane[:, 1:3]
    return out


def _decorrelation(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the zero-mean normalised correlation of two equal-length pixel vectors (0 when
    they are alike up to gain and offset, 1 when unrelated; 1 for a blank one)."""
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return 1.0 - float((a * b).sum()) / denominator if denominator > 0 else 1.0


def _warped_decorrelation(
    template: np.ndarray, moving: np.ndarray, warp: np.ndarray, inside: np.ndarray
) -> float:
    """_decorrelation of ``template`` with ``moving`` warped by the (2, 3) pixel ``warp``
    (ECC's convention: template pixel u shows moving at warp @ u) over the pixels
    ``inside`` (h, w) bool. template, moving: (h, w) float32."""
    h, w = moving.shape
    warped = cv2.warpAffine(moving, warp, (w, h), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP)
    return _decorrelation(template[inside], warped[inside])


def pair_decorrelation(square: SquareFrames, in_plane: np.ndarray, workers: int = 1) -> np.ndarray:
    """How unlike each frame is the one before, before and after the in-plane motion.

    square: the scan (square_frames), N frames; in_plane: (N-1, 3) (angle rad, tx mm,
    ty mm), e.g. register_in_plane's. Returns (N-1, 2) float64: 1 - the zero-mean normalised
    correlation of frame i with frame i-1 as they are, and with frame i-1 warped by the
    in-plane motion, both on the gain-flattened frames inside the registration mask (as ECC
    compares them). After the in-plane motion is taken out, what is left is the speckle's
    decorrelation by the out-of-plane motion and what the registration missed, the two
    sources of the registered ensemble's error (tusrec.model.error_model). All 1 when the
    field of view is too small to compare. ``workers``: threads (the result does not
    depend on them).
    """
    frames = square.frames
    n = len(frames)
    out = np.ones((max(n - 1, 0), 2))
    prepared = _prepared(square) if n > 1 else None
    if prepared is None:
        return out
    mask, flat = prepared
    inside = mask.astype(bool)

    def one(k: int) -> None:
        template, moving = _flattened_pair(frames, k, flat)
        out[k, 0] = _decorrelation(template[inside], moving[inside])
        out[k, 1] = _warped_decorrelation(
            template, moving, pixel_warp(in_plane[k], square.pixel_mm, square.origin), inside
        )

    _each_pair(one, n - 1, workers)
    return out

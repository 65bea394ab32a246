"""Displacement fields (DDFs) from frame transforms: GP, GL, LP, LL (docs/conventions.md section 2).

For a frame transform T (frame i's image mm -> reference frame's image mm) and a pixel
p = (x, y, 0, 1) (1-based),

    DDF(p) = (T @ T_scale @ p)[0:3] - (T_scale @ p)[0:3] = ((T - I) @ T_scale @ p)[0:3]

which, since z = 0, is the affine map  x * M[:, 0] + y * M[:, 1] + M[:, 3]  with
M = ((T - I) @ T_scale)[0:3]. The dense fields are produced a chunk of frames at a time
(a 1,600-frame GP is 5.9 GB in float32); the landmark fields are read off M directly,
without building the dense field.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tusrec.data import DDF_FORM, PredictionWriter
from tusrec.geometry import Calibration, frame_transforms

DEFAULT_CHUNK = 16  # frames per chunk: 16 x 3 x 307,200 float32 = 59 MB


def ddf_coefficients(transforms: np.ndarray, T_scale: np.ndarray) -> np.ndarray:
    """Affine coefficients of the DDF of each transform: (n, 4, 4) -> (n, 3, 3) float64.

    Column 0 multiplies x, column 1 multiplies y, column 2 is the constant term (mm).
    """
    T = np.asarray(transforms, dtype=np.float64)
    M = (T - np.eye(4)) @ np.asarray(T_scale, dtype=np.float64)
    return M[:, :3][:, :, [0, 1, 3]]


def pixel_ddfs(
    transforms: np.ndarray,
    T_scale: np.ndarray,
    height: int,
    width: int,
    dtype=np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dense DDFs of every pixel: transforms (n, 4, 4) -> (n, 3, H*W) in mm.

    Pixel k of the last axis is (x, y) = (k % W + 1, k // W + 1), the order of
    ``frame.reshape(-1)``. The field is separable, x * M0 + M3 along a row plus
    y * M1 down a column, so it is built by one broadcast add of a (n, 3, W) and a
    (n, 3, H) term, computed in float64 and rounded to ``dtype`` (float32 keeps errors
    below 1e-5 mm for TUS-REC-sized images).
    """
    coef = ddf_coefficients(transforms, T_scale)  # (n, 3, 3)
    n = coef.shape[0]
    x = np.arange(1, width + 1, dtype=np.float64)
    y = np.arange(1, height + 1, dtype=np.float64)
    along_row = (coef[:, :, 0, None] * x + coef[:, :, 2, None]).astype(dtype)  # (n, 3, W)
    down_column = (coef[:, :, 1, None] * y).astype(dtype)  # (n, 3, H)
    if out is None:
        out = np.empty((n, 3, height * width), dtype=dtype)
    np.add(along_row[:, :, None, :], down_column[:, :, :, None], out=out.reshape(n, 3, height, width))
    return out


def iter_pixel_ddfs(
    transforms: np.ndarray,
    T_scale: np.ndarray,
    height: int,
    width: int,
    chunk: int = DEFAULT_CHUNK,
    dtype=np.float32,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, ddf) with ddf (n, 3, H*W) for transforms[start:start+n].

    One buffer is reused, so peak memory is one chunk whatever the number of frames:
    consume (or copy) each chunk before asking for the next.
    """
    buffer = np.empty((min(chunk, len(transforms)), 3, height * width), dtype=dtype)
    for start in range(0, len(transforms), chunk):
        block = transforms[start : start + chunk]
        yield start, pixel_ddfs(block, T_scale, height, width, dtype, out=buffer[: len(block)])


def landmark_ddfs(transforms: np.ndarray, T_scale: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """DDFs at the landmarks: (3, K) float64 mm.

    transforms: (N-1, 4, 4), entry k for frame k+1 (as GP/LP). landmarks: (K, 3) rows
    (frame index f, x, y) with f in 1..N-1 and 1-based x, y; column j equals the pixel
    DDF of frame f at (x, y), i.e. GP[f-1, :, (y-1)*W + (x-1)].
    """
    lm = np.asarray(landmarks, dtype=np.int64)
    coef = ddf_coefficients(np.asarray(transforms)[lm[:, 0] - 1], T_scale)  # (K, 3, 3)
    xy1 = np.stack([lm[:, 1], lm[:, 2], np.ones(len(lm))], axis=1).astype(np.float64)
    return np.einsum("kij,kj->ik", coef, xy1)


@dataclass
class GroundTruth:
    """Ground-truth transforms of a scan; the DDFs follow from them.

    global_: (N-1, 4, 4) T(i->0); local: (N-1, 4, 4) T(i->i-1); float64; entry k is frame k+1.
    """

    global_: np.ndarray
    local: np.ndarray
    calib: Calibration
    image_size: tuple[int, int]

    @classmethod
    def from_tforms(cls, tforms: np.ndarray, calib: Calibration, image_size: tuple[int, int]) -> GroundTruth:
        g, loc = frame_transforms(tforms, calib)
        return cls(g, loc, calib, image_size)

    @classmethod
    def from_scan(cls, scan, calib: Calibration) -> GroundTruth:
        """From a tusrec.data.Scan with ground-truth tforms."""
        return cls.from_tforms(scan.read_tforms(), calib, scan.image_size)

    @property
    def n_frames(self) -> int:
        return self.global_.shape[0] + 1

    def landmark_ddfs(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(GL, LL), each (3, K) float64 mm."""
        ts = self.calib.T_scale
        return landmark_ddfs(self.global_, ts, landmarks), landmark_ddfs(self.local, ts, landmarks)

    def iter_pixel_ddfs(
        self, chunk: int = DEFAULT_CHUNK, dtype=np.float32
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (start, GP chunk, LP chunk), each (n, 3, H*W): frames start+1..start+n.

        Buffers are reused between chunks (see iter_pixel_ddfs).
        """
        h, w = self.image_size
        ts = self.calib.T_scale
        gp = iter_pixel_ddfs(self.global_, ts, h, w, chunk, dtype)
        lp = iter_pixel_ddfs(self.local, ts, h, w, chunk, dtype)
        for (start, g), (_, loc) in zip(gp, lp, strict=True):
            yield start, g, loc


def write_predictions(
    path,
    global_: np.ndarray,
    local: np.ndarray,
    calib: Calibration,
    image_size: tuple[int, int],
    landmarks: np.ndarray | None = None,
    attrs: dict | None = None,
    extras: dict[str, np.ndarray] | None = None,
    chunk: int = DEFAULT_CHUNK,
    started_at: float | None = None,
    form: str = DDF_FORM,
) -> None:
    """Write a predictions file (tusrec.data.PredictionWriter) from frame transforms.

    global_, local: (N-1, 4, 4) T(i->0) and T(i->i-1) in image mm, stored (float64) in
    both forms. ``form='ddf'`` (dense) also streams GP/LP in chunks of frames (peak memory
    one chunk); ``form='transforms'`` (compact) writes no GP/LP: the evaluator generates
    them from the transforms with this module's pixel_ddfs. GL/LL are written when
    ``landmarks`` ((K, 3) rows frame, x, y) are given; ``extras`` (e.g. uncertainty
    (N-1,)) likewise. ``started_at``: see PredictionWriter.
    """
    h, w = image_size
    n_frames = len(global_) + 1
    ts = calib.T_scale
    with PredictionWriter(path, n_frames, image_size, attrs, started_at, form) as out:
        if form == DDF_FORM:
            _write_pixel_ddfs(out, global_, local, ts, (h, w), chunk)
        if landmarks is not None:
            out.write_landmarks(landmark_ddfs(global_, ts, landmarks), landmark_ddfs(local, ts, landmarks))
        out.write_transforms(global_, local)
        for name, arr in (extras or {}).items():
            out.write_array(name, arr)


def _write_pixel_ddfs(out, global_, local, ts, image_size, chunk: int) -> None:
    h, w = image_size
    n = len(global_)
    # Generation of chunk k+1 overlaps the writing of chunk k (numpy and HDF5 release the
    # GIL), with two buffer pairs so a chunk is never overwritten while being written.
    buffers = [np.empty((2, min(chunk, n), 3, h * w), np.float32) for _ in range(2)]
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for k, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            g, loc = buffers[k % 2][:, : stop - start]
            pixel_ddfs(global_[start:stop], ts, h, w, out=g)
            pixel_ddfs(local[start:stop], ts, h, w, out=loc)
            if pending is not None:
                pending.result()
            pending = pool.submit(out.write_pixels, start, g, loc)
        if pending is not None:
            pending.result()


def write_ground_truth(
    scan, calib: Calibration, path, chunk: int = DEFAULT_CHUNK, form: str = DDF_FORM
) -> None:
    """Write a scan's ground truth in the predictions format (either form).

    Scoring this file against the same data must give 0 for every error. GL/LL are
    written when the scan has landmarks.
    """
    gt = GroundTruth.from_scan(scan, calib)
    write_predictions(
        path,
        gt.global_,
        gt.local,
        calib,
        scan.image_size,
        scan.read_landmarks() if scan.has_landmarks else None,
        attrs={"model": "ground truth", "runtime_seconds": 0.0},
        chunk=chunk,
        form=form,
    )

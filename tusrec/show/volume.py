"""Compounding the frames of a scan into a voxel volume with a set of poses.

Every ``pixel_step``-th pixel (rows and columns) of every frame is placed at its position
in the first frame's image mm, T(i->0) @ T_scale @ (x, y, 0, 1), and splatted to the
*nearest* voxel; a voxel holds the mean intensity of the pixels that fell in it (sum and
count are accumulated, so the result does not depend on the order of the frames).

Memory is bounded whatever the scan's length: frames are streamed in chunks of
``FRAME_CHUNK`` and the grid has at most ``max_voxels`` voxels (a float64 sum and a float32
count per volume): the voxel edge is ``voxel_mm`` unless the region needs more
voxels than that, in which case it grows until the grid fits. Both volumes of a scan
(true poses, predicted poses) share one grid, so they can be compared voxel by voxel.
The region is the bounding box of both sets of frames, but never more than the true
frames' box grown by half its size on each side: pixels a wild prediction puts outside
are counted (``outside``) and left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tusrec.geometry import image_corners

DEFAULT_VOXEL_MM = 0.5
DEFAULT_MAX_VOXELS = 2**24  # 16.8 M voxels: 134 MB (float64 sum) + 67 MB (float32 count) per volume
DEFAULT_PIXEL_STEP = 2
FRAME_CHUNK = 32  # frames a step: 59 MB of float64 voxel coordinates at 480 x 640, every 2nd pixel


@dataclass(frozen=True)
class Grid:
    """A voxel grid in the first frame's image mm: voxel (i, j, k) has its centre at
    origin + voxel_mm * (i, j, k) along (x, y, z). shape: (nx, ny, nz)."""

    origin: np.ndarray  # (3,) mm
    voxel_mm: float
    shape: tuple[int, int, int]

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def extent(self, axis: int) -> tuple[float, float]:
        """(first, last) voxel edge along an axis, mm."""
        lo = self.origin[axis] - self.voxel_mm / 2
        return float(lo), float(lo + self.voxel_mm * self.shape[axis])


def frame_corners_mm(global_: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """The four image corners of every frame in the first frame's image mm.

    global_: (N-1, 4, 4) T(i->0), entry k for frame k+1. Returns (N, 4, 3) mm: frame 0
    (the identity) first, corners in the order of ``geometry.image_corners``.
    """
    h, w = image_size
    poses = np.concatenate([np.eye(4)[None], np.asarray(global_, np.float64)])
    return np.swapaxes((poses @ T_scale @ image_corners(h, w))[:, :3], 1, 2)


def make_grid(
    corners: list[np.ndarray],
    voxel_mm: float = DEFAULT_VOXEL_MM,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Grid:
    """The grid holding the frames whose corners are given ((N, 4, 3) mm each; the first
    set is the truth, which bounds the region: see the module docstring)."""
    if voxel_mm <= 0 or max_voxels < 1:
        raise ValueError(f"voxel size {voxel_mm} mm and voxel budget {max_voxels} must be positive")
    true = corners[0].reshape(-1, 3)
    t_lo, t_hi = true.min(axis=0), true.max(axis=0)
    grow = 0.5 * (t_hi - t_lo)
    every = np.concatenate([c.reshape(-1, 3) for c in corners])
    every = every[np.isfinite(every).all(axis=1)]
    lo = np.maximum(every.min(axis=0), t_lo - grow)
    hi = np.minimum(every.max(axis=0), t_hi + grow)
    size = np.maximum(hi - lo, 1e-6)
    voxel = float(voxel_mm)

    def cells(v: float) -> np.ndarray:  # nearest-voxel indices run 0..floor(size/v + 0.5)
        return np.floor(size / v + 0.5) + 1

    while np.prod(cells(voxel)) > max_voxels:
        # the budget is met exactly only for a cube: grow 2 % and retry
        voxel = max(voxel * 1.02, float((np.prod(size) / max_voxels) ** (1 / 3)))
    shape = tuple(int(v) for v in cells(voxel))
    return Grid(lo, voxel, shape)


@dataclass
class Volume:
    """Mean intensity per voxel (float32 (nx, ny, nz), NaN where no pixel fell) on a grid,
    and how many splatted pixels fell outside it."""

    grid: Grid
    values: np.ndarray
    splatted: int
    outside: int


class Compounder:
    """Accumulates frames into a volume: ``add`` chunks of frames, then ``volume()``."""

    def __init__(
        self,
        grid: Grid,
        T_scale: np.ndarray,
        image_size: tuple[int, int],
        pixel_step: int = DEFAULT_PIXEL_STEP,
    ):
        h, w = image_size
        self.grid = grid
        rows = np.arange(0, h, pixel_step)
        cols = np.arange(0, w, pixel_step)
        self.rows, self.cols = rows, cols
        y, x = np.meshgrid(rows + 1.0, cols + 1.0, indexing="ij")  # 1-based pixel coordinates
        pix = np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)])
        self.points = np.asarray(T_scale, np.float64) @ pix  # (4, P) image mm of frame i
        self.sum = np.zeros(grid.n_voxels, np.float64)
        self.count = np.zeros(grid.n_voxels, np.float32)  # exact to 2^24 pixels a voxel
        self.splatted = 0
        self.outside = 0

    def add(self, poses: np.ndarray, frames: np.ndarray) -> None:
        """poses: (n, 4, 4) T(i->0) of the frames; frames: (n, H, W) uint8."""
        g = self.grid
        n = len(frames)
        values = frames[:, self.rows][:, :, self.cols].reshape(n, -1)  # (n, P)
        # voxel coordinates in one product: scale and shift folded into the poses, plus
        # 0.5 so that floor() rounds to the nearest voxel centre
        to_voxel = np.diag([1 / g.voxel_mm] * 3 + [1.0])
        to_voxel[:3, 3] = 0.5 - g.origin / g.voxel_mm
        m = (to_voxel @ np.asarray(poses, np.float64))[:, :3].reshape(-1, 4)
        ijk = np.floor(m @ self.points).reshape(n, 3, -1)  # (n, 3, P)
        with np.errstate(invalid="ignore"):  # NaN poses compare False: outside
            inside = (ijk >= 0).all(axis=1) & (ijk < np.array(g.shape)[None, :, None]).all(axis=1)
        self.splatted += inside.size
        self.outside += int(inside.size - np.count_nonzero(inside))
        strides = np.array([g.shape[1] * g.shape[2], g.shape[2], 1], np.float64)
        flat = np.einsum("nap,a->np", ijk, strides)[inside].astype(np.int64)  # exact below 2^53
        # bincount over the whole grid: a pass over 16 M voxels costs less than sorting
        # the chunk's indices (or np.add.at's scattered writes)
        self.sum += np.bincount(flat, weights=values[inside], minlength=g.n_voxels)
        self.count += np.bincount(flat, minlength=g.n_voxels).astype(np.float32)

    def volume(self) -> Volume:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(self.count > 0, self.sum / self.count, np.nan).astype(np.float32)
        return Volume(self.grid, values.reshape(self.grid.shape), self.splatted, self.outside)


def compound(
    scan,
    pose_sets: list[np.ndarray],
    T_scale: np.ndarray,
    voxel_mm: float = DEFAULT_VOXEL_MM,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    pixel_step: int = DEFAULT_PIXEL_STEP,
) -> list[Volume]:
    """Compound a scan's frames once per set of poses, on one shared grid.

    scan: a tusrec.data.Scan (frames streamed with iter_frames). pose_sets: each (N-1, 4, 4)
    T(i->0), the first being the truth (it bounds the region). Returns one Volume per set.
    """
    corners = [frame_corners_mm(p, T_scale, scan.image_size) for p in pose_sets]
    grid = make_grid(corners, voxel_mm, max_voxels)
    full = [np.concatenate([np.eye(4)[None], np.asarray(p, np.float64)]) for p in pose_sets]
    parts = [Compounder(grid, T_scale, scan.image_size, pixel_step) for _ in pose_sets]
    for start, frames in scan.iter_frames(FRAME_CHUNK):
        for part, poses in zip(parts, full, strict=True):
            part.add(poses[start : start + len(frames)], frames)
    return [p.volume() for p in parts]

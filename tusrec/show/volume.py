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

Frames of a sweep are about a millimetre apart, more than a voxel: nearest-voxel
splatting alone leaves the voxels between two frames empty, and the projections show
stripes where the tissue was never missing, only not sampled at this grid's spacing
(an artefact of the voxel size, not of the scan). So each empty voxel within
``fill`` voxels of splatted ones gets their mean (hole filling: a normalised box
filter, applied to empty voxels only; every splatted voxel keeps its own mean). ``fill``
is chosen from the true frames' spacing (fill_voxels): enough to close the usual gap
between neighbouring frames from both sides. A pair of consecutive frames further apart
than the fill reaches (``reach_mm``) is a real gap, in the truth or in a prediction
that spreads its frames: it is left empty and listed (``gaps``), for the figures to mark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tusrec.geometry import image_corners

DEFAULT_VOXEL_MM = 0.5
DEFAULT_MAX_VOXELS = 2**24  # 16.8 M voxels: 134 MB (float64 sum) + 67 MB (float32 count) per volume
DEFAULT_PIXEL_STEP = 2
MAX_FILL = 4  # voxels: hole filling never reaches further (a wider gap is a gap)
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


def frame_gaps(global_: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(N-1,) mm: how far each frame i+1 reaches from frame i's plane, the largest distance
    of its four corners from that plane (a frame is flat, so no point of it is further).
    In-plane motion does not open a gap and does not count. global_: (N-1, 4, 4) T(i->0)."""
    corners = frame_corners_mm(global_, T_scale, image_size)  # (N, 4, 3)
    poses = np.concatenate([np.eye(4)[None], np.asarray(global_, np.float64)])
    normal = poses[:-1, :3, 2]  # (N-1, 3): each frame's z axis in frame 0's mm
    offset = corners[1:] - corners[:-1, :1]  # (N-1, 4, 3) from a point of frame i
    return np.abs(np.einsum("nc,npc->np", normal, offset)).max(axis=1)


def fill_voxels(spacing_mm: np.ndarray, voxel_mm: float) -> int:
    """Voxels each empty voxel looks for splatted ones: half the usual spacing of
    neighbouring frames (90th percentile of frame_gaps) from either side, at most MAX_FILL."""
    finite = spacing_mm[np.isfinite(spacing_mm)]
    if not len(finite):
        return 0
    return int(min(MAX_FILL, np.ceil(np.quantile(finite, 0.9) / (2 * voxel_mm))))


@dataclass
class Volume:
    """Mean intensity per voxel (float32 (nx, ny, nz), NaN where no pixel fell and no
    splatted voxel is within ``fill`` voxels) on a grid, and how many splatted pixels
    fell outside it. gaps: (m,) index i of each pair of frames (i, i+1) further apart
    than reach_mm (frame_gaps), gap_mm: (m,) how far, gap_mid: (m, 3) the mm point midway
    between the two frames' centres."""

    grid: Grid
    values: np.ndarray
    splatted: int
    outside: int
    fill: int = 0
    reach_mm: float = np.inf
    gaps: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    gap_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gap_mid: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


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

    def volume(self, fill: int = 0) -> Volume:
        """The mean intensity per voxel; with ``fill`` > 0 an empty voxel gets the mean of
        the splatted pixels in the (2 fill + 1)^3 voxels around it (where there are any)."""
        shape = self.grid.shape
        total, count = self.sum.reshape(shape), self.count.reshape(shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(count > 0, total / count, np.nan)
            if fill > 0:
                from scipy.ndimage import uniform_filter

                # the box means of sum and count: their ratio is the neighbours' mean intensity
                size = 2 * fill + 1
                near_sum = uniform_filter(total, size, mode="constant")
                near_count = uniform_filter(count.astype(np.float64), size, mode="constant")
                # a box without any pixel has a count of 0 up to rounding: 1e-9 of one pixel
                near = near_count > 0.5 / size**3
                values = np.where(count > 0, values, np.where(near, near_sum / near_count, np.nan))
        return Volume(self.grid, values.astype(np.float32), self.splatted, self.outside, fill)


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
    T(i->0), the first being the truth (it bounds the region). Returns one Volume per set,
    each hole-filled as far as the true frames' spacing asks (fill_voxels: the same for
    every set, so they compare) and with the gaps wider than that listed.
    """
    corners = [frame_corners_mm(p, T_scale, scan.image_size) for p in pose_sets]
    grid = make_grid(corners, voxel_mm, max_voxels)
    full = [np.concatenate([np.eye(4)[None], np.asarray(p, np.float64)]) for p in pose_sets]
    parts = [Compounder(grid, T_scale, scan.image_size, pixel_step) for _ in pose_sets]
    for start, frames in scan.iter_frames(FRAME_CHUNK):
        for part, poses in zip(parts, full, strict=True):
            part.add(poses[start : start + len(frames)], frames)
    spacing = [frame_gaps(p, T_scale, scan.image_size) for p in pose_sets]
    fill = fill_voxels(spacing[0], grid.voxel_mm)
    # Two frames d mm apart leave at most floor(d / voxel) empty voxels between their
    # nearest voxels along a grid axis, and a run of at most 2 fill closes from both ends:
    # every gap under (2 fill + 1) voxels closes (an oblique one too: the filter's box
    # reaches as far along every axis as the perpendicular does)
    reach = (2 * fill + 1) * grid.voxel_mm
    out = []
    for part, gaps, c in zip(parts, spacing, corners, strict=True):
        volume = part.volume(fill)
        wide = np.flatnonzero(gaps > reach)
        centre = c.mean(axis=1)  # (N, 3)
        volume.reach_mm = reach
        volume.gaps, volume.gap_mm = wide, gaps[wide]
        volume.gap_mid = (centre[wide] + centre[wide + 1]) / 2
        out.append(volume)
    return out

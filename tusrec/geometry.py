"""Geometry of TUS-REC: calibration, the pixel grid, frame transforms, 6-DoF, rotation means.

Conventions (docs/conventions.md section 2, matched exactly):

* Pixel coordinates are 1-based: x = column 1..W, y = row 1..H, z = 0. A pixel is
  the homogeneous point p = (x, y, 0, 1). Flattening is row-major:
  flat index = (y-1)*W + (x-1), the order of ``frame.reshape(-1)``.
* ``T_scale`` = diag(sx, sy, 1, 1) maps pixels to image millimetres.
* ``T_rotation`` (rigid) maps image millimetres to the tracker-tool frame.
* ``tforms[i]`` maps tool frame i to the camera (world) frame.
* T(b->a) = inv(T_rotation) @ inv(tforms[a]) @ tforms[b] @ T_rotation maps frame b's
  image-mm space to frame a's. Global: a = 0, b = i. Local: a = i-1, b = i.

6-DoF convention used throughout the project: a pose vector is
``(rx, ry, rz, tx, ty, tz)``: a rotation vector (axis * angle, radians) followed
by a translation in millimetres; the 4x4 matrix is [[R, t], [0, 1]] with
R = exp([r]x), so a point q maps to R q + t.

Functions are batched over leading dimensions. Rotation functions take and return
torch tensors or numpy arrays (the same kind as their input); the arithmetic is
roma's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# roma and torch are imported inside the functions that use them: importing them costs
# ~4 s, which every command (and --help) would otherwise pay.

# Values of the 2024 data (docs/conventions.md 1.4): the default for synthetic data.
DEFAULT_PIXEL_SPACING_MM = (0.229389190673828, 0.220979690551758)
DEFAULT_T_ROTATION = np.array(
    [
        [0.231064671309448, -0.21805203504134, 0.948189025293473, -70.7413291931152],
        [-0.190847036221471, -0.965787272832032, -0.175591436013112, -80.6505661010742],
        [0.954036962825936, -0.140386087807861, -0.264773903381482, -46.1766223907471],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
IMAGE_SIZE = (480, 640)  # (H, W) of TUS-REC frames

SCALE_LABEL = "scaling_from_pixel_to_mm"
ROTATION_LABEL = "spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system"

# A rigid T_rotation read from a CSV with ~15 significant digits is orthonormal to
# about 1e-7; anything further off is not a rotation.
RIGID_TOLERANCE = 1e-4


class CalibrationError(ValueError):
    """calib_matrix.csv is missing, malformed or not a valid calibration."""


@dataclass(frozen=True)
class Calibration:
    """The two calibration matrices of a TUS-REC data set, float64 (4, 4) each.

    ``T_scale``: pixels -> image mm. ``T_rotation``: image mm -> tracker tool (rigid).
    """

    T_scale: np.ndarray
    T_rotation: np.ndarray

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """(sx, sy): millimetres per pixel along x (columns) and y (rows)."""
        return float(self.T_scale[0, 0]), float(self.T_scale[1, 1])

    @property
    def T_pixel_to_tool(self) -> np.ndarray:
        """T_rotation @ T_scale, (4, 4): pixels -> tracker tool mm."""
        return self.T_rotation @ self.T_scale


def default_calibration() -> Calibration:
    """The calibration of the 2024 TUS-REC data (docs/conventions.md 1.4)."""
    sx, sy = DEFAULT_PIXEL_SPACING_MM
    return Calibration(np.diag([sx, sy, 1.0, 1.0]), DEFAULT_T_ROTATION.copy())


def check_calibration(calib: Calibration, source: str = "calibration") -> None:
    """Raise CalibrationError unless T_scale is a positive diagonal scaling and
    T_rotation is rigid (orthonormal, det +1, last row 0 0 0 1)."""
    ts, tr = np.asarray(calib.T_scale), np.asarray(calib.T_rotation)
    for name, m in (("T_scale", ts), ("T_rotation", tr)):
        if m.shape != (4, 4):
            raise CalibrationError(f"{source}: {name} must be 4x4, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise CalibrationError(f"{source}: {name} has non-finite values")
    expected_scale = np.diag([ts[0, 0], ts[1, 1], 1.0, 1.0])
    if not np.allclose(ts, expected_scale, atol=1e-9) or ts[0, 0] <= 0 or ts[1, 1] <= 0:
        raise CalibrationError(f"{source}: T_scale must be diag(sx, sy, 1, 1) with sx, sy > 0, got\n{ts}")
    rot = tr[:3, :3]
    if (
        not np.allclose(tr[3], [0, 0, 0, 1], atol=RIGID_TOLERANCE)
        or not np.allclose(rot @ rot.T, np.eye(3), atol=RIGID_TOLERANCE)
        or np.linalg.det(rot) < 0
    ):
        raise CalibrationError(
            f"{source}: T_rotation must be rigid (orthonormal rotation with det +1 and "
            f"last row 0 0 0 1), got\n{tr}"
        )


def read_calibration(path: str | Path) -> Calibration:
    """Read calib_matrix.csv: a label line, four comma-separated rows of T_scale, a
    label line, four rows of T_rotation (docs/conventions.md 1.4). Validates the result."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found (expected calib_matrix.csv)")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) != 10:
        raise CalibrationError(
            f"{path}: expected 10 non-empty lines (label, 4 rows of T_scale, label, "
            f"4 rows of T_rotation), got {len(lines)}"
        )
    matrices = []
    for label_line, first in ((0, 1), (5, 6)):
        if _is_numeric_row(lines[label_line]):
            raise CalibrationError(
                f"{path}: line {label_line + 1} should be a label line, got numbers: {lines[label_line]!r}"
            )
        rows = []
        for k in range(first, first + 4):
            try:
                row = [float(v) for v in lines[k].split(",")]
            except ValueError:
                raise CalibrationError(
                    f"{path}: line {k + 1} is not 4 comma-separated numbers: {lines[k]!r}"
                ) from None
            if len(row) != 4:
                raise CalibrationError(
                    f"{path}: line {k + 1} has {len(row)} values, expected 4: {lines[k]!r}"
                )
            rows.append(row)
        matrices.append(np.array(rows, dtype=np.float64))
    calib = Calibration(*matrices)
    check_calibration(calib, source=str(path))
    return calib


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def write_calibration(path: str | Path, calib: Calibration) -> None:
    """Write calib_matrix.csv in the exact 10-line format, atomically."""
    check_calibration(calib, source=str(path))
    path = Path(path)

    def rows(m: np.ndarray) -> list[str]:
        return [",".join(repr(float(v)) for v in r) for r in m]

    text = "\n".join([SCALE_LABEL, *rows(calib.T_scale), ROTATION_LABEL, *rows(calib.T_rotation)])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def pixel_grid(height: int, width: int) -> np.ndarray:
    """Homogeneous 1-based pixel coordinates, row-major: (4, H*W) float64.

    Column k is (x, y, 0, 1) with x = k % W + 1 (column) and y = k // W + 1 (row),
    so column k matches ``frame.reshape(-1)[k]``.
    """
    y, x = np.divmod(np.arange(height * width), width)
    return np.stack([x + 1.0, y + 1.0, np.zeros(height * width), np.ones(height * width)])


def image_corners(height: int, width: int) -> np.ndarray:
    """The four corner pixels (1,1), (W,1), (1,H), (W,H), homogeneous: (4, 4) float64."""
    return np.array([[1.0, width, 1.0, width], [1.0, 1.0, height, height], [0, 0, 0, 0], [1, 1, 1, 1]])


def _inverse_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (..., 4, 4), float64, exact to rounding."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    inv = np.zeros(T.shape, dtype=np.float64)
    inv[..., :3, :3] = np.swapaxes(R, -1, -2)
    inv[..., :3, 3:] = -np.swapaxes(R, -1, -2) @ t
    inv[..., 3, 3] = 1.0
    return inv


def frame_transforms(tforms: np.ndarray, calib: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth transforms between frames' image-mm spaces.

    tforms: (N, 4, 4) tool -> camera per frame (any float dtype).
    Returns (global, local), each (N-1, 4, 4) float64: entry k is frame i = k+1,
    global[k] = T(i->0) and local[k] = T(i->i-1).

    tforms are inverted as general matrices (np.linalg.inv): tracker matrices stored in
    float32 are only rigid to ~1e-7, so the rigid shortcut (R^T) would add its own error.
    """
    tforms = np.asarray(tforms, dtype=np.float64)
    tr = calib.T_rotation
    tr_inv = np.linalg.inv(tr)
    image_to_world = tforms @ tr  # (N, 4, 4): image mm of frame i -> camera
    world_to_image = tr_inv @ np.linalg.inv(tforms)
    global_ = world_to_image[0] @ image_to_world[1:]
    local = world_to_image[:-1] @ image_to_world[1:]
    return global_, local


def compose_local(local, axis: int = 0):
    """Chain local transforms into global ones along ``axis``: (..., N-1, ..., 4, 4), same shape.

    global[k] = local[0] @ local[1] @ ... @ local[k], i.e. T(i->0) = T(1->0) @ ... @ T(i->i-1).
    Takes and returns numpy arrays or torch tensors; out of place, so autograd can run
    through it (training chains predicted transforms with it).
    """
    is_numpy = isinstance(local, np.ndarray)
    parts = list(np.moveaxis(local, axis, 0)) if is_numpy else list(local.unbind(axis))
    out = [parts[0]]
    for T in parts[1:]:
        out.append(out[-1] @ T)
    if is_numpy:
        return np.stack(out, axis=axis)
    import torch

    return torch.stack(out, dim=axis)


def local_from_global(global_: np.ndarray) -> np.ndarray:
    """Inverse of compose_local: T(i->i-1) = inv(T(i-1->0)) @ T(i->0); (N-1,4,4) -> (N-1,4,4)."""
    global_ = np.asarray(global_, dtype=np.float64)
    prev = np.concatenate([np.eye(4)[None], global_[:-1]])
    return np.linalg.inv(prev) @ global_


def _torch_in_numpy_out(fn):
    """Let a roma-based function take numpy arrays too: numpy in, numpy out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        is_numpy = any(isinstance(a, np.ndarray) for a in args)
        args = [torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args]
        out = fn(*args, **kwargs)
        if not is_numpy:
            return out
        if isinstance(out, tuple):
            return tuple(o.numpy() for o in out)
        return out.numpy()

    return wrapper


@_torch_in_numpy_out
def pose6_to_matrix(pose: torch.Tensor) -> torch.Tensor:
    """(..., 6) [rotation vector (rad), translation (mm)] -> (..., 4, 4) rigid transforms."""
    import roma
    import torch

    T = torch.zeros(*pose.shape[:-1], 4, 4, dtype=pose.dtype, device=pose.device)
    T[..., :3, :3] = roma.rotvec_to_rotmat(pose[..., :3])
    T[..., :3, 3] = pose[..., 3:]
    T[..., 3, 3] = 1
    return T


@_torch_in_numpy_out
def matrix_to_pose6(T: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) rigid transforms -> (..., 6) [rotation vector (rad), translation (mm)].

    The rotation part is first projected onto SO(3), so slightly non-orthonormal input
    (float32 tracker data) is accepted.
    """
    import roma
    import torch

    R = roma.special_procrustes(T[..., :3, :3])
    return torch.cat([roma.rotmat_to_rotvec(R), T[..., :3, 3]], dim=-1)


@_torch_in_numpy_out
def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms (..., 4, 4) using R^T (no general matrix inverse)."""
    import torch

    R = T[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = R
    out[..., :3, 3] = -(R @ T[..., :3, 3:]).squeeze(-1)
    out[..., 3, 3] = 1
    return out


@_torch_in_numpy_out
def projected_mean_rotation(R: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Projected (chordal, extrinsic) mean of rotations along ``dim``.

    R: (..., 3, 3) with the members along ``dim``. Returns the rotation closest in
    Frobenius norm to the arithmetic mean of the matrices (SVD projection onto SO(3)),
    shape of R without ``dim``.
    """
    import roma

    return roma.special_procrustes(R.mean(dim=dim))


@_torch_in_numpy_out
def geodesic_distance(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of R1^T R2 for batches of rotations (..., 3, 3) -> (...)."""
    import roma

    return roma.rotmat_geodesic_distance(R1, R2, clamping=1.0)


@_torch_in_numpy_out
def rotation_disagreement(R: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Ensemble disagreement: mean squared geodesic distance (rad^2) of the members
    (along ``dim`` of R, (..., 3, 3)) to their projected mean."""
    import roma

    mean = roma.special_procrustes(R.mean(dim=dim)).unsqueeze(dim)
    return (roma.rotmat_geodesic_distance(R, mean.expand_as(R), clamping=1.0) ** 2).mean(dim=dim)

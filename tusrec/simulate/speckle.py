"""Fully developed speckle: periodic complex Gaussian fields sampled in 3D arm space.

A tile is a periodic complex Gaussian field on a cubic grid (white complex noise low-passed
by an anisotropic Gaussian of standard deviations SPECKLE_SIGMA_MM along the tile axes), so
its amplitude is Rayleigh distributed. The renderer orients the tile x axis along the
probe's depth direction: the field is then short-correlated axially (like a short pulse)
and equally long-correlated laterally and elevationally (like the beam width), so a rotation
about the probe axis does not change its statistics, and moving the image plane 1 mm out of
plane decorrelates it (intensity correlation ~0.1 at 1 mm, ~0.9 at 0.2 mm). A scan's speckle
field is the sum of two tiles of different periods, each with its own random rotation
and offset relative to the arm: the sum is effectively aperiodic and the rotations and
offsets make each scan a new realisation while the tiles themselves are generated once
per seed.

Tiles are stored as tall atlases like the anatomy (anatomy.py), but with slice z and slice
z+1 packed into the four channels (re_z, im_z, re_z+1, im_z+1): one cv2.remap (fast for four
channels) returns both slices of the trilinear blend. Layout (P * (P+1), P+1, 4) float32,
wrap-padded so that coordinates reduced modulo P interpolate across the period without a
seam. Axis order in the tile: (z, y, x) = (slice, row, column); the renderer orients tiles so
that beams run roughly along x (contiguous memory), which keeps cv2.remap cache-friendly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft

SPECKLE_VOXEL_MM = 0.2
# Complex-field correlation (Gaussian sigma, mm) along the tile axes (z, y, x) =
# (elevation, lateral, depth) of the probe.
SPECKLE_SIGMA_MM = (0.45, 0.45, 0.28)
TILE_SIZES = (128, 101)  # voxels per period: 25.6 mm and 20.2 mm, incommensurate


@dataclass
class SpeckleTile:
    atlas: np.ndarray  # (P * (P+1), P+1, 4) float32
    period: int  # P voxels

    @property
    def nbytes(self) -> int:
        return int(self.atlas.nbytes)


def _make_tile(rng: np.random.Generator, n: int) -> SpeckleTile:
    noise = (
        rng.standard_normal((n, n, n), dtype=np.float32)
        + 1j * rng.standard_normal((n, n, n), dtype=np.float32)
    ).astype(np.complex64)
    k = scipy.fft.fftfreq(n).astype(np.float32)
    gz, gy, gx = (
        np.exp(-2.0 * (np.pi * s / SPECKLE_VOXEL_MM * k) ** 2).astype(np.float32) for s in SPECKLE_SIGMA_MM
    )
    spec = scipy.fft.fftn(noise, workers=2)
    spec *= gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    field = scipy.fft.ifftn(spec, workers=2)
    field /= np.sqrt(np.mean(np.abs(field) ** 2))
    padded = np.pad(field, ((0, 1), (0, 1), (0, 1)), mode="wrap")
    atlas = np.empty((n, n + 1, n + 1, 4), np.float32)
    atlas[..., 0], atlas[..., 1] = padded[:-1].real, padded[:-1].imag
    atlas[..., 2], atlas[..., 3] = padded[1:].real, padded[1:].imag
    return SpeckleTile(atlas.reshape(n * (n + 1), n + 1, 4), n)


@functools.lru_cache(maxsize=2)
def speckle_tiles(seed: int) -> tuple[SpeckleTile, ...]:
    """The speckle tiles of a seed (~0.5 s, ~51 MB; cached)."""
    rng = np.random.default_rng([seed, 0x5BEC])
    return tuple(_make_tile(rng, n) for n in TILE_SIZES)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def tile_poses(
    rng: np.random.Generator, tiles: tuple[SpeckleTile, ...], mean_arm_from_image: np.ndarray
) -> list[np.ndarray]:
    """Per tile, the (3, 4) affine map arm mm -> tile voxels (z, y, x) of one scan.

    Tile x follows the scan's mean depth direction, y its lateral and z its elevational
    direction (mean_arm_from_image: (3, 3) or (4, 4) rotation image -> arm), then the lattice
    is tilted by 8-14 degrees about a random axis: an image plane parallel to a lattice
    plane would show the tile's period as an exact repeat. Random offsets make each scan a
    different speckle realisation."""
    R = np.asarray(mean_arm_from_image)[:3, :3]
    perm = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = []
    for tile in tiles:
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(8.0, 14.0))
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        tilt = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
        M = tilt @ perm @ R.T / SPECKLE_VOXEL_MM
        out.append(np.hstack([M, rng.uniform(0, tile.period, (3, 1))]))
    return out

"""B-mode image formation for a convex (curvilinear) probe.

Each frame is formed on a polar grid (beam angle x depth) in the probe's image plane: the
grid points are mapped through the frame's pose into arm coordinates, the 3D speckle field
(full grid) and the anatomy channels (every other beam and sample, then interpolated) are
sampled there, trilinearly, with cv2.remap on tall atlases. Echoes are shadowed by the
cumulative attenuation along each beam, log-compressed to grey levels and scan-converted to
the Cartesian (H, W) image with precomputed cv2.remap maps.

Image geometry (docs/conventions.md section 2): pixel (x, y), 1-based, sits at image-mm point
(sx * x, sy * y, 0); rows grow with depth. The fan apex is above the image, centred
horizontally; the probe face (radius ``radius`` mm) is just below the top row.

Tissue under the probe conforms to its curved face: along each beam, samples within
DEFORM_DEPTH_MM of the face are displaced along the arm's depth axis w by
g * (1 - d / DEFORM_DEPTH_MM)^2, where g is the gap between the face and the skin at that
beam (d: depth below the face). Deeper tissue is rigidly where the pose puts it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from .anatomy import AnatomyVolume
from .speckle import SPECKLE_SIGMA_MM, SpeckleTile

# Reference fan: a 480 x 640 image at the TUS-REC pixel spacing (~106 x 147 mm).
REF_EXTENT_MM = (480 * 0.220979690551758, 640 * 0.229389190673828)
FAN_RADIUS_MM = 45.0  # radius of curvature of the probe face
FAN_DEPTH_MM = 90.0
FAN_HALF_ANGLE_DEG = 32.5
FAN_TOP_MM = 2.5  # probe face centre below the top edge of the image

DEFORM_DEPTH_MM = 20.0
MAX_GAP_MM = (-6.0, 8.0)  # beyond this the probe has lost contact (the beam goes dark)
LATERAL_BLUR_BEAMS = 2.5  # lateral point spread in beams: widens with depth as beams fan out
DYNAMIC_RANGE_DB = 56.0
FLOOR_DB = -16.0  # echo amplitude mapped to grey level 0 (muscle ~ 0 dB -> grey ~ 85)
NOISE_AMPLITUDE = 0.07  # electronic noise: faint texture in shadows and vessel lumens
SPECULAR_SPECKLE = 0.5  # fraction of a specular echo modulated by the speckle
INCOHERENT = 0.15  # incoherent echo added to the unit-power speckle amplitude


@dataclass
class FanGeometry:
    """The curvilinear field of view of an (H, W) image with pixel spacing (sx, sy) mm.

    The fan is the reference 90-mm fan, scaled down (``scale`` < 1) when the image covers
    less than the reference ~106 x 147 mm, so small test images keep a whole fan.
    The polar grid has nb beams (angles ``theta``, rad, 0 = straight down, + toward +x)
    and ns samples (radii ``r`` from the apex, mm); both are odd so that every other beam
    and sample form the coarse anatomy grid."""

    height: int
    width: int
    sx: float
    sy: float
    scale: float
    radius: float  # mm
    depth: float  # mm
    half_angle: float  # rad
    apex: tuple[float, float]  # image-mm (x, y)
    theta: np.ndarray  # (nb,)
    r: np.ndarray  # (ns,)
    map1: np.ndarray  # cv2 fixed-point maps: polar (nb, ns) -> image (H, W)
    map2: np.ndarray
    fov: np.ndarray  # (H, W) bool

    @property
    def face_centre(self) -> np.ndarray:
        """Image-mm point (x, y, z) of the centre of the probe face, (3,)."""
        return np.array([self.apex[0], self.apex[1] + self.radius, 0.0])


def _odd(n: float) -> int:
    n = int(np.ceil(n))
    return n if n % 2 else n + 1


@functools.lru_cache(maxsize=8)
def fan_geometry(height: int, width: int, sx: float, sy: float) -> FanGeometry:
    """Fan, polar grid and scan-conversion maps for an image size and pixel spacing (mm)."""
    k = min(1.0, height * sy / REF_EXTENT_MM[0], width * sx / REF_EXTENT_MM[1])
    radius, depth = FAN_RADIUS_MM * k, FAN_DEPTH_MM * k
    half = np.deg2rad(FAN_HALF_ANGLE_DEG)
    cx = sx * (width + 1) / 2.0
    cy = FAN_TOP_MM * k - radius
    ns = _odd(depth / min(sx, sy) + 1)
    # Beams ~1.3 pixels apart at mid depth: closer is slower, and the lateral PSF is wider.
    nb = _odd(2 * half * (radius + 0.5 * depth) / (1.3 * sx) + 1)
    theta = np.linspace(-half, half, nb)
    r = np.linspace(radius, radius + depth, ns)
    ys, xs = np.mgrid[1 : height + 1, 1 : width + 1]
    dx, dy = xs * sx - cx, ys * sy - cy
    rr, th = np.hypot(dx, dy), np.arctan2(dx, dy)
    mx = ((rr - radius) / depth * (ns - 1)).astype(np.float32)
    my = ((th + half) / (2 * half) * (nb - 1)).astype(np.float32)
    fov = (rr >= radius) & (rr <= radius + depth) & (np.abs(th) <= half)
    map1, map2 = cv2.convertMaps(mx, my, cv2.CV_16SC2)
    return FanGeometry(height, width, sx, sy, k, radius, depth, half, (cx, cy), theta, r, map1, map2, fov)


def _trilinear(atlas: np.ndarray, rows: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample a tall atlas (slices of ``rows`` rows stacked vertically) at voxel coordinates
    (z, y, x): float32 arrays of one shape S inside the valid range; y is overwritten.
    Returns S + (channels,) float32."""
    z0 = np.floor(z)
    fz = z - z0
    y += z0 * rows
    a = cv2.remap(atlas, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    y += rows
    b = cv2.remap(atlas, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return cv2.blendLinear(a, b, 1.0 - fz, fz)


class Renderer:
    """Renders frames of one arm for arbitrary probe poses.

    volume: the subject's anatomy; mirror: True for a left arm (sampled at v -> -v);
    tiles, tile_poses: speckle tiles and, per tile, its (3, 4) map arm mm -> tile voxels
    (speckle.tile_poses); fan: the image geometry; noise_seed: seeds the electronic noise.
    """

    def __init__(
        self,
        volume: AnatomyVolume,
        mirror: bool,
        tiles: tuple[SpeckleTile, ...],
        tile_poses: list[np.ndarray],
        fan: FanGeometry,
        noise_seed: int,
    ) -> None:
        self.volume, self.mirror, self.fan = volume, mirror, fan
        self.tiles, self.tile_poses = tiles, tile_poses
        du, dv, dw = volume.spacing
        u0, v0, w0 = volume.origin
        s = -1.0 if mirror else 1.0
        # arm mm -> atlas (slice, row, column) = (u, +-v, w) voxels
        self._anat_T = np.array(
            [[1 / du, 0, 0, -u0 / du], [0, s / dv, 0, -v0 / dv], [0, 0, 1 / dw, -w0 / dw]]
        )
        d = fan.r - fan.radius
        self._r = fan.r.astype(np.float32)
        self._f = (np.clip(1 - d / DEFORM_DEPTH_MM, 0, 1) ** 2).astype(np.float32)
        self._dirs = np.stack([np.sin(fan.theta), np.cos(fan.theta), 0 * fan.theta], 1)
        self._ds2 = 2.0 * float(fan.r[1] - fan.r[0])  # coarse sample spacing, mm
        nb, ns = len(fan.theta), len(fan.r)
        # coarse (every other beam / sample) -> fine grid, exact at the shared points
        self._up_x = np.tile(np.arange(ns, dtype=np.float32) / 2, (nb, 1))
        self._up_y = np.tile(np.arange(nb, dtype=np.float32)[:, None] / 2, (1, ns))
        self._gain, self._speckle_norm = self._depth_gain()
        rng = np.random.default_rng(noise_seed)
        self._noise = [
            NOISE_AMPLITUDE
            * np.abs(
                rng.standard_normal((nb, ns), dtype=np.float32)
                + 1j * rng.standard_normal((nb, ns), dtype=np.float32)
            ).astype(np.float32)
            for _ in range(3)
        ]
        self._fov_u8 = fan.fov.astype(np.uint8) * 255
        self._log_scale = np.float32(255.0 * 20.0 / np.log(10.0) / DYNAMIC_RANGE_DB)
        self._log_offset = np.float32(-FLOOR_DB * 255.0 / DYNAMIC_RANGE_DB)

    def _depth_gain(self) -> tuple[np.ndarray, np.ndarray]:
        """(gain, speckle_norm), each (ns,) float32. speckle_norm restores the speckle power
        lost to the lateral blur (which depends on the beam spacing, hence on depth); gain
        adds what a real time-gain compensation leaves: a mild fall-off with depth and a
        brighter focal zone."""
        fan = self.fan
        sig = SPECKLE_SIGMA_MM[1]
        dth = float(fan.theta[1] - fan.theta[0])
        j = np.arange(-7, 8)
        w = np.exp(-0.5 * (j / LATERAL_BLUR_BEAMS) ** 2)
        w /= w.sum()
        sep = fan.r[:, None, None] * dth * (j[None, :, None] - j[None, None, :])
        power = np.einsum("j,rjk,k->r", w, np.exp(-(sep**2) / (4 * sig**2)), w)
        power *= len(self.tiles)
        d = (fan.r - fan.radius) / fan.scale
        tgc = np.exp(-0.004 * d) * (1 + 0.3 * np.exp(-0.5 * ((d - 45) / 18) ** 2))
        norm = (1.0 / np.sqrt(power)).astype(np.float32)
        return (tgc * norm).astype(np.float32), norm

    def _grid(
        self, T: np.ndarray, A: np.ndarray, B: np.ndarray, g: np.ndarray, step: int = 1
    ) -> list[np.ndarray]:
        """Coordinates T @ (arm point) of the polar samples, 3 arrays (nb, ns) float32 (every
        ``step``-th beam and sample). Arm point of beam j, sample i: A + r_i B_j + g_j f_i e_w
        (A: apex, B_j: beam direction, g_j: face-skin gap, f: deformation profile)."""
        M, t = T[:, :3], T[:, 3]
        mb = (B[::step] @ M.T).astype(np.float32)
        c0 = M @ A + t
        r, f = self._r[::step], self._f[::step]
        gs = g[::step]
        out = []
        for k in range(3):
            o = np.multiply.outer(mb[:, k], r)
            if M[k, 2] != 0.0:
                o += np.multiply.outer(np.float32(M[k, 2]) * gs, f)
            o += np.float32(c0[k])
            out.append(o)
        return out

    def polar(self, arm_from_image: np.ndarray, index: int = 0, speckle_only: bool = False) -> np.ndarray:
        """One frame on the polar grid, (nb, ns) float32: grey levels (unclipped), or with
        speckle_only the raw speckle amplitude (linear, before anatomy and compression).

        arm_from_image: (4, 4) rigid, image mm -> arm mm; index: frame number (varies the
        electronic noise)."""
        fan, vol = self.fan, self.volume
        R, t = arm_from_image[:3, :3], arm_from_image[:3, 3]
        A = R @ np.array([fan.apex[0], fan.apex[1], 0.0]) + t
        B = self._dirs @ R.T  # (nb, 3) beam directions in arm coordinates
        face = A[None] + fan.radius * B
        gap = vol.model.skin_w(face[:, 0], face[:, 1]) - face[:, 2]
        g = np.clip(gap, *MAX_GAP_MM).astype(np.float32)

        re = im = None
        for tile, T in zip(self.tiles, self.tile_poses, strict=True):
            P = tile.period
            z, y, x = self._grid(T, A, B, g)
            for q in (z, y, x):
                q -= np.floor(q * np.float32(1.0 / P)) * np.float32(P)
            np.minimum(z, np.float32(P - 1e-3), out=z)
            z0 = np.floor(z)
            fz = z - z0
            y += z0 * np.float32(P + 1)
            r0, i0, r1, i1 = cv2.split(cv2.remap(tile.atlas, x, y, cv2.INTER_LINEAR))
            wz = 1.0 - fz
            r0 = cv2.blendLinear(r0, r1, wz, fz)
            i0 = cv2.blendLinear(i0, i1, wz, fz)
            re = r0 if re is None else cv2.add(re, r0)
            im = i0 if im is None else cv2.add(im, i0)
        re = cv2.GaussianBlur(re, (1, 15), sigmaX=0.3, sigmaY=LATERAL_BLUR_BEAMS)
        im = cv2.GaussianBlur(im, (1, 15), sigmaX=0.3, sigmaY=LATERAL_BLUR_BEAMS)
        mag = cv2.magnitude(re, im)
        if speckle_only:  # unit power at every depth, without the depth-gain profile
            return mag * self._speckle_norm[None, :]
        mag *= self._gain[None, :]
        # A small incoherent part keeps the speckle's zeros from reading as black cracks
        # (as a scanner's envelope detector and post-processing do).
        mag += np.float32(INCOHERENT)

        Z, rows, _ = vol.shape
        z, y, x = self._grid(self._anat_T, A, B, g, step=2)
        np.clip(z, 0.0, Z - 1.001, out=z)
        np.clip(y, 0.0, rows - 1.0, out=y)  # rows beyond a slice belong to the next slice
        diff, spec, att = cv2.split(_trilinear(vol.atlas, rows, z, y, x))
        # Echoes from a sample are shadowed (two-way) by the attenuation above it.
        tau = np.cumsum(att, axis=1)
        tau -= 0.5 * att
        trans = cv2.exp(tau * np.float32(-self._ds2))
        fine = cv2.remap(cv2.merge([diff * trans, spec * trans]), self._up_x, self._up_y, cv2.INTER_LINEAR)
        diff, spec = cv2.split(fine)
        amp = diff * mag
        amp += spec * (1.0 - SPECULAR_SPECKLE + SPECULAR_SPECKLE * mag)
        noise = self._noise[index % 3]
        amp += noise if (index // 3) % 2 == 0 else noise[::-1]
        amp += np.float32(1e-4)
        lg = cv2.log(amp)
        lg *= self._log_scale
        lg += self._log_offset
        return lg

    def render(self, arm_from_image: np.ndarray, index: int = 0) -> np.ndarray:
        """One frame: (H, W) uint8; pixels outside the field of view are exactly 0."""
        p8 = np.clip(self.polar(arm_from_image, index), 0, 255).astype(np.uint8)
        p8 = cv2.GaussianBlur(p8, (3, 3), 0.6)  # display smoothing, like a scanner's
        img = cv2.remap(p8, self.fan.map1, self.fan.map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return cv2.bitwise_and(img, self._fov_u8)

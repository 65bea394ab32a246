"""Synthetic forearm anatomy: an analytic arm model and its voxelised acoustic properties.

Arm frame (mm), right-handed: ``u`` along the arm from the wrist (u = 0) to the elbow
(u = length), ``v`` across the arm (the radial / thumb side is +v on a right arm), ``w``
depth below the top (volar) skin, w = 0 at the top of the skin on the arm's centre line,
growing into the arm. A left arm is the mirror image (v -> -v) of the same subject's right
arm: the volume is built once and sampled at -v.

The volume stores three acoustic channels per voxel (float32):
    0  diffuse echogenicity (multiplies the speckle amplitude; muscle ~ 1)
    1  specular echogenicity (coherent reflectors: bone cortex, fascia, added without speckle)
    2  excess attenuation (nepers per mm, two-way, relative to the average tissue that the
       time-gain compensation removes; bone ~ 2 gives an acoustic shadow)
It is laid out as a "tall atlas" (Z * rows, cols, 3): slice k (fixed u) occupies rows
k * rows .. (k + 1) * rows - 1, rows run along v and columns along w (beams run roughly along
w, so their samples are contiguous in memory). One cv2.remap call samples a bilinear slice
value and two calls plus a blend give trilinear values (imaging.py). Every slice has a zero
border.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter

VOXEL_U = 2.5  # mm between slices along the arm: anatomy varies slowly along u
VOXEL_VW = 0.4  # mm in the cross-section: resolves ~1 mm bone cortex and fascia lines
V_HALF = 44.0  # volume spans v in [-V_HALF, V_HALF] mm
W_RANGE = (-2.0, 64.0)  # volume spans w in this range (mm)
U_MARGIN = 30.0  # mm of volume beyond the wrist and the elbow (hand, upper arm)

# Excess attenuation (nepers/mm, two-way amplitude) of each tissue.
ATT_SKIN, ATT_FAT, ATT_MUSCLE, ATT_TENDON = 0.012, -0.002, 0.004, 0.012
ATT_BLOOD, ATT_BONE = -0.035, 2.2


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Track:
    """A quantity that varies smoothly along the arm, tabulated every 1 mm of u."""

    ug: np.ndarray
    values: np.ndarray

    def __call__(self, u: np.ndarray | float) -> np.ndarray:
        return np.interp(u, self.ug, self.values)


def _track(
    rng: np.random.Generator,
    ug: np.ndarray,
    length: float,
    ctrl: list[float],
    jitter: float,
    n_wiggle: int = 5,
) -> Track:
    """Piecewise-smooth profile through ``ctrl`` (values at evenly spaced t = u/length in
    [0, 1]) plus a smooth random wiggle of standard deviation ``jitter``."""
    t = np.clip(ug / length, 0.0, 1.0)
    tc = np.linspace(0.0, 1.0, len(ctrl))
    base = (
        CubicSpline(tc, np.asarray(ctrl, float), bc_type="natural")(t)
        if len(ctrl) > 2
        else np.interp(t, tc, ctrl)
    )
    tw = np.linspace(0.0, 1.0, n_wiggle)
    wiggle = CubicSpline(tw, jitter * rng.standard_normal(n_wiggle), bc_type="natural")(t)
    return Track(ug, base + wiggle)


@dataclass
class Tube:
    """An elliptic tube running along the arm: centre (v, w) and semi-axes (rv, rw) in mm.

    ``v`` is stored as a fraction of the arm half-width a(u) so the structure follows the
    taper; ``u_end`` (mm) cuts tendons off proximally (radius tapers to 0 over 15 mm)."""

    kind: str
    v_frac: Track
    w: Track
    rv: Track
    rw: Track
    echo: float = 1.0
    u_end: float = np.inf
    shape: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # harmonic wobble

    def params(self, u: float, a: float) -> tuple[float, float, float, float]:
        taper = float(np.clip((self.u_end - u) / 15.0, 0.0, 1.0))
        return (
            float(self.v_frac(u)) * a,
            float(self.w(u)),
            float(self.rv(u)) * taper,
            float(self.rw(u)) * taper,
        )


@dataclass
class ArmModel:
    """Analytic forearm of one subject (a right arm; see module docstring for axes).

    The outer surface is a superellipse |v/a|^p + |(w-b)/b|^p = 1 with half-width a(u) and
    half-thickness b(u); skin, fat and fascia follow it; muscle compartments fill the rest;
    bones, vessels, tendons and the median nerve are elliptic tubes.
    """

    seed: int
    subject: int
    length: float = 0.0
    p: float = 2.4
    a: Track = field(default=None, repr=False)
    b: Track = field(default=None, repr=False)
    skin: Track = field(default=None, repr=False)
    fat: Track = field(default=None, repr=False)
    tubes: list[Tube] = field(default_factory=list, repr=False)
    compartments: list[tuple[Track, Track, float]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, self.subject, 0xA4A7])
        L = self.length = float(rng.uniform(235.0, 265.0))
        ug = np.arange(-20.0, L + 20.0, 1.0)
        self.p = float(rng.uniform(2.2, 2.6))
        aw, ae = rng.uniform(25.0, 29.0), rng.uniform(34.0, 39.0)
        bw, be = rng.uniform(17.0, 20.0), rng.uniform(25.0, 29.0)
        # The forearm widens mostly over its proximal half (muscle bellies).
        self.a = _track(rng, ug, L, [aw, aw + 0.25 * (ae - aw), aw + 0.8 * (ae - aw), ae], 0.8)
        self.b = _track(rng, ug, L, [bw, bw + 0.3 * (be - bw), bw + 0.85 * (be - bw), be], 0.6)
        sk = rng.uniform(1.4, 2.0)
        self.skin = _track(rng, ug, L, [sk, sk * 1.1], 0.1)
        fw, fe = rng.uniform(2.5, 4.0), rng.uniform(4.0, 8.0)
        self.fat = _track(rng, ug, L, [fw, fe], 0.6)

        def tube(kind, v, w, rv, rw, echo=1.0, u_end=np.inf, jit=(0.03, 1.0)):
            return Tube(
                kind,
                _track(rng, ug, L, v, jit[0]),
                _track(rng, ug, L, w, jit[1]),
                _track(rng, ug, L, rv, 0.15 * min(rv)),
                _track(rng, ug, L, rw, 0.1 * min(rw)),
                echo,
                u_end,
                tuple(rng.uniform(-1, 1, 4)),
            )

        # Bones: the radius (radial side) flares toward the wrist, the ulna toward the elbow.
        r_top = [rng.uniform(9, 12), rng.uniform(15, 19), rng.uniform(22, 28)]
        rad_rv, rad_rw = [10.0, 7.0, 6.5], [5.5, 6.0, 6.0]
        self.tubes.append(
            tube(
                "bone",
                [0.46, 0.44, 0.42],
                [t + r for t, r in zip(r_top, rad_rw, strict=True)],
                rad_rv,
                rad_rw,
            )
        )
        u_top = [rng.uniform(11, 14), rng.uniform(17, 21), rng.uniform(25, 31)]
        uln_r = [5.0, 6.5, 8.5]
        self.tubes.append(
            tube(
                "bone",
                [-0.42, -0.38, -0.34],
                [t + r for t, r in zip(u_top, uln_r, strict=True)],
                uln_r,
                uln_r,
            )
        )
        # Arteries with their venae comitantes, and superficial veins in the fat.
        for (vw, ve), (dw, de) in (((0.40, 0.14), (6.5, 16.0)), ((-0.33, -0.10), (8.0, 20.0))):
            d = rng.uniform(1.2, 1.6)
            dv = [vw + rng.normal(0, 0.03), ve + rng.normal(0, 0.03)]
            dd = [dw + rng.normal(0, 1), de + rng.normal(0, 2)]
            self.tubes.append(tube("vessel", dv, dd, [d, d], [d * 0.95, d * 0.95]))
            for off in (-1, 1):
                if rng.random() < 0.8:
                    dvo = [x + off * 2.8 / 30.0 for x in dv]
                    self.tubes.append(tube("vessel", dvo, [x + 0.5 for x in dd], [0.8, 0.8], [0.6, 0.6]))
        for vf in (0.7, rng.uniform(-0.2, 0.2), -0.65):
            if rng.random() < 0.75:
                r = rng.uniform(1.0, 1.8)
                self.tubes.append(
                    tube(
                        "vein",
                        [vf, vf + rng.normal(0, 0.08)],
                        [0.0, 0.0],
                        [r, r],
                        [0.6 * r, 0.6 * r],
                        jit=(0.04, 0.0),
                    )
                )
        # Flexor tendons near the wrist, tapering into their muscle bellies proximally.
        for _ in range(int(rng.integers(7, 10))):
            vf = rng.uniform(-0.32, 0.34)
            dep = rng.uniform(5.5, 13.5)
            rv, rw = rng.uniform(1.6, 3.0), rng.uniform(1.1, 1.9)
            self.tubes.append(
                tube(
                    "tendon",
                    [vf, vf],
                    [dep, dep + 2],
                    [rv, rv],
                    [rw, rw],
                    echo=rng.uniform(1.0, 1.6),
                    u_end=rng.uniform(0.22, 0.42) * L,
                    jit=(0.02, 0.5),
                )
            )
        self.tubes.append(tube("nerve", [0.02, 0.0], [8.5, 19.0], [2.8, 2.2], [1.3, 1.2], jit=(0.02, 0.7)))
        # Muscle compartments: Voronoi cells around centres given in the unit cross-section.
        for _ in range(int(rng.integers(6, 9))):
            rad, ang = np.sqrt(rng.uniform(0.05, 0.7)), rng.uniform(0, 2 * np.pi)
            xi = _track(rng, ug, L, [rad * np.cos(ang)] * 2, 0.12)
            eta = _track(rng, ug, L, [rad * np.sin(ang)] * 2, 0.12)
            self.compartments.append((xi, eta, float(rng.uniform(0.7, 1.25))))

    def skin_w(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Depth w (mm) of the top skin surface at arm positions (u, v) (mm, any shape).

        Beyond the arm's side (|v| >= a) returns b (the arm's widest level)."""
        a, b = self.a(u), self.b(u)
        s = np.clip(np.abs(v) / a, 0.0, 1.0) ** self.p
        return b - b * (1.0 - s) ** (1.0 / self.p)

    def cross_section(
        self, u: float, V: np.ndarray, W: np.ndarray, fib: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Acoustic channels of the slice at ``u`` on the grid (V, W) (mm, 2D arrays);
        ``fib`` is a unit-variance fibre-texture field on the same grid.
        Returns (diffuse, specular, attenuation), float32 arrays like V."""
        a, b, p = float(self.a(u)), float(self.b(u)), self.p
        X, Y = V / a, (W - b) / b
        ax, ay = np.abs(X) + 1e-9, np.abs(Y) + 1e-9
        F = ax**p + ay**p
        gx, gy = p * ax ** (p - 1) / a, p * ay ** (p - 1) / b
        # Distance to the surface along its normal: F is homogeneous of degree p, so the
        # radial factor F^(-1/p) and Euler's identity give it without a search.
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = (F ** (-1.0 / p) - 1.0) * p * F / np.hypot(gx, gy)
        depth = np.nan_to_num(depth, nan=1e3, posinf=1e3)
        inside = F < 1.0
        t_skin, t_fat = float(self.skin(u)), float(self.fat(u))
        # Fat thickness varies around the arm.
        t_fat = t_fat * (1.0 + 0.25 * np.cos(3.0 * np.arctan2(X, -Y) + 0.1 * u))
        diff = np.zeros_like(V, dtype=np.float32)
        spec = np.zeros_like(diff)
        att = np.zeros_like(diff)

        # Muscle: compartment echogenicity times fibre striations (bright perimysium).
        cen = np.array([[float(xi(u)) * a, b + float(eta(u)) * b] for xi, eta, _ in self.compartments])
        lev = np.array([m for _, _, m in self.compartments])
        d2 = (V[None] - cen[:, 0, None, None]) ** 2 + (W[None] - cen[:, 1, None, None]) ** 2
        order = np.argsort(d2, axis=0)[:2]
        i1, i2 = order[0], order[1]
        d1s = np.take_along_axis(d2, order[:1], 0)[0]
        d2s = np.take_along_axis(d2, order[1:2], 0)[0]
        sep = np.linalg.norm(cen[i1] - cen[i2], axis=-1)
        septum = (d2s - d1s) / (2.0 * sep + 1e-6)  # distance to the cell boundary (mm)
        stri = 0.3 + 0.45 * np.exp(0.9 * fib - 0.4) + 2.2 * np.clip(fib - 1.0, 0.0, None)
        diff[:] = lev[i1] * stri
        sept = np.exp(-0.5 * (septum / 0.35) ** 2)
        diff += 2.0 * sept
        spec += 0.8 * sept
        att[:] = ATT_MUSCLE

        # Skin, subcutaneous fat (hypoechoic with bright septa) and the deep fascia.
        fat_layer = depth < t_skin + t_fat
        diff[fat_layer] = (0.35 + 1.4 * np.clip(fib - 1.3, 0, None))[fat_layer]
        spec[fat_layer] = 0.0
        att[fat_layer] = ATT_FAT
        fascia = np.exp(-0.5 * ((depth - t_skin - t_fat) / 0.35) ** 2)
        diff += 2.5 * fascia
        spec += 1.5 * fascia
        skin = depth < t_skin
        diff[skin] = (3.0 + 0.8 * fib)[skin]
        spec += 2.0 * np.exp(-0.5 * (depth / 0.3) ** 2) * inside
        att[skin] = ATT_SKIN

        bones = []
        for tb in self.tubes:
            vc, wc, rv, rw = tb.params(u, a)
            if rv <= 0.05 or rw <= 0.05:
                continue
            if tb.kind == "vein":
                wc = float(self.skin_w(u, vc)) + t_skin + float(self.fat(u)) * 0.55
            if tb.kind == "bone":
                bones.append((vc, wc, rv, rw))
            box = (np.abs(V - vc) < rv * 1.4 + 2) & (np.abs(W - wc) < rw * 1.4 + 2)
            if not box.any():
                continue
            dv, dw = V[box] - vc, W[box] - wc
            phi = np.arctan2(dw, dv)
            h = tb.shape
            wob = (
                1.0 + 0.08 * h[0] * np.cos(2 * phi + 3 * h[1]) + 0.05 * h[2] * np.cos(3 * phi + 3 * h[3])
                if tb.kind in ("bone", "tendon")
                else 1.0
            )
            e = np.sqrt((dv / rv) ** 2 + (dw / rw) ** 2) / wob
            dist = (e - 1.0) * min(rv, rw)  # approximate signed distance to the wall (mm)
            inn = dist < 0
            if tb.kind == "bone":
                # Bright cortex ~1 mm thick; the attenuation starts under it, so the line
                # is seen whole and everything below is in its acoustic shadow.
                cortex = np.exp(-0.5 * ((dist + 0.6) / 0.55) ** 2)
                sub = diff[box]
                sub[inn] = 0.2
                diff[box] = sub + 8.0 * cortex
                spec[box] += 28.0 * cortex
                sub = att[box]
                sub[dist < -0.9] = ATT_BONE
                att[box] = sub
            elif tb.kind in ("vessel", "vein"):
                wall = np.exp(-0.5 * ((dist - 0.15) / 0.25) ** 2)
                sub = diff[box]
                sub[inn] = 0.015
                diff[box] = sub + (1.8 if tb.kind == "vessel" else 0.8) * wall
                sub = att[box]
                sub[inn] = ATT_BLOOD
                att[box] = sub
            elif tb.kind == "tendon":
                f = fib[box]
                fibril = tb.echo * (0.9 + 0.9 * np.abs(f) + 0.8 * np.clip(f - 0.5, 0, None))
                sub = diff[box]
                sub[inn] = fibril[inn]
                diff[box] = sub + 1.0 * np.exp(-0.5 * (dist / 0.3) ** 2)
                sub = att[box]
                sub[inn] = ATT_TENDON
                att[box] = sub
            elif tb.kind == "nerve":
                f = fib[box]
                fasc = 0.35 + 1.8 * (np.abs(f) < 0.35)  # honeycomb: fascicles and septa
                sub = diff[box]
                sub[inn] = fasc[inn]
                diff[box] = sub + 1.5 * np.exp(-0.5 * (dist / 0.3) ** 2)

        if len(bones) == 2:  # interosseous membrane between the two bones
            (v1, w1, r1, _), (v2, w2, r2, _) = sorted(bones)
            lo, hi = v1 + r1 * 0.95, v2 - r2 * 0.95
            t = np.clip((V - lo) / (hi - lo + 1e-6), 0, 1)
            wl = w1 + (w2 - w1) * t
            band = (lo < V) & (hi > V)
            mem = np.exp(-0.5 * ((W - wl) / 0.3) ** 2) * band
            diff += 1.2 * mem
            spec += 1.0 * mem

        out = ~inside
        # Echogenicity is an amplitude: never negative (skin's 3 + 0.8 * texture dips below
        # 0 where the texture field is below -3.75, and a negative echo turns into NaN
        # under the log compression). Attenuation may be negative: it is relative to
        # average tissue (blood's negative excess is the enhancement behind vessels).
        np.maximum(diff, 0.0, out=diff)
        diff[out] = 0.0
        spec[depth < -0.6] = 0.0
        att[out] = 0.0
        return diff.astype(np.float32), spec.astype(np.float32), att.astype(np.float32)


@dataclass
class AnatomyVolume:
    """Voxelised acoustic channels of one subject's (right) arm, as a tall atlas.

    atlas: (Z * rows, cols, 3) float32, slice k at u = u0 + k * du, row r at v = v0 + r * dv,
    column c at w = w0 + c * dw (mm). Slices 0 and Z-1, rows 0 and rows-1 and columns 0 and
    cols-1 are zero, so clamped out-of-volume samples read zero.
    """

    model: ArmModel
    atlas: np.ndarray
    shape: tuple[int, int, int]  # (Z, rows, cols)
    origin: tuple[float, float, float]  # (u0, v0, w0) mm
    spacing: tuple[float, float, float]  # (du, dv, dw) mm

    @property
    def nbytes(self) -> int:
        return int(self.atlas.nbytes)


@functools.lru_cache(maxsize=8)
def arm_model(seed: int, subject: int) -> ArmModel:
    """The analytic arm of (seed, subject) (cheap; cached)."""
    return ArmModel(seed, subject)


@functools.lru_cache(maxsize=2)
def anatomy_volume(seed: int, subject: int) -> AnatomyVolume:
    """Voxelise the arm of (seed, subject): ~1 s, ~50 MB; the two most recent are cached."""
    model = arm_model(seed, subject)
    rng = np.random.default_rng([seed, subject, 0xF1B])
    du, dv, dw = VOXEL_U, VOXEL_VW, VOXEL_VW
    us = np.arange(-U_MARGIN, model.length + U_MARGIN + 1e-6, du)
    vs = np.arange(-V_HALF, V_HALF + 1e-6, dv)
    ws = np.arange(W_RANGE[0], W_RANGE[1] + 1e-6, dw)
    Z, rows, cols = len(us) + 2, len(vs) + 2, len(ws) + 2
    # Fibre texture: long along the arm (striations), fine across it.
    noise = rng.standard_normal((len(us), len(vs), len(ws)), dtype=np.float32)
    fib = gaussian_filter(noise, sigma=(6.0 / du, 0.45 / dv, 0.45 / dw), mode="wrap")
    fib /= fib.std()
    vol = np.zeros((Z, rows, cols, 3), np.float32)
    V, W = np.meshgrid(vs, ws, indexing="ij")
    for k, u in enumerate(us):
        d, s, a = model.cross_section(float(u), V, W, fib[k])
        vol[k + 1, 1:-1, 1:-1, 0] = d
        vol[k + 1, 1:-1, 1:-1, 1] = s
        vol[k + 1, 1:-1, 1:-1, 2] = a
    return AnatomyVolume(
        model,
        vol.reshape(Z * rows, cols, 3),
        (Z, rows, cols),
        (float(us[0] - du), float(vs[0] - dv), float(ws[0] - dw)),
        (du, dv, dw),
    )

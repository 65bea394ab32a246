"""Freehand probe motion: the TUS-REC scan protocols as per-frame probe poses.

Poses are built in the arm frame (anatomy.py: u along the arm from the wrist, v across,
w depth below the top skin) as ``arm_from_image`` (N, 4, 4) rigid transforms mapping
image mm to arm mm, sampled at FPS frames per second. The probe face centre (image-mm
``face``, see imaging.FanGeometry.face_centre) is kept on the skin, pressed in by ~1.5 mm,
and the probe axis (image y) follows the inward skin normal, plus tilts and tremor.

2024 sweeps ``{LH|RH}_{Par|Per}_{L|C|S}_{DtP|PtD}``: the contact point moves along the
arm (distal = wrist = small u, proximal = elbow = large u) on a straight line (L), one
lateral bow (C) or two (S); the image plane is parallel (Par, image x along the arm) or
perpendicular (Per) to the sweep; the probe yaws partly with the curve's tangent.
The mean speed is chosen per scan so the sweep covers 120-180 mm of the forearm, clipped to
6.25-16.7 mm/s, and modulated smoothly by +-20 %, so the speed stays within 5-20 mm/s
(0.25-1 mm per frame). Only when n_frames is so large (over ~800 frames) that even 6.25 mm/s
would run off the forearm is the speed lowered below that.

2025 ``{LH|RH}_rotation``: the probe stays at a contact point 25-40 mm from the elbow and is
fanned (tilted about the image x axis, the probe's long axis), rocked (tilted about the
elevation axis, in plane), rotated by ~90 degrees about the probe axis, then fanned and
rocked again. Angular rates stay below ~12 deg/s (0.6 deg per frame); when n_frames is too
small for the full amplitudes at that rate the amplitudes shrink.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..data import SCAN_NAMES_2024, SCAN_NAMES_2025
from .anatomy import ArmModel

FPS = 20.0
MAX_RATE_DEG_S = 12.0  # peak angular rate of the deliberate rotation-scan motions

ARMS = ("LH", "RH")
ORIENTS = ("Par", "Per")
SHAPES = ("L", "C", "S")
DIRECTIONS = ("DtP", "PtD")


def scan_names(protocol: str) -> list[str]:
    """Scan names of a protocol: '2024' -> the 24 sweep names, '2025' -> the two rotations."""
    if protocol == "2024":
        return list(SCAN_NAMES_2024)
    if protocol == "2025":
        return list(SCAN_NAMES_2025)
    raise ValueError(f"unknown protocol {protocol!r}: expected '2024' or '2025'")


def parse_name(name: str) -> dict:
    """Split a scan name into its parts: {'arm', 'kind': 'sweep'|'rotation', and for sweeps
    'orient', 'shape', 'direction'}. Raises ValueError for names of neither protocol."""
    parts = name.split("_")
    if len(parts) == 2 and parts[0] in ARMS and parts[1] == "rotation":
        return {"arm": parts[0], "kind": "rotation"}
    if (
        len(parts) == 4
        and parts[0] in ARMS
        and parts[1] in ORIENTS
        and parts[2] in SHAPES
        and parts[3] in DIRECTIONS
    ):
        return {
            "arm": parts[0],
            "kind": "sweep",
            "orient": parts[1],
            "shape": parts[2],
            "direction": parts[3],
        }
    raise ValueError(
        f"unknown scan name {name!r}: expected e.g. 'LH_Par_C_DtP' (2024) or 'RH_rotation' (2025)"
    )


def smooth_noise(rng: np.random.Generator, n: int, tau_s: float) -> np.ndarray:
    """(n,) Gaussian noise low-passed with a Gaussian of ``tau_s`` seconds, unit std."""
    sigma = tau_s * FPS
    pad = int(3 * sigma) + 1
    x = gaussian_filter1d(rng.standard_normal(n + 2 * pad), sigma, mode="reflect")
    k = np.exp(-0.5 * (np.arange(-4 * sigma, 4 * sigma + 1) / sigma) ** 2)
    return x[pad : pad + n] / np.sqrt(np.sum((k / k.sum()) ** 2))


def tremor(rng: np.random.Generator, n: int, rms: float) -> np.ndarray:
    """(n,) physiological hand tremor: a few 4-9 Hz sinusoids with a slowly varying
    envelope, RMS ~ ``rms``."""
    t = np.arange(n) / FPS
    x = np.zeros(n)
    for _ in range(3):
        f = rng.uniform(4.0, 9.0)
        x += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    env = 0.7 + 0.3 * np.tanh(smooth_noise(rng, n, 1.5))
    return rms * x * env / np.sqrt(1.5)


def _rot(axis: int, angle: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations by ``angle`` (rad, (N,)) about coordinate axis 0, 1 or 2."""
    c, s = np.cos(angle), np.sin(angle)
    R = np.zeros((len(angle), 3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R[:, axis, axis] = 1
    R[:, i, i], R[:, j, j], R[:, i, j], R[:, j, i] = c, c, -s, s
    return R


def _skin_frame(
    model: ArmModel, u: np.ndarray, v: np.ndarray, heading: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Skin points (N, 3) and probe base orientations (N, 3, 3) at contact points (u, v):
    image y along the inward skin normal, image x along ``heading`` (rad from +u toward +v)
    projected onto the skin's tangent plane, image z = x cross y."""
    h = 0.5
    su = (model.skin_w(u + h, v) - model.skin_w(u - h, v)) / (2 * h)
    sv = (model.skin_w(u, v + h) - model.skin_w(u, v - h)) / (2 * h)
    n = np.stack([-su, -sv, np.ones_like(u)], 1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    hd = np.stack([np.cos(heading), np.sin(heading), np.zeros_like(u)], 1)
    ex = hd - np.sum(hd * n, 1, keepdims=True) * n
    ex /= np.linalg.norm(ex, axis=1, keepdims=True)
    ez = np.cross(ex, n)
    skin = np.stack([u, v, model.skin_w(u, v)], 1)
    return skin, np.stack([ex, n, ez], 2)


def _assemble(
    model: ArmModel, face: np.ndarray, u, v, heading, fan_tilt, rock, press, rng: np.random.Generator
) -> np.ndarray:
    """arm_from_image (N, 4, 4): contact (u, v) (mm), heading (rad), tilts about image x
    (fan_tilt) and image z (rock) (rad), indentation ``press`` (mm), plus tremor.
    Tilts pivot about the probe face centre, which is placed at the pressed skin point."""
    n = len(u)
    skin, Rb = _skin_frame(model, u, v, heading)
    R = (
        Rb
        @ _rot(0, fan_tilt + np.deg2rad(tremor(rng, n, 0.06)))
        @ _rot(2, rock + np.deg2rad(tremor(rng, n, 0.06)))
        @ _rot(1, np.deg2rad(tremor(rng, n, 0.05)))
    )
    contact = skin + press[:, None] * Rb[:, :, 1]
    contact += np.stack([tremor(rng, n, 0.05) for _ in range(3)], 1)
    T = np.zeros((n, 4, 4))
    T[:, :3, :3] = R
    T[:, :3, 3] = contact - R @ face
    T[:, 3, 3] = 1
    return T


def sweep_poses(
    model: ArmModel, parts: dict, n: int, rng: np.random.Generator, face: np.ndarray
) -> np.ndarray:
    """arm_from_image (n, 4, 4) of a 2024 sweep (module docstring)."""
    duration = max(n - 1, 1) / FPS
    target = rng.uniform(120.0, 180.0)
    mean_speed = float(np.clip(target / duration, 6.25, 16.7))
    speed = mean_speed * (1.0 + 0.2 * np.tanh(smooth_noise(rng, n, 1.2)))
    dist = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) / FPS)])
    total = max(dist[-1], 1e-6)

    L = model.length
    u_lo, u_hi = 12.0, L - 12.0
    amp = {"L": 0.0, "C": rng.uniform(6, 12), "S": rng.uniform(5, 9)}[parts["shape"]]
    amp *= rng.choice([-1.0, 1.0])
    p = np.linspace(0.0, 1.0, 401)
    bow = {"L": 0 * p, "C": np.sin(np.pi * p), "S": np.sin(2 * np.pi * p)}[parts["shape"]]
    # Solve for the along-arm extent whose curved path has the travelled length.
    du = min(total, u_hi - u_lo)
    for _ in range(20):
        arc = np.sum(np.hypot(np.diff(p) * du, np.diff(bow) * amp))
        du = min(total * du / arc, u_hi - u_lo)
    arc = np.sum(np.hypot(np.diff(p) * du, np.diff(bow) * amp))
    if arc < total:  # too long for the forearm: slow down uniformly
        dist *= arc / total
    start = rng.uniform(u_lo, u_hi - du)
    sign = 1.0 if parts["direction"] == "DtP" else -1.0
    u_p = start + p * du if sign > 0 else start + du - p * du
    a_min = float(np.min(model.a(np.linspace(start, start + du, 50))))
    room = max(a_min - 20.0, 2.0)
    v0 = rng.uniform(-0.6, 0.6) * max(room - abs(amp), 0.0)
    v_p = v0 + amp * bow
    s_p = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(u_p), np.diff(v_p)))])
    u = np.interp(dist, s_p, u_p)
    v = np.interp(dist, s_p, v_p) + 1.0 * smooth_noise(rng, n, 2.0)
    v = np.clip(v, -model.a(u) + 18.0, model.a(u) - 18.0)

    # The hand yaws partly with the curve's tangent (direction of travel along +-u).
    tang = np.arctan2(np.gradient(v_p), sign * np.gradient(u_p))
    yaw = rng.uniform(0.3, 0.7) * np.interp(dist, s_p, tang)
    base = 0.0 if parts["orient"] == "Par" else np.pi / 2
    heading = base + yaw + np.deg2rad(2.0) * smooth_noise(rng, n, 1.5)
    fan_tilt = np.deg2rad(rng.uniform(-3, 3) + 2.0 * smooth_noise(rng, n, 1.5))
    rock = np.deg2rad(rng.uniform(-3, 3) + 2.0 * smooth_noise(rng, n, 1.5))
    press = 1.5 + 0.4 * smooth_noise(rng, n, 2.0)
    return _assemble(model, face, u, v, heading, fan_tilt, rock, press, rng)


def _phase_angle(tau: np.ndarray, amp: float, cycles: int) -> np.ndarray:
    """Oscillation amp*sin(2 pi cycles phi(tau)) over tau in [0, 1], phi warped so the
    angular velocity is zero at both ends (phases join smoothly)."""
    phi = tau - np.sin(2 * np.pi * tau) / (2 * np.pi)
    return amp * np.sin(2 * np.pi * cycles * phi)


def rotation_poses(
    model: ArmModel, parts: dict, n: int, rng: np.random.Generator, face: np.ndarray
) -> np.ndarray:
    """arm_from_image (n, 4, 4) of a 2025 rotation scan (module docstring)."""
    L = model.length
    u0, v0 = L - rng.uniform(25.0, 40.0), rng.uniform(-5.0, 5.0)
    weights = np.array([0.24, 0.15, 0.22, 0.24, 0.15])
    bounds = np.round(np.concatenate([[0], np.cumsum(weights)]) * (n - 1)).astype(int)
    fan_amp, rock_amp = rng.uniform(20.0, 30.0), rng.uniform(10.0, 18.0)
    turn = rng.uniform(85.0, 95.0) * rng.choice([-1.0, 1.0])
    fan_tilt, rock, spin = np.zeros(n), np.zeros(n), np.zeros(n)
    for k in range(5):
        i0, i1 = bounds[k], bounds[k + 1]
        if i1 <= i0:
            continue
        tau = np.linspace(0.0, 1.0, i1 - i0 + 1)
        dur = (i1 - i0) / FPS
        sl = slice(i0, i1 + 1)
        if k == 2:
            total = np.sign(turn) * min(abs(turn), MAX_RATE_DEG_S * dur / 2)
            spin[sl] = total * (tau - np.sin(2 * np.pi * tau) / (2 * np.pi))
            spin[i1 + 1 :] = total
            continue
        amp = fan_amp if k in (0, 3) else rock_amp
        cycles = max(1, round(8.0 * dur / (4 * amp)))  # ~8 deg/s on average
        amp = min(amp, MAX_RATE_DEG_S * dur / (4 * np.pi * cycles))
        target = fan_tilt if k in (0, 3) else rock
        target[sl] = _phase_angle(tau, amp * rng.choice([-1.0, 1.0]), cycles)
    u = u0 + 1.5 * smooth_noise(rng, n, 3.0)
    v = v0 + 1.5 * smooth_noise(rng, n, 3.0)
    heading = np.pi / 2 + np.deg2rad(spin + 2.0 * smooth_noise(rng, n, 2.0))
    fan_tilt = np.deg2rad(fan_tilt + 1.5 * smooth_noise(rng, n, 2.0))
    rock = np.deg2rad(rock + 1.5 * smooth_noise(rng, n, 2.0))
    press = 1.5 + 0.4 * smooth_noise(rng, n, 2.0)
    return _assemble(model, face, u, v, heading, fan_tilt, rock, press, rng)


def probe_poses(model: ArmModel, name: str, n: int, rng: np.random.Generator, face: np.ndarray) -> np.ndarray:
    """arm_from_image (n, 4, 4) float64 of scan ``name`` (either protocol)."""
    parts = parse_name(name)
    if parts["kind"] == "rotation":
        return rotation_poses(model, parts, n, rng, face)
    return sweep_poses(model, parts, n, rng, face)


def world_from_arm(seed: int, subject: int, arm: str, rng: np.random.Generator) -> np.ndarray:
    """(4, 4) rigid placement of the arm in the tracker's camera frame: a per-(subject, arm)
    position 0.6-0.9 m from the camera in an arbitrary direction and orientation, plus a
    per-scan jitter (the subject moves between scans) drawn from ``rng``."""
    base = np.random.default_rng([seed, subject, ARMS.index(arm), 0x3D])
    q, r = np.linalg.qr(base.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    d = base.standard_normal(3)
    centre = d / np.linalg.norm(d) * base.uniform(600.0, 900.0)
    jitter = (
        _rot(0, np.deg2rad(rng.normal(0, 4, 1)))[0]
        @ _rot(1, np.deg2rad(rng.normal(0, 4, 1)))[0]
        @ _rot(2, np.deg2rad(rng.normal(0, 4, 1)))[0]
    )
    T = np.eye(4)
    T[:3, :3] = q @ jitter
    T[:3, 3] = centre + rng.normal(0, 15.0, 3) - T[:3, :3] @ np.array([125.0, 0.0, 20.0])
    return T

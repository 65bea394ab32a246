"""In-plane registration (tusrec.model.registration): its conventions against frames warped
independently by a known rigid motion in image mm, its fallbacks, and the predictor's
--in-plane registration."""

import time

import cv2
import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tusrec.data import open_data
from tusrec.geometry import Calibration, default_calibration
from tusrec.model import registration
from tusrec.model.ensemble import load_members
from tusrec.model.registration import (
    in_plane_angle,
    keeps_sweep_tx,
    pair_decorrelation,
    register_in_plane,
    square_frames,
    with_in_plane,
)
from tusrec.predict import core

from .test_predict import make_weights

SIZE = (240, 320)  # H, W


def texture(rng: np.random.Generator, size=(400, 520)) -> np.ndarray:
    """A speckle-like texture (blurred noise with some larger blobs), float32 0..255-ish."""
    fine = cv2.GaussianBlur(rng.standard_normal(size).astype(np.float32), (0, 0), 1.5)
    coarse = cv2.GaussianBlur(rng.standard_normal(size).astype(np.float32), (0, 0), 8.0)
    img = 100 + 300 * fine + 1500 * coarse
    return img


def warp_by(source: np.ndarray, T: np.ndarray, calib: Calibration, offset: tuple[int, int]) -> np.ndarray:
    """The frame whose pixel p shows what ``source`` shows at T @ (T_scale @ p): a frame i
    with T(i->i-1) = T, where ``source`` is frame i-1's (larger) canvas and frame i-1 its
    window at ``offset``. Built from tusrec.geometry's 1-based pixel convention directly:
    (H, W) float32."""
    h, w = SIZE
    S = calib.T_scale
    rows, cols = np.mgrid[1 : h + 1, 1 : w + 1].astype(np.float64)
    p = np.stack([cols.ravel(), rows.ravel(), np.zeros(h * w), np.ones(h * w)])
    q_prev = np.linalg.inv(S) @ (T @ (S @ p))  # 1-based pixel in frame i-1
    map_x = (q_prev[0] - 1 + offset[1]).reshape(h, w).astype(np.float32)
    map_y = (q_prev[1] - 1 + offset[0]).reshape(h, w).astype(np.float32)
    return cv2.remap(source, map_x, map_y, cv2.INTER_CUBIC)


def rigid(angle_deg: float, tx: float, ty: float, tz: float = 0.0, rx: float = 0.0, ry: float = 0.0):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(np.deg2rad([rx, ry, angle_deg])).as_matrix()
    T[:3, 3] = tx, ty, tz
    return T


def scan_with_motion(rng, motions, calib):
    """Frames (N, H, W) uint8 of one texture under the in-plane motions T(i->i-1) given,
    on a depth gain that stays put in the image (which registration must ignore)."""
    canvas = texture(rng)
    offset = (80, 100)
    gain = np.linspace(1.4, 0.6, SIZE[0], dtype=np.float32)[:, None]
    h, w = SIZE
    frames = [canvas[offset[0] : offset[0] + h, offset[1] : offset[1] + w]]
    chain = np.eye(4)
    for T in motions:
        chain = chain @ T  # T(i->0)
        frames.append(warp_by(canvas, chain, calib, offset))
    return np.clip(np.stack(frames) * gain[None], 1, 255).astype(np.uint8)


@pytest.fixture
def calib():
    return default_calibration()  # 0.229 x 0.221 mm pixels: not square


def test_registration_recovers_a_known_in_plane_motion(rng, calib):
    """Rotations about the image mm origin (a corner, not the centre) and shifts, on
    non-square pixels, from no motion as the start: the recovered T(i->i-1) is the one the
    frames were warped by, independently of the module's pixel <-> mm algebra."""
    motions = [rigid(0.6, 0.3, -0.2), rigid(-0.4, -0.5, 0.25), rigid(0.0, 0.8, 0.1), rigid(0.3, 0.0, -0.6)]
    frames = scan_with_motion(rng, motions, calib)
    square = square_frames([frames], calib)
    fitted, registered = register_in_plane(square)
    assert registered.all()
    truth = np.array(
        [[np.deg2rad(a), T[0, 3], T[1, 3]] for a, T in zip([0.6, -0.4, 0.0, 0.3], motions, strict=True)]
    )
    assert np.allclose(truth[:, 1:], fitted[:, 1:], atol=0.03), (truth, fitted)
    assert np.allclose(truth[:, 0], fitted[:, 0], atol=np.deg2rad(0.03)), (truth, fitted)
    # The frames read in blocks (as the predictor reads a scan) give the same square frames.
    blocks = square_frames([frames[:2], frames[2:3], frames[3:]], calib)
    assert np.array_equal(blocks.frames, square.frames)


def test_registration_is_the_same_on_any_number_of_threads_and_respects_the_deadline(rng, calib):
    motions = [rigid(0.2 * k, 0.1 * k, -0.1, 0.5) for k in range(5)]
    square = square_frames([scan_with_motion(rng, motions, calib)], calib)
    # Started off the truth: from the truth itself ECC may end a hair less alike, and the
    # pair then (rightly) keeps its start.
    start = np.stack([rigid(0.2 * k - 0.2, 0.1 * k + 0.2, 0.0, 0.5) for k in range(5)])
    one, ok1 = register_in_plane(square, start)
    two, ok2 = register_in_plane(square, start, workers=2)
    assert np.array_equal(one, two) and np.array_equal(ok1, ok2) and ok1.all()
    # Past the deadline nothing is registered: the start's in-plane part is kept.
    late, ok = register_in_plane(square, start, deadline=time.perf_counter() - 1.0)
    assert not ok.any()
    assert np.allclose(late, np.stack([in_plane_angle(start), start[:, 0, 3], start[:, 1, 3]], axis=1))


def test_a_pair_that_ecc_leaves_less_alike_than_its_start_keeps_the_start(rng, calib, monkeypatch):
    """ECC climbs from the network's estimate but can end at another optimum (on the
    simulated parallel sweeps, a tx several mm off where the tissue repeats along x): such a
    pair keeps the start. Here ECC is made to end off its optimum on pairs 2 and 4: 0.8 mm
    (within the correction bound, but less alike than at the start) and 3 mm."""
    motions = [rigid(0.2, 0.3, -0.2), rigid(-0.3, -0.4, 0.2), rigid(0.1, 0.5, 0.1), rigid(0.0, -0.2, -0.3)]
    square = square_frames([scan_with_motion(rng, motions, calib)], calib)
    start = np.stack([rigid(0.0, T[0, 3] + 0.15, T[1, 3] - 0.1) for T in motions])
    honest, ok = register_in_plane(square, start)
    assert ok.all()
    # The contract, on honest ECC: a kept registration is never less alike than the start.
    before = np.stack([in_plane_angle(start), start[:, 0, 3], start[:, 1, 3]], axis=1)
    assert np.all(pair_decorrelation(square, honest)[:, 1] <= pair_decorrelation(square, before)[:, 1])
    real = cv2.findTransformECC
    calls = []

    def astray(template, moving, warp, *args):
        cc, fitted = real(template, moving, warp, *args)
        calls.append(1)
        off = {2: 0.8, 4: 3.0}.get(len(calls), 0.0)
        fitted = fitted.copy()
        fitted[0, 2] += off / square.pixel_mm[0]
        return cc, fitted

    monkeypatch.setattr(registration.cv2, "findTransformECC", astray)
    fitted, ok = register_in_plane(square, start)
    assert ok.tolist() == [True, False, True, False]
    assert np.array_equal(fitted[ok], honest[ok]) and np.array_equal(fitted[~ok], before[~ok])


def test_a_correction_beyond_the_bound_keeps_the_start_even_when_more_alike(rng, calib, monkeypatch):
    """The size rule alone, with the bound lowered to 0.15 mm: ECC's correct result, 0.2 mm
    from its start, is refused; 0.1 mm from its start, it is kept. (Started closer than
    that, ECC's optimum and the correlation it is judged on may disagree by a few µm.)"""
    motions = [rigid(0.0, 0.3, -0.2), rigid(0.0, -0.4, 0.2)]
    square = square_frames([scan_with_motion(rng, motions, calib)], calib)
    near = np.stack([rigid(0.0, 0.5, -0.2), rigid(0.0, -0.3, 0.2)])
    fitted, ok = register_in_plane(square, near)
    assert ok.all() and np.allclose(fitted[:, 1:], [[0.3, -0.2], [-0.4, 0.2]], atol=0.02)
    monkeypatch.setattr(registration, "REGISTRATION_MAX_CORRECTION_MM", 0.15)
    kept, ok = register_in_plane(square, near)
    assert ok.tolist() == [False, True]
    assert np.allclose(kept[0, 1:], [0.5, -0.2]) and np.array_equal(kept[1], fitted[1])


def test_the_manifest_says_why_pairs_kept_the_networks_estimate(dataset_factory, tmp_path, monkeypatch):
    root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_rotation",), 6)
    data = open_data(root)
    members = load_members(make_weights(tmp_path / "w"))
    monkeypatch.setattr(registration, "REGISTRATION_MAX_CORRECTION_MM", 0.0)  # every correction refused
    predictor = core.Predictor(members, "cpu", workers=1, in_plane="registration", time_limit_s=1e6)
    row = predictor.predict_scan(data.scans[0], data.calibration, tmp_path / "r.h5")
    assert row["status"] == "ok"
    assert (
        "5 of 5 frame pairs kept the network's estimate (no convergence, or a false optimum" in row["message"]
    )
    assert "more than 0 mm from it" in row["message"]


def test_largest_displacement_is_the_largest_over_every_pixel(rng):
    """Against a brute force over every pixel of a 60 x 80 grid of 0.3 mm pixels."""
    square = registration.SquareFrames(
        np.zeros((2, 60, 80), np.uint8), np.array([0.3, 0.3]), np.array([0.4, 0.4])
    )
    rows, cols = np.mgrid[0:60, 0:80]
    points = np.stack([cols.ravel(), rows.ravel()], 1) * 0.3 + 0.4
    corners = registration.image_corners_mm(square)
    for _ in range(20):
        a, b = rng.normal(0, [0.05, 1, 1], 3), rng.normal(0, [0.05, 1, 1], 3)
        Ra, Rb = (Rotation.from_rotvec([0, 0, q[0]]).as_matrix()[:2, :2] for q in (a, b))
        brute = np.linalg.norm(points @ Ra.T + a[1:] - (points @ Rb.T + b[1:]), axis=1).max()
        assert np.isclose(registration.largest_displacement_mm(a, b, corners), brute, rtol=1e-12)


def test_blank_or_single_frames_keep_the_start(calib):
    blank = square_frames([np.zeros((3, *SIZE), np.uint8)], calib)
    start = np.stack([rigid(0.1, 0.2, 0.3, 1.0), rigid(-0.1, 0.0, 0.1, 1.0)])
    fitted, ok = register_in_plane(blank, start)
    assert not ok.any() and np.allclose(fitted[:, 1:], start[:, :2, 3])
    single = square_frames([np.full((1, *SIZE), 50, np.uint8)], calib)
    fitted, ok = register_in_plane(single)
    assert fitted.shape == (0, 3) and ok.shape == (0,)
    with pytest.raises(ValueError, match="start transforms"):
        register_in_plane(blank, start[:1])
    with pytest.raises(ValueError, match="no frames"):
        square_frames([], calib)


def test_with_in_plane_replaces_tx_ty_rz_and_keeps_the_out_of_plane_part():
    local = np.stack(
        [rigid(0.5, 1.0, 2.0, 3.0, rx=0.7, ry=-0.2), rigid(-1.0, 0.1, 0.2, -0.3, rx=0.0, ry=0.4)]
    )
    in_plane = np.array([[np.deg2rad(0.2), -0.5, 0.4], [np.deg2rad(0.1), 0.0, 0.0]])
    out = with_in_plane(local, in_plane)
    vec_in, vec_out = (Rotation.from_matrix(T[:, :3, :3]).as_rotvec() for T in (local, out))
    assert np.allclose(vec_out[:, :2], vec_in[:, :2]) and np.allclose(vec_out[:, 2], in_plane[:, 0])
    assert np.allclose(out[:, :2, 3], in_plane[:, 1:]) and np.allclose(out[:, 2, 3], local[:, 2, 3])
    assert np.allclose(out[:, 3], [0, 0, 0, 1]) and np.allclose(np.linalg.det(out[:, :3, :3]), 1.0)
    kept = with_in_plane(local, in_plane, keep_tx=True)
    assert np.allclose(kept[:, 0, 3], local[:, 0, 3]) and np.allclose(kept[:, 1, 3], in_plane[:, 2])
    assert np.allclose(kept[:, :3, :3], out[:, :3, :3])


@pytest.mark.parametrize(
    "source, name, keep",
    [
        ("registration-except-sweep", "LH_Par_C_DtP", True),
        ("registration-except-sweep", "RH_Par_S_PtD", True),
        ("registration-except-sweep", "LH_Per_C_DtP", False),
        ("registration-except-sweep", "LH_rotation", False),
        ("registration-except-sweep", "scan", False),
        ("registration-except-sweep", None, False),
        ("registration", "LH_Par_C_DtP", False),
        ("network", "LH_Par_C_DtP", False),
    ],
)
def test_only_the_parallel_sweeps_keep_the_networks_tx(source, name, keep):
    assert keeps_sweep_tx(source, name) is keep


def test_the_predictor_takes_the_in_plane_motion_from_registration(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP", "LH_rotation"), 8)
    data = open_data(root)
    calib = data.calibration
    members = load_members(make_weights(tmp_path / "w"))
    network = core.Predictor(members, "cpu", workers=1, in_plane="network")
    fingerprints = {network.fingerprint}
    for source in ("registration", "registration-except-sweep"):
        registering = core.Predictor(members, "cpu", workers=1, in_plane=source)
        fingerprints.add(registering.fingerprint)
        for scan in data.scans:
            row_n = network.predict_scan(scan, calib, tmp_path / "n.h5")
            row_r = registering.predict_scan(scan, calib, tmp_path / "r.h5")
            assert row_n["status"] == row_r["status"] == "ok" and row_r["registration_s"] > 0
            with h5py.File(tmp_path / "n.h5") as n, h5py.File(tmp_path / "r.h5") as r:
                local_n, local_r = n["transforms_local"][()], r["transforms_local"][()]
                assert r.attrs["in_plane"] == source and n.attrs["in_plane"] == "network"
            fitted, _ = register_in_plane(square_frames([scan.read_frames()], calib), local_n)
            keep = source == "registration-except-sweep" and scan.name == "LH_Par_C_DtP"
            assert np.allclose(local_r, with_in_plane(local_n, fitted, keep))
            assert np.allclose(local_r[:, 2, 3], local_n[:, 2, 3])  # tz is the network's
            if keep:  # the parallel sweep's tx is the network's too
                assert np.allclose(local_r[:, 0, 3], local_n[:, 0, 3])
    assert len(fingerprints) == 3
    with pytest.raises(ValueError, match="in-plane source"):
        core.Predictor(members, "cpu", in_plane="optical flow")


@pytest.mark.parametrize("workers, chunk", [(1, 64), (2, 3), (3, 1)])
def test_the_predictor_reads_a_scan_once_for_its_members_and_the_registration(
    dataset_factory, tmp_path, monkeypatch, workers, chunk
):
    """read_inputs gives the members' input and the registration's square frames from one
    pass over the file, each equal bit for bit to reading them apart, on any threads and
    chunks; predict_scan does not read the frames again."""
    root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP",), 9)
    data = open_data(root)
    scan, calib = data.scans[0], data.calibration
    members = load_members(make_weights(tmp_path / "w"))
    predictor = core.Predictor(members, "cpu", workers=workers, chunk=chunk, in_plane="registration")
    frames, square = predictor.read_inputs(scan, calib)
    alone = square_frames([scan.read_frames()], calib)
    assert np.array_equal(frames, predictor.read_preprocessed(scan))
    assert np.array_equal(square.frames, alone.frames)
    assert np.array_equal(square.pixel_mm, alone.pixel_mm) and np.array_equal(square.origin, alone.origin)
    assert predictor.read_inputs(scan)[1] is None
    reads = []
    real = type(scan).iter_frames

    def counted(self, *args, **kwargs):
        reads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(scan), "iter_frames", counted)
    assert predictor.predict_scan(scan, calib, tmp_path / "p.h5")["status"] == "ok"
    assert not reads  # the registration used the frames read for the members


def test_pairs_left_at_the_deadline_keep_the_networks_estimate_and_the_manifest_says_so(
    dataset_factory, tmp_path, monkeypatch
):
    root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_rotation",), 6)
    data = open_data(root)
    members = load_members(make_weights(tmp_path / "w"))
    real = core.register_in_plane

    def late(square, initial, deadline, workers):  # the deadline has passed when it starts
        return real(square, initial, time.perf_counter() - 1.0, workers)

    monkeypatch.setattr(core, "register_in_plane", late)
    network = core.Predictor(members, "cpu", workers=1, in_plane="network")
    registering = core.Predictor(members, "cpu", workers=1, in_plane="registration", time_limit_s=1e6)
    scan = data.scans[0]
    row = registering.predict_scan(scan, data.calibration, tmp_path / "r.h5")
    assert row["status"] == "ok"
    assert "in-plane registration: 5 of 5 frame pairs kept the network's estimate" in row["message"]
    network.predict_scan(scan, data.calibration, tmp_path / "n.h5")
    with h5py.File(tmp_path / "n.h5") as n, h5py.File(tmp_path / "r.h5") as r:
        assert np.allclose(n["transforms_local"][()], r["transforms_local"][()])

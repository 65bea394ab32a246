"""Ground-truth DDFs against brute force and hand-checked cases (docs/conventions.md section 2)."""

import tracemalloc

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tusrec import ddf
from tusrec.data import Scan, write_landmarks, write_scan
from tusrec.geometry import default_calibration, frame_transforms, pose6_to_matrix

from .reference import brute_force_ddfs

CALIB = default_calibration()
SX, SY = CALIB.pixel_spacing_mm


def tforms_from_image_poses(image_to_world):
    """tforms such that tforms[i] @ T_rotation = image_to_world[i]."""
    return image_to_world @ np.linalg.inv(CALIB.T_rotation)


def random_tforms(seed, n):
    rng = np.random.default_rng(seed)
    poses = np.concatenate([rng.normal(0, 0.3, (n, 3)), rng.normal(0, 80, (n, 3))], axis=1)
    return pose6_to_matrix(poses)


@pytest.mark.parametrize("H,W", [(4, 6), (7, 3)])
def test_gp_lp_match_brute_force(H, W):
    tforms = random_tforms(0, 5)
    glob, loc = frame_transforms(tforms, CALIB)
    gp = ddf.pixel_ddfs(glob, CALIB.T_scale, H, W, dtype=np.float64)
    lp = ddf.pixel_ddfs(loc, CALIB.T_scale, H, W, dtype=np.float64)
    np.testing.assert_allclose(gp, brute_force_ddfs(tforms, CALIB, H, W, lambda i: 0), atol=1e-9)
    np.testing.assert_allclose(lp, brute_force_ddfs(tforms, CALIB, H, W, lambda i: i - 1), atol=1e-9)


def test_pure_translation_in_image_axes_is_constant():
    d = np.array([1.5, -2.0, 0.7])  # mm, in frame 0's image axes
    pose0 = pose6_to_matrix(np.array([0.2, -0.1, 0.3, 100.0, 50.0, -400.0]))
    shift = np.eye(4)
    shift[:3, 3] = d
    tforms = tforms_from_image_poses(np.stack([pose0, pose0 @ shift]))
    glob, loc = frame_transforms(tforms, CALIB)
    gp = ddf.pixel_ddfs(glob, CALIB.T_scale, 4, 5, dtype=np.float64)
    np.testing.assert_allclose(gp[0].T, np.tile(d, (20, 1)), atol=1e-9)
    np.testing.assert_allclose(ddf.pixel_ddfs(loc, CALIB.T_scale, 4, 5, np.float64), gp, atol=1e-12)


def test_rotation_about_image_z_axis_hand_checked():
    """Frame 1 is frame 0 turned by theta about the image z axis through image-mm origin.

    A pixel (x, y) sits at q = (sx x, sy y, 0); its DDF is Rz(theta) q - q. At the first
    pixel (1, 1) and the last (W, H) this is worked out by hand below.
    """
    theta = np.deg2rad(10.0)
    H, W = 480, 640
    pose0 = pose6_to_matrix(np.array([0.4, 0.2, -0.3, -200.0, 300.0, 900.0]))
    rot = pose6_to_matrix(np.array([0, 0, theta, 0, 0, 0]))
    tforms = tforms_from_image_poses(np.stack([pose0, pose0 @ rot]))
    glob, _ = frame_transforms(tforms, CALIB)
    gp = ddf.pixel_ddfs(glob, CALIB.T_scale, H, W, dtype=np.float64)[0]
    c, s = np.cos(theta), np.sin(theta)
    for x, y, k in ((1, 1, 0), (W, H, H * W - 1), (W, 1, W - 1), (1, 2, W)):
        qx, qy = SX * x, SY * y
        expected = [c * qx - s * qy - qx, s * qx + c * qy - qy, 0.0]
        np.testing.assert_allclose(gp[:, k], expected, atol=1e-9)
    # The 1-based grid matters: a 0-based grid puts index 0 at q = 0, where this rotation
    # moves nothing; pixel (1, 1) moves by |R - I| |(sx, sy)| = 2 sin(theta/2) * 0.318 mm.
    assert np.linalg.norm(gp[:, 0]) == pytest.approx(2 * np.sin(theta / 2) * np.hypot(SX, SY))


def test_landmark_ddfs_read_the_dense_field():
    tforms = random_tforms(3, 6)
    glob, loc = frame_transforms(tforms, CALIB)
    H, W = 8, 9
    gp = ddf.pixel_ddfs(glob, CALIB.T_scale, H, W, dtype=np.float64)
    lp = ddf.pixel_ddfs(loc, CALIB.T_scale, H, W, dtype=np.float64)
    lm = np.array([[1, 1, 1], [5, W, H], [3, 4, 7], [2, W, 1], [4, 1, H]])
    gl = ddf.landmark_ddfs(glob, CALIB.T_scale, lm)
    ll = ddf.landmark_ddfs(loc, CALIB.T_scale, lm)
    for j, (f, x, y) in enumerate(lm):
        np.testing.assert_allclose(gl[:, j], gp[f - 1, :, (y - 1) * W + (x - 1)], atol=1e-9)
        np.testing.assert_allclose(ll[:, j], lp[f - 1, :, (y - 1) * W + (x - 1)], atol=1e-9)


def test_chunks_equal_whole_and_float32_is_accurate():
    tforms = random_tforms(4, 23)
    glob, _ = frame_transforms(tforms, CALIB)
    H, W = 480, 640
    whole = ddf.pixel_ddfs(glob[:5], CALIB.T_scale, H, W, dtype=np.float64)
    chunks = [c.copy() for _, c in ddf.iter_pixel_ddfs(glob, CALIB.T_scale, H, W, chunk=7)]
    assert [len(c) for c in chunks] == [7, 7, 7, 1]
    assert chunks[0].dtype == np.float32
    streamed = np.concatenate(chunks)
    np.testing.assert_allclose(streamed[:5], whole, atol=1e-4)  # mm
    np.testing.assert_allclose(streamed, ddf.pixel_ddfs(glob, CALIB.T_scale, H, W), atol=1e-6)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_frames():
    H, W = 120, 160

    def consume(n):
        glob, _ = frame_transforms(random_tforms(5, n), CALIB)
        return lambda: sum(
            float(c[:, 0, 0].sum()) for _, c in ddf.iter_pixel_ddfs(glob, CALIB.T_scale, H, W, 8)
        )

    small, large = peak_bytes(consume(20)), peak_bytes(consume(400))
    chunk_bytes = 8 * 3 * H * W * 4
    assert large < small + chunk_bytes / 2, (small, large)
    assert large < 4 * chunk_bytes


def test_ground_truth_file(tmp_path):
    H, W, n = 6, 8, 5
    tforms = random_tforms(6, n)
    frames = np.random.default_rng(0).integers(1, 255, (n, H, W), dtype=np.uint8)
    scan = write_scan(tmp_path, "train", 7, "LH_Par_L_DtP", frames, tforms)
    lm_path = tmp_path / "landmarks" / "landmark_007.h5"
    lm = np.array([[1, 2, 3], [4, 8, 6]])
    write_landmarks(lm_path, {"LH_Par_L_DtP": lm})
    scan = Scan(scan.subject, scan.name, scan.frames_path, scan.tforms_path, lm_path)
    out = tmp_path / "gt" / f"{scan.key}.h5"
    ddf.write_ground_truth(scan, CALIB, out, chunk=3)
    glob, loc = frame_transforms(tforms.astype(np.float32), CALIB)
    with h5py.File(out) as f:
        assert f["GP"].shape == f["LP"].shape == (n - 1, 3, H * W)
        assert f["GP"].dtype == np.float32 and f["GP"].chunks == (1, 3, H * W)
        assert f["GL"].shape == f["LL"].shape == (3, 2)
        np.testing.assert_allclose(
            f["GP"][()], brute_force_ddfs(tforms.astype(np.float32), CALIB, H, W, lambda i: 0), atol=1e-4
        )
        np.testing.assert_allclose(f["LL"][()], ddf.landmark_ddfs(loc, CALIB.T_scale, lm), atol=1e-4)
        np.testing.assert_allclose(f["transforms_global"][()], glob, atol=1e-4)
    assert not list(out.parent.glob(".*tmp"))


def test_prediction_writer_leaves_nothing_when_incomplete(tmp_path):
    from tusrec.data import PredictionWriter, TusrecDataError

    path = tmp_path / "sub000__x.h5"
    with pytest.raises(TusrecDataError, match="frames not written"), PredictionWriter(path, 4, (2, 3)) as w:
        w.write_pixels(0, np.zeros((2, 3, 6)), np.zeros((2, 3, 6)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), PredictionWriter(path, 4, (2, 3)):
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_rotation_scipy_cross_check_of_global_chain():
    """GP of the last frame equals the DDF of the chained locals (independent path)."""
    tforms = random_tforms(8, 7)
    glob, loc = frame_transforms(tforms, CALIB)
    chained = np.eye(4)
    for T in loc:
        chained = chained @ T
    np.testing.assert_allclose(chained, glob[-1], atol=1e-9)
    # The global rotation is the composition of the local rotations (scipy's own product).
    R = Rotation.identity()
    for T in loc:
        R = R * Rotation.from_matrix(T[:3, :3])
    np.testing.assert_allclose(R.as_matrix(), glob[-1][:3, :3], atol=1e-9)

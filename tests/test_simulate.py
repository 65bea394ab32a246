"""The simulator: formats and conventions, images consistent with poses, speckle that
decorrelates with out-of-plane motion, realistic hand motion, and the dataset writer."""

import h5py
import numpy as np
import pytest

from tusrec.data import open_data
from tusrec.geometry import default_calibration, frame_transforms
from tusrec.simulate import scan_names, simulate_scan
from tusrec.simulate.dataset import FrameCount, simulate_dataset

CALIB = default_calibration()
SMALL = (120, 160)  # the fan scales down to fit: a whole fan, quickly


def test_scan_names():
    names = scan_names("2024")
    assert len(names) == 24 == len(set(names))
    assert {n.split("_")[0] for n in names} == {"LH", "RH"}
    assert {n.split("_")[2] for n in names} == {"L", "C", "S"}
    assert scan_names("2025") == ["LH_rotation", "RH_rotation"]
    with pytest.raises(ValueError, match="unknown protocol"):
        scan_names("2023")
    with pytest.raises(ValueError, match="unknown scan name"):
        simulate_scan(1, "LH_Par_X_DtP", 5)


def test_formats_determinism_and_calibration():
    a = simulate_scan(3, "RH_Per_C_PtD", 12, seed=4, image_size=SMALL)
    frames = a.frames()
    assert frames.shape == (12, *SMALL) and frames.dtype == np.uint8
    assert a.tforms.shape == (12, 4, 4) and a.tforms.dtype == np.float32
    R = a.tforms[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.tile(np.eye(3), (12, 1, 1)), atol=1e-5)
    np.testing.assert_allclose(a.tforms[:, 3], np.tile([0, 0, 0, 1], (12, 1)), atol=0)
    # tforms[i] @ T_rotation is the image -> world pose, so TUS-REC's T(b->a) is exact.
    np.testing.assert_allclose(a.tforms @ CALIB.T_rotation, a.image_to_world, atol=1e-3)
    glob, _ = frame_transforms(a.tforms, CALIB)
    np.testing.assert_allclose(glob, np.linalg.inv(a.image_to_world[0]) @ a.image_to_world[1:], atol=1e-3)
    # Tracker-like placement: hundreds of mm from the camera.
    assert 300 < np.linalg.norm(a.tforms[0, :3, 3]) < 1500
    # Outside the fan every pixel is black; inside, the image is not.
    assert not frames[:, ~a.fov_mask].any()
    assert frames[:, a.fov_mask].mean() > 10
    b = simulate_scan(3, "RH_Per_C_PtD", 12, seed=4, image_size=SMALL)
    np.testing.assert_array_equal(b.frames(), frames)
    np.testing.assert_array_equal(b.tforms, a.tforms)
    c = simulate_scan(3, "RH_Per_C_PtD", 12, seed=5, image_size=SMALL)
    assert not np.array_equal(c.tforms, a.tforms)
    chunks = list(a.frame_chunks(5))
    assert [len(x) for x in chunks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), frames)


def _shifted(pose, d):
    """pose @ translation d (image mm): the probe moved by d in its own image axes."""
    T = np.eye(4)
    T[:3, 3] = d
    return pose @ T


def _corr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a - a.mean(), b - b.mean())[0, 1])


def test_image_follows_an_in_plane_shift_of_the_probe():
    """Moving the probe k pixels along image x shows the same anatomy k pixels over."""
    scan = simulate_scan(7, "LH_Per_L_DtP", 3, image_size=(480, 640))
    ren = scan.renderer()
    pose = scan.arm_from_image[1]
    k = 12
    sx = CALIB.pixel_spacing_mm[0]
    base = ren.render(pose, 0).astype(np.float64)
    moved = ren.render(_shifted(pose, [k * sx, 0, 0]), 0).astype(np.float64)
    # Deep (below the face's contact deformation) and central, away from the fan edges.
    rows, cols = slice(200, 330), slice(240, 400)
    aligned = _corr(moved[rows, cols], base[rows, cols.start + k : cols.stop + k])
    unshifted = _corr(moved[rows, cols], base[rows, cols])
    wrong_way = _corr(moved[rows, cols], base[rows, cols.start - k : cols.stop - k])
    assert aligned > 0.9, aligned
    assert aligned > max(unshifted, wrong_way) + 0.15, (aligned, unshifted, wrong_way)


def test_speckle_decorrelates_gradually_out_of_plane():
    scan = simulate_scan(7, "RH_Per_L_PtD", 3, image_size=(480, 640))
    ren = scan.renderer()
    pose = scan.arm_from_image[1]
    ref = ren.polar(pose, 0, speckle_only=True) ** 2  # intensity
    corr = {
        dz: _corr(ref, ren.polar(_shifted(pose, [0, 0, dz]), 0, speckle_only=True) ** 2)
        for dz in (0.2, 1.0, 3.0)
    }
    assert corr[0.2] > 0.6 and corr[0.2] > corr[1.0] > corr[3.0], corr
    assert corr[3.0] < 0.1, corr


@pytest.mark.parametrize("name", scan_names("2024"))
def test_sweeps_move_at_hand_speeds(name):
    scan = simulate_scan(11, name, 300, image_size=SMALL)
    centre = scan.image_to_world[:, :3, 3]  # the image origin, a point fixed to the probe
    step = np.linalg.norm(np.diff(centre, axis=0), axis=1)  # mm per frame at 20 frames/s
    assert 0.2 < np.median(step) < 1.05, np.median(step)
    assert step.max() < 2.0
    rot = np.array(
        [
            np.degrees(np.arccos(np.clip((np.trace(a[:3, :3].T @ b[:3, :3]) - 1) / 2, -1, 1)))
            for a, b in zip(scan.image_to_world[:-1], scan.image_to_world[1:], strict=True)
        ]
    )
    assert rot.max() < 1.5, rot.max()
    # The probe travels along the forearm, not on the spot.
    assert np.linalg.norm(centre[-1] - centre[0]) > 60


@pytest.mark.parametrize("name", scan_names("2025"))
def test_rotation_scans_turn_about_a_fixed_contact(name):
    scan = simulate_scan(11, name, 1500, image_size=SMALL)
    face = scan.image_to_world[:, :3, :3] @ scan.fan.face_centre + scan.image_to_world[:, :3, 3]
    assert np.linalg.norm(face - face.mean(axis=0), axis=1).max() < 15  # stays near one point
    R0 = scan.image_to_world[0, :3, :3]
    total = [
        np.degrees(np.arccos(np.clip((np.trace(R0.T @ T[:3, :3]) - 1) / 2, -1, 1)))
        for T in scan.image_to_world
    ]
    assert 70 < max(total) < 130  # rotated by about 90 degrees at some point
    steps = [
        np.degrees(np.arccos(np.clip((np.trace(a[:3, :3].T @ b[:3, :3]) - 1) / 2, -1, 1)))
        for a, b in zip(scan.image_to_world[:-1], scan.image_to_world[1:], strict=True)
    ]
    assert max(steps) < 1.5


def test_frame_count():
    assert FrameCount.parse("300") == FrameCount(300, 300)
    fc = FrameCount.parse("250-350")
    counts = {fc.for_scan(0, 50, n) for n in scan_names("2024")}
    assert len(counts) > 5 and all(250 <= c <= 350 for c in counts)
    assert fc.for_scan(0, 50, "LH_Par_C_DtP") == fc.for_scan(0, 50, "LH_Par_C_DtP")
    for bad in ("1", "9-5", "x"):
        with pytest.raises(ValueError):
            FrameCount.parse(bad)


@pytest.mark.parametrize(
    "protocol,layout,landmark_dir,k",
    [
        ("2024", "eval", "landmark", 20),
        ("2025", "eval", "landmarks", 100),
        ("2024", "train", "landmarks", 20),
    ],
)
def test_simulated_dataset_has_the_real_layout(tmp_path, protocol, layout, landmark_dir, k):
    names = scan_names(protocol)[:2]
    keys = simulate_dataset(tmp_path, [50, 51], protocol, layout, frames=8, names=names, image_size=SMALL)
    assert keys == [f"sub{s:03d}__{n}" for s in (50, 51) for n in names]
    data = open_data(tmp_path)
    assert data.layout == layout and sorted(data.keys) == sorted(keys)
    frames_dir = "frames_transfs" if layout == "train" else "frames"
    for scan in data.scans:
        assert scan.frames_path.parent == tmp_path / frames_dir / scan.subject
        with h5py.File(scan.frames_path) as f:
            assert f["frames"].dtype == np.uint8 and f["frames"].shape == (8, *SMALL)
        tf_file = (
            scan.frames_path if layout == "train" else tmp_path / "transfs" / scan.subject / f"{scan.name}.h5"
        )
        with h5py.File(tf_file) as f:
            assert f["tforms"].dtype == np.float32 and f["tforms"].shape == (8, 4, 4)
        assert scan.read_landmarks().shape == (k, 3)  # validated against the scan on reading
        assert scan.landmark_path == tmp_path / landmark_dir / f"landmark_{scan.subject}.h5"
    if layout == "eval":
        with h5py.File(tmp_path / "dataset_keys.h5") as f:
            assert sorted(f) == sorted(keys)
    assert (tmp_path / "calib_matrix.csv").read_text().startswith("scaling_from_pixel_to_mm\n")


def test_rerun_keeps_complete_scans(tmp_path):
    simulate_dataset(
        tmp_path, [50], frames=6, names=["LH_Par_L_DtP", "RH_Per_S_PtD"], image_size=SMALL, landmarks=False
    )
    done = tmp_path / "frames" / "050" / "LH_Par_L_DtP.h5"
    mtime = done.stat().st_mtime_ns
    (tmp_path / "transfs" / "050" / "RH_Per_S_PtD.h5").unlink()  # as if interrupted
    simulate_dataset(
        tmp_path, [50], frames=6, names=["LH_Par_L_DtP", "RH_Per_S_PtD"], image_size=SMALL, landmarks=False
    )
    assert done.stat().st_mtime_ns == mtime
    assert (tmp_path / "transfs" / "050" / "RH_Per_S_PtD.h5").exists()


def test_a_second_protocol_joins_the_folder_and_its_keys(tmp_path):
    simulate_dataset(tmp_path, [50], frames=5, names=["LH_Par_L_DtP"], image_size=SMALL, landmarks=False)
    simulate_dataset(tmp_path, [50], "2025", frames=5, image_size=SMALL, landmarks=False)
    expected = ["sub050__LH_Par_L_DtP", "sub050__LH_rotation", "sub050__RH_rotation"]
    assert sorted(open_data(tmp_path).keys) == expected
    with h5py.File(tmp_path / "dataset_keys.h5") as f:
        assert sorted(f) == expected


def test_world_pose_is_only_a_placement():
    """The identity of a scan's ground truth does not depend on where the camera is:
    relative transforms come from the arm-frame poses alone."""
    scan = simulate_scan(5, "LH_Par_S_DtP", 20, image_size=SMALL)
    rel = np.linalg.inv(scan.arm_from_image[0]) @ scan.arm_from_image[1:]
    np.testing.assert_allclose(
        np.linalg.inv(scan.image_to_world[0]) @ scan.image_to_world[1:], rel, atol=1e-9
    )


def test_echo_channels_are_never_negative_and_frames_finite():
    """Subject 4 of seed 0 had skin voxels of negative echogenicity, which the log
    compression turned into NaN pixels."""
    from tusrec.simulate.anatomy import anatomy_volume

    atlas = anatomy_volume(0, 4).atlas
    assert atlas[..., 0].min() >= 0 and atlas[..., 1].min() >= 0
    scan = simulate_scan(4, "LH_Per_L_PtD", 2)
    assert np.isfinite(scan.renderer().polar(scan.arm_from_image[0], 0)).all()


@pytest.mark.parametrize("name", scan_names("2024"))
def test_probe_face_moves_at_5_to_20_mm_per_s(name):
    """The point of the probe touching the skin travels at hand speeds (20 frames/s)."""
    scan = simulate_scan(4, name, 400, image_size=SMALL)
    face = scan.image_to_world[:, :3, :3] @ scan.fan.face_centre + scan.image_to_world[:, :3, 3]
    step = np.linalg.norm(np.diff(face, axis=0), axis=1)
    assert 5.0 <= 20.0 * step.mean() <= 20.5, 20.0 * step.mean()
    assert step.max() < 1.3, step.max()


def test_rotation_scans_turn_smoothly():
    scan = simulate_scan(5, "RH_rotation", 1600, image_size=SMALL)
    R = scan.image_to_world[:, :3, :3]
    rel = np.einsum("nji,njk->nik", R[:-1], R[1:])
    step = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert step.max() < 0.9 and step.mean() < 0.4, (step.max(), step.mean())
    x0, x1 = R[0, :, 0], R[-1, :, 0]  # image x turned ~90 degrees about the probe axis
    assert np.degrees(np.arccos(abs(x0 @ x1))) > 70

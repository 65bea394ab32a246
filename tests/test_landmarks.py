"""SIFT landmark extraction: conventions (0-based frame never 0, 1-based x/y) and files."""

import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from tusrec.data import EVAL, Scan, open_data, write_dataset_keys, write_scan
from tusrec.geometry import pose6_to_matrix
from tusrec.landmarks import default_k, extract_landmarks, field_of_view_mask, write_data_landmarks

H, W = 120, 160
ROOT = Path(__file__).resolve().parents[1]


def fan_mask():
    """A curvilinear field of view like the real frames': black outside."""
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (W // 2, -40), (150, 150), 0, 55, 125, 255, -1)
    cv2.circle(mask, (W // 2, -40), 50, 0, -1)
    return mask > 0


def textured_frames(n, seed, blobs=()):
    """(n, H, W) uint8: faint smooth texture inside the fan, plus bright Gaussian blobs
    given as (frame, row0, col0, amplitude) with 0-based centres."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, H, W), np.uint8)
    rows, cols = np.mgrid[0:H, 0:W]
    for i in range(n):
        tex = cv2.GaussianBlur(rng.random((H, W)).astype(np.float32), (0, 0), 2)
        img = 90 + 30 * (tex - tex.mean()) / (tex.std() + 1e-6)
        for f, r0, c0, amp in blobs:
            if f == i:
                img += amp * np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * 3.0**2))
        frames[i] = np.clip(img, 1, 255).astype(np.uint8) * fan_mask()
    return frames


def write_test_scan(root, name, frames, subject=50):
    tforms = pose6_to_matrix(np.tile([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], (len(frames), 1)))
    return write_scan(root, EVAL, subject, name, frames, tforms)


def test_field_of_view_mask_keeps_off_the_fan_edge():
    frames = textured_frames(3, 0)
    mask = field_of_view_mask(frames, margin=5) > 0
    fan = fan_mask()
    assert mask.sum() > 0.5 * fan.sum()
    assert not (mask & ~fan).any()
    # Every kept pixel is at least 5 pixels from the fan's outside.
    dist = cv2.distanceTransform(fan.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert dist[mask].min() >= 5


def test_strongest_blob_is_first_landmark_at_its_one_based_pixel(tmp_path):
    # Blob centred on 0-based (row 70, col 90) of frame 4: 1-based (x, y) = (91, 71).
    frames = textured_frames(6, 1, blobs=[(4, 70, 90, 150), (0, 60, 60, 250)])
    scan = write_test_scan(tmp_path, "LH_Par_L_DtP", frames)
    lm = extract_landmarks(scan, k=10)
    assert lm.dtype == np.int64 and lm.shape == (10, 3)
    f, x, y = lm[0]
    assert f == 4
    assert abs(x - 91) <= 1 and abs(y - 71) <= 1
    # Frame 0 (whose blob is brighter still) is never used: it has no DDF.
    assert (lm[:, 0] >= 1).all() and (lm[:, 0] <= 5).all()
    assert not (lm[:, 0] == 0).any()


def test_landmarks_are_in_range_distinct_and_inside_the_fan(tmp_path):
    frames = textured_frames(8, 2)
    scan = write_test_scan(tmp_path, "RH_Per_S_PtD", frames)
    lm = extract_landmarks(scan, k=25)
    assert len(lm) == 25
    assert len({tuple(r) for r in lm}) == 25
    assert ((lm[:, 1] >= 1) & (lm[:, 1] <= W)).all() and ((lm[:, 2] >= 1) & (lm[:, 2] <= H)).all()
    fan = fan_mask()
    assert fan[lm[:, 2] - 1, lm[:, 1] - 1].all()
    # Deterministic.
    np.testing.assert_array_equal(lm, extract_landmarks(scan, k=25))


def test_default_k_by_protocol():
    assert default_k(Scan("050", "LH_Par_C_DtP", Path("x"))) == 20
    assert default_k(Scan("050", "LH_rotation", Path("x"))) == 100


def make_folder(root):
    for i, name in enumerate(["LH_Par_L_DtP", "RH_Per_C_PtD"]):
        write_test_scan(root, name, textured_frames(5, 10 + i))
    write_dataset_keys(root, ["sub050__LH_Par_L_DtP", "sub050__RH_Per_C_PtD"])
    (root / "landmark").mkdir()  # 2024's spelling of the folder


def test_write_data_landmarks_format_skip_and_overwrite(tmp_path):
    make_folder(tmp_path)
    data = open_data(tmp_path)
    made = write_data_landmarks(data, k=7)
    assert set(made) == {"sub050__LH_Par_L_DtP", "sub050__RH_Per_C_PtD"}
    path = tmp_path / "landmark" / "landmark_050.h5"
    with h5py.File(path) as f:
        assert sorted(f) == ["LH_Par_L_DtP", "RH_Per_C_PtD"]
        assert f["LH_Par_L_DtP"].shape == (7, 3)
        assert np.issubdtype(f["LH_Par_L_DtP"].dtype, np.integer)
    # Read back through the data layer, validated against the scan.
    np.testing.assert_array_equal(
        data.scan("sub050__LH_Par_L_DtP").read_landmarks(), made["sub050__LH_Par_L_DtP"]
    )
    assert write_data_landmarks(data, k=7) == {}  # complete: nothing redone
    assert len(write_data_landmarks(data, k=5, overwrite=True)) == 2
    with h5py.File(path) as f:
        assert f["RH_Per_C_PtD"].shape == (5, 3)


def test_landmarks_command(tmp_path):
    make_folder(tmp_path)
    out = tmp_path / "elsewhere"
    run = subprocess.run(
        [str(ROOT / "landmarks"), str(tmp_path), "--k", "4", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    with h5py.File(out / "landmark_050.h5") as f:
        assert f["RH_Per_C_PtD"].shape == (4, 3)
    assert not (tmp_path / "landmark" / "landmark_050.h5").exists()
    bad = subprocess.run([str(ROOT / "landmarks"), str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "data folder not found" in bad.stderr


@pytest.mark.parametrize("args", [["--help"]])
def test_root_command_help(args):
    run = subprocess.run([str(ROOT / "landmarks"), *args], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: landmarks")
    run = subprocess.run([sys.executable, "-m", "tusrec", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "simulate" in run.stdout

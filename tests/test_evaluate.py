"""The evaluator: exact metrics (against brute force), bounded streaming, validation of
prediction folders, and every bad input of the evaluator issue."""

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.data import open_data, write_manifest
from tusrec.ddf import GroundTruth, write_ground_truth, write_predictions
from tusrec.geometry import default_calibration, pose6_to_matrix
from tusrec.scoring import metrics_for_scan
from tusrec.scoring.metrics import TransformField, pixel_errors, rigid_pixel_errors, scan_length_mm
from tusrec.scoring.score import check_predictions, score_predictions

from .reference import global_ddfs, local_ddfs, mean_point_error

ROOT = Path(__file__).resolve().parents[1]
CALIB = default_calibration()


@pytest.fixture
def data_root(dataset_factory, tmp_path):
    """Validation layout: 2 subjects x 2 scans, 7 frames of 24 x 32, 5 landmarks each."""
    return dataset_factory(
        tmp_path / "data",
        "eval",
        ("050", "051"),
        ("LH_Par_C_DtP", "RH_Per_L_PtD"),
        7,
        landmark_dir="landmark",
    )


def write_gt_folder(data, folder):
    rows = []
    for scan in data.scans:
        write_ground_truth(scan, data.calibration, folder / f"{scan.key}.h5")
        rows.append({"key": scan.key, "frames": scan.n_frames, "status": "ok", "seconds": 1.5})
    write_manifest(folder, rows)
    return folder


def reference_errors(scan, calib, pred):
    """Brute-force GPE, GLE, LPE, LLE of in-memory predictions (dict of arrays)."""
    tforms = scan.read_tforms()
    _n, h, w = scan.shape
    gp, lp = global_ddfs(tforms, calib, h, w), local_ddfs(tforms, calib, h, w)
    lm = scan.read_landmarks()
    idx = (lm[:, 2] - 1) * w + (lm[:, 1] - 1)
    gl = np.stack([gp[f - 1, :, k] for f, k in zip(lm[:, 0], idx, strict=True)], axis=1)
    ll = np.stack([lp[f - 1, :, k] for f, k in zip(lm[:, 0], idx, strict=True)], axis=1)
    return {
        "GPE": mean_point_error(gp, pred["GP"]),
        "GLE": mean_point_error(gl, pred["GL"]),
        "LPE": mean_point_error(lp, pred["LP"]),
        "LLE": mean_point_error(ll, pred["LL"]),
    }, {"GP": gp, "LP": lp, "GL": gl, "LL": ll}


def test_random_prediction_matches_brute_force(data_root):
    data = open_data(data_root)
    scan = data.scans[0]
    n, h, w = scan.shape
    rng = np.random.default_rng(0)
    pred = {
        "GP": rng.normal(0, 20, (n - 1, 3, h * w)).astype(np.float32),
        "LP": rng.normal(0, 5, (n - 1, 3, h * w)).astype(np.float32),
        "GL": rng.normal(0, 20, (3, 5)).astype(np.float32),
        "LL": rng.normal(0, 5, (3, 5)).astype(np.float32),
    }
    expected, _ = reference_errors(scan, data.calibration, pred)
    got = metrics_for_scan(
        pred["GP"],
        pred["GL"],
        pred["LP"],
        pred["LL"],
        scan.read_frames(),
        scan.read_tforms(),
        scan.read_landmarks(),
        data.calibration_path,  # the organisers pass the calibration file's path
        chunk=4,
    )
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name


def test_ground_truth_scores_zero_and_identity_scores_mean_displacement(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    table = score_predictions(gt_dir, data, tmp_path / "scores")
    assert (table["status"] == "ok").all()
    for name in ("GPE", "GLE", "LPE", "LLE"):
        assert table[name].abs().max() < 1e-4, name
    # The identity prediction's errors equal the mean true displacement norms.
    for _, row in table.iterrows():
        scan = data.scan(row["key"])
        _, true = reference_errors(
            scan, data.calibration, {k: 0 for k in ("GP", "LP", "GL", "LL")} | _zeros(scan)
        )
        assert row["GPE_identity"] == pytest.approx(np.linalg.norm(true["GP"], axis=1).mean(), rel=1e-5)
        assert row["LPE_identity"] == pytest.approx(np.linalg.norm(true["LP"], axis=1).mean(), rel=1e-5)
        assert row["GLE_identity"] == pytest.approx(np.linalg.norm(true["GL"], axis=0).mean(), rel=1e-5)
        assert row["LLE_identity"] == pytest.approx(np.linalg.norm(true["LL"], axis=0).mean(), rel=1e-5)
        assert row["runtime_s"] == 1.5


def _zeros(scan):
    n, h, w = scan.shape
    return {
        "GP": np.zeros((n - 1, 3, h * w)),
        "LP": np.zeros((n - 1, 3, h * w)),
        "GL": np.zeros((3, 5)),
        "LL": np.zeros((3, 5)),
    }


def test_identity_prediction_file_scores_its_identity_errors(data_root, tmp_path):
    data = open_data(data_root)
    pred_dir = tmp_path / "identity"
    for scan in data.scans:
        eye = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
        write_predictions(
            pred_dir / f"{scan.key}.h5", eye, eye, CALIB, scan.image_size, scan.read_landmarks()
        )
    table = score_predictions(pred_dir, data, tmp_path / "scores")
    for name in ("GPE", "GLE", "LPE", "LLE"):
        np.testing.assert_allclose(table[name], table[f"{name}_identity"], rtol=1e-6)


def test_constant_offset_scores_its_length(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    v = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    for path in gt_dir.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            for name in ("GP", "LP"):
                f[name][...] = f[name][()] + v[None, :, None]
            for name in ("GL", "LL"):
                f[name][...] = f[name][()] + v[:, None]
    table = score_predictions(gt_dir, data, tmp_path / "scores")
    for name in ("GPE", "GLE", "LPE", "LLE"):
        np.testing.assert_allclose(table[name], np.linalg.norm(v), rtol=1e-5)


def test_chunk_size_does_not_change_the_result(data_root, tmp_path):
    data = open_data(data_root)
    pred_dir = tmp_path / "noisy"
    for scan in data.scans:
        gt = GroundTruth.from_scan(scan, data.calibration)
        noise = pose6_to_matrix(
            np.random.default_rng(1).normal(0, [0.01] * 3 + [0.5] * 3, (scan.n_frames - 1, 6))
        )
        write_predictions(
            pred_dir / f"{scan.key}.h5",
            gt.global_ @ noise,
            gt.local @ noise,
            CALIB,
            scan.image_size,
            scan.read_landmarks(),
        )
    a = score_predictions(pred_dir, data, tmp_path / "a", chunk=1)
    b = score_predictions(pred_dir, data, tmp_path / "b", chunk=16)
    for name in ("GPE", "LPE", "GLE", "LLE"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)
        assert (a[name] > 0.01).all()


def test_huge_finite_prediction_is_scored_not_called_nan(data_root):
    data = open_data(data_root)
    scan = data.scans[0]
    n, h, w = scan.shape
    gp = np.zeros((n - 1, 3, h * w), np.float32)
    gp[1, 0, :] = 1e30  # finite in float32, but its square is not
    glob = GroundTruth.from_scan(scan, data.calibration).global_
    err = pixel_errors(gp, glob, CALIB.T_scale, (h, w), chunk=4).error
    assert err == pytest.approx(1e30 / (n - 1), rel=1e-3)


def brute_force_errors(pred, true, T_scale, h, w):
    """Mean over pixels of |DDF_pred - DDF_true| and of |DDF_true|, every pixel's
    displacement T @ T_scale @ p - T_scale @ p in float64 (p = (x, y, 0, 1), 1-based)."""
    y, x = np.mgrid[1 : h + 1, 1 : w + 1]
    p = np.stack([x.ravel(), y.ravel(), np.zeros(h * w), np.ones(h * w)]).astype(np.float64)
    mm = T_scale @ p  # (4, P)
    dp = (pred @ mm)[:, :3] - mm[:3]
    dt = (true @ mm)[:, :3] - mm[:3]
    return np.linalg.norm(dp - dt, axis=1).mean(), np.linalg.norm(dt, axis=1).mean()


def about_pixel(angle, cx, cy, T_scale, axis=(0.0, 0.0, 1.0)):
    """A rotation by ``angle`` (rad) about an axis through image pixel (cx, cy): its field
    vanishes at that pixel (for the in-plane axis z)."""
    c = (T_scale @ np.array([cx, cy, 0.0, 1.0]))[:3]
    R = pose6_to_matrix(np.array([[*(angle * np.asarray(axis)), 0.0, 0.0, 0.0]]))[0]
    R[:3, 3] = c - R[:3, :3] @ c
    return R


RIGID_CASES = {
    # name: (image size, predicted and true (n, 4, 4) transforms)
    "noisy 480x640": (
        (480, 640),
        lambda ts, rng: (
            (t := pose6_to_matrix(rng.normal(0, [0.05] * 3 + [20.0] * 3, (3, 6))))
            @ pose6_to_matrix(rng.normal(0, [0.01] * 3 + [0.5] * 3, (3, 6))),
            t,
        ),
    ),
    # The error field vanishes inside the image (an in-plane rotation error about pixel
    # (7.3, 5.6)): the pixels where a badly conditioned form would cancel.
    "error zero in the image": (
        (13, 17),
        lambda ts, rng: (
            np.stack([about_pixel(0.3, 7.3, 5.6, ts), about_pixel(-1e-4, 2.0, 9.0, ts)]),
            np.stack([np.eye(4)] * 2),
        ),
    ),
    "N = 2, exact prediction": (
        (24, 32),
        lambda ts, rng: (np.stack([about_pixel(0.2, 3, 4, ts, (1.0, 0, 0))]),) * 2,
    ),
    "translation only": (
        (24, 32),
        lambda ts, rng: (pose6_to_matrix(np.array([[0, 0, 0, 1.0, -2.0, 0.5]])), np.eye(4)[None]),
    ),
    # A rotation about the image's vertical line x = 9.5: the error vanishes on a whole
    # column, every row is summed pixel by pixel.
    "error zero on a column": (
        (20, 30),
        lambda ts, rng: (np.stack([about_pixel(0.05, 9.5, 1.0, ts, (0, 1.0, 0))]), np.eye(4)[None]),
    ),
    # Many scales and directions: rows of every kind (constant, Euler-Maclaurin, near a zero).
    "random sweep": (
        (7, 300),
        lambda ts, rng: (
            pose6_to_matrix(rng.normal(0, 1, (60, 6)) * 10.0 ** rng.uniform(-8, 1, (60, 1))),
            pose6_to_matrix(rng.normal(0, [0.1] * 3 + [10.0] * 3, (60, 6))),
        ),
    ),
    # A translation error and a rotation of 1e-12 rad: the norm is constant along a row
    # to 1e-12, whose zero lies 1e13 pixels away.
    "nearly constant rows": (
        (9, 40),
        lambda ts, rng: (pose6_to_matrix(np.array([[0, 0, 1e-12, 1.0, 0.5, -0.2]])), np.eye(4)[None]),
    ),
    # Squares beyond float32 (and a sum of every pixel in float64 near its limit).
    "huge": ((24, 32), lambda ts, rng: (pose6_to_matrix(np.array([[0, 0, 0, 1e30, 0, 0]])), np.eye(4)[None])),
}


@pytest.mark.parametrize("case", list(RIGID_CASES))
def test_rigid_pixel_errors_against_brute_force(case):
    (h, w), make = RIGID_CASES[case]
    ts = CALIB.T_scale
    pred, true = make(ts, np.random.default_rng(7))
    got = rigid_pixel_errors(pred, true, ts, (h, w), chunk=2)
    err, ident = brute_force_errors(pred, true, ts, h, w)
    assert got.error == pytest.approx(err, rel=1e-9, abs=1e-12)
    assert got.identity == pytest.approx(ident, rel=1e-9, abs=1e-12)
    if case == "N = 2, exact prediction":
        assert got.error == 0.0
    if case != "huge":  # the float32 fields of the dense path score it within 1e-6 mm too
        dense = pixel_errors(TransformField(pred, ts, (h, w)), true, ts, (h, w))
        assert abs(dense.error - got.error) < 1e-6 and abs(dense.identity - got.identity) < 1e-6


def test_row_sums_where_euler_maclaurin_meets_the_pixel_sum():
    """Rows whose zero lies from 0 to 20 pixels (complex distance) from a 640-pixel row,
    inside or beyond its ends: each row's sum against the sum of its 640 values."""
    from tusrec.scoring.metrics import NEAR_ZERO_PX, row_norm_sums

    rng = np.random.default_rng(0)
    n, h, w = 200, 40, 640
    slope = 10.0 ** rng.uniform(-3, 0, n)
    x0, d = rng.uniform(-30, w + 30, (n, h)), rng.uniform(0, 5 * NEAR_ZERO_PX, (n, h))
    offset, rest = -x0 * slope[:, None], (d * slope[:, None]) ** 2
    x = np.arange(1, w + 1.0)
    exact = np.sqrt((slope[:, None, None] * x + offset[..., None]) ** 2 + rest[..., None]).sum(axis=-1)
    np.testing.assert_allclose(row_norm_sums(slope, offset, rest, w), exact, rtol=1e-11, atol=0)


def test_rigid_pixel_errors_equal_the_dense_path_on_a_scan(data_root):
    """On a simulated scan's ground truth, GP and LP: the fast path against a float64 sum
    of every pixel (to 1e-9, relative) and against the float32 fields the dense file
    would hold (pixel_errors of a TransformField), within the 1e-5 mm of the README."""
    data = open_data(data_root)
    scan = data.scans[0]
    gt = GroundTruth.from_scan(scan, data.calibration)
    noise = pose6_to_matrix(
        np.random.default_rng(5).normal(0, [0.02] * 3 + [1.0] * 3, (scan.n_frames - 1, 6))
    )
    ts = data.calibration.T_scale
    for true in (gt.global_, gt.local):
        pred = true @ noise
        fast = rigid_pixel_errors(pred, true, ts, scan.image_size, chunk=3)
        exact = brute_force_errors(pred, true, ts, *scan.image_size)
        assert fast.error == pytest.approx(exact[0], rel=1e-9) and fast.error > 0.1
        assert fast.identity == pytest.approx(exact[1], rel=1e-9)
        dense = pixel_errors(TransformField(pred, ts, scan.image_size), true, ts, scan.image_size)
        assert abs(fast.error - dense.error) < 1e-5 and abs(fast.identity - dense.identity) < 1e-5


def test_scan_length_of_a_steady_sweep():
    d = np.array([0.4, 0.1, -0.3])
    step = np.eye(4)
    step[:3, 3] = d
    local = np.tile(step, (9, 1, 1))
    assert scan_length_mm(local, CALIB.T_scale, (480, 640)) == pytest.approx(9 * np.linalg.norm(d))


def test_metrics_files(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    score_predictions(gt_dir, data, tmp_path / "scores")
    table = pd.read_csv(tmp_path / "scores" / "metrics.csv", dtype={"subject": str})
    assert list(table["key"]) == data.keys
    assert {"subject", "arm", "orientation", "shape", "direction", "frames", "scan_length_mm"} <= set(
        table.columns
    )
    assert table["arm"].tolist() == ["LH", "RH", "LH", "RH"]
    with h5py.File(tmp_path / "scores" / "metrics.h5") as f:
        for name in ("GPE", "GLE", "LPE", "LLE", "time_elapsed"):
            assert f[name].shape == (4,)
        np.testing.assert_allclose(f["time_elapsed"][()], 1.5)


# --------------------------------------------------------------------------- bad input


def corrupt(kind, path, scan):
    n, h, w = scan.shape
    if kind == "not hdf5":
        path.write_bytes(b"this is not an HDF5 file\n")
        return
    with h5py.File(path, "r+") as f:
        if kind == "missing dataset":
            del f["LP"]
        elif kind == "wrong shape":
            del f["GP"]
            f.create_dataset("GP", data=np.zeros((n - 1, 3, h * w + 1), np.float32))
        elif kind == "wrong dtype":
            del f["GL"]
            f.create_dataset("GL", data=np.zeros((3, 5), np.int32))
        elif kind == "nan":
            f["GP"][2, 1, 7] = np.nan
        elif kind == "inf":
            f["LL"][0, 3] = np.inf


EXPECTED = {
    "not hdf5": "cannot be opened as an HDF5 file",
    "missing dataset": "no dataset 'LP'",
    "wrong shape": "'GP' has shape",
    "wrong dtype": "'GL' has dtype int32, expected float32",
    "nan": "'GP' has NaN or Inf values (first in frame 3)",
    "inf": "'LL' has NaN or Inf values",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_prediction_file_is_reported_and_others_still_scored(kind, data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    bad = data.scans[1]
    path = gt_dir / f"{bad.key}.h5"
    corrupt(kind, path, bad)
    before = path.read_bytes()
    problems = check_predictions(gt_dir, data)
    assert [p.key for p in problems] == [bad.key]
    assert EXPECTED[kind] in problems[0].message and str(path) in problems[0].message
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert table.loc[bad.key, "status"] == "invalid"
    assert EXPECTED[kind] in table.loc[bad.key, "message"]
    assert np.isnan(table.loc[bad.key, ["GPE", "GLE", "LPE", "LLE"]].astype(float)).all()
    others = table.drop(bad.key)
    assert (others["status"] == "ok").all() and (others["GPE"] < 1e-4).all()
    assert path.read_bytes() == before  # nothing is lost: the evaluator never writes into predictions


def test_file_for_no_scan_and_manifest_row_without_file(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    shutil.copy(gt_dir / f"{data.keys[0]}.h5", gt_dir / "sub099__LH_Par_C_DtP.h5")
    (gt_dir / f"{data.keys[2]}.h5").unlink()
    messages = [str(p) for p in check_predictions(gt_dir, data)]
    assert any("sub099__LH_Par_C_DtP.h5 belongs to no scan" in m for m in messages)
    assert any(
        data.keys[2] in m and "no prediction file" in m and "the manifest says ok" in m for m in messages
    )
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert table.loc[data.keys[2], "status"] == "missing"
    assert "sub099__LH_Par_C_DtP" not in table.index
    assert (table.drop(data.keys[2])["status"] == "ok").all()


def test_declared_failures_keep_their_rows(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    (gt_dir / f"{data.keys[0]}.h5").unlink()
    rows = pd.read_csv(gt_dir / "predictions.csv", dtype={"message": str})
    rows.loc[0, ["status", "message"]] = ["timeout", "killed after 120 s"]
    rows.loc[1, ["status", "message"]] = ["failed", "CUDA out of memory"]
    write_manifest(gt_dir, rows.to_dict("records"))
    assert check_predictions(gt_dir, data) == []  # a declared failure is consistent
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert table.loc[data.keys[0], "status"] == "timeout"
    assert table.loc[data.keys[1], "status"] == "failed"  # even though its file exists
    assert table.loc[data.keys[1], "message"] == "CUDA out of memory"
    assert np.isnan(table.loc[data.keys[1], "GPE"])


def test_data_without_ground_truth(dataset_factory, tmp_path):
    data = open_data(dataset_factory(tmp_path / "test", "eval", with_tforms=False))
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / f"{data.keys[0]}.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="scoring needs the transfs/ folder"):
        score_predictions(pred, data, tmp_path / "scores")
    assert not (tmp_path / "scores" / "metrics.csv").exists()


def test_empty_predictions_folder(data_root, tmp_path):
    data = open_data(data_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty predictions folder"):
        score_predictions(tmp_path / "empty", data, tmp_path / "scores")
    assert [str(p) for p in check_predictions(tmp_path / "empty", data)] == [
        f"{tmp_path / 'empty'}: empty predictions folder (expected <key>.h5 files)"
    ]


def test_rerun_reuses_scores_of_unchanged_files(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    score_predictions(gt_dir, data, tmp_path / "scores")
    path = gt_dir / f"{data.keys[0]}.h5"
    st = path.stat()
    with h5py.File(path, "r+") as f:
        f["GP"][0] = f["GP"][0] + 1.0
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: looks unchanged
    again = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert again.loc[data.keys[0], "GPE"] < 1e-4  # the cached score was used
    path.touch()
    changed = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert changed.loc[data.keys[0], "GPE"] > 0.1  # rescored once the file changed


def test_evaluate_command(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    ok = subprocess.run(
        [str(ROOT / "evaluate"), "check", str(gt_dir), "--data", str(data_root)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    run = subprocess.run(
        [
            str(ROOT / "evaluate"),
            "score",
            str(gt_dir),
            "--data",
            str(data_root),
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "4 of 4 scans scored" in run.stdout and "GPE" in run.stdout
    corrupt("nan", gt_dir / f"{data.keys[0]}.h5", data.scans[0])
    bad = subprocess.run(
        [str(ROOT / "evaluate"), "check", str(gt_dir), "--data", str(data_root)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "NaN or Inf" in bad.stdout


def test_reference_command(data_root, dataset_factory, tmp_path):
    tusrec = [str(ROOT / ".venv" / "bin" / "python"), "-m", "tusrec"]
    gt = subprocess.run(
        [*tusrec, "reference", "ground-truth", str(data_root), "--out", str(tmp_path / "gt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert gt.returncode == 0, gt.stderr
    table = score_predictions(tmp_path / "gt", open_data(data_root), tmp_path / "s")
    assert (table[["GPE", "GLE", "LPE", "LLE"]].abs().to_numpy() < 1e-4).all()
    # The identity needs no ground truth: it works on the test layout (no transfs/).
    test_root = dataset_factory(tmp_path / "test", "eval", with_tforms=False)
    ident = subprocess.run(
        [*tusrec, "reference", "identity", str(test_root), "--out", str(tmp_path / "id")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ident.returncode == 0, ident.stderr
    assert check_predictions(tmp_path / "id", open_data(test_root)) == []
    # ...but the ground truth does, and says so.
    bad = subprocess.run(
        [*tusrec, "reference", "ground-truth", str(test_root), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "no ground-truth transforms" in bad.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.h5"))


# --------------------------------------------------------------------------- compact form


def write_compact(path, glob=None, local=None, gl_ll=None, dtype=np.float64, form="transforms"):
    """A compact predictions file: transforms_global and/or transforms_local, form attribute."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if form is not None:
            f.attrs["form"] = form
        f.attrs["runtime_seconds"] = 0.25
        if glob is not None:
            f.create_dataset("transforms_global", data=np.asarray(glob, dtype))
        if local is not None:
            f.create_dataset("transforms_local", data=np.asarray(local, dtype))
        for name, arr in (gl_ll or {}).items():
            f.create_dataset(name, data=arr)


def noisy_prediction(scan, calib, seed=1):
    """(global, local) predicted transforms (N-1, 4, 4) float64: the truth, perturbed;
    local is consistent with global (derived as the compact spec derives it)."""
    gt = GroundTruth.from_scan(scan, calib)
    noise = pose6_to_matrix(
        np.random.default_rng(seed).normal(0, [0.01] * 3 + [0.5] * 3, (scan.n_frames - 1, 6))
    )
    glob = gt.global_ @ noise
    local = glob.copy()
    local[1:] = np.linalg.inv(glob[:-1]) @ glob[1:]
    return glob, local


def compact_and_dense_tables(data, tmp_path, which):
    """Score every scan from its compact file (holding ``which`` transforms) and from the
    dense file the kit writes from the same matrices."""
    for scan in data.scans:
        glob, local = noisy_prediction(scan, data.calibration)
        write_compact(
            tmp_path / "compact" / f"{scan.key}.h5",
            glob if "global" in which else None,
            local if "local" in which else None,
        )
        lm = scan.read_landmarks() if scan.has_landmarks else None
        write_predictions(
            tmp_path / "dense" / f"{scan.key}.h5", glob, local, data.calibration, scan.image_size, lm
        )
    assert check_predictions(tmp_path / "compact", data) == []
    compact = score_predictions(tmp_path / "compact", data, tmp_path / "sc").set_index("key")
    dense = score_predictions(tmp_path / "dense", data, tmp_path / "sd").set_index("key")
    return compact, dense


@pytest.mark.parametrize("which", [("global", "local"), ("global",), ("local",)])
def test_compact_scores_as_its_dense_file(which, dataset_factory, tmp_path):
    """Non-480x640 images (24 x 32 and 13 x 17), N = 2 and N = 9."""
    root = dataset_factory(tmp_path / "d1", "eval", ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 9)
    dataset_factory(
        tmp_path / "d2", "eval", ("051",), ("LH_Par_C_DtP",), 2, image_size=(13, 17), n_landmarks=1
    )
    for part in ("d2",):  # one data folder: the small scans join the first
        for sub in ("frames", "transfs", "landmarks"):
            for p in (tmp_path / part / sub).rglob("*.h5"):
                target = root / p.relative_to(tmp_path / part)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, target)
    from tusrec.data import write_dataset_keys

    write_dataset_keys(root, ["sub050__LH_Par_C_DtP", "sub050__RH_Per_L_PtD", "sub051__LH_Par_C_DtP"])
    data = open_data(root)
    assert {s.n_frames for s in data.scans} == {2, 9}
    compact, dense = compact_and_dense_tables(data, tmp_path, which)
    assert (compact["status"] == "ok").all() and (compact["form"] == "transforms").all()
    assert (dense["form"] == "ddf").all()
    for e in ("GPE", "GLE", "LPE", "LLE"):
        assert (compact[e] > 0.01).all()
        np.testing.assert_allclose(compact[e], dense[e], rtol=0, atol=1e-5)
        np.testing.assert_allclose(compact[f"{e}_identity"], dense[f"{e}_identity"], rtol=0, atol=1e-5)
    # The compact file is scored from its matrices (rigid_pixel_errors), the dense one from
    # its float32 fields: both within float32 rounding of the exact value (at 13 x 17 and
    # N = 2 the dense GPE is 3e-6 mm off a float64 computation, the compact one 2e-9 mm).


def test_compact_scores_as_its_dense_file_on_a_2025_rotation_scan(tmp_path):
    from tusrec.simulate.dataset import simulate_dataset

    simulate_dataset(
        tmp_path / "data", [60], "2025", "eval", frames=12, names=["LH_rotation"], image_size=(120, 160)
    )
    data = open_data(tmp_path / "data")
    compact, dense = compact_and_dense_tables(data, tmp_path, ("global",))
    key = data.keys[0]
    assert compact.loc[key, "status"] == "ok" and compact.loc[key, "GLE"] > 0.01
    for e in ("GPE", "GLE", "LPE", "LLE"):
        assert abs(compact.loc[key, e] - dense.loc[key, e]) < 1e-5, e


def test_compact_matches_a_per_pixel_float64_computation(data_root, tmp_path):
    data = open_data(data_root)
    scan = data.scans[0]
    n, h, w = scan.shape
    glob, local = noisy_prediction(scan, data.calibration, seed=3)
    write_compact(tmp_path / "c" / f"{scan.key}.h5", glob, local)
    row = score_predictions(tmp_path / "c", data, tmp_path / "s", keys=[scan.key]).iloc[0]
    # Independent: every pixel's predicted displacement (T @ T_scale @ p - T_scale @ p),
    # looped in float64, against the brute-force true fields of tests/reference.py.
    ts = data.calibration.T_scale

    def field(transforms):
        out = np.zeros((n - 1, 3, h * w))
        for i in range(n - 1):
            for y in range(1, h + 1):
                for x in range(1, w + 1):
                    p = np.array([x, y, 0.0, 1.0])
                    out[i, :, (y - 1) * w + (x - 1)] = (transforms[i] @ ts @ p)[:3] - (ts @ p)[:3]
        return out

    gp, lp = field(glob), field(local)
    lm = scan.read_landmarks()
    idx = (lm[:, 2] - 1) * w + (lm[:, 1] - 1)
    pred = {
        "GP": gp,
        "LP": lp,
        "GL": np.stack([gp[f - 1, :, k] for f, k in zip(lm[:, 0], idx, strict=True)], axis=1),
        "LL": np.stack([lp[f - 1, :, k] for f, k in zip(lm[:, 0], idx, strict=True)], axis=1),
    }
    expected, _ = reference_errors(scan, data.calibration, pred)
    for name in ("GPE", "GLE", "LPE", "LLE"):
        assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-5), name


def test_dense_arrays_win_over_the_transforms(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    scan = data.scans[0]
    with h5py.File(gt_dir / f"{scan.key}.h5", "r+") as f:  # GP/LP: the truth; transforms: not
        f.attrs["form"] = "transforms"
        f["transforms_global"][...] = np.eye(4)
        f["transforms_local"][...] = np.eye(4)
    row = score_predictions(gt_dir, data, tmp_path / "s").set_index("key").loc[scan.key]
    assert row["status"] == "ok" and row["form"] == "ddf" and row["GPE"] < 1e-4
    assert "form='transforms' but the file holds GP and LP: scored on its dense arrays" in row["message"]


BAD_COMPACT = {
    "no form": (dict(form=None), "no dataset 'GP'"),
    "no transforms": (dict(glob=None, local=None), "form='transforms' but no dataset transforms_global or"),
    "last row": (dict(last_row=True), "'transforms_global' frame 3: last row"),
    "nan": (dict(nan=True), "'transforms_local' has NaN or Inf values"),
    "singular": (dict(singular=True, local=None), "'transforms_global' frame 2 is not invertible"),
    "float16": (dict(dtype=np.float16), "'transforms_global' has dtype float16, expected float32 or float64"),
    "wrong shape": (dict(short=True), "'transforms_global' has shape"),
}


@pytest.mark.parametrize("kind", list(BAD_COMPACT))
def test_bad_compact_file_is_invalid(kind, data_root, tmp_path):
    data = open_data(data_root)
    scan = data.scans[0]
    glob, local = noisy_prediction(scan, data.calibration)
    options, expected = BAD_COMPACT[kind]
    options = dict(options)
    if options.pop("last_row", False):
        glob[2, 3, 0] = 1e-3
    if options.pop("nan", False):
        local[1, 0, 0] = np.nan
    if options.pop("singular", False):
        glob[1, :3, :3] = 0.0
    if options.pop("short", False):
        glob = glob[:-1]
    kwargs = {"glob": glob, "local": local, **options}
    path = tmp_path / "p" / f"{scan.key}.h5"
    write_compact(path, kwargs.pop("glob"), kwargs.pop("local"), **kwargs)
    problems = check_predictions(tmp_path / "p", data)
    assert [p.key for p in problems if p.key == scan.key] and any(
        expected in p.message for p in problems if p.key == scan.key
    ), problems
    row = score_predictions(tmp_path / "p", data, tmp_path / "s", keys=[scan.key]).iloc[0]
    assert row["status"] == "invalid" and expected in row["message"]


def test_comparison_kernel_makes_exactly_the_fields_pixel_ddfs_makes():
    """The scorer generates true (and compact predicted) rows from field_terms; the
    bit-identity of compact and dense scoring rests on their matching pixel_ddfs."""
    from tusrec.ddf import pixel_ddfs
    from tusrec.scoring.metrics import TILE_ROWS, field_terms

    rng = np.random.default_rng(5)
    transforms = pose6_to_matrix(rng.normal(0, [0.3] * 3 + [40.0] * 3, (4, 6)))
    for h, w in ((13, 17), (TILE_ROWS + 5, 40)):
        a, b = field_terms(transforms, CALIB.T_scale, h, w)
        rows = (a[:, :, None, :] + b[:, :, :, None]).reshape(4, 3, h * w)
        assert np.array_equal(rows, pixel_ddfs(transforms, CALIB.T_scale, h, w))


def test_check_names_stray_files_in_a_warning_and_ignores_them(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    (gt_dir / "notes.txt").write_text("=cmd\n")
    (gt_dir / "logs").mkdir()
    run = subprocess.run(
        [str(ROOT / "evaluate"), "check", str(gt_dir), "--data", str(data_root)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr  # ignored: scoring reads only <key>.h5 and the manifest
    warnings = sorted(line for line in run.stderr.splitlines() if line.startswith("warning: "))
    assert warnings == [
        f"warning: {gt_dir / 'logs'}: not a prediction file (<key>.h5) nor predictions.csv; ignored",
        f"warning: {gt_dir / 'notes.txt'}: not a prediction file (<key>.h5) nor predictions.csv; ignored",
    ]
    assert "are valid" in run.stdout


# The caller's last word: an exit handler registered before the command runs, so it runs
# after the command's own (atexit is last-in first-out), and says whether the scoring
# worker's server, the caller's child, is still there (alive or a zombie not yet reaped).
WAITS_FOR_ITS_WORKER = """
import atexit, sys
from pathlib import Path
server = []
atexit.register(lambda: print("left" if Path(f"/proc/{server[0]}").exists() else "reaped", flush=True))
from tusrec.cli import main
from tusrec.scoring import worker
code = main(sys.argv[1:])
server.append(worker.SERVER._proc.pid)
sys.exit(code)
"""


@pytest.mark.parametrize("command", ["check", "score"])
def test_evaluate_waits_for_its_scoring_worker(command, data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    args = ["evaluate", command, str(gt_dir), "--data", str(data_root)]
    args += ["--out", str(tmp_path / "s")] if command == "score" else []
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", WAITS_FOR_ITS_WORKER, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "reaped"

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
from tusrec.evaluate import metrics_for_scan
from tusrec.evaluate.metrics import pixel_errors, scan_length_mm
from tusrec.evaluate.score import check_predictions, score_predictions
from tusrec.geometry import default_calibration, pose6_to_matrix

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

"""The accuracy benchmark's per-frame errors, disagreement and rank correlation, and the
validation tool's per-DOF recovery, against independent computations."""

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.stats import spearmanr

from benchmarks.accuracy import (
    frame_point_errors,
    global_uncertainty_rho,
    member_disagreement,
    partial_spearman,
    uncertainty_rho,
)
from research.observable import in_plane, name_signs_tz
from research.validation import dofs, parse_combos, recovery
from tusrec.ddf import pixel_ddfs
from tusrec.geometry import default_calibration, frame_transforms


def test_per_frame_errors_are_the_dense_ddf_distances_of_each_frame(synth, rng):
    calib = default_calibration()
    a = frame_transforms(synth.random_tforms(rng, 9), calib)[1]
    b = frame_transforms(synth.random_tforms(rng, 9), calib)[1]
    h, w = 7, 11
    # The dense DDFs of every pixel (the evaluator's function), per frame.
    dense = pixel_ddfs(a, calib.T_scale, h, w, np.float64) - pixel_ddfs(b, calib.T_scale, h, w, np.float64)
    expected = np.linalg.norm(dense, axis=1).mean(axis=-1)  # (N,)
    np.testing.assert_allclose(frame_point_errors(a, b, calib.T_scale, (h, w), step=1), expected, rtol=1e-10)
    # The default grid samples every 8th pixel: close to the dense mean on a real image size.
    coarse = frame_point_errors(a, b, calib.T_scale, (48, 64))
    fine = frame_point_errors(a, b, calib.T_scale, (48, 64), step=1)
    np.testing.assert_allclose(coarse, fine, rtol=0.1)
    assert frame_point_errors(a, a, calib.T_scale, (h, w)).max() == 0


def test_disagreement_is_zero_for_equal_members_and_the_rms_of_their_distances(synth, rng):
    calib = default_calibration()
    a = frame_transforms(synth.random_tforms(rng, 6), calib)[1]
    b = frame_transforms(synth.random_tforms(rng, 6), calib)[1]
    size = (16, 24)
    assert member_disagreement([a, a, a], a, calib.T_scale, size).max() == 0
    da = frame_point_errors(a, b, calib.T_scale, size)
    np.testing.assert_allclose(member_disagreement([a, b], b, calib.T_scale, size), np.sqrt(da**2 / 2))


def test_uncertainty_rho_is_spearmans_over_all_transitions_and_per_scan():
    r = np.random.default_rng(0)
    e1, e2 = r.random(50), r.random(40)
    frames = [
        {"disagreement": e1**3, "error": e1},  # monotone: rho 1
        {"disagreement": -e2, "error": e2},  # reversed: rho -1
    ]
    out = uncertainty_rho(frames)
    assert out["transitions"] == 90
    assert out["per_scan_rho_median"] == pytest.approx(0.0)
    # Pooled: the ranks of all 90 pairs, computed here by hand (no ties).
    d = np.concatenate([e1**3, -e2])
    e = np.concatenate([e1, e2])
    rd, re = d.argsort().argsort(), e.argsort().argsort()
    expected = np.corrcoef(rd, re)[0, 1]
    assert out["spearman_rho"] == pytest.approx(expected, abs=1e-12)


def test_partial_spearman_is_the_rank_partial_correlation_of_the_precision_matrix():
    r = np.random.default_rng(3)
    z = r.random(200)
    x = z + 0.5 * r.random(200)
    y = z**2 + 0.5 * r.random(200) + 0.3 * x
    # Independent formula: the partial correlation from the inverse of the 3 x 3
    # correlation matrix of the ranks, -P_xy / sqrt(P_xx P_yy).
    ranks = np.stack([v.argsort().argsort() for v in (x, y, z)])
    P = np.linalg.inv(np.corrcoef(ranks))
    expected = -P[0, 1] / np.sqrt(P[0, 0] * P[1, 1])
    assert partial_spearman(x, y, z) == pytest.approx(expected, abs=1e-12)
    # x ranked exactly as z: nothing is left to correlate, so no rho (not rounding noise).
    assert np.isnan(partial_spearman(2 * z + 1, y, z))
    # x and y tied only through z: nothing left once z is held fixed.
    a, b = z + 0.001 * r.random(200), z + 0.001 * r.random(200)
    rho_ab = np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1]
    assert abs(partial_spearman(a, b, z)) < 0.3 < rho_ab


def test_global_uncertainty_separates_what_the_frames_place_already_ranks():
    r = np.random.default_rng(4)
    n = 200
    i = np.arange(1, n + 1)
    drift = np.abs(np.cumsum(r.normal(0.3, 1.0, n)))  # grows along the scan, with wiggles
    frames = [
        # grows with the place and knows nothing else of the error
        {"global_disagreement": i + r.normal(0, 5, n), "global_error": drift},
        # tracks the error's wiggles beyond its growth
        {"global_disagreement": drift + r.normal(0, 0.01, n), "global_error": drift},
    ]
    out = global_uncertainty_rho(frames)
    assert out["disagreement"]["frames"] == out["disagreement_given_frame_index"]["frames"] == 2 * n
    place = uncertainty_rho([{"u": i, "error": drift}] * 2, "u", "frames")
    assert out["frame_index"] == place
    given = [partial_spearman(f["global_disagreement"], f["global_error"], i) for f in frames]
    assert out["disagreement_given_frame_index"]["per_scan_rho_median"] == pytest.approx(np.median(given))
    raw = spearmanr(frames[0]["global_disagreement"], drift).statistic
    assert raw > 0.5 and abs(given[0]) < 0.2  # ranked the error only through the place
    assert given[1] > 0.9
    assert out["scans_disagreement_rises_every_frame"] == out["scans_error_rises_every_frame"] == 0
    rising = global_uncertainty_rho([{"global_disagreement": 3.0 * i, "global_error": drift}])
    assert rising["scans_disagreement_rises_every_frame"] == 1
    assert rising["disagreement_given_frame_index"]["per_scan_rho_median"] is None


def test_recovery_is_the_share_of_each_motion_component_predicted():
    r = np.random.default_rng(1)
    rotvec = r.normal(scale=0.01, size=(200, 3))
    t = r.normal(size=(200, 3))
    true = np.tile(np.eye(4), (200, 1, 1))
    true[:, :3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    true[:, :3, 3] = t
    d = dofs(true)
    np.testing.assert_allclose(d, np.concatenate([t, rotvec], axis=1), atol=1e-12)
    scale = np.array([1.0, 0.5, 0.0, -1.0, 0.25, 2.0])
    np.testing.assert_allclose(recovery(d * scale, d), scale, atol=1e-12)


def test_in_plane_part_keeps_rotation_about_z_and_the_in_plane_translation():
    r = np.random.default_rng(2)
    n = 50
    rz = r.uniform(-np.pi, np.pi, n)
    t = r.normal(size=(n, 3))
    # A rotation about z alone is its own in-plane part (up to tz).
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = Rotation.from_euler("z", rz[:, None]).as_matrix()
    T[:, :3, 3] = t
    np.testing.assert_allclose(in_plane(T, keep_tz=True), T, atol=1e-12)
    expected = T.copy()
    expected[:, 2, 3] = 0
    np.testing.assert_allclose(in_plane(T), expected, atol=1e-12)
    # Out-of-plane tilts (about x, then y) are removed; for a small tilt the in-plane angle
    # is the z angle of scipy's extrinsic x-y-z decomposition to second order in the tilt.
    tilt = r.normal(scale=1e-3, size=(n, 2))
    T[:, :3, :3] = Rotation.from_euler("xyz", np.column_stack([tilt, rz])).as_matrix()
    out = in_plane(T)
    angle = np.arctan2(out[:, 1, 0], out[:, 0, 0])
    z = Rotation.from_matrix(T[:, :3, :3]).as_euler("xyz")[:, 2]
    np.testing.assert_allclose(np.angle(np.exp(1j * (angle - z))), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, 2, :3], [[0, 0, 1]] * n, atol=1e-15)
    np.testing.assert_allclose(np.linalg.det(out[:, :3, :3]), 1, atol=1e-12)
    np.testing.assert_allclose(out[:, :2, 3], t[:, :2])
    # A pure tilt about x keeps no rotation at all.
    T[:, :3, :3] = Rotation.from_euler("x", r.uniform(-1, 1, (n, 1))).as_matrix()
    np.testing.assert_allclose(in_plane(T)[:, :3, :3], np.tile(np.eye(3), (n, 1, 1)), atol=1e-12)


@pytest.mark.parametrize(
    ("name", "signed"),
    [
        ("LH_Per_L_DtP", True),
        ("RH_Per_S_PtD", True),
        ("LH_Par_C_DtP", False),  # the sweep is in plane (tx); tz is wobble of either sign
        ("RH_Par_L_PtD", False),
        ("LH_rotation", False),  # tz is part of the rotation about the contact point
    ],
)
def test_the_name_signs_tz_of_perpendicular_sweeps_only(name, signed):
    from tusrec.data import ScanPattern

    assert name_signs_tz(ScanPattern.from_name(name)) is signed


def test_combos_name_members_as_printed_and_refuse_unknown_or_malformed_ones():
    names = ["weights/len2", "weights/len5", "baseline/pair0"]
    assert parse_combos(["hybrid=weights/len2, baseline/pair0", "two=weights/len5"], names) == {
        "hybrid": ["weights/len2", "baseline/pair0"],
        "two": ["weights/len5"],
    }
    with pytest.raises(SystemExit, match="no member named weights/len9"):
        parse_combos(["x=weights/len9,weights/len2"], names)
    for bad in ("weights/len2", "=weights/len2", "x="):
        with pytest.raises(SystemExit, match="expected LABEL=NAME"):
            parse_combos([bad], names)


def test_validation_tool_scores_what_predict_writes(dataset_factory, tmp_path):
    """research.validation end to end on a tiny data folder: each member's and the
    mean's GPE per scan are the dense ground-truth DDF distance of the GP that ./predict
    writes for the same members (the evaluator's formula), with either in-plane source
    of registration as well, and the identity's is the true GP's own size."""
    import json

    from research.validation import main
    from tests.test_predict import make_weights
    from tusrec.data import open_data
    from tusrec.model import ensemble
    from tusrec.predict.core import Predictor

    names = ("LH_Par_C_DtP", "RH_Per_L_PtD", "LH_rotation")
    root = dataset_factory(tmp_path / "data", "train", ("011", "003"), names, 12)
    weights = make_weights(tmp_path / "weights")
    out = tmp_path / "validation.json"
    args = [str(root), "--weights", str(weights), "--combo", "first=member0", "--registration"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scans"] == 3  # subject 011 only

    data = open_data(root)
    scans = [s for s in data.scans if s.subject == "011"]
    calib = data.calibration
    expected: dict[str, list[float]] = {"identity": []}
    runs = (
        ("mean-all", None, "network"),
        ("member0", ["member0"], "network"),
        ("member1", ["member1"], "network"),
        ("mean-all + registration", None, "registration"),
        ("mean-all + registration except sweep", None, "registration-except-sweep"),
    )
    for label, members, source in runs:
        predictor = Predictor(ensemble.load_members(weights, names=members), "cpu", in_plane=source)
        expected[label] = []
        for scan in scans:
            path = tmp_path / f"{label}-{scan.key}.h5"
            assert predictor.predict_scan(scan, calib, path)["status"] == "ok"
            true_global = frame_transforms(scan.read_tforms(), calib)[0]
            h, w = scan.image_size
            truth = pixel_ddfs(true_global, calib.T_scale, h, w, np.float64)
            with h5py.File(path) as f:
                gp = f["GP"][()].astype(np.float64)
            expected[label].append(np.linalg.norm(gp - truth, axis=1).mean())
            if label == "mean-all":
                expected["identity"].append(np.linalg.norm(truth, axis=1).mean())
    expected["first"] = expected["member0"]
    for label, values in expected.items():
        assert result["models"][label]["GPE"] == pytest.approx(np.mean(values), rel=1e-6), label


def test_accuracy_benchmark_scores_what_predict_writes_with_either_in_plane_source(dataset_factory, tmp_path):
    """benchmarks.accuracy.score_models with --in-plane registration: the ensemble's and
    each member's LPE are those of the transforms ./predict writes with that source (the
    member alone as ./predict would run it), the baseline is untouched, and the
    disagreement stays the members' networks' (as ./predict writes it)."""
    from benchmarks.accuracy import score_models
    from tests.test_predict import make_weights
    from tusrec.data import open_data
    from tusrec.model import ensemble
    from tusrec.model.error_model import load_error_model
    from tusrec.predict.core import Predictor
    from tusrec.scoring.metrics import transform_pixel_error

    names = ("LH_Par_C_DtP", "RH_Per_L_PtD", "LH_rotation")
    root = dataset_factory(tmp_path / "data", "eval", ("050",), names, 12)
    weights = make_weights(tmp_path / "weights")
    baseline = make_weights(tmp_path / "baseline", n=1, seed=7)
    rows, frames = {}, {}
    for source in ("network", "registration-except-sweep"):
        r, f = score_models(str(root), str(weights), str(baseline), source)
        rows[source] = {(row["model"], row["key"]): row for row in r}
        frames[source] = f
    data = open_data(root)
    for scan in data.scans:
        true_local = frame_transforms(scan.read_tforms(), data.calibration)[1]
        for label, members in (("ensemble", None), ("member0", ["member0"])):
            predictor = Predictor(
                ensemble.load_members(weights, names=members), "cpu", in_plane="registration-except-sweep"
            )
            path = tmp_path / f"{label}-{scan.key}.h5"
            assert predictor.predict_scan(scan, data.calibration, path)["status"] == "ok"
            with h5py.File(path) as f:
                local = f["transforms_local"][()]
            lpe = transform_pixel_error(local, true_local, data.calibration.T_scale, scan.image_size)
            assert rows["registration-except-sweep"][(label, scan.key)]["LPE"] == pytest.approx(lpe, rel=1e-6)
        for label in ("pair", "identity"):
            assert (
                rows["network"][(label, scan.key)]["LPE"]
                == rows["registration-except-sweep"][(label, scan.key)]["LPE"]
            )
    for a, b in zip(frames["network"], frames["registration-except-sweep"], strict=True):
        assert np.array_equal(a["disagreement"], b["disagreement"])
        assert not np.array_equal(a["error"], b["error"])
    # With an error model beside the members, the benchmark's expected error is the one
    # ./predict writes.
    from tusrec.train.error_model import fit_for_weights

    fit_for_weights(weights, [root], ["050"], log=lambda line: None)
    _, with_model = score_models(str(root), str(weights), str(baseline), "registration-except-sweep")
    predictor = Predictor(
        ensemble.load_members(weights),
        "cpu",
        in_plane="registration-except-sweep",
        error_model=load_error_model(weights),
    )
    for scan, frame in zip(data.scans, with_model, strict=True):
        assert frame["key"] == scan.key
        path = tmp_path / f"model-{scan.key}.h5"
        assert predictor.predict_scan(scan, data.calibration, path)["status"] == "ok"
        with h5py.File(path) as f:
            assert f.attrs["expected_error_source"] == "error model"
            # the file holds float32
            assert np.allclose(frame["expected_error"], f["expected_error_mm"][()], rtol=1e-6, atol=0)

"""The registered ensemble's expected error (tusrec.model.error_model): the decorrelation it
reads, its fit against independent least squares, its file, and the predictor and the
fitting command that use it."""

import json
import time

import h5py
import numpy as np
import pytest
import statsmodels.api as sm

from tusrec.cli import main
from tusrec.data import open_data
from tusrec.geometry import default_calibration, frame_transforms
from tusrec.model.ensemble import load_members
from tusrec.model.error_model import (
    ANY_KIND,
    ERROR_MODEL,
    ErrorModel,
    ErrorModelError,
    design,
    fit,
    load_error_model,
    scan_kind,
)
from tusrec.model.inputs import scan_code
from tusrec.model.registration import _decorrelation, pair_decorrelation, register_in_plane, square_frames
from tusrec.predict import core, predict_folder
from tusrec.scoring.metrics import frame_pixel_errors, transform_pixel_error
from tusrec.train.error_model import fit_for_weights

from .test_predict import make_weights
from .test_registration import rigid, scan_with_motion


def test_decorrelation_is_one_minus_pearsons_r(rng):
    a, b = rng.standard_normal(500), rng.standard_normal(500)
    b = 0.6 * a + b
    assert _decorrelation(a, b) == pytest.approx(1 - np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert _decorrelation(a, 3 * a + 7) == pytest.approx(0.0, abs=1e-12)  # gain and offset do not count
    assert _decorrelation(a, np.zeros(500)) == 1.0  # a blank frame: nothing alike


def test_pair_decorrelation_is_small_once_the_true_in_plane_motion_is_taken_out(rng):
    calib = default_calibration()
    motions = [rigid(1.5, 1.2, -0.8), rigid(-1.0, -1.5, 0.9), rigid(0.5, 2.0, 0.4)]
    square = square_frames([scan_with_motion(rng, motions, calib)], calib)
    truth = np.array(
        [[np.deg2rad(a), T[0, 3], T[1, 3]] for a, T in zip([1.5, -1.0, 0.5], motions, strict=True)]
    )
    d = pair_decorrelation(square, truth)
    assert d.shape == (3, 2)
    # what is left is resampling (fine speckle at 0.45 mm pixels) and 8-bit rounding
    assert (d[:, 1] < 0.15).all() and (d[:, 0] > 4 * d[:, 1]).all(), d
    # With no motion taken out, after equals before; the registered motion does as well as the truth.
    none = pair_decorrelation(square, np.zeros((3, 3)))
    assert np.array_equal(none[:, 0], none[:, 1]) and np.array_equal(none[:, 0], d[:, 0])
    start = np.stack(
        [rigid(a + 0.3, T[0, 3] + 0.3, T[1, 3] - 0.3) for a, T in zip([1.5, -1.0, 0.5], motions, strict=True)]
    )
    fitted, ok = register_in_plane(square, start)
    assert ok.all() and np.allclose(pair_decorrelation(square, fitted)[:, 1], d[:, 1], atol=0.02)
    assert np.array_equal(pair_decorrelation(square, truth, workers=2), d)
    blank = square_frames([np.zeros((3, 240, 320), np.uint8)], calib)
    assert np.array_equal(pair_decorrelation(blank, np.zeros((2, 3))), np.ones((2, 2)))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("LH_Par_C_DtP", "2024 Par"),
        ("RH_Per_S_PtD", "2024 Per"),
        ("LH_rotation", "2025 rotation"),
        ("scan", ANY_KIND),
        (None, ANY_KIND),
    ],
)
def test_scan_kinds(name, kind):
    assert scan_kind(name) == kind


def synthetic_samples(rng, coefficients, sigma, scans=12, n=80):
    """Scans of each kind whose log error is exactly log-linear in the design plus
    N(0, sigma^2) noise: (name, decorrelation (n, 2), error (n,))."""
    names = {"2024 Par": "LH_Par_C_DtP", "2024 Per": "RH_Per_L_PtD", "2025 rotation": "LH_rotation"}
    samples = []
    for kind, c in coefficients.items():
        for _ in range(scans):
            d = rng.uniform(0.01, 0.9, size=(n, 2))
            log_error = design(d) @ np.asarray(c) + sigma * rng.standard_normal(n)
            samples.append((names[kind], d, np.exp(log_error)))
    return samples


def test_fit_is_ordinary_least_squares_per_kind_and_its_expectation_is_the_lognormal_mean(rng):
    truth = {"2024 Par": [-1.0, 0.5, 0.2], "2024 Per": [-2.0, 0.1, 0.6], "2025 rotation": [0.3, 1.0, -0.3]}
    samples = synthetic_samples(rng, truth, 0.4)
    model = fit(samples)
    for kind in truth:
        group = [s for s in samples if scan_kind(s[0]) == kind]
        X = np.concatenate([design(d) for _, d, _ in group])
        y = np.log(np.concatenate([e for *_, e in group]))
        ols = sm.OLS(y, X).fit()  # an independent least squares
        assert np.allclose(model.coefficients[kind], ols.params, atol=1e-10)
        assert model.residual_variance[kind] == pytest.approx(ols.scale, rel=1e-10)
        assert model.transitions[kind] == len(y)
        assert np.allclose(model.coefficients[kind], truth[kind], atol=0.05)
    all_y = np.log(np.concatenate([e for *_, e in samples]))
    assert model.transitions[ANY_KIND] == len(all_y)
    # The expected error is the mean of the log-normal: over many draws at one design point
    # the errors average to it.
    d = np.full((1, 2), 0.3)
    c = np.asarray(truth["2025 rotation"])
    draws = np.exp(design(d) @ c + 0.4 * rng.standard_normal(200_000))
    assert model.expected_error_mm(d, "RH_rotation")[0] == pytest.approx(draws.mean(), rel=0.02)
    # An unknown name takes the fit on all scans.
    assert model.expected_error_mm(d, "scan")[0] == pytest.approx(
        np.exp(design(d) @ np.asarray(model.coefficients[ANY_KIND]) + model.residual_variance[ANY_KIND] / 2)[
            0
        ]
    )
    with pytest.raises(ValueError, match="too few"):
        fit([])
    with pytest.raises(ValueError, match="too few"):
        fit([("scan", np.full((5, 2), 0.5), np.ones(5))])


def test_a_kind_with_too_few_transitions_takes_the_fit_on_all(rng):
    samples = synthetic_samples(rng, {"2024 Par": [-1.0, 0.5, 0.2]}, 0.2)
    samples.append(("LH_rotation", rng.uniform(0.1, 0.5, (5, 2)), np.full(5, 0.2)))
    model = fit(samples)
    assert "2025 rotation" not in model.coefficients
    d = np.full((1, 2), 0.3)
    assert model.expected_error_mm(d, "LH_rotation") == pytest.approx(model.expected_error_mm(d, "scan"))


def test_the_file_round_trips_and_a_bad_one_gets_a_clear_error(rng, tmp_path):
    model = fit(synthetic_samples(rng, {"2024 Par": [-1.0, 0.5, 0.2]}, 0.2))
    model.members = [{"name": "a", "sha256": "0" * 64}]
    path = model.save(tmp_path / ERROR_MODEL)
    again = ErrorModel.load(path)
    assert again == model and again.fits([{"name": "a", "sha256": "0" * 64, "file": "a.pt"}])
    assert not again.fits([{"name": "a", "sha256": "1" * 64}])
    assert load_error_model(tmp_path / "nowhere") is None
    good = json.loads(path.read_text())
    bad = {
        "not json": "{",
        "no fallback kind": {**good, "coefficients": {"2024 Par": [0, 0, 0]}},
        "two coefficients": {**good, "coefficients": {**good["coefficients"], ANY_KIND: [0, 1]}},
        "negative variance": {**good, "residual_variance": {**good["residual_variance"], ANY_KIND: -1}},
        "not finite": {**good, "coefficients": {**good["coefficients"], ANY_KIND: [0, "nan", 1]}},
        "other features": {**good, "features": ["speed"]},
        "a list": [1, 2],
    }
    for why, content in bad.items():
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ErrorModelError, match=ERROR_MODEL):
            load_error_model(tmp_path)
        assert path.exists(), why  # nothing is lost


def test_frame_pixel_errors_average_to_the_lpe(rng):
    calib = default_calibration()
    true = np.stack([rigid(*rng.normal(0, 1, 6)) for _ in range(5)])
    pred = np.stack([rigid(*rng.normal(0, 1, 6)) for _ in range(5)])
    per_frame = frame_pixel_errors(pred, true, calib.T_scale, (48, 64))
    assert per_frame.shape == (5,)
    assert per_frame.mean() == pytest.approx(
        transform_pixel_error(pred, true, calib.T_scale, (48, 64)), rel=1e-9
    )
    # one frame by brute force over its pixels
    rows, cols = np.mgrid[1:49, 1:65]
    p = np.stack([cols.ravel(), rows.ravel(), np.zeros(rows.size), np.ones(rows.size)])
    diff = ((pred[2] - true[2]) @ calib.T_scale @ p)[:3]
    assert per_frame[2] == pytest.approx(np.linalg.norm(diff, axis=0).mean(), rel=1e-12)


@pytest.fixture
def held_out(dataset_factory, tmp_path):
    """Weights of 2 untrained members and a train-layout folder of 2 subjects they did not train on."""
    root = dataset_factory(tmp_path / "data", "train", ("011", "012"), ("LH_Par_C_DtP", "LH_rotation"), 20)
    return make_weights(tmp_path / "w"), root


def test_fitting_writes_a_model_the_predictor_then_uses(held_out, tmp_path):
    weights, root = held_out
    model, report = fit_for_weights(weights, [root], ["11", "012"], log=lambda line: None)
    assert (weights / ERROR_MODEL).is_file() and model.subjects == ["011", "012"]
    assert model.in_plane == core.DEFAULT_IN_PLANE and report["scans"] == 4
    assert set(report["held_out"]) == {"011", "012"}
    members = load_members(weights)
    assert model.fits([m.info for m in members])
    data = open_data(root)
    scan = data.scans[0]
    with_model = core.Predictor(members, "cpu", workers=1, error_model=model)
    heads = core.Predictor(members, "cpu", workers=1)
    network = core.Predictor(members, "cpu", workers=1, in_plane="network", error_model=model)
    assert network.error_model is None  # the model is for the registered ensemble only
    other_source = core.Predictor(members, "cpu", workers=1, in_plane="registration", error_model=model)
    assert other_source.error_model is None  # fitted under registration-except-sweep
    assert with_model.fingerprint != heads.fingerprint
    row = with_model.predict_scan(scan, data.calibration, tmp_path / "m.h5")
    assert row["status"] == "ok", row
    # The expected error written is the model's on this scan's registered decorrelation.
    pred = with_model.predict_local(with_model.read_preprocessed(scan), float("inf"), scan_code(scan.name))
    _, _, residual = with_model.register(scan, data.calibration, pred.local, float("inf"), decorrelation=True)
    with h5py.File(tmp_path / "m.h5") as f:
        assert f.attrs["expected_error_source"] == "error model"
        assert np.allclose(f["expected_error_mm"][()], model.expected_error_mm(residual, scan.name))
    # The members here have no error heads: without the model no expected error is written.
    heads.predict_scan(scan, data.calibration, tmp_path / "h.h5")
    with h5py.File(tmp_path / "h.h5") as f:
        assert "expected_error_mm" not in f and "expected_error_source" not in f.attrs
    # The folder's predictor finds the model beside the members; another ensemble ignores it.
    predict_folder(root, tmp_path / "pred", weights, "cpu", keys=[scan.key], log=lambda *a: None)
    with h5py.File(tmp_path / "pred" / f"{scan.key}.h5") as f:
        assert f.attrs["expected_error_source"] == "error model"
    other = make_weights(tmp_path / "other", seed=5)
    (other / ERROR_MODEL).write_text((weights / ERROR_MODEL).read_text())
    predict_folder(root, tmp_path / "pred2", other, "cpu", keys=[scan.key], log=lambda *a: None)
    with h5py.File(tmp_path / "pred2" / f"{scan.key}.h5") as f:
        assert "expected_error_source" not in f.attrs
    # The errors it was fitted on are the registered ensemble's, per frame.
    _, true_local = frame_transforms(scan.read_tforms(), data.calibration)
    assert np.all(
        np.isfinite(frame_pixel_errors(pred.local, true_local, data.calibration.T_scale, scan.image_size))
    )


def test_the_command_refuses_training_subjects_and_bad_folders(held_out, capsys):
    weights, root = held_out
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest["members"][0]["trained"] = {"train_subjects": ["011"]}
    (weights / "manifest.json").write_text(json.dumps(manifest))
    assert main(["error-model", str(weights), str(root), "--subjects", "011,012"]) == 2
    err = capsys.readouterr().err
    assert "trained on subject(s) ['011']" in err and "Traceback" not in err
    assert not (weights / ERROR_MODEL).exists()
    assert main(["error-model", str(weights), str(root), "--subjects", "013"]) == 2
    assert "no scans of subject(s) ['013']" in capsys.readouterr().err
    assert main(["error-model", str(weights), str(root / "missing"), "--subjects", "012"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a usage error: the option's choices exclude it
        main(["error-model", str(weights), str(root), "--subjects", "012", "--in-plane", "network"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--in-plane: invalid choice: 'network'" in err and "Traceback" not in err
    assert main(["error-model", str(weights), str(root), "--subjects", "012"]) == 0
    out = capsys.readouterr().out
    assert "saved in" in out and (weights / ERROR_MODEL).is_file()


def test_the_weights_listing_names_the_model_and_export_keeps_it_only_for_its_members(
    held_out, tmp_path, capsys
):
    weights, root = held_out
    fit_for_weights(weights, [root], ["011"], log=lambda line: None)
    assert main(["weights", str(weights)]) == 0
    assert "error_model.json: expected error from the registration residual, fitted on subject(s) 011" in (
        capsys.readouterr().out
    )
    assert main(["weights", str(weights), "--export", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / ERROR_MODEL).read_text() == (weights / ERROR_MODEL).read_text()
    assert main(["weights", str(weights), "--export", str(tmp_path / "one"), "--top", "1"]) == 0
    assert not (tmp_path / "one" / ERROR_MODEL).exists()  # fitted for 2 members, not for 1
    (tmp_path / "one" / ERROR_MODEL).write_text((weights / ERROR_MODEL).read_text())
    capsys.readouterr()
    assert main(["weights", str(tmp_path / "one")]) == 0
    assert "NOT for these members: not used" in capsys.readouterr().out
    (tmp_path / "one" / ERROR_MODEL).write_text("{")
    assert main(["weights", str(tmp_path / "one")]) == 0
    assert "error_model.json: unusable" in capsys.readouterr().out


def test_past_the_deadline_the_error_model_is_skipped_with_a_note(held_out, tmp_path):
    weights, root = held_out
    model, _ = fit_for_weights(weights, [root], ["011", "012"], log=lambda line: None)
    predictor = core.Predictor(load_members(weights), "cpu", workers=1, error_model=model)
    data = open_data(root)
    scan = data.scans[0]
    local = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
    late = time.perf_counter() - 1.0
    registered, note, residual = predictor.register(scan, data.calibration, local, late, decorrelation=True)
    assert residual is None and "no time left for the error model" in note
    assert np.allclose(registered, local)  # nothing registered either: the start is kept

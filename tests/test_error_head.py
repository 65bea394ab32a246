"""The error head (tusrec.train.error_head): a member's expected error per transition,
fitted after the pose. Its loss is checked against an independent computation, the pose
is shown untouched, and ./predict writes the ensemble's expected error."""

import json

import h5py
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from tusrec.data import open_data
from tusrec.model import ensemble
from tusrec.model.ensemble import combine, load_members, members_outputs, save_member
from tusrec.model.network import ModelConfig, TrackerlessNet, pose9_to_matrix
from tusrec.predict import predict_folder
from tusrec.scoring.score import check_predictions
from tusrec.train.config import AugmentConfig, TrainConfig, TrainError
from tusrec.train.error_head import exponential_nll, fit_members, with_error_head
from tusrec.train.loss import point_distance
from tusrec.train.trainer import train_member

from .tiny import TINY as TINY_BASE

TINY = ModelConfig(**{**TINY_BASE.to_dict(), "window": 8, "scan_conditioning": True})


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory, train_simulator):
    """Simulated training data: 3 subjects x 2 scans (a parallel and a perpendicular
    sweep) x 30 frames, 120 x 160 pixels."""
    return train_simulator(tmp_path_factory.mktemp("sim") / "train", 30, ["LH_Par_C_DtP", "RH_Per_L_PtD"])


@pytest.fixture(scope="module")
def trained(sim_root, tmp_path_factory):
    """A tiny member trained 6 steps (subjects 000, 001; 002 held out): its weights folder."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        model=TINY.to_dict(),
        clip_frames=8,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        steps=6,
        val_every=6,
        val_subjects=["002"],
        augment=AugmentConfig(intensity=False),
    )
    train_member(sim_root, out, cfg, "m0", progress=False, workers=0)
    return out / "weights"


def test_the_loss_is_minimised_by_the_mean_error():
    """For a pure translation t every image point moves by |t|, so the member's error on a
    transition is |t| (computed here without the loss code); the exponential NLL over a
    constant output s is smallest at s = log(mean |t|), found by scipy."""
    rng = np.random.default_rng(0)
    t = rng.normal(0, 1.5, size=(2, 5, 3))
    true = np.tile(np.eye(4), (2, 5, 1, 1))
    true[..., :3, 3] = t
    points = torch.tensor(rng.uniform(-20, 20, size=(2, 7, 4)))
    points[..., 2], points[..., 3] = 0.0, 1.0
    errors = np.linalg.norm(t, axis=-1)

    def loss(s: float) -> float:
        raw = torch.zeros(2, 5, 10, dtype=torch.float64)  # identity pose, constant head
        raw[..., 9] = s
        pred = pose9_to_matrix(raw[..., :9], ModelConfig())
        error = point_distance(pred, torch.tensor(true), points)  # what fit_error_head scores
        return float(exponential_nll(raw[..., 9], error))

    best = minimize_scalar(loss, bounds=(-5, 5), method="bounded", options={"xatol": 1e-8}).x
    # the mean of the logs (a median-like fit) would sit 0.2 away here
    assert best == pytest.approx(np.log(errors.mean()), abs=2e-3)
    assert abs(np.mean(np.log(errors)) - np.log(errors.mean())) > 0.05
    pred = pose9_to_matrix(torch.zeros(2, 5, 9, dtype=torch.float64), ModelConfig())
    error = point_distance(pred, torch.tensor(true), points)
    np.testing.assert_allclose(error.numpy(), errors, rtol=1e-9)  # the e it saw


def test_the_loss_reaches_only_the_head():
    """The head reads the pose features detached: its loss has no gradient in the pose."""
    torch.manual_seed(0)
    net = with_error_head(TrackerlessNet(TINY))
    video = torch.randn(2, 2, 6, 16, 20)
    tokens = net.encode_global(torch.randn(2, 4, 16, 20), torch.rand(2, 4))
    raw = net(video, torch.rand(2, 5), tokens, torch.tensor([[1.0, 1, 0, 0], [-1.0, 0, 1, 0]]))
    assert raw.shape == (2, 5, 10)
    true = torch.eye(4).repeat(2, 5, 1, 1)
    error = point_distance(pose9_to_matrix(raw[..., :9], net.cfg), true, torch.randn(2, 7, 4)).detach()
    exponential_nll(raw[..., 9], error).backward()
    for name, p in net.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == ("error_head" in name), name


def test_a_fitted_head_leaves_the_pose_exactly_as_it_was(trained, sim_root):
    before = json.loads((trained / "manifest.json").read_text())["members"][0]
    (plain,) = load_members(trained)
    entries = fit_members(trained, sim_root, steps=5, progress=False)
    (entry,) = entries
    (fitted,) = load_members(trained)  # checksums verified
    assert fitted.cfg.error_head and not plain.cfg.error_head
    assert entry["sha256"] != before["sha256"]
    assert entry["trained"] == before["trained"] and entry["metrics"] == before["metrics"]
    assert entry["error_head"]["subjects"] == ["000", "001"] == before["trained"]["train_subjects"]
    assert entry["error_head"]["steps"] == 5
    a, b = plain.net.state_dict(), fitted.net.state_dict()
    assert set(b) - set(a) and all("error_head" in k for k in set(b) - set(a))
    assert all(torch.equal(a[k], b[k]) for k in a)  # every pose weight as it was

    scan = open_data(sim_root).scans[0]
    from tusrec.model.inputs import read_scan_input, scan_code

    inputs = read_scan_input(scan, TINY.input_size, (1,)).network_input()
    (without,) = members_outputs([plain], inputs, code=scan_code(scan.name))
    (with_,) = members_outputs([fitted], inputs, code=scan_code(scan.name))
    assert without.expected_error_mm is None
    np.testing.assert_array_equal(with_.local, without.local)
    assert with_.expected_error_mm.shape == (scan.n_frames - 1,)
    assert np.isfinite(with_.expected_error_mm).all() and (with_.expected_error_mm > 0).all()

    # Refitting with the same seed gives the same head (the batches and the head's draw
    # are the seed's alone).
    again = fit_members(trained, sim_root, steps=5, progress=False)[0]
    assert again["error_head"]["last_quarter_loss"] == entry["error_head"]["last_quarter_loss"]


def test_batched_members_with_heads_equal_one_by_one(trained, tmp_path):
    (member,) = load_members(trained)
    for i in range(3):
        net = with_error_head(member.net)
        torch.manual_seed(i)
        for p in net.fusion.error_head.parameters():
            torch.nn.init.normal_(p, 0, 0.3)
        save_member(tmp_path / "w", f"h{i}", net, {"trained": "test"})
    members = load_members(tmp_path / "w")
    frames = np.random.default_rng(1).normal(size=(23, 2, 16, 20)).astype(np.float32)
    batched = members_outputs(members, frames)
    for m, out in zip(members, batched, strict=True):
        (alone,) = members_outputs([m], frames)
        np.testing.assert_allclose(out.local, alone.local, atol=1e-6)
        np.testing.assert_allclose(out.expected_error_mm, alone.expected_error_mm, rtol=1e-5)
    assert np.abs(batched[0].expected_error_mm - batched[1].expected_error_mm).max() > 1e-3


def test_the_ensembles_expected_error_is_the_members_mean_or_none():
    rng = np.random.default_rng(0)
    locals_ = [np.tile(np.eye(4), (5, 1, 1)) for _ in range(3)]
    e = [rng.uniform(0.1, 1, 5) for _ in range(3)]
    np.testing.assert_allclose(
        combine(locals_, expected_errors=e).expected_error_mm, (e[0] + e[1] + e[2]) / 3
    )
    assert combine(locals_, expected_errors=[e[0], None, e[2]]).expected_error_mm is None
    assert combine(locals_).expected_error_mm is None


def test_predict_writes_the_expected_error_and_check_accepts_it(trained, sim_root, dataset_factory, tmp_path):
    fit_members(trained, sim_root, steps=3, progress=False)
    data_root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP", "LH_rotation"), 9)
    for form in ("transforms", "ddf"):
        rows = predict_folder(data_root, tmp_path / form, trained, "cpu", log=lambda *a: None, form=form)
        assert [r["status"] for r in rows] == ["ok", "ok"]
        data = open_data(data_root)
        assert check_predictions(tmp_path / form, data) == []
        for scan in data.scans:
            with h5py.File(tmp_path / form / f"{scan.key}.h5") as f:
                e = f["expected_error_mm"][()]
                assert e.shape == (scan.n_frames - 1,) and (e > 0).all()


def test_a_wrongly_shaped_expected_error_is_reported(trained, sim_root, dataset_factory, tmp_path):
    fit_members(trained, sim_root, steps=3, progress=False)
    data_root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP",), 9)
    predict_folder(data_root, tmp_path / "p", trained, "cpu", log=lambda *a: None)
    data = open_data(data_root)
    with h5py.File(tmp_path / "p" / f"{data.scans[0].key}.h5", "a") as f:
        del f["expected_error_mm"]
        f["expected_error_mm"] = np.ones(3, np.float32)
    problems = check_predictions(tmp_path / "p", data)
    assert problems and "expected_error_mm" in " ".join(map(str, problems)), problems


def test_a_member_without_its_training_record_gets_a_clear_error(sim_root, tmp_path, capsys):
    from tusrec.cli import main

    torch.manual_seed(0)
    save_member(tmp_path / "w", "random", TrackerlessNet(TINY), {"trained": "random init (test)"})
    with pytest.raises(TrainError, match="no training record"):
        fit_members(tmp_path / "w", sim_root, progress=False)
    assert main(["error-head", str(tmp_path / "w"), str(sim_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: member 'random' has no training record") and err.count("\n") == 1


def test_a_member_whose_subjects_are_missing_gets_a_clear_error(trained, dataset_factory, tmp_path):
    other = dataset_factory(tmp_path / "other", "train", ("007",), ("LH_Par_C_DtP",), 12, (120, 160))
    with pytest.raises(TrainError, match=r"subjects \['000', '001'\] that .* does not have"):
        fit_members(trained, other, progress=False)
    assert ensemble.load_members(trained)  # the weights folder is as it was, still valid


def test_a_hostile_expected_error_is_reported_and_never_followed(
    trained, sim_root, dataset_factory, tmp_path
):
    """A submission's expected_error_mm goes through the read policy like every other
    dataset: links are not followed, groups, text and wrong shapes are named problems,
    and evaluate show neither follows a link nor draws a value it cannot use."""
    from tusrec.ddf import GroundTruth
    from tusrec.show.poses import ShowError, read_poses

    fit_members(trained, sim_root, steps=3, progress=False)
    data_root = dataset_factory(tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP",), 9)
    predict_folder(data_root, tmp_path / "p", trained, "cpu", log=lambda *a: None)
    data = open_data(data_root)
    scan = data.scans[0]
    path = tmp_path / "p" / f"{scan.key}.h5"
    (tmp_path / "elsewhere.h5").write_bytes(path.read_bytes())
    hostile = {
        "external link": lambda f: h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "expected_error_mm"),
        "soft link": lambda f: h5py.SoftLink("/transforms_local"),
        "group": None,
        "text": lambda f: np.array(["0.1"] * (scan.n_frames - 1), dtype=h5py.string_dtype()),
        "shape": lambda f: np.ones((scan.n_frames - 1, 2), np.float32),
    }
    gt = GroundTruth.from_scan(scan, data.calibration)
    for case, value in hostile.items():
        with h5py.File(path, "a") as f:
            del f["expected_error_mm"]
            if value is None:
                f.create_group("expected_error_mm")
            else:
                f["expected_error_mm"] = value(f)
        problems = " ".join(map(str, check_predictions(tmp_path / "p", data)))
        assert "expected_error_mm" in problems, (case, problems)
        if "link" in case:
            with pytest.raises(ShowError, match="'expected_error_mm' is a link"):
                read_poses(path, scan, gt)
        elif case == "group":
            with pytest.raises(ShowError, match="'expected_error_mm' is not a dataset"):
                read_poses(path, scan, gt)
        else:
            assert read_poses(path, scan, gt).expected_error is None, case

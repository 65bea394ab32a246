"""Training core: config, cache and subject split, label-preserving augmentations (checked
against independent computations from the tracker data), loss, validation metrics, and
a tiny end-to-end run (resume, saved member runs through the predictor)."""

import csv
import dataclasses

import numpy as np
import pytest
import torch

from tusrec.data import open_data
from tusrec.ddf import pixel_ddfs
from tusrec.geometry import compose_local, default_calibration, frame_transforms
from tusrec.model import ensemble
from tusrec.model.network import ModelConfig
from tusrec.train.cache import load_cache, normalise, split_subjects
from tusrec.train.config import AugmentConfig, LossConfig, TrainConfig
from tusrec.train.loss import clip_loss
from tusrec.train.sampler import (
    ClipSampler,
    loss_points,
    mirror_matrix,
    mirror_transforms,
    reverse_locals,
    skip_locals,
)
from tusrec.train.trainer import _to_torch, mean_pixel_error, train_member, training_step

from .tiny import TINY as TINY_BASE

TINY = ModelConfig(**{**TINY_BASE.to_dict(), "window": 8})
NO_AUGMENT = AugmentConfig(reverse=False, mirror=False, intensity=False, frame_skip=1)


def read_log(out) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        model=TINY.to_dict(),
        clip_frames=8,
        batch_size=4,
        lr=1e-2,
        warmup_steps=5,
        steps=40,
        val_every=20,
        val_subjects=["002"],
        augment=AugmentConfig(intensity=False),
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    """Simulated training data: 3 subjects x 1 scan x 40 frames, 120 x 160 pixels."""
    from tusrec.simulate.dataset import simulate_dataset

    root = tmp_path_factory.mktemp("sim") / "train"
    simulate_dataset(
        root,
        [0, 1, 2],
        layout="train",
        frames=40,
        names=["LH_Par_C_DtP"],
        image_size=(120, 160),
        landmarks=False,
    )
    return root


# --------------------------------------------------------------------------- config


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config(val_subjects=[3, "17"], loss=LossConfig(points=2.0, drift=0.5))
    assert cfg.val_subjects == ["003", "017"]
    cfg.save(tmp_path / "c.json")
    back = TrainConfig.load(tmp_path / "c.json")
    assert back == cfg
    assert back.model_config == TINY
    assert TrainConfig.from_json(TrainConfig(val_subjects=0.2).to_json()).val_subjects == 0.2


@pytest.mark.parametrize(
    "patch",
    [{"stepz": 3}, {"augment": {"flip": True}}, {"loss": {"angle": 1.0}}, {"model": {"depth": 3}}],
)
def test_config_unknown_keys_are_errors(patch):
    d = tiny_config().to_dict()
    for k, v in patch.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict(d)


# --------------------------------------------------------------------------- cache, split


def test_cache_matches_predictor_preprocessing_and_ground_truth(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 12, (24, 32))
    data = load_cache(root, (8, 10))
    scan = open_data(root).scans[0]
    frames = scan.read_frames()
    box = ensemble.field_of_view_box(frames[:32])
    np.testing.assert_array_equal(normalise(data.scans[0].frames), ensemble.preprocess(frames, box, (8, 10)))
    g, loc = frame_transforms(scan.read_tforms(), data.calib)
    np.testing.assert_array_equal(data.scans[0].local, loc)
    np.testing.assert_array_equal(data.scans[0].global_, g)


def test_subject_split_never_splits_a_subject(dataset_factory, tmp_path):
    subjects = ("000", "001", "002", "003", "004")
    root = dataset_factory(tmp_path / "d", "train", subjects, ("LH_rotation", "RH_rotation"), 3)
    data = load_cache(root, (8, 8))
    for spec in (0.4, 0.2, ["001", "4"], 0.0):
        train, val = split_subjects(data.subjects, spec, seed=3)
        assert set(train).isdisjoint(val) and sorted(train + val) == list(subjects)
        train_keys = {s.key for s in data.of_subjects(train)}
        val_keys = {s.key for s in data.of_subjects(val)}
        assert len(train_keys) + len(val_keys) == 10
        for scan in data.scans:  # every scan of a subject is on the side of its subject
            assert (scan.key in val_keys) == (scan.subject in val)
    assert len(split_subjects(data.subjects, 0.4)[1]) == 2
    assert split_subjects(data.subjects, ["1", "4"])[1] == ["001", "004"]
    with pytest.raises(ValueError, match="not in the data"):
        split_subjects(data.subjects, ["009"])


# --------------------------------------------------------------------------- augmentation labels


def test_reversal_labels_equal_the_reversed_scans_ground_truth(synth, rng):
    calib = default_calibration()
    tforms = synth.random_tforms(rng, 9)
    local = frame_transforms(tforms, calib)[1]
    expected = frame_transforms(tforms[::-1], calib)[1]
    np.testing.assert_allclose(reverse_locals(local), expected, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_frame_skip_labels_are_products_of_locals(synth, rng, k):
    calib = default_calibration()
    tforms = synth.random_tforms(rng, 10)
    local = frame_transforms(tforms, calib)[1]
    expected = frame_transforms(tforms[::k], calib)[1]
    got = skip_locals(local, k)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-8)
    np.testing.assert_allclose(got[0], np.linalg.multi_dot([np.eye(4), *local[:k]]), atol=1e-12)


@pytest.mark.parametrize("box", [(0, 6, 0, 9), (1, 5, 2, 7)])
def test_mirrored_transforms_give_the_mirrored_ddfs(synth, rng, box):
    """DDFs of F T F, read at the mirrored pixel, equal the original DDFs with x negated:
    mirroring the image columns inside the crop box mirrors the displacement field."""
    calib = default_calibration()
    h, w = 6, 9
    T = frame_transforms(synth.random_tforms(rng, 4), calib)[1]
    F = mirror_matrix(box, calib.pixel_spacing_mm[0])
    ddf = pixel_ddfs(T, calib.T_scale, h, w, np.float64).reshape(-1, 3, h, w)
    mirrored = pixel_ddfs(mirror_transforms(T, F), calib.T_scale, h, w, np.float64).reshape(-1, 3, h, w)
    left, right = box[2], box[3]
    cols = np.arange(left, right)  # 0-based columns of the crop; column j <-> left + right - 1 - j
    expected = ddf[:, :, :, left + right - 1 - cols] * np.array([-1.0, 1.0, 1.0])[None, :, None, None]
    np.testing.assert_allclose(mirrored[:, :, :, cols], expected, atol=1e-9)
    np.testing.assert_allclose(F @ F, np.eye(4), atol=1e-12)


def test_sampler_labels_and_positions_match_the_tracker_and_predictor(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 30, (24, 32))
    data = load_cache(root, (8, 10))
    tforms = open_data(root).scans[0].read_tforms()
    aug = AugmentConfig(reverse=True, mirror=False, intensity=False, frame_skip=3)
    sampler = ClipSampler(data.scans, 6, 4, aug, data.calib.T_scale, np.random.default_rng(0))
    seen = set()
    for _ in range(40):
        s = sampler.sample()
        idx = s["indices"]
        step = int(idx[1] - idx[0])
        seen.add(step)
        np.testing.assert_array_equal(np.diff(idx), step)  # every k-th frame, forwards or back
        expected = frame_transforms(tforms[idx], data.calib)[1]
        np.testing.assert_allclose(s["local"], expected, atol=1e-4)
        np.testing.assert_array_equal(s["frames"], data.scans[0].frames[idx])
        assert s["positions"].shape == (5,) and s["global_positions"].shape == (4,)
        assert np.all((s["global_positions"] >= 0) & (s["global_positions"] <= 1))
    assert seen >= {1, -1, 2, -2, 3, -3}
    # No augmentation: positions are exactly those the predictor gives a window there.
    plain = ClipSampler(data.scans, 6, 4, NO_AUGMENT, data.calib.T_scale, np.random.default_rng(1))
    s = plain.sample()
    start = int(s["indices"][0])
    np.testing.assert_array_equal(s["positions"], ensemble.scan_positions(np.arange(start, start + 5), 29))
    batch = plain.batch(3)
    assert batch["frames"].shape == (3, 6, 8, 10) and batch["local"].shape == (3, 5, 4, 4)


# --------------------------------------------------------------------------- loss, metrics


def test_loss_is_zero_when_perfect_and_the_offset_for_a_constant_translation(synth, rng):
    calib = default_calibration()
    true = torch.from_numpy(frame_transforms(synth.random_tforms(rng, 7), calib)[1]).float()[None]
    points = torch.from_numpy(loss_points((480, 640), *calib.pixel_spacing_mm))[None]
    terms = clip_loss(true.clone(), true, points, LossConfig(1.0, 1.0))
    assert float(terms["loss"]) < 1e-5
    v = torch.tensor([0.3, -1.2, 0.5])
    pred = true.clone()
    pred[..., :3, 3] += v
    terms = clip_loss(pred, true, points, LossConfig(1.0, 0.0))
    assert float(terms["points"]) == pytest.approx(float(v.norm()), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(v.norm()), rel=1e-5)


def test_mean_pixel_error_equals_the_dense_computation(synth, rng):
    calib = default_calibration()
    a = frame_transforms(synth.random_tforms(rng, 12), calib)[1]
    b = frame_transforms(synth.random_tforms(rng, 12), calib)[1]
    h, w = 7, 11
    dense = pixel_ddfs(a, calib.T_scale, h, w, np.float64) - pixel_ddfs(b, calib.T_scale, h, w, np.float64)
    expected = np.linalg.norm(dense, axis=1).mean()
    assert mean_pixel_error(a, b, calib.T_scale, (h, w), chunk=4) == pytest.approx(expected, rel=1e-12)
    g_a, g_b = compose_local(a), compose_local(b)
    assert mean_pixel_error(g_a, g_b, calib.T_scale, (h, w)) > 0


# --------------------------------------------------------------------------- tiny run


def test_tiny_training_run_learns_resumes_and_predicts(sim_root, tmp_path):
    from tusrec.predict.core import Predictor

    out = tmp_path / "run"
    # Augmentation off: its labels are tested above, and 40 steps of a tiny net learn the
    # typical forward motion cleanly (with reversals the direction must come from the images).
    cfg = tiny_config(augment=NO_AUGMENT)
    data = load_cache(sim_root, TINY.input_size)
    fixed = ClipSampler(data.scans, 8, 4, NO_AUGMENT, data.calib.T_scale, np.random.default_rng(5))
    batches = [_to_torch(fixed.batch(8), "cpu") for _ in range(3)]

    def fixed_loss(net) -> float:
        with torch.no_grad():
            return float(np.mean([training_step(net, b, cfg)["loss"].item() for b in batches]))

    from tusrec.model.network import TrackerlessNet

    start_loss = fixed_loss(TrackerlessNet(TINY))  # the untrained net predicts no motion
    entry = train_member(sim_root, out, cfg, "m0", progress=False)
    for name in ("last.pt", "best.pt", "log.csv", "config.json", "weights/manifest.json", "weights/m0.pt"):
        assert (out / name).is_file(), name
    assert TrainConfig.load(out / "config.json") == cfg
    rows = read_log(out)
    assert rows[-1]["step"] == "40" and rows[-1]["val_GPE"] != ""
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"]), rows
    assert entry["trained"]["val_subjects"] == ["002"] and entry["trained"]["train_subjects"] == [
        "000",
        "001",
    ]
    assert set(entry["metrics"]) == {"val_GPE", "val_LPE"}

    members = ensemble.load_members(out / "weights")
    end_loss = fixed_loss(members[0].net)
    assert end_loss < 0.7 * start_loss, (start_loss, end_loss)

    with pytest.raises(FileExistsError):
        train_member(sim_root, out, cfg, "m0", progress=False)
    train_member(sim_root, out, dataclasses.replace(cfg, steps=50), "m0", progress=False, resume=True)
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 50
    steps = [int(r["step"]) for r in read_log(out)]
    assert steps == sorted(steps) and steps[-1] == 50 and 40 in steps

    scan = open_data(sim_root).scans[0]
    row = Predictor(ensemble.load_members(out / "weights"), "cpu").predict_scan(
        scan, data.calib, tmp_path / "pred.h5"
    )
    assert row["status"] == "ok", row
    assert (tmp_path / "pred.h5").is_file()


def test_train_command_help(capsys):
    from tusrec.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    assert "--resume" in capsys.readouterr().out

"""Training core: config, cache and subject split, label-preserving augmentations (checked
against independent computations from the tracker data), loss, validation metrics, and
a tiny end-to-end run (resume, saved member runs through the predictor)."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tusrec.data import open_data
from tusrec.ddf import pixel_ddfs
from tusrec.geometry import compose_local, default_calibration, frame_transforms
from tusrec.model import ensemble, inputs
from tusrec.model.inputs import normalise_frames as normalise
from tusrec.model.network import ModelConfig
from tusrec.train.cache import load_cache, split_subjects
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
    box = inputs.field_of_view_box(frames[:32])
    np.testing.assert_array_equal(normalise(data.scans[0].frames), inputs.preprocess(frames, box, (8, 10)))
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
    np.testing.assert_array_equal(s["positions"], inputs.scan_positions(np.arange(start, start + 5), 29))
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
    fast = mean_pixel_error(a, b, calib.T_scale, (h, w), 4, np.float32)
    assert fast == pytest.approx(expected, rel=1e-6)
    g_a, g_b = compose_local(a), compose_local(b)
    assert mean_pixel_error(g_a, g_b, calib.T_scale, (h, w)) > 0


# --------------------------------------------------------------------------- tiny run


def test_tiny_training_run_learns_resumes_and_predicts(sim_root, tmp_path):
    from tusrec.predict.core import Predictor

    out = tmp_path / "run"
    # Augmentation off: its labels are tested above, and 40 steps of a tiny net learn the
    # typical forward motion cleanly (with reversals the direction must come from the images).
    cfg = tiny_config(augment=NO_AUGMENT)
    data = load_cache(sim_root, TINY.input_size, steps=(1,))
    fixed = ClipSampler(data.scans, 8, 4, NO_AUGMENT, data.calib.T_scale, np.random.default_rng(5), True)
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
    # What the member saw, counted from the data folder itself.
    by_subject = {
        sub: [s for s in open_data(sim_root).scans if s.subject == sub] for sub in ("000", "001", "002")
    }
    train = by_subject["000"] + by_subject["001"]
    assert entry["trained"]["train_scans"] == len(train)
    assert entry["trained"]["train_frames"] == sum(s.n_frames for s in train)
    assert entry["trained"]["val_frames"] == sum(s.n_frames for s in by_subject["002"])
    assert set(entry["metrics"]) == {"val_GPE", "val_LPE", "val_identity_GPE"}
    # The identity's GPE on the validation subject, from the raw tforms and dense pixel
    # displacements (the identity predicts none, so its error is the true field's size).
    calib = open_data(sim_root).calibration
    identity = []
    for scan in by_subject["002"]:
        global_ = frame_transforms(scan.read_tforms(), calib)[0]
        h, w = scan.image_size
        ddf = pixel_ddfs(global_, calib.T_scale, h, w, dtype=np.float64)  # (N-1, 3, h*w)
        identity.append(np.linalg.norm(ddf, axis=1).mean())
    assert entry["metrics"]["val_identity_GPE"] == pytest.approx(np.mean(identity), rel=1e-9)
    assert entry["metrics"]["val_GPE"] < entry["metrics"]["val_identity_GPE"]

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


# --------------------------------------------------------------------------- decorrelation channel


def _corrcoef_blocks(a: np.ndarray, b: np.ndarray, by: int, bx: int) -> np.ndarray:
    """Independent reference: np.corrcoef of each (by, bx) block; 0 for a flat block."""
    h, w = a.shape[0] // by, a.shape[1] // bx
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            x = a[i * by : (i + 1) * by, j * bx : (j + 1) * bx].ravel().astype(np.float64)
            y = b[i * by : (i + 1) * by, j * bx : (j + 1) * bx].ravel().astype(np.float64)
            if x.var() > inputs.NCC_MIN_VARIANCE and y.var() > inputs.NCC_MIN_VARIANCE:
                out[i, j] = np.corrcoef(x, y)[0, 1]
    return out


def test_block_ncc_is_the_correlation_coefficient_of_each_block(rng):
    a = rng.integers(0, 255, (40, 48)).astype(np.float32)
    b = 0.6 * a + 0.4 * rng.integers(0, 255, (40, 48)).astype(np.float32)
    b[:10, :12] = 7.0  # a flat block: no defined correlation -> 0
    got = inputs.block_ncc(a, b, (8, 8))  # blocks of 5 x 6 pixels
    np.testing.assert_allclose(got, _corrcoef_blocks(a, b, 5, 6), atol=2e-4)
    assert got[0, 0] == 0.0 and 0.5 < np.median(got) < 0.95
    np.testing.assert_allclose(inputs.block_ncc(a, a, (8, 8)), 1.0, atol=1e-4)
    enc = inputs.encode_ncc(np.array([-1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(enc, [0, 128, 255])
    np.testing.assert_allclose(
        inputs.normalise_ncc(enc) * inputs.NCC_STD + inputs.NCC_MEAN, [-1, 0.0039, 1], atol=1e-3
    )


def test_scan_input_maps_are_each_frames_ncc_whatever_the_chunking(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 9, (24, 32))
    scan = open_data(root).scans[0]
    frames = scan.read_frames()
    whole = inputs.read_scan_input(scan, (8, 10), (1, 2), chunk=100)
    chunked = inputs.read_scan_input(scan, (8, 10), (1, 2), chunk=2)
    box = whole.box
    crop = frames[:, box[0] : box[1], box[2] : box[3]].astype(np.float32)
    for k in (1, 2):
        np.testing.assert_array_equal(whole.decorrelation[k], chunked.decorrelation[k])
        for j in range(9):
            partner = j - k if j >= k else j + k  # the scan's first frames pair forwards
            expected = inputs.encode_ncc(inputs.block_ncc(crop[partner], crop[j], (8, 10)))
            np.testing.assert_array_equal(whole.decorrelation[k][j], expected)
    x = whole.network_input()
    assert x.shape == (9, 2, 8, 10)
    np.testing.assert_array_equal(x[:, 0], inputs.preprocess(frames, box, (8, 10)))


def test_cache_on_disk_is_reused_and_rebuilt_when_the_scan_changes(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 6, (24, 32))
    first = load_cache(root, (8, 10), steps=(1,), cache_dir=tmp_path / "cache")
    (meta,) = list((tmp_path / "cache").glob("*.json"))
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert [p.name.split(".", 1)[1] for p in cached] == ["frames.npy", "ncc1.npy"]
    memory = load_cache(root, (8, 10), steps=(1,))
    again = load_cache(root, (8, 10), steps=(1,), cache_dir=tmp_path / "cache")
    for a in (first, again):  # the same arrays as read without a cache, memory-mapped
        assert isinstance(a.scans[0].frames, np.memmap) and not a.scans[0].frames.flags.writeable
        np.testing.assert_array_equal(a.scans[0].decorrelation[1], memory.scans[0].decorrelation[1])
        np.testing.assert_array_equal(a.scans[0].frames, memory.scans[0].frames)
        assert a.scans[0].box == memory.scans[0].box
    stamps = [p.stat().st_mtime_ns for p in [meta, *cached]]
    again = load_cache(root, (8, 10), steps=(1,), cache_dir=tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in [meta, *cached]] == stamps  # read back, not rewritten
    scan_file = open_data(root).scans[0].frames_path
    os_time = scan_file.stat().st_mtime_ns + 10**9
    import os

    os.utime(scan_file, ns=(os_time, os_time))
    load_cache(root, (8, 10), steps=(1,), cache_dir=tmp_path / "cache")
    assert meta.stat().st_mtime_ns != stamps[0]  # the source changed: rebuilt
    # A partial entry (its .json missing, as after a crash mid-write) is rebuilt too.
    meta.unlink()
    rebuilt = load_cache(root, (8, 10), steps=(1,), cache_dir=tmp_path / "cache")
    assert meta.is_file()
    np.testing.assert_array_equal(rebuilt.scans[0].frames, memory.scans[0].frames)


def test_a_mapped_scan_pickles_as_its_file_not_its_contents(dataset_factory, tmp_path):
    """What a spawned data-loader worker or DDP process receives: the file name, mapped again."""
    import pickle

    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 40, (24, 32))
    scan = load_cache(root, (16, 20), steps=(1, 2), cache_dir=tmp_path / "cache").scans[0]
    blob = pickle.dumps(scan)
    assert len(blob) < scan.frames.nbytes  # not the 40 x 16 x 20 frames
    back = pickle.loads(blob)
    assert isinstance(back.frames, np.memmap) and isinstance(back.decorrelation[2], np.memmap)
    np.testing.assert_array_equal(back.frames, scan.frames)
    np.testing.assert_array_equal(back.decorrelation[2], scan.decorrelation[2])
    np.testing.assert_array_equal(back.local, scan.local)
    plain = load_cache(root, (16, 20), steps=(1,)).scans[0]  # in memory: pickled whole
    assert len(pickle.dumps(plain)) > plain.frames.nbytes


@pytest.mark.parametrize("channels, cached", [(1, (1, 2)), (2, (1, 2, 4))])
def test_sampler_decorrelation_is_the_ncc_of_each_clip_pair(dataset_factory, tmp_path, channels, cached):
    """Under reversal, frame skip and mirroring, each clip frame's map j is the NCC of that
    frame with the frame j before it in the augmented scan (the view's first j frames
    with the frame j after them), computed from the raw frames."""
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_rotation",), 20, (24, 32))
    data = load_cache(root, (8, 10), steps=cached)
    scan = data.scans[0]
    raw = open_data(root).scans[0].read_frames()
    box = scan.box
    crop = raw[:, box[0] : box[1], box[2] : box[3]].astype(np.float32)
    aug = AugmentConfig(reverse=True, mirror=True, intensity=False, frame_skip=2)
    sampler = ClipSampler(data.scans, 5, 4, aug, data.calib.T_scale, np.random.default_rng(2), channels)
    mirrored_seen, skips = False, set()
    for _ in range(30):
        s = sampler.sample()
        assert s["decorrelation"].shape == (channels, 5, 8, 10)
        idx = s["indices"]
        step = int(idx[1] - idx[0])  # negative in a reversed view
        skips.add(abs(step))
        mirrored = not np.array_equal(s["frames"], scan.frames[idx])
        mirrored_seen |= mirrored
        for c in range(channels):
            back = (c + 1) * step  # frame step c + 1 of the view, in original frames
            for p, j in enumerate(idx):
                # the view holds every frame of j's residue: j - back is in it when in the scan
                partner = j - back if 0 <= j - back < 20 else j + back
                expected = inputs.encode_ncc(inputs.block_ncc(crop[partner], crop[j], (8, 10)))
                got = s["decorrelation"][c, p]
                np.testing.assert_array_equal(got, expected[:, ::-1] if mirrored else expected)
    assert mirrored_seen and skips == {1, 2}
    short = load_cache(root, (8, 10), steps=cached[:-1])
    with pytest.raises(ValueError, match="lack decorrelation maps"):
        ClipSampler(short.scans, 5, 4, aug, data.calib.T_scale, np.random.default_rng(0), channels)


def test_cache_steps_cover_every_decorrelation_step_at_every_frame_skip():
    """A view of every k-th frame pairs frames j * k apart for channel j."""
    from tusrec.train.trainer import cache_steps

    def steps(m, skip, decorrelation=True):
        model = {**TINY.to_dict(), "decorrelation": decorrelation, "decorrelation_steps": m}
        return cache_steps(tiny_config(model=model, augment=AugmentConfig(frame_skip=skip)))

    assert steps(1, 2) == (1, 2)  # the shipped recipe's cache, unchanged
    assert steps(2, 2) == (1, 2, 4)
    assert steps(2, 3) == (1, 2, 3, 4, 6)
    assert steps(3, 1) == (1, 2, 3)
    assert steps(2, 2, decorrelation=False) == ()


def test_network_input_puts_frame_step_k_in_channel_k():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (6, 4, 5), dtype=np.uint8)
    maps = {k: rng.integers(0, 255, (6, 4, 5), dtype=np.uint8) for k in (1, 2, 4)}
    scan = inputs.ScanInput(frames, maps, (0, 4, 0, 5))
    x = scan.network_input(2)
    assert x.shape == (6, 3, 4, 5)
    np.testing.assert_array_equal(x[:, 0], normalise(frames))
    for k in (1, 2):
        np.testing.assert_array_equal(x[:, k], inputs.normalise_ncc(maps[k]))
    assert scan.network_input(4).shape[1] == 3  # step 3 missing: channel 3 would not be step 3
    assert scan.network_input().shape[1] == 2 and scan.network_input(0).shape[1] == 1
    # A manifest written before the option (the shipped members'): one step.
    old = {k: v for k, v in TINY.to_dict().items() if k != "decorrelation_steps"}
    assert ModelConfig.from_dict(old) == TINY and TINY.frame_steps == (1,)
    with pytest.raises(ValueError, match="decorrelation_steps must be at least 1"):
        ModelConfig.from_dict({**TINY.to_dict(), "decorrelation_steps": 0})


def test_a_multistep_member_trains_and_the_predictor_gives_it_its_training_inputs(sim_root, tmp_path):
    """A member with decorrelation_steps 2: the inputs its validation and error head read
    from the training cache are exactly what the predictor reads from the scan file, and
    beside a one-step member each predicts as it does alone."""
    from tusrec.predict.core import Predictor

    model = {**TINY.to_dict(), "decorrelation_steps": 2}
    cfg = tiny_config(model=model, steps=4, val_every=2)
    entry = train_member(sim_root, tmp_path / "m", cfg, "two", progress=False, cache_dir=tmp_path / "c")
    assert np.isfinite(entry["metrics"]["val_GPE"])
    (two,) = ensemble.load_members(tmp_path / "m" / "weights")
    assert two.cfg.frame_steps == (1, 2) and two.cfg.in_channels == 3
    data = load_cache(sim_root, TINY.input_size, steps=(1, 2, 4), cache_dir=tmp_path / "c")
    cached = {s.key: s for s in data.scans}
    torch.manual_seed(4)
    one = ensemble.Member("one", ensemble.build_network(TINY))
    for scan in open_data(sim_root).scans[:2]:
        x = Predictor([one, two], "cpu").read_preprocessed(scan)
        np.testing.assert_array_equal(x, cached[scan.key].normalised(2))
        assert Predictor([one], "cpu").read_preprocessed(scan).shape[1] == 2
        both = ensemble.members_outputs([one, two], x)
        np.testing.assert_array_equal(both[1].local, ensemble.members_outputs([two], x)[0].local)
        np.testing.assert_array_equal(both[0].local, ensemble.members_outputs([one], x[:, :2])[0].local)
        with pytest.raises(
            ValueError, match=r"needs 3 input channels \(frames \+ decorrelation of frame steps"
        ):
            ensemble.members_outputs([two], x[:, :2])


# --------------------------------------------------------------------------- pair baseline, reproduction


def test_pair_baseline_trains_and_predicts_through_the_same_code(sim_root, tmp_path):
    from tusrec.model.network import PairNet
    from tusrec.predict.core import Predictor

    pair = ModelConfig(**{**TINY.to_dict(), "architecture": "pair"})
    cfg = tiny_config(model=pair.to_dict(), steps=6, val_every=3)
    entry = train_member(sim_root, tmp_path / "pair", cfg, "pair", progress=False)
    assert entry["config"]["architecture"] == "pair" and set(entry["metrics"]) == {
        "val_GPE",
        "val_LPE",
        "val_identity_GPE",
    }
    (member,) = ensemble.load_members(tmp_path / "pair" / "weights")
    assert isinstance(member.net, PairNet)
    # Each transition from its own pair: one frame pair alone gives the same transform.
    x = np.random.default_rng(0).normal(size=(7, 2, *TINY.input_size)).astype(np.float32)
    whole = ensemble.members_outputs([member], x)[0].local
    np.testing.assert_allclose(ensemble.members_outputs([member], x[2:4])[0].local[0], whole[2], atol=1e-5)
    scan = open_data(sim_root).scans[0]
    row = Predictor([member], "cpu").predict_scan(scan, open_data(sim_root).calibration, tmp_path / "p.h5")
    assert row["status"] == "ok", row


def test_a_member_is_reproduced_from_the_config_in_its_manifest(sim_root, tmp_path):
    from tusrec.cli import main

    cfg = tiny_config(steps=4, val_every=2, seed=7)
    train_member(sim_root, tmp_path / "a", cfg, "m7", progress=False)
    manifest = tmp_path / "a" / "weights" / "manifest.json"
    assert TrainConfig.load(manifest, member="m7") == cfg
    code = main(
        ["train", str(sim_root), "--out", str(tmp_path / "b"), "--config", str(manifest), "--name", "m7"]
    )
    assert code == 0
    a = torch.load(tmp_path / "a" / "weights" / "m7.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "weights" / "m7.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="no member 'nope'"):
        TrainConfig.load(manifest, member="nope")


def test_a_continued_member_is_replayed_through_each_schedule(sim_root, tmp_path):
    """--resume --steps N restarts the cosine schedule: the manifest records each total,
    and retraining from the manifest replays them, giving the same weights."""
    from tusrec.cli import main

    cfg = tiny_config(steps=4, val_every=2, seed=3, lr=1e-3, warmup_steps=1)
    train_member(sim_root, tmp_path / "a", cfg, "m3", progress=False)
    entry = train_member(
        sim_root, tmp_path / "a", dataclasses.replace(cfg, steps=8), "m3", False, resume=True
    )
    manifest = tmp_path / "a" / "weights" / "manifest.json"
    # The best checkpoint's schedule: both totals if it came from the continuation.
    assert entry["trained"]["schedule"] == ([4, 8] if entry["trained"]["steps"] > 4 else [4])
    assert TrainConfig.schedule(manifest, "m3") == entry["trained"]["schedule"]
    assert (
        main(
            ["train", str(sim_root), "--out", str(tmp_path / "b"), "--config", str(manifest), "--name", "m3"]
        )
        == 0
    )
    a = torch.load(tmp_path / "a" / "weights" / "m3.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "weights" / "m3.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # One run of 8 steps is another schedule, hence other weights at step 8.
    once = train_member(sim_root, tmp_path / "c", dataclasses.replace(cfg, steps=8), "m3", progress=False)
    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    last_c = torch.load(tmp_path / "c" / "last.pt", weights_only=False)["model"]
    assert not all(torch.equal(last_a[k], last_c[k]) for k in last_a)
    assert once["trained"]["schedule"] == [8]
    assert TrainConfig.schedule(tmp_path / "a" / "config.json", "m3") == []


def test_train_members_share_one_cache_and_one_manifest(sim_root, tmp_path):
    from tusrec.train.trainer import train_ensemble

    cfg = tiny_config(steps=3, val_every=3)
    entries = train_ensemble(sim_root, tmp_path / "ens", cfg, members=2, name="m", progress=False)
    assert [e["name"] for e in entries] == ["m0", "m1"]
    assert [e["trained"]["config"]["seed"] for e in entries] == [cfg.seed, cfg.seed + 1]
    assert [m.name for m in ensemble.load_members(tmp_path / "ens" / "weights")] == ["m0", "m1"]
    assert (tmp_path / "ens" / "m1" / "log.csv").is_file()


def test_weights_command_lists_members_and_picks_the_best(sim_root, tmp_path, capsys):
    from tusrec.cli import main
    from tusrec.train.trainer import train_ensemble

    train_ensemble(sim_root, tmp_path / "ens", tiny_config(steps=2, val_every=2), 2, "m", progress=False)
    weights = tmp_path / "ens" / "weights"
    assert main(["weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "2 member(s), checksums verified" in out and "m0: dual-encoder, seed 0, 2 steps" in out
    # 2 steps from the identity start: still on the plateau, and said so.
    assert out.count("of the identity's GPE: ON THE NO-MOTION PLATEAU") == 2, out
    assert main(["weights", str(weights), "--best"]) == 0
    gpe = {m.name: m.info["metrics"]["val_GPE"] for m in ensemble.load_members(weights)}
    assert capsys.readouterr().out.strip() == min(gpe, key=gpe.get)
    assert main(["weights", str(tmp_path / "none")]) == 2

    # --export --top N: the N lowest validation GPEs, files and entries unchanged.
    best = min(gpe, key=gpe.get)
    shipped = tmp_path / "shipped"
    assert main(["weights", str(weights), "--export", str(shipped), "--top", "1"]) == 0
    assert [m.name for m in ensemble.load_members(shipped)] == [best]
    assert (shipped / f"{best}.pt").read_bytes() == (weights / f"{best}.pt").read_bytes()
    source = json.loads((weights / "manifest.json").read_text())["members"]
    assert json.loads((shipped / "manifest.json").read_text())["members"] == [
        e for e in source if e["name"] == best
    ]
    # Bad requests are clear errors that write nothing.
    before = (shipped / "manifest.json").read_bytes()
    assert main(["weights", str(weights), "--export", str(shipped)]) == 2
    assert (shipped / "manifest.json").read_bytes() == before
    assert main(["weights", str(weights), "--export", str(tmp_path / "three"), "--top", "3"]) == 2
    assert main(["weights", str(weights), "--top", "1"]) == 2
    assert not (tmp_path / "three").exists()
    assert "exists" in capsys.readouterr().err


# --------------------------------------------------------------------------- data loading, DDP, amp


def test_config_without_sampling_is_a_sequential_one():
    """Configs written before per-clip sampling replay as trained (sequentially)."""
    d = tiny_config().to_dict()
    assert d["sampling"] == "per-clip" and TrainConfig.from_dict(d).sampling == "per-clip"
    del d["sampling"]
    assert TrainConfig.from_dict(d).sampling == "sequential"
    root = Path(__file__).resolve().parents[1]
    assert TrainConfig.load(root / "configs" / "member.json").sampling == "per-clip"
    assert TrainConfig.load(root / "configs" / "pair.json").sampling == "per-clip"
    # The shipped members were trained after per-clip sampling existed: their entries say so,
    # so a replay from the manifest draws the same clips.
    for manifest in ("weights", "baseline"):
        shipped = json.loads((root / manifest / "manifest.json").read_text())["members"]
        assert {m["trained"]["config"].get("sampling") for m in shipped} == {"per-clip"}
    with pytest.raises(ValueError, match="sampling"):
        tiny_config(sampling="random")


def test_the_shipped_members_are_bagged_by_subject_as_the_model_card_says():
    """Each shipped member validates on 011 and 2 of the sweep subjects 000-007 and trains
    on none of them; every sweep subject is left out by exactly one member; the benchmark's
    (100, 101) and the demo's (050) subjects are in no member's data."""
    root = Path(__file__).resolve().parents[1]
    members = json.loads((root / "weights" / "manifest.json").read_text())["members"]
    assert len(members) == 4
    left_out = []
    for m in members:
        t = m["trained"]
        train, val = set(t["train_subjects"]), set(t["val_subjects"])
        assert set(t["config"]["val_subjects"]) == val and not train & val
        assert "011" in val and len(val) == 3
        left_out += sorted(val - {"011"})
        assert train | val == {f"{s:03d}" for s in range(12)}
        assert m["config"]["scan_conditioning"] and t["steps"] == 1500
    assert sorted(left_out) == [f"{s:03d}" for s in range(8)]


def test_per_clip_batches_are_the_same_from_any_worker_or_process_split(sim_root):
    from tusrec.train.sampler import StepBatches, clip_rng

    data = load_cache(sim_root, TINY.input_size, steps=(1, 2))
    aug = AugmentConfig()
    sampler = ClipSampler(data.scans, 8, 4, aug, data.calib.T_scale, np.random.default_rng(0), True)

    def loaded(workers: int, clips: range) -> list[dict]:
        loader = torch.utils.data.DataLoader(
            StepBatches(sampler, 7, 6, clips), batch_size=None, sampler=range(2, 6), num_workers=workers
        )
        return [{k: v.numpy() for k, v in b.items()} for b in loader]

    inline, two = loaded(0, range(4)), loaded(2, range(4))
    halves = [loaded(0, range(0, 2)), loaded(2, range(2, 4))]
    assert len(inline) == 4
    for s, batch in enumerate(inline):
        for key in batch:
            np.testing.assert_array_equal(batch[key], two[s][key])
            np.testing.assert_array_equal(batch[key], np.concatenate([halves[0][s][key], halves[1][s][key]]))
        # clip i of step s is the clip clip_rng(7, s, i) draws, whoever draws it
        one = sampler.sample(rng=clip_rng(7, s + 2, 3))
        np.testing.assert_array_equal(batch["indices"][3], one["indices"])
    assert not np.array_equal(inline[0]["indices"], inline[1]["indices"])  # steps differ


def test_training_does_not_depend_on_the_number_of_workers(sim_root, tmp_path):
    cfg = tiny_config(steps=4, val_every=2)
    data = load_cache(sim_root, TINY.input_size, steps=(1, 2))
    for workers in (0, 2):
        train_member(sim_root, tmp_path / f"w{workers}", cfg, "m", progress=False, data=data, workers=workers)
    a = torch.load(tmp_path / "w0" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "w2" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "w0") == [
        {**r, "seconds": read_log(tmp_path / "w0")[i]["seconds"]}
        for i, r in enumerate(read_log(tmp_path / "w2"))
    ]


def test_a_run_stopped_by_its_time_limit_resumes_to_the_uninterrupted_result(sim_root, tmp_path):
    cfg = tiny_config(steps=5, val_every=5)
    data = load_cache(sim_root, TINY.input_size, steps=(1, 2))
    train_member(sim_root, tmp_path / "whole", cfg, "m", progress=False, data=data, workers=0)
    entry = train_member(sim_root, tmp_path / "cut", cfg, "m", False, data=data, workers=0, max_seconds=0.0)
    assert entry["trained"]["steps"] == 1  # stopped after one step, validated and saved there
    assert [r["step"] for r in read_log(tmp_path / "cut")] == ["1"] and read_log(tmp_path / "cut")[0][
        "val_GPE"
    ]
    train_member(sim_root, tmp_path / "cut", cfg, "m", False, resume=True, data=data, workers=0)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_precision_keeps_transforms_and_losses_in_float32(sim_root):
    """The autocast path (bf16 on a GPU; here on the CPU, which supports bf16 autocast too):
    the network runs in bf16, its output is turned into transforms and losses in float32,
    close to the float32 run's."""
    from tusrec.model.network import TrackerlessNet
    from tusrec.train.trainer import amp_dtype

    assert amp_dtype(torch.device("cpu")) is None  # the CPU path stays float32
    data = load_cache(sim_root, TINY.input_size, steps=(1,))
    sampler = ClipSampler(data.scans, 8, 4, NO_AUGMENT, data.calib.T_scale, np.random.default_rng(0), True)
    batch = _to_torch(sampler.batch(4), "cpu")
    torch.manual_seed(0)
    net = TrackerlessNet(TINY)
    with torch.no_grad():
        for p in net.fusion.head[-1].parameters():  # a net that predicts motion, not the identity
            p.normal_(0, 0.3)
    full = training_step(net, batch, tiny_config())
    half = training_step(net, batch, tiny_config(), amp=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in half.values())
    assert half["loss"].item() == pytest.approx(full["loss"].item(), rel=0.05)
    assert half["loss"].item() != full["loss"].item()  # the network did run in bf16
    half["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_child(rank: int, world: int, port: int, args: tuple, kw: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    code = 0
    try:
        train_member(*args, **kw)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)


def run_ddp(world: int, *args, **kw) -> None:
    """train_member(*args, **kw) in ``world`` processes joined by gloo, as torchrun would
    start them (the same environment variables), forked so that torch is imported once."""
    import multiprocessing

    port = _free_port()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_ddp_child, args=(r, world, port, args, kw)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * world


def _weights(path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_ddp_on_two_processes_matches_one_process_and_resumes_exactly(sim_root, tmp_path):
    """2 gloo processes, each drawing half of every global batch, against 1 process with the
    whole batch. Tolerance: the per-step losses (global-batch means) agree to 1e-6 relative,
    float32 rounding of the sums taken in another order (a mean of 2 half-batch means; DDP's
    gradient all-reduce). The weights after 6 steps agree to 1e-3 absolute, a tenth of the
    learning rate: AdamW's normalised update turns those rounding differences, in gradients
    near zero, into parameter differences of up to a fraction of lr a step (measured 1.3e-4).
    Resumed mid-run under DDP, the run is the uninterrupted one bit for bit."""
    cfg = tiny_config(steps=6, val_every=3)
    run_ddp(2, sim_root, tmp_path / "ddp", cfg, "m", progress=False, workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_member(sim_root, tmp_path / "one", cfg, "m", progress=False, workers=0)
    finally:
        torch.set_num_threads(threads)
    ddp_log, one_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [r["step"] for r in ddp_log] == ["3", "6"]  # one log, written once (rank 0)
    for a, b in zip(ddp_log, one_log, strict=True):
        for key in ("loss", "points_mm", "drift_mm", "val_GPE", "val_LPE"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key
    a, b = _weights(tmp_path / "ddp" / "last.pt"), _weights(tmp_path / "one" / "last.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    assert (tmp_path / "ddp" / "weights" / "m.pt").is_file() and (tmp_path / "ddp" / "cache").is_dir()

    # Stop after 3 steps, resume to 6 (still under DDP): the uninterrupted run exactly.
    run_ddp(2, sim_root, tmp_path / "cut", dataclasses.replace(cfg, steps=3), "m", progress=False, workers=0)
    run_ddp(2, sim_root, tmp_path / "cut", cfg, "m", progress=False, workers=0, resume=True)
    c = _weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_torchrun_starts_ddp_from_the_command_line(sim_root, tmp_path):
    """The documented entry point: torchrun --nproc-per-node 2 -m tusrec train (gloo here)."""
    import subprocess
    import sys

    cfg = tiny_config(steps=3, val_every=3)
    cfg.save(tmp_path / "tiny.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tusrec", "train", str(sim_root), "--out", str(tmp_path / "run"), "--config"]
    cmd += [str(tmp_path / "tiny.json"), "--name", "m", "--workers", "0", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train: member m saved") == 1  # rank 0 alone reports and writes
    run_ddp(2, sim_root, tmp_path / "forked", cfg, "m", progress=False, workers=0)
    a, b = _weights(tmp_path / "run" / "last.pt"), _weights(tmp_path / "forked" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A global batch that does not split over the processes is an error saying what to use.
    from tusrec.train.config import TrainError
    from tusrec.train.distributed import Context

    assert Context(1, 2).clips(4) == range(2, 4) and Context(0, 3).clips(6) == range(0, 2)
    with pytest.raises(TrainError, match="batch_size 3 does not split over 2 processes"):
        Context(0, 2).clips(3)


def test_a_missing_validation_subject_is_a_one_line_error_saying_what_to_pass(sim_root, tmp_path, capsys):
    """The README's first training command on data without the config's subject 011."""
    from tusrec.cli import main

    cfg = tiny_config(steps=2, val_every=2, val_subjects=["011"])
    cfg.save(tmp_path / "c.json")
    args = ["train", str(sim_root), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "['011'] are not in the data" in err and "--val-subjects 002" in err
    assert not (tmp_path / "run").exists()  # found before anything was read or written
    assert main([*args, "--val-subjects", "002", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "run" / "weights" / "manifest.json").read_text())["members"][0]["trained"][
        "val_subjects"
    ] == ["002"]
    frac = [*args[:3], str(tmp_path / "frac"), *args[4:], "--val-subjects", "0.34", "--workers", "0"]
    assert main(frac) == 0


# --------------------------------------------------------------------------- scan-name conditioning


def test_scan_code_gives_the_direction_negated_when_reversed_and_zeros_for_unknown_names():
    from tusrec.model.inputs import scan_code

    np.testing.assert_array_equal(scan_code("LH_Per_L_DtP"), [1, 0, 1, 0])
    np.testing.assert_array_equal(scan_code("RH_Par_S_PtD"), [-1, 1, 0, 0])
    # A reversed distal-to-proximal sweep is a proximal-to-distal one.
    np.testing.assert_array_equal(scan_code("LH_Per_L_DtP", reverse=True), scan_code("LH_Per_L_PtD"))
    np.testing.assert_array_equal(scan_code("RH_rotation"), [0, 0, 0, 1])
    np.testing.assert_array_equal(scan_code("RH_rotation", reverse=True), [0, 0, 0, 1])
    for unknown in ("scan_07", "LH_Per_L_Dtp", "", None):
        np.testing.assert_array_equal(scan_code(unknown), np.zeros(4))


@pytest.mark.parametrize("architecture", ["dual-encoder", "pair"])
def test_the_direction_flips_exactly_the_signed_part_of_the_output(architecture):
    from tusrec.model.network import build_network

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.to_dict(), "architecture": architecture, "scan_conditioning": True})
    net = build_network(cfg)
    for p in net.parameters():  # the heads start at zero (identity motion): make them not
        torch.nn.init.normal_(p, std=0.3)
    video = torch.randn(2, 2, 6, *cfg.input_size)
    positions, tokens = (
        torch.rand(2, 5),
        net.encode_global(torch.randn(2, 4, *cfg.input_size), torch.rand(2, 4)),
    )
    code = torch.tensor([[1.0, 0, 1, 0], [1.0, 1, 0, 0]])
    flipped = code * torch.tensor([-1.0, 1, 1, 1])
    unknown = torch.zeros(2, 4)
    with torch.no_grad():
        plus, minus, zero = (
            net(video, positions, tokens, c) for c in (code, flipped, code * torch.tensor([0.0, 1, 1, 1]))
        )
        # raw = a(kind) + d * b(kind): the direction-free part is the mean of +d and -d.
        torch.testing.assert_close(zero, (plus + minus) / 2, atol=1e-5, rtol=1e-5)
        assert (plus - minus).abs().max() > 1e-3
        torch.testing.assert_close(
            net(video, positions, tokens, None), net(video, positions, tokens, unknown)
        )
        assert (net(video, positions, tokens, unknown) - zero).abs().max() > 1e-4  # the kind matters
    # Without conditioning the network is the one of old: same parameters, code ignored.
    plain = build_network(ModelConfig(**{**TINY.to_dict(), "architecture": architecture}))
    assert set(plain.state_dict()) < set(net.state_dict())
    assert not any(k.startswith(("kind", "signed_head", "fusion.signed_head")) for k in plain.state_dict())


def test_sampler_codes_follow_the_view_and_leave_the_clips_of_an_unconditioned_run(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "d", "train", ("000",), ("LH_Per_L_DtP",), 30, (24, 32))
    data = load_cache(root, (8, 10))
    aug = AugmentConfig(reverse=True, mirror=True, intensity=False, frame_skip=2)
    ts = data.calib.T_scale
    plain = ClipSampler(data.scans, 6, 4, aug, ts, np.random.default_rng(0))
    coded = ClipSampler(data.scans, 6, 4, aug, ts, np.random.default_rng(0), conditioning=True)
    directions = set()
    for i in range(40):
        a = plain.sample(rng=np.random.default_rng(i))
        b = coded.sample(rng=np.random.default_rng(i))
        assert "code" not in a
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        backwards = b["indices"][1] < b["indices"][0]
        np.testing.assert_array_equal(b["code"], [-1 if backwards else 1, 0, 1, 0])
        directions.add(int(b["code"][0]))
    assert directions == {-1, 1}
    forget = dataclasses.replace(aug, forget_name=1.0)
    gone = ClipSampler(data.scans, 6, 4, forget, ts, np.random.default_rng(0), conditioning=True)
    np.testing.assert_array_equal(gone.sample()["code"], np.zeros(4))
    with pytest.raises(ValueError, match="forget_name"):
        tiny_config(augment=AugmentConfig(forget_name=1.5))


def test_a_conditioned_member_trains_and_the_predictor_gives_it_the_scan_name(
    sim_root, tmp_path, monkeypatch
):
    from tusrec.model.inputs import scan_code
    from tusrec.predict.core import Predictor

    cond = ModelConfig(**{**TINY.to_dict(), "scan_conditioning": True})
    cfg = tiny_config(
        model=cond.to_dict(), steps=4, val_every=2, augment=AugmentConfig(intensity=False, forget_name=0.3)
    )
    entry = train_member(sim_root, tmp_path / "c", cfg, "c", progress=False)
    assert entry["config"]["scan_conditioning"] and set(entry["metrics"]) == {
        "val_GPE",
        "val_LPE",
        "val_identity_GPE",
    }
    (member,) = ensemble.load_members(tmp_path / "c" / "weights")
    data = open_data(sim_root)
    scan = data.scans[0]
    seen = []
    real = ensemble.members_outputs

    def spy(members, inputs, device="cpu", deadline=None, autocast=False, code=None):
        seen.append(None if code is None else np.asarray(code))
        return real(members, inputs, device, deadline, autocast, code)

    monkeypatch.setattr("tusrec.predict.core.members_outputs", spy)
    row = Predictor([member], "cpu").predict_scan(scan, data.calibration, tmp_path / "p.h5")
    assert row["status"] == "ok", row
    np.testing.assert_array_equal(seen[0], scan_code(scan.name))


def test_image_only_configs_are_the_shipped_ones_without_the_name_code():
    """configs/member.json and pair.json (the shipped recipe) condition on the scan name;
    the *-image-only.json configs (the recipe before, for the ablation) differ in that alone."""
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("member", "pair"):
        plain = TrainConfig.load(root / f"{name}-image-only.json").to_dict()
        cond = TrainConfig.load(root / f"{name}.json").to_dict()
        assert cond["model"].pop("scan_conditioning") and not plain["model"].pop("scan_conditioning")
        assert cond["augment"].pop("forget_name") == 0.2 and plain["augment"].pop("forget_name") == 0.0
        # Mirroring negates tx (F T F), the sweep of the parallel scans, whose sign the
        # name's direction gives: a mirrored clip would contradict its own code.
        assert plain["augment"].pop("mirror") and not cond["augment"].pop("mirror")
        assert cond == plain


def test_the_lever_configs_are_the_shipped_recipe_with_one_change():
    """The Levers table's configs differ from configs/member.json in what it says alone."""
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = TrainConfig.load(root / "member.json").to_dict()

    def changes(name):
        lever = TrainConfig.load(root / name).to_dict()
        out = {f"model.{k}": v for k, v in lever.pop("model").items() if v != shipped["model"][k]}
        return out | {k: v for k, v in lever.items() if k != "model" and v != shipped[k]}

    assert changes("member-multistep.json") == {"model.decorrelation_steps": 2}
    assert changes("member-curriculum.json") == {"clip_curriculum": [[0, 8], [300, 16], [600, 24]]}
    assert changes("member-rotation.json") == {"rotation_share": 0.4}
    assert changes("member-large.json") == {"model.input_size": [128, 160]}


def test_a_checkpoint_from_before_the_conditioning_key_resumes_and_another_model_does_not(sim_root, tmp_path):
    from tusrec.train.config import TrainError

    cfg = tiny_config(steps=2, val_every=2)
    train_member(sim_root, tmp_path / "r", cfg, "m", progress=False)
    last = tmp_path / "r" / "last.pt"
    checkpoint = torch.load(last, weights_only=False)
    del checkpoint["config"]["model"]["scan_conditioning"]  # as written before the key existed
    torch.save(checkpoint, last)
    train_member(
        sim_root, tmp_path / "r", dataclasses.replace(cfg, steps=3), "m", progress=False, resume=True
    )
    assert torch.load(last, weights_only=False)["step"] == 3
    other = ModelConfig(**{**TINY.to_dict(), "scan_conditioning": True})
    with pytest.raises(TrainError, match="model configuration differs"):
        train_member(
            sim_root, tmp_path / "r", dataclasses.replace(cfg, model=other.to_dict()), "m", resume=True
        )


def test_rotation_share_draws_that_share_of_clips_from_rotation_scans(dataset_factory, tmp_path):
    names = ("LH_rotation", "LH_Per_L_DtP", "RH_Par_C_PtD")
    root = dataset_factory(tmp_path / "d", "train", ("000", "001"), names, 12, (16, 20))
    data = load_cache(root, (8, 10))
    ts = data.calib.T_scale
    by_length = ClipSampler(data.scans, 6, 4, NO_AUGMENT, ts, np.random.default_rng(0))
    shared = ClipSampler(data.scans, 6, 4, NO_AUGMENT, ts, np.random.default_rng(0), rotation_share=0.5)
    rotation = np.array(["rotation" in s.key for s in shared.scans])
    assert rotation.sum() == 2 and (~rotation).sum() == 4
    # Equal lengths: by length every scan is drawn 1/6 of the time, so rotation scans 1/3;
    # with the share they are drawn 1/2 of the time together, each group by length.
    np.testing.assert_allclose(by_length.p, np.full(6, 1 / 6))
    np.testing.assert_allclose(shared.p[rotation], [0.25, 0.25])
    np.testing.assert_allclose(shared.p[~rotation], [0.125] * 4)
    r = np.random.default_rng(3)
    drawn = r.choice(len(shared.scans), size=20000, p=shared.p)
    assert abs(rotation[drawn].mean() - 0.5) < 0.02
    # The default (0) keeps every earlier member's draws; a share needs both kinds of scan.
    assert TrainConfig().rotation_share == 0.0
    with pytest.raises(ValueError, match="rotation_share"):
        tiny_config(rotation_share=1.0)
    sweeps = [s for s in data.scans if "rotation" not in s.key]
    with pytest.raises(ValueError, match="needs both rotation scans and sweeps"):
        ClipSampler(sweeps, 6, 4, NO_AUGMENT, ts, np.random.default_rng(0), rotation_share=0.3)


def test_a_clip_curriculum_draws_each_steps_clips_at_its_length(sim_root, tmp_path):
    """Short clips first: the clips of step s have clip_frames_at(s) frames, each the first
    frames of the clip the same generator draws at full length only where the lengths
    agree; with no curriculum every step has clip_frames (the shipped members' runs)."""
    from tusrec.train.sampler import StepBatches, clip_rng

    cfg = tiny_config(clip_curriculum=[[0, 4], [3, 6]], clip_frames=5, steps=6, val_every=3)
    assert [cfg.clip_frames_at(s) for s in range(6)] == [4, 4, 4, 6, 6, 6] and cfg.longest_clip == 6
    plain = tiny_config(clip_frames=5)
    assert [plain.clip_frames_at(s) for s in (0, 10**6)] == [5, 5] and plain.longest_clip == 5
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    data = load_cache(sim_root, TINY.input_size, steps=(1, 2))
    sampler = ClipSampler(data.scans, 6, 4, cfg.augment, data.calib.T_scale, np.random.default_rng(0), True)
    batches = StepBatches(sampler, 7, 6, range(3), cfg.clip_frames_at)
    for step in range(6):
        b = batches[step]
        t = cfg.clip_frames_at(step)
        assert b["frames"].shape[:2] == (3, t) and b["local"].shape[:2] == (3, t - 1)
        assert b["decorrelation"].shape[:3] == (3, 1, t)
        one = sampler.sample(rng=clip_rng(7, step, 1), frames=t)  # the same clip, drawn alone
        np.testing.assert_array_equal(one["frames"], b["frames"][1])
    assert StepBatches(sampler, 7, 6, range(3))[0]["frames"].shape[1] == 6
    with pytest.raises(ValueError, match="a clip has 2 to clip_frames=6 frames, not 7"):
        sampler.sample(frames=7)
    entry = train_member(sim_root, tmp_path / "c", cfg, "curr", progress=False)
    assert np.isfinite(entry["metrics"]["val_GPE"])
    checkpoint = torch.load(tmp_path / "c" / "last.pt", weights_only=False)
    assert checkpoint["frames_seen"] == 4 * (3 * 4 + 3 * 6)
    for bad, match in [
        ([[1, 4]], "start at 0"),
        ([[0, 4], [0, 6]], "increase"),
        ([[0, 1]], "at least 2 frames"),
    ]:
        with pytest.raises(ValueError, match=match):
            tiny_config(clip_curriculum=bad)
    with pytest.raises(ValueError, match="needs 'per-clip' sampling"):
        tiny_config(clip_curriculum=[[0, 4]], sampling="sequential")
    # A view's first frames pair with the frame m after them: clips of 2m frames at least.
    two_steps = {**TINY.to_dict(), "decorrelation_steps": 2}
    tiny_config(model=two_steps, clip_curriculum=[[0, 4], [2, 8]])
    with pytest.raises(ValueError, match="clips of 3 frames are too short for 2 decorrelation steps"):
        tiny_config(model=two_steps, clip_curriculum=[[0, 3], [2, 8]])


def test_members_validated_on_different_subjects_rank_by_their_share_of_the_identity():
    from tusrec.model.manifest import validation_key

    # b has the higher GPE but on harder subjects: it left more of the identity's error behind.
    a = {"name": "a", "metrics": {"val_GPE": 10.0, "val_identity_GPE": 40.0}}  # 0.25
    b = {"name": "b", "metrics": {"val_GPE": 12.0, "val_identity_GPE": 80.0}}  # 0.15
    assert min([a, b], key=validation_key([a, b]))["name"] == "b"
    # Without the identity's GPE for every member, the raw GPE (ratios would mix scales).
    old = {"name": "old", "metrics": {"val_GPE": 11.0}}
    assert [e["name"] for e in sorted([a, b, old], key=validation_key([a, b, old]))] == ["a", "old", "b"]
    assert validation_key([])({"name": "none"}) == float("inf")


def test_weights_best_and_export_use_the_share_of_the_identity(sim_root, tmp_path, capsys):
    from tusrec.cli import main
    from tusrec.train.trainer import train_ensemble

    train_ensemble(sim_root, tmp_path / "ens", tiny_config(steps=2, val_every=2), 2, "m", progress=False)
    weights = tmp_path / "ens" / "weights"
    path = weights / "manifest.json"
    manifest = json.loads(path.read_text())
    # As if m1 had validated on subjects twice as hard, with a slightly higher GPE.
    m0, m1 = manifest["members"]
    m1["metrics"]["val_GPE"] = m0["metrics"]["val_GPE"] * 1.1
    m1["metrics"]["val_identity_GPE"] = m0["metrics"]["val_identity_GPE"] * 2
    path.write_text(json.dumps(manifest))
    assert main(["weights", str(weights), "--best"]) == 0
    assert capsys.readouterr().out.strip() == "m1"
    assert main(["weights", str(weights), "--export", str(tmp_path / "top"), "--top", "1"]) == 0
    assert [m["name"] for m in json.loads((tmp_path / "top" / "manifest.json").read_text())["members"]] == [
        "m1"
    ]

"""The predictor's mechanics with small randomly initialised members: output format,
time limit, resume, bad input, weights, ensemble combination. (Accuracy is the
training issue's business.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from tusrec.data import TusrecDataError, open_data
from tusrec.model import ensemble
from tusrec.model.ensemble import WeightsError, combine, load_members, save_member, windows
from tusrec.model.network import ModelConfig, TrackerlessNet
from tusrec.predict import core, predict_folder
from tusrec.scoring.score import check_predictions, score_predictions

from .tiny import TINY

ROOT = Path(__file__).resolve().parents[1]


def make_weights(folder, n=2, seed=0):
    for i in range(n):
        torch.manual_seed(seed + i)
        net = TrackerlessNet(TINY)
        # Random small outputs instead of the identity start, so members disagree.
        for p in net.fusion.head[-1].parameters():
            torch.nn.init.normal_(p, 0, 0.05)
        save_member(folder, f"member{i}", net, {"trained": "random init (test)"})
    return folder


@pytest.fixture
def weights(tmp_path):
    return make_weights(tmp_path / "weights")


@pytest.fixture
def data_root(dataset_factory, tmp_path):
    return dataset_factory(
        tmp_path / "data", "eval", ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD", "LH_rotation"), 11
    )


def test_predictions_are_valid_and_scorable(data_root, weights, tmp_path):
    rows = predict_folder(data_root, tmp_path / "pred", weights, "cpu", log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["members"] == 2 for r in rows)
    data = open_data(data_root)
    assert check_predictions(tmp_path / "pred", data) == []
    table = score_predictions(tmp_path / "pred", data, tmp_path / "scores")
    assert (table["status"] == "ok").all() and (table["GPE"] > 0).all()
    with h5py.File(tmp_path / "pred" / f"{data.keys[0]}.h5") as f:
        n = data.scans[0].n_frames
        assert f["uncertainty"].shape == (n - 1,) and (f["uncertainty"][()] > 0).all()
        assert f["transforms_local"].shape == (n - 1, 4, 4)
        assert f.attrs["members_used"] == 2 and f.attrs["runtime_seconds"] > 0
        # GP is the chain of the combined locals (globals are never predicted separately).
        chained = np.linalg.multi_dot(list(f["transforms_local"][:3].astype(np.float64)))
        np.testing.assert_allclose(f["transforms_global"][2], chained, atol=1e-5)


def test_predict_ddfs_has_the_organisers_signature(data_root, weights, monkeypatch):
    import tusrec.predict as predict

    monkeypatch.setattr(predict, "DEFAULT_WEIGHTS", weights)
    monkeypatch.setattr(predict, "_PREDICTOR", None)
    scan = open_data(data_root).scans[0]
    n, h, w = scan.shape
    lm = scan.read_landmarks()
    GP, GL, LP, LL = predict.predict_ddfs(scan.read_frames(), lm, str(data_root / "calib_matrix.csv"), "cpu")
    assert GP.shape == LP.shape == (n - 1, 3, h * w) and GL.shape == LL.shape == (3, len(lm))
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in (GP, GL, LP, LL))
    idx = (lm[:, 2] - 1) * w + lm[:, 1] - 1
    np.testing.assert_allclose(GL, GP[lm[:, 0] - 1, :, idx].T, atol=1e-4)
    # 2024's template passes no device.
    assert (
        predict.predict_ddfs(scan.read_frames(), lm, str(data_root / "calib_matrix.csv"))[0].shape == GP.shape
    )


def test_tiny_time_limit_still_gives_a_scorable_identity(data_root, weights, tmp_path):
    rows = predict_folder(
        data_root, tmp_path / "pred", weights, "cpu", time_limit_s=1e-3, log=lambda *a: None
    )
    assert all(r["status"] == "ok" and "fallback: identity" in r["message"] for r in rows)
    # and the reason is said plainly: the limit is shorter than the writing's reserve
    assert all("the time limit (0.001 s) leaves the model no time" in r["message"] for r in rows)
    data = open_data(data_root)
    table = score_predictions(tmp_path / "pred", data, tmp_path / "scores")
    np.testing.assert_allclose(table["GPE"], table["GPE_identity"], rtol=1e-6)
    np.testing.assert_allclose(table["LLE"], table["LLE_identity"], rtol=1e-6)


def test_members_that_would_not_fit_are_skipped(data_root, weights, tmp_path, monkeypatch):
    real = core.members_outputs
    real_clock = time.perf_counter
    skipped = [0.0]  # seconds the clock has jumped: each member "takes" 20 s more than it does

    def slow(members, *args, **kwargs):
        skipped[0] += 20.0 * len(members)
        return real(members, *args, **kwargs)

    # A clock that jumps instead of a sleep, for the predictor and the member's own deadline
    # checks alike: the real reading and compute (seconds on a loaded machine) keep 10 s of
    # slack under the 30 s limit, and a second member would end past it.
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])
    monkeypatch.setattr(core, "members_outputs", slow)
    monkeypatch.setattr(core, "ddf_reserve_s", lambda *args: 0.0)
    data = open_data(data_root)
    for batched in (False, True):  # one by one, and as a batched pass alike
        predictor = core.Predictor(
            load_members(weights), "cpu", time_limit_s=30.0, batched=batched, workers=1
        )
        row = predictor.predict_scan(data.scans[0], data.calibration, tmp_path / f"{batched}.h5")
        assert row["members"] == 1 and "1 member(s) skipped for time" in row["message"], (
            batched,
            row["message"],
        )
    # Side by side (two workers, each member sleeping 4 s on the real clock: the jumping
    # clock would add the two threads' jumps): members 0 and 1 end at 4 s + their compute
    # (4 s of slack under the 8 s limit), member 2 would start then and end past it.
    monkeypatch.setattr(time, "perf_counter", real_clock)

    def sleepy(members, *args, **kwargs):
        time.sleep(4.0 * len(members))
        return real(members, *args, **kwargs)

    monkeypatch.setattr(core, "members_outputs", sleepy)
    three = load_members(make_weights(tmp_path / "three", n=3, seed=5))
    # The network's in-plane motion: this is about the members' timing (the registration's
    # own deadline is tested in test_registration).
    predictor = core.Predictor(three, "cpu", time_limit_s=8.0, workers=2, in_plane="network")
    row = predictor.predict_scan(data.scans[0], data.calibration, tmp_path / "side.h5")
    assert row["members"] == 2 and row["message"] == "1 member(s) skipped for time"


def test_members_side_by_side_give_the_same_prediction_bit_for_bit(data_root, weights):
    """Members in two threads (one intra-op thread each) and the scan read by two threads:
    the inputs and the combined transforms of one by one on one intra-op thread, to the
    last bit. Against one by one on torch's default threads: the same up to float32
    rounding (torch's kernels may split sums differently with the thread count; with the
    shipped ensemble on the 500-frame benchmark scan they were equal to the last bit)."""
    members = load_members(make_weights(weights.parent / "four", n=4, seed=2))
    scan = open_data(data_root).scans[0]
    serial = core.Predictor(members, "cpu", workers=1)
    side = core.Predictor(members, "cpu", workers=2, chunk=3)  # chunks that cut the scan anywhere
    a, b = serial.read_preprocessed(scan), side.read_preprocessed(scan)
    assert np.array_equal(a, b)
    threads = torch.get_num_threads()
    default = serial.predict_local(a, float("inf"))
    torch.set_num_threads(1)
    try:
        one = serial.predict_local(a, float("inf"))
    finally:
        torch.set_num_threads(threads)
    two = side.predict_local(b, float("inf"))
    assert torch.get_num_threads() == threads  # restored
    assert one.members_used == two.members_used == 4 and two.fallback == ""
    for name in ("local", "uncertainty", "translation_spread_mm"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
        np.testing.assert_allclose(getattr(default, name), getattr(two, name), rtol=1e-5, atol=1e-7)


def test_batched_members_equal_one_by_one(weights):
    members = load_members(make_weights(weights.parent / "three", n=3, seed=5))
    frames = np.random.default_rng(1).normal(size=(23, 2, 16, 20)).astype(np.float32)
    batched = [o.local for o in ensemble.members_outputs(members, frames)]
    for member, out in zip(members, batched, strict=True):
        np.testing.assert_allclose(out, ensemble.members_outputs([member], frames)[0].local, atol=1e-6)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # the members do differ


def test_batched_conditioned_members_equal_one_by_one_and_use_the_code(tmp_path):
    """Members conditioned on the scan name (ModelConfig.scan_conditioning) get the code
    through the vmapped pass as through the one-by-one one."""
    from tusrec.model.inputs import scan_code
    from tusrec.model.network import ModelConfig

    cfg = ModelConfig(**{**TINY.to_dict(), "scan_conditioning": True})
    for i in range(3):
        torch.manual_seed(i)
        net = TrackerlessNet(cfg)
        for head in (net.fusion.head, net.fusion.signed_head):
            for p in head[-1].parameters():
                torch.nn.init.normal_(p, 0, 0.05)
        save_member(tmp_path / "w", f"member{i}", net, {"trained": "random init (test)"})
    members = load_members(tmp_path / "w")
    frames = np.random.default_rng(1).normal(size=(23, 2, 16, 20)).astype(np.float32)
    code = scan_code("LH_Per_L_DtP")
    batched = [o.local for o in ensemble.members_outputs(members, frames, code=code)]
    for member, out in zip(members, batched, strict=True):
        np.testing.assert_allclose(
            out, ensemble.members_outputs([member], frames, code=code)[0].local, atol=1e-6
        )
    other = [o.local for o in ensemble.members_outputs(members, frames, code=scan_code("LH_Per_L_PtD"))]
    assert np.abs(batched[0] - other[0]).max() > 1e-4  # the direction changes the output


def test_member_stops_between_windows_past_its_deadline(data_root, weights):
    member = load_members(weights)[0]
    frames = np.zeros((40, 2, 16, 20), np.float32)
    with pytest.raises(ensemble.OutOfTimeError, match="stopped at transition 0 of 39"):
        ensemble.members_outputs([member], frames, deadline=time.perf_counter() - 1)


def test_windows_cover_every_transition_once_with_context():
    for n, window, overlap in [(1, 4, 2), (10, 4, 2), (97, 96, 16), (300, 64, 16)]:
        wins = windows(n, window, overlap)
        cores = np.concatenate([np.arange(c, s) for c, s, _, _ in wins])
        np.testing.assert_array_equal(cores, np.arange(n))
        for core_start, stop, lo, hi in wins:
            assert lo == max(0, core_start - overlap) and hi == min(n, stop + overlap)


def test_long_scan_windows_join_without_a_seam():
    """Windowed inference equals one pass over the whole scan wherever a window's core
    has the network's full convolutional context; with attention the difference stays
    small, not a jump at window borders."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.to_dict(), "window": 8, "overlap": 6})
    member = ensemble.Member("m", TrackerlessNet(cfg).eval())
    for p in member.net.fusion.head[-1].parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    frames = np.random.default_rng(0).normal(size=(41, 2, 16, 20)).astype(np.float32)
    windowed = ensemble.members_outputs([member], frames)[0].local
    member.net.cfg.window, member.net.cfg.overlap = 1000, 0
    whole = ensemble.members_outputs([member], frames)[0].local
    step = np.abs(np.diff(windowed[:, :3, 3], axis=0)).max()
    assert np.abs(windowed - whole).max() < step  # smaller than the frame-to-frame variation


def svd_mean(R):
    U, _, Vt = np.linalg.svd(R.mean(axis=0))
    return U @ np.diag([1, 1, np.linalg.det(U @ Vt)]) @ Vt


def test_combine_projected_mean_and_translations():
    rng = np.random.default_rng(3)
    members = []
    for _ in range(5):
        T = np.tile(np.eye(4), (6, 1, 1))
        T[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.05, (6, 3))).as_matrix()
        T[:, :3, 3] = rng.normal(0, 1, (6, 3))
        members.append(T)
    stack = np.stack(members)
    out = combine(members)
    for k in range(6):
        np.testing.assert_allclose(out.local[k, :3, :3], svd_mean(stack[:, k, :3, :3]), atol=1e-9)
    np.testing.assert_allclose(out.local[:, :3, 3], stack[:, :, :3, 3].mean(axis=0))
    np.testing.assert_allclose(
        combine(members, "median").local[:, :3, 3], np.median(stack[:, :, :3, 3], axis=0)
    )
    spread = np.sqrt(((stack[:, :, :3, 3] - stack[:, :, :3, 3].mean(0)) ** 2).sum(-1).mean(0))
    np.testing.assert_allclose(out.translation_spread_mm, spread)
    same = combine([members[0]] * 3)
    np.testing.assert_allclose(same.rotation_disagreement, 0, atol=1e-10)
    np.testing.assert_allclose(same.translation_spread_mm, 0, atol=1e-12)


def test_weights_errors(weights, tmp_path):
    with pytest.raises(WeightsError, match="no weights manifest"):
        load_members(tmp_path / "nowhere")
    assert [m.name for m in load_members(weights, names=["member1"])] == ["member1"]
    with pytest.raises(WeightsError, match=r"no member\(s\) \['member7'\]"):
        load_members(weights, names=["member7"])
    (weights / "member1.pt").write_bytes((weights / "member1.pt").read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"member1\.pt: sha256 .* does not match"):
        load_members(weights)
    (weights / "member1.pt").unlink()
    with pytest.raises(WeightsError, match=r"member1\.pt is missing"):
        load_members(weights)


# --------------------------------------------------------------------------- bad input


def test_one_bad_scan_never_stops_the_rest(data_root, weights, tmp_path):
    data = open_data(data_root)
    bad, short = data.scans[0], data.scans[1]
    bad.frames_path.write_bytes(b"not hdf5")
    with h5py.File(short.frames_path, "w") as f:  # a scan of one frame
        f.create_dataset("frames", data=np.zeros((1, 24, 32), np.uint8))
    rows = {
        r["key"]: r for r in predict_folder(data_root, tmp_path / "pred", weights, "cpu", log=lambda *a: None)
    }
    assert (
        rows[bad.key]["status"] == "failed" and "cannot be opened as an HDF5 file" in rows[bad.key]["message"]
    )
    assert rows[short.key]["status"] == "failed" and "at least 2" in rows[short.key]["message"]
    assert rows[data.keys[2]]["status"] == "ok"
    assert not (tmp_path / "pred" / f"{bad.key}.h5").exists()
    manifest = (tmp_path / "pred" / "predictions.csv").read_text()
    assert "failed" in manifest and data.keys[2] in manifest


def test_other_image_size_is_resized_not_refused(dataset_factory, weights, tmp_path):
    root = dataset_factory(tmp_path / "big", "eval", ("050",), ("LH_Par_C_DtP",), 6, image_size=(40, 56))
    rows = predict_folder(root, tmp_path / "pred", weights, "cpu", log=lambda *a: None)
    assert rows[0]["status"] == "ok"
    assert check_predictions(tmp_path / "pred", open_data(root)) == []


@pytest.mark.parametrize("form", ["ddf", "transforms"])
def test_missing_landmarks_still_give_the_frame_predictions(data_root, weights, tmp_path, form):
    data = open_data(data_root)
    lm_file = data.scans[0].landmark_path
    with h5py.File(lm_file, "r+") as f:
        del f[data.scans[0].name]
    rows = predict_folder(data_root, tmp_path / "pred", weights, "cpu", log=lambda *a: None, form=form)
    assert rows[0]["status"] == "ok" and "GL/LL not written" in rows[0]["message"]
    with h5py.File(tmp_path / "pred" / f"{data.keys[0]}.h5") as f:
        assert ("GP" in f and "LP" in f) == (form == "ddf") and "GL" not in f
        assert f["transforms_local"].shape == (data.scans[0].n_frames - 1, 4, 4)


def test_compact_and_dense_forms_hold_the_same_prediction(data_root, weights, tmp_path):
    data = open_data(data_root)
    for form in ("ddf", "transforms"):
        rows = predict_folder(data_root, tmp_path / form, weights, "cpu", log=lambda *a: None, form=form)
        assert [r["status"] for r in rows] == ["ok"] * 3
    for scan in data.scans:
        dense, compact = (tmp_path / form / f"{scan.key}.h5" for form in ("ddf", "transforms"))
        with h5py.File(dense) as d, h5py.File(compact) as c:
            assert d.attrs["form"] == "ddf" and c.attrs["form"] == "transforms"
            assert "GP" not in c and "LP" not in c
            for name in ("transforms_global", "transforms_local", "GL", "LL", "uncertainty"):
                assert c[name].dtype == d[name].dtype
                np.testing.assert_array_equal(c[name][()], d[name][()], err_msg=name)
            # Stored in float64: the DDFs are generated from exactly these matrices.
            assert c["transforms_local"].dtype == np.float64
            # The dense GP is the field of the stored global transforms (independent
            # per-pixel computation at three pixels of the last frame).
            n, h, w = scan.shape
            T = c["transforms_global"][-1]
            ts = data.calibration.T_scale
            for x, y in ((1, 1), (w, 1), (3, h)):
                p = ts @ np.array([x, y, 0.0, 1.0])
                np.testing.assert_allclose(d["GP"][n - 2, :, (y - 1) * w + x - 1], (T @ p - p)[:3], atol=1e-4)
        assert compact.stat().st_size < 64_000 < dense.stat().st_size


def test_rerun_in_the_other_form_redoes_the_files(data_root, weights, tmp_path):
    out = tmp_path / "pred"
    data = open_data(data_root)
    predict_folder(data_root, out, weights, "cpu", keys=data.keys[:1], log=lambda *a: None, form="ddf")
    predict_folder(data_root, out, weights, "cpu", log=lambda *a: None, form="transforms")
    for key in data.keys:
        with h5py.File(out / f"{key}.h5") as f:
            assert f.attrs["form"] == "transforms" and "GP" not in f
    assert core.prediction_complete(out / f"{data.keys[0]}.h5", data.scans[0], "transforms")
    assert not core.prediction_complete(out / f"{data.keys[0]}.h5", data.scans[0], "ddf")


def test_an_overrun_is_marked_in_the_manifest(data_root, weights, tmp_path, monkeypatch):
    real = core.Predictor.read_inputs

    def slow_read(self, scan, calib=None):
        time.sleep(0.3)  # past the limit before the network could even start
        return real(self, scan, calib)

    monkeypatch.setattr(core.Predictor, "read_inputs", slow_read)
    rows = predict_folder(
        data_root, tmp_path / "pred", weights, "cpu", time_limit_s=0.2, keys=open_data(data_root).keys[:1]
    )
    assert rows[0]["status"] == "ok" and rows[0]["overrun_s"] > 0.1
    assert "over the time limit" in rows[0]["message"]
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert table.loc[0, "overrun_s"] > 0.1 and "over the time limit" in table.loc[0, "message"]
    ok = predict_folder(data_root, tmp_path / "fast", weights, "cpu", keys=open_data(data_root).keys[:1])
    assert ok[0]["overrun_s"] == 0 and "over the time limit" not in ok[0]["message"]


def test_unwritable_output_folder(data_root, weights, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(TusrecDataError, match="output folder is not writable"):
        predict_folder(data_root, blocker / "pred", weights, "cpu")
    assert blocker.read_text().startswith("a file")


def test_resume_keeps_complete_files_and_redoes_partial_ones(data_root, weights, tmp_path):
    out = tmp_path / "pred"
    data = open_data(data_root)
    predict_folder(data_root, out, weights, "cpu", keys=data.keys[:1], log=lambda *a: None)
    done = out / f"{data.keys[0]}.h5"
    mtime = done.stat().st_mtime_ns
    partial = out / f".{data.keys[1]}.h5.1234.tmp"
    partial.write_bytes(b"half a file")
    bogus = out / f"{data.keys[2]}.h5"
    with h5py.File(bogus, "w") as f:  # right name, wrong content: not trusted
        f.create_dataset("GP", data=np.zeros((2, 3, 4), np.float32))
    rows = predict_folder(data_root, out, weights, "cpu", log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert done.stat().st_mtime_ns == mtime
    assert not partial.exists()
    assert check_predictions(out, data) == []


def test_a_rerun_with_another_ensemble_redoes_the_files_this_one_keeps_them(data_root, weights, tmp_path):
    """A folder predicted by other weights (or other members of the same weights) is never
    passed off as this ensemble's: only files with this ensemble's fingerprint are kept."""
    out = tmp_path / "pred"
    data = open_data(data_root)
    other = make_weights(tmp_path / "other", seed=7)
    predict_folder(data_root, out, other, "cpu", log=lambda *a: None)
    with h5py.File(out / f"{data.keys[0]}.h5") as f:
        by_other = f["transforms_local"][()]
    said: list[str] = []
    predict_folder(data_root, out, weights, "cpu", log=said.append)
    assert not any("kept" in s for s in said)
    mtimes = {k: (out / f"{k}.h5").stat().st_mtime_ns for k in data.keys}
    fresh = tmp_path / "fresh"
    predict_folder(data_root, fresh, weights, "cpu", log=lambda *a: None)
    for key in data.keys:
        with h5py.File(out / f"{key}.h5") as f, h5py.File(fresh / f"{key}.h5") as g:
            assert f.attrs["model_fingerprint"] == g.attrs["model_fingerprint"]
            np.testing.assert_array_equal(f["transforms_local"][()], g["transforms_local"][()])
    with h5py.File(out / f"{data.keys[0]}.h5") as f:
        assert not np.array_equal(f["transforms_local"][()], by_other)
    # The same ensemble again: everything kept, and said so.
    said.clear()
    predict_folder(data_root, out, weights, "cpu", log=said.append)
    assert {k: (out / f"{k}.h5").stat().st_mtime_ns for k in data.keys} == mtimes
    assert said == [f"kept 3 scan(s) this model had already predicted in {out}"]
    # One member of it is another ensemble.
    predict_folder(data_root, out, weights, "cpu", members=["member1"], log=lambda *a: None)
    assert all((out / f"{k}.h5").stat().st_mtime_ns != mtimes[k] for k in data.keys)
    # A file without the attribute (an older version's) is redone too.
    key = data.keys[0]
    with h5py.File(out / f"{key}.h5", "a") as f:
        del f.attrs["model_fingerprint"]
    assert not core.prediction_complete(out / f"{key}.h5", data.scans[0], "transforms", "0" * 16)
    assert core.prediction_complete(out / f"{key}.h5", data.scans[0], "transforms")


def test_predict_command(data_root, weights, tmp_path):
    env = {**os.environ, "TUSREC_WEIGHTS": str(weights)}
    run = subprocess.run(
        [
            str(ROOT / "predict"),
            "--input",
            str(data_root),
            "--output",
            str(tmp_path / "p"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "3 of 3 scans predicted" in run.stdout
    # The command line's default is the compact form.
    with h5py.File(next((tmp_path / "p").glob("*.h5"))) as f:
        assert f.attrs["form"] == "transforms" and "GP" not in f
    no_weights = subprocess.run(
        [
            str(ROOT / "predict"),
            "--input",
            str(data_root),
            "--output",
            str(tmp_path / "q"),
            "--weights",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert no_weights.returncode == 2 and "no weights manifest" in no_weights.stderr


def test_the_predictor_never_loads_torchs_compiler(data_root, weights, tmp_path):
    """Loading torch._dynamo (as roma 1.6.1+ does when imported) costs 2.7 s of CPU at every
    ./predict start on a 2-core machine (requirements.txt); the predictor needs none of it."""
    script = (
        "import sys\n"
        "from tusrec.predict import predict_folder\n"
        f"rows = predict_folder({str(data_root)!r}, {str(tmp_path / 'p')!r}, {str(weights)!r}, 'cpu',"
        " log=lambda *a: None)\n"
        "assert [r['status'] for r in rows] == ['ok'] * 3, rows\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


def test_predict_ddfs_passes_a_known_scan_name_to_conditioned_members(data_root, tmp_path, monkeypatch):
    """The template passes no name (the unknown code); scan_name= gives conditioned members
    the code ./predict gives them, and a name outside the data format counts as unknown."""
    import tusrec.predict as predict
    from tusrec.model.network import ModelConfig

    cfg = ModelConfig(**{**TINY.to_dict(), "scan_conditioning": True})
    torch.manual_seed(0)
    net = TrackerlessNet(cfg)
    for head in (net.fusion.head, net.fusion.signed_head):
        for p in head[-1].parameters():
            torch.nn.init.normal_(p, 0, 0.05)
    save_member(tmp_path / "w", "member0", net, {"trained": "random init (test)"})
    monkeypatch.setattr(predict, "DEFAULT_WEIGHTS", tmp_path / "w")
    monkeypatch.setattr(predict, "_PREDICTOR", None)
    scan = open_data(data_root).scans[0]  # sub050__LH_Par_C_DtP
    frames, lm, calib = scan.read_frames(), scan.read_landmarks(), str(data_root / "calib_matrix.csv")
    named = predict.predict_ddfs(frames, lm, calib, "cpu", scan_name=scan.name)
    unnamed = predict.predict_ddfs(frames, lm, calib, "cpu")
    hostile = predict.predict_ddfs(frames, lm, calib, "cpu", scan_name="../../x/LH_Par_C_DtP")
    assert np.abs(named[0] - unnamed[0]).max() > 1e-4
    np.testing.assert_array_equal(hostile[0], unnamed[0])
    predict_folder(data_root, tmp_path / "p", tmp_path / "w", "cpu", log=lambda *a: None, form="ddf")
    with h5py.File(tmp_path / "p" / f"{scan.key}.h5") as f:
        np.testing.assert_array_equal(named[0], f["GP"][()])


def test_a_mixed_ensemble_runs_each_configuration_batched_and_keeps_the_members_order(tmp_path, monkeypatch):
    """Sequence members beside a frame-pair one: the same transforms as each alone, in
    the order of the members (the two sequence members still share one vmapped pass)."""
    from tusrec.model.network import PairNet

    make_weights(tmp_path / "w", n=2, seed=3)
    torch.manual_seed(9)
    pair = PairNet(ModelConfig(**{**TINY.to_dict(), "architecture": "pair"}))
    for p in pair.head[-1].parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    save_member(tmp_path / "w", "member0b-pair", pair, {"trained": "random init (test)"})
    members = load_members(tmp_path / "w")
    assert [m.cfg.architecture for m in members] == ["dual-encoder", "pair", "dual-encoder"]
    frames = np.random.default_rng(2).normal(size=(19, 2, 16, 20)).astype(np.float32)
    batched_passes = []
    real = ensemble._Batched

    def spy(group):
        batched_passes.append([m.name for m in group])
        return real(group)

    monkeypatch.setattr(ensemble, "_Batched", spy)
    mixed = [o.local for o in ensemble.members_outputs(members, frames)]
    assert batched_passes == [["member0", "member1"]]
    for member, out in zip(members, mixed, strict=True):
        np.testing.assert_allclose(out, ensemble.members_outputs([member], frames)[0].local, atol=1e-6)
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3 and np.abs(mixed[1] - mixed[2]).max() > 1e-3

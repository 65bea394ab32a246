"""The strict read policy and the bounded scoring worker (issue 12 items 1-2): every
hostile input of the issue gets a clear `invalid` (or a note), and loses no other scan."""

import math
import os
import signal
import time

import h5py
import numpy as np
import pytest

from tusrec.data import open_data, write_manifest
from tusrec.ddf import write_ground_truth
from tusrec.scoring.score import ScoreLimits, check_predictions, run_bounded, score_file, score_predictions


@pytest.fixture
def data_root(dataset_factory, tmp_path):
    """Validation layout: 2 subjects x 2 scans, 7 frames of 16 x 20, 5 landmarks each."""
    return dataset_factory(
        tmp_path / "data", "eval", ("050", "051"), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 7, image_size=(16, 20)
    )


def write_gt_folder(data, folder):
    rows = []
    for scan in data.scans:
        write_ground_truth(scan, data.calibration, folder / f"{scan.key}.h5")
        rows.append({"key": scan.key, "frames": scan.n_frames, "status": "ok", "seconds": 1.5})
    write_manifest(folder, rows)
    return folder


# --------------------------------------------------------------------------- the worker
# Module-level, so the worker server can import them by name.


def sleep_for(seconds):
    time.sleep(seconds)
    return "woke"


def crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def allocate(mb):
    return float(np.ones(mb * 2**20 // 8).sum())


def test_worker_returns_results_and_bounds_time_memory_and_crashes():
    limits = ScoreLimits(memory_mb=600)
    assert run_bounded(allocate, (10,), limits, 30) == (10 * 2**20 / 8, None)
    t0 = time.monotonic()
    result, reason = run_bounded(sleep_for, (60,), limits, 1.0)
    assert result is None and reason == "scoring stopped at its time limit of 1 s"
    assert time.monotonic() - t0 < 10
    result, reason = run_bounded(allocate, (2000,), limits, 30)
    assert result is None and "more than the scoring memory cap of 600 MiB" in reason
    result, reason = run_bounded(crash, (), limits, 30)
    assert result is None and "killed by SIGSEGV" in reason
    # ...and the worker is still there for the next job.
    assert run_bounded(sleep_for, (0,), limits, 30) == ("woke", None)


def test_score_file_row_for_a_good_file_a_runner_outcome_and_a_dead_worker(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    scan = data.scans[0]
    path = gt_dir / f"{scan.key}.h5"
    row = score_file(scan, path, {"status": "ok", "seconds": "2.5"}, data.calibration)
    assert row["status"] == "ok" and row["runtime_s"] == 2.5 and row["form"] == "ddf"
    assert max(abs(row[e]) for e in ("GPE", "GLE", "LPE", "LLE")) < 1e-4
    assert row["GPE_identity"] > 0 and row["scan_length_mm"] > 0
    imposed = {"status": "timeout", "message": "killed at the time limit of 5 s", "seconds": 5.0}
    row = score_file(scan, path, imposed, data.calibration)
    assert (row["status"], row["message"], row["runtime_s"]) == ("timeout", imposed["message"], 5.0)
    assert math.isnan(row["GPE"])
    row = score_file(scan, path, None, data.calibration, limits=ScoreLimits(time_s=1e-3))
    assert row["status"] == "invalid" and "time limit" in row["message"] and str(path) in row["message"]
    row = score_file(scan, tmp_path / "nothing.h5", None, data.calibration)
    assert row["status"] == "missing"


def test_malformed_manifest_cells_become_notes_or_invalid(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    keys = data.keys
    rows = [
        {"key": keys[0], "frames": 7, "status": "ok", "seconds": "fast"},
        {"key": keys[1], "frames": "seven", "status": "ok", "seconds": 1.0},
        {"key": keys[2], "frames": 7, "status": "done!", "seconds": 1.0},
        {"key": keys[3], "frames": 7, "status": "ok", "seconds": -3, "message": "a\x1b[2Jb" + "x" * 2000},
    ]
    write_manifest(gt_dir, rows)
    problems = {p.key: p.message for p in check_predictions(gt_dir, data)}
    assert "manifest seconds='fast' is not a number" in problems[keys[0]]
    assert "manifest frames='seven' is not a frame count" in problems[keys[1]]
    assert "manifest status 'done!'; expected ok, failed or timeout" in problems[keys[2]]
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert table.loc[keys[0], "status"] == "ok" and math.isnan(table.loc[keys[0], "runtime_s"])
    assert "runtime unknown: manifest seconds='fast' is not a number" in table.loc[keys[0], "message"]
    assert table.loc[keys[1], "status"] == "ok" and table.loc[keys[1], "runtime_s"] == 1.0
    assert table.loc[keys[2], "status"] == "invalid"
    assert table.loc[keys[3], "status"] == "ok" and "\x1b" not in table.loc[keys[3], "message"]
    assert len(table.loc[keys[3], "message"]) < 700


# --------------------------------------------------------------------------- hostile files


def _replace(path, name, make):
    """Replace dataset ``name`` of a prediction file by what make(f, name, shape) builds."""
    with h5py.File(path, "r+") as f:
        shape = f[name].shape
        del f[name]
        make(f, name, shape)


def external_link(victim):
    return lambda f, name, shape: f.__setitem__(name, h5py.ExternalLink(str(victim), name))


def virtual(victim):
    def make(f, name, shape):
        layout = h5py.VirtualLayout(shape, np.float32)
        layout[...] = h5py.VirtualSource(str(victim), name, shape)
        f.create_virtual_dataset(name, layout)

    return make


def external_storage(f, name, shape):
    f.create_dataset(name, shape, np.float32, external=[("/dev/zero", 0, int(np.prod(shape)) * 4)])


def soft_link(f, name, shape):
    f.create_dataset("hidden", data=np.zeros(shape, np.float32))
    f[name] = h5py.SoftLink("/hidden")


def chunk_bomb(f, name, shape):
    f.create_dataset(name, shape, np.float32, chunks=(shape[0], 3, 1))  # never written


def float16(f, name, shape):
    f.create_dataset(name, data=np.zeros(shape, np.float16))


def scale_offset(f, name, shape):
    f.create_dataset(name, data=np.zeros(shape, np.float32), chunks=(1, 3, shape[2]), scaleoffset=3)


def group(f, name, shape):
    f.create_group(name)


# kind -> (how to break GP of the scan's file given the victim's file, expected message)
HOSTILE = {
    "external link to another team's file": (
        external_link,
        "'GP' is an external link (to ",
    ),
    "external link to a missing file": (
        lambda victim: external_link(victim.parent / "gone" / "missing.h5"),
        "'GP' is an external link",
    ),
    "virtual dataset": (virtual, "'GP' is a virtual dataset"),
    "external storage on /dev/zero": (
        lambda victim: external_storage,
        "'GP' keeps its data in external file(s) b'/dev/zero'",
    ),
    "soft link": (lambda victim: soft_link, "'GP' is a soft link"),
    "chunk bomb": (lambda victim: chunk_bomb, "chunks per frame; at most 64 chunks may cover a frame"),
    "float16": (lambda victim: float16, "'GP' has dtype float16, expected float32 or float64"),
    "scale-offset filter": (lambda victim: scale_offset, "'GP' uses filter 6 (scaleoffset); allowed filters"),
    "group instead of a dataset": (lambda victim: group, "no dataset 'GP' ('GP' is not a dataset)"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_dataset_is_invalid_and_loses_nothing(kind, data_root, tmp_path):
    data = open_data(data_root)
    victim_dir = write_gt_folder(data, tmp_path / "victim")
    gt_dir = write_gt_folder(data, tmp_path / "team")
    bad = data.scans[1]
    victim = victim_dir / f"{bad.key}.h5"
    make, expected = HOSTILE[kind]
    _replace(gt_dir / f"{bad.key}.h5", "GP", make(victim))
    problems = check_predictions(gt_dir, data)
    assert [p.key for p in problems] == [bad.key], problems
    assert expected in problems[0].message
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert table.loc[bad.key, "status"] == "invalid"
    assert expected in table.loc[bad.key, "message"]
    assert np.isnan(table.loc[bad.key, ["GPE", "LPE", "GLE", "LLE"]].astype(float)).all()
    others = table.drop(bad.key)
    assert (others["status"] == "ok").all() and (others["GPE"] < 1e-4).all()


def test_symlinked_fifo_and_folder_predictions_are_not_followed(data_root, tmp_path):
    data = open_data(data_root)
    victim_dir = write_gt_folder(data, tmp_path / "victim")
    gt_dir = write_gt_folder(data, tmp_path / "team")
    k0, k1, k2 = data.keys[:3]
    (gt_dir / f"{k0}.h5").unlink()
    (gt_dir / f"{k0}.h5").symlink_to(victim_dir / f"{k0}.h5")
    (gt_dir / f"{k1}.h5").unlink()
    os.mkfifo(gt_dir / f"{k1}.h5")  # opening a fifo for reading would block the evaluation
    (gt_dir / f"{k2}.h5").unlink()
    (gt_dir / f"{k2}.h5").mkdir()
    expected = {
        k0: "is a symbolic link, not a regular file",
        k1: "is not a regular file (a fifo)",
        k2: "is not a regular file (a folder)",
    }
    problems = {p.key: p.message for p in check_predictions(gt_dir, data)}
    assert set(problems) == set(expected)
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    for key, message in expected.items():
        assert message in problems[key]
        assert table.loc[key, "status"] == "invalid" and message in table.loc[key, "message"]
    assert table.loc[data.keys[3], "status"] == "ok"


def test_malformed_attributes_are_notes(data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    write_manifest(gt_dir, [{"key": k, "frames": 7, "status": "ok"} for k in data.keys])
    values = {
        data.keys[0]: ("runtime_seconds", "fast"),
        data.keys[1]: ("runtime_seconds", np.arange(3000.0)),
        data.keys[2]: ("model", np.arange(4)),
    }
    for key, (name, value) in values.items():
        with h5py.File(gt_dir / f"{key}.h5", "r+") as f:
            f.attrs[name] = value
    table = score_predictions(gt_dir, data, tmp_path / "scores").set_index("key")
    assert (table["status"] == "ok").all()
    assert (
        "runtime unknown: attribute runtime_seconds='fast' is not a number"
        in table.loc[data.keys[0], "message"]
    )
    assert math.isnan(table.loc[data.keys[0], "runtime_s"])
    assert "attribute 'runtime_seconds' is 24000 bytes (at most 4096)" in table.loc[data.keys[1], "message"]
    assert "attribute 'model' has shape (4,)" in table.loc[data.keys[2], "message"]
    assert table.loc[data.keys[3], "runtime_s"] == 0.0  # write_ground_truth's runtime_seconds


@pytest.mark.parametrize("kind", ["symlink", "huge", "binary", "duplicate keys"])
def test_unreadable_manifest_is_the_teams_problem_only(kind, data_root, tmp_path):
    data = open_data(data_root)
    gt_dir = write_gt_folder(data, tmp_path / "gt")
    manifest = gt_dir / "predictions.csv"
    expected = {
        "symlink": "a symbolic link, not a regular file",
        "huge": "a manifest may have at most",
        "binary": "not a readable CSV",
        "duplicate keys": "duplicate key(s)",
    }[kind]
    if kind == "symlink":
        target = tmp_path / "elsewhere.csv"
        manifest.replace(target)
        manifest.symlink_to(target)
    elif kind == "huge":
        with manifest.open("a") as f:
            f.truncate(9 * 2**20)  # sparse: a 9 MiB manifest without writing 9 MiB
    elif kind == "binary":
        manifest.write_bytes(b'key,status\n\x00\xff"unterminated\n' * 3)
    else:
        text = manifest.read_text().splitlines()
        manifest.write_text("\n".join([*text, text[1]]) + "\n")
    problems = check_predictions(gt_dir, data)
    assert [p.key for p in problems] == [None] and expected in problems[0].message
    table = score_predictions(gt_dir, data, tmp_path / "scores")
    assert (table["status"] == "ok").all()  # every file is still scored
    assert table["message"].str.contains("manifest ignored: ").all()
    assert table["message"].str.contains(expected, regex=False).all()

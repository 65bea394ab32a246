"""The strict read policy and the bounded scoring worker (issue 12 items 1-2): every
hostile input of the issue gets a clear `invalid` (or a note), and loses no other scan."""

import math
import os
import signal
import time

import numpy as np
import pytest

from tusrec.data import open_data, write_manifest
from tusrec.ddf import write_ground_truth
from tusrec.evaluate.score import ScoreLimits, check_predictions, run_bounded, score_file, score_predictions


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

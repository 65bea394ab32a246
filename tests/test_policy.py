"""The strict read policy and the bounded scoring worker (issue 12 items 1-2): every
hostile input of the issue gets a clear `invalid` (or a note), and loses no other scan."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.data import open_data, write_manifest
from tusrec.ddf import write_ground_truth
from tusrec.scoring import max_prediction_bytes
from tusrec.scoring.score import (
    ScoreLimits,
    check_file,
    check_predictions,
    run_bounded,
    score_file,
    score_predictions,
)

ROOT = Path(__file__).resolve().parents[1]


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


def announce_and_sleep(seconds):
    print("job started", file=sys.stderr, flush=True)  # stderr: the caller's, a pipe here
    time.sleep(seconds)


# A caller (a Dask worker scoring a unit) that starts the worker's server, says its pid
# and waits on a ten-minute job.
CALLER = """
from tusrec.scoring import worker
worker.SERVER.start()
print(worker.SERVER._proc.pid, flush=True)
worker.SERVER.run("tests.test_policy", "announce_and_sleep", (600,), 600, 600)
"""


def test_a_caller_killed_mid_job_stops_the_job_quietly():
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    server = int(caller.stdout.readline())
    assert caller.stderr.readline().strip() == "job started"
    caller.kill()  # as a Dask worker is killed: no cleanup of its own
    # stderr ends only when every holder of the pipe (the server, the job's child) is gone:
    # a job left running for the 600 s the caller asked would time this out.
    _, rest = caller.communicate(timeout=120)
    assert "Traceback" not in rest and "BrokenPipe" not in rest and "Exception ignored" not in rest, rest
    assert _ends(server)


def _ends(pid: int, within_s: float = 60.0) -> bool:
    """Whether process ``pid`` ends (is gone or a zombie) within ``within_s``: after the
    stderr it held closes, an interpreter still finalises a moment."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


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


# --------------------------------------------------------------------------- judging cost


@pytest.fixture
def big_root(dataset_factory, tmp_path):
    """One scan of 7 frames of 240 x 320: GP is 5.5 MB, so a chunk can pass the 1 MiB slack."""
    return dataset_factory(tmp_path / "big", "eval", ("050",), ("LH_Par_C_DtP",), 7, image_size=(240, 320))


def _rewrite_pixels(path, **layout):
    """GP and LP of a prediction file rewritten with ``layout`` (h5py create_dataset
    options); values from ``values`` (default: the file's own)."""
    values = layout.pop("values", None)
    with h5py.File(path, "r+") as f:
        for name in ("GP", "LP"):
            data = f[name][()] if values is None else np.full(f[name].shape, values, np.float32)
            del f[name]
            ds = f.create_dataset(name, data.shape, data.dtype, **layout)
            ds[...] = data


def _corrupt_chunks(path):
    """Overwrite the stored bytes of every chunk of GP and LP: any decompression now fails."""
    spans = []
    with h5py.File(path, "r") as f:
        for name in ("GP", "LP"):
            f[name].id.chunk_iter(lambda info: spans.append((info.byte_offset, info.size)))
    with open(path, "r+b") as raw:
        for offset, size in spans:
            raw.seek(offset)
            raw.write(b"\xa5" * size)


# bomb -> (how to rewrite the file, the bound its message names)
BOMBS = {
    # the measured lzf bomb: chunks 100 times as deep as GP's 3 components
    "chunks larger than the dataset": (
        lambda p: _rewrite_pixels(p, chunks=(1, 300, 1201), maxshape=(None, None, None), compression="lzf"),
        "larger than its shape (6, 3, 76800) along axis 1; a chunk may not exceed the dataset",
    ),
    "a grid far larger than the dataset": (
        lambda p: _rewrite_pixels(p, chunks=(6, 3, 76799), compression="gzip"),
        "whose grid decompresses to 11059056 bytes for the dataset's 5529600; at most",
    ),
    "one chunk of zeros at ratio 1,000": (
        lambda p: _rewrite_pixels(p, chunks=(6, 3, 76800), compression="gzip", values=0.0),
        "the compression ratio of a chunk may be at most 100",
    ),
    "many chunks of zeros, each under the slack": (
        lambda p: _rewrite_pixels(p, chunks=(1, 3, 76800), compression="gzip", values=0.0),
        "the compression ratio of a file may be at most 100",
    ),
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_compression_bombs_are_invalid_without_decompressing(kind, big_root, tmp_path):
    data = open_data(big_root)
    scan = data.scans[0]
    folder = write_gt_folder(data, tmp_path / "team")
    path = folder / f"{scan.key}.h5"
    make, bound = BOMBS[kind]
    make(path)
    _corrupt_chunks(path)  # a decompression would now fail with an HDF5 error instead
    problems = check_predictions(folder, data)
    assert problems and all(p.key == scan.key and bound in p.message for p in problems), problems
    row = score_file(scan, path, None, data.calibration)
    assert row["status"] == "invalid" and bound in row["message"]


@pytest.mark.parametrize(
    "layout",
    [
        {"compression": "gzip", "shuffle": True, "fletcher32": True, "chunks": (1, 3, 76800)},
        {"compression": "lzf", "chunks": (4, 3, 19200)},  # a last layer of chunks past the 6 frames
        {"compression": "lzf", "chunks": (3, 3, 76800), "values": 0.0},  # the identity: lzf ~90x
    ],
)
def test_compressed_predictions_within_the_bounds_score_as_uncompressed(layout, big_root, tmp_path):
    data = open_data(big_root)
    scan = data.scans[0]
    plain = write_gt_folder(data, tmp_path / "plain") / f"{scan.key}.h5"
    packed = write_gt_folder(data, tmp_path / "packed") / f"{scan.key}.h5"
    if "values" in layout:
        _rewrite_pixels(plain, values=layout["values"])
    _rewrite_pixels(packed, **layout)
    expected = score_file(scan, plain, None, data.calibration)
    got = score_file(scan, packed, None, data.calibration)
    assert got["status"] == "ok", got["message"]
    assert check_predictions(packed.parent, data) == []
    errors = ("GPE", "LPE", "GLE", "LLE", "GPE_identity", "LPE_identity")
    assert [got[e] for e in errors] == [expected[e] for e in errors]


# --------------------------------------------------------------------------- attributes by real size


def test_a_huge_variable_length_model_is_a_note_not_a_read(data_root, tmp_path):
    data = open_data(data_root)
    folder = write_gt_folder(data, tmp_path / "team")
    huge, small = data.keys[:2]
    with h5py.File(folder / f"{huge}.h5", "r+") as f:
        f.attrs["model"] = "x" * (9 << 20)  # variable-length: 16 B of storage, 9 MiB in the heap
    with h5py.File(folder / f"{small}.h5", "r+") as f:
        f.attrs["model"] = "resnet-ensemble"  # also variable-length (h5py's str), and small
    table = score_predictions(folder, data, tmp_path / "scores", limits=ScoreLimits(memory_mb=300)).set_index(
        "key"
    )
    assert (table["status"] == "ok").all()
    assert "attribute 'model' is variable-length and the file holds" in table.loc[huge, "message"]
    assert pd.isna(table.loc[huge, "model"]) or table.loc[huge, "model"] == ""
    assert table.loc[small, "model"] == "resnet-ensemble" and table.loc[small, "message"] == ""


# --------------------------------------------------------------------------- the format's size


def _float64_file(path, scan, layout):
    """A prediction file with every dataset the format names, all float64, the pixel sets
    and the small sets created with ``layout`` (h5py create_dataset options, by kind)."""
    n, h, w = scan.shape
    rng = np.random.default_rng(0)
    k = len(scan.read_landmarks())
    shapes = {
        "GP": (n - 1, 3, h * w),
        "LP": (n - 1, 3, h * w),
        "GL": (3, k),
        "LL": (3, k),
        "transforms_global": (n - 1, 4, 4),
        "transforms_local": (n - 1, 4, 4),
        "uncertainty": (n - 1,),
        "uncertainty_translation_mm": (n - 1,),
        "expected_error_mm": (n - 1,),
    }
    eye = np.broadcast_to(np.eye(4), (n - 1, 4, 4))
    with h5py.File(path, "w") as f:
        for name, shape in shapes.items():
            data = eye if name.startswith("transforms") else rng.normal(0, 50, shape)
            f.create_dataset(
                name, data=data, dtype=np.float64, **layout.get(len(shape) == 3 and name[1] == "P", {})
            )
        f.attrs["model"] = "m" * 4000
        f.attrs["runtime_seconds"] = 1.0
        f.attrs["form"] = "ddf"
    return sum(int(np.prod(s)) * 8 for s in shapes.values())


@pytest.mark.parametrize(
    "layout",
    [
        {},  # contiguous
        {  # the most wasteful layout the policy accepts: a last layer of chunks past the frames,
            # 64 chunks a frame, tiny gzip chunks with checksums in the small sets
            True: {"chunks": (4, 3, 1200), "compression": "gzip", "fletcher32": True},
            False: {"chunks": True, "compression": "lzf", "fletcher32": True},
        },
    ],
)
def test_a_valid_float64_dense_file_fits_the_largest_size_the_format_allows(layout, big_root, tmp_path):
    data = open_data(big_root)
    scan = data.scans[0]
    n, h, w = scan.shape
    k = len(scan.read_landmarks())
    path = tmp_path / f"{scan.key}.h5"
    data_bytes = _float64_file(path, scan, layout)
    assert check_file(path, scan.shape, k, values=False) == []  # valid under the policy
    size = os.path.getsize(path)
    bound = max_prediction_bytes(n, h, w, k)
    assert size <= bound
    if not layout:
        assert data_bytes <= size  # every value is stored: the file is the format's data
    # The allowances, not a blank cheque: an eighth, a last layer of at most 15 frames of
    # GP and LP past the scan (here 4 of 6: 5-frame chunks), 1 MiB each set, metadata.
    past = 2 * min(15, n - 2) * 3 * h * w * 8
    assert bound - data_bytes < data_bytes / 8 + past + 10 * 2**20
    # the kit's own float32 file fits too (the old quota's case)
    write_ground_truth(scan, data.calibration, tmp_path / "kit.h5")
    assert os.path.getsize(tmp_path / "kit.h5") <= bound

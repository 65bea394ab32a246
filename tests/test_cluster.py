"""The Dask path (tusrec.cluster): `--cluster local:2` gives the serial path's files, a
worker killed mid-unit has its unit redone elsewhere and counted once, the Slurm recipe's
job script asks for what the README says. The container runs on a cluster are tested
against podman in tests/test_containers.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.cli import main
from tusrec.cluster import (
    LOCAL,
    REMOTE,
    ClusterError,
    ClusterSpec,
    map_units,
    parse_cluster,
    worker_gpus,
)
from tusrec.data import EVAL, atomic_path, open_data, write_manifest

distributed = pytest.importorskip("distributed")


def test_cluster_argument_forms():
    assert parse_cluster(None) is None
    assert parse_cluster("local:3") == ClusterSpec(LOCAL, workers=3)
    assert parse_cluster("tcp://gpu-head.example:8786") == ClusterSpec(
        REMOTE, address="tcp://gpu-head.example:8786"
    )
    for bad in ("local", "local:0", "local:x", "tcp://host", "http://h:1", "8786", "tcp://h:1/x"):
        with pytest.raises(ClusterError):
            parse_cluster(bad)


def test_workers_keep_glibcs_adaptive_malloc_trim(client):
    """Dask's nanny fixes MALLOC_TRIM_THRESHOLD_ at 64 KiB, which makes SIFT 2-3x slower;
    local:N leaves it unset, and configs/dask (the recipes' DASK_CONFIG) says the same."""
    import dask.config

    assert set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {None}
    root = Path(__file__).resolve().parents[1]
    config = dask.config.collect(paths=[str(root / "configs" / "dask")], env={})
    assert config["distributed"]["nanny"]["pre-spawn-environ"] == {"MALLOC_TRIM_THRESHOLD_": None}


def test_cli_rejects_a_bad_cluster(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--cluster", "local:zero"], prog="landmarks")
    assert exit_.value.code == 2 and "expected local:N" in capsys.readouterr().err


def test_a_container_gets_its_workers_own_gpu():
    assert worker_gpus(None, {"TUSREC_WORKER_GPUS": "1"}) is None  # no --gpus: no GPU at all
    assert worker_gpus("all", {"TUSREC_WORKER_GPUS": "2"}) == "device=2"
    assert worker_gpus("all", {"TUSREC_WORKER_GPUS": "2,3"}) == "device=2,3"
    # dask-cuda's convention: the worker's own device first in CUDA_VISIBLE_DEVICES
    assert worker_gpus("all", {"CUDA_VISIBLE_DEVICES": "3,0,1,2"}) == "device=3"
    assert worker_gpus("1", {}) == "1"  # a worker with one GPU of its own: as asked


@pytest.fixture(scope="module")
def client():
    """Two local worker processes, one thread each, each holding a GPU slot."""
    from tusrec.cluster import local_cluster

    cluster = local_cluster(2, gpu_slots=True)  # what --cluster local:2 of `run` makes
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


# --------------------------------------------------------------------------- same results


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory) -> Path:
    """2 simulated 2024 scans of 30 frames at 120 x 160 (real SIFT features), no landmarks."""
    from tusrec.simulate.dataset import simulate_dataset

    root = tmp_path_factory.mktemp("sim") / "data"
    simulate_dataset(
        root,
        [50],
        names=["LH_Par_C_DtP", "RH_Per_L_PtD"],
        frames=30,
        image_size=(120, 160),
        landmarks=False,
    )
    return root


def _landmark_sets(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            out[path.name] = {name: f[name][()] for name in f}
    return out


def test_landmarks_on_the_cluster_are_the_serial_ones(sim_root, tmp_path, capsys):
    serial, dask = tmp_path / "serial", tmp_path / "dask"
    assert main([str(sim_root), "--out", str(serial)], prog="landmarks") == 0
    assert main([str(sim_root), "--out", str(dask), "--cluster", "local:2"], prog="landmarks") == 0
    out = capsys.readouterr().out
    assert "dask: local cluster of 2 workers, dashboard http://127.0.0.1:" in out
    a, b = _landmark_sets(serial), _landmark_sets(dask)
    assert list(a) == list(b) == ["landmark_050.h5"]
    assert sorted(a["landmark_050.h5"]) == sorted(b["landmark_050.h5"]) and len(b["landmark_050.h5"]) == 2
    for name, lm in a["landmark_050.h5"].items():
        assert lm.shape == (20, 3)
        np.testing.assert_array_equal(lm, b["landmark_050.h5"][name])
    assert (serial / "landmark_050.h5").read_bytes() == (dask / "landmark_050.h5").read_bytes()


def test_landmarks_rerun_on_the_cluster_skips_what_is_done(client, sim_root, tmp_path):
    from tusrec.landmarks import write_data_landmarks

    data = open_data(sim_root)
    first = write_data_landmarks(data, 5, tmp_path, keys=data.keys[:1], client=client)
    assert list(first) == data.keys[:1] and first[data.keys[0]].shape == (5, 3)
    second = write_data_landmarks(data, 5, tmp_path, client=client)
    assert list(second) == data.keys[1:]  # the first scan is not redone
    with h5py.File(tmp_path / "landmark_050.h5") as f:
        assert sorted(f) == sorted(s.name for s in data.scans)


def test_simulate_on_the_cluster_writes_the_serial_files(client, tmp_path):
    from tusrec.simulate.dataset import simulate_dataset

    kw = dict(names=["LH_Par_C_DtP", "RH_Per_S_PtD"], frames="12-20", image_size=(60, 80), seed=3, k=4)
    keys = simulate_dataset(tmp_path / "serial", [51], **kw)
    assert simulate_dataset(tmp_path / "dask", [51], **kw, client=client) == keys
    files = sorted(
        p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file()
    )
    assert len(files) == 2 * 2 + 3  # frames and transfs of each scan, landmarks, calibration, keys
    assert files == sorted(
        p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (tmp_path / "serial" / rel).read_bytes() == (tmp_path / "dask" / rel).read_bytes(), rel


def _predictions(data, folder: Path) -> None:
    """Noisy ground truth for 3 scans, an external link for the 4th (invalid), a manifest."""
    from tusrec.ddf import GroundTruth, write_predictions
    from tusrec.geometry import pose6_to_matrix

    rng = np.random.default_rng(5)
    rows = []
    for i, scan in enumerate(data.scans):
        path = folder / f"{scan.key}.h5"
        if i == len(data.scans) - 1:
            folder.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "w") as f:
                for name in ("GP", "LP", "GL", "LL"):
                    f[name] = h5py.ExternalLink(str(folder / f"{data.scans[0].key}.h5"), name)
        else:
            gt = GroundTruth.from_scan(scan, data.calibration)
            noise = pose6_to_matrix(rng.normal(0, [0.01] * 3 + [0.5] * 3, (scan.n_frames - 1, 6)))
            write_predictions(
                path,
                gt.global_ @ noise,
                gt.local @ noise,
                data.calibration,
                scan.image_size,
                scan.read_landmarks(),
                {"runtime_seconds": 0.5 + i, "model": "noisy"},
            )
        rows.append(
            {
                "key": scan.key,
                "frames": scan.n_frames,
                "status": "ok",
                "seconds": 1.0 + i,
                "device": "cpu",
                "message": "",
            }
        )
    write_manifest(folder, rows)


def test_score_on_the_cluster_is_the_serial_score(client, dataset_factory, tmp_path, capsys):
    root = dataset_factory(tmp_path / "data", EVAL, ("050", "051"), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 7)
    data = open_data(root)
    pred = tmp_path / "pred"
    _predictions(data, pred)
    serial, dask = tmp_path / "serial", tmp_path / "dask"
    common = ["score", str(pred), "--data", str(root), "--chunk", "4"]
    assert main(["evaluate", *common, "--out", str(serial)]) == 0
    # Through the CLI on an existing scheduler (tcp://), the module's cluster.
    address = client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    assert main(["evaluate", *common, "--out", str(dask), "--cluster", address]) == 0
    assert f"dask: scheduler {address}, dashboard http://" in capsys.readouterr().out
    table = pd.read_csv(serial / "metrics.csv", keep_default_na=False)
    assert list(table["status"]) == ["ok", "ok", "ok", "invalid"]
    assert "external link" in table["message"].iloc[3]
    # Nothing in score is measured: every column, the h5 file and the per-scan caches agree.
    assert (serial / "metrics.csv").read_bytes() == (dask / "metrics.csv").read_bytes()
    with h5py.File(serial / "metrics.h5") as fa, h5py.File(dask / "metrics.h5") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            np.testing.assert_array_equal(fa[name][()], fb[name][()])
    for cache in (serial / "scans").glob("*.json"):
        assert json.loads(cache.read_text()) == json.loads((dask / "scans" / cache.name).read_text())
    # A cache written by one path is taken by the other: the serial rerun scores nothing.
    from tusrec.scoring import score as score_module

    calls = []
    original = score_module.score_file
    score_module.score_file = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        assert main(["evaluate", *common, "--out", str(dask)]) == 0
    finally:
        score_module.score_file = original
    assert calls == []
    assert (serial / "metrics.csv").read_bytes() == (dask / "metrics.csv").read_bytes()


# --------------------------------------------------------------------------- faults


def slow_unit(out: str, attempts: str, name: str, seconds: float) -> str:
    """A stand-in unit with the container unit's file discipline: it records each attempt,
    writes its output under a temporary name (partial for ``seconds``), then renames it."""
    Path(attempts, f"{name}.{os.getpid()}.{time.monotonic_ns()}").touch()
    target = Path(out) / f"{name}.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("partial")
        time.sleep(seconds)
        tmp.write_text(f"complete {name}")
    return f"{name} by {os.getpid()}"


def test_a_worker_killed_mid_unit_has_the_unit_redone_once(client, tmp_path):
    out, attempts = tmp_path / "out", tmp_path / "attempts"
    out.mkdir()
    attempts.mkdir()
    names = ["a", "b", "c"]
    units = [(n, (str(out), str(attempts), n, 6.0 if n == "a" else 0.2)) for n in names]
    got: dict = {}
    done: dict = {}

    def run():
        done["result"] = map_units(
            client, slow_unit, units, "stand-in", lambda k, r: got.setdefault(k, []).append(r)
        )

    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            if any(str(k).startswith("stand-in-a-") for k in keys) and list(attempts.glob("a.*")):
                victim = worker
        time.sleep(0.05)
    assert victim is not None, "unit a never started"
    pid = client.run(os.getpid, workers=[victim])[victim]
    time.sleep(0.5)  # well inside the unit: its partial file is written
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    result = done["result"]
    assert result.failed == {}
    assert sorted(got) == names and all(len(v) == 1 for v in got.values())  # counted once
    assert str(pid) not in got["a"][0]  # made by another worker process
    assert len(list(attempts.glob("a.*"))) == 2  # the killed attempt and its redo
    for n in names:
        assert (out / f"{n}.txt").read_text() == f"complete {n}"  # never the partial write
    # The killed attempt's temporary file is the only trace of it, and nothing reads it.
    assert {p.name for p in out.iterdir()} - {f"{n}.txt" for n in names} <= {f".a.txt.{pid}.tmp"}


def failing_unit(x: int) -> int:
    raise ValueError(f"unit {x} cannot be done")


def test_a_unit_that_keeps_failing_is_reported_not_counted(client):
    done = map_units(client, failing_unit, [("x", (1,))], "failing", retries=0)
    assert done.results == {} and "ValueError: unit 1 cannot be done" in done.failed["x"]


# --------------------------------------------------------------------------- recipes


def test_slurm_recipe_job_script():
    """The job script of the README's Slurm recipe (dask-jobqueue builds it; no Slurm here)."""
    pytest.importorskip("dask_jobqueue")
    from tusrec.cluster import slurm_gpu_workers

    cluster = slurm_gpu_workers(
        partition="gpu",
        account="tusrec",
        walltime="02:00:00",
        cores=8,
        memory="64GB",
        shared="/shared/tusrec",
        scheduler_host="127.0.0.1",
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert "#SBATCH -p gpu" in lines and "#SBATCH -A tusrec" in lines and "#SBATCH -t 02:00:00" in lines
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --cpus-per-task=8" in lines
    worker = next(line for line in lines if "dask_worker" in line)
    assert "--resources GPU=1" in worker and "--nanny" in worker
    # Each job starts its own rootless podman service and points the worker's DOCKER_HOST at it.
    prologue = "\n".join(lines[: lines.index(worker)])
    assert "podman system service --time=0 unix://" in prologue
    assert 'export DOCKER_HOST="unix://' in prologue
    assert "cd /shared/tusrec" in prologue and "export PYTHONPATH=/shared/tusrec" in prologue
    assert "export DASK_CONFIG=/shared/tusrec/configs/dask" in prologue
    # The container gets the job's GPU by its physical id (CUDA_VISIBLE_DEVICES may be renumbered).
    assert 'export TUSREC_WORKER_GPUS="${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"' in prologue

"""The README's Slurm recipe, run for real: ``slurm_gpu_workers`` (dask-jobqueue's
SLURMCluster) with ``cluster.scale(jobs=2)`` on a live Slurm, then ``./landmarks``,
``./evaluate score`` and ``./evaluate run`` with ``--cluster tcp://`` its scheduler, each
against the serial path; last, a job cancelled while its container runs.

It runs only on the one-node test cluster of scripts/slurm-one-node.sh (`make test-slurm`
brings it up, runs this file and stops it), or on the partition named by
TUSREC_SLURM_PARTITION: a `make test` on a site's login node must not submit jobs there.
Elsewhere every test is skipped, saying why. The cluster's "GPUs" are the one-node
script's stand-in GRES (two character devices that are not GPUs), so the GPU slot and the
id mapping (SLURM_JOB_GPUS -> TUSREC_WORKER_GPUS -> --gpus device=N) are Slurm's own, but
no container computes on a GPU here. The jobs run as root (rootful podman), in cgroups (v1)
where the machine has them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.cluster import SLURM_JOB_LABEL
from tusrec.data import open_data
from tusrec.harness.runner import RUNNER_LABEL, run_tag

pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
TEST_CLUSTER = "tusrec-test"  # ClusterName in scripts/slurm-one-node.sh
TEST_PARTITION = "tusrec"
JOBS = 2
BASE_IMAGE = os.environ.get("TUSREC_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
TEAM_IMAGE = "localhost/tusrec-slurm-copier:test"
SLEEPER_IMAGE = "localhost/tusrec-slurm-sleeper:test"
PODMAN_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'


def _slurm(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout


def slurm_partition() -> str:
    """The partition to run the recipe's jobs in, or a skip that says why there is none."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("no Slurm here (sbatch/sinfo not found): `make test-slurm` brings up a one-node Slurm")
    # `scontrol ping` answers at once; the other commands retry a controller that is down
    # for about 10 s.
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if " is UP" not in ping.stdout:
        answer = ((ping.stdout + ping.stderr).strip().splitlines() or ["no answer"])[0]
        pytest.skip(f"Slurm does not answer (scontrol ping: {answer}): `make test-slurm` starts it")
    config = _slurm("scontrol", "show", "config")
    name = next(
        (line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("ClusterName")), ""
    )
    partition = os.environ.get("TUSREC_SLURM_PARTITION")
    if partition is None:
        if name != TEST_CLUSTER:
            pytest.skip(
                f"Slurm cluster {name!r} is not the one-node test cluster of scripts/slurm-one-node.sh: "
                "set TUSREC_SLURM_PARTITION to run the recipe's jobs on one of its partitions"
            )
        partition = TEST_PARTITION
    states = _slurm("sinfo", "-h", "-N", "-p", partition, "-o", "%t").split()
    if not any(s in ("idle", "mix") for s in states):
        pytest.skip(f"partition {partition!r} has no idle node (sinfo: {states or 'none'})")
    return partition


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The recipe's cluster with 2 jobs running: a client on its scheduler, the Slurm job of
    each worker, and the measured times (seconds)."""
    # Imported here, not at the top: the workers import this module to run _env_of_worker,
    # and dask_jobqueue, imported, writes its jobqueue.yaml into the first DASK_CONFIG path
    # (the workers': this checkout's configs/dask).
    pytest.importorskip("dask_jobqueue")
    partition = slurm_partition()
    from distributed import Client

    from tusrec.cluster import slurm_gpu_workers

    logs = tmp_path_factory.mktemp("slurm-logs")
    saved = os.environ.get("CONTAINERS_CONF")
    if saved is None and shutil.which("podman"):
        # sbatch passes this environment to the job (--export=ALL): the job's podman service
        # needs the settings .ci/containers.sh writes for these machines.
        conf = logs / "containers.conf"
        conf.write_text(PODMAN_CONF)
        os.environ["CONTAINERS_CONF"] = str(conf)
    times: dict = {}
    t0 = time.perf_counter()
    # The recipe as the README gives it, sized for a 2-core node: 1 core and 2 GB a job.
    cluster = slurm_gpu_workers(
        partition=partition,
        shared=str(ROOT),
        walltime="00:30:00",
        cores=1,
        memory="2GB",
        log_directory=str(logs),
    )
    times["scheduler_start_s"] = time.perf_counter() - t0
    client = Client(cluster)
    try:
        t0 = time.perf_counter()
        cluster.scale(jobs=JOBS)
        seen: dict = {}
        deadline = time.monotonic() + 180
        while len(seen) < JOBS and time.monotonic() < deadline:
            for address in client.scheduler_info(n_workers=-1)["workers"]:
                seen.setdefault(address, time.perf_counter() - t0)
            time.sleep(0.05)
        if len(seen) < JOBS:
            queue = _slurm("squeue", "-o", "%i %j %T %R")
            output = "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("*.err")))
            pytest.fail(f"{len(seen)} of {JOBS} Slurm workers after 180 s:\n{queue}\n{output}")
        times["worker_ready_s"] = sorted(seen.values())  # from scale() to each worker's arrival
        jobs = {w.job_id for w in cluster.workers.values()}
        # Slurm's own view (whole seconds): from sbatch to the job running on the node.
        times["slurm_submit_to_start_s"] = sorted(_submit_to_start(job) for job in jobs)
        print(f"\nslurm: {times}")
        yield SimpleNamespace(
            cluster=cluster, client=client, address=cluster.scheduler_address, jobs=jobs, times=times
        )
    finally:
        t0 = time.perf_counter()
        client.close()
        cluster.close()  # scancel of its jobs
        print(f"slurm: cluster.close {time.perf_counter() - t0:.1f} s")
        if saved is None:
            os.environ.pop("CONTAINERS_CONF", None)


def _submit_to_start(job: str) -> int:
    """Seconds from a job's SubmitTime to its StartTime (scontrol, whole seconds)."""
    from datetime import datetime

    fields = dict(f.split("=", 1) for f in _slurm("scontrol", "show", "job", "-o", job).split() if "=" in f)
    submit, start = (datetime.fromisoformat(fields[k]) for k in ("SubmitTime", "StartTime"))
    return int((start - submit).total_seconds())


def _env_of_worker() -> dict:
    from tusrec.cluster import worker_gpus

    names = (
        "SLURM_JOB_ID",
        "SLURM_JOB_GPUS",
        "TUSREC_WORKER_GPUS",
        "DOCKER_HOST",
        "PYTHONPATH",
        "DASK_CONFIG",
    )
    env = {n: os.environ.get(n) for n in names}
    env["MALLOC_TRIM_THRESHOLD_"] = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    env["gpus"] = worker_gpus("all")
    env["cwd"] = os.getcwd()
    host = env["DOCKER_HOST"] or ""
    env["engine_socket"] = host.startswith("unix://") and Path(host[len("unix://") :]).is_socket()
    return env


def test_each_slurm_job_is_one_gpu_worker_with_its_own_engine(slurm):
    workers = slurm.client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == JOBS
    assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in workers.values())
    envs = list(slurm.client.run(_env_of_worker).values())
    assert {e["SLURM_JOB_ID"] for e in envs} == slurm.jobs  # one worker per job, each in its own
    gpus = sorted(e["TUSREC_WORKER_GPUS"] for e in envs)
    assert all(e["TUSREC_WORKER_GPUS"] == e["SLURM_JOB_GPUS"] for e in envs)
    assert len(set(gpus)) == JOBS and all(g.isdigit() for g in gpus)  # Slurm gave each its own
    assert sorted(e["gpus"] for e in envs) == [f"device={g}" for g in gpus]  # what --gpus all maps to
    for e in envs:
        assert e["cwd"] == e["PYTHONPATH"] == str(ROOT)
        assert e["DASK_CONFIG"] == f"{ROOT}/configs/dask" and e["MALLOC_TRIM_THRESHOLD_"] is None
        assert e["DOCKER_HOST"].endswith(f"/tusrec-podman-{e['SLURM_JOB_ID']}.sock")
        assert e["engine_socket"], e["DOCKER_HOST"]  # the job's podman service is listening


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory) -> Path:
    """4 simulated 2024 scans of 30 frames at 120 x 160 (real SIFT features), no landmarks."""
    from tusrec.simulate.dataset import simulate_dataset

    root = tmp_path_factory.mktemp("sim") / "data"
    names = ["LH_Par_C_DtP", "RH_Per_L_PtD", "LH_Per_S_DtP", "RH_Par_L_PtD"]
    simulate_dataset(root, [50], names=names, frames=30, image_size=(120, 160), landmarks=False)
    return root


def _command(*args: str, env: dict | None = None, timeout: float = 600) -> tuple[str, float]:
    """A root command (./landmarks, ./evaluate) in its own process; (stdout, seconds)."""
    t0 = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, f"{args}: {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout, seconds


def _units_by_worker(client, since: float, prefix: str) -> dict:
    """{worker address: units run} of the tasks whose key starts with ``prefix`` (the
    scheduler's task stream)."""
    out: dict = {}
    for task in client.get_task_stream(start=since):
        if str(task["key"]).startswith(prefix):
            out[task["worker"]] = out.get(task["worker"], 0) + 1
    return out


def test_landmarks_on_slurm_are_the_serial_ones(slurm, sim_root, tmp_path):
    serial, dask = tmp_path / "serial", tmp_path / "slurm"
    _, t_serial = _command("./landmarks", str(sim_root), "--out", str(serial))
    slurm.client.get_task_stream()  # starts the scheduler's task stream (a no-op when on)
    since = time.time()
    out, t_slurm = _command("./landmarks", str(sim_root), "--out", str(dask), "--cluster", slurm.address)
    print(f"\nslurm: landmarks of 4 scans: serial {t_serial:.1f} s, on the 2 Slurm workers {t_slurm:.1f} s")
    assert f"dask: scheduler {slurm.address}" in out
    ran = _units_by_worker(slurm.client, since, "landmarks-")
    assert sum(ran.values()) == 4 and set(ran) <= set(slurm.client.scheduler_info(n_workers=-1)["workers"])
    files = sorted(p.name for p in serial.iterdir())
    assert files == ["landmark_050.h5"] == sorted(p.name for p in dask.iterdir())
    assert (serial / files[0]).read_bytes() == (dask / files[0]).read_bytes()
    with h5py.File(dask / files[0]) as f:
        assert len(f) == 4 and all(f[name].shape == (20, 3) for name in f)


@pytest.fixture(scope="module")
def scored_data(sim_root, tmp_path_factory) -> Path:
    """sim_root with its landmarks (the serial path's), in a folder of its own."""
    root = tmp_path_factory.mktemp("scored") / "data"
    shutil.copytree(sim_root, root)
    _command("./landmarks", str(root))
    return root


def test_score_on_slurm_is_the_serial_score(slurm, scored_data, tmp_path):
    from tests.test_cluster import _predictions  # noisy ground truth, one invalid file, a manifest

    data = open_data(scored_data)
    pred = tmp_path / "pred"
    _predictions(data, pred)
    serial, dask = tmp_path / "serial", tmp_path / "slurm"
    common = ["./evaluate", "score", str(pred), "--data", str(scored_data), "--chunk", "4"]
    _, t_serial = _command(*common, "--out", str(serial))
    since = time.time()
    out, t_slurm = _command(*common, "--out", str(dask), "--cluster", slurm.address)
    print(f"\nslurm: score of 4 scans: serial {t_serial:.1f} s, on the 2 Slurm workers {t_slurm:.1f} s")
    assert f"dask: scheduler {slurm.address}" in out
    assert sum(_units_by_worker(slurm.client, since, "score").values()) == 4
    table = pd.read_csv(serial / "metrics.csv", keep_default_na=False)
    assert list(table["status"]) == ["ok", "ok", "ok", "invalid"]
    for name in ("metrics.csv", "metrics.h5"):
        assert (serial / name).read_bytes() == (dask / name).read_bytes(), name
    with h5py.File(serial / "metrics.h5") as fa, h5py.File(dask / "metrics.h5") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            np.testing.assert_array_equal(fa[name][()], fb[name][()])
    caches = sorted(p.name for p in (serial / "scans").glob("*.json"))
    assert len(caches) == 4 and caches == sorted(p.name for p in (dask / "scans").glob("*.json"))
    for name in caches:
        assert json.loads((serial / "scans" / name).read_text()) == json.loads(
            (dask / "scans" / name).read_text()
        )


# --------------------------------------------------------------------------- ./evaluate run


@pytest.fixture(scope="module")
def engine(slurm, tmp_path_factory):
    """A podman API service for the serial run (the Slurm workers start their own, in
    their jobs, on the same storage); the environment the root commands get."""
    import docker

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (bash .ci/containers.sh installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode != 0:
        pytest.skip(f"no base image {BASE_IMAGE} (bash .ci/containers.sh makes it)")
    socket = tmp_path_factory.mktemp("engine") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env["DOCKER_HOST"] = f"unix://{socket}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                docker.DockerClient(base_url=env["DOCKER_HOST"]).ping()
                break
            except Exception:
                if time.monotonic() > deadline or service.poll() is not None:
                    pytest.fail("podman system service did not start")
                time.sleep(0.2)
        yield env
    finally:
        service.terminate()
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()


@pytest.fixture(scope="module")
def team_image(engine, scored_data, tmp_path_factory) -> str:
    """A team image (the tests' Debian base, no Python) that copies each staged scan's true
    prediction (made here) into /output: every scan judged ok, with exact metrics."""
    context = tmp_path_factory.mktemp("copier")
    keys = open_data(scored_data).keys
    _command(
        sys.executable,
        "-m",
        "tusrec",
        "reference",
        "ground-truth",
        str(scored_data),
        "--out",
        str(context / "payload"),
        env=engine,
    )
    (context / "run.sh").write_text(
        "#!/bin/bash\nset -e\n"
        "for f in /input/frames/*/*.h5; do s=$(basename $(dirname $f)); k=sub${s}__$(basename $f .h5); "
        "cp --no-preserve=all /opt/payload/$k.h5 /output/; done\n"
    )
    (context / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nCOPY payload /opt/payload/\nCOPY run.sh /opt/run.sh\n"
        'USER 10001:10001\nENTRYPOINT ["/bin/bash", "/opt/run.sh"]\n'
    )
    assert len(list((context / "payload").glob("*.h5"))) == len(keys)
    subprocess.run(
        ["podman", "build", "-q", "-t", TEAM_IMAGE, str(context)], check=True, capture_output=True, env=engine
    )
    return TEAM_IMAGE


def test_run_on_slurm_gives_the_serial_results(slurm, engine, team_image, scored_data, tmp_path):
    """`./evaluate run` with the containers started by the Slurm workers on the podman
    services of their jobs: the serial runner's tables but for the measured runtimes."""
    serial, dask = tmp_path / "serial", tmp_path / "slurm0"  # the same length: messages hold paths
    common = ["./evaluate", "run", "--team", f"copier={team_image}", "--data", str(scored_data)]
    common += ["--time-limit", "60", "--memory", "1g", "--no-rank", "--keep-predictions"]
    _, t_serial = _command(*common, "--out", str(serial), env=engine)
    since = time.time()
    _, t_slurm = _command(*common, "--out", str(dask), "--cluster", slurm.address, env=engine)
    print(f"\nslurm: run of 4 scans: serial {t_serial:.1f} s, on the 2 Slurm workers {t_slurm:.1f} s")
    ran = _units_by_worker(slurm.client, since, "run-")
    assert sum(ran.values()) == 4, ran
    a, b = (pd.read_csv(x / "copier" / "metrics.csv", keep_default_na=False) for x in (serial, dask))
    assert list(a["status"]) == ["ok"] * 4, a["message"].tolist()
    runtime = [c for c in a.columns if c.startswith("runtime")]
    pd.testing.assert_frame_equal(a.drop(columns=runtime), b.drop(columns=runtime))
    kept = [sorted(p.name for p in (x / "copier" / "predictions").glob("*.h5")) for x in (serial, dask)]
    assert len(kept[0]) == 4 and kept[0] == kept[1]
    for name in kept[0]:
        assert (serial / "copier" / "predictions" / name).read_bytes() == (
            dask / "copier" / "predictions" / name
        ).read_bytes()
    assert not (dask / ".staging").exists() and not (dask / "copier" / ".work").exists()


def test_a_job_cancelled_mid_unit_leaves_no_container(slurm, engine, scored_data, tmp_path):
    """scancel of a worker's job while its container runs: the unit is redone on the other
    worker and counted once, and the epilog (scripts/slurm-epilog.sh) removes the container,
    which podman placed outside the job's cgroups and which would otherwise run on
    unwatched. Last in this file: it leaves the cluster one worker."""
    import docker

    context = tmp_path / "sleeper"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f'FROM {BASE_IMAGE}\nUSER 10001:10001\nENTRYPOINT ["sleep", "3600"]\n'
    )
    subprocess.run(
        ["podman", "build", "-q", "-t", SLEEPER_IMAGE, str(context)],
        check=True,
        capture_output=True,
        env=engine,
    )
    client = docker.DockerClient(base_url=engine["DOCKER_HOST"])

    keys = open_data(scored_data).keys[:2]
    out = tmp_path / "out"

    def sleepers() -> dict:
        """{container id: the Slurm job label} of this run's containers (only those: the
        engine's storage is shared with other runs, other tests' included)."""
        label = f"{RUNNER_LABEL}={run_tag(out)}"
        found = client.containers.list(all=True, sparse=True, filters={"label": label})
        return {c.id: (c.attrs.get("Labels") or {}).get(SLURM_JOB_LABEL) for c in found}

    command = ["./evaluate", "run", "--team", f"slurmsleeper={SLEEPER_IMAGE}", "--data", str(scored_data)]
    command += [
        "--out",
        str(out),
        "--time-limit",
        "10",
        "--no-rank",
        "--keys",
        *keys,
        "--cluster",
        slurm.address,
    ]
    run = subprocess.Popen(
        command, cwd=ROOT, env=engine, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not sleepers() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = sleepers()
        assert started, "no container started"
        victim, job = next(iter(started.items()))
        assert job in slurm.jobs  # the label names the worker's own job
        t0 = time.perf_counter()
        subprocess.run(["scancel", job], check=True)
        while victim in sleepers() and time.perf_counter() - t0 < 60:
            time.sleep(0.2)
        gone = time.perf_counter() - t0
        print(f"\nslurm: job {job} cancelled; its container removed by the epilog {gone:.1f} s later")
        assert victim not in sleepers(), "the cancelled job's container is still there after 60 s"
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]
    table = pd.read_csv(out / "slurmsleeper" / "metrics.csv", keep_default_na=False)
    assert list(table["key"]) == keys and list(table["status"]) == ["timeout", "timeout"]  # each once
    assert sleepers() == {}

"""Evaluate on a cluster: landmarks, scoring and the container runner on Dask distributed.

``--cluster`` of ``./landmarks``, ``./evaluate score`` and ``./evaluate run``:

- omitted: the in-process path (this module is not imported);
- ``local:N``: a ``distributed.LocalCluster`` of N worker processes (one thread each) on
  this machine; for ``run`` each worker holds one ``GPU`` slot;
- ``tcp://HOST:PORT``: an existing Dask scheduler, whose workers were started by the
  organisers (README, "Evaluating on a cluster").

A *unit* is one scan's landmarks, one (team, scan) scoring or one (team, scan) container
run. Units are Dask futures; nothing here queues, schedules or retries by itself: Dask's
scheduler places them, its ``resources`` send container runs only to workers holding
``GPU=1``, its ``retries`` redo a unit that raised, and a unit whose worker died is
rescheduled by Dask on another worker (``distributed.scheduler.allowed-failures``).

Files: a unit never writes a table. A scoring unit and a container unit write their
per-scan cache (``scans/<key>.json``), a container unit its logs and kept prediction,
each under a temporary name renamed into place (``tusrec.data.atomic_path``), into the
output folder that the client and every worker see at the same path (shared storage).
The client merges the rows it receives into ``metrics.csv``/``metrics.h5`` and landmark
files exactly as the in-process path does, in the same order, so the tables are the same.
A unit that was killed half-way leaves at most a temporary file or a work folder, which
nothing reads; its redo starts from nothing.

Container units keep every rule of ``tusrec.evaluate.runner`` unchanged (staging, the
container's limits, the time limit and /output quota watched from outside by the worker,
judging, capped logs): they call the runner's functions. Each worker process has its own
watchdog (``tusrec.evaluate.watchdog``) for the containers it starts, on its own engine
(its ``DOCKER_HOST``); when the worker dies, however, its containers are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from tusrec.evaluate.runner import RunnerError

LOCAL = "local"
REMOTE = "tcp"
GPU = "GPU"  # the Dask resource a worker holds per GPU (or per container slot on a CPU node)
WORKER_GPUS_ENV = "TUSREC_WORKER_GPUS"  # device ids of the worker's own GPU(s), e.g. "2"
SLURM_JOB_LABEL = "tusrec.slurm.job"  # on a container a Slurm job's worker started: the job id
UNIT_RETRIES = 2  # Dask retries of a unit that raised (an engine or file-system hiccup)
_LOCAL_SPEC = re.compile(r"^local:(\d+)$")
_TCP_SPEC = re.compile(r"^tcp://[^\s/:]+:\d+$")


class ClusterError(RunnerError):
    """The cluster cannot be used (a bad --cluster, no worker, units that could not run).
    A RunnerError, so that `./evaluate run` reports it as it reports the engine's."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``--cluster`` asked for: ``local`` with ``workers``, or a scheduler ``address``."""

    kind: str
    workers: int = 0
    address: str = ""


def parse_cluster(text: str | None) -> ClusterSpec | None:
    """``None`` -> None (in process); ``'local:N'`` -> N local workers;
    ``'tcp://HOST:PORT'`` -> that scheduler. Anything else raises ClusterError."""
    if text is None:
        return None
    m = _LOCAL_SPEC.fullmatch(text.strip())
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 1024:
            raise ClusterError(f"--cluster {text!r}: local:N needs 1 <= N <= 1024")
        return ClusterSpec(LOCAL, workers=n)
    if _TCP_SPEC.fullmatch(text.strip()):
        return ClusterSpec(REMOTE, address=text.strip())
    raise ClusterError(f"--cluster {text!r}: expected local:N (e.g. local:4) or tcp://HOST:PORT")


@contextlib.contextmanager
def connect(spec: ClusterSpec, gpu_slots: bool = False, log=print):
    """A ``distributed.Client`` on ``spec``; a local cluster is made and closed here.

    gpu_slots: each local worker holds ``GPU=1`` (container units need one). Prints the
    dashboard address when there is one.
    """
    from distributed import Client

    cluster = None
    if spec.kind == LOCAL:
        cluster = local_cluster(spec.workers, gpu_slots)
        client = Client(cluster)
    else:
        try:
            client = Client(spec.address, timeout="30s")
        except OSError as err:
            raise ClusterError(f"no Dask scheduler at {spec.address} ({err})") from None
    try:
        link = dashboard_link(client)
        where = f"local cluster of {spec.workers} workers" if cluster else f"scheduler {spec.address}"
        log(f"dask: {where}" + (f", dashboard {link}" if link else " (no dashboard)"), flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def local_cluster(workers: int, gpu_slots: bool = False):
    """The LocalCluster of ``--cluster local:N``: N worker processes of one thread each
    (a worker is a slot), each holding ``GPU=1`` with ``gpu_slots``."""
    import dask
    from distributed import LocalCluster

    # As configs/dask/tusrec.yaml, which the recipes' workers read through DASK_CONFIG.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # a free port: other runs may hold 8787
        resources={GPU: 1} if gpu_slots else None,
        silence_logs=logging.ERROR,
    )


def dashboard_link(client) -> str:
    """The scheduler's dashboard address, or '' when it serves none (no bokeh there)."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:
        return ""
    return client.dashboard_link if "dashboard" in services else ""


def worker_gpus(requested: str | None, environ: dict | None = None) -> str | None:
    """The ``--gpus`` a container gets on this worker: its own device only.

    requested: the run's --gpus (None: no GPU, whatever the worker has). The worker's own
    device ids are ``TUSREC_WORKER_GPUS`` if set (e.g. '2' or '2,3'), else the first id of
    ``CUDA_VISIBLE_DEVICES`` (dask-cuda puts a worker's own device first there); a worker
    with neither passes ``requested`` unchanged (one GPU per machine, as on a node pool of
    one-GPU nodes or a Kubernetes pod with one GPU).
    """
    if not requested:
        return None
    environ = os.environ if environ is None else environ
    own = environ.get(WORKER_GPUS_ENV, "").strip()
    if not own:
        visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        own = visible.split(",")[0].strip() if visible else ""
    return f"device={own}" if own else requested


# --------------------------------------------------------------------------- running units


@dataclass
class UnitsDone:
    """What ``map_units`` got back: results by unit name, and the units Dask gave up on."""

    results: dict
    failed: dict  # unit name -> 'ExceptionType: message'


def map_units(
    client,
    fn: Callable,
    units: Iterable[tuple[str, tuple]],
    desc: str,
    on_result: Callable[[str, object], None] | None = None,
    resources: dict | None = None,
    retries: int = UNIT_RETRIES,
    total: int | None = None,
    done: int = 0,
) -> UnitsDone:
    """Run ``fn(*args)`` for each (name, args) as Dask futures, with a progress bar over
    units; call ``on_result(name, result)`` in this process as each one finishes.

    Each unit is one future with a key of its own (name + a token of this call), so two
    runs on one scheduler never share a result. A unit counts once: its result is taken
    from the one future that holds it, whichever worker (or attempt) made it. A unit that
    raised more than ``retries`` times, or whose workers kept dying (KilledWorker), is in
    ``failed``. ``total``/``done``: the bar's size and the units already done (skipped).
    """
    from distributed import as_completed

    token = uuid.uuid4().hex[:10]
    futures = {}
    for name, args in units:
        future = client.submit(
            fn, *args, key=f"{desc}-{name}-{token}", pure=False, resources=resources, retries=retries
        )
        futures[future] = name
    out = UnitsDone({}, {})
    bar = tqdm(total=total if total is not None else len(futures), desc=desc, unit="unit", disable=None)
    bar.update(done)
    try:
        for future in as_completed(futures):
            name = futures.pop(future)
            if future.status == "finished":
                result = future.result()
                out.results[name] = result
                if on_result is not None:
                    on_result(name, result)
            else:  # 'error' (raised, or KilledWorker) or 'cancelled' (the scheduler dropped it)
                try:
                    err = future.exception()
                except Exception as lost:
                    err = lost
                out.failed[name] = f"{type(err).__name__}: {err}"
                bar.write(f"{name}: not done ({out.failed[name]})")
            future.release()
            bar.update()
    finally:
        bar.close()
        for future in futures:  # interrupted: nothing left running for this client
            future.cancel()
    return out


def _fail_if_units_failed(done: UnitsDone, what: str) -> None:
    if done.failed:
        names = ", ".join(sorted(done.failed)[:5])
        raise ClusterError(
            f"{len(done.failed)} {what} unit(s) could not be done on the cluster (e.g. {names}: "
            f"{next(iter(done.failed.values()))}); the others are written, a rerun does the rest"
        )


# --------------------------------------------------------------------------- landmarks


def landmarks_unit(scan, k: int | None):
    """One scan's landmarks, on a worker: (K, 3) int64 (tusrec.landmarks.extract_landmarks,
    one SIFT thread: the worker is the unit of parallelism)."""
    from tusrec.landmarks import extract_landmarks

    return extract_landmarks(scan, k, workers=1)


def write_data_landmarks(
    client,
    data,
    k: int | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    keys: list[str] | None = None,
) -> dict:
    """``tusrec.landmarks.write_data_landmarks`` with one unit per scan on the cluster.

    The same scans are skipped, the same arrays come back (the same function), and this
    process writes each into landmark_<sub>.h5 as it arrives (the file is rewritten
    atomically, its datasets sorted by name), so the files are those of the in-process
    path and an interrupted run resumes the same way.
    """
    from tusrec.data import h5_has_dataset, write_landmarks

    scans = data.select(keys)

    def path_of(scan) -> Path:
        if out_dir is not None:
            return Path(out_dir) / f"landmark_{scan.subject}.h5"
        return data.landmark_path(scan.subject)

    todo = [s for s in scans if overwrite or not h5_has_dataset(path_of(s), s.name)]
    by_key = {s.key: s for s in todo}
    made: dict = {}

    def merge(key, lm) -> None:
        scan = by_key[key]
        write_landmarks(path_of(scan), {scan.name: lm})
        made[key] = lm

    done = map_units(
        client,
        landmarks_unit,
        [(s.key, (s, k)) for s in todo],
        "landmarks",
        merge,
        total=len(scans),
        done=len(scans) - len(todo),
    )
    _fail_if_units_failed(done, "landmark")
    return {s.key: made[s.key] for s in todo}


# --------------------------------------------------------------------------- simulation


def simulate_unit(
    root: str, layout: str, subject: int, name: str, n_frames: int, seed: int, calib, image_size
):
    """One synthetic scan on a worker, written into the data folder (``write_scan``
    writes each file under a temporary name and renames it when complete)."""
    from tusrec.data import write_scan
    from tusrec.simulate import simulate_scan

    sim = simulate_scan(subject, name, n_frames, seed=seed, calib=calib, image_size=image_size)
    write_scan(root, layout, subject, name, sim.frame_chunks(), sim.tforms)
    return n_frames


def simulate_dataset(
    client,
    root,
    subjects: list[int],
    protocol: str = "2024",
    layout: str | None = None,
    frames="300",
    names: list[str] | None = None,
    seed: int = 0,
    calib=None,
    image_size: tuple[int, int] = (480, 640),
    landmarks: bool = True,
    k: int | None = None,
) -> list[str]:
    """``tusrec.simulate.dataset.simulate_dataset`` with one unit per scan (and the
    landmarks on the cluster too): the same scans, frame counts, files and keys. Each
    scan depends only on (seed, subject, name), so where it is made does not matter."""
    from tusrec.data import (
        EVAL,
        KEYS_FILE,
        open_data,
        open_h5,
        scan_key,
        write_data_calibration,
        write_dataset_keys,
    )
    from tusrec.geometry import default_calibration
    from tusrec.simulate import scan_names
    from tusrec.simulate.dataset import FrameCount, _complete, landmark_folder

    layout = layout or EVAL
    root = Path(root)
    calib = calib or default_calibration()
    frames = frames if isinstance(frames, FrameCount) else FrameCount.parse(frames)
    names = names or scan_names(protocol)
    write_data_calibration(root, calib)
    (root / landmark_folder(protocol, layout)).mkdir(parents=True, exist_ok=True)
    jobs = [(s, n) for s in subjects for n in names]
    keys = [scan_key(s, n) for s, n in jobs]
    units = []
    for subject, name in jobs:
        if not _complete(root, layout, subject, name):
            n_frames = frames.for_scan(seed, subject, name)
            args = (str(root), layout, subject, name, n_frames, seed, calib, image_size)
            units.append((scan_key(subject, name), args))
    done = map_units(client, simulate_unit, units, "simulate", total=len(jobs), done=len(jobs) - len(units))
    _fail_if_units_failed(done, "simulation")
    if layout == EVAL:
        earlier = []
        if (root / KEYS_FILE).is_file():
            with open_h5(root / KEYS_FILE) as f:
                earlier = list(f.keys())
        write_dataset_keys(root, [*earlier, *keys])
    if landmarks:
        write_data_landmarks(client, open_data(root), k=k, keys=keys)
    return keys


# --------------------------------------------------------------------------- scoring


def score_unit(job) -> dict:
    """One (team, scan) scoring on a worker: the serial path's own ScoringJob (score_file,
    the bounded worker and read policy; the row cached atomically); returns the row."""
    return job.run()


def score_predictions(
    client,
    folder,
    data,
    out_dir,
    chunk: int | None = None,
    keys: list[str] | None = None,
    limits=None,
) -> pd.DataFrame:
    """``tusrec.evaluate.score.score_predictions`` with one unit per scan on the cluster:
    the same plan (checks, per-scan cache: a scan cached by either path is not scored
    again by the other), the same jobs, the same rows in the same order, the same files."""
    from tusrec.ddf import DEFAULT_CHUNK
    from tusrec.evaluate.score import ScoreLimits, plan_scoring, write_metrics

    limits = replace(limits or ScoreLimits(), chunk=chunk or DEFAULT_CHUNK)
    plan = plan_scoring(folder, data, out_dir, limits, keys)
    done = map_units(
        client,
        score_unit,
        [(job.scan.key, (job,)) for job in plan.jobs],
        "score",
        lambda key, row: plan.rows.__setitem__(key, row),
        total=len(plan.scans),
        done=len(plan.rows),
    )
    table = plan.table()
    write_metrics(table, Path(out_dir))
    _fail_if_units_failed(done, "scoring")
    return table


# --------------------------------------------------------------------------- container runs


_ENGINE = None
_WATCHDOG = None
_LOCK = threading.Lock()


def _engine():
    """This worker's container engine (its DOCKER_HOST), one client per process."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            from tusrec.evaluate.runner import _client

            _ENGINE = _client()
        return _ENGINE


def _worker_watchdog():
    """This worker process's watchdog (the runner's own): it removes the containers this
    process started when the process dies, and any of them past its deadline. On a
    cluster the worker process is the 'run' of the runner's ``tusrec.run`` label: the
    watchdog acts on the process's own id, so one worker's death never takes the other
    workers' containers on a shared engine with it, nor the redo's."""
    global _WATCHDOG
    with _LOCK:
        if _WATCHDOG is None or _WATCHDOG.process.poll() is not None:
            from tusrec.evaluate.runner import Watchdog

            run_id = uuid.uuid4().hex
            log_path = Path(tempfile.gettempdir()) / f"tusrec-watchdog-{run_id}.log"
            _WATCHDOG = Watchdog(run_id, log_path)
            _WATCHDOG.run_id = run_id
        return _WATCHDOG


def engine_image_ids(teams) -> dict:
    """On a worker: {team name: image id} on its engine, or {'error': message}."""
    from tusrec.evaluate.runner import RunnerError, _image_ids

    try:
        return _image_ids(_engine(), teams)
    except RunnerError as err:
        return {"error": str(err)}


def remove_run_containers(tag: str) -> int:
    """On a worker: remove the containers of run ``tag`` that a dead run left on its engine."""
    from tusrec.evaluate.runner import RUNNER_LABEL
    from tusrec.evaluate.watchdog import remove_labelled

    return len(remove_labelled(_engine(), RUNNER_LABEL, tag))


class SupersededError(RuntimeError):
    """A unit's work folder was removed under it: a newer run of the same --out took over
    (this unit's client died), so this attempt writes nothing."""


def container_unit(team, image_id: str, scan, data, out: str, limits, tag: str, signature: dict, keep: bool):
    """One (team, scan) container run on a worker holding a GPU slot; returns its row.

    Everything tusrec.evaluate.runner does for one scan, on this worker's engine: the scan
    staged alone, the container with the run's limits (``--gpus`` mapped to this worker's
    own device), killed from here at the time limit or over the /output quota, judged
    (the scorer's bounded worker), its log and manifest kept, its prediction kept or
    deleted, the row cached. The staging and work folders are this attempt's own (a
    unique name), so an attempt on a dead worker shares nothing with its redo.
    """
    from tusrec.data import atomic_path
    from tusrec.evaluate.runner import (
        OK,
        RUN_LABEL,
        RUNNER_LABEL,
        RunnerError,
        Watch,
        _fresh_dir,
        _json_value,
        judge,
        output_quota,
        remove_tree,
        run_container,
        stage_scan,
    )

    engine = _engine()
    found = engine.images.get(team.image).id
    if found != image_id:
        raise RunnerError(
            f"team {team.name}: image {team.image!r} is {found[:19]} on this worker's engine, "
            f"{image_id[:19]} where the run started: load the same image on every worker"
        )
    watchdog = _worker_watchdog()
    limits = replace(limits, gpus=worker_gpus(limits.gpus))
    out = Path(out)
    team_dir = out / team.name
    attempt = uuid.uuid4().hex[:8]
    staged = out / ".staging" / team.name / f"{scan.key}-{attempt}"
    output_dir = team_dir / ".work" / f"{scan.key}-{attempt}"
    try:
        stage_scan(scan, data, staged)
        _fresh_dir(output_dir)
        log_path = team_dir / "logs" / f"{scan.key}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        labels = {
            RUNNER_LABEL: tag,  # the --out folder's: a rerun removes what a dead run left
            RUN_LABEL: watchdog.run_id,  # this worker process's: what its watchdog acts on
            "tusrec.team": team.name,
            "tusrec.scan": scan.key,
        }
        if os.environ.get("SLURM_JOB_ID"):
            # A cancelled job's container outlives it (podman puts it outside the job's
            # cgroups) and its watchdog: the job's epilog removes it by this label
            # (scripts/slurm-epilog.sh).
            labels[SLURM_JOB_LABEL] = os.environ["SLURM_JOB_ID"]
        quota = output_quota(scan, int(limits.output_quota_margin_mb * 1e6))
        result = run_container(
            engine,
            team.image,
            staged,
            output_dir,
            limits,
            log_path,
            labels,
            Watch(output_dir, quota, watchdog),
        )
        if not output_dir.is_dir():
            raise SupersededError(f"{team.name} {scan.key}: work folder removed by a newer run")
        row, manifest = judge(scan, data, output_dir, result, limits, log_path, quota)
        row["image"] = team.image
        row["message"] = str(row.get("message", "")).replace(f"{output_dir}/", "")  # a path soon gone
        if manifest is not None:
            with atomic_path(log_path.with_suffix(".predictions.csv")) as tmp:
                tmp.write_bytes(manifest)
        prediction = output_dir / f"{scan.key}.h5"
        if keep and row["status"] == OK:
            kept_dir = team_dir / "predictions"
            kept_dir.mkdir(exist_ok=True)
            os.replace(prediction, kept_dir / prediction.name)  # judged a regular file
        with atomic_path(team_dir / "scans" / f"{scan.key}.json") as tmp:
            tmp.write_text(json.dumps({"signature": signature, "row": row}, default=_json_value))
        return row
    finally:
        remove_tree(output_dir)  # the dense arrays: GB per scan
        remove_tree(staged)


def _gpu_workers(client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(GPU, 0) >= 1)


def run_teams(client, teams, data, out, limits=None, keys=None, keep_predictions=False, log=print) -> dict:
    """``tusrec.evaluate.runner.run_teams`` with one unit per (team, scan) on the cluster's
    GPU workers: the same skipping of judged scans, the same rows, tables, kept files and
    kept predictions.csv, merged here as the units finish."""
    from tusrec.data import TusrecDataError
    from tusrec.evaluate.runner import (
        OK,
        Limits,
        RunnerError,
        _kept_manifest,
        data_signature,
        remove_tree,
        run_tag,
        runner_peak_rss_mb,
    )
    from tusrec.evaluate.score import write_metrics

    limits = limits or Limits()
    out = Path(out).resolve()  # workers see the same path (shared storage)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{data.root}: no scans found")
    data.require_ground_truth(scans, "the runner scores every scan and needs the transfs/ folder")
    client.wait_for_workers(1, timeout=300)
    gpu = _gpu_workers(client)
    if not gpu:
        raise ClusterError(
            f"no worker of the cluster holds a {GPU} resource (start them with --resources {GPU}=1)"
        )
    found = client.run(engine_image_ids, teams, workers=gpu)
    image_ids = None
    for worker, ids in sorted(found.items()):
        if "error" in ids:
            raise RunnerError(f"worker {worker}: {ids['error']}")
        if image_ids is not None and ids != image_ids:
            raise RunnerError(f"worker {worker} has other images for the teams than {gpu[0]}: {ids}")
        image_ids = ids
    tag = run_tag(out)
    out.mkdir(parents=True, exist_ok=True)
    # What a dead run on this --out left: its containers on every engine, its folders.
    client.run(remove_run_containers, tag, workers=gpu)
    remove_tree(out / ".staging")
    for work in out.glob("*/.work"):  # only the runner makes these; nothing in them is kept
        remove_tree(work)
    rows: dict[str, dict[str, dict]] = {t.name: {} for t in teams}
    units = []
    for scan in scans:
        depends = data_signature(
            scan.frames_path, scan.tforms_path, scan.landmark_path, data.calibration_path
        )
        for team in teams:
            kept_dir = out / team.name / "predictions"
            signature = {"image": image_ids[team.name], "time_limit_s": limits.time_limit_s, "data": depends}
            cache = out / team.name / "scans" / f"{scan.key}.json"
            if cache.exists():
                cached = json.loads(cache.read_text())
                row = cached.get("row") or {}
                lost = (
                    keep_predictions
                    and row.get("status") == OK
                    and not (kept_dir / f"{scan.key}.h5").is_file()
                )
                if cached.get("signature") == signature and not lost:
                    rows[team.name][scan.key] = row
                    continue
            args = (
                team,
                image_ids[team.name],
                scan,
                data,
                str(out),
                limits,
                tag,
                signature,
                keep_predictions,
            )
            units.append((f"{team.name}/{scan.key}", args))

    def merge(name: str, row: dict) -> None:
        team_name, key = name.split("/", 1)
        team_rows = rows[team_name]
        team_rows[key] = row
        write_metrics(pd.DataFrame([team_rows[s.key] for s in scans if s.key in team_rows]), out / team_name)
        if keep_predictions:
            _kept_manifest(out / team_name / "predictions", team_rows, scans)
        tqdm.write(f"{team_name} {key}: {row['status']} in {row['runtime_s']:.1f} s")

    total = len(scans) * len(teams)
    done_before = sum(len(r) for r in rows.values())
    done = map_units(client, container_unit, units, "run", merge, {GPU: 1}, total=total, done=done_before)
    # Every unit is done: what is left are the folders of attempts whose worker died (their
    # containers went with the worker's watchdog). Nothing reads them; they go.
    remove_tree(out / ".staging")
    for team in teams:
        remove_tree(out / team.name / ".work")
    _fail_if_units_failed(done, "container")
    tables = {}
    for team in teams:
        table = pd.DataFrame([rows[team.name][s.key] for s in scans])
        write_metrics(table, out / team.name)
        if keep_predictions:
            _kept_manifest(out / team.name / "predictions", rows[team.name], scans)
        tables[team.name] = table
    log(f"client peak RSS {runner_peak_rss_mb():.0f} MB", flush=True)
    return tables


# --------------------------------------------------------------------------- recipes


def slurm_gpu_workers(
    partition: str,
    shared: str,
    account: str | None = None,
    walltime: str = "04:00:00",
    cores: int = 8,
    memory: str = "64GB",
    python: str | None = None,
    scheduler_host: str | None = None,
    **kwargs,
):
    """The README's Slurm recipe: a ``dask_jobqueue.SLURMCluster`` whose every job is one
    worker holding ``GPU=1`` on one GPU (``--gres=gpu:1``), with its own rootless podman
    service as its container engine (``DOCKER_HOST`` in the job's private temporary
    folder), the container's GPU given by its physical id (``TUSREC_WORKER_GPUS``), run
    from the checkout at ``shared`` (the folder every node sees, with the data and the
    results). ``cluster.scale(jobs=K)`` asks Slurm for K GPUs; pass
    ``cluster.scheduler_address`` to ``--cluster``. Extra keyword arguments go to
    SLURMCluster."""
    from dask_jobqueue import SLURMCluster

    prologue = [
        f"cd {shared}",
        f"export PYTHONPATH={shared}",
        f"export DASK_CONFIG={shared}/configs/dask",  # no fixed malloc trim threshold (SIFT)
        'sock="${TMPDIR:-/tmp}/tusrec-podman-${SLURM_JOB_ID}.sock"',
        'podman system service --time=0 unix://"$sock" &',
        'export DOCKER_HOST="unix://$sock"',
        'export TUSREC_WORKER_GPUS="${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"',
        'for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done',
    ]
    scheduler = {"host": scheduler_host} if scheduler_host else {}
    return SLURMCluster(
        queue=partition,
        account=account,
        walltime=walltime,
        cores=cores,
        processes=1,  # one worker per job: the GPU slot
        memory=memory,
        python=python or f"{shared}/.venv/bin/python",
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", f"{GPU}=1"],
        job_script_prologue=prologue,
        scheduler_options=scheduler,
        **kwargs,
    )

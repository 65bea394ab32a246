"""``./evaluate run --cluster``: one unit per (team, scan) container run on Dask workers
that hold a ``GPU`` resource (``tusrec.cluster``), each on its own container engine.

Container units keep every rule of ``tusrec.harness.runner`` unchanged (staging, the
container's limits, the time limit and /output quota watched from outside by the worker,
judging, capped logs): they call the runner's functions. Each worker process has its own
watchdog (``tusrec.harness.watchdog``) for the containers it starts, on its own engine
(its ``DOCKER_HOST``); when the worker dies, its containers are removed. A unit writes its
per-scan cache, log and kept prediction atomically into the shared --out folder; the
client only merges the rows into the tables, in the serial path's order.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from tusrec.cluster import (
    GPU,
    SLURM_JOB_LABEL,
    ClusterError,
    fail_if_units_failed,
    map_units,
    worker_gpus,
)
from tusrec.data import TusrecDataError
from tusrec.harness.runner import (
    RUN_LABEL,
    RUNNER_LABEL,
    Limits,
    PendingRun,
    RunnerError,
    Watchdog,
    _client,
    _image_ids,
    close_volume,
    conclude,
    contain,
    engine_isolation,
    plan_runs,
    remove_run_folders,
    remove_tree,
    run_tag,
    runner_peak_rss_mb,
    stage_scan,
    volumes_folder,
    write_team_table,
)
from tusrec.harness.watchdog import remove_labelled

_ENGINE = None
_WATCHDOG = None
_ISOLATION = None  # (the userns mode asked for, the engine's Isolation)
_LOCK = threading.Lock()


def _engine():
    """This worker's container engine (its DOCKER_HOST), one client per process."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
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
            run_id = uuid.uuid4().hex
            log_path = Path(tempfile.gettempdir()) / f"tusrec-watchdog-{run_id}.log"
            _WATCHDOG = Watchdog(run_id, log_path)
            _WATCHDOG.run_id = run_id
        return _WATCHDOG


def _engine_isolation(limits):
    """This worker's engine's user isolation (asked of the engine once per process)."""
    global _ISOLATION
    engine = _engine()  # before the lock, which _engine takes itself
    with _LOCK:
        if _ISOLATION is None or _ISOLATION[0] != limits.userns:
            _ISOLATION = (limits.userns, engine_isolation(engine, limits))
        return _ISOLATION[1]


def engine_image_ids(teams) -> dict:
    """On a worker: {team name: image id} on its engine, or {'error': message}."""

    try:
        return _image_ids(_engine(), teams)
    except RunnerError as err:
        return {"error": str(err)}


def remove_run_containers(tag: str) -> int:
    """On a worker: remove the containers of run ``tag`` that a dead run left on its engine."""

    return len(remove_labelled(_engine(), RUNNER_LABEL, tag))


class SupersededError(RuntimeError):
    """A unit's work folder was removed under it: a newer run of the same --out took over
    (this unit's client died), so this attempt writes nothing."""


def container_unit(run: PendingRun, image_id: str, data, out: str, limits, tag: str, keep: bool):
    """One (team, scan) container run on a worker holding a GPU slot; returns its row.

    Everything tusrec.harness.runner does for one scan, on this worker's engine: the scan
    staged alone, the container with the run's limits (``--gpus`` mapped to this worker's
    own device), killed from here at the time limit or over the /output quota, judged
    (the scorer's bounded worker), then recorded as the serial runner records it
    (``record_judgement``: log and manifest kept, prediction kept or deleted, the row
    cached). The staging and work folders are this attempt's own (a unique name), so an
    attempt on a dead worker shares nothing with its redo.
    """

    team, scan = run.team, run.scan
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
    # This worker's own host decides whether it can mount the unit's output filesystem.
    images = volumes_folder(out, limits, log=lambda *a, **k: None)
    image = images / team.name / f"{scan.key}-{attempt}.img" if images is not None else None
    try:
        stage_scan(scan, data, staged)
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
        isolation = _engine_isolation(limits)
        # An InfrastructureError raised here is the unit's failure: Dask retries it, and it
        # is never cached as the team's verdict.
        volume, result, quota = contain(
            engine, run, staged, team_dir, output_dir, image, limits, labels, watchdog, isolation
        )
        if not output_dir.is_dir():
            volume.close()
            raise SupersededError(f"{team.name} {scan.key}: work folder removed by a newer run")
        return conclude(run, data, volume, result, limits, quota, team_dir, keep, log=lambda *a, **k: None)
    finally:
        close_volume(output_dir, image)  # the dense arrays: GB per scan
        remove_tree(staged)


def _gpu_workers(client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(GPU, 0) >= 1)


def run_teams(client, teams, data, out, limits=None, keys=None, keep_predictions=False, log=print) -> dict:
    """``tusrec.harness.runner.run_teams`` with one unit per (team, scan) on the cluster's
    GPU workers: the same skipping of judged scans, the same rows, tables, kept files and
    kept predictions.csv, merged here as the units finish."""

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
    remove_run_folders(out)
    rows, pending = plan_runs(teams, scans, data, out, limits, image_ids, keep_predictions)
    units = []
    for run in pending:
        args = (run, image_ids[run.team.name], data, str(out), limits, tag, keep_predictions)
        units.append((f"{run.team.name}/{run.scan.key}", args))

    def merge(name: str, row: dict) -> None:
        team_name, key = name.split("/", 1)
        rows[team_name][key] = row
        write_team_table(out / team_name, rows[team_name], scans, keep_predictions)
        tqdm.write(f"{team_name} {key}: {row['status']} in {row['runtime_s']:.1f} s")

    total = len(scans) * len(teams)
    done_before = sum(len(r) for r in rows.values())
    done = map_units(client, container_unit, units, "run", merge, {GPU: 1}, total=total, done=done_before)
    # Every unit is done: what is left are the folders of attempts whose worker died (their
    # containers went with the worker's watchdog). Nothing reads them; they go.
    remove_run_folders(out)
    fail_if_units_failed(done, "container")
    tables = {t.name: write_team_table(out / t.name, rows[t.name], scans, keep_predictions) for t in teams}
    log(f"client peak RSS {runner_peak_rss_mb():.0f} MB", flush=True)
    return tables

"""The organisers' runner: every team's image on every scan, each in its own container.

For each scan, a folder in the validation/test layout is staged that holds only that
scan's frames (never its tforms), landmarks and the calibration; it is mounted read-only
as /input, an empty writable folder as /output, and each team's image runs with its own
entrypoint through the Docker API (the ``docker`` SDK, so DOCKER_HOST is honoured and
podman's Docker-compatible service works too):

- no network, no added privileges, all capabilities dropped, a memory limit, GPUs only
  when asked for;
- the per-scan time limit is enforced from outside: on expiry the container is killed and
  the scan is ``timeout``; a non-zero exit is ``failed``; output that is missing or cannot
  be scored is ``missing`` or ``invalid`` (tusrec.evaluate.score decides, as for
  ``evaluate score``);
- the runtime is measured outside (container start to exit) and kept beside the one the
  container reports;
- each scan's predictions are validated and scored at once and then deleted (unless
  ``keep_predictions``), so the disk holds one scan's output at a time;
- each team's table is the ``metrics.csv``/``metrics.h5`` that ``evaluate score`` writes,
  so ``evaluate rank --team NAME=OUT/NAME`` reads it unchanged; per-scan results are cached
  in ``OUT/NAME/scans/`` (a rerun skips what is done) and container logs are kept in
  ``OUT/NAME/logs/<key>.log``.

Output layout::

    OUT/<team>/metrics.csv, metrics.h5      the team's per-scan table
    OUT/<team>/scans/<key>.json             cached row + what it depends on (image, limit, data)
    OUT/<team>/logs/<key>.log               the container's stdout and stderr (capped)
    OUT/<team>/logs/<key>.predictions.csv   the team's own manifest, if it wrote one
    OUT/<team>/predictions/                 only with keep_predictions
    OUT/ranking/                            `evaluate rank` of all teams
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from tusrec.data import (
    CALIB_FILE,
    EVAL,
    MANIFEST_FILE,
    Scan,
    TusrecData,
    TusrecDataError,
    atomic_path,
    landmark_dir,
    open_h5,
    read_manifest,
    write_dataset_keys,
    write_landmarks,
    write_manifest,
)
from tusrec.ddf import DEFAULT_CHUNK
from tusrec.evaluate.score import FAILED, INVALID, OK, TIMEOUT, _score_one, _signature, summary, write_metrics

DEFAULT_TIME_LIMIT_S = 120.0
DEFAULT_MEMORY = "16g"
LOG_LIMIT_BYTES = 2_000_000  # per container: the last 2 MB of its output are kept
RUNNER_LABEL = "tusrec.runner"
_TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RunnerError(RuntimeError):
    """The runner cannot start (no engine, an image not found, a bad team name)."""


@dataclass(frozen=True)
class Team:
    name: str
    image: str


@dataclass(frozen=True)
class Limits:
    """What a team's container may use."""

    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    memory: str = DEFAULT_MEMORY
    gpus: str | None = None  # None: no GPU; 'all', a count ('1') or device ids ('device=0,1')
    pids: int = 4096
    user: str | None = None  # None: the image's own user


@dataclass
class ContainerResult:
    exit_code: int | None
    timed_out: bool
    seconds: float  # wall time from start to exit (or kill), measured by the runner
    error: str = ""  # the engine could not run the container


def parse_teams(args: list[str]) -> list[Team]:
    """['TeamA=registry/team-a:1.0', ...] -> teams; names are folder names, unique."""
    teams = []
    for arg in args:
        name, sep, image = arg.partition("=")
        if not sep or not image:
            raise RunnerError(f"--team {arg!r}: expected NAME=IMAGE, e.g. TeamA=team-a:latest")
        if not _TEAM_NAME.fullmatch(name):
            raise RunnerError(f"--team {arg!r}: a team name is letters, digits, '.', '_' or '-'")
        teams.append(Team(name, image))
    names = [t.name for t in teams]
    if len(set(names)) != len(names):
        raise RunnerError(f"team names must be unique, got {names}")
    return teams


# --------------------------------------------------------------------------- staging


def _frames_only(path: Path) -> bool:
    """Whether an HDF5 file holds the dataset 'frames' and nothing else (safe to show)."""
    try:
        with open_h5(path) as f:
            return list(f.keys()) == ["frames"] and not f.attrs.keys() and not f["frames"].attrs.keys()
    except TusrecDataError:
        return False


def _copy_frames(scan: Scan, dest: Path, chunk: int = 64) -> None:
    """A frames-only copy of a scan's frames, chunk by chunk (long scans never sit in memory)."""
    n, h, w = scan.shape
    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("frames", (n, h, w), np.uint8, chunks=(1, h, w))
        for start, frames in scan.iter_frames(chunk):
            ds[start : start + len(frames)] = frames


def stage_scan(scan: Scan, data: TusrecData, dest: Path) -> str:
    """Write a validation/test-layout folder at ``dest`` holding only this scan: its frames
    (no tforms), its landmarks, the calibration and dataset_keys.h5 with its key alone.

    The frames file is hard-linked when it already holds frames only, is readable by
    anyone and lies on the same filesystem; otherwise a frames-only copy is written.
    Returns 'link' or 'copy'.
    """
    if dest.exists():
        shutil.rmtree(dest)
    frames = dest / "frames" / scan.subject / f"{scan.name}.h5"
    frames.parent.mkdir(parents=True)
    how = "copy"
    if _frames_only(scan.frames_path) and scan.frames_path.stat().st_mode & stat.S_IROTH:
        try:
            os.link(scan.frames_path, frames)
            how = "link"
        except OSError:  # another filesystem, or links not allowed
            pass
    if how == "copy":
        _copy_frames(scan, frames)
    if scan.has_landmarks:
        folder = landmark_dir(data.root, EVAL) if data.layout == EVAL else "landmarks"
        write_landmarks(dest / folder / f"landmark_{scan.subject}.h5", {scan.name: scan.read_landmarks()})
    shutil.copyfile(data.calibration_path, dest / CALIB_FILE)
    write_dataset_keys(dest, [scan.key])
    for path in (dest, *dest.rglob("*")):  # the container's user is not the runner's
        if path.is_dir():
            path.chmod(0o755)
        elif how == "copy" or path != frames:
            path.chmod(0o644)
    return how


# --------------------------------------------------------------------------- one container


def device_requests(gpus: str | None) -> list:
    """The Docker API's form of ``--gpus``: 'all', a count, or 'device=0,1'."""
    if not gpus:
        return []
    import docker

    if gpus == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if gpus.startswith("device="):
        ids = [d for d in gpus.removeprefix("device=").split(",") if d]
        return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    return [docker.types.DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]


def container_options(input_dir: Path, output_dir: Path, limits: Limits, labels: dict) -> dict:
    """The keyword arguments of ``containers.create`` for one team and scan."""
    options = {
        "volumes": {
            str(input_dir.resolve()): {"bind": "/input", "mode": "ro"},
            str(output_dir.resolve()): {"bind": "/output", "mode": "rw"},
        },
        "network_disabled": True,
        "network_mode": "none",
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "mem_limit": limits.memory,
        "memswap_limit": limits.memory,  # no swap beyond the limit
        "pids_limit": limits.pids,
        "labels": labels,
        "detach": True,
    }
    requests = device_requests(limits.gpus)
    if requests:
        options["device_requests"] = requests
    if limits.user:
        options["user"] = limits.user
    return options


def _save_logs(container, path: Path) -> None:
    """The container's stdout and stderr (the last LOG_LIMIT_BYTES) into ``path``."""
    tail: collections.deque[bytes] = collections.deque()
    size = 0
    dropped = False
    try:
        for piece in container.logs(stdout=True, stderr=True, stream=True, follow=False):
            tail.append(piece)
            size += len(piece)
            while size > LOG_LIMIT_BYTES and len(tail) > 1:
                size -= len(tail.popleft())
                dropped = True
    except Exception as err:  # the engine's errors vary; the log is not worth failing for
        tail.append(f"\n[runner: could not read the logs: {err}]\n".encode())
    with atomic_path(path) as tmp:
        tmp.write_bytes((b"[runner: earlier output dropped]\n" if dropped else b"") + b"".join(tail))


def run_container(
    client, image: str, input_dir: Path, output_dir: Path, limits: Limits, log_path: Path, labels: dict
) -> ContainerResult:
    """Run ``image`` with its own entrypoint on one staged scan; kill it at the time limit.

    The container is always removed; its logs are saved to ``log_path`` first.
    """
    import docker
    import requests

    container = None
    t0 = time.monotonic()
    try:
        container = client.containers.create(
            image, **container_options(input_dir, output_dir, limits, labels)
        )
        t0 = time.monotonic()
        container.start()
        try:
            status = container.wait(timeout=limits.time_limit_s)
        except requests.exceptions.RequestException:  # read timeout: the limit has passed
            container.kill()
            seconds = time.monotonic() - t0
            container.wait(timeout=30)
            return ContainerResult(None, True, seconds)
        seconds = time.monotonic() - t0
        error = (status.get("Error") or {}).get("Message", "") if isinstance(status, dict) else ""
        return ContainerResult(int(status.get("StatusCode", -1)), False, seconds, error or "")
    except docker.errors.DockerException as err:
        return ContainerResult(None, False, time.monotonic() - t0, f"the engine could not run it: {err}")
    finally:
        if container is not None:
            _save_logs(container, log_path)
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)


# --------------------------------------------------------------------------- judging


def _declared(status: str, message: str) -> pd.Series:
    """A manifest row stating the outcome, for tusrec.evaluate.score._score_one."""
    return pd.Series({"status": status, "message": message, "seconds": math.nan})


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[:500]


def judge(
    scan: Scan, data: TusrecData, output_dir: Path, result: ContainerResult, limits: Limits, log_path: Path
) -> dict:
    """The scan's row of the team's table, from what the container did and left behind."""
    calib = data.calibration
    path = output_dir / f"{scan.key}.h5"
    if result.timed_out:
        outcome = _declared(TIMEOUT, f"killed at the time limit of {limits.time_limit_s:g} s")
    elif result.error:
        outcome = _declared(FAILED, result.error)
    elif result.exit_code != 0:
        why = " (killed: out of memory?)" if result.exit_code == 137 else ""
        tail = _log_tail(log_path)
        outcome = _declared(FAILED, f"exit code {result.exit_code}{why}" + (f": {tail}" if tail else ""))
    else:
        outcome = None
    if outcome is not None:
        row = _score_one(scan, path, outcome, calib, DEFAULT_CHUNK)
        row["runtime_reported_s"] = math.nan
    else:
        row = _score_output(scan, output_dir, path, calib)
    row["runtime_s"] = result.seconds
    row["exit_code"] = result.exit_code
    return row


def _score_output(scan: Scan, output_dir: Path, path: Path, calib) -> dict:
    """Validate and score what a container that exited 0 wrote."""
    manifest_path = output_dir / MANIFEST_FILE
    for p in (path, manifest_path):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            # Never follow a team's link: it would be resolved on the organisers' machine.
            row = _score_one(scan, path, _declared(FAILED, ""), calib, DEFAULT_CHUNK)
            row.update(status=INVALID, message=f"{p.name} is not a regular file")
            row["runtime_reported_s"] = math.nan
            return row
    try:
        manifest = read_manifest(output_dir)
    except TusrecDataError as err:
        manifest, note = None, f"manifest ignored: {err}"
    else:
        note = ""
    mrow = manifest.loc[scan.key] if manifest is not None and scan.key in manifest.index else None
    row = _score_one(scan, path, mrow, calib, DEFAULT_CHUNK)
    reported = row.get("runtime_s", math.nan)
    row["runtime_reported_s"] = reported
    if note:
        row["message"] = f"{row['message']}; {note}" if row["message"] else note
    return row


# --------------------------------------------------------------------------- the run


def _client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        host = os.environ.get("DOCKER_HOST", "the default socket")
        raise RunnerError(f"no container engine at {host} ({err}); set DOCKER_HOST") from None
    return client


def _image_ids(client, teams: list[Team]) -> dict[str, str]:
    import docker

    ids = {}
    for team in teams:
        try:
            ids[team.name] = client.images.get(team.image).id
        except docker.errors.ImageNotFound:
            raise RunnerError(
                f"team {team.name}: image {team.image!r} not found by the engine "
                "(load it first: docker load -i <team>.tar)"
            ) from None
    return ids


def _remove_leftovers(client, out: Path) -> None:
    """Containers of an interrupted run on the same output folder."""
    tag = _run_tag(out)
    for container in client.containers.list(all=True, filters={"label": f"{RUNNER_LABEL}={tag}"}):
        container.remove(force=True)


def _run_tag(out: Path) -> str:
    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]


def _fresh_dir(path: Path) -> Path:
    """An empty folder the container's user can write to."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # files a container's user made that we may not delete: go around them
        path = path.with_name(f"{path.name}.{time.time_ns()}")
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def run_teams(
    teams: list[Team],
    data: TusrecData,
    out: str | Path,
    limits: Limits | None = None,
    keys: list[str] | None = None,
    keep_predictions: bool = False,
    client=None,
    log=print,
) -> dict[str, pd.DataFrame]:
    """Run every team's image on every scan; write each team's metrics into OUT/<team>.

    Scans already judged for the same image, time limit and data are skipped. Returns
    each team's table.
    """
    limits = limits or Limits()
    out = Path(out)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{data.root}: no scans found")
    missing_gt = [s.key for s in scans if not s.has_tforms]
    if missing_gt:
        raise TusrecDataError(
            f"{data.root}: no ground truth for {len(missing_gt)} scan(s) (e.g. {missing_gt[0]}): "
            "the runner scores every scan and needs the transfs/ folder"
        )
    client = client or _client()
    image_ids = _image_ids(client, teams)
    tag = _run_tag(out)
    _remove_leftovers(client, out)
    staging = out / ".staging"
    rows: dict[str, dict[str, dict]] = {t.name: {} for t in teams}
    kept: dict[str, list[dict]] = {t.name: [] for t in teams}
    bar = tqdm(total=len(scans) * len(teams), desc="run", unit="container", disable=None)
    for scan in scans:
        depends = _signature(scan.frames_path, scan.tforms_path, scan.landmark_path, data.calibration_path)
        staged = None
        for team in teams:
            team_dir = out / team.name
            signature = {"image": image_ids[team.name], "time_limit_s": limits.time_limit_s, "data": depends}
            cache = team_dir / "scans" / f"{scan.key}.json"
            if cache.exists():
                cached = json.loads(cache.read_text())
                if cached.get("signature") == signature:
                    rows[team.name][scan.key] = cached["row"]
                    bar.update()
                    continue
            if staged is None:
                staged = staging / scan.key
                stage_scan(scan, data, staged)
            output_dir = _fresh_dir(team_dir / ".work" / scan.key)
            log_path = team_dir / "logs" / f"{scan.key}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            labels = {RUNNER_LABEL: tag, "tusrec.team": team.name, "tusrec.scan": scan.key}
            result = run_container(client, team.image, staged, output_dir, limits, log_path, labels)
            row = judge(scan, data, output_dir, result, limits, log_path)
            row["image"] = team.image
            row["message"] = str(row.get("message", "")).replace(f"{output_dir}/", "")  # a path soon gone
            if (output_dir / MANIFEST_FILE).is_file() and not (output_dir / MANIFEST_FILE).is_symlink():
                shutil.copyfile(output_dir / MANIFEST_FILE, log_path.with_suffix(".predictions.csv"))
            prediction = output_dir / f"{scan.key}.h5"
            if keep_predictions and row["status"] == OK:
                (team_dir / "predictions").mkdir(exist_ok=True)
                shutil.move(prediction, team_dir / "predictions" / prediction.name)
                kept[team.name].append(
                    {
                        "key": scan.key,
                        "frames": scan.n_frames,
                        "status": "ok",
                        "seconds": row["runtime_s"],
                        "device": "",
                        "message": "",
                    }
                )
            shutil.rmtree(output_dir, ignore_errors=True)  # the dense arrays: GB per scan
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps({"signature": signature, "row": row}, default=_json_value))
            rows[team.name][scan.key] = row
            write_metrics(
                pd.DataFrame([rows[team.name][s.key] for s in scans if s.key in rows[team.name]]), team_dir
            )
            bar.write(f"{team.name} {scan.key}: {row['status']} in {row['runtime_s']:.1f} s")
            bar.update()
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    bar.close()
    shutil.rmtree(staging, ignore_errors=True)
    for team in teams:
        with contextlib.suppress(OSError):  # empty unless a container left files we cannot delete
            (out / team.name / ".work").rmdir()
    tables = {}
    for team in teams:
        table = pd.DataFrame([rows[team.name][s.key] for s in scans])
        write_metrics(table, out / team.name)
        if keep_predictions and kept[team.name]:
            folder = out / team.name / "predictions"
            previous = read_manifest(folder)
            merged = (
                {} if previous is None else {k: {"key": k, **r} for k, r in previous.to_dict("index").items()}
            )
            merged.update({r["key"]: r for r in kept[team.name]})
            write_manifest(folder, [merged[k] for k in sorted(merged)])
        tables[team.name] = table
    return tables


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def run_command(args) -> int:
    """`./evaluate run`: run, print each team's summary, then rank unless --no-rank."""
    from tusrec.data import open_data

    try:
        teams = parse_teams(args.team)
        limits = Limits(args.time_limit, args.memory, args.gpus, user=args.user)
        data = open_data(args.data)
        tables = run_teams(teams, data, args.out, limits, args.keys, args.keep_predictions)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in tables.items():
        print(f"{name}: {summary(table)}")
    print(f"per-team tables in {args.out}/<team>/metrics.csv, container logs in {args.out}/<team>/logs/")
    if args.no_rank:
        return 0
    from tusrec.evaluate.report import rank_command

    team_args = [f"{name}={Path(args.out) / name}" for name in tables]
    return rank_command(
        team_args,
        Path(args.out) / "ranking",
        args.normalisation,
        args.bootstrap,
        0,
        0.05,
        args.title,
        args.synthetic,
    )

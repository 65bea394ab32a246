"""The organisers' runner: every team's image on every scan, each in its own container.

For each scan, a folder in the validation/test layout is staged that holds only that
scan's frames (never its tforms), landmarks and the calibration; it is mounted read-only
as /input, an empty writable folder as /output, and each team's image runs with its own
entrypoint through the Docker API (the ``docker`` SDK, so DOCKER_HOST is honoured and
podman's Docker-compatible service works too):

- no network, no added privileges, all capabilities dropped, a memory limit, GPUs only
  when asked for; a read-only root filesystem with bounded tmpfs for scratch;
- the per-scan time limit is enforced from outside: on expiry the container is killed and
  the scan is ``timeout``; a non-zero exit is ``failed``; output that is missing or cannot
  be scored is ``missing`` or ``invalid`` (tusrec.scoring.score.score_file decides, in a
  bounded worker, under the same read policy as ``evaluate score``); /output is watched
  against a quota while the container runs (over it: killed, ``invalid``);
- everything in /output, the logs and the team's manifest are hostile: they are walked
  without following links, read with byte caps, and whatever they hold becomes the scan's
  status and message (``judge`` never raises for them);
- a watchdog process (tusrec.harness.watchdog) removes the run's containers when the
  runner dies, however it dies;
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
    OUT/<team>/predictions/                 only with keep_predictions (+ predictions.csv of them all)
    OUT/ranking/                            `evaluate rank` of all teams
    OUT/.watchdog.log                       what the watchdog said (empty unless it had trouble)
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from tusrec.cluster import ClusterError
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
from tusrec.scoring import (
    ERRORS,
    FAILED,
    INVALID,
    OK,
    TIMEOUT,
    scan_row,
    score_file,
    summary,
    write_metrics,
)

DEFAULT_TIME_LIMIT_S = 120.0
DEFAULT_MEMORY = "16g"
LOG_LIMIT_BYTES = (
    2_000_000  # per container: the last 2 MB of its output are kept (and the engine keeps no more)
)
LOG_READ_LIMIT_BYTES = 4 * LOG_LIMIT_BYTES  # never read more than this of a log, whatever the engine kept
LOG_TAIL_LINES = 100_000
MANIFEST_LIMIT_BYTES = 1_000_000  # a team's predictions.csv: one row per scan is ~100 bytes
MESSAGE_LIMIT = 1000  # characters of any team-made text stored in a table
OUTPUT_MAX_ENTRIES = 1000  # files and folders a team may leave in /output (it needs two)
DEFAULT_OUTPUT_QUOTA_MARGIN_MB = 64.0
DEFAULT_TMP_SIZE = "1g"
QUOTA_POLL_S = 0.5
WATCHDOG_GRACE_S = 30.0  # the watchdog kills this long after the runner should have
RUNNER_LABEL = "tusrec.runner"  # value: the output folder's tag (run_tag): all runs on one --out
RUN_LABEL = "tusrec.run"  # value: this run's own id: what its watchdog acts on
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
    output_quota_margin_mb: float = (
        DEFAULT_OUTPUT_QUOTA_MARGIN_MB  # /output may hold the dense form plus this
    )
    tmp_size: str = DEFAULT_TMP_SIZE  # each tmpfs (/tmp, /var/tmp, /run, /dev/shm, image VOLUMEs)


@dataclass
class ContainerResult:
    exit_code: int | None
    timed_out: bool
    seconds: float  # wall time from start to exit (or kill), measured by the runner
    error: str = ""  # the engine could not run the container
    over_quota: str = ""  # killed because /output went over its quota: the message


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


# --------------------------------------------------------------------------- the output folder


@dataclass(frozen=True)
class Usage:
    """What a team left in its output folder, counted without following any link."""

    bytes: int  # sum over entries of max(apparent size, allocated size)
    entries: int  # files, folders, links, fifos, ... (the folder itself not counted)
    truncated: bool  # the walk stopped at max_entries
    error: str = ""  # the walk could not go on (a name too long, a folder it may not read)


def output_usage(folder: Path, max_entries: int = OUTPUT_MAX_ENTRIES) -> Usage:
    """Size of everything under ``folder``, at most ``max_entries`` lstat calls (bounded
    work, whatever the tree). Links are counted, never followed; a sparse file counts its
    apparent size (the reader would pay for it)."""
    total = entries = 0
    stack = [os.fspath(folder)]
    try:
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > max_entries:
                        return Usage(total, entries, True)
                    st = entry.stat(follow_symlinks=False)
                    total += max(st.st_size, st.st_blocks * 512)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
    except OSError as err:
        return Usage(total, entries, False, f"{type(err).__name__}: {err.strerror or err}")
    return Usage(total, entries, False)


def output_quota(scan: Scan, margin_bytes: int) -> int:
    """Bytes a scan's /output may hold: the dense form, which is the larger (GP and LP
    (N-1, 3, H*W) float32, GL and LL (3, K), the optional transforms and uncertainty, all
    at 8 bytes where float64 is allowed), plus 5% for HDF5's own structures, plus
    ``margin_bytes``."""
    n, h, w = scan.shape
    k = len(scan.read_landmarks()) if scan.has_landmarks else 0
    dense = 2 * (n - 1) * 3 * h * w * 4
    small = 2 * 3 * k * 8 + 2 * (n - 1) * 16 * 8 + (n - 1) * 8
    return int(1.05 * (dense + small)) + int(margin_bytes)


def quota_problem(usage: Usage, quota: int) -> str:
    """'' when within the quota, else the message."""
    if usage.truncated:
        return f"output over quota: more than {OUTPUT_MAX_ENTRIES} files and folders"
    if usage.bytes > quota:
        return f"output over quota: {usage.bytes / 1e6:.1f} MB > {quota / 1e6:.1f} MB"
    return ""


def remove_tree(path: Path) -> None:
    """Delete a folder a team wrote into, whatever it holds (any depth, odd names, no
    write bits). shutil.rmtree never follows links; coreutils' rm takes what is left
    (Python 3.11's rmtree recurses and stops at a deep enough tree)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except Exception:  # OSError, or RecursionError on a deep tree: rm takes what is left
        subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], check=False)


def _open_regular(path: Path) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file (never following a link,
    never blocking on a fifo), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_capped(path: Path, limit: int) -> tuple[bytes | None, bool]:
    """At most ``limit`` bytes of a regular file (None if it is not one), and whether there
    was more."""
    fd = _open_regular(path)
    if fd is None:
        return None, False
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None, False
    return data[:limit], len(data) > limit


def clean_text(value, limit: int = MESSAGE_LIMIT) -> str:
    """A team-made string made safe to store: one line, valid UTF-8, at most ``limit``
    characters."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def declared_from_manifest(raw: bytes | None, more: bool, key: str) -> tuple[dict | None, list[str]]:
    """The team's manifest row for ``key`` as text cells (the scorer parses them under the
    read policy), and notes on the manifest as a whole. Whatever the bytes, nothing raises:
    a manifest that is too large, not CSV, without the columns or with several rows for
    the scan is ignored with a note."""
    if raw is None:
        return None, []
    if more:
        return None, [f"{MANIFEST_FILE} ignored: larger than {MANIFEST_LIMIT_BYTES} bytes"]
    try:
        table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises several types for malformed CSV
        return None, [f"{MANIFEST_FILE} ignored: not a readable CSV ({type(err).__name__})"]
    if "key" not in table.columns or "status" not in table.columns:
        return None, [f"{MANIFEST_FILE} ignored: no 'key' and 'status' columns"]
    rows = table[table["key"] == key]
    if len(rows) == 0:
        return None, []
    if len(rows) > 1:
        return None, [f"{MANIFEST_FILE} ignored: {len(rows)} rows for this scan"]
    return {name: str(value) for name, value in rows.iloc[0].items()}, []


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


def container_options(
    input_dir: Path, output_dir: Path, limits: Limits, labels: dict, image_volumes: tuple[str, ...] = ()
) -> dict:
    """The keyword arguments of ``containers.create`` for one team and scan.

    The root filesystem is read-only, so the container's writable layer cannot grow;
    scratch space is tmpfs of ``limits.tmp_size`` at /tmp, /var/tmp, /run and at every
    VOLUME the image declares (which would otherwise be an unbounded anonymous volume on
    the host's disk). tmpfs pages are charged to the container's memory limit. The log
    is capped by the engine (max-size), so a container that prints without end cannot
    fill the engine's disk.
    """
    import docker

    tmp = f"rw,nosuid,nodev,size={limits.tmp_size}"
    own = ("/input", "/output")
    tmpfs = {path: tmp for path in ("/tmp", "/var/tmp", "/run", *image_volumes) if path not in own}
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
        "read_only": True,
        "tmpfs": tmpfs,
        "shm_size": limits.tmp_size,
        "log_config": docker.types.LogConfig(type="json-file", config={"max-size": str(LOG_LIMIT_BYTES)}),
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
    """The container's stdout and stderr into ``path``: the last LOG_LIMIT_BYTES of at most
    LOG_READ_LIMIT_BYTES read (the engine caps what it keeps; this caps what is read)."""
    tail: collections.deque[bytes] = collections.deque()
    size = read = 0
    dropped = stopped = False
    try:
        stream = container.logs(stdout=True, stderr=True, stream=True, follow=False, tail=LOG_TAIL_LINES)
        for piece in stream:
            tail.append(piece)
            size += len(piece)
            read += len(piece)
            while size > LOG_LIMIT_BYTES and tail:
                size -= len(tail.popleft())
                dropped = True
            if read > LOG_READ_LIMIT_BYTES:
                stopped = True
                break
        with contextlib.suppress(Exception):
            stream.close()
    except Exception as err:  # the engine's errors vary; the log is not worth failing the scan for
        tail.append(f"\n[runner: could not read the logs: {clean_text(err)}]\n".encode())
    head = b"[runner: earlier output dropped]\n" if dropped else b""
    foot = f"\n[runner: stopped reading after {LOG_READ_LIMIT_BYTES} bytes]\n".encode() if stopped else b""
    with atomic_path(path) as tmp:
        tmp.write_bytes(head + b"".join(tail) + foot)


@dataclass
class Watch:
    """How a running container is watched: its output folder against a quota, and the
    watchdog told of its deadline."""

    output_dir: Path
    quota: int
    watchdog: Watchdog | None = None
    poll_s: float = QUOTA_POLL_S


def run_container(
    client,
    image: str,
    input_dir: Path,
    output_dir: Path,
    limits: Limits,
    log_path: Path,
    labels: dict,
    watch: Watch | None = None,
) -> ContainerResult:
    """Run ``image`` with its own entrypoint on one staged scan; kill it at the time limit
    or when its output folder goes over the quota.

    The container is always removed with its anonymous volumes; its logs are saved to
    ``log_path`` first.
    """
    import docker

    container = None
    t0 = time.monotonic()
    try:
        volumes = _image_volumes(client, image)
        container = client.containers.create(
            image, **container_options(input_dir, output_dir, limits, labels, volumes)
        )
        if watch is not None and watch.watchdog is not None:
            # The watchdog's own deadline comes later than the runner's: it acts only when
            # the runner does not (dead or stuck).
            watch.watchdog.started(container.id, time.time() + limits.time_limit_s + WATCHDOG_GRACE_S)
        t0 = time.monotonic()
        container.start()
        with ThreadPoolExecutor(1) as pool:
            # A container that never exits and an engine that never answers are both cut off.
            waiting = pool.submit(container.wait, timeout=limits.time_limit_s + WATCHDOG_GRACE_S)
            over = ""
            timed_out = False
            while True:
                try:
                    status = waiting.result(timeout=watch.poll_s if watch else 1.0)
                    break
                except FutureTimeout:
                    pass
                except Exception:  # the engine's read timeout (limit + grace): the limit has passed
                    timed_out = True
                    status = None
                    break
                if time.monotonic() - t0 >= limits.time_limit_s:
                    timed_out = True
                elif watch is not None:
                    over = quota_problem(output_usage(watch.output_dir), watch.quota)
                if timed_out or over:
                    break
            seconds = time.monotonic() - t0
            if timed_out or over:
                with contextlib.suppress(docker.errors.DockerException):
                    container.kill()
                with contextlib.suppress(Exception):
                    waiting.result(timeout=30)
                return ContainerResult(None, timed_out, seconds, over_quota=over)
        error = (status.get("Error") or {}).get("Message", "") if isinstance(status, dict) else ""
        return ContainerResult(int(status.get("StatusCode", -1)), False, seconds, error or "")
    except docker.errors.DockerException as err:
        return ContainerResult(
            None, False, time.monotonic() - t0, f"the engine could not run it: {clean_text(err)}"
        )
    finally:
        if container is not None:
            _save_logs(container, log_path)
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True, v=True)
            if watch is not None and watch.watchdog is not None:
                watch.watchdog.ended(container.id)


def _image_volumes(client, image: str) -> tuple[str, ...]:
    """The VOLUME paths an image declares (each gets a bounded tmpfs instead)."""
    config = client.images.get(image).attrs.get("Config") or {}
    return tuple(sorted(str(v) for v in (config.get("Volumes") or {})))


class Watchdog:
    """The run's watchdog process (tusrec.harness.watchdog): told of each container's
    deadline; when this process dies, however, the pipe's end of file makes it remove every
    container of the run."""

    def __init__(self, run_id: str, log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            # Its own run's id, not the folder's tag: a dead run's watchdog still cleaning up
            # must not touch the containers of the rerun that follows it on the same --out.
            [sys.executable, "-m", "tusrec.harness.watchdog", run_id, RUN_LABEL],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,  # out of the runner's process group: its signals are not ours
            close_fds=True,
        )

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()

    def started(self, container_id: str, deadline: float) -> None:
        self._send(f"start {container_id} {deadline:.3f}")

    def ended(self, container_id: str) -> None:
        self._send(f"end {container_id}")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self._log.close()


# --------------------------------------------------------------------------- judging


def _declared(status: str, message: str) -> pd.Series:
    """A manifest row stating the outcome, for the scorer."""
    return pd.Series({"status": status, "message": message, "seconds": math.nan})


def _log_tail(path: Path, lines: int = 3) -> str:
    raw, _ = read_capped(path, LOG_LIMIT_BYTES + 4096)
    if raw is None:
        return ""
    text = raw.decode(errors="replace").strip().splitlines()
    return clean_text(" | ".join(line.strip() for line in text[-lines:] if line.strip()))


def _score(scan: Scan, path: Path, declared, calib) -> dict:
    """The scorer's row: the file is read under the read policy in a bounded worker."""
    return score_file(scan, path, declared, calib)


def judge(
    scan: Scan,
    data: TusrecData,
    output_dir: Path,
    result: ContainerResult,
    limits: Limits,
    log_path: Path,
    quota: int | None = None,
) -> tuple[dict, bytes | None]:
    """The scan's row of the team's table, from what the container did and left behind,
    and the team's manifest (at most MANIFEST_LIMIT_BYTES) if it wrote one.

    Nothing the team made can raise out of here: every outcome is a status and a message.
    """
    manifest = None
    try:
        row, manifest = _judge(scan, data, output_dir, result, limits, log_path, quota)
    except Exception as err:  # the boundary: whatever a team made is its own scan's problem
        row = scan_row(scan)
        row.update({e: math.nan for e in ERRORS})
        row.update(
            status=INVALID,
            message=f"the runner could not judge the output: {type(err).__name__}: {clean_text(err, 300)}",
            runtime_reported_s=math.nan,
        )
    row["runtime_s"] = result.seconds
    row["exit_code"] = result.exit_code
    # The work folder's path goes before the cut at MESSAGE_LIMIT: it is the runner's (soon
    # gone, and another on each attempt), so a cut must never land inside it.
    work = f"{output_dir}/"
    return {k: clean_text(v.replace(work, "")) if isinstance(v, str) else v for k, v in row.items()}, manifest


def _judge(scan, data, output_dir, result, limits, log_path, quota):
    calib = data.calibration
    path = output_dir / f"{scan.key}.h5"
    usage = output_usage(output_dir)
    over = result.over_quota or (quota_problem(usage, quota) if quota is not None else "")
    invalid = ""  # what the team wrote is wrong, whatever the scorer would make of it
    if result.timed_out:
        outcome = _declared(TIMEOUT, f"killed at the time limit of {limits.time_limit_s:g} s")
    elif result.error:
        outcome = _declared(FAILED, result.error)
    elif over:
        outcome, invalid = _declared(FAILED, over), over
    elif result.exit_code != 0:
        why = " (killed: out of memory?)" if result.exit_code == 137 else ""
        tail = _log_tail(log_path)
        outcome = _declared(FAILED, f"exit code {result.exit_code}{why}" + (f": {tail}" if tail else ""))
    elif usage.error:
        invalid = f"output cannot be inspected: {usage.error}"
        outcome = _declared(FAILED, invalid)
    else:
        outcome = None
    if outcome is not None:
        return _judged(scan, path, outcome, calib, invalid), None
    raw, more = read_capped(output_dir / MANIFEST_FILE, MANIFEST_LIMIT_BYTES)
    notes = []
    if raw is None and os.path.lexists(output_dir / MANIFEST_FILE):
        notes.append(f"{MANIFEST_FILE} ignored: not a regular file")
    declared, more_notes = declared_from_manifest(raw, more, scan.key)
    notes += more_notes
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        # Never follow a team's link: it would be resolved on the organisers' machine.
        return _judged(scan, path, _declared(FAILED, ""), calib, f"{path.name} is not a regular file"), raw
    row = _score(scan, path, declared, calib)
    row["runtime_reported_s"] = row.get("runtime_s", math.nan)
    if notes:
        note = "; ".join(notes)
        row["message"] = f"{row['message']}; {note}" if row.get("message") else note
    return row, raw


def _judged(scan: Scan, path: Path, outcome: pd.Series, calib, invalid: str) -> dict:
    """The row of a scan whose outcome the runner decided (nothing of the team's is read):
    the scorer fills in the scan's own columns; ``invalid`` overrides the status."""
    row = _score(scan, path, outcome, calib)
    if invalid:
        row.update(status=INVALID, message=invalid)
    row["runtime_reported_s"] = math.nan
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
    """What an interrupted run on the same output folder left: its containers (only those
    carrying its label), its staging folder and its work folders."""
    from tusrec.harness.watchdog import remove_labelled

    remove_labelled(client, RUNNER_LABEL, run_tag(out))
    remove_tree(out / ".staging")
    for work in out.glob("*/.work"):  # only the runner makes these; nothing in them is kept
        remove_tree(work)


def run_tag(out: Path) -> str:
    """The label value of a run's containers: one per output folder."""
    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]


def _fresh_dir(path: Path) -> Path:
    """An empty folder the container's user can write to."""
    remove_tree(path)
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def write_team_table(
    team_dir: Path, team_rows: dict[str, dict], scans: list[Scan], keep: bool
) -> pd.DataFrame:
    """A team's metrics.csv/metrics.h5 from the rows judged so far, in scan order (and its
    kept predictions.csv when ``keep``): written after every unit and at the end, by the
    serial runner and the cluster's client alike. Returns the table."""
    table = pd.DataFrame([team_rows[s.key] for s in scans if s.key in team_rows])
    write_metrics(table, team_dir)
    if keep:
        _kept_manifest(team_dir / "predictions", team_rows, scans)
    return table


def _kept_manifest(folder: Path, rows: dict[str, dict], scans: list[Scan]) -> None:
    """predictions.csv of the kept folder: every kept file, whichever run judged it (so
    `evaluate check` accepts the folder after an interrupted run and its rerun)."""
    entries = []
    for scan in scans:
        row = rows.get(scan.key)
        if row is not None and row["status"] == OK and (folder / f"{scan.key}.h5").is_file():
            entries.append(
                {
                    "key": scan.key,
                    "frames": scan.n_frames,
                    "status": OK,
                    "seconds": row["runtime_s"],
                    "device": "",
                    "message": "",
                }
            )
    # Files kept by an earlier run for scans outside this run's selection stay listed.
    listed = {e["key"] for e in entries}
    with contextlib.suppress(TusrecDataError):
        previous = read_manifest(folder)
        if previous is not None:
            for key, row in previous.to_dict("index").items():
                if key not in listed and key not in rows and (folder / f"{key}.h5").is_file():
                    entries.append({"key": key, **row})
    if entries:
        write_manifest(folder, sorted(entries, key=lambda e: e["key"]))


def data_signature(*paths: Path | None) -> list:
    """What a cached judgement depends on besides the image and the limit: size and
    modification time of each of the organisers' data files of the scan."""
    out = []
    for p in paths:
        if p is not None and Path(p).exists():
            st = Path(p).stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


@dataclass(frozen=True)
class PendingRun:
    """One (team, scan) container run that a run still has to do, with the signature its
    cached row will carry (image id, time limit, the scan's data files)."""

    team: Team
    scan: Scan
    signature: dict


def plan_runs(
    teams: list[Team],
    scans: list[Scan],
    data: TusrecData,
    out: Path,
    limits: Limits,
    image_ids: dict[str, str],
    keep_predictions: bool,
) -> tuple[dict[str, dict[str, dict]], list[PendingRun]]:
    """What is judged already and what is left, for the serial runner and the cluster alike.

    A scan's cached row (OUT/<team>/scans/<key>.json) is taken when it was judged for the
    same image, time limit and data files, and, with ``keep_predictions``, its kept file is
    still there when it was ``ok`` (a lost kept prediction is redone). Returns (rows:
    {team: {key: cached row}}, the runs left in the serial order: scan by scan, the
    teams in the order given).
    """
    rows: dict[str, dict[str, dict]] = {t.name: {} for t in teams}
    pending = []
    for scan in scans:
        depends = data_signature(
            scan.frames_path, scan.tforms_path, scan.landmark_path, data.calibration_path
        )
        for team in teams:
            signature = {"image": image_ids[team.name], "time_limit_s": limits.time_limit_s, "data": depends}
            cache = out / team.name / "scans" / f"{scan.key}.json"
            if cache.exists():
                cached = json.loads(cache.read_text())
                row = cached.get("row") or {}
                kept = out / team.name / "predictions" / f"{scan.key}.h5"
                lost = keep_predictions and row.get("status") == OK and not kept.is_file()
                if cached.get("signature") == signature and not lost:
                    rows[team.name][scan.key] = row
                    continue
            pending.append(PendingRun(team, scan, signature))
    return rows, pending


def record_judgement(
    run: PendingRun, row: dict, manifest: bytes | None, output_dir: Path, team_dir: Path, keep: bool
) -> dict:
    """After ``judge`` (whose messages hold no path of the work folder): the row completed
    (the image), the team's manifest kept beside the log, the prediction moved into
    ``predictions/`` when kept and ``ok``, and the row cached atomically with its
    signature. The work folder is the caller's to remove. Returns the row."""
    key = run.scan.key
    row["image"] = run.team.image
    if manifest is not None:
        with atomic_path(team_dir / "logs" / f"{key}.predictions.csv") as tmp:
            tmp.write_bytes(manifest)
    if keep and row["status"] == OK:
        kept_dir = team_dir / "predictions"
        kept_dir.mkdir(exist_ok=True)
        os.replace(output_dir / f"{key}.h5", kept_dir / f"{key}.h5")  # judged a regular file
    with atomic_path(team_dir / "scans" / f"{key}.json") as tmp:
        tmp.write_text(json.dumps({"signature": run.signature, "row": row}, default=_json_value))
    return row


def runner_peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (2**20 bytes).

    VmHWM of /proc/self/status: the high-water mark of this program's own memory.
    getrusage's ru_maxrss is only the fallback: Linux carries it across fork and exec, so
    a runner started by a large process (pytest, say) would report its parent's size.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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

    Scans already judged for the same image, time limit and data are skipped (with
    ``keep_predictions``, only when the kept file is there). Returns each team's table.
    """
    limits = limits or Limits()
    out = Path(out)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{data.root}: no scans found")
    data.require_ground_truth(scans, "the runner scores every scan and needs the transfs/ folder")
    client = client or _client()
    image_ids = _image_ids(client, teams)
    tag = run_tag(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(client, out)
    run_id = uuid.uuid4().hex
    watchdog = Watchdog(run_id, out / ".watchdog.log")
    try:
        labels = {RUNNER_LABEL: tag, RUN_LABEL: run_id}
        return _run(
            teams, data, out, limits, scans, keep_predictions, client, image_ids, labels, watchdog, log
        )
    finally:
        watchdog.close()


def _run(teams, data, out, limits, scans, keep_predictions, client, image_ids, run_labels, watchdog, log):
    staging = out / ".staging"
    rows, pending = plan_runs(teams, scans, data, out, limits, image_ids, keep_predictions)
    margin = int(limits.output_quota_margin_mb * 1e6)
    bar = tqdm(total=len(scans) * len(teams), desc="run", unit="container", disable=None)
    bar.update(sum(len(r) for r in rows.values()))
    for scan in scans:
        runs = [r for r in pending if r.scan is scan]
        if not runs:
            continue
        quota = output_quota(scan, margin)
        staged = staging / scan.key
        stage_scan(scan, data, staged)
        for run in runs:
            team = run.team
            team_dir = out / team.name
            output_dir = _fresh_dir(team_dir / ".work" / scan.key)
            log_path = team_dir / "logs" / f"{scan.key}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            labels = {**run_labels, "tusrec.team": team.name, "tusrec.scan": scan.key}
            log(f"{team.name} {scan.key}: running", flush=True)
            result = run_container(
                client,
                team.image,
                staged,
                output_dir,
                limits,
                log_path,
                labels,
                Watch(output_dir, quota, watchdog),
            )
            log(f"{team.name} {scan.key}: judging", flush=True)
            t_judge = time.monotonic()
            row, manifest = judge(scan, data, output_dir, result, limits, log_path, quota)
            t_judge = time.monotonic() - t_judge
            record_judgement(run, row, manifest, output_dir, team_dir, keep_predictions)
            remove_tree(output_dir)  # the dense arrays: GB per scan
            rows[team.name][scan.key] = row
            write_team_table(team_dir, rows[team.name], scans, keep_predictions)
            status, seconds = row["status"], row["runtime_s"]
            bar.write(f"{team.name} {scan.key}: {status} in {seconds:.1f} s (judged in {t_judge:.2f} s)")
            bar.update()
        remove_tree(staged)
    bar.close()
    remove_tree(staging)
    for team in teams:
        with contextlib.suppress(OSError):
            (out / team.name / ".work").rmdir()
    tables = {t.name: write_team_table(out / t.name, rows[t.name], scans, keep_predictions) for t in teams}
    log(f"runner peak RSS {runner_peak_rss_mb():.0f} MB", flush=True)
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
        limits = Limits(
            args.time_limit,
            args.memory,
            args.gpus,
            user=args.user,
            output_quota_margin_mb=args.output_quota_margin,
            tmp_size=args.tmp_size,
        )
        data = open_data(args.data)
        if getattr(args, "cluster", None) is None:
            tables = run_teams(teams, data, args.out, limits, args.keys, args.keep_predictions)
        else:  # the same units on Dask workers holding a GPU slot (tusrec.harness.cluster)
            from tusrec import cluster
            from tusrec.harness import cluster as harness_cluster

            with cluster.connect(args.cluster, gpu_slots=True) as dask:
                tables = harness_cluster.run_teams(
                    dask, teams, data, args.out, limits, args.keys, args.keep_predictions
                )
    except (RunnerError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in tables.items():
        print(f"{name}: {summary(table)}")
    print(f"per-team tables in {args.out}/<team>/metrics.csv, container logs in {args.out}/<team>/logs/")
    if args.no_rank:
        return 0
    from tusrec.ranking.report import rank_command

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

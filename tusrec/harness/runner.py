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
    OUT/<team>/logs/<key>.manifest.txt      the team's own manifest (as text), if it wrote one
    OUT/<team>/predictions/                 only with keep_predictions (+ predictions.csv of them all)
    OUT/ranking/                            `evaluate rank` of all teams
    OUT/.watchdog.log                       what the watchdog said (empty unless it had trouble)
"""

from __future__ import annotations

import collections
import contextlib
import errno
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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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
from tusrec.harness.volume import (
    InfrastructureError,
    OutputVolume,
    close_volume,
    keep_copy,
    kernel_quota_problem,
    open_volume,
    remove_tree,
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
DEFAULT_JUDGE_WORKERS = 2  # scans judged at once (each in its own bounded scoring worker)
INFRASTRUCTURE_ATTEMPTS = 2  # a unit the host or the engine failed is tried this often
INFRASTRUCTURE_RETRY_S = 5.0
WATCHDOG_GRACE_S = 30.0  # the watchdog kills this long after the runner should have
ENGINE_GRACE_S = 5.0  # podman's own deadline: this long after the runner's
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
    # Container root is not host root: podman's user namespace mode ('auto': a range of
    # the 'containers' entry of /etc/subuid per container), or None for the engine's own
    # (Docker: the daemon's userns-remap, which the runner detects; see engine_isolation).
    userns: str | None = "auto"
    # /output: 'kernel' (a filesystem of the quota's size per container), 'walk' (a plain
    # folder watched by walking it), 'auto' (kernel where the host allows, else walk)
    output_fs: str = "auto"


@dataclass
class ContainerResult:
    exit_code: int | None
    timed_out: bool
    seconds: float  # wall time from start to exit (or kill), measured by the runner
    error: str = ""  # the engine could not run the container
    over_quota: str = ""  # killed because /output went over its quota: the message
    infrastructure: bool = False  # ``error`` is the host's or the engine's, not the team's


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
    """Bytes a scan's /output may hold: the largest valid prediction file of the scan under
    the format (tusrec.scoring.policy.max_prediction_bytes: every dataset, float64, chunked
    as the read policy allows, HDF5's own structures), plus ``margin_bytes``."""
    from tusrec.scoring import max_prediction_bytes  # the format's one rule

    n, h, w = scan.shape
    k = len(scan.read_landmarks()) if scan.has_landmarks else 0
    return max_prediction_bytes(n, h, w, k) + int(margin_bytes)


def quota_problem(usage: Usage, quota: int) -> str:
    """'' when within the quota, else the message."""
    if usage.truncated:
        return f"output over quota: more than {OUTPUT_MAX_ENTRIES} files and folders"
    if usage.bytes > quota:
        return f"output over quota: {usage.bytes / 1e6:.1f} MB > {quota / 1e6:.1f} MB"
    return ""


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
    input_dir: Path,
    output_dir: Path,
    limits: Limits,
    labels: dict,
    image_volumes: tuple[str, ...] = (),
    userns: str | None = None,
) -> dict:
    """The keyword arguments of ``containers.create`` for one team and scan.

    The root filesystem is read-only, so the container's writable layer cannot grow;
    scratch space is tmpfs of ``limits.tmp_size`` at /tmp, /var/tmp, /run and at every
    VOLUME the image declares (which would otherwise be an unbounded anonymous volume on
    the host's disk). tmpfs pages are charged to the container's memory limit. The log
    is capped by the engine (max-size), so a container that prints without end cannot
    fill the engine's disk. ``userns``: the user namespace mode (podman's 'auto'), under
    the key ``userns_mode``, which ``create_container`` passes to the engine itself.
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
    if userns:
        options["userns_mode"] = userns
    return options


def create_container(client, image: str, options: dict, timeout_s: float | None = None):
    """``client.containers.create(image, **options)``, with two things the Docker API lacks.

    - ``userns_mode`` goes to the engine as given: the docker SDK accepts only 'host'
      there, while podman's Docker-compatible API takes 'auto' in the same field.
    - ``timeout_s`` (podman only): the container is created through podman's own API
      (``/libpod/containers/create``, the same options in its form) with ``timeout``, so
      that podman's conmon kills it at the deadline even when the runner and its watchdog
      are both dead. Docker has no such setting (the watchdog is the last line there).
    """
    options = dict(options)
    if timeout_s is not None:
        made = client.api._post_json(
            client.api._url("/libpod/containers/create"), data=libpod_spec(image, options, timeout_s)
        )
        client.api._raise_for_status(made)
        return client.containers.get(made.json()["Id"])
    userns = options.pop("userns_mode", None)
    if not userns or userns == "host":
        if userns:
            options["userns_mode"] = userns
        return client.containers.create(image, **options)
    from docker.models.containers import _create_container_args

    create = _create_container_args({"image": image, "version": client.api._version, **options})
    create["host_config"]["UsernsMode"] = userns
    made = client.api.create_container(**create)
    return client.containers.get(made["Id"])


def libpod_spec(image: str, options: dict, timeout_s: float) -> dict:
    """``container_options``' options in podman's own create form (its SpecGenerator), with
    the engine's deadline ``timeout_s`` (whole seconds, rounded up)."""
    from docker.utils import parse_bytes

    mounts = [
        {"destination": bind["bind"], "type": "bind", "source": source, "options": ["rbind", bind["mode"]]}
        for source, bind in options["volumes"].items()
    ]
    mounts += [
        {"destination": path, "type": "tmpfs", "source": "tmpfs", "options": flags.split(",")}
        for path, flags in options["tmpfs"].items()
    ]
    log = options["log_config"]
    spec = {
        "image": image,
        "labels": options["labels"],
        "netns": {"nsmode": "none"},
        "no_new_privileges": "no-new-privileges" in options["security_opt"],
        "cap_drop": options["cap_drop"],
        "read_only_filesystem": options["read_only"],
        "mounts": mounts,
        "image_volume_mode": "ignore",  # each VOLUME is one of the bounded tmpfs above
        "shm_size": parse_bytes(options["shm_size"]),
        "resource_limits": {
            "memory": {
                "limit": parse_bytes(options["mem_limit"]),
                "swap": parse_bytes(options["memswap_limit"]),
            },
            "pids": {"limit": options["pids_limit"]},
        },
        "log_configuration": {"driver": "k8s-file", "size": int(log["Config"]["max-size"])},
        "timeout": max(1, math.ceil(timeout_s)),
    }
    if options.get("userns_mode") == "auto":
        # what `podman create --userns=auto` sends: the mode, and the storage's id mapping
        spec["userns"] = {"nsmode": "auto"}
        spec["idmappings"] = {"AutoUserNs": True, "HostUIDMapping": False, "HostGIDMapping": False}
    elif options.get("userns_mode"):
        spec["userns"] = {"nsmode": options["userns_mode"]}
    if options.get("user"):
        spec["user"] = options["user"]
    if options.get("device_requests"):
        # podman gives GPUs through CDI (`nvidia-ctk cdi generate`); untested: no GPU here
        spec["devices"] = [
            {"path": f"nvidia.com/gpu={name}"} for name in cdi_gpus(options["device_requests"])
        ]
    return spec


def cdi_gpus(requests) -> list[str]:
    """The CDI device names of ``device_requests``: 'all', or one name per GPU index."""
    names = []
    for request in requests:
        if request.get("DeviceIDs"):
            names += list(request["DeviceIDs"])
        elif int(request.get("Count", 0)) < 0:
            return ["all"]
        else:
            names += [str(i) for i in range(int(request.get("Count", 0)))]
    return names


@dataclass(frozen=True)
class Isolation:
    """How a team's container is kept from the host's users, as this engine does it."""

    engine: str  # 'podman' or 'docker' (or what the engine calls itself)
    userns: str | None  # the per-container user namespace mode the runner asks for
    remapped: bool  # the engine maps every container's root away from host root
    rootless: bool  # the engine itself runs as an unprivileged user

    @property
    def root_is_host_root(self) -> bool:
        return not (self.userns or self.remapped or self.rootless)

    def describe(self) -> str:
        if self.userns:
            return f"{self.engine}: each container in its own user namespace (--userns={self.userns})"
        if self.rootless:
            return f"{self.engine}: rootless (container root is the engine's unprivileged user)"
        if self.remapped:
            return f"{self.engine}: userns-remap (container root is an unprivileged host user)"
        return f"{self.engine}: container root IS host root (no user namespace)"


def engine_isolation(client, limits: Limits) -> Isolation:
    """What user isolation this engine gives, and which per-container mode to ask for:
    podman takes ``limits.userns`` per container; Docker's is daemon-wide (userns-remap,
    shown in ``docker info``'s SecurityOptions as name=userns), as is running rootless."""
    version: dict = {}
    with contextlib.suppress(Exception):
        version = client.version()
    name = " ".join(str(c.get("Name", "")) for c in version.get("Components") or [])
    engine = "podman" if "podman" in name.lower() else "docker"
    options = []
    with contextlib.suppress(Exception):
        options = [str(o) for o in (client.info().get("SecurityOptions") or [])]
    remapped = any("name=userns" in o for o in options)
    rootless = any("name=rootless" in o for o in options)
    userns = limits.userns if engine == "podman" and limits.userns not in (None, "", "host") else None
    return Isolation(engine, userns, remapped, rootless)


def image_runs_as_root(client, image: str, user: str | None) -> bool:
    """Whether the container's processes start as uid 0: ``user`` (--user) when given,
    else the image's USER (empty, 'root', '0' or '0:...' are root)."""
    if not user:
        user = (client.images.get(image).attrs.get("Config") or {}).get("User") or ""
    name = str(user).split(":", 1)[0].strip()
    return name in ("", "root", "0")


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
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(head + b"".join(tail) + foot)
    except OSError as err:  # a full disk: the log is lost, the run and the verdict are not
        with contextlib.suppress(OSError):
            path.write_bytes(f"[runner: could not save the log: {err.strerror}]\n".encode())


@dataclass
class Watch:
    """How a running container is watched: its output folder against a quota, and the
    watchdog told of its deadline. With ``volume`` (a filesystem of its own), a full
    filesystem is over quota too: the kernel's count, open-but-unlinked files included."""

    output_dir: Path
    quota: int
    watchdog: Watchdog | None = None
    poll_s: float = QUOTA_POLL_S
    volume: OutputVolume | None = None

    def problem(self) -> str:
        """'' while the output is within its quota, else the message. A walk that cannot go
        on (a path the host cannot name, a folder it may not read) is over quota: what
        cannot be counted is not allowed. With a filesystem of its own, the size is the
        larger of the walk's count and the kernel's (which sees files unlinked while open)."""
        usage = output_usage(self.output_dir)
        kernel = self.volume is not None and self.volume.kernel
        used = self.volume.used_bytes() if kernel else 0
        if usage.error:
            held = f"; {used / 1e6:.1f} MB used" if kernel else ""
            return f"output over quota: it cannot be walked ({usage.error}{held})"
        walked = quota_problem(usage, self.quota)
        if walked or not kernel:
            return walked
        if self.volume.full():
            size = max(used, usage.bytes)
            if size <= self.quota:  # every inode taken, by names the walk did not reach or none
                return "output over quota: its filesystem has no file or folder left to make"
            return f"output over quota: {size / 1e6:.1f} MB > {self.quota / 1e6:.1f} MB"
        return ""


def run_container(
    client,
    image: str,
    input_dir: Path,
    output_dir: Path,
    limits: Limits,
    log_path: Path,
    labels: dict,
    watch: Watch | None = None,
    userns: str | None = None,
    engine_deadline: bool = False,
) -> ContainerResult:
    """Run ``image`` with its own entrypoint on one staged scan; kill it at the time limit
    or when its output folder goes over the quota.

    The container is always removed with its anonymous volumes; its logs are saved to
    ``log_path`` first. An engine that cannot create or start the container is the
    host's fault (``infrastructure``), never the team's. ``engine_deadline`` (podman): the
    engine itself also kills the container ENGINE_GRACE_S after the time limit, whatever
    becomes of the runner and its watchdog.
    """
    import docker

    container = None
    t0 = time.monotonic()
    try:
        volumes = _image_volumes(client, image)
        container = create_container(
            client,
            image,
            container_options(input_dir, output_dir, limits, labels, volumes, userns),
            limits.time_limit_s + ENGINE_GRACE_S if engine_deadline else None,
        )
        if watch is not None and watch.watchdog is not None:
            # The watchdog's own deadline comes later than the runner's: it acts only when
            # the runner does not (dead or stuck).
            watch.watchdog.started(container.id, time.time() + limits.time_limit_s + WATCHDOG_GRACE_S)
        t0 = time.monotonic()
        container.start()
    except docker.errors.DockerException as err:
        if container is not None:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True, v=True)
            if watch is not None and watch.watchdog is not None:
                watch.watchdog.ended(container.id)
        return ContainerResult(
            None,
            False,
            time.monotonic() - t0,
            f"the engine could not start it: {clean_text(err)}",
            infrastructure=True,
        )
    try:
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
                    over = watch.problem()
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
            None,
            False,
            time.monotonic() - t0,
            f"the engine lost the container: {clean_text(err)}",
            infrastructure=True,
        )
    finally:
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
    carrying its label), the output filesystems still mounted under it, its staging
    folder and its work folders."""
    from tusrec.harness.watchdog import remove_labelled

    remove_labelled(client, RUNNER_LABEL, run_tag(out))
    remove_run_folders(out)


def remove_run_folders(out: Path) -> None:
    """The runner's own folders under ``out``: every team's work folder (with the output
    filesystems still mounted there), the filesystems' files and the staging. Only the
    runner makes these, and nothing in them is kept; safe on what a killed run left."""
    for team_work in out.glob("*/.work"):
        close_volume(team_work, None)
    close_volume(out / ".volumes", None)
    remove_tree(out / ".staging")


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
    if table.empty:  # nothing judged yet (every unit of the team left undone by the host)
        return table
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


def kept_manifest_path(team_dir: Path, key: str) -> Path:
    """Where a scan's manifest row source is kept: the team's own predictions.csv bytes, as
    text (``.txt``: never a CSV that a spreadsheet would evaluate)."""
    return team_dir / "logs" / f"{key}.manifest.txt"


def record_judgement(
    run: PendingRun, row: dict, manifest: bytes | None, output_dir: Path, team_dir: Path, keep: bool
) -> dict:
    """After ``judge`` (whose messages hold no path of the work folder): the row completed
    (the image), the team's manifest kept beside the log (as ``<key>.manifest.txt``: the
    team's own bytes, never a CSV that a spreadsheet would evaluate), the prediction kept
    as the runner's own copy (``volume.keep_copy``: a regular file of the runner's user,
    mode 0644) when kept and ``ok``, and the row cached atomically with its signature. The
    work folder is the caller's to remove. Returns the row.

    A kept file that cannot be copied (the team's file changed type since it was judged)
    makes the scan ``invalid``; the host failing to write (a full disk) raises
    InfrastructureError, and nothing is cached."""
    key = run.scan.key
    row["image"] = run.team.image
    try:
        if manifest is not None:
            with atomic_path(kept_manifest_path(team_dir, key)) as tmp:
                tmp.write_bytes(manifest)
        if keep and row["status"] == OK:
            kept_dir = team_dir / "predictions"
            kept_dir.mkdir(exist_ok=True)
            try:
                keep_copy(output_dir / f"{key}.h5", kept_dir / f"{key}.h5")
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise
                row.update({e: math.nan for e in ERRORS})
                row.update(status=INVALID, message=clean_text(f"the prediction cannot be kept: {err}"))
        with atomic_path(team_dir / "scans" / f"{key}.json") as tmp:
            tmp.write_text(json.dumps({"signature": run.signature, "row": row}, default=_json_value))
    except OSError as err:
        raise InfrastructureError(
            f"{run.team.name} {key}: the runner could not write its results ({err.strerror or err})"
        ) from None
    return row


def contain(
    client,
    run: PendingRun,
    staged: Path,
    team_dir: Path,
    output_dir: Path,
    image: Path | None,
    limits: Limits,
    labels: dict,
    watchdog: Watchdog | None,
    isolation: Isolation,
) -> tuple[OutputVolume, ContainerResult, int]:
    """A unit's container: its /output made (a filesystem of the quota's size when
    ``image`` names where to keep it), the team's image run on the staged scan under the
    limits. Returns the output (still there, for ``conclude``), what the container did and
    the quota. Raises InfrastructureError (with nothing left behind) when the host or the
    engine, not the team, failed."""
    scan, team = run.scan, run.team
    quota = output_quota(scan, int(limits.output_quota_margin_mb * 1e6))
    log_path = team_dir / "logs" / f"{scan.key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    volume = open_volume(output_dir, image, quota)
    result = run_container(
        client,
        team.image,
        staged,
        output_dir,
        limits,
        log_path,
        labels,
        Watch(output_dir, quota, watchdog, volume=volume),
        isolation.userns,
        isolation.engine == "podman",
    )
    if result.infrastructure:
        volume.close()
        raise InfrastructureError(f"{team.name} {scan.key}: {result.error}")
    return volume, result, quota


def conclude(
    run: PendingRun,
    data: TusrecData,
    volume: OutputVolume,
    result: ContainerResult,
    limits: Limits,
    quota: int,
    team_dir: Path,
    keep: bool,
    log=print,
) -> dict:
    """Judge and record what a unit's container left, then remove its output whatever
    happens. Returns the row; InfrastructureError when its results cannot be written."""
    scan = run.scan
    try:
        log(f"{run.team.name} {scan.key}: judging", flush=True)
        log_path = team_dir / "logs" / f"{scan.key}.log"
        row, manifest = judge(scan, data, volume.path, result, limits, log_path, quota)
        return record_judgement(run, row, manifest, volume.path, team_dir, keep)
    finally:
        volume.close()  # the dense arrays: GB per scan


def volumes_folder(out: Path, limits: Limits, log=print) -> Path | None:
    """Where the run keeps its units' output filesystems (``OUT/.volumes``), or None when
    /output is a plain watched folder: ``limits.output_fs`` 'walk', or 'auto' on a host
    that cannot mount them (said once). 'kernel' on such a host is a RunnerError."""
    if limits.output_fs == "walk":
        return None
    problem = kernel_quota_problem()
    if problem:
        if limits.output_fs == "kernel":
            raise RunnerError(f"--output-fs kernel: {problem}")
        log(
            f"note: /output is a plain folder watched every {QUOTA_POLL_S:g} s, not a filesystem of "
            f"its own ({problem}): a team can exceed its quota between two polls",
            flush=True,
        )
        return None
    return out / ".volumes"


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


class IncompleteRunError(RunnerError):
    """Some units could not be run because of the host or the engine (not the teams): the
    tables hold every unit that was done, and a rerun does the rest."""

    def __init__(self, tables: dict[str, pd.DataFrame], undone: list[tuple[str, str, str]]):
        self.tables, self.undone = tables, undone
        lines = "; ".join(f"{team} {key}: {why}" for team, key, why in undone[:5])
        more = f" (and {len(undone) - 5} more)" if len(undone) > 5 else ""
        super().__init__(
            f"{len(undone)} run(s) not done because of the host or the engine, not the team: "
            f"{lines}{more}. Nothing was recorded for them; rerun the same command to do them"
        )


def check_isolation(
    client, teams: list[Team], limits: Limits, keep_predictions: bool, log=print
) -> Isolation:
    """The engine's user isolation, said once; ``keep_predictions`` is refused for a team
    whose container would run as host root (no user namespace, no rootless engine, no
    userns-remap, and an image or --user of uid 0)."""
    isolation = engine_isolation(client, limits)
    log(f"isolation: {isolation.describe()}", flush=True)
    if keep_predictions and isolation.root_is_host_root:
        root = [t.name for t in teams if image_runs_as_root(client, t.image, limits.user)]
        if root:
            raise RunnerError(
                f"--keep-predictions refused: {', '.join(root)} run(s) as root and this engine maps "
                "container root to host root; use podman (--userns auto), Docker's userns-remap or a "
                "rootless engine, or --user UID:GID"
            )
    return isolation


def run_teams(
    teams: list[Team],
    data: TusrecData,
    out: str | Path,
    limits: Limits | None = None,
    keys: list[str] | None = None,
    keep_predictions: bool = False,
    client=None,
    log=print,
    judge_workers: int = DEFAULT_JUDGE_WORKERS,
) -> dict[str, pd.DataFrame]:
    """Run every team's image on every scan; write each team's metrics into OUT/<team>.

    Scans already judged for the same image, time limit and data are skipped (with
    ``keep_predictions``, only when the kept file is there). Up to ``judge_workers`` scans
    are judged at once while the next containers run. Returns each team's table; raises
    IncompleteRunError (tables included) when the host or the engine failed some units
    twice.
    """
    limits = limits or Limits()
    out = Path(out)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{data.root}: no scans found")
    if judge_workers < 1:
        raise RunnerError(f"--judge-workers {judge_workers}: at least 1")
    data.require_ground_truth(scans, "the runner scores every scan and needs the transfs/ folder")
    client = client or _client()
    image_ids = _image_ids(client, teams)
    isolation = check_isolation(client, teams, limits, keep_predictions, log)
    tag = run_tag(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(client, out)
    images = volumes_folder(out, limits, log)
    run_id = uuid.uuid4().hex
    watchdog = Watchdog(run_id, out / ".watchdog.log")
    try:
        labels = {RUNNER_LABEL: tag, RUN_LABEL: run_id}
        context = RunContext(client, data, out, limits, keep_predictions, labels, watchdog, images, isolation)
        return _run(context, teams, scans, image_ids, judge_workers, log)
    finally:
        watchdog.close()


@dataclass
class RunContext:
    """What every unit of a serial run shares."""

    client: object
    data: TusrecData
    out: Path
    limits: Limits
    keep: bool
    labels: dict
    watchdog: Watchdog
    images: Path | None
    isolation: Isolation


def _contain_with_retries(ctx: RunContext, run: PendingRun, staged: Path, log):
    """``contain`` tried up to INFRASTRUCTURE_ATTEMPTS times; (volume, result, quota) or the
    last InfrastructureError's message."""
    team, scan = run.team, run.scan
    team_dir = ctx.out / team.name
    labels = {**ctx.labels, "tusrec.team": team.name, "tusrec.scan": scan.key}
    image = ctx.images / team.name / f"{scan.key}.img" if ctx.images is not None else None
    why = ""
    for attempt in range(INFRASTRUCTURE_ATTEMPTS):
        if attempt:
            log(f"{team.name} {scan.key}: trying again after: {why}", flush=True)
            time.sleep(INFRASTRUCTURE_RETRY_S)
        log(f"{team.name} {scan.key}: running", flush=True)
        try:
            return contain(
                ctx.client,
                run,
                staged,
                team_dir,
                team_dir / ".work" / scan.key,
                image,
                ctx.limits,
                labels,
                ctx.watchdog,
                ctx.isolation,
            )
        except InfrastructureError as err:
            why = str(err)
    return why


def _run(ctx: RunContext, teams, scans, image_ids, judge_workers, log):
    staging = ctx.out / ".staging"
    rows, pending = plan_runs(teams, scans, ctx.data, ctx.out, ctx.limits, image_ids, ctx.keep)
    bar = tqdm(total=len(scans) * len(teams), desc="run", unit="container", disable=None)
    bar.update(sum(len(r) for r in rows.values()))
    undone: list[tuple[str, str, str]] = []
    judging: dict = {}  # future -> (run, seconds it started)

    def collect(futures) -> None:
        for future in futures:
            run, t_judge = judging.pop(future)
            team = run.team
            try:
                row = future.result()
            except InfrastructureError as err:
                undone.append((team.name, run.scan.key, str(err)))
                bar.write(f"{team.name} {run.scan.key}: not done: {err}")
                continue
            rows[team.name][run.scan.key] = row
            write_team_table(ctx.out / team.name, rows[team.name], scans, ctx.keep)
            bar.write(
                f"{team.name} {run.scan.key}: {row['status']} in {row['runtime_s']:.1f} s "
                f"(judged in {time.monotonic() - t_judge:.2f} s)"
            )
            bar.update()

    with ThreadPoolExecutor(judge_workers, thread_name_prefix="judge") as pool:
        for scan in scans:
            runs = [r for r in pending if r.scan is scan]
            if not runs:
                continue
            staged = staging / scan.key
            stage_scan(scan, ctx.data, staged)
            for run in runs:
                # One slow file never stalls the queue, and the disk holds at most
                # judge_workers + 1 units' outputs.
                while len(judging) >= judge_workers:
                    collect(wait(list(judging), return_when=FIRST_COMPLETED).done)
                contained = _contain_with_retries(ctx, run, staged, log)
                if isinstance(contained, str):
                    undone.append((run.team.name, scan.key, contained))
                    bar.write(f"{run.team.name} {scan.key}: not done: {contained}")
                    continue
                volume, result, quota = contained
                team_dir = ctx.out / run.team.name
                future = pool.submit(
                    conclude, run, ctx.data, volume, result, ctx.limits, quota, team_dir, ctx.keep, log
                )
                judging[future] = (run, time.monotonic())
            remove_tree(staged)
        collect(wait(list(judging)).done)
    bar.close()
    remove_run_folders(ctx.out)  # every unit has concluded: what is left is empty
    tables = {t.name: write_team_table(ctx.out / t.name, rows[t.name], scans, ctx.keep) for t in teams}
    log(f"runner peak RSS {runner_peak_rss_mb():.0f} MB", flush=True)
    if undone:
        raise IncompleteRunError(tables, undone)
    return tables


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def limits_from(args) -> Limits:
    """The Limits of the options tusrec.harness.command.add_container_limits adds (``./evaluate
    run`` and ``./evaluate preflight`` alike)."""
    return Limits(
        args.time_limit,
        args.memory,
        args.gpus,
        user=args.user,
        output_quota_margin_mb=args.output_quota_margin,
        tmp_size=args.tmp_size,
        userns=args.userns,
        output_fs=args.output_fs,
    )


def run_command(args) -> int:
    """`./evaluate run`: run, print each team's summary, then rank unless --no-rank. Exit 3,
    without ranking, when the host or the engine left some units undone."""
    from tusrec.data import open_data

    incomplete = None
    try:
        teams = parse_teams(args.team)
        limits = limits_from(args)
        data = open_data(args.data)
        if getattr(args, "cluster", None) is None:
            tables = run_teams(
                teams,
                data,
                args.out,
                limits,
                args.keys,
                args.keep_predictions,
                judge_workers=args.judge_workers,
            )
        else:  # the same units on Dask workers holding a GPU slot (tusrec.harness.cluster)
            from tusrec import cluster
            from tusrec.harness import cluster as harness_cluster

            with cluster.connect(args.cluster, gpu_slots=True) as dask:
                tables = harness_cluster.run_teams(
                    dask, teams, data, args.out, limits, args.keys, args.keep_predictions
                )
    except IncompleteRunError as err:
        tables, incomplete = err.tables, err
    except (RunnerError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, table in tables.items():
        print(f"{name}: {summary(table)}")
    print(f"per-team tables in {args.out}/<team>/metrics.csv, container logs in {args.out}/<team>/logs/")
    if incomplete is not None:
        print(f"error: {incomplete}; the ranking was not made", file=sys.stderr)
        return 3
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

"""``./evaluate preflight IMAGE --data VAL``: a team's image tested as the organisers will run it.

The image runs through the organisers' own runner (tusrec.harness.runner.run_teams: the
same staging, container options, limits, quota, isolation and judging as ``./evaluate
run``, so whatever the runner enforces, preflight enforces) on a few scans of a
validation folder: by default the longest (the time limit's test) and the shortest. What
it did becomes a checklist, each line passed, failed (with the reason) or not checked:

- starts and exits 0 on every scan;
- writes the official dense form (GP/GL/LP/LL), not only the compact one;
- every file valid: each scan judged ``ok`` (read and scored under the read policy);
- within the time limit on the longest scan, with the margin;
- the image's size;
- runs as a non-root user;
- needs no network (it ran to the end with none);
- finds the GPU when given ``--gpus`` (the device its predictions.csv names); without
  ``--gpus``, not checked.

The image would be judged when no line fails (``Preflight.ok``); only then does
``--save`` write the tar a team hands in.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tusrec.data import Scan, TusrecData, atomic_path
from tusrec.harness import runner
from tusrec.harness.runner import (
    LOG_LIMIT_BYTES,
    MANIFEST_LIMIT_BYTES,
    Limits,
    RunnerError,
    Team,
    clean_text,
    declared_from_manifest,
    image_runs_as_root,
    read_capped,
    run_teams,
)
from tusrec.scoring import OK, TIMEOUT
from tusrec.scoring.policy import FORM_DENSE

TEAM = "preflight"  # the team's name in the run's folder
DEFAULT_MAX_IMAGE_GB = 16.0
# What a program prints when it looks for a network that is not there.
NETWORK_WORDS = re.compile(
    r"name resolution|Name or service not known|network (is )?unreachable|No route to host|"
    r"Could not resolve host|getaddrinfo|urlopen error|Max retries exceeded|ConnectionError|"
    r"Connection refused|Failed to establish a new connection",
    re.IGNORECASE,
)
PASSED, FAILED, NOT_CHECKED = "pass", "FAIL", "not checked"


@dataclass(frozen=True)
class Check:
    """One line of the checklist: ``passed`` is None when it could not be checked."""

    name: str
    passed: bool | None
    reason: str

    @property
    def verdict(self) -> str:
        return NOT_CHECKED if self.passed is None else PASSED if self.passed else FAILED

    def line(self, width: int = 32) -> str:
        return f"  {self.verdict:<11} {self.name:<{width}} {self.reason}"


@dataclass
class Preflight:
    """What preflight found: the checklist and each scan's row of the runner's table."""

    image: str
    scans: list[Scan]
    checks: list[Check]
    rows: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the image would be judged: no line failed."""
        return all(c.passed is not False for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]


def choose_scans(data: TusrecData, keys: list[str] | None = None, every: bool = False) -> list[Scan]:
    """The scans to run: ``keys`` when given, every scan with ``every``, else the longest
    (the time limit's test) and the shortest (a short scan's edge cases), in data order."""
    if keys or every:
        return data.select(keys)
    scans = data.select(None)
    longest = max(scans, key=lambda s: s.n_frames)
    others = [s for s in scans if s is not longest]
    shortest = min(others, key=lambda s: s.n_frames) if others else longest
    return [s for s in scans if s is longest or s is shortest]


def _image(client, image: str):
    import docker

    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound:
        hint = f"build it first: docker build -t {image} DIR"
        raise RunnerError(f"image {image!r} not found by the engine ({hint})") from None


def _log_text(team_dir: Path, key: str) -> str:
    raw, _ = read_capped(team_dir / "logs" / f"{key}.log", LOG_LIMIT_BYTES)
    return "" if raw is None else raw.decode("utf-8", "replace")


def _device(team_dir: Path, key: str) -> str:
    """The device the team's own predictions.csv names for ``key`` ('' if none)."""
    raw, more = read_capped(runner.kept_manifest_path(team_dir, key), MANIFEST_LIMIT_BYTES)
    row, _ = declared_from_manifest(raw, more, key)
    return clean_text((row or {}).get("device", ""), 100).strip()


def _starts(rows: dict[str, dict]) -> Check:
    bad = []
    for key, row in rows.items():
        code, message = row.get("exit_code"), str(row.get("message", ""))
        if code == 0 or row["status"] == TIMEOUT or "output over quota" in message:
            continue  # it started; the time and the files have lines of their own
        bad.append(f"{key}: {message or 'did not run'}")
    if bad:
        return Check("starts and exits 0", False, "; ".join(bad))
    return Check("starts and exits 0", True, f"on {len(rows)} of {len(rows)} scan(s)")


def _dense(rows: dict[str, dict]) -> Check:
    name = "writes the official dense form"
    ok = {k: r for k, r in rows.items() if r["status"] == OK}
    if not ok:
        return Check(name, None, "no scan was judged ok (below)")
    compact = [k for k, r in ok.items() if r.get("form") != FORM_DENSE]
    if compact:
        return Check(
            name,
            False,
            f"{', '.join(compact)}: the compact form (transforms) only; the challenge's form is the "
            "dense GP/GL/LP/LL: run ./predict with --format ddf (the starter's default)",
        )
    return Check(name, True, f"GP/GL/LP/LL on {len(ok)} scan(s)")


def _valid(rows: dict[str, dict]) -> Check:
    name = "every file valid"
    bad = [f"{k}: {r['status']}: {r.get('message', '')}" for k, r in rows.items() if r["status"] != OK]
    if bad:
        return Check(name, False, "; ".join(bad))
    errors = "; ".join(
        f"{k} GPE {r['GPE']:.3f} mm, LPE {r['LPE']:.3f} mm (no motion: {r['GPE_identity']:.3f}, "
        f"{r['LPE_identity']:.3f})"
        for k, r in rows.items()
    )
    return Check(name, True, f"{len(rows)} of {len(rows)} judged ok ({errors})")


def _within_limit(rows: dict[str, dict], scans: list[Scan], data: TusrecData, limit_s: float) -> Check:
    name = "within the time limit"
    timed_out = [k for k, r in rows.items() if r["status"] == TIMEOUT]
    if timed_out:
        return Check(name, False, f"{', '.join(timed_out)}: killed at the limit of {limit_s:g} s")
    longest = max(scans, key=lambda s: s.n_frames)
    row = rows[longest.key]
    if row.get("exit_code") != 0:
        return Check(name, None, f"{longest.key} did not run to the end (above)")
    seconds = float(row["runtime_s"])
    biggest = max(data.scans, key=lambda s: s.n_frames)
    which = (
        "the longest of the data"
        if biggest.n_frames == longest.n_frames
        else (f"the longest run; the data's longest is {biggest.key}, {biggest.n_frames} frames")
    )
    margin = limit_s - seconds
    return Check(
        name,
        True,
        f"{longest.key} ({longest.n_frames} frames, {which}): {seconds:.1f} s of {limit_s:g} s "
        f"measured from outside, margin {margin:.1f} s ({100 * margin / limit_s:.0f} %)",
    )


def _size(attrs: dict, max_gb: float) -> Check:
    size_gb = float(attrs.get("Size") or 0) / 1e9
    passed = size_gb <= max_gb
    return Check("image size", passed, f"{size_gb:.2f} GB ({'at most' if passed else 'over'} {max_gb:g} GB)")


def _non_root(client, image: str, attrs: dict, limits: Limits) -> Check:
    user = limits.user or (attrs.get("Config") or {}).get("User") or ""
    if image_runs_as_root(client, image, limits.user):
        return Check(
            "runs as non-root",
            False,
            f"user {user or '(none: root)'}: the image must run as an unprivileged user (USER 10001:10001)",
        )
    return Check("runs as non-root", True, f"user {user}")


def _network(rows: dict[str, dict], team_dir: Path) -> Check:
    name = "needs no network"
    if all(r["status"] == OK for r in rows.values()):
        return Check(name, True, "ran to the end with no network (only the loopback interface)")
    for key, row in rows.items():
        if row.get("exit_code") not in (0, None):
            hits = [line for line in _log_text(team_dir, key).splitlines() if NETWORK_WORDS.search(line)]
            if hits:
                said = clean_text(hits[-1].strip(), 200)
                return Check(name, False, f"{key}: it failed without a network; its log: {said}")
    return Check(name, None, "it did not run to the end for another reason (above)")


def _gpu(rows: dict[str, dict], team_dir: Path, gpus: str | None) -> Check:
    name = "finds the GPU"
    if not gpus:
        where = "on a machine with a GPU and the NVIDIA Container Toolkit: --gpus all"
        return Check(name, None, f"no --gpus ({where})")
    ok = [k for k, r in rows.items() if r["status"] == OK]
    if not ok:
        return Check(name, None, "no scan was judged ok (above)")
    devices = {k: _device(team_dir, k) for k in ok}
    cpu = [
        f"{k} ran on {d or 'a device its predictions.csv does not name'}"
        for k, d in devices.items()
        if not d.lower().startswith("cuda")
    ]
    if cpu:
        return Check(name, False, f"given --gpus {gpus}, but " + "; ".join(cpu))
    return Check(name, True, "; ".join(f"{k} on {d}" for k, d in devices.items()))


def preflight(
    image: str,
    data: TusrecData,
    limits: Limits | None = None,
    keys: list[str] | None = None,
    every: bool = False,
    work: Path | None = None,
    max_image_gb: float = DEFAULT_MAX_IMAGE_GB,
    client=None,
    log=print,
) -> Preflight:
    """Run ``image`` as the organisers' runner does on the chosen scans of ``data`` (with
    ground truth) and make the checklist. ``work``: where the run's tables and container
    logs go (a new or empty folder, kept); default a temporary folder, removed.
    Raises RunnerError (no engine, image not found, a ``work`` folder in use) and
    runner.IncompleteRunError when the engine, not the image, failed a scan."""
    limits = limits or Limits()
    client = client or runner._client()
    attrs = _image(client, image).attrs
    scans = choose_scans(data, keys, every)
    if work is not None and work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise RunnerError(f"--out {work}: not an empty folder (preflight keeps its run there)")
    folder = Path(tempfile.mkdtemp(prefix="tusrec-preflight-")) if work is None else work
    try:
        tables = run_teams(
            [Team(TEAM, image)], data, folder, limits, [s.key for s in scans], False, client, log
        )
        team_dir = folder / TEAM
        rows = {r["key"]: r for r in tables[TEAM].to_dict("records")}
        checks = [
            _starts(rows),
            _dense(rows),
            _valid(rows),
            _within_limit(rows, scans, data, limits.time_limit_s),
            _size(attrs, max_image_gb),
            _non_root(client, image, attrs, limits),
            _network(rows, team_dir),
            _gpu(rows, team_dir, limits.gpus),
        ]
    finally:
        if work is None:
            runner.remove_tree(folder)
    return Preflight(image, scans, checks, rows)


def save_image(client, image: str, path: Path) -> int:
    """``docker save -o path image`` through the engine's API, written to a temporary name
    and renamed when complete. Returns the bytes written."""
    saved = _image(client, image)
    named = image if image in saved.tags else True
    size = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in saved.save(named=named):
            f.write(chunk)
            size += len(chunk)
    return size


def report(result: Preflight, data: TusrecData, limits: Limits) -> str:
    """The checklist as printed."""
    scans = ", ".join(f"{s.key} ({s.n_frames} frames)" for s in result.scans)
    head = [
        f"preflight of {result.image} on {len(result.scans)} scan(s) of {data.root}: {scans}",
        f"  under the organisers' rules: {limits.time_limit_s:g} s a scan from outside, {limits.memory} of "
        "memory, no network, /input read-only, an /output quota, its own user"
        + (f", --gpus {limits.gpus}" if limits.gpus else ""),
    ]
    lines = [c.line() for c in result.checks]
    failed = result.failed()
    if failed:
        tail = f"the image would NOT be judged as it is: {len(failed)} check(s) failed"
    else:
        tail = "the image would be judged: no check failed"
    return "\n".join([*head, *lines, tail])


def preflight_command(args) -> int:
    """``./evaluate preflight``: the checklist; exit 0 when the image would be judged, 1
    when a check failed, 2 for a usage error, 3 when the engine failed."""
    import sys

    from tusrec.data import open_data

    limits = runner.limits_from(args)
    try:
        data = open_data(args.data)
        client = runner._client()
        result = preflight(args.image, data, limits, args.keys, args.all, args.out, args.max_image_gb, client)
    except runner.IncompleteRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(result, data, limits))
    if not result.ok:
        if args.save:
            print(f"{args.save} not written: the image must pass every check first", file=sys.stderr)
        return 1
    if args.save:
        size = save_image(client, args.image, args.save)
        print(f"saved {args.image} to {args.save} ({size / 1e9:.2f} GB): hand in this file")
    return 0

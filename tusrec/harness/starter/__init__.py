"""A team's submission folder, made from the kit: ``tusrec new-submission DIR``.

The folder holds a model (the example in template/model.py, or the team's own file), a
Dockerfile on the CUDA runtime base that installs the kit's predictor from its wheel with
the predictor's libraries only (``tusrec-*.whl[predict]``), the team's requirements, and a
README with the loop (build, try, preflight, save). The kit enters the image as a wheel
copied into the folder (``wheels/``), never as this repository.

The template files are package data (template/); ``{{name}}`` in them is replaced by
``render``, which refuses a name it does not know and leaves none unreplaced.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tusrec

TEMPLATE = Path(__file__).resolve().parent / "template"
# The kit's Dockerfile's default base image (tests/test_starter.py holds them equal).
BASE_IMAGE = "nvidia/cuda:12.8.1-runtime-ubuntu24.04"
EXAMPLE_MODEL = "transforms"  # the example model.py's rigid function
WHEELS = "wheels"
# template file -> name in the team's folder (package data cannot hold dotfiles)
RENAMED = {"dockerignore": ".dockerignore"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_FILE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")  # a module name: it goes into the entrypoint


class StarterError(ValueError):
    """A new submission cannot be made as asked (the message names what and why)."""


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with every ``{{name}}`` replaced by ``values[name]``; a name missing from
    ``values`` raises KeyError (a template and its renderer out of step)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def kit_root() -> Path | None:
    """The checkout this package runs from (pyproject.toml beside tusrec/), or None when
    it is installed from a wheel."""
    root = Path(tusrec.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "tusrec").is_dir() else None


def build_wheel(out_dir: str | Path, root: Path | None = None) -> Path:
    """Build the kit's wheel from the checkout ``root`` (default: this one) into ``out_dir``.

    The sources are copied to a temporary folder first (the package, pyproject.toml,
    README.md), so that nothing setuptools leaves in the checkout's build/ (stale modules
    of an earlier build) can enter the wheel. Returns the wheel's path.
    """
    root = root or kit_root()
    if root is None:
        raise StarterError("no kit checkout to build the wheel from: pass --wheel tusrec-*.whl")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tusrec-wheel-") as tmp:
        src = Path(tmp) / "src"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(root / "tusrec", src / "tusrec", ignore=skip)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        built = Path(tmp) / "dist"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(built),
                str(src),
            ],
            capture_output=True,
            text=True,
        )
        wheels = sorted(built.glob("tusrec-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel written"]
            raise StarterError(f"building the kit's wheel from {root} failed: {last[0]}")
        target = out_dir / wheels[0].name
        shutil.copyfile(wheels[0], target)
    return target


def parse_model(spec: str) -> tuple[Path, str]:
    """'path/to/file.py:NAME' -> (the file, NAME); the file must exist, be named like a
    module and define NAME at its top level (a function, a class or an assignment)."""
    path_text, sep, name = spec.rpartition(":")
    path = Path(path_text)
    if not sep or not name.isidentifier() or path.suffix != ".py":
        raise StarterError(f"--model {spec!r}: expected FILE.py:NAME, e.g. mymodel.py:transforms")
    if not _FILE_NAME.fullmatch(path.name):
        raise StarterError(f"--model {spec!r}: the file's name must be a module name (letters, digits, _)")
    if not path.is_file():
        raise StarterError(f"--model {spec!r}: {path} is not a file")
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except SyntaxError as err:
        where = f"line {err.lineno}: {err.msg}"
        raise StarterError(f"--model {spec!r}: {path} is not valid Python ({where})") from None
    if name not in _top_level_names(tree):
        raise StarterError(f"--model {spec!r}: {path} defines no {name} at its top level")
    return path, name


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def image_tag(folder: Path) -> str:
    """An image name made of the folder's name: lower case, [a-z0-9._-], never empty."""
    tag = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("._-")
    return tag or "submission"


def new_submission(
    folder: str | Path, model: str | None = None, wheel: str | Path | None = None
) -> list[Path]:
    """Write a team's submission folder at ``folder`` (new, or an empty folder).

    model: 'FILE.py:NAME', the team's model, copied in (default: the example model.py,
    NAME 'transforms'). wheel: the kit's wheel to install in the image (default: built
    from this checkout). Returns the files written, relative to ``folder``.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StarterError(f"{folder}: not an empty folder; new-submission writes a new one (choose another)")
    model_file, model_name = (TEMPLATE / "model.py", EXAMPLE_MODEL) if model is None else parse_model(model)
    if wheel is not None:
        wheel = Path(wheel)
        if not (wheel.is_file() and wheel.name.startswith("tusrec-") and wheel.suffix == ".whl"):
            raise StarterError(f"--wheel {wheel}: expected the kit's wheel file tusrec-*.whl (make wheel)")
    elif kit_root() is None:
        raise StarterError("this tusrec is installed from a wheel: pass --wheel tusrec-*.whl")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.resolve().parent))
    try:
        if wheel is not None:
            (staging / WHEELS).mkdir()
            built = Path(shutil.copyfile(wheel, staging / WHEELS / wheel.name))
        else:
            built = build_wheel(staging / WHEELS)
        values = {
            "kit_version": tusrec.__version__,
            "base_image": BASE_IMAGE,
            "model_file": model_file.name,
            "model_name": model_name,
            "wheel": Path(built).name,
            "tag": image_tag(folder),
            "folder": str(folder),
        }
        for path in sorted(TEMPLATE.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(TEMPLATE)
            if rel == Path("model.py"):
                continue  # the model goes in below, as it is (it is the team's code)
            target = staging / rel.parent / RENAMED.get(rel.name, rel.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render(path.read_text(), values))
        shutil.copyfile(model_file, staging / model_file.name)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written

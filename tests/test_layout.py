"""The package's rooms import only upstream (README, module map): every import of every
module, lazy ones inside functions included, read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tusrec"
ROOMS = ("scoring", "show", "ranking", "harness")  # each may import only those before it
PREDICTOR = ("model", "predict")  # what the submission image holds besides the floor
FLOOR = ("data", "geometry", "ddf", "cluster", "plotting", "landmarks", "simulate", "options")
COMMAND_SUFFIX = "_command"  # tusrec/<room>_command.py: the command of a room that is a module


def room_of(module: str) -> str | None:
    """'tusrec.scoring.metrics' -> 'scoring'; None outside the package or for its root."""
    parts = module.split(".")
    if parts[0] != "tusrec" or len(parts) < 2:
        return None
    return parts[1].removesuffix(COMMAND_SUFFIX)


def imported_rooms(path: Path) -> set[str]:
    """The rooms (second component under tusrec) that a source file imports."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tusrec import cluster` imports the room named by the alias
            names = [
                f"{node.module}.{a.name}" if node.module == "tusrec" else node.module for a in node.names
            ]
        else:
            continue
        found |= {r for r in map(room_of, names) if r is not None}
    return found


def forbidden(room: str) -> set[str]:
    """What a module of ``room`` must not import."""
    downstream_of_scoring = {"show", "ranking", "harness"}
    if room in ROOMS:
        rank = ROOMS.index(room)
        return set(ROOMS[rank + 1 :]) | {"model", "predict", "train"}
    if room in PREDICTOR:
        return {*ROOMS, "train", "simulate", "landmarks", "cluster"}
    if room == "train":  # a development tool: it uses the metric and the predictor's device choice
        return downstream_of_scoring
    if room in FLOOR:
        return {*ROOMS, *PREDICTOR, "train"}
    return set()  # the command line (cli, __main__) sits on top of everything


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def room_of_path(path: Path) -> str:
    """The room of a source file: its package or module under tusrec (a room's command
    module, tusrec/<room>/command.py or tusrec/<room>_command.py, is in that room)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py").removesuffix(COMMAND_SUFFIX)


def test_every_module_belongs_to_a_known_room():
    known = {*ROOMS, *PREDICTOR, *FLOOR, "train", "cli", "__init__", "__main__"}
    for path in modules():
        room = room_of_path(path)
        assert room in known, f"{path}: not in the README's module map"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_room_imports_downstream(path):
    room = room_of_path(path)
    bad = imported_rooms(path) & forbidden(room)
    assert not bad, f"{path.relative_to(PACKAGE)} ({room}) imports downstream: {sorted(bad)}"


def test_the_checker_sees_lazy_and_aliased_imports(tmp_path):
    """The rule can fail: a lazy import inside a function and a `from tusrec import x`."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from tusrec.harness.runner import run_teams\n"
        "from tusrec import ranking as r\nimport tusrec.scoring.metrics\n"
    )
    assert imported_rooms(source) == {"harness", "ranking", "scoring"}
    assert {"harness", "ranking"} <= forbidden("scoring")


def test_a_command_module_obeys_its_rooms_rule(tmp_path):
    """tusrec/landmarks_command.py is in the landmarks room: the floor, which must not import
    the predictor; and an import of it counts as an import of that room."""
    assert room_of_path(PACKAGE / "landmarks_command.py") == "landmarks"
    assert room_of_path(PACKAGE / "scoring" / "command.py") == "scoring"
    assert "predict" in forbidden(room_of_path(PACKAGE / "landmarks_command.py"))
    source = tmp_path / "m.py"
    source.write_text("from tusrec.landmarks_command import add_landmarks\n")
    assert imported_rooms(source) == {"landmarks"}


def test_the_command_line_imports_every_command_module_lazily():
    """tusrec.cli names its commands' modules as strings (imported only for the command
    that runs): a module-level import of a room would load it for every command."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(room_of(node.module))
        elif isinstance(node, ast.Import):
            top_level |= {room_of(a.name) for a in node.names}
    assert top_level - {None} <= {"data"}

"""`./evaluate preflight`'s checklist from what the organisers' runner recorded: each line's
own failure, with no engine. The images themselves, passing and failing, run in podman in
tests/test_starter.py (beside the starter image they are built from)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from tusrec.harness.preflight import (
    NOT_CHECKED,
    Check,
    Preflight,
    _dense,
    _gpu,
    _network,
    _non_root,
    _size,
    _starts,
    _valid,
    _within_limit,
    choose_scans,
    report,
)
from tusrec.harness.runner import Limits, kept_manifest_path


def scan(key: str, n: int):
    return SimpleNamespace(key=key, n_frames=n)


def row(key: str, status: str = "ok", exit_code=0, form="ddf", seconds=10.0, message="") -> dict:
    return {
        "key": key,
        "status": status,
        "exit_code": exit_code,
        "form": form,
        "runtime_s": seconds,
        "message": message,
        "GPE": 1.5,
        "LPE": 0.2,
        "GPE_identity": 2.0,
        "LPE_identity": 0.3,
    }


class Data:
    """What preflight reads of a data folder: its scans, select(keys)."""

    def __init__(self, scans):
        self.scans = scans
        self.root = Path("val")

    def select(self, keys):
        return [s for s in self.scans if keys is None or s.key in keys]


# --------------------------------------------------------------------------- no engine


def test_default_scans_are_the_longest_and_the_shortest():
    data = Data([scan("a", 50), scan("b", 300), scan("c", 20), scan("d", 300)])
    assert [s.key for s in choose_scans(data)] == ["b", "c"]
    assert [s.key for s in choose_scans(data, ["d"])] == ["d"]
    assert [s.key for s in choose_scans(data, every=True)] == ["a", "b", "c", "d"]
    same = Data([scan("x", 40), scan("y", 40)])
    assert [s.key for s in choose_scans(same)] == ["x", "y"]  # two scans, not one twice
    assert [s.key for s in choose_scans(Data([scan("x", 40)]))] == ["x"]


def test_each_line_fails_for_its_own_reason(tmp_path):
    ok = {"a": row("a"), "b": row("b")}
    assert all(c.passed for c in (_starts(ok), _dense(ok), _valid(ok)))
    crashed = {"a": row("a", "failed", 1, message="exit code 1: Traceback ... ValueError: bad")}
    check = _starts(crashed)
    assert check.passed is False and "ValueError: bad" in check.reason
    assert _dense(crashed).passed is None and _valid(crashed).passed is False
    compact = {"a": row("a"), "b": row("b", form="transforms")}
    check = _dense(compact)
    assert check.passed is False and check.reason.startswith("b: the compact form")
    timed_out = {"a": row("a", "timeout", None, seconds=120.0, message="killed at the time limit")}
    assert _starts(timed_out).passed is True
    scans = [scan("a", 300)]
    check = _within_limit(timed_out, scans, Data(scans), 120.0)
    assert check.passed is False and "killed at the limit of 120 s" in check.reason
    check = _within_limit({"a": row("a", seconds=30.0)}, scans, Data(scans), 120.0)
    assert check.passed and "30.0 s of 120 s" in check.reason and "margin 90.0 s (75 %)" in check.reason
    longer = Data([*scans, scan("z", 900)])
    check = _within_limit({"a": row("a", seconds=30.0)}, scans, longer, 120.0)
    assert "the data's longest is z, 900 frames" in check.reason
    assert _size({"Size": 17e9}, 16.0).passed is False and _size({"Size": 2e9}, 16.0).passed


def test_network_and_gpu_lines_read_the_kept_log_and_manifest(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text(
        "urllib.error.URLError: <urlopen error [Errno -3] Temporary failure in name resolution>\n"
    )
    (logs / "b.log").write_text("ValueError: bad\n")
    failed = {"a": row("a", "failed", 1)}
    check = _network(failed, tmp_path)
    assert check.passed is False and "name resolution" in check.reason
    assert _network({"b": row("b", "failed", 1)}, tmp_path).passed is None
    assert _network({"b": row("b")}, tmp_path).passed is True
    ok = {"a": row("a"), "b": row("b")}
    assert _gpu(ok, tmp_path, None).verdict == NOT_CHECKED
    header = "key,frames,status,seconds,device,message\n"
    kept_manifest_path(tmp_path, "a").write_text(header + "a,40,ok,1.0,cuda:0,\n")
    kept_manifest_path(tmp_path, "b").write_text(header + "b,40,ok,1.0,cpu,\n")
    check = _gpu(ok, tmp_path, "all")
    assert check.passed is False and "b ran on cpu" in check.reason and "a ran" not in check.reason
    kept_manifest_path(tmp_path, "b").write_bytes(b"\x00\xff garbage")
    assert "does not name" in _gpu(ok, tmp_path, "all").reason
    kept_manifest_path(tmp_path, "b").write_text(header + "b,40,ok,1.0,cuda:0,\n")
    check = _gpu(ok, tmp_path, "all")
    assert check.passed and check.reason == "a on cuda:0; b on cuda:0"


def test_non_root_line_reads_the_images_user():
    def client(user):
        image = SimpleNamespace(attrs={"Config": {"User": user}})
        return SimpleNamespace(images=SimpleNamespace(get=lambda name: image)), image.attrs

    for user, passed in (("", False), ("root", False), ("0:0", False), ("10001:10001", True), ("team", True)):
        c, attrs = client(user)
        assert _non_root(c, "img", attrs, Limits()).passed is passed, user


def test_not_checked_lines_do_not_fail_the_image():
    lines = [Check("one", True, "x"), Check("two", None, "not here")]
    result = Preflight("img", [], lines)
    assert result.ok and result.failed() == []
    text = report(result, Data([]), Limits())
    assert text.endswith("the image would be judged: no check failed")
    assert "  not checked two" in text and "  pass        one" in text
    result = Preflight("img", [], [*lines, Check("three", False, "because")])
    assert not result.ok and [c.name for c in result.failed()] == ["three"]
    assert report(result, Data([]), Limits()).endswith("NOT be judged as it is: 1 check(s) failed")
    assert math.isfinite(row("a")["GPE"])


def test_command_without_an_engine_is_one_line(eval_root, tmp_path, monkeypatch, capsys):
    from tusrec.cli import main

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert main(["evaluate", "preflight", "team:latest", "--data", str(eval_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no container engine at unix://") and len(err.strip().splitlines()) == 1

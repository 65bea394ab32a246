"""The command line: every option documents itself, the reference page is generated from the
parsers, the dispatcher imports only the running command's module, and every bad input gets
one clear line and the right exit status without losing what could be done."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tusrec.cli import COMMANDS, build_parser, main, options, reference_markdown, subcommands
from tusrec.data import open_data

ROOT = Path(__file__).resolve().parents[1]


def all_parsers(parser: argparse.ArgumentParser, path: str = "tusrec"):
    """(command path, parser) of every command and subcommand under ``parser``."""
    for name, child in subcommands(parser).items():
        yield f"{path} {name}", child
        yield from all_parsers(child, f"{path} {name}")


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``parser`` with no help, or whose help does not show a default they
    have (flags, nargs=0, are on or off: their help says what 'on' does)."""
    bad = []
    for action in options(parser):
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            bad.append(f"{name}: no help")
        elif (
            action.default not in (None, argparse.SUPPRESS)
            and action.nargs != 0
            and "%(default)" not in action.help
        ):
            bad.append(f"{name}: default {action.default!r} not in its help (use %(default)s)")
    return bad


def test_every_option_says_what_it_does_and_its_default():
    parser, _ = build_parser()
    parsers = list(all_parsers(parser))
    assert {p for p, _ in parsers} >= {f"tusrec {name}" for name in COMMANDS} | {"tusrec evaluate show"}
    problems = [f"{path} {problem}" for path, p in parsers for problem in undocumented(p)]
    assert not problems, "\n".join(problems)


def test_the_help_rule_can_fail():
    toy = argparse.ArgumentParser()
    toy.add_argument("--quiet", action="store_true", help="say less")
    toy.add_argument("--chunk", type=int, default=16, help="frames per chunk (default 16)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--keys", nargs="+", default=None, help="only these")
    assert undocumented(toy) == [
        "--chunk: default 16 not in its help (use %(default)s)",
        "--seed: no help",
    ]


def test_the_committed_reference_is_the_generated_one():
    script = ROOT / "scripts" / "cli_reference.py"
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_reference_shows_every_option_with_its_default_and_escapes_markdown():
    text = reference_markdown()
    parser, _ = build_parser()
    for path, p in all_parsers(parser):
        heading = path.replace("tusrec evaluate", "./evaluate").replace("tusrec predict", "./predict")
        heading = heading.replace("tusrec landmarks", "./landmarks")
        assert f"`{heading}`" in text
        for action in options(p):
            assert f"| `{p._get_formatter()._format_action_invocation(action)}` |" in text
    assert "(default: 480x640)" in text and "(default: 120.0)" in text  # %(default)s filled in
    assert "<key>" not in text and "&lt;key&gt;.h5" in text  # not an HTML tag for Markdown


# --------------------------------------------------------------------------- the dispatcher


def imported_rooms(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(m for m in sys.modules if m.startswith('tusrec.')))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    return {m.split(".")[1] for m in run.stdout.split()}


def test_only_the_running_commands_module_is_imported():
    rooms = imported_rooms("from tusrec.cli import build_parser; build_parser(['predict', '--help'])")
    assert "predict" in rooms and not rooms & {"scoring", "ranking", "harness", "show", "train", "simulate"}
    rooms = imported_rooms("from tusrec.cli import build_parser; build_parser(['evaluate', 'rank'])")
    assert "ranking" in rooms and not rooms & {"predict", "harness", "show", "train", "model"}
    # `tusrec --help` lists every command from the summaries alone
    floor = {"cli", "data", "geometry"}
    assert imported_rooms("from tusrec.cli import build_parser; build_parser(['--help'])") <= floor


def test_a_command_run_under_its_root_name_is_named_so(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["score", "--bogus"], prog="evaluate")
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("usage: evaluate score ")


# --------------------------------------------------------------------------- bad inputs


def usage_error(argv: list[str], capsys) -> str:
    """The error line of a usage error (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


SIM = ["--scans", "1", "--image-size", "24x32", "--no-landmarks"]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--frames", "1", "at least 2"),
        ("--frames", "0", "at least 2"),
        ("--frames", "5-3", "MIN-MAX"),
        ("--frames", "many", "expected N or MIN-MAX"),
        ("--subjects", "-1", "expected subject numbers 0-999"),
        ("--subjects", "1000", "subjects are 0-999"),
        ("--subjects", "x", "expected subject numbers"),
        ("--image-size", "0x32", "each side 1 to 4096"),
        ("--image-size", "100000x640", "each side 1 to 4096"),
        ("--image-size", "big", "expected HxW"),
        ("--seed", "-1", "0 or more"),
        ("--seed", "nan", "whole number"),
        ("--k", "0", "at least 1"),
    ],
)
def test_simulate_refuses_a_bad_value_in_one_line(option, value, said, tmp_path, capsys):
    out = tmp_path / "sim"
    line = usage_error(["simulate", str(out), *SIM, option, value], capsys)
    assert line.startswith(f"tusrec simulate: error: argument {option}: ") and said in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("scans", "said"),
    [("0", "1 to 24 scans"), ("25", "1 to 24 scans"), ("LH_Nope", "unknown scan names: ['LH_Nope']")],
)
def test_simulate_refuses_scans_it_does_not_have(scans, said, tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", str(out), "--scans", scans, "--frames", "3", "--no-landmarks"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --scans") and said in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_simulate_test_layout_withholds_the_ground_truth(tmp_path, capsys):
    out = tmp_path / "test"
    argv = ["simulate", str(out), "--layout", "test", "--scans", "2", "--frames", "3"]
    argv += ["--image-size", "48x64"]
    assert main(argv) == 0
    assert "(2024 protocol, test layout)" in capsys.readouterr().out
    assert (out / "frames" / "050").is_dir() and not (out / "transfs").exists()
    data = open_data(out)
    assert [s.has_tforms for s in data.scans] == [False, False]
    assert all(s.has_landmarks for s in data.scans)
    with h5py.File(out / "dataset_keys.h5", "r") as f:
        assert sorted(f) == sorted(s.key for s in data.scans)
    # a rerun finds the scans complete (no ground truth expected) and rewrites nothing
    mtime = (out / "frames" / "050" / f"{data.scans[0].name}.h5").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "frames" / "050" / f"{data.scans[0].name}.h5").stat().st_mtime_ns == mtime


def test_simulate_names_the_scans_whose_landmarks_cannot_be_found(tmp_path, capsys):
    """24x32 frames leave no field of view inside the landmarks' 10-pixel margin: the scans are
    written, each is named with why, and the exit status is 1."""
    out = tmp_path / "sim"
    assert main(["simulate", str(out), "--scans", "2", "--frames", "3", "--image-size", "24x32"]) == 1
    captured = capsys.readouterr()
    assert "wrote 2 synthetic scans" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in captured.err
    assert all("no landmarks" in line and "narrower than the 10-pixel margin" in line for line in lines[:2])
    assert lines[2] == "landmarks failed for 2 of 2 scans (see above)"
    assert len(open_data(out).scans) == 2


def test_landmarks_of_a_folder_with_one_truncated_scan(eval_root, tmp_path, capsys):
    """The good scans get their landmarks, the bad one is named, the exit status is 1."""
    data = open_data(eval_root)
    bad = data.scans[1]
    size = bad.frames_path.stat().st_size
    with open(bad.frames_path, "r+b") as f:
        f.truncate(size // 2)
    out = tmp_path / "lm"
    assert main(["landmarks", str(eval_root), "--out", str(out), "--k", "4"]) == 1
    captured = capsys.readouterr()
    assert "landmarks: 3 scans extracted, 0 already done" in captured.out
    err = captured.err.strip().splitlines()
    assert err[0].startswith(f"{bad.key}: no landmarks: {bad.frames_path}") and "truncated" in err[0]
    assert err[-1] == f"failed: {bad.key} (1 of 4 scans)"
    written = {}
    for path in out.glob("landmark_*.h5"):
        with h5py.File(path, "r") as f:
            written.update({f"sub{path.stem[-3:]}__{name}": f[name].shape[1] for name in f})
    assert written == {s.key: 3 for s in data.scans if s.key != bad.key}  # (K, 3) each
    # a rerun does the good ones no more and still names the bad one
    assert main(["landmarks", str(eval_root), "--out", str(out)]) == 1
    assert "landmarks: 0 scans extracted, 3 already done" in capsys.readouterr().out


def test_score_against_the_wrong_data_is_an_error_that_says_why(eval_root, dataset_factory, tmp_path, capsys):
    pred = tmp_path / "pred"
    assert main(["reference", "identity", str(eval_root), "--out", str(pred)]) == 0
    other = dataset_factory(tmp_path / "other", subjects=("070",), names=("LH_Par_C_DtP", "RH_Per_L_PtD"))
    capsys.readouterr()
    assert main(["evaluate", "score", str(pred), "--data", str(other), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == [
        "sub070__LH_Par_C_DtP: missing: no prediction file sub070__LH_Par_C_DtP.h5",
        "sub070__RH_Per_L_PtD: missing: no prediction file sub070__RH_Per_L_PtD.h5",
    ]
    assert err[2].startswith("error: none of the 2 scans was scored (2 missing): ")
    assert "4 .h5 file(s) for other scans (e.g. sub050__LH_Par_C_DtP.h5)" in err[2] and str(other) in err[2]
    # the right data scores, exit 0
    assert main(["evaluate", "score", str(pred), "--data", str(eval_root), "--out", str(tmp_path / "t")]) == 0


def test_score_of_files_that_cannot_be_scored_says_so(eval_root, tmp_path, capsys):
    pred = tmp_path / "pred"
    assert main(["reference", "identity", str(eval_root), "--out", str(pred)]) == 0
    for path in pred.glob("*.h5"):
        path.write_bytes(b"not HDF5")
    capsys.readouterr()
    assert main(["evaluate", "score", str(pred), "--data", str(eval_root), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(": invalid: " in line for line in err[:4])
    assert err[4].startswith("error: none of the 4 scans was scored (4 invalid): the files cannot be scored")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["reference", "identity", "DATA", "--out", "OUT", "--chunk", "0"],
            "argument --chunk: '0': expected at least 1",
        ),
        (
            ["evaluate", "score", "P", "--data", "DATA", "--out", "OUT", "--chunk", "-5"],
            "argument --chunk: '-5'",
        ),
        (
            ["evaluate", "rank", "--team", "a=M", "--out", "OUT", "--seed", "-1"],
            "argument --seed: '-1': expected 0",
        ),
        (["evaluate", "run", "--team", "a=i", "--data", "D", "--out", "O", "--time-limit", "nan"], "finite"),
        (
            ["evaluate", "run", "--team", "a=i", "--data", "D", "--out", "O", "--bootstrap", "-1"],
            "at least 1",
        ),
        (
            ["evaluate", "run", "--team", "a=i", "--data", "D", "--out", "O", "--output-quota-margin", "-5"],
            "0 or more",
        ),
        (
            ["train", "D", "--out", "O", "--config", "C", "--steps", "0"],
            "argument --steps: '0': expected at least 1",
        ),
        (["train", "D", "--out", "O", "--config", "C", "--max-seconds", "inf"], "expected a finite number"),
        (["train", "D", "--out", "O", "--config", "C", "--workers", "-1"], "expected 0 or more"),
        (["error-head", "W", "D", "--steps", "-3"], "argument --steps: '-3'"),
        (["landmarks", "D", "--k", "0"], "argument --k: '0': expected at least 1"),
    ],
)
def test_a_value_out_of_range_is_a_usage_error_before_anything_runs(argv, said, capsys):
    """Checked by argparse: no engine, data or weights is looked at (there are none here)."""
    line = usage_error(argv, capsys)
    assert "error: argument" in line and said in line


def test_show_refuses_a_voxel_edge_that_is_not_a_finite_positive_number(eval_root, tmp_path, capsys):
    pred = tmp_path / "pred"
    assert main(["reference", "identity", str(eval_root), "--out", str(pred)]) == 0
    for value in ("nan", "inf", "0"):  # NaN and inf ended in a traceback
        argv = ["evaluate", "show", str(pred), "--data", str(eval_root), "--out", str(tmp_path / "s")]
        assert main([*argv, "--voxel-mm", value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --max-scans, --pixel-step, --voxel-mm") and "\n" not in err


def test_train_names_a_config_that_is_not_there(tmp_path, capsys):
    config = tmp_path / "nowhere.json"
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config {config}: No such file or directory"


def test_reference_writes_the_readable_scans_and_names_the_others(eval_root, tmp_path, capsys):
    data = open_data(eval_root)
    bad = data.scans[0]
    bad.frames_path.write_bytes(b"not HDF5")
    out = tmp_path / "pred"
    assert main(["reference", "identity", str(eval_root), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0].startswith(f"{bad.key}: failed: {bad.frames_path}: cannot be opened as an HDF5 file")
    assert err[-1] == f"failed: {bad.key} (1 of 4 scans)"
    assert "identity: 3 scans" in captured.out
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(s.key for s in data.scans[1:])
    manifest = (out / "predictions.csv").read_text()
    assert f"{bad.key},,failed," in manifest
    # ground-truth on a folder without it is a usage error before anything is written
    test_layout = tmp_path / "t"
    argv = ["simulate", str(test_layout), "--layout", "test", "--scans", "1", "--frames", "3"]
    assert main([*argv, "--no-landmarks", "--image-size", "24x32"]) == 0
    capsys.readouterr()
    assert main(["reference", "ground-truth", str(test_layout), "--out", str(tmp_path / "gt")]) == 2
    assert "no ground truth for 1 scan(s)" in capsys.readouterr().err
    assert not (tmp_path / "gt").exists()


def test_landmarks_name_the_scans_of_an_unreadable_landmark_file(eval_root, capsys):
    data = open_data(eval_root)
    path = data.landmark_path("050")
    path.write_bytes(b"not HDF5")
    assert main(["landmarks", str(eval_root), "--k", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    named = [s.key for s in data.scans if s.subject == "050"]
    assert [line.split(":")[0] for line in err[:-1]] == named
    assert all("(remove it to have it made again)" in line for line in err[:-1])
    assert path.read_bytes() == b"not HDF5"  # never overwritten unasked
    assert main(["landmarks", str(eval_root), "--k", "3", "--overwrite"]) == 1  # nor with --overwrite
    assert path.read_bytes() == b"not HDF5"

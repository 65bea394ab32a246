"""What a new user meets in the first hour: the root launcher, --help, error messages,
the score summary's sd, and what `tusrec simulate --no-landmarks` leaves behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tusrec.cli import main
from tusrec.scoring.score import summary

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_launcher_without_setup_says_what_to_run(tmp_path):
    # a checkout whose .venv python cannot import the project (as before `make setup`)
    shutil.copy(ROOT / ".tusrec-command", tmp_path / ".tusrec-command")
    for name in ("evaluate", "predict", "landmarks"):
        (tmp_path / name).symlink_to(".tusrec-command")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    # -I -S: isolated and without site-packages, so nothing but the standard library imports
    (venv / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    (venv / "python").chmod(0o755)
    for name in ("evaluate", "predict", "landmarks"):
        run = subprocess.run([str(tmp_path / name), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 3, run
        assert "Traceback" not in run.stderr
        assert "run `make setup`" in run.stderr and "tusrec" in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_evaluate_help_lists_every_subcommand():
    run = subprocess.run([str(ROOT / "evaluate"), "--help"], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    listed = run.stdout.split("positional arguments:")[1]
    for command in ("check", "score", "rank", "run", "show"):
        assert f"    {command} " in listed
        assert f"`{command}`" in run.stdout.split("positional arguments:")[0]


def test_help_texts_cite_only_the_projects_own_documents(capsys):
    for argv in (["evaluate", "rank", "--help"], ["reference", "--help"], ["evaluate", "show", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "TUSREC.md" not in text and "shared/" not in text
    assert (ROOT / "docs" / "conventions.md").is_file()


def test_no_file_of_the_project_cites_files_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    offenders = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".sh", ".txt", ".toml", ".yml", "") or not path.is_file():
            continue
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        if "TUSREC.md" in text or "../shared" in text:
            offenders.append(name)
    assert offenders == []


def test_score_summary_sd_is_the_sample_sd_and_says_so():
    values = np.array([10.0, 20.0, 40.0])
    table = pd.DataFrame(
        {
            "status": ["ok", "ok", "ok", "failed"],
            **{e: [*values, np.nan] for e in ("GPE", "GLE", "LPE", "LLE")},
            "runtime_s": [1.0, 2.0, 3.0, np.nan],
        }
    )
    text = summary(table)
    sd = np.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1))  # ddof 1 by hand
    assert f"sd {sd:.4f}" in text and "ddof 1" in text
    assert f"{values.mean():9.4f}" in text
    assert "3 of 4 scans scored (1 failed)" in text
    assert "n/a (one scan)" in summary(table.iloc[[0]])


@pytest.mark.parametrize("command", ["score", "landmarks", "show"])
def test_an_unwritable_out_folder_is_one_line_not_a_traceback(command, eval_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # below a regular file: cannot be created, whoever runs the tests
    pred = tmp_path / "pred"
    main(["reference", "identity", str(eval_root), "--out", str(pred)])
    capsys.readouterr()
    argv = {
        "score": ["evaluate", "score", str(pred), "--data", str(eval_root), "--out", str(out)],
        "landmarks": ["landmarks", str(eval_root), "--out", str(out), "--overwrite"],
        "show": ["evaluate", "show", str(pred), "--data", str(eval_root), "--out", str(out)],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(out) in err and "Not a directory" in err
    assert len(err.splitlines()) == 1


def test_read_only_and_permission_errors_name_the_path(monkeypatch, capsys):
    import errno

    from tusrec import data_command

    for code, reason in ((errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):

        def refuse(args, code=code, reason=reason):
            raise OSError(code, reason, "/data/out/metrics.csv")

        monkeypatch.setattr(data_command, "run_info", refuse)
        assert main(["info", "/nowhere"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: /data/out/metrics.csv: {reason}")


def test_simulate_without_landmarks_leaves_no_landmark_folder(tmp_path):
    out = tmp_path / "sim"
    code = main(
        ["simulate", str(out), "--frames", "3", "--scans", "1", "--image-size", "24x32", "--no-landmarks"]
    )
    assert code == 0
    assert not (out / "landmark").exists() and not (out / "landmarks").exists()
    assert (out / "frames" / "050").is_dir()


def test_subcommand_usage_names_the_root_command(capsys):
    with pytest.raises(SystemExit):
        main(["show", "--help"], prog="evaluate")
    assert capsys.readouterr().out.startswith("usage: evaluate show ")

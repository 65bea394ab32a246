"""The documentation: the site builds strictly, its tables are what the measuring files hold,
its pictures were drawn with the shipped weights, and the README stays an entrance.

The site is built once per test module into a temporary folder (`mkdocs build --strict`:
a broken link, anchor, nav entry or API reference fails), then read as the browser renders
it (headless Chromium, skipped only where it is missing and not under CI=true)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from tests.browser import FLAGS, chromium

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(cwd: Path, out: Path) -> subprocess.CompletedProcess:
    """`make docs`'s build. Not --quiet: it hides the warnings from --strict, which then
    passes them (tested below)."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = _build(ROOT, out)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return out


def test_the_build_fails_on_a_broken_anchor(tmp_path):
    """The site's validation settings, on a two-page site whose link names a missing heading."""
    config = (ROOT / "mkdocs.yml").read_text()
    validation = config[config.index("validation:") : config.index("\n\n", config.index("validation:"))]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[there](other.md#no-such-heading)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A heading\n")
    (tmp_path / "mkdocs.yml").write_text(f"site_name: t\nstrict: true\n{validation}\n")
    run = _build(tmp_path, tmp_path / "site")
    assert run.returncode != 0 and "no-such-heading" in run.stderr, run.stderr[-2000:]
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[there](other.md#a-heading)\n")
    assert _build(tmp_path, tmp_path / "site").returncode == 0


def _text(html: str) -> str:
    """The visible text of a page, tags dropped and whitespace folded."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_generated_tables_are_those_the_files_give_today():
    """Every committed docs/generated/*.md is what scripts/docs_tables.py writes from today's
    benchmarks/, research/, weights/ and docs/img/ (a rerun measurement not carried into the
    docs fails here)."""
    assert _script("docs_tables").main(["--check"]) == 0


def test_the_check_names_a_stale_table(tmp_path, monkeypatch, capsys):
    tables = _script("docs_tables")
    monkeypatch.setattr(tables, "OUT", tmp_path)
    assert tables.main([]) == 0
    (tmp_path / "members.md").write_text("| member |\n|---|\n| typed by hand |\n")
    assert tables.main(["--check"]) == 1
    assert "members.md" in capsys.readouterr().err


def test_pictures_were_drawn_with_the_shipped_ensemble():
    """docs/img/figures.json records the weights' files the pictures were drawn with; a new
    ensemble needs `make figures`."""
    record = json.loads((ROOT / "docs" / "img" / "figures.json").read_text())
    assert record["made_with"] == _script("docs_figures").provenance(), "run make figures"
    for name in ("show-trajectory.png", "show-reconstruction.png", "demo-ranking.png"):
        assert (ROOT / "docs" / "img" / name).stat().st_size > 10_000


def test_site_tables_hold_the_measured_numbers(site):
    """The built pages print what the measuring files hold, read here independently."""
    members = {m["name"]: m for m in json.loads((ROOT / "weights" / "manifest.json").read_text())["members"]}
    card = _text((site / "predictor" / "model-card" / "index.html").read_text())
    for name, m in members.items():
        assert f"weights/{name}" in card
        assert f"{m['metrics']['val_GPE']:.2f}" in card
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())["results"]
    demo = [r for r in results if r["bench"] == "demo"][-1]
    perf = _text((site / "performance" / "index.html").read_text())
    assert f"{demo['total_s']:.1f}" in perf
    accuracy = json.loads((ROOT / "benchmarks" / "accuracy.json").read_text())
    ensemble = next(r for r in accuracy["all scans"] if r["model"] == "ensemble")
    acc = _text((site / "predictor" / "accuracy" / "index.html").read_text())
    assert f"{ensemble['GPE']:.2f}" in acc and f"{ensemble['FS']:.3f}" in acc


def test_api_reference_is_generated_from_the_code(site):
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in (
        "predict.predict_ddfs",
        "predict.interface",
        "scoring.metrics_for_scan",
        "scoring.score_predictions",
        "ranking.report.write_report",
    ):
        assert f'id="tusrec.{name}"' in api, name
    assert "calib_matrix.csv" in _text(api)  # metrics_for_scan's docstring


WINDOW = "--window-size=1300,2000"


def _dom(browser: str, page: Path, profile: Path) -> str:
    run = subprocess.run(
        [browser, *FLAGS, WINDOW, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_home_and_a_deep_page_render_in_headless_chromium(site, tmp_path):
    browser = chromium()
    home = _dom(browser, site / "index.html", tmp_path / "p1")
    assert "<title>tusrec</title>" in home
    text = _text(home)
    for entry in ("Getting started", "Participants", "Organisers", "Research record", "What is not tested"):
        assert entry in text  # the navigation
    assert "make demo" in text and "make test" in text
    assert 'src="img/show-trajectory.png"' in home

    deep = _dom(browser, site / "organisers" / "cluster" / "index.html", tmp_path / "p2")
    assert "The cluster - tusrec" in deep
    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())["results"]
    scaling = next(r for r in results if r["bench"] == "cluster_scaling")
    local2 = next(r for r in scaling["runs"] if r["workers"] == 2)
    assert f"{local2['wall_s']:.1f}" in _text(deep)  # the generated table, as the browser shows it

    shot = tmp_path / "home.png"
    run = subprocess.run(
        [
            browser,
            *FLAGS,
            WINDOW,
            f"--user-data-dir={tmp_path / 'p3'}",
            f"--screenshot={shot}",
            (site / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2000, 1300)
    # Material's indigo header bar is drawn (the stylesheet loaded from the built site)
    indigo = (image[..., 2] > 0.6) & (image[..., 0] < 0.35) & (image[..., 1] < 0.45)
    assert indigo[:60].sum() > 20_000


def test_readme_is_an_entrance_without_measured_numbers():
    """The README stays short and quotes no measurement by hand: measured figures live in the
    generated pages, which cannot drift from their files."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert "make demo" in text and "make test" in text
    measured = re.findall(r"\b\d[\d,.]*\s?(?:ms|s|min|MB|GB|KB|mm|frames/s|steps/s|x)\b", text)
    assert measured == [], measured
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (ROOT / link).exists(), f"README links to a missing {link}"

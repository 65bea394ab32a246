"""The ranking report end to end: `./evaluate rank` on team tables, the files it writes,
the self-contained report.html (rendered in headless Chromium), and a ranking of real
scored predictions of several quality levels."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from tusrec.cli import main
from tusrec.ranking.rank import RankingError, combine_teams, load_teams, read_team_table
from tusrec.ranking.report import FIGURES, analyse, write_report
from tusrec.ranking.synthetic import synthetic_tables

QUALITY = {"precise": 0.15, "good": 0.3, "fair": 0.5, "poor": 0.9}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """`evaluate rank` on four synthetic teams; 'fair' lacks three scans, 'poor' failed some."""
    root = tmp_path_factory.mktemp("rank")
    tables = synthetic_tables(QUALITY, subjects=3, failure_rate=0.0, seed=11)
    tables["fair"] = tables["fair"].iloc[3:]
    poor = tables["poor"]
    poor.loc[poor.index[:5], "status"] = "failed"
    poor.loc[poor.index[:5], ["GPE", "GLE", "LPE", "LLE"]] = np.nan
    args = ["evaluate", "rank", "--out", str(root / "report"), "--synthetic", "--title", "Test ranking"]
    args += ["--bootstrap", "300", "--seed", "3"]
    for name, table in tables.items():
        (root / name).mkdir()
        table.to_csv(root / name / "metrics.csv", index=False)
        args += ["--team", f"{name}={root / name / 'metrics.csv'}"]
    assert main(args) == 0
    return root / "report"


def test_every_file_and_the_right_order(report):
    for name in (
        "leaderboard.csv",
        "leaderboard.md",
        "scores_per_scan.csv",
        "bootstrap_summary.csv",
        "bootstrap_rank_frequencies.csv",
        "kendall_tau.csv",
        "sampling_distribution.csv",
        "pvalues.csv",
        "pvalues/scan_FS.csv",
        "pvalues/subject_LLE.csv",
        "patterns.csv",
        "scan_length_correlation.csv",
        "sensitivity.csv",
        "leave_one_out.csv",
        "analysis.json",
        "report.html",
    ):
        assert (report / name).is_file(), name
    board = pd.read_csv(report / "leaderboard.csv")
    assert list(board["team"]) == list(QUALITY)
    assert list(board["rank"]) == [1, 2, 3, 4]
    assert {"FS", "FS_sd", "GS", "LS", "PS", "LMS_sd", "GPE", "LLE", "runtime_s"} <= set(board.columns)
    assert list(board["not_scored"]) == [0, 0, 3, 5]
    md = (report / "leaderboard.md").read_text()
    assert "SYNTHETIC DATA" in md and "| 1 | precise |" in md
    freq = pd.read_csv(report / "bootstrap_rank_frequencies.csv")
    assert np.allclose(freq.groupby(["level", "team"])["frequency"].sum(), 1.0)
    tau = pd.read_csv(report / "kendall_tau.csv")
    assert len(tau) == 600 and tau["tau"].between(-1, 1).all()
    meta = json.loads((report / "analysis.json").read_text())
    assert meta["synthetic"] and meta["settings"]["normalisation"] == "minmax"
    assert any("'fair': 3 of 72 scans are not in its table" in n for n in meta["notes"])
    per_scan = pd.read_csv(report / "scores_per_scan.csv", dtype={"subject": str})
    absent = per_scan[(per_scan.team == "fair") & (per_scan.status == "absent")]
    assert len(absent) == 3 and (absent["FS"] == 0).all()
    matrix = pd.read_csv(report / "pvalues" / "scan_FS.csv", index_col=0)
    assert list(matrix.index) == list(QUALITY) and matrix.loc["precise", "poor"] < 0.05


def test_figures_are_png_images(report):
    for name in FIGURES:
        path = report / "figures" / f"{name}.png"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500, name
        # the red SYNTHETIC DATA label (#c00000) is in every figure
        red = (image[..., 0] > 0.7) & (image[..., 1] < 0.1) & (image[..., 2] < 0.1)
        assert red.sum() > 200, f"{name}: no SYNTHETIC DATA label"


class _Page(HTMLParser):
    """The parts of report.html the tests look at."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.ids: set[str] = set()
        self.cells: list[str] = []
        self.in_leaderboard = 0
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if "id" in a:
            self.ids.add(a["id"])
            if a["id"] == "leaderboard":
                self.in_leaderboard = 1
        elif self.in_leaderboard and tag == "div":
            self.in_leaderboard += 1
        self.in_cell = tag == "td" and self.in_leaderboard > 0

    def handle_endtag(self, tag):
        if tag == "div" and self.in_leaderboard:
            self.in_leaderboard -= 1
        if tag == "td":
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.cells.append(data.strip())


def check_page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    assert "synthetic" in page.ids and "SYNTHETIC DATA" in html
    assert {"leaderboard", "bootstrap", "sensitivity"} <= page.ids
    teams = [c for c in page.cells if c in QUALITY]
    assert teams == list(QUALITY), "leaderboard rows in rank order"
    assert len(page.images) == len(FIGURES)
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return page


def test_report_html_stands_alone(report):
    html = (report / "report.html").read_text(encoding="utf-8")
    check_page(html)
    assert 'src="http' not in html and 'href="http' not in html and "<script" not in html
    assert "3 of 72 scans are not in its table" in html  # the missing scans are reported


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(message)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,3000",
    ]
    url = (report / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [browser, *flags, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    check_page(dom.stdout)  # the DOM the browser built shows the leaderboard and the images
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [browser, *flags, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (3000, 1400)
    # the banner is drawn, and so are the figures: strongly blue pixels come only from them
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.1) & (image[..., 2] < 0.1)
    blue = (image[..., 2] - image[..., 0] > 0.25) & (image[..., 2] > 0.5)
    assert red.sum() > 5000 and blue.sum() > 5000


def test_rank_help_imports_no_analysis_code():
    code = (
        "import sys\nfrom tusrec.cli import main\n"
        "try:\n    main(['evaluate', 'rank', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "names = ('matplotlib', 'scipy.stats', 'pandas', 'tusrec.ranking.report')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_cli_errors(tmp_path, capsys):
    t = synthetic_tables(2, subjects=1, seed=0)["team A"]
    t.to_csv(tmp_path / "a.csv", index=False)
    base = ["evaluate", "rank", "--out", str(tmp_path / "out")]
    assert main([*base, "--team", f"x={tmp_path / 'a.csv'}", "--team", f"x={tmp_path / 'a.csv'}"]) == 2
    assert "duplicate team name 'x'" in capsys.readouterr().err
    assert main([*base, "--team", f"x={tmp_path / 'nothing.csv'}"]) == 2
    assert "nothing.csv: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--team", f"x={tmp_path / 'a.csv'}", "--normalisation", "zscore"])
    assert exit_.value.code == 2 and "invalid choice: 'zscore'" in capsys.readouterr().err
    with pytest.raises(RankingError, match="bootstrap must be at least 1"):
        analyse(combine_teams({"a": read_team_table(tmp_path / "a.csv")}), resamples=0)


def test_single_team_report(tmp_path):
    data = combine_teams({"solo": read_team_table_frame(synthetic_tables(1, subjects=2, seed=0)["team A"])})
    analysis = analyse(data, resamples=50)
    assert list(analysis.leaderboard["rank"]) == [1] and not analysis.pairwise
    assert any("Only one team" in n for n in analysis.notes)
    written = write_report(analysis, tmp_path / "solo")
    assert "figures/blob_plot.png" in written and "figures/significance_map.png" not in written
    assert "figures/kendall_tau.png" not in written  # no empty figure: tau needs two teams
    page = (tmp_path / "solo" / "report.html").read_text()
    assert "Needs two teams or more" in page and "it needs two teams or more" in page


def test_report_when_no_scan_of_any_team_was_scored(tmp_path):
    """Every container timed out (the runner's table: no errors, no identity errors):
    the ranking still writes its report, each team empty, and says why."""
    tables = synthetic_tables({"late": 0.3, "later": 0.5}, subjects=2, seed=4)
    args = ["evaluate", "rank", "--out", str(tmp_path / "report"), "--bootstrap", "50"]
    for name, table in tables.items():
        table["status"] = "timeout"
        for column in [c for c in table.columns if c.startswith(("GPE", "GLE", "LPE", "LLE"))]:
            table[column] = np.nan
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "metrics.csv", index=False)
        args += ["--team", f"{name}={tmp_path / name / 'metrics.csv'}"]
    assert main(args) == 0
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv")
    assert set(board["team"]) == {"late", "later"}
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Mean FS per pattern" in page and "timeout" in page


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("teams", [12])
def test_figures_keep_legends_off_titles_and_captions_inside(tmp_path, teams):
    """Every figure of a ranking: legends clear of the title, every text inside the image,
    and no line drawn across the categories of the pattern breakdown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tusrec.ranking.report import make_figures

    tables = synthetic_tables(teams, subjects=2, seed=4)
    data = combine_teams({k: read_team_table_frame(v) for k, v in tables.items()})
    analysis = analyse(data, resamples=30)
    for name, fig in make_figures(analysis, synthetic=True, title="A rather long title of a ranking report"):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        frame = fig.bbox
        title = fig._suptitle.get_window_extent(renderer)
        for legend in fig.legends:
            assert not _overlaps(legend.get_window_extent(renderer), title), name
        texts = [*fig.texts, fig._suptitle, fig._supxlabel] if fig._supxlabel else [*fig.texts, fig._suptitle]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1, (name, text.get_text()[:40])
            assert box.y0 >= frame.y0 - 1 and box.y1 <= frame.y1 + 1, (name, text.get_text()[:40])
        if name == "patterns":
            for ax in fig.axes:
                for line in ax.get_lines():
                    x = np.asarray(line.get_xdata(), float)
                    if len(x) > 1 and np.isfinite(x).all():
                        # every line stays inside one level's group (levels sit at integers)
                        assert np.ptp(x) < 1.0 and np.floor(x.min() + 0.5) == np.floor(x.max() + 0.5), name


def test_continuity_correction_is_chosen_and_stated(tmp_path):
    tables = {k: read_team_table_frame(v) for k, v in synthetic_tables(3, subjects=2, seed=6).items()}
    data = combine_teams(tables)
    on = analyse(data, resamples=20)
    off = analyse(data, resamples=20, continuity_correction=False)
    assert on.settings["continuity_correction"] and not off.settings["continuity_correction"]
    p_on = next(p for p in on.pairwise if p.metric == "FS" and p.level == "scan").p
    p_off = next(p for p in off.pairwise if p.metric == "FS" and p.level == "scan").p
    mask = np.isfinite(p_on) & (p_on < 1)
    assert (p_on[mask] > p_off[mask]).all()  # the correction makes the one-sided p larger
    write_report(on, tmp_path / "on", figures=False)
    write_report(off, tmp_path / "off", figures=False)
    assert "with continuity correction" in (tmp_path / "on" / "report.html").read_text()
    assert "without continuity correction" in (tmp_path / "off" / "report.html").read_text()
    for name in ("a", "b"):
        tables_path = tmp_path / f"{name}.csv"
        synthetic_tables(2, subjects=1, seed=0)["team A" if name == "a" else "team B"].to_csv(
            tables_path, index=False
        )
    base = ["evaluate", "rank", "--team", f"a={tmp_path / 'a.csv'}", "--team", f"b={tmp_path / 'b.csv'}"]
    assert (
        main([*base, "--out", str(tmp_path / "cli"), "--no-continuity-correction", "--bootstrap", "10"]) == 0
    )
    assert (
        json.loads((tmp_path / "cli" / "analysis.json").read_text())["settings"]["continuity_correction"]
        is False
    )


def read_team_table_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A table as read_team_table would return it, from a frame (through a CSV)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.csv"
        frame.to_csv(path, index=False)
        return read_team_table(path)


def test_2025_data_default_to_identity_and_say_so():
    tables = synthetic_tables({"good": 0.4, "worse than identity": 1.3}, subjects=4, protocol="2025", seed=2)
    data = combine_teams({k: read_team_table_frame(v) for k, v in tables.items()})
    analysis = analyse(data, resamples=50)
    assert analysis.normalisation == "identity"
    assert "2025 protocol" in analysis.normalisation_reason
    note = next(n for n in analysis.notes if n.startswith("Identity normalisation"))
    assert "scored team-scans have FS < 0: worse than identity" in note
    assert analysis.leaderboard["FS"].iloc[1] < 0
    minmax = analyse(data, "minmax", resamples=50)
    assert minmax.normalisation_reason == "chosen with --normalisation"


def test_rerun_gives_the_same_report():
    tables = {k: read_team_table_frame(v) for k, v in synthetic_tables(3, subjects=3, seed=5).items()}
    one = analyse(combine_teams(tables), resamples=100, seed=9)
    two = analyse(combine_teams(dict(reversed(list(tables.items())))), resamples=100, seed=9)
    for level in one.bootstrap:
        a = one.bootstrap[level].summary(one.data.teams).set_index("team").sort_index()
        b = two.bootstrap[level].summary(two.data.teams).set_index("team").sort_index()
        pd.testing.assert_frame_equal(a.drop(columns="level"), b.drop(columns="level"))


# --------------------------------------------------------------------------- from predictions


def _chain(local: np.ndarray) -> np.ndarray:
    """Global transforms T(i->0) (N-1, 4, 4) as running products of local ones."""
    out = np.empty_like(local)
    acc = np.eye(4)
    for i, m in enumerate(local):
        acc = acc @ m
        out[i] = acc
    return out


def test_ranking_scored_predictions_of_four_quality_levels(tmp_path, dataset_factory, synth):
    from tusrec.data import open_data
    from tusrec.ddf import GroundTruth, write_predictions
    from tusrec.geometry import pose6_to_matrix
    from tusrec.scoring.score import score_predictions

    root = dataset_factory(tmp_path / "data", subjects=("050", "051"), names=synth.NAMES_2024[:3], n_frames=8)
    data = open_data(root)
    calib = data.calibration
    rng = np.random.default_rng(0)

    def jitter(transforms, rad, mm):
        """Each transform times a random rigid error of about rad radians and mm millimetres."""
        pose = np.concatenate(
            [rng.normal(0, rad, (len(transforms), 3)), rng.normal(0, mm, (len(transforms), 3))], 1
        )
        return transforms @ pose6_to_matrix(pose)

    drift = pose6_to_matrix(np.array([[0.03, -0.02, 0.02, 1.0, 0.5, -0.8]]))[0]
    paths = {}
    for team in ("precise", "coarse", "drifting", "identity"):
        for scan in data.scans:
            gt = GroundTruth.from_scan(scan, calib)
            if team == "precise":
                glob, local = jitter(gt.global_, 0.002, 0.05), jitter(gt.local, 0.002, 0.05)
            elif team == "coarse":
                glob, local = jitter(gt.global_, 0.02, 0.5), jitter(gt.local, 0.02, 0.5)
            elif team == "drifting":  # the same small error every frame, accumulating globally
                local = gt.local @ drift
                glob = _chain(local)
            else:
                glob = local = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
            attrs = {"runtime_seconds": 1.0, "model": team}
            path = tmp_path / team / f"{scan.key}.h5"
            write_predictions(path, glob, local, calib, scan.image_size, scan.read_landmarks(), attrs)
        score_predictions(tmp_path / team, data, tmp_path / "scores" / team)
        paths[team] = tmp_path / "scores" / team / "metrics.csv"
    teams = load_teams(paths)
    expected = ["precise", "coarse", "drifting", "identity"]
    for normalisation in ("minmax", "identity"):
        analysis = analyse(teams, normalisation, resamples=100)
        assert list(analysis.leaderboard["team"]) == expected, normalisation
    # the identity team is the identity reference itself: 0 everywhere under identity
    assert analysis.leaderboard.set_index("team").loc["identity", "FS"] == pytest.approx(0.0, abs=1e-9)
    assert list(analysis.sensitivity["rank-then-aggregate rank"]) == [1, 2, 3, 4]
    written = write_report(analysis, tmp_path / "report", figures=False)
    assert list(pd.read_csv(written["leaderboard.csv"])["team"]) == expected

    # the qualitative section: the best, median and worst scan of 'coarse' by its final score
    from tusrec.ranking.report import qualitative_choice

    out = tmp_path / "qualitative-report"
    args = ["evaluate", "rank", "--out", str(out), "--bootstrap", "20", "--normalisation", "identity"]
    for team, path in paths.items():
        args += ["--team", f"{team}={path}"]
    assert main([*args, "--predictions", f"coarse={tmp_path / 'coarse'}"]) == 2  # needs --data
    assert main([*args, "--predictions", f"coarse={tmp_path / 'coarse'}", "--data", str(root)]) == 0
    per_scan = pd.read_csv(out / "scores_per_scan.csv")
    fs = per_scan[per_scan["team"] == "coarse"].set_index("key")["FS"].sort_values(ascending=False)
    t = analysis.data.teams.index("coarse")
    picked = qualitative_choice(analysis, t)
    assert [label for label, _, _ in picked] == ["best", "median", "worst"]
    assert picked[0][1] == fs.index[0] and picked[-1][1] == fs.index[-1]
    assert picked[1][1] == fs.index[(len(fs) - 1) // 2]
    page = (out / "report.html").read_text()
    assert 'id="qualitative"' in page
    for _, key, _ in picked:
        for kind in ("trajectory", "reconstruction"):
            png = out / "qualitative" / f"coarse__{key}_{kind}.png"
            assert base64.b64encode(png.read_bytes()).decode() in page


def test_figures_drawn_in_processes_are_those_drawn_here(tmp_path):
    """write_figures' processes give the PNGs of the serial path byte for byte, and in the
    report's order; a daemonic process (a Dask worker) draws them itself."""
    import multiprocessing

    from tusrec.ranking.report import figure_builders, write_figures

    data = combine_teams(
        {k: read_team_table_frame(v) for k, v in synthetic_tables(4, subjects=2, seed=3).items()}
    )
    analysis = analyse(data, resamples=40)
    here = write_figures(analysis, tmp_path / "here", "t", True, workers=1)
    apart = write_figures(analysis, tmp_path / "apart", "t", True, workers=3)
    assert list(here) == list(apart) == [name for name, _ in figure_builders(analysis, True, "t")]
    for name in here:
        assert here[name].read_bytes() == apart[name].read_bytes(), name
    daemon = multiprocessing.current_process()
    daemon.daemon, was = True, daemon.daemon
    try:
        again = write_figures(analysis, tmp_path / "daemon", "t", True, workers=2)
    finally:
        daemon.daemon = was
    assert all(again[name].read_bytes() == here[name].read_bytes() for name in here)

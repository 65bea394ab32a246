"""The ranking report end to end: `./evaluate rank` on team tables, the files it writes,
the self-contained report.html (rendered in headless Chromium), and a ranking of real
scored predictions of several quality levels."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from tests.browser import FLAGS, chromium
from tusrec.cli import main
from tusrec.ranking import report as rp
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


@pytest.fixture(scope="module")
def analysis(report):
    """The report fixture's analysis, made again in this process from the same tables."""
    meta = json.loads((report / "analysis.json").read_text())
    teams = load_teams({name: report.parent / name / "metrics.csv" for name in QUALITY})
    return analyse(teams, resamples=meta["settings"]["bootstrap_resamples"], seed=meta["settings"]["seed"])


def _title(fig) -> str:
    return fig._suptitle.get_text()


def test_each_figure_is_titled_with_what_it_shows_beside_its_label(analysis):
    """One title a figure, the figure's own (not the report's), on one line, right of the
    SYNTHETIC DATA label and clear of it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tusrec.plotting import SYNTHETIC_LABEL
    from tusrec.ranking.report import make_figures

    names = []
    for name, fig in make_figures(analysis, synthetic=True):
        names.append(name)
        assert _title(fig).startswith(FIGURES[name]) and "\n" not in _title(fig), name
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        labels = [t for t in fig.texts if t.get_text() == SYNTHETIC_LABEL]
        assert len(labels) == 1, name
        label = labels[0].get_bbox_patch().get_window_extent(renderer)
        title = fig._suptitle.get_window_extent(renderer)
        assert not _overlaps(label, title) and label.x1 < title.x0, name
        # on the title's line, and above every panel
        assert label.y0 < title.y1 and title.y0 < label.y1, name
        for ax in fig.axes:
            assert not _overlaps(ax.get_tightbbox(renderer), label), (name, ax.get_title())
    assert names == list(FIGURES)
    plain = dict(rp.figure_builders(analysis, synthetic=False))["sensitivity"]()
    assert _title(plain) == FIGURES["sensitivity"]
    assert SYNTHETIC_LABEL not in [t.get_text() for t in plain.texts]


def test_blob_plot_draws_the_bootstrap_frequencies(analysis):
    from tusrec.ranking.report import figure_builders

    fig = dict(figure_builders(analysis))["blob_plot"]()
    order = analysis.ranking.order
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split("-")[0] for ax in axes] == ["scan", "subject"]
    for ax, boot in zip(axes, analysis.bootstrap.values(), strict=True):
        freq = boot.frequencies[order]
        bubbles, medians = ax.collections[:-1], ax.collections[-1]
        for k, bubble in enumerate(bubbles):  # one scatter a team, at x = its place in the order
            xy = bubble.get_offsets()
            ranks = np.flatnonzero(freq[k] > 0) + 1
            np.testing.assert_array_equal(xy[:, 0], k + 1)
            np.testing.assert_array_equal(xy[:, 1], ranks)
            sizes = bubble.get_sizes()
            np.testing.assert_allclose(sizes / sizes.sum(), freq[k, ranks - 1] / freq[k, ranks - 1].sum())
        np.testing.assert_array_equal(medians.get_offsets()[:, 1], boot.median[order])
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == [analysis.data.teams[t] for t in order]


def test_sampling_figure_draws_the_bootstrap_means_and_their_interval(analysis):
    from matplotlib.patches import StepPatch

    from tusrec.ranking.report import figure_builders

    fig = dict(figure_builders(analysis))["sampling_distribution"]()
    ax = fig.axes[0]
    means = analysis.bootstrap["scan"].means
    outlines = [p for p in ax.patches if isinstance(p, StepPatch) and p.get_gid()]
    assert [p.get_gid() for p in outlines] == [f"team {t}" for t in analysis.ranking.order]
    for patch in outlines:
        t = int(patch.get_gid().split()[1])
        heights, edges, _ = patch.get_data()
        want, _ = np.histogram(means[:, t], edges, density=True)
        np.testing.assert_allclose(heights, want)
        assert edges[0] >= 0 and edges[-1] <= 1  # min-max means stay in [0, 1]
    table = analysis.sampling
    dashed = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")
    np.testing.assert_allclose(dashed, np.sort(np.r_[table["ci_2.5%"], table["ci_97.5%"]]))
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    for text, row in zip(texts, table.itertuples(), strict=True):
        assert text.endswith(f"{row.mean:.3f} [{row._7:.3f}, {row._8:.3f}]"), text


def test_significance_map_draws_the_holm_adjusted_p(analysis):
    from tusrec.ranking.report import figure_builders

    fig = dict(figure_builders(analysis))["significance_map"]()
    order = analysis.ranking.order
    fs = [pw for pw in rp.tested(analysis) if pw.metric == "FS"]
    assert [pw.level for pw in fs] == ["scan"]  # 3 subjects: see test_what_the_data_cannot_support
    for ax, pw in zip([a for a in fig.axes if a.images], fs, strict=True):
        assert ax.get_title().startswith(f"FS, {pw.level} level")
        image = np.asarray(ax.images[0].get_array())
        sig = pw.significant(0.05)[np.ix_(order, order)]
        np.testing.assert_array_equal(
            image[~np.eye(len(order), dtype=bool)], sig[~np.eye(len(order), dtype=bool)]
        )
        p = pw.p_holm[np.ix_(order, order)]
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        for (i, j), text in cells.items():
            assert text == ("<0.001" if p[i, j] < 0.001 else f"{p[i, j]:.3f}")
        assert len(cells) == len(order) * (len(order) - 1)


def test_box_plots_draw_each_teams_scores(analysis):
    from tusrec.ranking.report import figure_builders

    fig = dict(figure_builders(analysis))["box_scores"]()
    order = analysis.ranking.order
    ax = fig.axes[0]
    assert ax.get_title() == "final score FS"
    # a median is the vertical line across its box (0.6 wide; the caps are half as wide)
    medians = [
        line
        for line in ax.get_lines()
        if np.ptp(line.get_xdata()) == 0 and np.ptp(line.get_ydata()) == pytest.approx(0.6)
    ]
    assert len(medians) == len(order)
    fs = analysis.scores.scores["FS"]
    for k, line in enumerate(medians):
        assert line.get_xdata()[0] == pytest.approx(np.median(fs[order[k]]))
        assert np.mean(line.get_ydata()) == pytest.approx(k + 1)


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


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = chromium()
    flags = [*FLAGS, "--window-size=1400,3000"]
    # A copy of the page with a script that writes, once loaded, the size at which the
    # browser decoded each image into the DOM (the report itself has no script).
    page = (report / "report.html").read_text(encoding="utf-8")
    probe = (
        "<script>window.addEventListener('load', () => { for (const img of document.images) "
        "img.setAttribute('data-decoded', img.complete + ' ' + img.naturalWidth + 'x' + img.naturalHeight); "
        "document.body.setAttribute('data-scroll-width', document.documentElement.scrollWidth); });</script>"
    )
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            browser,
            *flags,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            copy.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = check_page(dom.stdout)  # the DOM the browser built shows the leaderboard and the images
    # every figure decoded at the size of its PNG, in the report's order
    drawn = [img["data-decoded"] for img in parsed.images]
    want = []
    for name in FIGURES:
        height, width = matplotlib.image.imread(report / "figures" / f"{name}.png").shape[:2]
        want.append(f"true {width}x{height}")
    assert drawn == want
    assert [img["alt"] for img in parsed.images] == list(FIGURES.values())
    # nothing wider than the window: the figures shrink to the page (max-width: 100 %)
    assert int(re.search(r'data-scroll-width="(\d+)"', dom.stdout).group(1)) <= 1400


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
    figures = {name for name in written if name.startswith("figures/")}
    # rank 1 in every resample: no stability figures, no tests; the rest is drawn
    assert "figures/blob_plot.png" not in figures and "figures/kendall_tau.png" not in figures
    assert "figures/significance_map.png" not in figures and "figures/sampling_distribution.png" in figures
    page = (tmp_path / "solo" / "report.html").read_text()
    assert "Ranking stability needs two teams or more" in page
    assert "The pairwise tests need two teams or more." in page


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


def test_what_the_data_cannot_support_is_said_and_not_drawn(tmp_path):
    """The demo's shape: three teams, six scans of one subject. No subject-level bootstrap
    (one subject is drawn every time) and no tests of a level where no pair could reach
    Holm-adjusted p < alpha: there is a sentence in their place and no figure."""
    from tusrec.ranking.stats import smallest_p

    tables = synthetic_tables({"a": 0.2, "b": 0.5, "c": 0.9}, subjects=1, seed=2)
    data = combine_teams({k: read_team_table_frame(v.iloc[:6]) for k, v in tables.items()})
    analysis = analyse(data, resamples=200)
    assert list(analysis.bootstrap) == ["scan"]
    # with 6 scans the smallest one-sided p is that of six tied positive differences, and
    # Holm multiplies it by the 6 ordered pairs of 3 teams
    best = 6 * smallest_p(6)
    assert 0.05 < best < 0.06  # the demo's: 0.059
    assert set(analysis.not_supported) == {"bootstrap:subject", "tests:scan", "tests:subject"}
    assert "with 6 paired scans" in analysis.not_supported["tests:scan"]
    assert f"smallest attainable p {best:.3f}" in analysis.not_supported["tests:scan"]
    assert "with 1 subject every resample" in analysis.not_supported["bootstrap:subject"]
    written = write_report(analysis, tmp_path / "report", synthetic=True)
    figures = {n.removeprefix("figures/").removesuffix(".png") for n in written if n.startswith("figures/")}
    assert figures == set(FIGURES) - {"significance_map", "significance_all"}
    page = (tmp_path / "report" / "report.html").read_text()
    for sentence in analysis.not_supported.values():
        assert html.escape(sentence) in page
    assert "FS, scan level: Holm-adjusted p" not in page
    assert set(pd.read_csv(written["kendall_tau.csv"])["level"]) == {"scan"}
    # the stability figure has the scan level only
    from tusrec.ranking.report import figure_builders

    fig = dict(figure_builders(analysis))["blob_plot"]()
    assert [ax.get_title().split("-")[0] for ax in fig.axes if ax.get_title()] == ["scan"]
    # with 12 scans the same teams can be told apart: the scan level is tested and drawn
    more = combine_teams({k: read_team_table_frame(v.iloc[:12]) for k, v in tables.items()})
    assert "tests:scan" not in analyse(more, resamples=20).not_supported


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
    for name, fig in make_figures(analysis, synthetic=True):
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
    here = write_figures(analysis, tmp_path / "here", True, workers=1)
    apart = write_figures(analysis, tmp_path / "apart", True, workers=3)
    assert list(here) == list(apart) == [name for name, _ in figure_builders(analysis, True)]
    for name in here:
        assert here[name].read_bytes() == apart[name].read_bytes(), name
    daemon = multiprocessing.current_process()
    daemon.daemon, was = True, daemon.daemon
    try:
        again = write_figures(analysis, tmp_path / "daemon", True, workers=2)
    finally:
        daemon.daemon = was
    assert all(again[name].read_bytes() == here[name].read_bytes() for name in here)


def test_mixed_protocols_are_named_once_in_plain_words(tmp_path):
    sweeps = synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, seed=3)
    rotations = synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, protocol="2025", seed=4)
    data = combine_teams(
        {k: read_team_table_frame(pd.concat([sweeps[k], rotations[k]], ignore_index=True)) for k in sweeps}
    )
    analysis = analyse(data, resamples=20)
    assert analysis.normalisation_reason == (
        "the scans are of more than one protocol; the 2024 ranking normalises min-max over the teams"
    )
    write_report(analysis, tmp_path / "mixed", figures=False)
    page = (tmp_path / "mixed" / "report.html").read_text()
    assert "52 scans of 2 subjects (protocols 2024 and 2025)" in page and "2024, 2025" not in page


def test_a_single_scan_has_no_distribution_of_its_mean(tmp_path):
    tables = synthetic_tables({"a": 0.2, "b": 0.5}, subjects=1, seed=1)
    data = combine_teams({k: read_team_table_frame(v.iloc[:1]) for k, v in tables.items()})
    analysis = analyse(data, resamples=20)
    assert analysis.bootstrap == {} and analysis.sampling["ci_2.5%"].isna().all()
    assert {"bootstrap:scan", "bootstrap:subject", "tests:scan", "tests:subject"} <= set(
        analysis.not_supported
    )
    written = write_report(analysis, tmp_path / "one", synthetic=True)
    figures = {n for n in written if n.startswith("figures/")}
    assert not figures & {f"figures/{n}.png" for n in ("blob_plot", "kendall_tau", "sampling_distribution")}
    page = (tmp_path / "one" / "report.html").read_text()
    assert "With a single scan there is no distribution of the mean to estimate." in page
    assert "with 1 scan every resample is the same scans" in page
    # the bootstrap's tables are there, with their header and no row
    assert list(pd.read_csv(written["kendall_tau.csv"]).columns) == ["level", "resample", "tau"]
    assert len(pd.read_csv(written["bootstrap_summary.csv"])) == 0

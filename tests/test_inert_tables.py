"""Every team-controlled string the kit writes into a table is inert (spreadsheet injection,
OWASP "CSV injection") and every HTML page escapes it.

Team-controlled: a manifest's status / message / device, the prediction file's ``model``
attribute and the team's name in a ranking. Scan keys come from the data, not the team.
"""

from __future__ import annotations

import csv
import math
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tusrec.data import FORMULA_STARTS, inert_cell, open_data, read_manifest, write_csv, write_manifest
from tusrec.ddf import write_ground_truth
from tusrec.ranking.rank import load_teams
from tusrec.ranking.report import analyse, write_report
from tusrec.scoring.score import ScoreLimits, score_predictions
from tusrec.show.command import show_predictions

# A formula start, or something that looks like one but is not, then any text, then markup.
STARTS = st.sampled_from(["", *FORMULA_STARTS, "'", " =", "=cmd|' /C calc'!A0"])
MARKUP = st.sampled_from(
    ["", "<xteam>", "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "&amp;"]
)
HOSTILE = st.builds(lambda a, b, c: a + b + c, STARTS, st.text(max_size=24), MARKUP)


def csv_cells(path: Path) -> list[str]:
    """Every cell of a CSV file, the header included, as a spreadsheet would split it."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [cell for row in csv.reader(fh) for cell in row]


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def dangerous_cells(paths) -> list[tuple[str, str]]:
    """Cells a spreadsheet would run: starting = + - @ tab or CR, and not a plain number
    (a negative number is a number, written by the kit's numeric columns)."""
    return [
        (str(p), c) for p in paths for c in csv_cells(p) if c.startswith(FORMULA_STARTS) and not is_number(c)
    ]


class Tags(HTMLParser):
    """Every start tag and its attributes of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def team_markup(page: str) -> list:
    """Tags a team's text could have injected: ones the kit never writes, or an event handler."""
    parser = Tags()
    parser.feed(page)
    return [(t, a) for t, a in parser.tags if t in ("xteam", "script") or "onerror" in a]


# --------------------------------------------------------------------------- the writer


def expected_text(value: str) -> str:
    """OWASP's quote before a formula start; line ends as line feeds (a bare CR would
    end the row in a spreadsheet)."""
    quoted = "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
    return quoted.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(HOSTILE, st.floats(allow_nan=True), st.integers(-(10**6), 10**6)), min_size=1))
def test_no_written_cell_starts_a_formula_and_the_text_stays_readable(values):
    """Text cells and labels get OWASP's quote exactly when they start a formula; numbers
    (negative ones too) and NaN are written as pandas writes them."""
    label = next((v for v in values if isinstance(v, str)), "=label")
    table = pd.DataFrame({"text": pd.Series(values, dtype=object), label: -np.arange(len(values)) - 0.5})
    with tempfile.TemporaryDirectory() as tmp:
        path = write_csv(table, Path(tmp) / "t.csv")
        assert not dangerous_cells([path])
        with open(path, newline="", encoding="utf-8") as fh:
            header, *rows = list(csv.reader(fh))
    assert header == ["text", expected_text(label)]
    assert [float(r[1]) for r in rows] == table[label].tolist()
    for value, (cell, _) in zip(values, rows, strict=True):
        if isinstance(value, str):
            assert cell == expected_text(value)
        elif isinstance(value, float) and math.isnan(value):
            assert cell == ""
        else:
            assert float(cell) == float(value)


def test_inert_cell_is_owasps_rule():
    assert inert_cell("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    for start in ("=", "+", "-", "@", "\t"):
        assert inert_cell(start + "1") == "'" + start + "1"
    assert inert_cell("\r1") == "'\n1"
    assert inert_cell("'=x") == "'=x"  # already inert: not quoted twice
    assert inert_cell("ok") == "ok" and inert_cell("a=b") == "a=b"
    assert inert_cell("a\r=cmd") == "a\n=cmd" and inert_cell("\r\nx") == "'\nx"
    assert inert_cell(-1.5) == -1.5 and inert_cell(-3) == -3 and inert_cell(None) is None


# --------------------------------------------------------------------------- every table and page


@settings(
    max_examples=4,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # each example scores and ranks: no shrinking
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(message=HOSTILE, status=HOSTILE, device=HOSTILE, model=HOSTILE, team=HOSTILE)
@example(
    message="=cmd|' /C calc'!A0",
    status="=1+1",
    device="@SUM(1)",
    model="-2+3<script>alert(1)</script>",
    team='=HYPERLINK("http://x")<xteam>',
)
def test_team_strings_are_inert_in_every_table_and_escaped_in_every_page(
    dataset_factory, tmp_path_factory, message, status, device, model, team
):
    team = team if team.strip() else "=" + team  # an empty name is refused by --team
    root = dataset_factory(
        tmp_path_factory.mktemp("data"), "eval", ("050",), ("LH_Par_C_DtP", "RH_Per_L_PtD"), 6
    )
    data = open_data(root)
    out = tmp_path_factory.mktemp("out")
    pred = out / "pred"
    pred.mkdir()
    rows = []
    for i, scan in enumerate(data.scans):
        write_ground_truth(scan, data.calibration, pred / f"{scan.key}.h5")
        with h5py.File(pred / f"{scan.key}.h5", "a") as f:
            f.attrs["model"] = model
        rows.append(
            {
                "key": scan.key,
                "frames": scan.n_frames,
                "status": status if i == 1 else "ok",
                "seconds": 1.5,
                "device": device,
                "message": message,
            }
        )
    write_manifest(pred, rows)  # the kit's own manifest writer (./predict's)
    manifest = read_manifest(pred)  # ... and the scorer reads it back
    assert manifest.loc[data.scans[0].key, "status"] == "ok"

    table = score_predictions(pred, data, out / "scores", limits=ScoreLimits(isolate=False))
    assert table["status"].iloc[0] == "ok"
    scored = pd.read_csv(out / "scores" / "metrics.csv", dtype={"message": str, "model": str})
    assert scored["GPE"].iloc[0] == 0.0

    other = scored.copy()
    other["GPE"] = other["GPE"] + 1.0
    write_csv(other, out / "ref" / "metrics.csv")
    teams = load_teams({team: out / "scores" / "metrics.csv", "reference": out / "ref" / "metrics.csv"})
    write_report(analyse(teams, resamples=20), out / "report", figures=False)
    board = pd.read_csv(out / "report" / "leaderboard.csv", keep_default_na=False)
    assert expected_text(team) in set(board["team"])  # the name is readable, behind one quote

    show_predictions(pred, data, out / "show", keys=[data.scans[0].key], max_voxels=20_000)

    tables = sorted(out.rglob("*.csv"))
    assert {p.name for p in tables} >= {"predictions.csv", "metrics.csv", "leaderboard.csv", "show.csv"}
    assert not dangerous_cells(tables)
    for page in (out / "report" / "report.html", out / "show" / "show.html"):
        assert not team_markup(page.read_text(encoding="utf-8")), page

"""``./evaluate rank``: its options and what it runs (tusrec.ranking.report.rank_command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tusrec.options import non_negative_int


def add_rank(rank) -> None:
    rank.description = (
        "Rank teams from the per-scan tables of `score` (docs/conventions.md section 4): "
        "per-scan normalisation, FS/GS/LS/PS/LMS, aggregate then rank (ties by runtime); scan- and "
        "subject-level bootstrap (blob plot, Kendall's tau), sampling distributions, one-sided "
        "Wilcoxon tests (Holm), breakdowns by scan pattern and scan length, and the ranking under "
        "other methods. Writes leaderboard.csv/.md, CSV tables, PNG figures and a self-contained "
        "report.html into --out."
    )
    rank.add_argument(
        "--team",
        action="append",
        required=True,
        metavar="NAME=METRICS",
        help="a team's metrics.csv (or the --out folder of `score`); repeat for every team",
    )
    rank.add_argument("--out", type=Path, required=True, help="folder for the report (created)")
    rank.add_argument(
        "--normalisation",
        choices=["minmax", "identity"],
        default=None,
        help="minmax (2024) or identity (2025); default: identity if every scan is a 2025 scan",
    )
    rank.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples at each level, scans and subjects (default: %(default)s)",
    )
    rank.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="the bootstrap's random seed, 0 or more (default: %(default)s)",
    )
    rank.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance level of the one-sided Wilcoxon tests, Holm-adjusted (default: %(default)s)",
    )
    rank.add_argument("--title", default=None, help="report title (default 'TUS-REC ranking')")
    rank.add_argument(
        "--synthetic", action="store_true", help="label every figure and the report SYNTHETIC DATA"
    )
    rank.add_argument(
        "--continuity-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Wilcoxon tests: normal approximation with the continuity correction (as challengeR: "
        "R's wilcox.test(exact = FALSE, correct = TRUE)), or without it (default: with)",
    )
    rank.add_argument(
        "--predictions",
        action="append",
        default=None,
        metavar="TEAM=DIR",
        help="a ranked team's predictions folder, for a qualitative section drawing its best, median "
        "and worst scan (needs --data); repeat per team",
    )
    rank.add_argument(
        "--data", type=Path, default=None, help="data folder with ground truth (for --predictions)"
    )
    rank.set_defaults(run=run_evaluate_rank)


def run_evaluate_rank(args) -> int:
    from tusrec.ranking.report import rank_command

    a = args
    return rank_command(
        a.team,
        a.out,
        a.normalisation,
        a.bootstrap,
        a.seed,
        a.alpha,
        a.title,
        a.synthetic,
        continuity_correction=a.continuity_correction,
        predictions=a.predictions,
        data_root=a.data,
    )

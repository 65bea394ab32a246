"""The ranking report: data -> ranking -> bootstrap -> tests -> files (the challengeR
pipeline, for TUS-REC).

    analyse(data, ...)          every number of the report, in an Analysis (no files)
    write_report(analysis, out) the tables (CSV, Markdown), figures (PNG), analysis.json
                                and one self-contained report.html (images inlined)
    rank_command(...)           what `./evaluate rank` runs

What is written to ``out``:

    leaderboard.csv / .md       rank, team, FS GS LS PS LMS (mean, sd), GPE GLE LPE LLE
                                (mean, sd over scored scans, mm), runtime (s), scan counts
    scores_per_scan.csv         per team and scan: status, X* of each error, the five scores
    bootstrap_summary.csv       per level and team: full rank, median rank, 2.5-97.5 % interval
    bootstrap_rank_frequencies.csv, kendall_tau.csv
    sampling_distribution.csv   mean FS, sd, n, standard error, 95 % interval
    pvalues.csv                 every one-sided Wilcoxon test (raw and Holm-adjusted p)
    pvalues/<level>_<metric>.csv  matrices of Holm-adjusted p: row team better than column
    patterns.csv, scan_length_correlation.csv, sensitivity.csv, leave_one_out.csv
    figures/*.png, report.html, analysis.json (settings and notes)
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tusrec.data import atomic_path, usable_cores, write_csv
from tusrec.ranking.rank import (
    ERRORS,
    NORMALISATIONS,
    SCORES,
    Ranking,
    RankingError,
    ScanScores,
    TeamData,
    aggregate_then_rank,
    check_normalisation,
    default_normalisation,
    leaderboard,
    leave_one_out,
    load_teams,
    parse_team_args,
    scan_scores,
    sensitivity,
)
from tusrec.ranking.stats import (
    LEVELS,
    Bootstrap,
    Pairwise,
    all_pairwise,
    bootstrap,
    length_correlation,
    pairwise_table,
    pattern_breakdown,
    sampling_distribution,
    smallest_p,
    units,
)

DEFAULT_TITLE = "TUS-REC ranking"


@dataclass
class Analysis:
    """Everything the report shows (see the module docstring for what each part is)."""

    data: TeamData
    normalisation: str
    normalisation_reason: str
    scores: ScanScores
    ranking: Ranking
    leaderboard: pd.DataFrame
    bootstrap: dict[str, Bootstrap]
    sampling: pd.DataFrame
    pairwise: list[Pairwise]
    patterns: pd.DataFrame
    lengths: pd.DataFrame
    sensitivity: pd.DataFrame
    sensitivity_notes: list[str]
    leave_one_out: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # {analysis: sentence} for each analysis the data cannot support (limits()): the report
    # says the sentence in its place and draws nothing
    not_supported: dict[str, str] = field(default_factory=dict)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def analyse(
    data: TeamData,
    normalisation: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    continuity_correction: bool = True,
) -> Analysis:
    """Scores, ranking and every analysis of the report for one set of team tables.

    normalisation: 'minmax' or 'identity'; None chooses by the scans' protocol
    (default_normalisation). resamples: bootstrap size (each level); seed: of the bootstrap.
    continuity_correction: of the Wilcoxon tests' normal approximation (challengeR's
    default, R's wilcox.test(exact = FALSE, correct = TRUE)).
    """
    if normalisation is None:
        normalisation, reason = default_normalisation(data)
    else:
        check_normalisation(normalisation, NORMALISATIONS)
        reason = "chosen with --normalisation"
    if resamples < 1:
        raise RankingError(f"--bootstrap must be at least 1, got {resamples}")
    if not 0 < alpha < 1:
        raise RankingError(f"--alpha must be between 0 and 1, got {alpha}")
    scores = scan_scores(data, normalisation)
    ranking = aggregate_then_rank(data, scores)
    boots = bootstrap(data, scores, ranking, resamples, seed)
    pairwise = all_pairwise(data, scores, correction=continuity_correction) if data.n_teams >= 2 else []
    sens, sens_notes = sensitivity(data, normalisation)
    loo = leave_one_out(data, "minmax")
    notes = _notes(data, scores, normalisation, reason)
    settings = {
        "normalisation": normalisation,
        "normalisation_reason": reason,
        "bootstrap_resamples": resamples,
        "seed": seed,
        "alpha": alpha,
        "continuity_correction": bool(continuity_correction),
        "teams": data.n_teams,
        "scans": data.n_scans,
        "subjects": len(set(data.subjects)),
        "protocols": data.protocols,
    }
    limited = limits(data, boots, pairwise, alpha, continuity_correction)
    return Analysis(
        data,
        normalisation,
        reason,
        scores,
        ranking,
        leaderboard(data, scores, ranking),
        boots,
        sampling_distribution(data, scores, ranking, boots.get("scan")),
        pairwise,
        pattern_breakdown(data, scores),
        length_correlation(data),
        sens,
        sens_notes,
        loo,
        notes,
        settings,
        limited,
    )


def limits(
    data: TeamData, boots: dict[str, Bootstrap], pairwise: list[Pairwise], alpha: float, correction: bool
) -> dict[str, str]:
    """{analysis: one sentence why the data cannot support it}, for each analysis that is
    left out: 'stability' (rank frequencies and Kendall's tau need two teams),
    'bootstrap:<level>' (a level needs two units to resample), 'tests' (two teams) and
    'tests:<level>' (too few paired values for any test of the level to reach
    Holm-adjusted p < alpha, even with every difference in favour of one team)."""
    out = {}
    teams = data.n_teams
    if teams < 2:
        out["stability"] = (
            "Ranking stability needs two teams or more: a single team has rank 1 in every resample."
        )
        out["tests"] = "The pairwise tests need two teams or more."
    for level in LEVELS:
        n = units(data, level)
        if level not in boots:
            out[f"bootstrap:{level}"] = (
                f"The {level}-level bootstrap is left out: with {_count(n, level)} every resample "
                f"is the same {level}s, so it could only look certain."
            )
        results = [pw for pw in pairwise if pw.level == level]
        if results:
            paired = max(int(pw.n.max()) for pw in results)
            best = min(1.0, teams * (teams - 1) * smallest_p(paired, correction)) if paired else np.nan
            if not best < alpha:
                out[f"tests:{level}"] = (
                    f"The {level}-level tests are not drawn: with {_count(paired, 'paired ' + level)}, no "
                    f"pair of the {teams} teams can reach Holm-adjusted p < {alpha} even if every "
                    f"{level} favoured one team (smallest attainable p {_p_fmt(best)}); their p-values "
                    "are in pvalues.csv."
                )
    return out


def _notes(data: TeamData, scores: ScanScores, normalisation: str, reason: str) -> list[str]:
    notes = [f"Normalisation: {normalisation} ({reason})."]
    if normalisation == "minmax":
        notes.append(
            "Min-max scores are relative to the teams taking part: one poor submission moves "
            "everybody's scores, and small differences can look large. The sensitivity section "
            "shows the ranking under the other normalisations, and with each team left out."
        )
    else:
        below = (scores.scores["FS"] < 0) & data.scored
        notes.append(
            "Identity normalisation: 1 - X / X_identity per scan; a prediction worse than predicting "
            "no motion scores below 0, while a failed scan scores 0, so a failure is not always the "
            f"worst outcome ({int(below.sum())} scored team-scans have FS < 0"
            + (
                ": "
                + ", ".join(f"{data.teams[t]} {int(below[t].sum())}" for t in np.flatnonzero(below.any(1)))
                if below.any()
                else ""
            )
            + ")."
        )
    not_scored = ~data.scored
    if not_scored.any():
        parts = []
        for t in np.flatnonzero(not_scored.any(axis=1)):
            counts = pd.Series(data.status[t][not_scored[t]]).value_counts()
            parts.append(f"{data.teams[t]}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        notes.append("Scans not scored (each scores 0 for that team): " + "; ".join(parts) + ".")
    notes.extend(data.notes)
    for name in SCORES:
        undefined = ~np.isfinite(scores.scores[name][0])
        if undefined.any():
            notes.append(
                f"{name} is undefined on {int(undefined.sum())} scan(s) (none of its components has data "
                "there); its mean is over the other scans."
            )
    if data.n_teams == 1:
        notes.append(
            "Only one team: its rank is 1 by definition; Kendall's tau and the pairwise tests need "
            "two teams and are left out."
        )
    if len(set(data.subjects)) < 2:
        notes.append(
            "Only one subject: nothing is resampled or tested at the subject level, and the scans, "
            "all of one subject, are not independent."
        )
    return notes


# --------------------------------------------------------------------------- tables


def scores_per_scan(analysis: Analysis) -> pd.DataFrame:
    """Long table: team, key, subject, scan, status, the four errors (mm), their normalised
    values, the five scores, runtime (s)."""
    data, scores = analysis.data, analysis.scores
    frames = []
    for t, team in enumerate(data.teams):
        frame = pd.DataFrame(
            {
                "team": team,
                "key": data.scans["key"],
                "subject": data.scans["subject"],
                "scan": data.scans["scan"],
                "status": data.status[t],
            }
        )
        for e, name in enumerate(ERRORS):
            frame[name] = data.errors[t, :, e]
        for e, name in enumerate(ERRORS):
            frame[f"{name}_norm"] = scores.normalised[t, :, e]
        for name in SCORES:
            frame[name] = scores.scores[name][t]
        frame["runtime_s"] = data.runtime[t]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _pm(mean: float, sd: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{mean:.{digits}f}"


def leaderboard_display(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as strings: scores to three decimals (mean ± sd), errors (mm) to
    three, runtime (s) to one, scored scans."""
    out = pd.DataFrame({"rank": board["rank"], "team": board["team"]})
    for name in SCORES:
        out[f"{name} ± sd"] = [_pm(m, s, 3) for m, s in zip(board[name], board[f"{name}_sd"], strict=True)]
    for name in ERRORS:
        out[f"{name} (mm)"] = [_pm(m, s, 3) for m, s in zip(board[name], board[f"{name}_sd"], strict=True)]
    out["runtime (s)"] = [f"{v:.1f}" if np.isfinite(v) else "n/a" for v in board["runtime_s"]]
    out["scored"] = [f"{a}/{b}" for a, b in zip(board["scored"], board["scans"], strict=True)]
    return out


def _markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency: pandas' to_markdown needs
    tabulate)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def leaderboard_markdown(analysis: Analysis, title: str = DEFAULT_TITLE, synthetic: bool = False) -> str:
    head = f"# {title}\n\n"
    if synthetic:
        head += "**SYNTHETIC DATA** - these results are on synthetic data.\n\n"
    s = analysis.settings
    head += (
        f"{s['teams']} teams, {s['scans']} scans of {_count(s['subjects'], 'subject')}; normalisation "
        f"{analysis.normalisation} ({analysis.normalisation_reason}). Scores: mean over all scans "
        "(a scan not scored counts 0) ± sd; errors: mean ± sd over the scored scans. Ranked by FS to "
        "three decimals, ties by mean runtime.\n\n"
    )
    return head + _markdown_table(leaderboard_display(analysis.leaderboard)) + "\n"


def _write_csv(frame: pd.DataFrame, path: Path, **kwargs) -> Path:
    return write_csv(frame, path, **{"index": True, **kwargs})  # team names made inert


def _write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


BOOTSTRAP_SUMMARY = [
    "level",
    "team",
    "rank",
    "median_rank",
    "rank_2.5%",
    "rank_97.5%",
    "p_rank_as_full",
    "p_first",
]


def _stack(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The frames one below the other; with none (no bootstrap level the data support),
    an empty table with its header."""
    return pd.concat(frames) if frames else pd.DataFrame(columns=columns)


def write_tables(analysis: Analysis, out: Path, title: str, synthetic: bool) -> list[Path]:
    """Every CSV, leaderboard.md and analysis.json into ``out``."""
    data = analysis.data
    written = [
        _write_csv(analysis.leaderboard, out / "leaderboard.csv", index=False, float_format="%.6g"),
        _write_text(leaderboard_markdown(analysis, title, synthetic), out / "leaderboard.md"),
        _write_csv(scores_per_scan(analysis), out / "scores_per_scan.csv", index=False, float_format="%.6g"),
        _write_csv(
            _stack([b.summary(data.teams) for b in analysis.bootstrap.values()], BOOTSTRAP_SUMMARY),
            out / "bootstrap_summary.csv",
            index=False,
        ),
        _write_csv(
            _stack(
                [b.frequency_table(data.teams) for b in analysis.bootstrap.values()],
                ["level", "team", "rank", "frequency"],
            ),
            out / "bootstrap_rank_frequencies.csv",
            index=False,
        ),
        _write_csv(
            _stack(
                [
                    pd.DataFrame({"level": lv, "resample": np.arange(b.resamples), "tau": b.tau})
                    for lv, b in analysis.bootstrap.items()
                ],
                ["level", "resample", "tau"],
            ),
            out / "kendall_tau.csv",
            index=False,
            float_format="%.6g",
        ),
        _write_csv(analysis.sampling, out / "sampling_distribution.csv", index=False, float_format="%.6g"),
        _write_csv(analysis.patterns, out / "patterns.csv", index=False, float_format="%.6g"),
        _write_csv(analysis.lengths, out / "scan_length_correlation.csv", index=False, float_format="%.6g"),
        _write_csv(analysis.sensitivity, out / "sensitivity.csv", index=False, float_format="%.6g"),
        _write_csv(analysis.leave_one_out, out / "leave_one_out.csv", index=False, float_format="%.6g"),
    ]
    if analysis.pairwise:
        written.append(
            _write_csv(
                pairwise_table(analysis.pairwise, data.teams),
                out / "pvalues.csv",
                index=False,
                float_format="%.6g",
            )
        )
        order = analysis.ranking.order
        names = [data.teams[t] for t in order]
        for pw in analysis.pairwise:
            matrix = pd.DataFrame(pw.p_holm[np.ix_(order, order)], index=names, columns=names)
            matrix.index.name = "better (row) than (column)"
            written.append(
                _write_csv(matrix, out / "pvalues" / f"{pw.level}_{pw.metric}.csv", float_format="%.6g")
            )
    meta = {
        "title": title,
        "synthetic": synthetic,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": analysis.settings,
        "notes": analysis.notes,
        "sensitivity_notes": analysis.sensitivity_notes,
        "ranking": [
            {
                "rank": int(analysis.ranking.ranks[t]),
                "team": data.teams[t],
                "FS": _num(analysis.ranking.value[t]),
            }
            for t in analysis.ranking.order
        ],
    }
    written.append(_write_text(json.dumps(meta, indent=2) + "\n", out / "analysis.json"))
    return written


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# --------------------------------------------------------------------------- figures


FIGURES = {
    "blob_plot": "Ranking stability: rank frequencies over bootstrap resamples",
    "kendall_tau": "Kendall's tau of bootstrap rankings with the full ranking",
    "sampling_distribution": "Bootstrap distribution of each team's mean final score",
    "significance_map": "Pairwise significance of the final score",
    "significance_all": "Pairwise significance of every score and error",
    "box_scores": "Per-scan scores per team",
    "box_errors": "Per-scan errors per team",
    "patterns": "Scores and errors by scan pattern",
    "scan_length": "Errors against scan length",
    "sensitivity": "Ranks under other normalisations and under rank-then-aggregate",
}


def tested(analysis: Analysis) -> list[Pairwise]:
    """The pairwise results of the levels whose tests the data can support (limits)."""
    return [pw for pw in analysis.pairwise if f"tests:{pw.level}" not in analysis.not_supported]


def figure_builders(analysis: Analysis, synthetic: bool = False):
    """[(name, build)] for every figure of the report, in the page's order (FIGURES'):
    build() makes the Figure, titled with what it shows (FIGURES; the report's own title
    heads the page, not every figure). A figure the data cannot support (Analysis.not_supported) is not
    built at all. Nothing is drawn until a build is called, so a process can make just
    some of them."""
    from tusrec.ranking import figures as fg

    a = analysis
    builders = []
    if "stability" not in a.not_supported and a.bootstrap:
        builders.append(
            ("blob_plot", lambda: fg.blob_plot(a.bootstrap, a.ranking, FIGURES["blob_plot"], synthetic))
        )
        if _tau_defined(a):
            builders.append(
                ("kendall_tau", lambda: fg.tau_violins(a.bootstrap, FIGURES["kendall_tau"], synthetic))
            )
    if "scan" in a.bootstrap:
        builders.append(
            (
                "sampling_distribution",
                lambda: fg.sampling_histograms(
                    a.sampling,
                    a.bootstrap["scan"].means,
                    a.ranking,
                    FIGURES["sampling_distribution"],
                    synthetic,
                ),
            )
        )
    results = tested(a)
    if any(pw.metric == "FS" for pw in results):
        alpha = a.settings["alpha"]
        builders.append(
            (
                "significance_map",
                lambda: fg.significance_map(
                    results, a.ranking, "FS", FIGURES["significance_map"], alpha, synthetic
                ),
            )
        )
        builders.append(
            (
                "significance_all",
                lambda: fg.significance_grid(
                    results, a.ranking, FIGURES["significance_all"], alpha, synthetic
                ),
            )
        )
    builders.append(
        (
            "box_scores",
            lambda: fg.box_plots(
                {name: a.scores.scores[name] for name in SCORES},
                fg.SCORE_LABELS,
                a.ranking,
                FIGURES["box_scores"] + f" ({a.normalisation} normalisation; failed scans 0)",
                synthetic,
            ),
        )
    )
    builders.append(
        (
            "box_errors",
            lambda: fg.box_plots(
                {name: a.data.errors[:, :, e] for e, name in enumerate(ERRORS)},
                fg.ERROR_LABELS,
                a.ranking,
                FIGURES["box_errors"] + " (scored scans)",
                synthetic,
                log=True,
            ),
        )
    )
    if len(a.patterns):

        def patterns():
            from tusrec.ranking.stats import factors_present, metric_values, pattern_labels

            panels = {m: metric_values(a.data, a.scores, m)[0] for m in ("FS", *ERRORS)}
            labels = {f: pattern_labels(a.data, f) for f in factors_present(a.data)}
            return fg.pattern_plot(panels, labels, a.ranking, FIGURES["patterns"], synthetic)

        builders.append(("patterns", patterns))
    builders.append(
        (
            "scan_length",
            lambda: fg.length_plot(
                a.data.scans["scan_length_mm"].to_numpy(float),
                a.data.errors,
                a.ranking,
                a.lengths,
                FIGURES["scan_length"],
                synthetic,
            ),
        )
    )
    builders.append(("sensitivity", lambda: fg.bump_chart(a.sensitivity, FIGURES["sensitivity"], synthetic)))
    return builders


def make_figures(analysis: Analysis, synthetic: bool = False):
    """Yield (name, Figure) for every figure of the report (figure_builders' order)."""
    for name, build in figure_builders(analysis, synthetic):
        yield name, build()


def _tau_defined(analysis: Analysis) -> bool:
    return any(np.isfinite(b.tau).any() for b in analysis.bootstrap.values())


def write_figures(
    analysis: Analysis,
    out: Path,
    synthetic: bool = False,
    dpi: int = 100,
    workers: int | None = None,
) -> dict[str, Path]:
    """Render every figure to out/figures/<name>.png; returns {name: path} in the report's
    order.

    Drawing is matplotlib's Python (one core a figure: about 1.5 s each, most of a small
    ranking's time), so the figures are drawn by ``workers`` processes (default: one a
    core, at most one a figure; 1 draws them here). Each process makes its figures from
    the same Analysis with the same matplotlib defaults, so the PNGs are byte for byte
    those drawn here (a test says so)."""
    from tqdm import tqdm

    builders = figure_builders(analysis, synthetic)
    # Figures of an earlier run (e.g. with more teams) must not linger beside these.
    shutil.rmtree(out / "figures", ignore_errors=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = {name: out / "figures" / f"{name}.png" for name, _ in builders}
    workers = min(len(builders), usable_cores() if workers is None else workers)
    with tqdm(total=len(builders), desc="figures", disable=None) as bar:
        done = _draw_in_processes(analysis, synthetic, dpi, written, workers, bar) if workers > 1 else set()
        for name, build in builders:
            if name not in done:
                _save_png(build(), written[name], dpi)
                bar.update()
    return written


def _save_png(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


_SLOWEST_FIGURES = ("patterns", "significance_all", "scan_length")
_WORKER_BUILDERS: dict = {}  # a figure process's figure_builders, by name


def _figure_process_init(analysis: Analysis, synthetic: bool) -> None:
    _WORKER_BUILDERS.update(figure_builders(analysis, synthetic))


def _figure_process_draw(name: str, path: Path, dpi: int) -> str:
    _save_png(_WORKER_BUILDERS[name](), path, dpi)
    return name


def _draw_in_processes(analysis, synthetic, dpi, paths: dict[str, Path], workers: int, bar) -> set[str]:
    """Draw the figures in ``workers`` processes; returns the names drawn. Where processes
    cannot be had (a daemonic process such as a Dask worker may not start any, or the
    system refuses), returns what was drawn so far and the caller draws the rest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    done: set[str] = set()
    if multiprocessing.current_process().daemon:
        return done
    try:
        # forkserver: clean processes whatever threads this one runs (a fork would copy
        # their locks). The server imports matplotlib and the figures once (about 1 s) and
        # each process forked from it gets the Analysis once.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tusrec.ranking.report", "tusrec.ranking.figures"])
        with ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_figure_process_init,
            initargs=(analysis, synthetic),
        ) as pool:
            # The grids of many panels first (each alone takes up to half of the drawing),
            # the rest as processes free up.
            order = sorted(paths, key=lambda name: name not in _SLOWEST_FIGURES)
            futures = [pool.submit(_figure_process_draw, name, paths[name], dpi) for name in order]
            for future in as_completed(futures):
                done.add(future.result())
                bar.update()
    except (OSError, BrokenProcessPool):
        pass
    return done


# --------------------------------------------------------------------------- qualitative


def qualitative_choice(analysis: Analysis, team: int) -> list[tuple[str, str, float]]:
    """(label, key, FS) of a team's best, median and worst scan by final score, among the
    scans it was scored on (a scan without output has nothing to draw)."""
    fs = analysis.scores.scores["FS"][team]
    scored = np.flatnonzero(analysis.data.scored[team] & np.isfinite(fs))
    if not len(scored):
        return []
    order = scored[np.argsort(-fs[scored], kind="stable")]  # best first
    keys = analysis.data.scans["key"].to_numpy()
    picks = [("best", order[0]), ("median", order[(len(order) - 1) // 2]), ("worst", order[-1])]
    seen: list[tuple[str, str, float]] = []
    for label, k in picks:
        if any(key == keys[k] for _, key, _ in seen):  # fewer than 3 scans: no repeats
            continue
        seen.append((label, str(keys[k]), float(fs[k])))
    return seen


def qualitative_scans(
    analysis: Analysis,
    team_predictions: dict[str, Path],
    data_root: str | Path,
    out: Path,
    synthetic: bool = False,
) -> dict[str, list]:
    """Each named team's best, median and worst scan drawn by ``./evaluate show`` into
    out/qualitative/; returns {team: [ShownScan]} in ranking order."""
    from tusrec.data import open_data
    from tusrec.ddf import GroundTruth
    from tusrec.show.command import show_scan

    unknown = sorted(set(team_predictions) - set(analysis.data.teams))
    if unknown:
        raise RankingError(f"--predictions for teams that are not ranked: {', '.join(unknown)}")
    data = open_data(data_root)
    calib = data.calibration
    folder = out / "qualitative"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shown: dict[str, list] = {}
    truths: dict[str, GroundTruth] = {}
    for t in analysis.ranking.order:
        name = analysis.data.teams[t]
        if name not in team_predictions:
            continue
        shown[name] = []
        for label, key, fs in qualitative_choice(analysis, t):
            scan = data.scan(key)  # TusrecDataError when the data are not those ranked
            if key not in truths:
                truths[key] = GroundTruth.from_scan(scan, calib)
            item = show_scan(
                Path(team_predictions[name]) / f"{key}.h5",
                scan,
                truths[key],
                folder,
                synthetic,
                team=name,
                prefix=f"{_slug(name)}__",
            )
            item.label = f"{name}, {label} scan (FS {fs:.3f})"
            shown[name].append(item)
    return shown


def parse_prediction_args(texts: list[str]) -> dict[str, Path]:
    """--predictions 'TEAM=DIR' arguments -> {team: predictions folder}."""
    out: dict[str, Path] = {}
    for text in texts:
        name, sep, folder = text.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise RankingError(f"--predictions {text!r}: expected TEAM=path/to/predictions")
        if name in out:
            raise RankingError(f"--predictions: team {name!r} given twice")
        if not Path(folder).is_dir():
            raise RankingError(f"--predictions {text!r}: {folder} is not a folder")
        out[name] = Path(folder)
    return out


def _slug(name: str) -> str:
    """A team name as a safe file-name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "team"


# --------------------------------------------------------------------------- HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1500px; padding: 0 20px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.synthetic { background: #c00000; color: white; font-weight: bold; font-size: 22px; padding: 10px 16px;
             border-radius: 6px; margin: 12px 0; letter-spacing: 1px; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13px; }
th, td { border: 1px solid #d4d4d4; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f3f7; } td:nth-child(2), th:nth-child(2) { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #e4e4e4; margin: 8px 0 20px; }
.notes li { margin-bottom: 4px; } .meta { color: #555; } code { background: #f3f3f3; padding: 1px 4px; }
.scroll { overflow-x: auto; }
"""


def _table_html(frame: pd.DataFrame, table_id: str = "", digits: int = 3) -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"
        return v

    shown = frame.map(fmt) if len(frame) else frame
    attrs = f' id="{table_id}"' if table_id else ""
    body = shown.to_html(index=False, escape=True, border=0, na_rep="n/a")
    return f'<div class="scroll"{attrs}>{body}</div>'


def _img_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _protocols(protocols: list[str]) -> str:
    if not protocols:
        return "protocol unknown"
    if len(protocols) == 1:
        return f"protocol {protocols[0]}"
    return "protocols " + ", ".join(protocols[:-1]) + f" and {protocols[-1]}"


def _p_fmt(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def report_html(
    analysis: Analysis,
    figures: dict[str, Path],
    title: str = DEFAULT_TITLE,
    synthetic: bool = False,
    qualitative: dict[str, list] | None = None,
) -> str:
    """The whole report as one HTML page; images inlined as base64 PNG. ``qualitative``:
    {team: [ShownScan]} (qualitative_scans) for the section of drawn scans."""
    a = analysis
    data = a.data
    esc = html.escape
    s = a.settings
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}{' (SYNTHETIC DATA)' if synthetic else ''}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if synthetic:
        parts.append(
            '<div class="synthetic" id="synthetic">SYNTHETIC DATA - these results are not real</div>'
        )
    parts.append(
        f'<p class="meta">{s["teams"]} teams, {s["scans"]} scans of {_count(s["subjects"], "subject")} '
        f"({_protocols(s['protocols'])}); "
        f"normalisation <b>{esc(a.normalisation)}</b> "
        f"({esc(a.normalisation_reason)}); {s['bootstrap_resamples']:,} bootstrap resamples per level, seed "
        f"{s['seed']}; significance level {s['alpha']}. Generated {time.strftime('%Y-%m-%d %H:%M')} by "
        "<code>./evaluate rank</code>.</p>"
    )

    def figure(name: str) -> None:
        if name in figures:
            parts.append(_img_html(figures[name], FIGURES[name]))

    def unsupported(*keys: str) -> bool:
        """Say why, in one sentence each, where the data cannot support an analysis;
        True when any of ``keys`` is left out."""
        said = [a.not_supported[k] for k in keys if k in a.not_supported]
        parts.extend(f'<p class="not-supported">{esc(text)}</p>' for text in said)
        return bool(said)

    parts.append('<h2 id="leaderboard-heading">Leaderboard</h2>')
    parts.append(
        "<p>Per scan each error X is normalised to X* and combined: FS = 0.25 (GPE* + GLE* + LPE* + LLE*), "
        "GS = 0.5 (GPE* + GLE*), LS = 0.5 (LPE* + LLE*), PS = 0.5 (GPE* + LPE*), LMS = 0.5 (GLE* + LLE*). "
        "A team's score is the mean over all scans (a scan it was not scored on counts 0) ± sd over scans; "
        "ranked by FS to three decimals, ties by mean runtime (faster first). Errors: mean ± sd over the "
        "team's scored scans (mm).</p>"
    )
    parts.append(_table_html(leaderboard_display(a.leaderboard), "leaderboard"))
    parts.append("<h3>Notes and choices</h3><ul class='notes'>")
    parts.extend(f"<li>{esc(n)}</li>" for n in a.notes)
    parts.append(
        "<li>Documented choices: min-max with max = min gives every scored team X* = 1; identity with "
        "X_identity = 0 (below 1e-9 mm) drops the component on that scan (weights renormalised); an error "
        "no team has on a scan (e.g. GLE/LLE without landmarks) is dropped likewise; an error other teams "
        "have but a team lacks makes that scan unscored for it (score 0). Scans absent from a team's table "
        "count as failed.</li></ul>"
    )

    parts.append("<h2>Ranking stability (bootstrap)</h2>")
    if not unsupported("stability"):
        unsupported("bootstrap:scan", "bootstrap:subject")
    if "stability" not in a.not_supported and a.bootstrap:
        parts.append(
            "<p>The test scans are resampled with replacement (same size) and the teams re-ranked in each "
            "resample; the subject-level bootstrap resamples subjects and keeps each subject's scans "
            "together, since scans of one subject are not independent. Bubble area: how often a team takes "
            "each rank; cross: median rank; bar: 2.5-97.5 % rank interval.</p>"
        )
        figure("blob_plot")
        boot = pd.concat([b.summary(data.teams) for b in a.bootstrap.values()])
        boot = boot.rename(columns={"p_rank_as_full": "P(same rank)", "p_first": "P(rank 1)"})
        for c in ("median_rank", "rank_2.5%", "rank_97.5%"):
            boot[c] = boot[c].map(lambda v: f"{v:.1f}")
        parts.append(_table_html(boot, "bootstrap", digits=3))
        figure("kendall_tau")
        taus = []
        for level, b in a.bootstrap.items():
            t = b.tau[np.isfinite(b.tau)]
            if len(t):
                q = np.quantile(t, [0.025, 0.5, 0.975])
                taus.append(
                    {
                        "level": level,
                        "median tau": q[1],
                        "2.5 %": q[0],
                        "97.5 %": q[2],
                        "P(tau = 1)": np.mean(t == 1),
                    }
                )
        if taus:
            parts.append(_table_html(pd.DataFrame(taus), "kendall"))

    parts.append("<h2>Sampling distribution of the mean final score</h2>")
    if "bootstrap:scan" in a.not_supported:
        parts.append("<p>With a single scan there is no distribution of the mean to estimate.</p>")
    else:
        parts.append(
            "<p>The distribution of each team's mean FS over the scan-level bootstrap's resamples, and its "
            "95 % interval: the 2.5 and 97.5 % percentiles of those means (a percentile interval stays "
            "inside the score's range; the normal one, mean ± 1.96 standard errors, does not on small, "
            "skewed samples). Standard error: sd / sqrt(n).</p>"
        )
        figure("sampling_distribution")
    parts.append(_table_html(a.sampling, "sampling", digits=4))

    parts.append("<h2>Pairwise significance</h2>")
    results = tested(a)
    if not unsupported("tests"):
        parts.append(
            "<p>One-sided paired Wilcoxon signed-rank tests between every ordered pair of teams (is the row "
            "team better: higher score, lower error?), Holm-adjusted over all pairs of a metric; on "
            "scan-level values and on subject means. Errors are paired over the scans both teams were "
            "scored on; scores over all scans (failures 0). "
            + (
                "p-values: normal approximation <b>with continuity correction</b>, zero differences "
                "dropped, as challengeR computes them (R's <code>wilcox.test(exact = FALSE, correct = "
                "TRUE)</code>); a pair whose differences are all zero gets p = 1, as in R."
                if s.get("continuity_correction", True)
                else "p-values: normal approximation <b>without continuity correction</b> (R's "
                "<code>wilcox.test(exact = FALSE, correct = FALSE)</code>), zero differences dropped; "
                "challengeR's default applies the correction. A pair whose differences are all zero has "
                "no p-value (n/a; R gives NaN) and is left out of the Holm family, as R's "
                "<code>p.adjust</code> leaves it out."
            )
            + "</p>"
        )
        unsupported("tests:scan", "tests:subject")
        figure("significance_map")
        order = a.ranking.order
        names = [data.teams[t] for t in order]
        for pw in results:
            if pw.metric != "FS":
                continue
            m = pd.DataFrame(pw.p_holm[np.ix_(order, order)], columns=names)
            m = m.map(_p_fmt)
            m.insert(0, "better than →", names)
            parts.append(f"<h3>FS, {pw.level} level: Holm-adjusted p (row better than column)</h3>")
            parts.append(_table_html(m, f"pvalues-{pw.level}"))
        figure("significance_all")
        parts.append("<p>All p-values: <code>pvalues.csv</code> and <code>pvalues/</code>.</p>")

    parts.append("<h2>Distributions per team</h2>")
    figure("box_scores")
    figure("box_errors")

    parts.append("<h2>Breakdown by scan pattern</h2>")
    if len(a.patterns):
        figure("patterns")
        wide = a.patterns[a.patterns["metric"] == "FS"].pivot_table(
            index=["factor", "level"], columns="team", values="mean", sort=False
        )
        # reindex, not select: pivot_table drops a team whose every mean is NaN (no scan
        # of it was scored), and the table still shows it, empty
        wide = wide.reindex(columns=[data.teams[t] for t in a.ranking.order]).reset_index()
        wide.columns.name = None
        parts.append("<h3>Mean FS per pattern</h3>")
        parts.append(_table_html(wide, "patterns"))
        parts.append("<p>Every error per pattern: <code>patterns.csv</code>.</p>")
    else:
        parts.append("<p>The scan names carry no pattern that varies.</p>")

    parts.append("<h2>Errors and scan length</h2>")
    parts.append(
        "<p>Scan length: distance travelled by the image corners over the scan (mm). Pearson r of scan "
        "length with each error over a team's scored scans, and over subject means (the 2024 paper reports "
        "r of 0.3-0.5 per scan and 0.58-0.78 per subject).</p>"
    )
    figure("scan_length")
    corr = a.lengths.pivot_table(index="team", columns=["level", "error"], values="r", sort=False)
    corr = corr.reindex([data.teams[t] for t in a.ranking.order])
    corr.columns = [f"r {e} ({lv})" for lv, e in corr.columns]
    parts.append(_table_html(corr.reset_index(), "scan-length"))
    parts.append("<p>p-values and counts: <code>scan_length_correlation.csv</code>.</p>")

    parts.append("<h2>Sensitivity to the ranking method</h2>")
    parts.append(
        "<p>The same data ranked under min-max, identity and z-score normalisation (aggregate then rank; a "
        "failed scan scores 0, or under z-score the lowest z of that scan), and by rank then aggregate (per "
        "scan and error the teams are ranked, failures last, ranks averaged; lower is better).</p><ul>"
    )
    parts.extend(f"<li>{esc(n)}</li>" for n in a.sensitivity_notes)
    parts.append("</ul>")
    figure("sensitivity")
    parts.append(_table_html(a.sensitivity, "sensitivity"))
    if len(a.leave_one_out):
        parts.append(
            "<h3>Leave one team out (min-max)</h3><p>Min-max scores depend on who takes part: each team is "
            "left out in turn and the others re-ranked; tau compares their order with and without it.</p>"
        )
        parts.append(_table_html(a.leave_one_out, "leave-one-out"))

    if qualitative:
        from tusrec.show.command import EXPLANATION, scans_html, summary_table_html

        parts.append('<h2 id="qualitative">Qualitative: best, median and worst scan per team</h2>')
        parts.append(
            "<p>Each team's scans with the highest, the median and the lowest final score among those "
            "it was scored on, drawn by <code>./evaluate show</code>.</p>" + EXPLANATION
        )
        for team, shown in qualitative.items():
            parts.append(f"<h3>{esc(team)}</h3>")
            if not shown:
                parts.append("<p>No scored scan to draw.</p>")
                continue
            parts.append(summary_table_html(shown))
            parts.extend(scans_html(shown, heading="h4"))

    parts.append(
        "<h2>Files</h2><p>Beside this report: "
        + ", ".join(
            f"<code>{n}</code>"
            for n in (
                "leaderboard.csv",
                "leaderboard.md",
                "scores_per_scan.csv",
                "bootstrap_summary.csv",
                "bootstrap_rank_frequencies.csv",
                "kendall_tau.csv",
                "sampling_distribution.csv",
                "pvalues.csv",
                "pvalues/",
                "patterns.csv",
                "scan_length_correlation.csv",
                "sensitivity.csv",
                "leave_one_out.csv",
                "figures/",
                "analysis.json",
            )
        )
        + ".</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    analysis: Analysis,
    out: str | Path,
    title: str = DEFAULT_TITLE,
    synthetic: bool = False,
    figures: bool = True,
    qualitative: dict[str, list] | None = None,
) -> dict[str, Path]:
    """Write every table, figure and report.html into ``out``; returns {name: path}.
    qualitative: see report_html (its PNGs are already in out/qualitative/)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        p.name if p.parent == out else str(p.relative_to(out)): p
        for p in write_tables(analysis, out, title, synthetic)
    }
    figs = write_figures(analysis, out, synthetic) if figures else {}
    written.update({f"figures/{k}.png": v for k, v in figs.items()})
    page = report_html(analysis, figs, title, synthetic, qualitative)
    written["report.html"] = _write_text(page, out / "report.html")
    return written


def rank_command(
    team_args: list[str],
    out: str | Path,
    normalisation: str | None = None,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    title: str | None = None,
    synthetic: bool = False,
    continuity_correction: bool = True,
    predictions: list[str] | None = None,
    data_root: str | Path | None = None,
) -> int:
    """`./evaluate rank`: read the tables, analyse, write the report, print the leaderboard.

    predictions: 'TEAM=DIR' predictions folders for the qualitative section (each team's
    best, median and worst scan drawn by ``./evaluate show``), with ``data_root``."""
    title = title or DEFAULT_TITLE
    data = load_teams(parse_team_args(team_args))
    analysis = analyse(data, normalisation, resamples, seed, alpha, continuity_correction)
    qualitative = None
    if predictions:
        if data_root is None:
            raise RankingError("--predictions needs --data (the data folder with ground truth)")
        Path(out).mkdir(parents=True, exist_ok=True)
        folders = parse_prediction_args(predictions)
        qualitative = qualitative_scans(analysis, folders, data_root, Path(out), synthetic)
    write_report(analysis, out, title, synthetic, qualitative=qualitative)
    shown = leaderboard_display(analysis.leaderboard)[["rank", "team", "FS ± sd", "runtime (s)", "scored"]]
    if synthetic:
        print("SYNTHETIC DATA")
    print(shown.to_string(index=False))
    for note in analysis.notes[1:]:
        print(f"note: {note}")
    print(f"wrote {Path(out) / 'report.html'} and the tables and figures beside it")
    return 0

"""How far to trust a ranking: bootstrap stability, sampling distributions, pairwise tests,
breakdowns by scan pattern and scan length (docs/conventions.md section 4.5, and what
the 2024 paper says the published analysis lacks).

All of it works on arrays of ``rank``: per-scan scores (T teams, n scans) and errors
(T, n, 4) in mm. The bootstrap is vectorised: one (B, n) matrix of resampling weights
(how often each scan is drawn in each resample) turns every team's mean into one matrix
product, so 2,000 resamples of 20 teams x 768 scans take a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tusrec.ranking.rank import (
    ERRORS,
    SCORES,
    Ranking,
    ScanScores,
    TeamData,
    kendall_tau,
    quiet,
    rank_order,
)

LEVELS = ("scan", "subject")
FACTORS = ("shape", "orientation", "arm", "direction")
FACTOR_LABELS = {
    "shape": "trajectory shape",
    "orientation": "probe orientation",
    "arm": "arm (sweeps)",
    "direction": "scanning direction",
    "rotation": "rotation scans, by arm",
    "protocol": "protocol",
}
LEVEL_LABELS = {
    "L": "L\n(line)",
    "C": "C",
    "S": "S",
    "Par": "Par\n(parallel)",
    "Per": "Per\n(perpendicular)",
    "DtP": "DtP\n(distal to proximal)",
    "PtD": "PtD\n(proximal to distal)",
    "LH": "LH",
    "RH": "RH",
}


# --------------------------------------------------------------------------- bootstrap


def scan_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) float: how often each of n scans is drawn in each of B resamples of n scans
    with replacement (each row sums to n)."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)


def subject_weights(subjects: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) float: scan weights of a bootstrap over subjects. Each resample draws S of
    the S subjects with replacement and takes all scans of every drawn subject, as often
    as it was drawn (scans of one subject are not independent, so they move together).
    subjects: (n,) labels."""
    _, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    counts = scan_weights(int(inverse.max()) + 1, resamples, rng)  # (B, S)
    return counts[:, inverse]


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, T) weighted mean of each team's values per resample; NaN values are left out
    (and a resample without any value gives NaN). values: (T, n); weights: (B, n)."""
    finite = np.isfinite(values)
    with quiet():
        num = weights @ np.where(finite, values, 0.0).T
        den = weights @ finite.T.astype(float)
        return num / den


@dataclass
class Bootstrap:
    """Ranks of B bootstrap resamples.

    level: 'scan' or 'subject'; ranks: (B, T) int; full: (T,) the ranking of all scans;
    tau: (B,) Kendall's tau-b of each resample's ranking with the full one; means: (B, T)
    each team's mean FS in each resample (the bootstrap distribution of the mean).
    """

    level: str
    ranks: np.ndarray
    full: np.ndarray
    tau: np.ndarray
    means: np.ndarray

    @property
    def resamples(self) -> int:
        return self.ranks.shape[0]

    @property
    def frequencies(self) -> np.ndarray:
        """(T, T): [t, r - 1] = fraction of resamples in which team t has rank r."""
        b, t = self.ranks.shape
        flat = np.arange(t)[None, :] * t + (self.ranks - 1)
        return np.bincount(flat.ravel(), minlength=t * t).reshape(t, t) / b

    @property
    def median(self) -> np.ndarray:
        return np.median(self.ranks, axis=0)

    @property
    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(2.5 %, 97.5 %) quantiles of each team's rank (numpy's default, linear)."""
        lo, hi = np.quantile(self.ranks, [0.025, 0.975], axis=0)
        return lo, hi

    def summary(self, teams: list[str]) -> pd.DataFrame:
        lo, hi = self.interval
        freq = self.frequencies
        return pd.DataFrame(
            {
                "level": self.level,
                "team": teams,
                "rank": self.full,
                "median_rank": self.median,
                "rank_2.5%": lo,
                "rank_97.5%": hi,
                "p_rank_as_full": freq[np.arange(len(teams)), self.full - 1],
                "p_first": freq[:, 0],
            }
        ).sort_values("rank", kind="stable")

    def frequency_table(self, teams: list[str]) -> pd.DataFrame:
        """Long format: level, team, rank, frequency (fraction of resamples)."""
        freq = self.frequencies
        t = len(teams)
        return pd.DataFrame(
            {
                "level": self.level,
                "team": np.repeat(teams, t),
                "rank": np.tile(np.arange(1, t + 1), t),
                "frequency": freq.ravel(),
            }
        )


def bootstrap_ranks(
    score: np.ndarray, runtime: np.ndarray, full: np.ndarray, weights: np.ndarray, level: str = "scan"
) -> Bootstrap:
    """Re-rank the teams in every resample.

    score: (T, n) per-scan FS; runtime: (T, n) s (NaN where not scored; the tie-break uses
    each resample's mean runtime); full: (T,) ranks of the whole set; weights: (B, n)
    resampling weights (scan_weights / subject_weights).
    """
    means = weighted_means(score, weights)  # (B, T)
    rts = weighted_means(runtime, weights)
    ranks = rank_order(means, rts)
    return Bootstrap(level, ranks, np.asarray(full), kendall_tau(ranks, full), means)


def bootstrap(
    data: TeamData, scores: ScanScores, ranking: Ranking, resamples: int = 2000, seed: int = 0
) -> dict[str, Bootstrap]:
    """Scan-level and subject-level bootstrap of the aggregate-then-rank ranking, each only
    where it has at least two units to resample (bootstrap_levels: resampling one
    subject gives that subject every time, and the analysis would only look certain).

    Seeded: the two levels draw from independent streams of ``seed``, so a rerun (or a
    run with only one level) gives the same resamples.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    scan_seed, subject_seed = np.random.SeedSequence(seed).spawn(2)
    fs = scores.scores["FS"]
    rt = np.where(data.scored, data.runtime, np.nan)
    levels = bootstrap_levels(data)
    out = {}
    if "scan" in levels:
        w_scan = scan_weights(data.n_scans, resamples, np.random.default_rng(scan_seed))
        out["scan"] = bootstrap_ranks(fs, rt, ranking.ranks, w_scan, "scan")
    if "subject" in levels:
        w_subj = subject_weights(data.subjects, resamples, np.random.default_rng(subject_seed))
        out["subject"] = bootstrap_ranks(fs, rt, ranking.ranks, w_subj, "subject")
    return out


def units(data: TeamData, level: str) -> int:
    """How many independent units a level resamples or tests: scans or subjects."""
    return data.n_scans if level == "scan" else len(set(data.subjects))


def bootstrap_levels(data: TeamData) -> list[str]:
    """The levels with at least two units (scans, subjects) to resample."""
    return [level for level in LEVELS if units(data, level) >= 2]


# --------------------------------------------------------------------------- sampling distribution


def sampling_distribution(
    data: TeamData, scores: ScanScores, ranking: Ranking, boot: Bootstrap | None = None
) -> pd.DataFrame:
    """Per team: mean FS, sd over scans (ddof 1), n scans, standard error sd / sqrt(n), and
    the 95 % interval of the mean: the 2.5 and 97.5 % percentiles of the scan-level
    bootstrap's means (``boot``; NaN without one). A percentile interval stays inside the
    score's range (min-max FS is in [0, 1]); the normal one, mean +- 1.96 se, left it on
    skewed, small samples (a mean of 0.037 got -0.036)."""
    fs = scores.scores["FS"]
    lo = hi = np.full(data.n_teams, np.nan)
    if boot is not None:
        with quiet():  # a team without any value has NaN means
            lo, hi = np.nanquantile(boot.means, [0.025, 0.975], axis=0)
    rows = []
    for t in ranking.order:
        v = fs[t][np.isfinite(fs[t])]
        sd = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        se = sd / np.sqrt(len(v)) if len(v) > 1 else np.nan
        mean = float(v.mean()) if len(v) else np.nan
        rows.append(
            {
                "team": data.teams[t],
                "rank": int(ranking.ranks[t]),
                "mean": mean,
                "sd": sd,
                "n": len(v),
                "se": se,
                "ci_2.5%": float(lo[t]),
                "ci_97.5%": float(hi[t]),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pairwise tests


def subject_means(values: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, S) mean of each team's values over each subject's scans (NaN left out; a
    subject without values gives NaN), and the (S,) subject labels. values: (T, n)."""
    labels, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    finite = np.isfinite(values)
    onehot = np.zeros((len(inverse), len(labels)))
    onehot[np.arange(len(inverse)), inverse] = 1.0
    with quiet():
        return (np.where(finite, values, 0.0) @ onehot) / (finite.astype(float) @ onehot), labels


def wilcoxon_greater(d: np.ndarray, correction: bool = True) -> np.ndarray:
    """One-sided Wilcoxon signed-rank p-values that each row of differences d (m, n) is
    shifted above 0, as challengeR computes them: R's ``wilcox.test(x, alternative =
    "greater", exact = FALSE, correct = correction)`` (docs/conventions.md section 4.5).

    Per row, on its finite values: zero differences are dropped (n = the non-zero ones,
    R's and scipy's zero_method 'wilcox'), tied |d| share their average rank, and p is the
    normal approximation with the tie-corrected variance, minus 0.5 in the numerator with
    the continuity correction. scipy.stats.wilcoxon(method='asymptotic',
    correction=correction) does this, one call for all rows. A row without any non-zero
    difference has V = 0, mean 0 and variance 0, and R's formula gives what it gives:
    p = 1 with the correction ((0 - 0.5) / 0 = -Inf) and NaN without it (0 / 0), and
    holm() leaves a NaN out of the family as R's p.adjust does. A row without any finite
    difference gives NaN.
    """
    from scipy.stats import wilcoxon

    d = np.atleast_2d(np.asarray(d, float))
    p = np.full(len(d), np.nan)
    finite = np.isfinite(d)
    nonzero = (finite & (d != 0)).any(axis=1)
    p[finite.any(axis=1) & ~nonzero] = 1.0 if correction else np.nan
    if nonzero.any():
        with quiet():
            # a NaN set to 0 is dropped like any zero difference: the row's own n is kept
            filled = np.where(finite[nonzero], d[nonzero], 0.0)
            p[nonzero] = wilcoxon(
                filled, axis=1, alternative="greater", method="asymptotic", correction=correction
            ).pvalue
    return p


def smallest_p(n: int, correction: bool = True) -> float:
    """The smallest p wilcoxon_greater can give for n paired values: every difference
    positive and all of one size (ties shrink the variance, which lowers p further than
    distinct sizes do). NaN for n = 0."""
    return float(wilcoxon_greater(np.ones((1, n)), correction)[0]) if n else np.nan


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values of the finite entries of p (any shape; NaN stays NaN):
    sorted ascending, the k-th smallest (from 0) times (m - k), made non-decreasing,
    capped at 1 - what statsmodels' multipletests(method='holm') returns (the tests
    check it), without the full garbage collection that function runs on every call."""
    out = np.full(p.shape, np.nan)
    mask = np.isfinite(p)
    values = p[mask]
    m = len(values)
    if m:
        order = np.argsort(values, kind="stable")
        adjusted = np.minimum(1.0, np.maximum.accumulate(values[order] * (m - np.arange(m))))
        result = np.empty(m)
        result[order] = adjusted
        out[mask] = result
    return out


@dataclass
class Pairwise:
    """One-sided paired tests between every ordered pair of teams for one metric.

    p[i, j]: raw p-value that team i is better than team j (higher score or lower error);
    p_holm: Holm-adjusted over all T (T - 1) ordered pairs; n[i, j]: paired values used
    (before dropping zero differences). Diagonals are NaN.
    """

    level: str
    metric: str
    p: np.ndarray
    p_holm: np.ndarray
    n: np.ndarray

    def significant(self, alpha: float = 0.05) -> np.ndarray:
        return np.nan_to_num(self.p_holm, nan=1.0) < alpha


def pairwise_tests(
    values: np.ndarray,
    higher_is_better: bool,
    level: str = "scan",
    metric: str = "",
    correction: bool = True,
) -> Pairwise:
    """Wilcoxon signed-rank tests, one-sided, between every ordered pair of teams
    (wilcoxon_greater; ``correction``: the continuity correction).

    values: (T, m) per-scan (or per-subject) values of one metric, NaN where a team has
    none (pairs are formed from the entries both teams have).
    """
    t = len(values)
    i, j = np.where(~np.eye(t, dtype=bool))
    sign = 1.0 if higher_is_better else -1.0
    d = sign * (values[i] - values[j])  # (T(T-1), m): > 0 where i is better
    p = np.full((t, t), np.nan)
    n = np.zeros((t, t), int)
    if len(i):
        p[i, j] = wilcoxon_greater(d, correction)
        n[i, j] = np.isfinite(d).sum(axis=1)
    return Pairwise(level, metric, p, holm(p), n)


def metric_values(data: TeamData, scores: ScanScores, metric: str) -> tuple[np.ndarray, bool]:
    """(T, n) per-scan values of a score (failed scans 0) or an error (failed scans NaN),
    and whether higher is better."""
    if metric in SCORES:
        return scores.scores[metric], True
    return data.errors[:, :, ERRORS.index(metric)], False


def all_pairwise(
    data: TeamData,
    scores: ScanScores,
    metrics: tuple[str, ...] = (*SCORES, *ERRORS),
    correction: bool = True,
) -> list[Pairwise]:
    """Pairwise tests for every metric, on scan-level values and on subject means
    (``correction``: Wilcoxon's continuity correction, challengeR's default)."""
    out = []
    subjects = data.subjects
    for metric in metrics:
        values, higher = metric_values(data, scores, metric)
        out.append(pairwise_tests(values, higher, "scan", metric, correction))
        out.append(pairwise_tests(subject_means(values, subjects)[0], higher, "subject", metric, correction))
    return out


def pairwise_table(results: list[Pairwise], teams: list[str]) -> pd.DataFrame:
    """Long format: level, metric, team, versus, n, p, p_holm (p: team better than versus)."""
    rows = []
    for r in results:
        i, j = np.where(~np.eye(len(teams), dtype=bool))
        rows.append(
            pd.DataFrame(
                {
                    "level": r.level,
                    "metric": r.metric,
                    "team": np.asarray(teams)[i],
                    "versus": np.asarray(teams)[j],
                    "n": r.n[i, j],
                    "p": r.p[i, j],
                    "p_holm": r.p_holm[i, j],
                }
            )
        )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


# --------------------------------------------------------------------------- breakdowns


def factors_present(data: TeamData) -> list[str]:
    """The pattern factors that vary in the data: shape, orientation, arm, direction of the
    2024 sweeps, the arm of the 2025 rotation scans ('rotation'), and protocol if mixed."""
    out = [f for f in (*FACTORS, "rotation") if len(set(pattern_labels(data, f)) - {""}) >= 2]
    if len(set(data.scans["protocol"])) >= 2:
        out.append("protocol")
    return out


def pattern_labels(data: TeamData, factor: str) -> np.ndarray:
    """(n,) str: each scan's level of a pattern factor ('' where the scan has none). The
    sweep factors (FACTORS) are the 2024 sweeps' only: a rotation scan is no sweep of an
    arm. 'rotation': the arm of each 2025 rotation scan ('' for sweeps)."""
    rotation = data.scans["protocol"].to_numpy() == "2025"
    if factor == "protocol":
        return data.scans["protocol"].to_numpy(dtype=str)
    labels = data.scans["arm" if factor == "rotation" else factor].to_numpy(dtype=str)
    return np.where(rotation if factor == "rotation" else ~rotation, labels, "")


def pattern_breakdown(data: TeamData, scores: ScanScores) -> pd.DataFrame:
    """Mean, sd and count of FS and each error per team and level of each pattern factor.

    Long format: factor, level, team, metric, mean, sd, n. Errors over the scored scans,
    FS over all scans (failures 0). 2025 rotation scans have a factor of their own,
    'rotation', whose levels are their arms.
    """
    rows = []
    for factor in factors_present(data):
        labels = pattern_labels(data, factor)
        for level in sorted(set(labels) - {""}):
            mask = labels == level
            for t, team in enumerate(data.teams):
                for metric in ("FS", *ERRORS):
                    values = metric_values(data, scores, metric)[0][t, mask]
                    values = values[np.isfinite(values)]
                    rows.append(
                        {
                            "factor": factor,
                            "level": level,
                            "team": team,
                            "metric": metric,
                            "mean": float(values.mean()) if len(values) else np.nan,
                            "sd": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
                            "n": len(values),
                        }
                    )
    return pd.DataFrame(rows, columns=["factor", "level", "team", "metric", "mean", "sd", "n"])


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(r, two-sided p, n) of scipy.stats.pearsonr on the pairs where both are finite;
    NaN when fewer than 3 pairs or either side is constant."""
    from scipy.stats import pearsonr

    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan, np.nan, n
    res = pearsonr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue), n


def length_correlation(data: TeamData) -> pd.DataFrame:
    """Pearson r (and p) of scan length with each error, per team, over scans and over
    subjects (subject means of length and error over the team's scored scans).

    Long format: team, error, level, r, p, n.
    """
    length = data.scans["scan_length_mm"].to_numpy(dtype=float)
    rows = []
    for t, team in enumerate(data.teams):
        for e, name in enumerate(ERRORS):
            err = data.errors[t, :, e]
            both = np.isfinite(err) & np.isfinite(length)
            r, p, n = pearson(length, err)
            rows.append({"team": team, "error": name, "level": "scan", "r": r, "p": p, "n": n})
            stacked = np.stack([np.where(both, length, np.nan), np.where(both, err, np.nan)])
            means, _ = subject_means(stacked, data.subjects)
            r, p, n = pearson(means[0], means[1])
            rows.append({"team": team, "error": name, "level": "subject", "r": r, "p": p, "n": n})
    return pd.DataFrame(rows, columns=["team", "error", "level", "r", "p", "n"])

"""From per-team per-scan error tables to scores and a ranking (docs/conventions.md section 4).

The pipeline is data -> scores -> ranking (the statistics are in ``stats``, the report in
``report``):

    read_team_table / load_teams   metrics.csv of every team -> one TeamData (T teams x n scans)
    normalise                      errors (T, n, 4) mm -> normalised errors X* (T, n, 4)
    combine                        X* -> the five scores FS GS LS PS LMS, each (T, n)
    rank_order                     team means -> ranks (ties on the three-decimal score
                                   broken by mean runtime, faster first)
    aggregate_then_rank            the challenge's ranking
    rank_then_aggregate            the alternative, for the sensitivity analysis

Choices the published material leaves open (all written into the report):

- **A scan that is not scored** (status failed, timeout, missing, invalid, or absent from
  the team's table) gets X* = 0 for every error under minmax and identity normalisation,
  so every score of that scan is 0 for the team (docs/conventions.md section 4). Under minmax 0 is
  the score of the worst scored team; under identity a prediction worse than the identity
  scores below 0, so a failure is not always the worst outcome. Under the z-score
  normalisation (sensitivity analysis only) 0 is the mean, so a failure gets the lowest
  z of that scan instead.
- **min-max with max = min** (every scored team has the same error on a scan, or only one
  team was scored): every scored team gets X* = 1 - all of them equal the best - and
  teams that were not scored keep 0.
- **identity with X_identity = 0** (no motion at all, so the all-zero prediction is
  perfect; any X_identity below 1e-9 mm): the reference is degenerate and the component
  says nothing about the teams, so it is dropped for that scan and the other components'
  weights are renormalised, exactly as for a component without data (next point).
- **NaN error on a scan with status ok**: if no team has a number for that error on that
  scan (GLE and LLE when the data had no landmarks), the component is dropped for the
  scan and the remaining weights renormalised (FS = 0.5 GPE* + 0.5 LPE*, GS = GPE*, ...);
  a score none of whose components remains (LMS without landmarks) is undefined for that
  scan for every team and the scan is left out of that score's mean. If other teams do
  have a number, the team without one produced output that cannot be scored: the whole
  scan is unscored for it (score 0), reported as 'incomplete'.
- **Ties**: team scores are compared at three decimals (as published); equal scores are
  ordered by mean runtime over the scored scans (faster first; no runtime counts as
  slowest); teams equal in both share the rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tusrec.data import TusrecDataError, parse_scan_key
from tusrec.scoring.score import DESCRIPTIVE, ERRORS, STATUSES

# The five scores of docs/conventions.md section 4: weights of the normalised errors (in ERRORS order).
SCORE_WEIGHTS: dict[str, tuple[float, float, float, float]] = {
    "FS": (0.25, 0.25, 0.25, 0.25),
    "GS": (0.5, 0.5, 0.0, 0.0),
    "LS": (0.0, 0.0, 0.5, 0.5),
    "PS": (0.5, 0.0, 0.5, 0.0),
    "LMS": (0.0, 0.5, 0.0, 0.5),
}
SCORES = tuple(SCORE_WEIGHTS)
NORMALISATIONS = ("minmax", "identity")
# zscore is offered for the sensitivity analysis only (the paper names it as the
# alternative with other trade-offs); the challenge used minmax (2024) and identity (2025).
SENSITIVITY_NORMALISATIONS = ("minmax", "identity", "zscore")
OK = "ok"
ABSENT = "absent"  # the scan is in another team's table but not in this one
INCOMPLETE = "incomplete"  # status ok but an error other teams have is NaN
IDENTITY_EPS_MM = 1e-9  # an identity error below this is taken as 0 (degenerate reference)
DECIMALS = 3  # team scores are reported, and compared, to three decimals


class RankingError(TusrecDataError):
    """Team tables that cannot be ranked as asked (names the team, file and problem)."""


@contextmanager
def quiet() -> Iterator[None]:
    """Silence numpy's warnings about empty or all-NaN slices: NaN is the documented answer."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# --------------------------------------------------------------------------- input


def parse_team_arg(text: str) -> tuple[str, Path]:
    """'NAME=path' -> (NAME, path). A bare path names the team after its folder (the
    ``--out`` folder of ``evaluate score``). A folder means its metrics.csv."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        p = Path(path)
        name = (p if p.is_dir() else p.parent).name
    name = name.strip()
    if not name:
        raise RankingError(f"--team {text!r}: empty team name (expected NAME=path/to/metrics.csv)")
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.csv"
    return name, p


def parse_team_args(texts: list[str]) -> dict[str, Path]:
    """Several --team arguments -> {name: metrics.csv path}; duplicate names are an error."""
    out: dict[str, Path] = {}
    for text in texts:
        name, path = parse_team_arg(text)
        if name in out:
            raise RankingError(f"duplicate team name {name!r} ({out[name]} and {path}): names must be unique")
        out[name] = path
    return out


def read_team_table(path: str | Path, team: str = "") -> pd.DataFrame:
    """Read and validate one team's metrics.csv (as written by ``evaluate score``).

    Needs the columns key, status, GPE, GLE, LPE, LLE; subject is taken from the key when
    absent; runtime_s and the *_identity columns are optional (identity normalisation needs
    the latter). Unknown columns are ignored. Raises RankingError naming the file.
    """
    path = Path(path)
    who = f"team {team!r}: " if team else ""
    if not path.is_file():
        raise RankingError(f"{who}{path}: no such file (expected the metrics.csv of `evaluate score`)")
    text_cols = ("key", "subject", "scan", "protocol", "arm", "orientation", "shape", "direction", "status")
    try:
        table = pd.read_csv(path, dtype={c: str for c in (*text_cols, "message")}, keep_default_na=True)
    except Exception as err:  # pandas raises several types for malformed CSV
        raise RankingError(f"{who}{path}: not a readable CSV ({err})") from None
    missing = [c for c in ("key", "status", *ERRORS) if c not in table.columns]
    if missing:
        raise RankingError(
            f"{who}{path}: missing column(s) {missing} (is this a metrics.csv of `evaluate score`?)"
        )
    if table.empty:
        raise RankingError(f"{who}{path}: no rows")
    if table["key"].isna().any():
        raise RankingError(f"{who}{path}: {int(table['key'].isna().sum())} row(s) without a key")
    dup = table["key"][table["key"].duplicated()].tolist()
    if dup:
        raise RankingError(f"{who}{path}: duplicate scan key(s) {dup[:5]}")
    status = table["status"].fillna("").str.strip()
    bad = sorted(set(status) - set(STATUSES))
    if bad:
        raise RankingError(f"{who}{path}: unknown status value(s) {bad}; expected one of {list(STATUSES)}")
    table["status"] = status
    for c in (*ERRORS, *(f"{e}_identity" for e in ERRORS), "runtime_s", "scan_length_mm", "frames"):
        if c in table.columns:
            try:
                table[c] = pd.to_numeric(table[c]).astype(float)
            except (ValueError, TypeError):
                raise RankingError(f"{who}{path}: column {c!r} is not numeric") from None
    errors = table[list(ERRORS)].to_numpy()
    if (errors < 0).any():
        row = int(np.argwhere(errors < 0)[0, 0])
        raise RankingError(f"{who}{path}: negative error for scan {table['key'].iloc[row]!r}")
    if "subject" not in table.columns or table["subject"].isna().any():
        try:
            subjects = [parse_scan_key(k)[0] for k in table["key"]]
        except TusrecDataError as err:
            raise RankingError(f"{who}{path}: no subject column and {err}") from None
        table["subject"] = table["subject"].fillna(pd.Series(subjects)) if "subject" in table else subjects
    if "scan" not in table.columns:
        table["scan"] = [k.partition("__")[2] or k for k in table["key"]]
    for c in ("protocol", "arm", "orientation", "shape", "direction"):
        table[c] = table[c].fillna("").astype(str) if c in table.columns else ""
    if "runtime_s" not in table.columns:
        table["runtime_s"] = np.nan
    return table


@dataclass
class TeamData:
    """Every team's per-scan errors on the union of their scans (sorted by key).

    teams: T names; scans: n rows (key + DESCRIPTIVE columns); errors: (T, n, 4) mm in
    ERRORS order, NaN unless the team's scan was scored; status: (T, n) str (STATUSES, or
    'absent' / 'incomplete'); runtime: (T, n) s; identity: (n, 4) mm errors of the all-zero
    prediction, or None when no table had them; notes: things the report must say.
    """

    teams: list[str]
    scans: pd.DataFrame
    errors: np.ndarray
    status: np.ndarray
    runtime: np.ndarray
    identity: np.ndarray | None
    notes: list[str] = field(default_factory=list)

    @property
    def n_teams(self) -> int:
        return len(self.teams)

    @property
    def n_scans(self) -> int:
        return len(self.scans)

    @property
    def scored(self) -> np.ndarray:
        """(T, n) bool: the team's scan has numbers and counts (status ok, complete)."""
        return self.status == OK

    @property
    def subjects(self) -> np.ndarray:
        """(n,) subject of each scan (3-digit str)."""
        return self.scans["subject"].to_numpy(dtype=str)

    @property
    def protocols(self) -> list[str]:
        return sorted(set(self.scans["protocol"]) - {""})

    def subset(self, teams: list[int]) -> TeamData:
        """The same data for the teams at these indices."""
        idx = list(teams)
        return TeamData(
            [self.teams[i] for i in idx],
            self.scans,
            self.errors[idx],
            self.status[idx],
            self.runtime[idx],
            self.identity,
            list(self.notes),
        )


def combine_teams(tables: Mapping[str, pd.DataFrame]) -> TeamData:
    """Align validated team tables (read_team_table) on the union of their scan keys.

    A scan missing from a team's table is 'absent' for it (scored 0, said in the notes).
    A row with status ok whose every error is NaN, or which lacks an error other teams
    have, is 'incomplete' (scored 0). Identity errors are the median over the teams that
    have them (they all come from the same ground truth; a disagreement is noted).
    """
    if not tables:
        raise RankingError("no team tables given (use --team NAME=metrics.csv, at least once)")
    teams = list(tables)
    keys = sorted(set().union(*(set(t["key"]) for t in tables.values())))
    n, nt = len(keys), len(teams)
    notes: list[str] = []
    errors = np.full((nt, n, 4), np.nan)
    runtime = np.full((nt, n), np.nan)
    status = np.full((nt, n), ABSENT, dtype=object)
    identity = np.full((nt, n, 4), np.nan)
    has_identity = False
    scans = pd.DataFrame({"key": keys})
    for c in DESCRIPTIVE:
        scans[c] = np.nan if c in ("frames", "scan_length_mm") else ""
    for t, name in enumerate(teams):
        table = tables[name].set_index("key").reindex(keys)
        present = table["status"].notna().to_numpy()
        status[t, present] = table["status"].to_numpy()[present]
        errors[t] = table[list(ERRORS)].to_numpy(dtype=float)
        runtime[t] = table["runtime_s"].to_numpy(dtype=float)
        id_cols = [f"{e}_identity" for e in ERRORS]
        if all(c in table.columns for c in id_cols):
            identity[t] = table[id_cols].to_numpy(dtype=float)
            has_identity = True
        for c in DESCRIPTIVE:
            # the first team that has a value for a scan gives it (they describe the same data)
            if c not in table.columns:
                continue
            values = table[c].to_numpy()
            current = scans[c].to_numpy()
            take = ~pd.isna(values) & (values != "") & (pd.isna(current) | (current == ""))
            scans.loc[take, c] = values[take]
        n_absent = int((~present).sum())
        if n_absent:
            notes.append(
                f"team {name!r}: {n_absent} of {n} scans are not in its table; they count as failed (score 0)"
            )
        not_ok = present & (status[t] != OK) & np.isfinite(errors[t]).any(axis=1)
        if not_ok.any():
            notes.append(
                f"team {name!r}: {int(not_ok.sum())} scan(s) with status other than ok carry errors; "
                "they are ignored (the scan scores 0)"
            )
    for c in ("subject", "scan", "protocol", "arm", "orientation", "shape", "direction"):
        scans[c] = scans[c].fillna("").astype(str)
    scored = status == OK
    errors[~scored] = np.nan
    runtime[~scored] = np.nan
    # status ok but no number where another team has one: output that cannot be scored.
    has_any = (scored[:, :, None] & np.isfinite(errors)).any(axis=0)  # (n, 4)
    incomplete = scored & (
        (~np.isfinite(errors) & has_any[None]).any(axis=2) | ~np.isfinite(errors).any(axis=2)
    )
    for t in np.flatnonzero(incomplete.any(axis=1)):
        bad = np.flatnonzero(incomplete[t])
        notes.append(
            f"team {teams[t]!r}: {len(bad)} scan(s) with status ok but NaN errors that other teams have "
            f"(e.g. {keys[bad[0]]}); counted as not scored (score 0), status 'incomplete'"
        )
    status[incomplete] = INCOMPLETE
    errors[incomplete] = np.nan
    runtime[incomplete] = np.nan
    dropped = ~has_any & (status == OK).any(axis=0)[:, None]
    for e, name in enumerate(ERRORS):
        if dropped[:, e].any():
            notes.append(
                f"{name}: no team has a value on {int(dropped[:, e].sum())} scan(s) (e.g. no landmarks); "
                "the component is dropped there and the other weights renormalised"
            )
    ident = None
    if has_identity:
        with quiet():
            ident = np.nanmedian(identity, axis=0)
            spread = np.nanmax(identity, axis=0) - np.nanmin(identity, axis=0)
        if np.nanmax(np.where(np.isfinite(spread), spread / np.maximum(np.abs(ident), 1e-9), 0)) > 1e-4:
            notes.append(
                "the identity errors differ between the team tables (scored against different ground "
                "truth?); their median per scan is used"
            )
    return TeamData(teams, scans, errors, status.astype(str), runtime, ident, notes)


def load_teams(paths: Mapping[str, str | Path]) -> TeamData:
    """Read every team's metrics.csv ({name: path}) and combine them (combine_teams)."""
    if len(set(paths)) != len(paths):
        raise RankingError("duplicate team names")
    return combine_teams({name: read_team_table(p, name) for name, p in paths.items()})


def default_normalisation(data: TeamData) -> tuple[str, str]:
    """(method, reason): identity when every scan is of the 2025 protocol, else minmax."""
    protocols = set(data.scans["protocol"])
    if protocols == {"2025"}:
        return "identity", "all scans are of the 2025 protocol, whose ranking normalises by the identity"
    if len(protocols) > 1:
        which = "the scans are of more than one protocol"
    elif protocols == {"2024"}:
        which = "the scans are of the 2024 protocol"
    else:
        which = "the scans' protocol is unknown"
    return "minmax", f"{which}; the 2024 ranking normalises min-max over the teams"


# --------------------------------------------------------------------------- scores


def check_normalisation(method: str, allowed: tuple[str, ...] = SENSITIVITY_NORMALISATIONS) -> str:
    if method not in allowed:
        raise RankingError(f"unknown normalisation {method!r}; expected one of {list(allowed)}")
    return method


def normalise(
    errors: np.ndarray,
    scored: np.ndarray,
    method: str,
    identity: np.ndarray | None = None,
    keys: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised errors X* per team, scan and error, and which components count.

    errors: (T, n, 4) mm (ignored where not ``scored``); scored: (T, n) bool; identity:
    (n, 4) mm, needed by 'identity'. Returns X*: (T, n, 4), higher is better, 0 for a scan
    the team was not scored on ('zscore': that scan's lowest z), NaN where the component is
    dropped; defined: (n, 4) bool, the components that count on each scan. See the module
    docstring for max = min, X_identity = 0 and NaN.
    """
    check_normalisation(method)
    x = np.where(scored[:, :, None], errors, np.nan)
    finite = np.isfinite(x)
    has_value = finite.any(axis=0)  # (n, 4)
    nobody = ~scored.any(axis=0)  # (n,) every team failed: all score 0 on what exists
    exists = np.isfinite(identity) if identity is not None else np.ones_like(has_value)
    defined = has_value | (nobody[:, None] & exists)
    with quiet():
        if method == "minmax":
            hi = np.nanmax(np.where(finite, x, -np.inf), axis=0)
            lo = np.nanmin(np.where(finite, x, np.inf), axis=0)
            span = hi - lo
            flat = span <= 1e-12 * np.maximum(1.0, np.abs(hi))  # max = min: all scored teams best
            star = np.where(flat[None], 1.0, (hi[None] - x) / np.where(flat, 1.0, span)[None])
            fail = np.zeros_like(hi)
        elif method == "identity":
            if identity is None:
                raise RankingError(
                    "identity normalisation needs the GPE_identity, GLE_identity, LPE_identity, "
                    "LLE_identity columns of `evaluate score`; the tables have none "
                    "(rescore, or use --normalisation minmax)"
                )
            lacking = has_value & ~np.isfinite(identity)
            if lacking.any():
                s, e = np.argwhere(lacking)[0]
                where = keys[s] if keys is not None else f"scan {s}"
                raise RankingError(
                    f"identity normalisation: no {ERRORS[e]}_identity for {where} although teams "
                    f"were scored on it ({int(lacking.sum())} such values; rescore, or use minmax)"
                )
            degenerate = np.isfinite(identity) & (identity < IDENTITY_EPS_MM)
            defined &= ~degenerate
            star = 1.0 - x / np.where(degenerate, 1.0, identity)[None]
            fail = np.zeros(identity.shape)
        else:  # zscore, sensitivity only
            mean = np.nanmean(x, axis=0)
            sd = np.nanstd(x, axis=0)
            flat = ~(sd > 1e-12 * np.maximum(1.0, np.abs(mean)))
            star = np.where(flat[None], 0.0, (mean[None] - x) / np.where(flat, 1.0, sd)[None])
            fail = np.nanmin(np.where(finite, star, np.inf), axis=0)
            fail = np.where(np.isfinite(fail), fail, 0.0)
    star = np.where(scored[:, :, None], star, fail[None])
    star = np.where(defined[None], star, np.nan)
    return star, defined


def combine(star: np.ndarray, defined: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """One score per team and scan from normalised errors.

    star: (T, n, 4); defined: (n, 4); weights: 4 weights in ERRORS order. The weights of
    the components defined on a scan are renormalised to sum to 1; a scan on which no
    weighted component is defined gives NaN (for every team). Returns (T, n).
    """
    w = np.asarray(weights, float)[None, :] * defined  # (n, 4)
    total = w.sum(axis=1)  # (n,)
    with np.errstate(all="ignore"):
        score = np.nansum(np.where(w[None] > 0, star, 0.0) * w[None], axis=2) / total[None]
    return np.where(total[None] > 0, score, np.nan)


@dataclass
class ScanScores:
    """Per-scan scores under one normalisation.

    normalised: (T, n, 4) X*; defined: (n, 4); scores: name -> (T, n) (FS GS LS PS LMS).
    """

    method: str
    normalised: np.ndarray
    defined: np.ndarray
    scores: dict[str, np.ndarray]


def scan_scores(data: TeamData, method: str) -> ScanScores:
    """The five scores of every team on every scan under ``method``."""
    star, defined = normalise(data.errors, data.scored, method, data.identity, list(data.scans["key"]))
    scores = {name: combine(star, defined, w) for name, w in SCORE_WEIGHTS.items()}
    return ScanScores(method, star, defined, scores)


# --------------------------------------------------------------------------- ranking


def mean_runtime(data: TeamData) -> np.ndarray:
    """(T,) mean runtime (s) over each team's scored scans with a runtime (NaN if none)."""
    rt = np.where(data.scored, data.runtime, np.nan)
    with np.errstate(all="ignore"):
        counts = np.isfinite(rt).sum(axis=1)
        return np.where(counts > 0, np.nansum(rt, axis=1) / np.maximum(counts, 1), np.nan)


def rank_order(
    value: np.ndarray, runtime: np.ndarray, higher_is_better: bool = True, decimals: int | None = DECIMALS
) -> np.ndarray:
    """Ranks (1 = best) along the last axis: by ``value`` rounded to ``decimals``, then by
    runtime (lower first; NaN last); equal in both -> the same (lowest) rank.

    value, runtime: (..., T). Returns int (..., T). Vectorised over the leading axes.
    """
    v = np.asarray(value, float)
    if decimals is not None:
        v = np.round(v, decimals)
    key = -v if higher_is_better else v
    key = np.where(np.isnan(key), np.inf, key)
    rt = np.broadcast_to(np.where(np.isfinite(runtime), runtime, np.inf), key.shape)
    order = np.lexsort((rt, key), axis=-1)
    ks = np.take_along_axis(key, order, axis=-1)
    rs = np.take_along_axis(rt, order, axis=-1)
    new = np.ones(key.shape, bool)
    new[..., 1:] = (ks[..., 1:] != ks[..., :-1]) | (rs[..., 1:] != rs[..., :-1])
    pos = np.broadcast_to(np.arange(key.shape[-1]), key.shape)
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)
    ranks = np.empty(key.shape, int)
    np.put_along_axis(ranks, order, start + 1, axis=-1)
    return ranks


@dataclass
class Ranking:
    """One ranking of the teams.

    method: 'aggregate-then-rank' or 'rank-then-aggregate'; normalisation: the method of
    the per-scan scores (None for rank-then-aggregate); value: (T,) what is ranked (mean FS,
    or mean rank: lower better); runtime: (T,) s; ranks: (T,) int, 1 = best.
    """

    teams: list[str]
    method: str
    normalisation: str | None
    value: np.ndarray
    runtime: np.ndarray
    ranks: np.ndarray
    higher_is_better: bool = True

    @property
    def order(self) -> np.ndarray:
        """Team indices from best to worst (ties by input order)."""
        return np.lexsort((np.arange(len(self.ranks)), self.ranks))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"team": self.teams, "rank": self.ranks, "value": self.value, "runtime_s": self.runtime}
        ).iloc[self.order]


def team_means(per_scan: np.ndarray) -> np.ndarray:
    """(T,) mean over the scans on which the score is defined; per_scan (T, n)."""
    with quiet():
        return np.nanmean(per_scan, axis=1)


def aggregate_then_rank(data: TeamData, scores: ScanScores) -> Ranking:
    """The challenge's ranking: mean FS over scans, rank (three decimals, then runtime)."""
    value = team_means(scores.scores["FS"])
    runtime = mean_runtime(data)
    return Ranking(
        data.teams, "aggregate-then-rank", scores.method, value, runtime, rank_order(value, runtime)
    )


def scan_ranks(data: TeamData) -> np.ndarray:
    """(T, n) per-scan mean rank of each team over the four errors (1 = best).

    Per scan and error the teams are ranked by the error (ties share the average rank);
    teams not scored on the scan share the last places. Components no team has are left
    out, the others weighted equally.
    """
    from scipy.stats import rankdata

    x = np.where(data.scored[:, :, None], data.errors, np.inf)
    x = np.where(np.isnan(x), np.inf, x)
    r = rankdata(x, axis=0, method="average")  # (T, n, 4)
    has = (data.scored[:, :, None] & np.isfinite(data.errors)).any(axis=0)  # (n, 4)
    nobody = ~data.scored.any(axis=0)
    has = has | nobody[:, None]
    w = has.astype(float)
    with np.errstate(all="ignore"):
        return (r * w[None]).sum(axis=2) / w.sum(axis=1)[None]


def rank_then_aggregate(data: TeamData) -> Ranking:
    """Rank the teams on each scan and error, average the ranks, rank the averages."""
    value = team_means(scan_ranks(data))
    runtime = mean_runtime(data)
    ranks = rank_order(value, runtime, higher_is_better=False)
    return Ranking(data.teams, "rank-then-aggregate", None, value, runtime, ranks, higher_is_better=False)


def leaderboard(data: TeamData, scores: ScanScores, ranking: Ranking) -> pd.DataFrame:
    """One row per team, best first: rank, team, the five scores (mean, sd over scans),
    the four errors (mean, sd over the scored scans, mm), mean runtime (s), scan counts."""
    rows = []
    for t in ranking.order:
        row: dict = {"rank": int(ranking.ranks[t]), "team": data.teams[t]}
        for name in SCORES:
            v = scores.scores[name][t]
            v = v[np.isfinite(v)]
            row[name] = float(v.mean()) if len(v) else np.nan
            row[f"{name}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        for i, e in enumerate(ERRORS):
            v = data.errors[t, :, i]
            v = v[np.isfinite(v)]
            row[e] = float(v.mean()) if len(v) else np.nan
            row[f"{e}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
        row["runtime_s"] = float(ranking.runtime[t])
        row["scans"] = data.n_scans
        row["scored"] = int(data.scored[t].sum())
        row["not_scored"] = data.n_scans - row["scored"]
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- sensitivity


def kendall_tau(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between rankings a (..., T) and b (T,) (vectorised over a's leading
    axes; NaN when either ranking has every team tied or T < 2)."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    n = b.shape[-1]
    i, j = np.triu_indices(n, 1)
    sa = np.sign(a[..., i] - a[..., j])
    sb = np.sign(b[i] - b[j])
    n0 = len(i)
    ta = (sa == 0).sum(axis=-1)
    tb = int((sb == 0).sum())
    with np.errstate(all="ignore"):
        return (sa * sb).sum(axis=-1) / np.sqrt((n0 - ta) * float(n0 - tb))


def sensitivity(data: TeamData, chosen: str) -> tuple[pd.DataFrame, list[str]]:
    """The ranking under every normalisation (aggregate-then-rank) and under
    rank-then-aggregate, side by side; teams in the order of the ``chosen`` normalisation.

    Returns the table (team, then per method '<method> rank' and '<method> value') and
    notes (methods skipped, whether the winner depends on the method, Kendall's tau).
    """
    check_normalisation(chosen, NORMALISATIONS)
    notes: list[str] = []
    rankings: dict[str, Ranking] = {}
    for method in SENSITIVITY_NORMALISATIONS:
        try:
            rankings[method] = aggregate_then_rank(data, scan_scores(data, method))
        except RankingError as err:
            notes.append(f"{method}: not computed ({err})")
    rankings["rank-then-aggregate"] = rank_then_aggregate(data)
    ref = rankings[chosen]
    table = pd.DataFrame({"team": data.teams})
    for name, r in rankings.items():
        label = name if name == "rank-then-aggregate" else f"{name} FS"
        table[f"{label} rank"] = r.ranks
        table[f"{label} value"] = r.value
    table = table.iloc[ref.order].reset_index(drop=True)
    winners = {name: {data.teams[t] for t in np.flatnonzero(r.ranks == 1)} for name, r in rankings.items()}
    same = all(w == winners[chosen] for w in winners.values())
    if data.n_teams >= 2:
        notes.append(
            "the winner is the same under every method"
            if same
            else "the winner depends on the method: "
            + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in winners.items())
        )
        taus = {k: float(kendall_tau(r.ranks, ref.ranks)) for k, r in rankings.items() if k != chosen}
        notes.append(
            f"Kendall's tau with the {chosen} ranking: " + ", ".join(f"{k} {v:.3f}" for k, v in taus.items())
        )
    return table, notes


def leave_one_out(data: TeamData, method: str = "minmax") -> pd.DataFrame:
    """How the other teams' order changes when one team is left out (min-max scores
    depend on who takes part; the paper's caveat). One row per left-out team: the winner
    without it, Kendall's tau between the remaining teams' ranks with and without it, and
    the teams whose relative order changed. Empty with fewer than three teams."""
    if data.n_teams < 3:
        return pd.DataFrame(columns=["left_out", "winner", "tau", "changed"])
    full = aggregate_then_rank(data, scan_scores(data, method)).ranks
    rows = []
    for t in range(data.n_teams):
        keep = [i for i in range(data.n_teams) if i != t]
        sub = data.subset(keep)
        r = aggregate_then_rank(sub, scan_scores(sub, method))
        before = full[keep]
        tau = float(kendall_tau(r.ranks, before))
        changed = sorted(
            {
                sub.teams[i]
                for i in range(len(keep))
                for j in range(len(keep))
                if np.sign(before[i] - before[j]) != np.sign(r.ranks[i] - r.ranks[j])
            }
        )
        winner = ", ".join(sub.teams[i] for i in np.flatnonzero(r.ranks == 1))
        rows.append({"left_out": data.teams[t], "winner": winner, "tau": tau, "changed": ", ".join(changed)})
    return pd.DataFrame(rows)

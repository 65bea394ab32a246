"""Scores, ranking and statistics of `evaluate rank` (tusrec.ranking.rank / stats), on
small hand-made tables whose answers are worked out here or by scipy independently."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from tusrec.ranking import rank as rk
from tusrec.ranking import stats as st
from tusrec.ranking.synthetic import synthetic_tables

ERR = list(rk.ERRORS)


def table(errors: dict[str, list], status=None, identity=None, subjects=None, runtime=1.0, length=None):
    """A metrics table of len(errors['GPE']) scans; each error the same list unless given."""
    n = len(next(iter(errors.values())))
    cols = {e: errors.get(e, errors.get("all")) for e in ERR}
    frame = pd.DataFrame(
        {
            # keys sort in row order (combine_teams sorts them)
            "key": [f"sub{(subjects or ['050'] * n)[i]}__scan{i:03d}" for i in range(n)],
            "subject": subjects or ["050"] * n,
            "status": status or ["ok"] * n,
            **{e: np.asarray(cols[e], float) for e in ERR},
            "runtime_s": runtime,
        }
    )
    if identity is not None:
        for e in ERR:
            frame[f"{e}_identity"] = np.asarray(identity, float)
    if length is not None:
        frame["scan_length_mm"] = length
    return frame


def combined(tables: dict[str, pd.DataFrame]) -> rk.TeamData:
    """combine_teams after the same validation read_team_table applies."""
    out = {}
    for name, t in tables.items():
        t = t.copy()
        for c in ("scan", "protocol", "arm", "orientation", "shape", "direction"):
            if c not in t:
                t[c] = ""
        out[name] = t
    return rk.combine_teams(out)


# --------------------------------------------------------------------------- normalisation


def test_minmax_by_hand_with_failures_and_equal_errors():
    # 3 teams x 3 scans; scan 1: B failed; scan 2: every scored team equal (max = min)
    data = combined(
        {
            "A": table({"all": [1.0, 2.0, 5.0]}),
            "B": table({"all": [3.0, np.nan, 5.0]}, status=["ok", "failed", "ok"]),
            "C": table({"all": [5.0, 2.0, 5.0]}),
        }
    )
    star, defined = rk.normalise(data.errors, data.scored, "minmax")
    assert defined.all()
    np.testing.assert_allclose(star[:, 0, 0], [1.0, 0.5, 0.0])  # (max - X) / (max - min)
    np.testing.assert_allclose(star[:, 1, 0], [1.0, 0.0, 1.0])  # max = min -> 1; failed -> 0
    np.testing.assert_allclose(star[:, 2, 0], [1.0, 1.0, 1.0])
    scores = rk.scan_scores(data, "minmax")
    np.testing.assert_allclose(scores.scores["FS"].mean(axis=1), [1.0, 0.5, 2 / 3])


def test_identity_by_hand_negative_scores_and_zero_reference():
    # scan 1: X_identity 4; scan 2: X_identity 0 for GPE only -> that component dropped
    ident = np.array([[4.0, 4.0, 4.0, 4.0], [0.0, 2.0, 2.0, 2.0]])
    a = table({"all": [1.0, 1.0]})
    b = table({"all": [6.0, 3.0]}, status=["ok", "ok"])
    for t in (a, b):
        for i, e in enumerate(ERR):
            t[f"{e}_identity"] = ident[:, i]
    data = combined({"A": a, "B": b})
    s = rk.scan_scores(data, "identity")
    assert not s.defined[1, 0] and s.defined[1, 1:].all() and s.defined[0].all()
    np.testing.assert_allclose(s.normalised[:, 0, 0], [0.75, -0.5])  # 1 - X / X_identity
    # scan 2: FS over GLE, LPE, LLE only, weights renormalised (1/3 each)
    np.testing.assert_allclose(s.scores["FS"][:, 1], [0.5, -0.5])
    np.testing.assert_allclose(s.scores["GS"][:, 1], [0.5, -0.5])  # GS = GLE* alone there
    np.testing.assert_allclose(s.scores["PS"][:, 1], [0.5, -0.5])  # PS = LPE* alone there
    # a failed scan scores 0, better than B's -0.5 on scan 2: documented, not the worst
    failed = combined({"A": a, "B": b.assign(status=["ok", "failed"])})
    assert rk.scan_scores(failed, "identity").scores["FS"][1, 1] == 0.0


def test_identity_needs_identity_columns():
    data = combined({"A": table({"all": [1.0]}), "B": table({"all": [2.0]})})
    assert data.identity is None
    with pytest.raises(rk.RankingError, match="identity"):
        rk.scan_scores(data, "identity")
    rk.scan_scores(data, "minmax")  # minmax does not


def test_unknown_normalisation():
    data = combined({"A": table({"all": [1.0]}), "B": table({"all": [2.0]})})
    with pytest.raises(rk.RankingError, match="unknown normalisation 'zscores'"):
        rk.scan_scores(data, "zscores")
    from tusrec.ranking.report import analyse

    with pytest.raises(rk.RankingError, match="unknown normalisation"):
        analyse(data, "zscore")  # sensitivity-only method: not a ranking choice


def test_nan_error_dropped_when_no_team_has_it_failed_when_others_do():
    nan = np.nan
    # scan 0 has no landmarks (GLE/LLE NaN for everybody); on scan 1 team B lacks GLE
    a = table({"GPE": [1.0, 1.0], "GLE": [nan, 1.0], "LPE": [1.0, 1.0], "LLE": [nan, 1.0]})
    b = table({"GPE": [3.0, 3.0], "GLE": [nan, nan], "LPE": [2.0, 3.0], "LLE": [nan, 3.0]})
    c = table({"GPE": [5.0, 5.0], "GLE": [nan, 5.0], "LPE": [3.0, 5.0], "LLE": [nan, 5.0]})
    data = combined({"A": a, "B": b, "C": c})
    assert list(data.status[:, 1]) == ["ok", rk.INCOMPLETE, "ok"]
    assert any("incomplete" in n for n in data.notes)
    assert any("GLE" in n and "dropped" in n for n in data.notes)
    s = rk.scan_scores(data, "minmax")
    assert list(s.defined[0]) == [True, False, True, False]
    # scan 0: FS = 0.5 GPE* + 0.5 LPE*; B: GPE* 0.5, LPE* 0.5
    np.testing.assert_allclose(s.scores["FS"][:, 0], [1.0, 0.5, 0.0])
    assert np.isnan(s.scores["LMS"][:, 0]).all()  # undefined for everybody on that scan
    np.testing.assert_allclose(s.scores["FS"][:, 1], [1.0, 0.0, 0.0])  # B incomplete -> 0
    # LMS mean is over scan 1 only
    board = rk.leaderboard(data, s, rk.aggregate_then_rank(data, s))
    assert board.set_index("team").loc["A", "LMS"] == 1.0


def test_score_weights_match_tusrec():
    star = np.array([[[0.1, 0.2, 0.3, 0.4]]])
    defined = np.ones((1, 4), bool)
    got = {k: rk.combine(star, defined, w)[0, 0] for k, w in rk.SCORE_WEIGHTS.items()}
    assert got == pytest.approx({"FS": 0.25, "GS": 0.15, "LS": 0.35, "PS": 0.2, "LMS": 0.3})


def test_zscore_failure_gets_lowest_z():
    data = combined(
        {
            "A": table({"all": [1.0, 1.0]}),
            "B": table({"all": [2.0, 2.0]}),
            "C": table({"all": [3.0, np.nan]}, status=["ok", "timeout"]),
        }
    )
    star, _ = rk.normalise(data.errors, data.scored, "zscore")
    np.testing.assert_allclose(star[:, 0, 0], [1.224744871, 0.0, -1.224744871])
    np.testing.assert_allclose(star[:, 1, 0], [1.0, -1.0, -1.0])


# --------------------------------------------------------------------------- ranking


def test_rank_order_ties_runtime_and_shared_ranks():
    value = np.array([0.8521, 0.8524, 0.9, 0.8524, 0.1])  # 0.852 x3 at three decimals
    runtime = np.array([9.0, 5.0, 1.0, 5.0, np.nan])
    np.testing.assert_array_equal(rk.rank_order(value, runtime), [4, 2, 1, 2, 5])
    # vectorised over resamples, and lower-is-better
    batch = np.stack([value, value[::-1]])
    np.testing.assert_array_equal(rk.rank_order(batch, runtime)[0], [4, 2, 1, 2, 5])
    np.testing.assert_array_equal(rk.rank_order(np.array([2.0, 1.0, 3.0]), np.zeros(3), False), [2, 1, 3])
    # no runtime ranks after any runtime
    np.testing.assert_array_equal(rk.rank_order(np.array([0.5, 0.5]), np.array([np.nan, 100.0])), [2, 1])


def test_rank_then_aggregate_by_hand():
    # scan 0: A < B < C; scan 1: B < A, C failed -> last
    data = combined(
        {
            "A": table({"all": [1.0, 2.0]}),
            "B": table({"all": [2.0, 1.0]}),
            "C": table({"all": [3.0, np.nan]}, status=["ok", "failed"]),
        }
    )
    np.testing.assert_allclose(rk.scan_ranks(data), [[1, 2], [2, 1], [3, 3]])
    r = rk.rank_then_aggregate(data)
    np.testing.assert_allclose(r.value, [1.5, 1.5, 3.0])
    np.testing.assert_array_equal(r.ranks, [1, 1, 3])  # equal mean rank and runtime: shared


def test_kendall_tau_matches_scipy(rng):
    for _ in range(20):
        t = rng.integers(2, 9)
        ref = rng.integers(1, t + 1, t)
        batch = rng.integers(1, t + 1, (5, t))
        got = rk.kendall_tau(batch, ref)
        for b in range(5):
            want = scipy.stats.kendalltau(batch[b], ref).statistic  # tau-b
            np.testing.assert_allclose(got[b], want, equal_nan=True)


def test_synthetic_teams_ranked_in_order_under_every_method():
    q = {"good": 0.1, "fair": 0.3, "poor": 0.6, "identity": 1.0}
    data = rk.combine_teams(synthetic_tables(q, subjects=4, seed=1))
    for method in ("minmax", "identity", "zscore"):
        r = rk.aggregate_then_rank(data, rk.scan_scores(data, method))
        assert [data.teams[t] for t in r.order] == list(q), method
    assert list(rk.rank_then_aggregate(data).ranks) == [1, 2, 3, 4]
    table_, notes = rk.sensitivity(data, "minmax")
    assert list(table_["team"]) == list(q)
    assert "the winner is the same under every method" in notes
    assert rk.default_normalisation(data)[0] == "minmax"
    data25 = rk.combine_teams(synthetic_tables(q, subjects=4, protocol="2025", seed=1))
    assert rk.default_normalisation(data25)[0] == "identity"


def test_leave_one_out_shows_a_poor_team_moving_minmax():
    # without P, A wins 2 scans of 3; P's huge errors on scans 0 and 2 squash A's lead there
    data = combined(
        {
            "A": table({"all": [1.0, 2.0, 1.0]}),
            "B": table({"all": [2.0, 1.0, 1.1]}),
            "P": table({"all": [100.0, 2.1, 100.0]}),
        }
    )
    full = rk.aggregate_then_rank(data, rk.scan_scores(data, "minmax"))
    assert [data.teams[t] for t in full.order] == ["B", "A", "P"]
    loo = rk.leave_one_out(data).set_index("left_out")
    assert loo.loc["P", "winner"] == "A"
    assert loo.loc["P", "tau"] == -1.0 and loo.loc["P", "changed"] == "A, B"
    assert loo.loc["A", "tau"] == 1.0


# --------------------------------------------------------------------------- input


def test_read_team_table_errors(tmp_path):
    good = table({"all": [1.0, 2.0]}, identity=[5.0, 5.0])
    good.to_csv(tmp_path / "good.csv", index=False)
    t = rk.read_team_table(tmp_path / "good.csv", "A")
    assert list(t["subject"]) == ["050", "050"]  # read as str, zero-padded
    with pytest.raises(rk.RankingError, match="no such file"):
        rk.read_team_table(tmp_path / "none.csv", "A")
    good.drop(columns=["LPE"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(rk.RankingError, match=r"missing column\(s\) \['LPE'\]"):
        rk.read_team_table(tmp_path / "bad.csv", "A")
    pd.concat([good, good]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(rk.RankingError, match="duplicate scan key"):
        rk.read_team_table(tmp_path / "dup.csv", "A")
    good.assign(status=["ok", "crashed"]).to_csv(tmp_path / "st.csv", index=False)
    with pytest.raises(rk.RankingError, match="unknown status value"):
        rk.read_team_table(tmp_path / "st.csv", "A")
    good.assign(GPE=[-1.0, 1.0]).to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(rk.RankingError, match="negative error"):
        rk.read_team_table(tmp_path / "neg.csv", "A")
    good.assign(GPE=["1.0", "abc"]).to_csv(tmp_path / "txt.csv", index=False)
    with pytest.raises(rk.RankingError, match="'GPE' is not numeric"):
        rk.read_team_table(tmp_path / "txt.csv", "A")
    good.drop(columns=["subject"]).to_csv(tmp_path / "nosub.csv", index=False)
    assert list(rk.read_team_table(tmp_path / "nosub.csv")["subject"]) == ["050", "050"]


def test_team_arguments(tmp_path):
    (tmp_path / "teamx").mkdir()
    assert rk.parse_team_args(["A=a.csv", str(tmp_path / "teamx")]) == {
        "A": rk.Path("a.csv"),
        "teamx": tmp_path / "teamx" / "metrics.csv",
    }
    with pytest.raises(rk.RankingError, match="duplicate team name 'A'"):
        rk.parse_team_args(["A=a.csv", "A=b.csv"])
    with pytest.raises(rk.RankingError, match="empty team name"):
        rk.parse_team_args(["=a.csv"])


def test_different_scan_sets_count_as_failed():
    a = table({"all": [1.0, 2.0, 3.0]})
    b = table({"all": [2.0, 3.0, 4.0]}).iloc[:2]
    data = combined({"A": a, "B": b})
    assert data.n_scans == 3
    assert list(data.status[1]) == ["ok", "ok", rk.ABSENT]
    assert any("'B': 1 of 3 scans are not in its table" in n for n in data.notes)
    s = rk.scan_scores(data, "minmax")
    assert s.scores["FS"][1, 2] == 0.0 and s.scores["FS"][0, 2] == 1.0


def test_nan_in_a_table_of_status_ok_rows():
    # every error NaN on an ok row: cannot be scored -> incomplete, 0
    data = combined({"A": table({"all": [1.0, np.nan]}), "B": table({"all": [2.0, 2.0]})})
    assert data.status[0, 1] == rk.INCOMPLETE
    assert rk.scan_scores(data, "minmax").scores["FS"][0, 1] == 0.0


def test_single_team():
    data = combined({"only": table({"all": [1.0, 2.0]})})
    s = rk.scan_scores(data, "minmax")
    np.testing.assert_allclose(s.scores["FS"], [[1.0, 1.0]])  # max = min on every scan
    assert list(rk.aggregate_then_rank(data, s).ranks) == [1]
    assert len(rk.leave_one_out(data)) == 0
    assert st.pairwise_tests(s.scores["FS"], True).p.shape == (1, 1)


# --------------------------------------------------------------------------- bootstrap


def test_scan_bootstrap_equals_explicit_resampling():
    data = rk.combine_teams(synthetic_tables(3, subjects=2, seed=4))
    s = rk.scan_scores(data, "minmax")
    full = rk.aggregate_then_rank(data, s)
    fs = s.scores["FS"]
    n = data.n_scans
    w = st.scan_weights(n, 50, np.random.default_rng(7))
    idx = np.random.default_rng(7).integers(0, n, (50, n))  # the same draws, used directly
    np.testing.assert_array_equal(w.sum(axis=1), n)
    boot = st.bootstrap_ranks(fs, np.where(data.scored, data.runtime, np.nan), full.ranks, w)
    for b in range(50):
        means = fs[:, idx[b]].mean(axis=1)
        rt = np.nanmean(data.runtime[:, idx[b]], axis=1)
        np.testing.assert_array_equal(boot.ranks[b], rk.rank_order(means, rt))
        assert boot.tau[b] == pytest.approx(scipy.stats.kendalltau(boot.ranks[b], full.ranks).statistic)
    np.testing.assert_allclose(boot.frequencies.sum(axis=1), 1.0)


def test_subject_bootstrap_keeps_subjects_together():
    subjects = np.array(["050", "050", "051", "052", "052", "052"])
    w = st.subject_weights(subjects, 200, np.random.default_rng(0))
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    # each resample draws 3 subjects: the counts of the first scan of each subject sum to 3
    np.testing.assert_array_equal(w[:, [0, 2, 3]].sum(axis=1), 3)


def test_bootstrap_is_seeded():
    data = rk.combine_teams(synthetic_tables({"a": 0.3, "b": 0.31, "c": 0.32}, subjects=3, seed=2))
    s = rk.scan_scores(data, "minmax")
    r = rk.aggregate_then_rank(data, s)
    one = st.bootstrap(data, s, r, 300, seed=5)
    two = st.bootstrap(data, s, r, 300, seed=5)
    other = st.bootstrap(data, s, r, 300, seed=6)
    for level in st.LEVELS:
        np.testing.assert_array_equal(one[level].ranks, two[level].ranks)
    assert not np.array_equal(one["scan"].ranks, other["scan"].ranks)
    summary = one["scan"].summary(data.teams)
    assert {"median_rank", "rank_2.5%", "rank_97.5%"} <= set(summary.columns)


# --------------------------------------------------------------------------- tests and correlations


def test_pairwise_wilcoxon_and_holm_match_scipy(rng):
    values = rng.normal(0.5, 0.2, (3, 12)) + np.array([[0.3], [0.1], [0.0]])
    values[2, 4] = np.nan  # a team without a value on one scan: pairs use the rest
    pw = st.pairwise_tests(values, higher_is_better=True, metric="FS")
    raw = np.full((3, 3), np.nan)
    for i in range(3):
        for j in range(3):
            if i != j:
                d = values[i] - values[j]
                raw[i, j] = r_wilcox_greater(d[np.isfinite(d)], correct=True)
    np.testing.assert_allclose(pw.p, raw, equal_nan=True)
    mask = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(pw.p_holm[mask], multipletests(raw[mask], method="holm")[1])
    assert pw.n[0, 2] == 11
    # errors: lower is better, so i better than j is errors_j - errors_i > 0
    err = st.pairwise_tests(values, higher_is_better=False)
    assert err.p[0, 1] == pytest.approx(r_wilcox_greater(values[1] - values[0], correct=True))
    plain = st.pairwise_tests(values, higher_is_better=True, correction=False)
    assert plain.p[0, 1] == pytest.approx(r_wilcox_greater(values[0] - values[1], correct=False))


def test_holm_matches_statsmodels(rng):
    for m in (1, 2, 5, 30):
        p = rng.uniform(0, 0.2, m) ** 2
        p[rng.random(m) < 0.2] = p[0]  # ties
        np.testing.assert_allclose(st.holm(p), multipletests(p, method="holm")[1])
    p = np.array([[np.nan, 0.01], [0.04, np.nan]])
    np.testing.assert_allclose(st.holm(p), [[np.nan, 0.02], [0.04, np.nan]])


def r_wilcox_greater(x: np.ndarray, correct: bool) -> float:
    """R's wilcox.test(x, alternative = "greater", exact = FALSE, correct = correct), written
    out from R's source (stats:::wilcox.test.default) with plain loops: zeros dropped,
    average ranks of |x|, tie-corrected variance, 0.5 continuity correction."""
    x = [float(v) for v in x if v != 0]
    n = len(x)
    order = sorted(range(n), key=lambda i: abs(x[i]))
    ranks = [0.0] * n
    i = 0
    ties = []
    while i < n:
        j = i
        while j + 1 < n and abs(x[order[j + 1]]) == abs(x[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # average of ranks i+1 .. j+1
        ties.append(j - i + 1)
        i = j + 1
    v = sum(r for r, value in zip(ranks, x, strict=True) if value > 0)
    z = v - n * (n + 1) / 4
    sigma = math.sqrt(n * (n + 1) * (2 * n + 1) / 24 - sum(t**3 - t for t in ties) / 48)
    z = (z - (0.5 if correct else 0.0)) / sigma
    return 0.5 * math.erfc(z / math.sqrt(2))  # upper tail of the standard normal


def test_r_reference_on_rs_own_example():
    # wilcox.test's help page: depression scores before and after (paired), one-sided
    x = np.array([1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30])
    y = np.array([0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29])
    # V = 40, n = 9: z = (40 - 22.5 - 0.5) / sqrt(71.25) with the correction, (40 - 22.5) / ... without
    assert r_wilcox_greater(x - y, True) == pytest.approx(
        0.5 * math.erfc(17 / math.sqrt(71.25) / math.sqrt(2))
    )
    assert r_wilcox_greater(x - y, False) == pytest.approx(
        0.5 * math.erfc(17.5 / math.sqrt(71.25) / math.sqrt(2))
    )
    got = st.wilcoxon_greater((x - y)[None], correction=True)[0]
    assert got == pytest.approx(r_wilcox_greater(x - y, True), rel=1e-12)


@pytest.mark.parametrize("correct", [True, False])
def test_wilcoxon_matches_r_normal_approximation_with_ties_and_zeros(rng, correct):
    rows = []
    for n in (3, 5, 13, 30, 60, 120):
        for kind in range(5):
            x = rng.normal(0.2, 1.0, n)
            if kind == 1:
                x[rng.random(n) < 0.3] = np.nan  # pairs missing: the rest are used
            if kind == 2:
                x[:2] = 0.0  # zero differences: R drops them
            if kind == 3:
                x = np.round(x, 1)  # ties
            if kind == 4:
                x = np.round(x, 0)  # ties and zeros together
            rows.append(np.pad(x, (0, 120 - n), constant_values=np.nan))
    d = np.array(rows)
    got = st.wilcoxon_greater(d, correction=correct)
    for i, row in enumerate(d):
        f = row[np.isfinite(row)]
        # no non-zero difference: R's (0 - 0.5) / 0 = -Inf gives p = 1, 0 / 0 gives NaN
        want = r_wilcox_greater(f, correct) if (f != 0).any() else (1.0 if correct else np.nan)
        assert got[i] == pytest.approx(want, rel=1e-10, abs=1e-15, nan_ok=True), i
    # the correction matters most for small samples, and always raises p for 'greater'
    other = st.wilcoxon_greater(d, correction=not correct)
    assert ((got > other) if correct else (got < other))[np.isfinite(got) & (got < 1)].all()
    zero = st.wilcoxon_greater(np.zeros((1, 5)), correct)[0]
    assert zero == 1.0 if correct else np.isnan(zero)
    assert np.isnan(st.wilcoxon_greater(np.full((1, 5), np.nan), correct)[0])


# Made with R 4.2.2 (Debian r-base-core), Rscript:
#   a <- c(0.91, 0.85, 0.97, 0.88, 0.93, 0.79, 0.95, 0.90)
#   b <- c(0.80, 0.86, 0.70, 0.81, 0.77, 0.79, 0.83, 0.72); c <- b
#   teams <- list(A = a, B = b, C = c)
#   for (correct in c(TRUE, FALSE)) {
#     p <- c()
#     for (i in names(teams)) for (j in names(teams)) if (i != j)
#       p[paste(i, j)] <- suppressWarnings(wilcox.test(teams[[i]], teams[[j]], paired = TRUE,
#         alternative = "greater", exact = FALSE, correct = correct)$p.value)
#     print(p, digits = 17); print(p.adjust(p, method = "holm"), digits = 17)
#   }
R_TEAMS = {
    "A": [0.91, 0.85, 0.97, 0.88, 0.93, 0.79, 0.95, 0.90],
    "B": [0.80, 0.86, 0.70, 0.81, 0.77, 0.79, 0.83, 0.72],
}
R_TEAMS["C"] = R_TEAMS["B"]
# ordered pairs A B, A C, B A, B C, C A, C B: (raw p, Holm-adjusted p)
R_P = {
    True: (
        [0.017305278757853673, 0.017305278757853673, 0.988752864388775188, 1.0, 0.988752864388775188, 1.0],
        [0.10383167254712201, 0.10383167254712201, 1.0, 1.0, 1.0, 1.0],
    ),
    False: (
        [
            0.013995907742832882,
            0.013995907742832882,
            0.986004092257167009,
            np.nan,
            0.986004092257167009,
            np.nan,
        ],
        [0.055983630971331529, 0.055983630971331529, 1.0, np.nan, 1.0, np.nan],
    ),
}


@pytest.mark.parametrize("correct", [True, False])
def test_identical_teams_match_rs_wilcox_test_and_holm(correct):
    """B and C are identical (every difference 0): R gives p = 1 with the continuity
    correction and NaN without it, and p.adjust leaves the NaN out of the Holm family (4
    tests, not 6), so A's adjusted p is 4 x its raw p there, not 6 x."""
    values = np.array(list(R_TEAMS.values()))
    result = st.pairwise_tests(values, higher_is_better=True, correction=correct)
    i, j = np.where(~np.eye(3, dtype=bool))  # A B, A C, B A, B C, C A, C B
    raw, adjusted = R_P[correct]
    np.testing.assert_allclose(result.p[i, j], raw, rtol=1e-12)
    np.testing.assert_allclose(result.p_holm[i, j], adjusted, rtol=1e-12)
    assert not result.significant(0.05)[1, 2]


def test_subject_level_tests_use_subject_means():
    subjects = ["050", "050", "051", "051", "052", "052", "053", "053", "054", "054", "055", "055"]
    a = table({"all": np.linspace(1, 2, 12)}, subjects=subjects)
    b = table({"all": np.linspace(1.5, 3.5, 12)}, subjects=subjects)
    data = combined({"A": a, "B": b})
    s = rk.scan_scores(data, "minmax")
    results = {(r.level, r.metric): r for r in st.all_pairwise(data, s)}
    means, labels = st.subject_means(data.errors[:, :, 0], data.subjects)
    assert list(labels) == sorted(set(subjects))
    np.testing.assert_allclose(means[0], np.linspace(1, 2, 12).reshape(6, 2).mean(axis=1))
    want = r_wilcox_greater(means[1] - means[0], correct=True)
    assert results[("subject", "GPE")].p[0, 1] == pytest.approx(want)
    assert results[("subject", "GPE")].n[0, 1] == 6


def test_length_correlation_matches_scipy(rng):
    n = 12
    subjects = [f"{50 + i // 3:03d}" for i in range(n)]
    length = rng.uniform(100, 400, n)
    errs = 0.1 * length + rng.normal(0, 5, n)
    a = table({"all": errs}, subjects=subjects, length=length)
    b = table({"all": errs * 2}, subjects=subjects, length=length, status=["ok"] * 11 + ["failed"])
    b.loc[11, ERR] = np.nan
    data = combined({"A": a, "B": b})
    corr = st.length_correlation(data).set_index(["team", "error", "level"])
    want = scipy.stats.pearsonr(length, errs)
    assert corr.loc[("A", "GPE", "scan"), "r"] == pytest.approx(want.statistic)
    assert corr.loc[("A", "GPE", "scan"), "p"] == pytest.approx(want.pvalue)
    assert corr.loc[("B", "LLE", "scan"), "n"] == 11
    sl = pd.Series(length).groupby(subjects).mean()
    se = pd.Series(errs).groupby(subjects).mean()
    want = scipy.stats.pearsonr(sl, se)
    assert corr.loc[("A", "GLE", "subject"), "r"] == pytest.approx(want.statistic)
    # B's subject means use only its scored scans (the last subject has 2 of 3)
    keep = np.arange(n) != 11
    sl_b = pd.Series(length[keep]).groupby(np.array(subjects)[keep]).mean()
    se_b = pd.Series(2 * errs[keep]).groupby(np.array(subjects)[keep]).mean()
    assert corr.loc[("B", "GPE", "subject"), "r"] == pytest.approx(scipy.stats.pearsonr(sl_b, se_b).statistic)


def test_pattern_breakdown_and_sampling_distribution():
    data = rk.combine_teams(synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, seed=3))
    s = rk.scan_scores(data, "minmax")
    r = rk.aggregate_then_rank(data, s)
    pat = st.pattern_breakdown(data, s)
    assert set(pat["factor"]) == {"shape", "orientation", "arm", "direction"}
    row = pat[(pat.factor == "shape") & (pat.level == "C") & (pat.team == "a") & (pat.metric == "GPE")].iloc[
        0
    ]
    mask = (data.scans["shape"] == "C").to_numpy()
    assert row["mean"] == pytest.approx(data.errors[0, mask, 0].mean()) and row["n"] == mask.sum()
    dist = st.sampling_distribution(data, s, r)
    fs = s.scores["FS"][0]
    assert dist.iloc[0]["se"] == pytest.approx(fs.std(ddof=1) / np.sqrt(len(fs)))
    assert dist["ci_2.5%"].isna().all()  # no bootstrap, no interval
    data25 = rk.combine_teams(synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, protocol="2025", seed=3))
    pat25 = st.pattern_breakdown(data25, rk.scan_scores(data25, "identity"))
    assert set(pat25["factor"]) == {"rotation"} and set(pat25["level"]) == {"LH", "RH"}


def test_rotation_scans_are_no_arm_of_the_sweeps():
    """Mixed protocols: the arm breakdown holds the 2024 sweeps only; the rotation scans
    get their own factor, by arm, and the protocol factor compares the two."""
    sweeps = synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, seed=3)
    rotations = synthetic_tables({"a": 0.2, "b": 0.5}, subjects=2, protocol="2025", seed=4)
    data = rk.combine_teams({k: pd.concat([sweeps[k], rotations[k]], ignore_index=True) for k in sweeps})
    s = rk.scan_scores(data, "minmax")
    pat = st.pattern_breakdown(data, s)
    assert st.factors_present(data) == ["shape", "orientation", "arm", "direction", "rotation", "protocol"]
    levels = {f: set(pat.loc[pat.factor == f, "level"]) for f in ("arm", "rotation")}
    assert levels == {"arm": {"LH", "RH"}, "rotation": {"LH", "RH"}}
    rows = pat[(pat.metric == "GPE") & (pat.team == "a")].set_index(["factor", "level"])
    sweep = (data.scans["protocol"] == "2024").to_numpy()
    lh = (data.scans["arm"] == "LH").to_numpy()
    assert rows.loc[("arm", "LH"), "n"] == (sweep & lh).sum()
    assert rows.loc[("arm", "LH"), "mean"] == pytest.approx(data.errors[0, sweep & lh, 0].mean())
    assert rows.loc[("rotation", "LH"), "n"] == (~sweep & lh).sum() == 2


def test_percentile_interval_stays_in_the_scores_range():
    """A team near min-max 0 on few scans: the normal interval mean - 1.96 se went below 0;
    the interval is the percentiles of the scan-level bootstrap's means, inside [0, 1]."""
    data = combined(
        {
            "good": table({"all": [1.0, 1.1, 0.9, 1.2, 1.0, 0.8]}),
            "poor": table({"all": [9.0, 9.5, 9.8, 9.0, 3.0, 9.9]}),
            "mid": table({"all": [5.0, 5.5, 4.0, 6.0, 5.0, 5.2]}),
        }
    )
    s = rk.scan_scores(data, "minmax")
    r = rk.aggregate_then_rank(data, s)
    boots = st.bootstrap(data, s, r, 500, seed=1)
    assert list(boots) == ["scan"]  # one subject: no subject-level bootstrap
    dist = st.sampling_distribution(data, s, r, boots["scan"]).set_index("team")
    poor = dist.loc["poor"]
    assert poor["mean"] - 1.959964 * poor["se"] < 0  # where the normal interval would go
    assert (dist["ci_2.5%"] >= 0).all() and (dist["ci_97.5%"] <= 1).all()
    # the percentiles of each resample's mean, resampled here explicitly from the weights
    rng = np.random.default_rng(np.random.SeedSequence(1).spawn(2)[0])
    idx = rng.integers(0, 6, size=(500, 6))
    t = data.teams.index("poor")
    means = s.scores["FS"][t][idx].mean(axis=1)
    assert poor["ci_2.5%"] == pytest.approx(np.quantile(means, 0.025))
    assert poor["ci_97.5%"] == pytest.approx(np.quantile(means, 0.975))

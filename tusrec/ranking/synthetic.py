"""Synthetic per-scan error tables of several teams, in the metrics.csv format of
``evaluate score``, for tests, benchmarks and demonstrations of the ranking report.

Errors are drawn, not computed from predictions: each team's error on a scan is the
identity prediction's error times the team's quality factor, times a subject effect and
per-scan noise (log-normal). Everything made here is SYNTHETIC and must be labelled so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tusrec.data import SCAN_NAMES_2024, SCAN_NAMES_2025
from tusrec.ranking.rank import ERRORS

NAMES_2024, NAMES_2025 = SCAN_NAMES_2024, SCAN_NAMES_2025


def synthetic_tables(
    qualities: dict[str, float] | int = 4,
    subjects: int = 32,
    protocol: str = "2024",
    failure_rate: float = 0.0,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """{team: metrics table} for teams whose mean error is ``quality`` x the identity's.

    qualities: {name: factor} (0 = perfect, 1 = as bad as predicting no motion), or a
    number of teams with factors spread from 0.1 to 0.9. subjects: count (numbered from
    100); protocol '2024' (24 scans a subject) or '2025' (2 rotation scans a subject);
    failure_rate: fraction of each team's scans marked failed at random.
    """
    if isinstance(qualities, int):
        qualities = {f"team {chr(65 + i)}": q for i, q in enumerate(np.linspace(0.1, 0.9, qualities))}
    rng = np.random.default_rng(seed)
    names = NAMES_2024 if protocol == "2024" else NAMES_2025
    rows = []
    for s in range(subjects):
        subject = f"{100 + s:03d}"
        for name in names:
            parts = name.split("_")
            pattern = (
                dict(zip(("arm", "orientation", "shape", "direction"), parts, strict=True))
                if protocol == "2024"
                else {"arm": parts[0], "orientation": "", "shape": "", "direction": ""}
            )
            length = float(rng.lognormal(np.log(250.0 if protocol == "2024" else 600.0), 0.3))
            rows.append(
                {
                    "key": f"sub{subject}__{name}",
                    "subject": subject,
                    "scan": name,
                    "protocol": protocol,
                    **pattern,
                    "frames": int(rng.integers(400, 600) if protocol == "2024" else rng.integers(1500, 1600)),
                    "scan_length_mm": length,
                    # the identity's errors grow with how far the probe travelled
                    "GPE_identity": 0.25 * length * rng.lognormal(0, 0.2),
                    "GLE_identity": 0.25 * length * rng.lognormal(0, 0.2),
                    "LPE_identity": 0.5 * rng.lognormal(0, 0.2),
                    "LLE_identity": 0.5 * rng.lognormal(0, 0.2),
                }
            )
    base = pd.DataFrame(rows)
    subject_effect = {s: rng.lognormal(0, 0.15) for s in base["subject"].unique()}
    effect = base["subject"].map(subject_effect).to_numpy()
    tables = {}
    for team, quality in qualities.items():
        table = base.copy()
        n = len(table)
        for e in ERRORS:
            noise = rng.lognormal(0, 0.25, n)
            table[e] = quality * table[f"{e}_identity"].to_numpy() * effect * noise
        failed = rng.random(n) < failure_rate
        table["status"] = np.where(failed, "failed", "ok")
        table.loc[failed, list(ERRORS)] = np.nan
        table["runtime_s"] = np.where(failed, np.nan, rng.normal(10.0 + 5 * quality, 1.0, n))
        table["message"] = np.where(failed, "synthetic failure", "")
        tables[team] = table
    return tables

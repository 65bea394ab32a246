"""What a model can reach when nothing tells it the sign of out-of-plane motion, on held-out SYNTHETIC scans.

    python -m research.observable [--data bench-data/accuracy] [--subjects 100,101]

Speckle decorrelation says how far the image plane moved out of itself, never in which
direction (`research.cues`). The name of a 2024 sweep gives its direction, and with it
the sign of the out-of-plane translation tz of a perpendicular sweep (the shipped members
use it). The name of a 2025 rotation scan (`LH_rotation`) says nothing about the sign of
its fan (a tilt about the image x axis: rx) or its turn (about the probe axis, image y:
ry), and both oscillate or turn either way at random. Without a sign, the best estimate
of a motion that is as likely +r as -r is 0: guessing a sign halves nothing, since a wrong
guess doubles the error that predicting 0 leaves.

So this scores *oracles* built from the true motion of every transition, with the parts
that neither the frames nor the name can sign removed:

* ``in-plane``: each true T(i->i-1) reduced to its in-plane part: the rotation about the
  image normal z closest to its rotation (angle atan2(R10 - R01, R00 + R11), the
  Procrustes projection onto rotations about z) and the translation (tx, ty, 0);
* ``in-plane + tz``: the same, keeping tz on every scan; rx = ry = 0;
* ``in-plane + named tz``: tz kept only where the name signs it, the perpendicular sweeps
  (the sweep *is* tz there; in the parallel sweeps tz is wobble of either sign, in the
  rotation scans part of the rotation about the contact point);
* ``truth``: the true transforms (a check of the scoring: errors 0, FS 1);

with the challenge's four errors, computed as ``make bench-accuracy`` computes them (the
evaluator's formulas), and FS under identity normalisation through the ranking code. An
oracle's FS is what a model reaches that gets every signable part of the motion exactly
right and sets the unsignable parts to 0. It is a reference, not a bound: zeroing a
rotation is the best guess for that rotation alone, but a model may do better on the
chained positions (GPE) by also predicting the mean motion that goes with the unsigned
part, e.g. the drift of the plane that a wobble leaves, and keeping a component exactly
while dropping the rotation it belongs to can be worse than dropping both (tz of the
parallel sweeps and the rotation scans). The mean absolute motion per component (tx, ty,
tz mm, rx, ry, rz degrees per transition) says which parts carry each kind of scan.

Uses ``make bench-accuracy``'s held-out data (simulated first if missing); writes
research/observable.json and research/observable.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.accuracy import ROOT, fs_table, scan_errors, score_tables, simulate

ORACLES = ("identity", "in-plane", "in-plane + tz", "in-plane + named tz", "truth")
SUBSETS = (("all scans", None), ("2024 sweeps", "2024"), ("2025 rotation scans", "2025"))


def in_plane(local: np.ndarray, keep_tz: bool = False) -> np.ndarray:
    """The in-plane part of rigid transforms (N, 4, 4) -> (N, 4, 4) float64: the rotation
    about z closest to each rotation (Frobenius norm) and the translation (tx, ty, 0), or
    (tx, ty, tz) with ``keep_tz``."""
    from tusrec.model.registration import in_plane_angle

    local = np.asarray(local, np.float64)
    angle = in_plane_angle(local)
    out = np.tile(np.eye(4), (len(local), 1, 1))
    out[:, 0, 0] = out[:, 1, 1] = np.cos(angle)
    out[:, 1, 0] = np.sin(angle)
    out[:, 0, 1] = -np.sin(angle)
    out[:, :2, 3] = local[:, :2, 3]
    if keep_tz:
        out[:, 2, 3] = local[:, 2, 3]
    return out


def name_signs_tz(pattern) -> bool:
    """Whether a scan's name gives the sign of its out-of-plane translation tz: a 2024
    perpendicular sweep, whose sweep is tz in the direction the name states
    (``tusrec.data.ScanPattern``)."""
    return pattern.protocol == "2024" and pattern.orientation == "Per"


def score_oracles(folder: str) -> tuple[list[dict], list[np.ndarray]]:
    """Every oracle's errors on every scan of one data folder (rows of model, key, ...), and
    per scan the true motion per transition (N-1, 6): tx, ty, tz (mm), rx, ry, rz (deg)."""
    from research.validation import dofs
    from tusrec.data import open_data
    from tusrec.geometry import frame_transforms
    from tusrec.scoring.score import scan_row

    data = open_data(folder)
    ts = data.calibration.T_scale
    rows, motion = [], []
    for scan in data.scans:
        true_global, true_local = frame_transforms(scan.read_tforms(), data.calibration)
        landmarks = scan.read_landmarks()
        preds = {
            "identity": np.tile(np.eye(4), (scan.n_frames - 1, 1, 1)),
            "in-plane": in_plane(true_local),
            "in-plane + tz": in_plane(true_local, keep_tz=True),
            "in-plane + named tz": in_plane(true_local, keep_tz=name_signs_tz(scan.pattern)),
            "truth": true_local,
        }
        ident: dict = {}
        for model, local in preds.items():
            err = scan_errors(local, true_global, true_local, ts, scan.image_size, landmarks)
            if model == "identity":
                ident = {f"{k}_identity": v for k, v in err.items()}
            rows.append({"model": model, **scan_row(scan), "status": "ok", **err, **ident, "runtime_s": 0.0})
        d = dofs(true_local)
        d[:, 3:] = np.rad2deg(d[:, 3:])
        motion.append({"protocol": scan.pattern.protocol, "dofs": d})
    return rows, motion


def markdown(summary: dict[str, pd.DataFrame], motion: dict[str, dict], meta: dict) -> str:
    lines = [
        f"SYNTHETIC data: simulated held-out subjects {', '.join(meta['subjects'])} "
        f"({meta['scans_2024']} sweeps of the 2024 protocol, {meta['scans_2025']} rotation scans "
        f"of 2025, {meta['frames']} frames each). Oracles from the true motion "
        "(research/observable.py). Errors in mm (mean over scans), FS/GS/LS under identity "
        "normalisation.",
        "",
    ]
    lines += score_tables(summary, "oracle")
    lines += [
        "**mean absolute motion per transition** (tx, ty, tz mm; rx, ry, rz degrees)",
        "",
        "| subset | transitions | tx | ty | tz | rx | ry | rz |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for subset, m in motion.items():
        v = m["mean_abs"]
        lines.append(
            f"| {subset} | {m['transitions']} | {v['tx']:.3f} | {v['ty']:.3f} | {v['tz']:.3f} "
            f"| {v['rx']:.3f} | {v['ry']:.3f} | {v['rz']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "bench-data" / "accuracy")
    p.add_argument("--subjects", default="100,101")
    p.add_argument("--frames", type=int, default=300, help="frames a scan when simulating (default 300)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "research" / "observable.json")
    args = p.parse_args(argv)
    subjects = [int(s) for s in args.subjects.split(",")]
    folders = [args.data / f"{protocol}-{s}" for s in subjects for protocol in ("2024", "2025")]
    if not all((f / "dataset_keys.h5").is_file() for f in folders):
        simulate(args.data, subjects, args.frames, args.workers)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(score_oracles, map(str, folders)))
    score_s = time.perf_counter() - t0
    table = pd.DataFrame([r for rows, _ in parts for r in rows])
    motions = [m for _, part in parts for m in part]
    tables = {
        m: g.drop(columns="model").reset_index(drop=True) for m, g in table.groupby("model", sort=False)
    }
    protocol = table.drop_duplicates("key").set_index("key")["protocol"]
    summary, motion = {}, {}
    for subset, keep in SUBSETS:
        part = {
            m: t[t["key"].map(protocol) == keep].reset_index(drop=True) if keep else t
            for m, t in tables.items()
        }
        summary[subset] = (
            fs_table({m: part[m] for m in ORACLES}).set_index("model").loc[list(ORACLES)].reset_index()
        )
        d = np.concatenate([m["dofs"] for m in motions if keep is None or m["protocol"] == keep])
        motion[subset] = {
            "transitions": len(d),
            "mean_abs": dict(
                zip(("tx", "ty", "tz", "rx", "ry", "rz"), np.abs(d).mean(0).round(4).tolist(), strict=True)
            ),
        }
    meta = {
        "subjects": [f"{s:03d}" for s in subjects],
        "frames": int(table.drop_duplicates("key")["frames"].median()),
        "scans_2024": int((protocol == "2024").sum()),
        "scans_2025": int((protocol == "2025").sum()),
        "score_s": score_s,
        "synthetic": True,
    }
    result = {"meta": meta, **{k: v.to_dict(orient="records") for k, v in summary.items()}, "motion": motion}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(summary, motion, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({score_s:.0f} s scoring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

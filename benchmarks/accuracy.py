"""``make bench-accuracy``: how accurate the shipped ensemble is, on held-out SYNTHETIC scans.

Simulates subjects the shipped members never saw (default 100 and 101: all 24 sweeps of
the 2024 protocol and both 2025 rotation scans, 300 frames each, SIFT landmarks), then
scores on every scan:

1. the identity prediction (no motion),
2. the frame-pair baseline (baseline/: PairNet, same data and budget),
3. each ensemble member alone,
4. the ensemble (projected-mean rotations, mean translations),

with the challenge's four errors (GPE, GLE, LPE, LLE, mm) and FS under identity
normalisation (docs/conventions.md section 4, the 2025 rule: X* = 1 - X / X_identity).
Members that condition on the scan name (ModelConfig.scan_conditioning) get its code,
as ./predict gives it.

Whether the ensemble's per-frame uncertainty means something: for every frame
transition, the members' disagreement (the RMS over members of the mean point distance
between a member's T(i->i-1) and the ensemble's, mm, on a grid of image points) against
the ensemble's error there (the mean point distance between its T(i->i-1) and the true
one, mm, the same grid): Spearman's rho (scipy.stats.spearmanr) over all transitions of
a subset, and the median of the per-scan rhos ("uncertainty" in the JSON and markdown).
The same for the ensemble's expected error as ./predict writes it (mm): with registration
and an error model fitted for these members (tusrec.model.error_model, from the
registration residual), the model's; else, when the members have error heads
(tusrec.train.error_head), the mean of the heads; with both means
("uncertainty_expected_error"). And for the frames' positions, the errors GPE averages:
per frame, the members' disagreement about T(i->0) against the ensemble's error there,
beside the frame's place in the scan (drift grows with it) and the disagreement's
partial rho with the place held fixed ("uncertainty_global").

GPE/LPE come from the transforms with the evaluator's own exact formula
(metrics.transform_pixel_error in float32, equal to scoring the dense float32 DDFs;
tested), GLE/LLE with
metrics.landmark_errors, and FS with the ranking code (rank.scan_scores): the same
numbers `./predict` + `./evaluate score` + `./evaluate rank` give, without writing 30 GB of
DDFs. Per-model metrics.csv tables are kept, so `./evaluate rank --team ...` can read them.

Writes benchmarks/accuracy.json and benchmarks/accuracy.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from tusrec.data import write_csv
from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES

ROOT = Path(__file__).resolve().parent.parent
GRID_STEP = 8  # pixels between the image points of the per-frame errors


def image_points(image_size: tuple[int, int], T_scale: np.ndarray, step: int = GRID_STEP) -> np.ndarray:
    """Homogeneous image-mm points (4, P) of the 1-based pixel grid 1, 1+step, ... of an
    (H, W) image: x = sx * column, y = sy * row, z = 0."""
    h, w = image_size
    ys, xs = np.meshgrid(np.arange(1, h + 1, step), np.arange(1, w + 1, step), indexing="ij")
    px = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size), np.ones(xs.size)]).astype(np.float64)
    return np.asarray(T_scale, np.float64) @ px


def frame_point_errors(
    pred: np.ndarray,
    true: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    step: int = GRID_STEP,
) -> np.ndarray:
    """Per transform, the mean distance (mm) between where pred and true put the image
    points (image_points): (N, 4, 4), (N, 4, 4) -> (N,). With step 1 their mean over N
    is transform_pixel_error's (the LPE/GPE formula)."""
    pts = image_points(image_size, T_scale, step)
    diff = (np.asarray(pred, np.float64) - np.asarray(true, np.float64))[:, :3] @ pts  # (N, 3, P)
    return np.sqrt((diff**2).sum(1)).mean(-1)


def member_disagreement(
    locals_: list[np.ndarray], combined: np.ndarray, T_scale: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Per transition, the RMS over members of frame_point_errors(member, combined): (N,) mm."""
    d = np.stack([frame_point_errors(m, combined, T_scale, image_size) for m in locals_])
    return np.sqrt((d**2).mean(0))


def uncertainty_rho(frames: list[dict], key: str = "disagreement", unit: str = "transitions") -> dict:
    """Spearman's rho between a per-transition uncertainty and the error: pooled over all
    transitions of ``frames`` (one dict per scan: the ``key`` array, e.g. 'disagreement'
    or 'expected_error', and 'error') and the median of the per-scan rhos. ``unit`` names
    the count ('frames' for the positions)."""
    from scipy.stats import spearmanr

    d = np.concatenate([f[key] for f in frames])
    e = np.concatenate([f["error"] for f in frames])
    per_scan = [float(spearmanr(f[key], f["error"]).statistic) for f in frames]
    return {
        "spearman_rho": float(spearmanr(d, e).statistic),
        "per_scan_rho_median": float(np.nanmedian(per_scan)),
        unit: len(d),
    }


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman's rho of x and y with z held fixed (x, y, z: (n,)): the Pearson correlation
    of the ranks' residuals after a least-squares line on z's ranks. Whether an uncertainty
    ranks the error beyond what a third quantity (the frame's place in the scan) already
    does."""
    from scipy.stats import rankdata

    rx, ry, rz = (rankdata(v) for v in (x, y, z))
    design = np.stack([np.ones_like(rz), rz], 1)
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    # Ranks that are z's own (a disagreement that rises frame by frame with the place)
    # leave only rounding behind: no rho to speak of, not a random number.
    if min(np.abs(e).max() for e in res) < 1e-9 * len(rz):
        return float("nan")
    return float(np.corrcoef(res[0], res[1])[0, 1])


def global_uncertainty_rho(frames: list[dict]) -> dict:
    """The same for the frames' positions (GP): per frame i = 1..N-1, the members'
    disagreement about T(i->0) against the ensemble's error there ('global_disagreement',
    'global_error', (N-1,) mm, one dict per scan). Drift grows along a scan, so anything
    that grows with i ranks this error too: beside the disagreement, the frame's place i
    as an uncertainty of its own, and the disagreement's rho with i held fixed."""
    place = [np.arange(1, len(f["global_error"]) + 1) for f in frames]
    given = [
        partial_spearman(f["global_disagreement"], f["global_error"], i)
        for f, i in zip(frames, place, strict=True)
    ]
    pooled = (
        np.concatenate([f["global_disagreement"] for f in frames]),
        np.concatenate([f["global_error"] for f in frames]),
        np.concatenate(place),
    )
    return {
        "disagreement": uncertainty_rho(
            [{"u": f["global_disagreement"], "error": f["global_error"]} for f in frames], "u", "frames"
        ),
        # scans where the place alone gives the ranks (their partial rho is undefined)
        "scans_disagreement_rises_every_frame": sum(
            bool(np.all(np.diff(f["global_disagreement"]) > 0)) for f in frames
        ),
        "scans_error_rises_every_frame": sum(bool(np.all(np.diff(f["global_error"]) > 0)) for f in frames),
        "frame_index": uncertainty_rho(
            [{"u": i, "error": f["global_error"]} for f, i in zip(frames, place, strict=True)], "u", "frames"
        ),
        "disagreement_given_frame_index": {
            "spearman_rho": partial_spearman(*pooled),
            "per_scan_rho_median": float(np.nanmedian(given)) if not np.isnan(given).all() else None,
            "frames": len(pooled[0]),
        },
    }


def scan_errors(
    local: np.ndarray,
    true_global: np.ndarray,
    true_local: np.ndarray,
    T_scale: np.ndarray,
    image_size: tuple[int, int],
    landmarks: np.ndarray,
) -> dict[str, float]:
    """The four errors (mm) of a rigid prediction given as its local transforms (N-1, 4, 4),
    against the true T(i->0) and T(i->i-1) (N-1, 4, 4), as `./evaluate score` computes them
    from the dense float32 file; landmarks (K, 3) rows (frame, x, y)."""
    from tusrec.ddf import landmark_ddfs
    from tusrec.geometry import compose_local
    from tusrec.scoring.metrics import landmark_errors, transform_pixel_error

    glob = compose_local(local)
    return {
        "GPE": transform_pixel_error(glob, true_global, T_scale, image_size, 32, np.float32),
        "GLE": landmark_errors(
            landmark_ddfs(glob, T_scale, landmarks), true_global, T_scale, landmarks
        ).error,
        "LPE": transform_pixel_error(local, true_local, T_scale, image_size, 32, np.float32),
        "LLE": landmark_errors(
            landmark_ddfs(local, T_scale, landmarks), true_local, T_scale, landmarks
        ).error,
    }


def simulate(
    data: Path, subjects: list[int], frames: int, workers: int, protocols: tuple[str, ...] = ("2024", "2025")
) -> None:
    """Held-out validation data, one child process per subject and protocol (SIFT included),
    in DATA/<protocol>-<subject>."""
    jobs = []
    for s in subjects:
        for protocol in protocols:
            out = str(data / f"{protocol}-{s}")
            args = ["--subjects", str(s), "--protocol", protocol, "--frames", str(frames), "--layout", "val"]
            jobs.append([sys.executable, "-m", "tusrec", "simulate", out, *args])
    running: list[subprocess.Popen] = []
    for job in jobs:
        while len(running) >= workers:
            running.pop(0).wait()
        running.append(subprocess.Popen(job, stdout=subprocess.DEVNULL))
    for p in running:
        if p.wait():
            raise SystemExit(f"simulation failed: {p.args}")


def score_models(
    folder: str, weights: str, baseline: str, in_plane: str = "network"
) -> tuple[list[dict], list[dict]]:
    """Every model's errors on every scan of one data folder: rows of (model, key, ...);
    and per scan the ensemble's per-transition disagreement and error (mm).

    ``in_plane``: as ``./predict --in-plane``. With registration the ensemble and each
    member alone (as ./predict would run it) get their in-plane motion from registration
    started from their own estimate; the frame-pair baseline stays the organisers' style
    (network only). The disagreement stays the members' networks' (what ./predict writes)."""
    import torch

    from tusrec.data import open_data
    from tusrec.geometry import compose_local, frame_transforms
    from tusrec.model.ensemble import (
        combine,
        decorrelation_steps,
        load_members,
        members_outputs,
        read_scan_input,
    )
    from tusrec.model.error_model import load_error_model
    from tusrec.model.inputs import scan_code
    from tusrec.model.registration import (
        keeps_sweep_tx,
        pair_decorrelation,
        register_in_plane,
        square_frames,
        with_in_plane,
    )
    from tusrec.scoring.score import scan_row

    torch.set_num_threads(1)
    members = load_members(weights)
    # The ensemble's expected error as ./predict writes it: from the error model when it
    # registers with one fitted for these members, else the members' error heads.
    error_model = load_error_model(weights)
    if error_model is not None and not error_model.serves([m.info for m in members], in_plane):
        error_model = None
    pair = load_members(baseline)
    # The baseline is "pair" in the tables whatever its member is called.
    pair_labels = [("pair" if len(pair) == 1 else f"pair-{m.name}", m) for m in pair]
    data = open_data(folder)
    ts = data.calibration.T_scale
    rows, frames = [], []
    for scan in data.scans:
        true_global, true_local = frame_transforms(scan.read_tforms(), data.calibration)
        landmarks = scan.read_landmarks()
        t0 = time.perf_counter()
        m = decorrelation_steps(members + pair)
        inputs = read_scan_input(scan, members[0].cfg.input_size, tuple(range(1, m + 1))).network_input(m)
        read_s = time.perf_counter() - t0
        preds: dict[str, tuple[np.ndarray, float]] = {}
        expected = {}  # label -> the model's expected errors (error head), (N-1,) mm or None
        identity = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
        preds["identity"] = (identity, 0.0)
        for label, m in pair_labels + [(m.name, m) for m in members]:
            t0 = time.perf_counter()
            out = members_outputs([m], inputs, "cpu", None, False, scan_code(scan.name))[0]
            preds[label] = (out.local, time.perf_counter() - t0)
            expected[label] = out.expected_error_mm
        t0 = time.perf_counter()
        member_locals = [preds[m.name][0] for m in members]  # the networks' own, before any registration
        combined = combine(member_locals, expected_errors=[expected[m.name] for m in members])
        network_mean = combined.local
        preds["ensemble"] = (network_mean, sum(preds[m.name][1] for m in members) + time.perf_counter() - t0)
        expected_error = combined.expected_error_mm
        if in_plane != "network":
            # Read again rather than with the networks' input (as ./predict does, through
            # read_scan_input's ``also``): read_s is every model's runtime, the baseline's too,
            # which does not register.
            square = square_frames((block for _, block in scan.iter_frames()), data.calibration)
            for label in [m.name for m in members] + ["ensemble"]:
                t0 = time.perf_counter()
                fitted, _ = register_in_plane(square, preds[label][0])
                if label == "ensemble" and error_model is not None:
                    residual = pair_decorrelation(square, fitted)
                    expected_error = error_model.expected_error_mm(residual, scan.name)
                seconds = preds[label][1] + time.perf_counter() - t0
                local = with_in_plane(preds[label][0], fitted, keeps_sweep_tx(in_plane, scan.name))
                preds[label] = (local, seconds)
        ensemble = preds["ensemble"][0]
        ensemble_global = compose_local(ensemble)
        frames.append(
            {
                "key": scan.key,
                "protocol": scan.pattern.protocol,
                "disagreement": member_disagreement(member_locals, network_mean, ts, scan.image_size),
                "error": frame_point_errors(ensemble, true_local, ts, scan.image_size),
                "expected_error": expected_error,
                "global_disagreement": member_disagreement(
                    [compose_local(local) for local in member_locals],
                    compose_local(network_mean),
                    ts,
                    scan.image_size,
                ),
                "global_error": frame_point_errors(ensemble_global, true_global, ts, scan.image_size),
            }
        )
        base = {**scan_row(scan), "status": "ok", "read_s": read_s}
        ident = {}
        for model, (local, seconds) in preds.items():
            err = scan_errors(local, true_global, true_local, ts, scan.image_size, landmarks)
            if model == "identity":
                ident = {f"{k}_identity": v for k, v in err.items()}
            # runtime_s as the ranking reads it: reading + network (0 for the identity).
            runtime = read_s + seconds if model != "identity" else 0.0
            rows.append({"model": model, **base, **err, **ident, "network_s": seconds, "runtime_s": runtime})
    return rows, frames


def fs_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean errors and identity-normalised scores per model, through the ranking code."""
    from tusrec.ranking.rank import combine_teams, scan_scores

    data = combine_teams(tables)
    scores = scan_scores(data, "identity")
    rows = []
    for t, team in enumerate(data.teams):
        row = {"model": team, "scans": int(data.scored[t].sum())}
        for i, e in enumerate(("GPE", "GLE", "LPE", "LLE")):
            row[e] = float(np.nanmean(data.errors[t, :, i]))
        for name in ("FS", "GS", "LS"):
            row[name] = float(np.nanmean(scores.scores[name][t]))
        rows.append(row)
    return pd.DataFrame(rows)


def score_tables(summary: dict[str, pd.DataFrame], label: str = "model") -> list[str]:
    """Markdown lines: per subset a table of fs_table's rows (errors mm, FS/GS/LS)."""
    lines = []
    for subset, table in summary.items():
        lines += [
            f"**{subset}**",
            "",
            f"| {label} | GPE | GLE | LPE | LLE | FS | GS | LS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, r in table.iterrows():
            lines.append(
                f"| {r['model']} | {r['GPE']:.2f} | {r['GLE']:.2f} | {r['LPE']:.3f} | {r['LLE']:.3f} "
                f"| {r['FS']:.3f} | {r['GS']:.3f} | {r['LS']:.3f} |"
            )
        lines.append("")
    return lines


def markdown(
    summary: dict[str, pd.DataFrame],
    meta: dict,
    uncertainty: dict | None = None,
    expected_error: dict | None = None,
    global_uncertainty: dict | None = None,
) -> str:
    lines = [
        "SYNTHETIC data: simulated held-out subjects "
        f"{', '.join(meta['subjects'])} ({meta['scans_2024']} sweeps of the 2024 protocol and "
        f"{meta['scans_2025']} rotation scans of 2025, {meta['frames']} frames each). "
        "Errors in mm (mean over scans), FS/GS/LS under identity normalisation (higher is better).",
        "",
    ]
    if meta.get("in_plane", "network") != "network":
        lines += [
            f"In-plane motion (tx, ty, rz) of the ensemble and of each member: {meta['in_plane']} "
            "(`./predict --in-plane`); the frame-pair baseline: its network's.",
            "",
        ]
    lines += score_tables(summary)
    if uncertainty:
        lines += [
            "**uncertainty** (the ensemble's per-transition member disagreement against its error, "
            "both mm on image points; Spearman's rho)",
            "",
            "| subset | transitions | rho, all transitions | median rho per scan |",
            "|---|---|---|---|",
        ]
        for subset, u in uncertainty.items():
            lines.append(
                f"| {subset} | {u['transitions']} | {u['spearman_rho']:.3f} "
                f"| {u['per_scan_rho_median']:.3f} |"
            )
        lines.append("")
    if expected_error:
        lines += [
            "**expected error** (./predict's expected_error_mm: with registration, the ensemble's error "
            "model from the registration residual, weights/error_model.json, when fitted for these "
            "members and this in-plane source; else the mean of the members' error heads; mm, "
            "against the ensemble's error per transition; Spearman's rho)",
            "",
            "| subset | transitions | rho, all transitions | median rho per scan "
            "| mean expected (mm) | mean error (mm) |",
            "|---|---|---|---|---|---|",
        ]
        for subset, u in expected_error.items():
            lines.append(
                f"| {subset} | {u['transitions']} | {u['spearman_rho']:.3f} "
                f"| {u['per_scan_rho_median']:.3f} | {u['mean_expected_mm']:.3f} | {u['mean_error_mm']:.3f} |"
            )
        lines.append("")
    if global_uncertainty:
        lines += [
            "**uncertainty of the frames' positions** (per frame, the members' disagreement about "
            "T(i->0) against the ensemble's error there, both mm on image points; Spearman's rho. "
            "Drift grows along a scan, so the frame's place i is given as an uncertainty of its own, "
            "and the disagreement's partial rho with i held fixed)",
            "",
            "| subset | frames | disagreement: rho, all / median per scan "
            "| frame's place: rho, all / median per scan | disagreement, place held fixed: all / median "
            "| scans whose disagreement / error rises at every frame |",
            "|---|---|---|---|---|---|",
        ]
        for subset, u in global_uncertainty.items():
            d, i, g = u["disagreement"], u["frame_index"], u["disagreement_given_frame_index"]
            median = "n/a" if g["per_scan_rho_median"] is None else f"{g['per_scan_rho_median']:.3f}"
            lines.append(
                f"| {subset} | {d['frames']} | {d['spearman_rho']:.3f} / {d['per_scan_rho_median']:.3f} "
                f"| {i['spearman_rho']:.3f} / {i['per_scan_rho_median']:.3f} "
                f"| {g['spearman_rho']:.3f} / {median} | {u['scans_disagreement_rises_every_frame']} "
                f"/ {u['scans_error_rises_every_frame']} |"
            )
        lines.append("")
    return "\n".join(lines)


ORDER = ("identity", "pair", "ensemble")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "bench-data" / "accuracy")
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--baseline", type=Path, default=ROOT / "baseline")
    p.add_argument("--subjects", default="100,101")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--in-plane",
        choices=IN_PLANE_SOURCES,
        default=DEFAULT_IN_PLANE,
        help=f"as ./predict --in-plane (default {DEFAULT_IN_PLANE}, the predictor's)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "accuracy.json")
    args = p.parse_args(argv)
    subjects = [int(s) for s in args.subjects.split(",")]

    t0 = time.perf_counter()
    folders = [args.data / f"{protocol}-{s}" for s in subjects for protocol in ("2024", "2025")]
    if not all((f / "dataset_keys.h5").is_file() for f in folders):
        simulate(args.data, subjects, args.frames, args.workers)
    simulate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(
            pool.map(
                score_models,
                map(str, folders),
                [str(args.weights)] * len(folders),
                [str(args.baseline)] * len(folders),
                [args.in_plane] * len(folders),
            )
        )
        rows = [r for part, _ in parts for r in part]
        frames = [f for _, part in parts for f in part]
    score_s = time.perf_counter() - t0
    table = pd.DataFrame(rows)
    tables = {
        m: g.drop(columns="model").reset_index(drop=True) for m, g in table.groupby("model", sort=False)
    }
    for model, t in tables.items():
        out = args.data / "scores" / model
        out.mkdir(parents=True, exist_ok=True)
        write_csv(t, out / "metrics.csv")
    order = [m for m in ORDER[:2] if m in tables] + sorted(m for m in tables if m not in ORDER) + ["ensemble"]
    protocol = table.drop_duplicates("key").set_index("key")["protocol"]
    summary, uncertainty, expected_error, global_uncertainty = {}, {}, {}, {}
    for subset, keep in (("all scans", None), ("2024 sweeps", "2024"), ("2025 rotation scans", "2025")):
        part = {
            m: t[t["key"].map(protocol) == keep].reset_index(drop=True) if keep else t
            for m, t in tables.items()
        }
        summary[subset] = fs_table({m: part[m] for m in order}).set_index("model").loc[order].reset_index()
        subset_frames = [f for f in frames if keep is None or f["protocol"] == keep]
        uncertainty[subset] = uncertainty_rho(subset_frames)
        global_uncertainty[subset] = global_uncertainty_rho(subset_frames)
        if all(f["expected_error"] is not None for f in subset_frames):
            expected_error[subset] = {
                **uncertainty_rho(subset_frames, "expected_error"),
                "mean_expected_mm": float(
                    np.concatenate([f["expected_error"] for f in subset_frames]).mean()
                ),
                "mean_error_mm": float(np.concatenate([f["error"] for f in subset_frames]).mean()),
            }
    meta = {
        "subjects": [f"{s:03d}" for s in subjects],
        "frames": args.frames,
        "scans_2024": int((protocol == "2024").sum()),
        "scans_2025": int((protocol == "2025").sum()),
        "simulate_s": simulate_s,
        "score_s": score_s,
        "network_s_per_scan": table.groupby("model")["network_s"].mean().to_dict(),
        "in_plane": args.in_plane,
        "synthetic": True,
    }
    result = {
        "meta": meta,
        **{k: v.to_dict(orient="records") for k, v in summary.items()},
        "uncertainty": uncertainty,
        **({"uncertainty_expected_error": expected_error} if expected_error else {}),
        "uncertainty_global": global_uncertainty,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(summary, meta, uncertainty, expected_error, global_uncertainty)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(
        f"wrote {args.out} and {args.out.with_suffix('.md')} "
        f"({simulate_s:.0f} s simulating, {score_s:.0f} s scoring)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

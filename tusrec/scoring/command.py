"""``./evaluate check``, ``./evaluate score`` and ``tusrec reference`` (the reference methods'
predictions, written to be checked and scored): their options and what they run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tusrec.data import TusrecDataError
from tusrec.options import add_cluster_flag, add_format, add_keys_and_chunk, on_cluster


def add_check(check) -> None:
    check.description = (
        "Check that every scan has a prediction file with the right datasets, "
        "shapes and dtype, finite values, no .h5 file for an unknown scan, and a consistent "
        "manifest. Lists every problem, file by file; exit status 1 if there is any. Other "
        "files (notes, logs, folders) are ignored, each named in a warning."
    )
    check.add_argument("predictions", type=Path, help="predictions folder (<key>.h5 + predictions.csv)")
    check.add_argument("--data", type=Path, required=True, help="the data folder the predictions are for")
    check.add_argument("--no-values", action="store_true", help="skip the NaN/Inf pass over the arrays")
    check.set_defaults(run=run_evaluate_check)


def add_score(score) -> None:
    score.description = (
        "Score every scan of DATA (which needs ground truth: transfs/ or the "
        "training layout). Writes metrics.csv (errors, identity errors, pattern, scan "
        "length, status) and the organisers' metrics.h5 into --out. A scan that failed, "
        "timed out or cannot be scored keeps its row with a status and no numbers."
    )
    score.add_argument("predictions", type=Path, help="predictions folder")
    score.add_argument("--data", type=Path, required=True, help="data folder with ground truth")
    score.add_argument("--out", type=Path, required=True, help="folder for metrics.csv and metrics.h5")
    add_keys_and_chunk(score)
    add_cluster_flag(score)
    score.set_defaults(run=run_evaluate_score)


def _start_scoring_worker() -> None:
    """The bounded scoring worker's server imports numpy, h5py, pandas and the scoring
    code (1-2 s): started before this process imports the same, both run at once."""
    from tusrec.scoring import worker

    worker.SERVER.start()


def run_evaluate_check(args) -> int:
    _start_scoring_worker()
    from tusrec.data import open_data
    from tusrec.scoring import check_predictions, stray_entries

    data = open_data(args.data)
    problems = check_predictions(args.predictions, data, values=not args.no_values)
    for line in stray_entries(args.predictions):
        print(f"warning: {line}", file=sys.stderr)
    for problem in problems:
        print(problem)
    if problems:
        keys = {p.key for p in problems}
        print(f"{len(problems)} problem(s) in {len(keys)} scan(s) or folder-level", file=sys.stderr)
        return 1
    print(f"{args.predictions}: predictions for all {len(data.scans)} scans are valid")
    return 0


def run_evaluate_score(args) -> int:
    if args.cluster is None:
        _start_scoring_worker()
    from tusrec.data import open_data
    from tusrec.scoring import score_predictions, summary

    data = open_data(args.data)
    if args.cluster is None:
        table = score_predictions(args.predictions, data, args.out, args.chunk, args.keys)
    else:
        table = on_cluster(
            args.cluster,
            lambda client: score_predictions(
                args.predictions, data, args.out, args.chunk, args.keys, client=client
            ),
        )
    print(summary(table))
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'metrics.h5'}")
    return nothing_scored(table, Path(args.predictions), args.data)


def nothing_scored(table, predictions: Path, data_root: Path) -> int:
    """0 if any scan was scored; else each scan's status and message and the likely cause
    on stderr, and 1: a run that scored nothing is an error, not a table of blanks."""
    from tusrec.scoring import MISSING, OK

    statuses = list(table["status"]) if len(table) else []
    if OK in statuses or not statuses:
        return 0
    for key, status, message in zip(table["key"], table["status"], table["message"], strict=True):
        print(f"{key}: {status}: {message}", file=sys.stderr)
    if all(s == MISSING for s in statuses):
        names = sorted(p.name for p in predictions.glob("*.h5")) if predictions.is_dir() else []
        if not predictions.is_dir():
            cause = f"{predictions} is not a folder"
        elif not names:
            cause = f"{predictions} holds no <key>.h5 file (is it the --output of ./predict?)"
        else:
            cause = (
                f"{predictions} holds {len(names)} .h5 file(s) for other scans (e.g. {names[0]}): were "
                f"they predicted from another data folder than {data_root}?"
            )
    else:
        cause = "the files cannot be scored: each scan's message above says why (./evaluate check: all)"
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    print(f"error: none of the {len(statuses)} scans was scored ({counts}): {cause}", file=sys.stderr)
    return 1


def add_reference(p) -> None:
    p.description = (
        "Write a predictions folder (<key>.h5 + predictions.csv) of a reference "
        "method: 'ground-truth' computes each scan's true GP/GL/LP/LL from its tforms and the "
        "calibration (docs/conventions.md section 2; scoring it gives 0), 'identity' predicts no motion "
        "(all-zero DDFs; the 2025 normalisation's reference, and needs no ground truth). "
        "Streamed in frame chunks; complete files are kept on a rerun."
    )
    p.add_argument(
        "kind",
        choices=["ground-truth", "identity"],
        help="ground-truth: the true motion from each scan's tforms; identity: no motion",
    )
    p.add_argument("data", type=Path, help="TUS-REC data folder (ground-truth needs its tforms)")
    p.add_argument("--out", type=Path, required=True, help="predictions folder to write")
    add_format(p)
    add_keys_and_chunk(p)
    p.set_defaults(run=run_reference)


def run_reference(args) -> int:
    """Exit 0; 1 when some scans could not be read (the others are written, each failed one
    is a row of predictions.csv saying why, as ./predict does); 2 for a usage error."""
    import numpy as np
    from tqdm import tqdm

    from tusrec.data import open_data, write_manifest
    from tusrec.ddf import GroundTruth, write_predictions

    data = open_data(args.data)
    scans = data.select(args.keys)
    if not scans:
        raise TusrecDataError(f"{args.data}: no scans found")
    if args.kind == "ground-truth":
        why = "no ground-truth transforms to write (they are the transfs/ folder of the validation layout)"
        data.require_ground_truth(scans, why)
    calib = data.calibration
    total_bytes = 0
    rows = []
    failed = []
    for scan in tqdm(scans, desc=args.kind, unit="scan", disable=None):
        path = args.out / f"{scan.key}.h5"
        t0 = time.perf_counter()
        if not path.exists():
            try:
                if args.kind == "ground-truth":
                    gt = GroundTruth.from_scan(scan, calib)
                    glob, local = gt.global_, gt.local
                else:
                    glob = local = np.tile(np.eye(4), (scan.n_frames - 1, 1, 1))
                landmarks = scan.read_landmarks() if scan.has_landmarks else None
            except (ValueError, OSError) as err:  # the scan's own files (TusrecDataError, h5py's)
                message = " ".join(str(err).split()) or type(err).__name__
                print(f"{scan.key}: failed: {message}", file=sys.stderr)
                failed.append(scan.key)
                row = {"key": scan.key, "status": "failed", "seconds": time.perf_counter() - t0}
                rows.append({**row, "device": "cpu", "message": message})
                continue
            attrs = {"model": args.kind, "runtime_seconds": time.perf_counter() - t0}
            write_predictions(
                path,
                glob,
                local,
                calib,
                scan.image_size,
                landmarks,
                attrs,
                chunk=args.chunk,
                form=args.format,
            )
        total_bytes += path.stat().st_size
        message = "" if scan.has_landmarks else "no landmarks: GL/LL not written"
        rows.append(
            {
                "key": scan.key,
                "frames": scan.n_frames,
                "status": "ok",
                "seconds": time.perf_counter() - t0,
                "device": "cpu",
                "message": message,
            }
        )
    write_manifest(args.out, rows)
    done = len(scans) - len(failed)
    print(f"{args.kind}: {done} scans, {total_bytes / 1e9:.2f} GB in {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)} ({len(failed)} of {len(scans)} scans)", file=sys.stderr)
        return 1
    return 0

"""``./landmarks``: SIFT landmarks of a data folder's scans (tusrec.landmarks), the landmarks
room's command (a module beside ``tusrec/landmarks.py``, which is a module, not a package)."""

from __future__ import annotations

import sys
from pathlib import Path

from tusrec.data import TusrecDataError
from tusrec.options import add_cluster_flag, add_keys, on_cluster, positive_int


def add_landmarks(p) -> None:
    p.description = (
        "For each scan, the K SIFT keypoints with the highest response over "
        "frames 1..N-1 inside the field of view, written as landmark_<sub>.h5 (one (K,3) "
        "dataset per scan: 0-based frame index, 1-based x, y). Scans that already have "
        "landmarks are skipped unless --overwrite."
    )
    p.add_argument("data", type=Path, help="TUS-REC data folder (either layout)")
    p.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help="landmarks per scan (default: 20 for 2024 scans, 100 for 2025 scans)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the landmark files (default: the data folder's landmark(s)/)",
    )
    add_keys(p)
    p.add_argument("--overwrite", action="store_true", help="redo scans that already have landmarks")
    add_cluster_flag(p)
    p.set_defaults(run=run_landmarks)


def run_landmarks(args) -> int:
    """Exit 0, or 1 when some scans got no landmarks (the others are written, as ./predict
    does with a scan it cannot predict)."""
    from tusrec.data import open_data
    from tusrec.landmarks import LandmarksError, write_data_landmarks

    data = open_data(args.data)
    if not data.scans:
        raise TusrecDataError(f"{args.data}: no scans found")
    scans = data.select(args.keys)  # an unknown key: one line before anything is done
    failed: dict[str, str] = {}
    try:
        if args.cluster is None:
            made = write_data_landmarks(
                data, k=args.k, out_dir=args.out, overwrite=args.overwrite, keys=args.keys
            )
        else:
            made = on_cluster(
                args.cluster,
                lambda client: write_data_landmarks(
                    data, k=args.k, out_dir=args.out, overwrite=args.overwrite, keys=args.keys, client=client
                ),
            )
    except LandmarksError as err:
        made, failed = err.made, err.failed
    skipped = len(scans) - len(made) - len(failed)
    where = args.out or (data.root / data.landmark_path("000").parent.name)
    print(f"landmarks: {len(made)} scans extracted, {skipped} already done, in {where}")
    if failed:
        for key, reason in failed.items():
            print(f"{key}: no landmarks: {reason}", file=sys.stderr)
        print(f"failed: {', '.join(failed)} ({len(failed)} of {len(scans)} scans)", file=sys.stderr)
        return 1
    return 0

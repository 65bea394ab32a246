"""``./predict`` (the submission image's entrypoint): its options and what it runs.

Holds only what the submission image holds: the predictor's package, the floor and the
shared options (the Dockerfile's submission stage copies them)."""

from __future__ import annotations

import sys
from pathlib import Path

from tusrec.options import add_format


def add_predict(p) -> None:
    p.description = (
        "Read a folder of scans in the validation/test layout (either edition) "
        "and write a predictions folder (<key>.h5 + predictions.csv) with the ensemble in "
        "--weights, within --time-limit seconds a scan: members that would not finish are "
        "skipped, and if none can, the identity motion is written and the manifest says so. "
        "Complete predictions of an earlier run are kept; partial files are redone."
    )
    p.add_argument("--input", type=Path, default=Path("/input"), help="data folder (default /input)")
    p.add_argument(
        "--output", type=Path, default=Path("/output"), help="predictions folder (default /output)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="ensemble folder (default: the shipped weights/)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per scan (default 120)")
    p.add_argument(
        "--translation", choices=["mean", "median"], default="mean", help="combine translations by"
    )
    p.add_argument("--keys", nargs="+", default=None, help="only these scan keys")
    p.add_argument(
        "--members", nargs="+", default=None, help="only these members of the weights manifest (default all)"
    )
    from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES

    p.add_argument(
        "--in-plane",
        choices=IN_PLANE_SOURCES,
        default=DEFAULT_IN_PLANE,
        help="where the in-plane motion (tx, ty, rz) comes from: the members' estimate, or "
        "registration of each frame onto the one before, started from it "
        f"(default {DEFAULT_IN_PLANE})",
    )
    add_format(p)
    p.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from tusrec.model.ensemble import WeightsError
    from tusrec.predict import DEFAULT_WEIGHTS, predict_folder

    try:
        rows = predict_folder(
            args.input,
            args.output,
            args.weights or DEFAULT_WEIGHTS,
            args.device,
            args.time_limit,
            args.keys,
            args.translation,
            members=args.members,
            form=args.format,
            in_plane=args.in_plane,
        )
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r["key"] for r in rows if r["status"] != "ok"]
    print(f"predict: {len(rows) - len(failed)} of {len(rows)} scans predicted into {args.output}")
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.output / 'predictions.csv'})", file=sys.stderr)
        return 1
    return 0

"""``./predict`` (the submission image's entrypoint): its options and what it runs.

Holds only what the submission image holds: the predictor's package, the floor and the
shared options (the Dockerfile's submission stage copies them)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tusrec.options import add_format, add_keys


def add_predict(p) -> None:
    p.description = (
        "Read a folder of scans in the validation/test layout (either edition) "
        "and write a predictions folder (<key>.h5 + predictions.csv) with the ensemble in "
        "--weights, or your own model (--model), within --time-limit seconds a scan: members "
        "that would not finish are skipped, and if none can, the identity motion is written "
        "and the manifest says so; a model that raises, returns something wrong or hangs costs "
        "its scan only. Complete predictions of an earlier run of the same model are kept; "
        "partial files are redone."
    )
    p.add_argument(
        "--input",
        type=Path,
        default=Path("/input"),
        help="data folder in the validation/test layout, either edition (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("/output"),
        help="predictions folder, created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help="your model instead of the shipped ensemble: path/to/file.py:NAME or module:NAME, NAME a "
        "function predict_ddfs(frames, landmark, data_path_calib, device) (the organisers' template), "
        "a function transforms(frames, device) -> (N-1, 4, 4), or a class with load(self, device) and "
        "one of them (docs/participants/your-model.md)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="ensemble folder, manifest.json and its members (default: $TUSREC_WEIGHTS, else the "
        "shipped weights/)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ... (default: %(default)s)",
    )
    p.add_argument(
        "--time-limit",
        type=positive_seconds,
        default=120.0,
        help="seconds a scan may take; 'inf' for no limit (default: %(default)s)",
    )
    p.add_argument(
        "--translation",
        choices=["mean", "median"],
        default=None,
        help="how the members' translations are combined: their mean or their median (default: mean)",
    )
    add_keys(p)
    p.add_argument(
        "--members",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these members of the weights manifest (default: all)",
    )
    from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES

    p.add_argument(
        "--in-plane",
        choices=IN_PLANE_SOURCES,
        default=None,
        help="where the in-plane motion (tx, ty, rz) comes from: the members' estimate, or "
        "registration of each frame onto the one before, started from it "
        f"(default: {DEFAULT_IN_PLANE})",
    )
    add_format(p)
    p.set_defaults(run=run_predict)


def positive_seconds(text: str) -> float:
    """argparse type of --time-limit: a positive number of seconds ('inf': no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


ENSEMBLE_OPTIONS = ("weights", "members", "translation", "in_plane")


def run_predict(args) -> int:
    """./predict; Ctrl-C ends it with one line and exit status 130 (files are complete or
    temporary, and a rerun keeps the complete ones)."""
    try:
        return _run_predict(args)
    except KeyboardInterrupt:
        print(
            f"predict: interrupted; the complete files in {args.output} are kept, a rerun finishes the rest",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # The model's call and the ensemble's member threads cannot be interrupted, and the
        # interpreter would wait for them at exit: end now (nothing is open for writing: an
        # interrupted file is removed as its writer unwinds, the manifest is written whole).
        os._exit(130)


def _run_predict(args) -> int:
    from tusrec.model.ensemble import WeightsError
    from tusrec.model.registration import DEFAULT_IN_PLANE
    from tusrec.predict import DEFAULT_WEIGHTS, ModelSpecError, load_model, predict_folder
    from tusrec.predict.core import check_device

    try:
        check_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = None
    if args.model is not None:
        given = [f"--{o.replace('_', '-')}" for o in ENSEMBLE_OPTIONS if getattr(args, o) is not None]
        if given:
            print(
                f"error: {', '.join(given)}: options of the shipped ensemble, not of --model {args.model}",
                file=sys.stderr,
            )
            return 2
        try:
            model = load_model(args.model, args.format)
        except ModelSpecError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if model.form != args.format:
            print(
                f"predict: {args.model} returns dense DDFs (the template kind): its files are written in "
                f"the dense form, not --format {args.format}"
            )
    try:
        rows = predict_folder(
            args.input,
            args.output,
            args.weights or DEFAULT_WEIGHTS,
            args.device,
            args.time_limit,
            args.keys,
            args.translation or "mean",
            members=args.members,
            form=args.format,
            in_plane=args.in_plane or DEFAULT_IN_PLANE,
            model=model,
        )
    except (WeightsError, ModelSpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r["key"] for r in rows if r["status"] != "ok"]
    print(f"predict: {len(rows) - len(failed)} of {len(rows)} scans predicted into {args.output}")
    code = 0
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.output / 'predictions.csv'})", file=sys.stderr)
        code = 1
    if any(r["status"] == "timeout" for r in rows):
        # A call given up on is still running, and may have started threads of its own that
        # the interpreter would wait for at exit (for ever, if it hangs): end now, the files
        # and the manifest are written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

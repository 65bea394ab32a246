"""``tusrec simulate``: synthetic scans written as a TUS-REC data folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tusrec.data import EVAL, TRAIN
from tusrec.options import add_cluster_flag, non_negative_int, on_cluster, positive_int

MAX_SUBJECT = 999  # subject folders are three digits
MAX_IMAGE_SIDE = 4096  # 8.5 times the real 480x640 frames; a frame chunk stays in memory


def _subjects(text: str) -> list[int]:
    """'50,51' -> [50, 51]; '50-52' -> [50, 51, 52] (argparse type of --subjects)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            low, high = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected subject numbers 0-{MAX_SUBJECT} as N, N,M or MIN-MAX"
            ) from None
        if not 0 <= low <= high <= MAX_SUBJECT:
            raise argparse.ArgumentTypeError(
                f"{text!r}: subjects are 0-{MAX_SUBJECT} and a range is MIN-MAX with MIN <= MAX"
            )
        out.extend(range(low, high + 1))
    return out


def _image_size(text: str) -> tuple[int, int]:
    """'480x640' -> (480, 640) (argparse type of --image-size)."""
    h, _, w = text.lower().partition("x")
    try:
        size = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW in pixels, e.g. 480x640") from None
    if not (min(size) >= 1 and max(size) <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"{text!r}: each side 1 to {MAX_IMAGE_SIDE} pixels")
    return size


def _frames(text: str) -> str:
    """--frames, checked as FrameCount parses it (the string is what simulate_dataset takes)."""
    from tusrec.simulate.dataset import FrameCount

    try:
        FrameCount.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected N or MIN-MAX frames a scan, at least 2 (a scan is frame pairs)"
        ) from None
    return text


def add_simulate(p) -> None:
    p.description = (
        "Simulate freehand forearm sweeps (2024 protocol) or rotation scans "
        "(2025 protocol) and write them as a TUS-REC data folder, with calib_matrix.csv, "
        "SIFT landmark files and (val/test layout) dataset_keys.h5. Synthetic data: "
        "label any result on it as synthetic."
    )
    p.add_argument("out", type=Path, help="data folder to write (created; complete scans are kept)")
    p.add_argument(
        "--subjects",
        type=_subjects,
        default="50",
        help=f"subject numbers (0-{MAX_SUBJECT}), e.g. 50,51 or 0-9: each subject is an anatomy of "
        "its own (default: %(default)s)",
    )
    p.add_argument(
        "--protocol",
        choices=["2024", "2025"],
        default="2024",
        help="2024: the 24 freehand sweeps a subject (20 landmarks a scan); 2025: the two "
        "rotation scans (100 landmarks) (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        choices=["train", "val", "test"],
        default="val",
        help="train: frames_transfs/ (frames and tforms in one file); val: frames/ + transfs/; test: "
        "frames/ only, the ground truth withheld as at test time (it can be predicted, not scored) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--frames",
        type=_frames,
        default="300",
        help="frames per scan: N, or MIN-MAX for a length drawn per scan; at least 2 (default: %(default)s)",
    )
    p.add_argument(
        "--scans",
        default=None,
        help="comma-separated scan names (of either protocol: one command, one anatomy set-up "
        "per subject, for a folder of both), or a number n for the first n of --protocol "
        "(default: all 24 of 2024, both of 2025)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the anatomy, trajectories and speckle (0 or more): the same seed, subject and "
        "scan give the same file (default: %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        default="480x640",
        help="frame size in pixels, HxW; landmarks need at least about 48x64 (default: %(default)s)",
    )
    p.add_argument("--no-landmarks", action="store_true", help="skip SIFT landmark extraction")
    p.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help="landmarks per scan (default: 20 for 2024 scans, 100 for 2025 scans)",
    )
    add_cluster_flag(p)
    p.set_defaults(run=run_simulate)


def _scan_names(text: str, protocol: str) -> list[str]:
    """The scans --scans names: a count n (the first n of the protocol) or names."""
    from tusrec.simulate import scan_names

    all_names = scan_names(protocol)
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= len(all_names):
            raise ValueError(f"--scans {text}: the {protocol} protocol has 1 to {len(all_names)} scans")
        return all_names[:n]
    names = [name.strip() for name in text.split(",")]
    unknown = sorted(set(names) - set(scan_names("2024")) - set(scan_names("2025")))
    if unknown:
        raise ValueError(f"--scans: unknown scan names: {unknown} (neither protocol has them)")
    return names


def run_simulate(args) -> int:
    from tusrec.landmarks import LandmarksError
    from tusrec.simulate.dataset import simulate_dataset

    names = None
    if args.scans:
        try:
            names = _scan_names(args.scans, args.protocol)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    simulate = simulate_dataset
    if args.cluster is not None:

        def simulate(*a, **kw):
            return on_cluster(args.cluster, lambda client: simulate_dataset(*a, **kw, client=client))

    failed = {}
    try:
        keys = simulate(
            args.out,
            args.subjects,
            protocol=args.protocol,
            layout=TRAIN if args.layout == "train" else EVAL,
            frames=args.frames,
            names=names,
            seed=args.seed,
            image_size=args.image_size,
            landmarks=not args.no_landmarks,
            k=args.k,
            ground_truth=args.layout != "test",
        )
    except LandmarksError as err:  # the scans are written; some have no landmarks
        keys, failed = err.keys, err.failed
    print(
        f"wrote {len(keys)} synthetic scans ({args.protocol} protocol, {args.layout} layout) "
        f"to {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    if failed:
        for key, reason in failed.items():
            print(f"{key}: no landmarks: {reason}", file=sys.stderr)
        print(f"landmarks failed for {len(failed)} of {len(keys)} scans (see above)", file=sys.stderr)
        return 1
    return 0

"""``tusrec simulate``: synthetic scans written as a TUS-REC data folder."""

from __future__ import annotations

import time
from pathlib import Path

from tusrec.data import EVAL, TRAIN
from tusrec.options import add_cluster_flag, on_cluster


def _subjects(text: str) -> list[int]:
    """'50,51' -> [50, 51]; '50-52' -> [50, 51, 52]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _image_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def add_simulate(p) -> None:
    p.description = (
        "Simulate freehand forearm sweeps (2024 protocol) or rotation scans "
        "(2025 protocol) and write them as a TUS-REC data folder, with calib_matrix.csv, "
        "SIFT landmark files and (val/test layout) dataset_keys.h5. Synthetic data: "
        "label any result on it as synthetic."
    )
    p.add_argument("out", type=Path, help="data folder to write (created; complete scans are kept)")
    p.add_argument("--subjects", type=_subjects, default=[50], help="e.g. 50,51 or 0-9 (default 50)")
    p.add_argument("--protocol", choices=["2024", "2025"], default="2024")
    p.add_argument(
        "--layout",
        choices=["train", "val", "test"],
        default="val",
        help="train: frames_transfs/; val or test: frames/ + transfs/ (default val)",
    )
    p.add_argument("--frames", default="300", help="frames per scan: N or MIN-MAX (default 300)")
    p.add_argument(
        "--scans",
        default=None,
        help="comma-separated scan names (of either protocol: one command, one anatomy set-up "
        "per subject, for a folder of both), or a number n for the first n of --protocol "
        "(default: all 24 of 2024, both of 2025)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=_image_size, default=(480, 640), help="HxW (default 480x640)")
    p.add_argument("--no-landmarks", action="store_true", help="skip SIFT landmark extraction")
    p.add_argument("--k", type=int, default=None, help="landmarks per scan (default 20; 100 for 2025)")
    add_cluster_flag(p)
    p.set_defaults(run=run_simulate)


def run_simulate(args) -> int:
    from tusrec.simulate import scan_names
    from tusrec.simulate.dataset import simulate_dataset

    names = None
    if args.scans:
        all_names = scan_names(args.protocol)
        if args.scans.isdigit():
            names = all_names[: int(args.scans)]
        else:
            names = args.scans.split(",")
            unknown = sorted(set(names) - set(scan_names("2024")) - set(scan_names("2025")))
            if unknown:
                raise SystemExit(f"unknown scan names: {unknown} (neither protocol has them)")
    t0 = time.perf_counter()
    simulate = simulate_dataset
    if args.cluster is not None:

        def simulate(*a, **kw):
            return on_cluster(args.cluster, lambda client: simulate_dataset(*a, **kw, client=client))

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
    )
    print(
        f"wrote {len(keys)} synthetic scans ({args.protocol} protocol, {args.layout} layout) "
        f"to {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0

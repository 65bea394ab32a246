"""``tusrec info``: list and validate the scans of a data folder (tusrec.data), the data
room's command (a module beside ``tusrec/data.py``)."""

from __future__ import annotations

from pathlib import Path

from tusrec.data import TusrecDataError


def add_info(p) -> None:
    p.description = (
        "List every scan of a TUS-REC data folder with its pattern, frame "
        "count, image size, ground truth and landmarks, validating each file (frames, "
        "tforms, landmarks, calibration). Exit status 1 if anything is invalid."
    )
    p.add_argument("data", type=Path, help="TUS-REC data folder (either layout)")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from tusrec.data import open_data

    data = open_data(args.data)
    calib = data.calibration
    sx, sy = calib.pixel_spacing_mm
    print(f"{data.root}: {data.layout} layout, {len(data.scans)} scans, pixel spacing {sx:.4f} x {sy:.4f} mm")
    problems = 0
    print(
        f"{'key':34} {'protocol':8} {'arm':3} {'orient':6} {'shape':5} {'dir':3} "
        f"{'frames':>6} {'HxW':>7} {'tforms':6} {'K':>4}"
    )
    for scan in data.scans:
        pat = scan.pattern
        try:
            n, h, w = scan.shape
            tforms = "yes" if scan.has_tforms else "-"
            if scan.has_tforms:
                scan.read_tforms()
            k = str(len(scan.read_landmarks())) if scan.has_landmarks else "-"
        except TusrecDataError as err:
            problems += 1
            print(f"{scan.key:34} INVALID: {err}")
            continue
        print(
            f"{scan.key:34} {pat.protocol:8} {pat.arm or '-':3} {pat.orientation or '-':6} "
            f"{pat.shape or '-':5} {pat.direction or '-':3} {n:6d} {f'{h}x{w}':>7} {tforms:6} {k:>4}"
        )
    return 1 if problems else 0

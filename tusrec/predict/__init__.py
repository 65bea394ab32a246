"""The submission predictor: a folder of scans -> a predictions folder, within the time limit.

``predict_folder`` is what ``./predict`` (the container's entrypoint) runs;
``predict_ddfs(frames, landmark, data_path_calib, device)`` is the organisers' template
interface. This package never imports tusrec.scoring, tusrec.ranking or tusrec.harness.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tusrec.data import (
    EVAL,
    TRANSFORMS_FORM,
    ScanPattern,
    TusrecDataError,
    open_data,
    write_data_calibration,
    write_landmarks,
    write_scan,
)
from tusrec.geometry import default_calibration, read_calibration
from tusrec.model.ensemble import load_members
from tusrec.model.error_model import load_error_model
from tusrec.model.manifest import DEFAULT_WEIGHTS
from tusrec.predict.core import (
    DEFAULT_IN_PLANE,
    DEFAULT_TIME_LIMIT_S,
    IN_PLANE_SOURCES,
    Predictor,
    check_writable,
    pick_device,
    prediction_complete,
    previous_rows,
    remove_partial_files,
    write_rows,
)

__all__ = [
    "DEFAULT_IN_PLANE",
    "DEFAULT_WEIGHTS",
    "IN_PLANE_SOURCES",
    "Predictor",
    "predict_ddfs",
    "predict_folder",
]


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    weights: str | Path = DEFAULT_WEIGHTS,
    device: str | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    keys: list[str] | None = None,
    translation: str = "mean",
    log=print,
    members: list[str] | None = None,
    form: str = TRANSFORMS_FORM,
    in_plane: str = DEFAULT_IN_PLANE,
) -> list[dict]:
    """Predict every scan of a validation/test folder into ``output_dir``.

    ``form``: 'transforms' (compact: the transforms and GL/LL, kilobytes a scan) or 'ddf'
    (dense GP/LP as well, the challenge's official form, gigabytes a scan). ``in_plane``:
    where the in-plane motion comes from, 'network' (the members' combined estimate) or
    'registration' (each frame registered onto the one before, started from it;
    tusrec.model.registration).

    Scans this same ensemble (weights, members, translation rule, form) already predicted
    completely are kept (a rerun finishes what is missing; another ensemble's are redone);
    temporary files of an interrupted run are removed, never trusted. One bad scan is
    recorded as failed in predictions.csv and the others go on. ``members``: only these
    members of the weights manifest (default all). Returns the manifest rows.
    """
    output = Path(output_dir)
    check_writable(output)
    data = open_data(input_dir)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{input_dir}: no scans found")
    calib = data.calibration
    predictor = Predictor(
        load_members(weights, pick_device(device), members),
        device,
        time_limit_s,
        translation,
        form=form,
        in_plane=in_plane,
        error_model=load_error_model(weights),
    )
    removed = remove_partial_files(output)
    if removed:
        log(f"removed {len(removed)} partial file(s) of an interrupted run")
    rows = previous_rows(output)
    kept = 0
    with tqdm(scans, desc="predict", unit="scan", disable=None) as bar:
        for scan in bar:
            path = output / f"{scan.key}.h5"
            if (
                prediction_complete(path, scan, form, predictor.fingerprint)
                and rows.get(scan.key, {}).get("status", "ok") == "ok"
            ):
                rows.setdefault(scan.key, {"key": scan.key, "frames": scan.n_frames, "status": "ok"})
                kept += 1
                continue
            row = predictor.predict_scan(scan, calib, path)
            rows[scan.key] = row
            write_rows(output, rows)  # after every scan, so an interruption loses nothing
            note = f" ({row['message']})" if row["message"] else ""
            bar.write(
                f"{scan.key}: {row['frames']} frames, {row['seconds']:.1f} s, {row['status']}, "
                f"{row.get('members', 0)}/{len(predictor.members)} members, {row['device']}{note}"
            )
    write_rows(output, rows)
    if kept:
        log(f"kept {kept} scan(s) this ensemble had already predicted in {output}")
    return [rows[s.key] for s in scans]


_PREDICTOR: Predictor | None = None


def predict_ddfs(frames, landmark, data_path_calib, device=None, scan_name=None):
    """The organisers' template interface: one scan in memory -> (GP, GL, LP, LL).

    frames: (N, H, W) uint8; landmark: (K, 3) rows (frame, x, y); data_path_calib: path
    of calib_matrix.csv; device: torch device or None (2024's template passes none);
    scan_name: optional, the scan's name (e.g. 'LH_Per_L_DtP'), which the template does
    not pass: the members conditioned on it (the shipped ones) then get the unknown code
    and give their image-only estimate. A name of neither protocol counts as unknown.
    Returns float32 numpy arrays GP (N-1, 3, H*W), GL (3, K), LP (N-1, 3, H*W), LL (3, K).
    The ensemble comes from TUSREC_WEIGHTS (default: the repository's weights/). Note the
    template's interface holds whole GP/LP arrays in memory: 5.9 GB each at 1,600 frames.
    """
    global _PREDICTOR
    import h5py

    if _PREDICTOR is None or (device is not None and _PREDICTOR.device != pick_device(str(device))):
        dev = None if device is None else str(device)
        _PREDICTOR = Predictor(
            load_members(DEFAULT_WEIGHTS, pick_device(dev)),
            dev,
            float("inf"),
            error_model=load_error_model(DEFAULT_WEIGHTS),
        )
    calib = read_calibration(data_path_calib) if data_path_calib else default_calibration()
    frames = np.asarray(frames)
    with tempfile.TemporaryDirectory() as tmp:
        # The predictor reads scans from disk in chunks; a one-scan folder keeps one code path.
        root = Path(tmp)
        n = len(frames)
        # Only a name of the data format becomes the scan's name (it names files and datasets).
        known = scan_name is not None and ScanPattern.from_name(str(scan_name)).protocol != "unknown"
        name = str(scan_name) if known else "scan"
        write_scan(root, EVAL, 0, name, frames, np.tile(np.eye(4), (n, 1, 1)))
        write_landmarks(root / "landmarks" / "landmark_000.h5", {name: np.asarray(landmark)})
        write_data_calibration(root, calib)
        scan = open_data(root).scans[0]
        out = root / "out.h5"
        row = _PREDICTOR.predict_scan(scan, calib, out)
        if row["status"] != "ok":
            raise RuntimeError(f"prediction failed: {row['message']}")
        with h5py.File(out, "r") as f:
            return tuple(f[k][()] for k in ("GP", "GL", "LP", "LL"))

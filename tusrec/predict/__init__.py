"""The submission predictor: a folder of scans -> a predictions folder, within the time limit.

``predict_folder`` is what ``./predict`` (the container's entrypoint) runs, with the
shipped ensemble or a team's model (``--model``, tusrec.predict.interface);
``predict_ddfs(frames, landmark, data_path_calib, device)`` is the organisers' template
interface of the shipped ensemble. This package never imports tusrec.scoring,
tusrec.ranking or tusrec.harness.
"""

from __future__ import annotations

import tempfile
from functools import partial
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
    RESERVE_MARGIN_S,
    Predictor,
    check_writable,
    pick_device,
    prediction_complete,
    previous_rows,
    remove_partial_files,
    run_scan,
    write_rows,
)
from tusrec.predict.interface import Model, ModelSpecError, ModelThread, load_model

__all__ = [
    "DEFAULT_IN_PLANE",
    "DEFAULT_WEIGHTS",
    "IN_PLANE_SOURCES",
    "Model",
    "ModelSpecError",
    "Predictor",
    "load_model",
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
    model: Model | None = None,
) -> list[dict]:
    """Predict every scan of a validation/test folder into ``output_dir``.

    ``model``: a team's model (tusrec.predict.interface.load_model, e.g. from
    ``--model``), in its own form; default the shipped ensemble of ``weights`` (its
    ``members``, ``translation`` rule and ``in_plane`` source) in ``form``: 'transforms'
    (compact: the transforms and GL/LL, kilobytes a scan) or 'ddf' (dense GP/LP as well,
    the challenge's official form, gigabytes a scan). ``in_plane``: where the ensemble's
    in-plane motion comes from, 'network' (the members' combined estimate) or
    'registration' (each frame registered onto the one before, started from it;
    tusrec.model.registration).

    The model is loaded once (Model.load), then each scan goes through
    tusrec.predict.core.run_scan (time limit, checks, one bad scan never stops the others).
    Scans this same model (same fingerprint: weights, members, translation rule, form; a
    team's file and SPEC) already predicted completely are kept (a rerun finishes what is
    missing; another model's are redone); temporary files of an interrupted run are
    removed, never trusted. Returns the manifest rows.
    """
    if not time_limit_s > 0:  # NaN too
        raise ValueError(f"time limit {time_limit_s!r} s: expected a positive number of seconds")
    output = Path(output_dir)
    check_writable(output)
    data = open_data(input_dir)
    scans = data.select(keys)
    if not scans:
        raise TusrecDataError(f"{input_dir}: no scans found")
    calib = data.calibration
    dev = pick_device(device)
    thread = ModelThread()
    if model is None:
        model = Predictor(
            load_members(weights, dev, members),
            device,
            time_limit_s,
            translation,
            form=form,
            in_plane=in_plane,
            error_model=load_error_model(weights),
        )
    thread.call(partial(model.load, dev))  # once per run, on the thread its scans run on
    if time_limit_s <= RESERVE_MARGIN_S:
        log(
            f"--time-limit {time_limit_s:g} s is shorter than the {RESERVE_MARGIN_S:g} s kept for "
            "writing each scan's predictions: the model has no time (the shipped ensemble then "
            "writes the identity motion, scored as no motion)"
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
                prediction_complete(path, scan, model.form, model.fingerprint)
                and rows.get(scan.key, {}).get("status", "ok") == "ok"
            ):
                rows.setdefault(scan.key, {"key": scan.key, "frames": scan.n_frames, "status": "ok"})
                kept += 1
                continue
            row = run_scan(model, scan, calib, path, time_limit_s, dev, thread, data.calibration_path)
            rows[scan.key] = row
            write_rows(output, rows)  # after every scan, so an interruption loses nothing
            note = f" ({row['message']})" if row["message"] else ""
            used = f"{row['members']}/{len(model.members)} members, " if "members" in row else ""
            bar.write(
                f"{scan.key}: {row['frames']} frames, {row['seconds']:.1f} s, {row['status']}, "
                f"{used}{row['device']}{note}"
            )
    write_rows(output, rows)
    if kept:
        log(f"kept {kept} scan(s) this model had already predicted in {output}")
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

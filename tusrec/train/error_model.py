"""Fitting the registered ensemble's error model (tusrec.model.error_model) on held-out
subjects: ``tusrec error-model``. Every scan is predicted as ./predict predicts it and
compared with its ground truth, the exact per-frame LPE (metrics.frame_pixel_errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tusrec.model.error_model import ERROR_MODEL, ErrorModel, ErrorModelError, fit


def held_out_rho(samples: list[tuple[str, str | None, np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """Leave one subject out: for each subject, the model fitted on the others, and the
    Spearman's rho of its expected error against the error over that subject's transitions
    (pooled, and the median over its scans). samples: (subject, name, decorrelation,
    error) per scan. Needs scipy (fitting side only)."""
    from scipy.stats import spearmanr

    result = {}
    for subject in sorted({s[0] for s in samples}):
        train = [s[1:] for s in samples if s[0] != subject]
        test = [s for s in samples if s[0] == subject]
        try:
            model = fit(train)
        except ValueError:  # too few transitions left to fit on
            continue
        expected = [model.expected_error_mm(d, name) for _, name, d, _ in test]
        per_scan = [spearmanr(x, s[3]).statistic for x, s in zip(expected, test, strict=True)]
        result[subject] = {
            "spearman_rho": float(
                spearmanr(np.concatenate(expected), np.concatenate([s[3] for s in test])).statistic
            ),
            "per_scan_rho_median": float(np.nanmedian(per_scan)),
            "scans": len(test),
        }
    return result


def fit_for_weights(
    weights_dir: str | Path,
    data_dirs: list[str | Path],
    subjects: list[str],
    in_plane: str | None = None,
    device: str | None = None,
    log=print,
) -> tuple[ErrorModel, dict]:
    """Fit the error model of the ensemble in ``weights_dir`` on the scans of ``subjects``
    in ``data_dirs`` (with ground truth; none of the members may have trained on them),
    each predicted as ./predict predicts it (tusrec.predict.Predictor, registration
    ``in_plane``, default the predictor's), and write it beside the members. Returns the
    model and a report: the held-out rho of each subject (held_out_rho)."""
    from tusrec.data import open_data
    from tusrec.geometry import frame_transforms
    from tusrec.model.ensemble import load_members
    from tusrec.model.inputs import scan_code
    from tusrec.model.registration import DEFAULT_IN_PLANE, IN_PLANE_SOURCES
    from tusrec.predict.core import Predictor
    from tusrec.scoring.metrics import frame_pixel_errors

    in_plane = in_plane or DEFAULT_IN_PLANE
    if in_plane not in IN_PLANE_SOURCES or in_plane == "network":
        raise ErrorModelError(f"in-plane source {in_plane!r}: the error model needs registration")
    members = load_members(weights_dir)
    subjects = [f"{int(s):03d}" if str(s).isdigit() else str(s) for s in subjects]
    for m in members:
        record = m.info.get("trained")
        trained = set(record.get("train_subjects", [])) if isinstance(record, dict) else set()
        if trained & set(subjects):
            raise ErrorModelError(
                f"member {m.name} trained on subject(s) {sorted(trained & set(subjects))}: fit the error "
                "model on held-out subjects (e.g. the validation subjects)"
            )
    predictor = Predictor(members, device, float("inf"), in_plane=in_plane)
    samples = []
    for folder in data_dirs:
        data = open_data(folder)
        calib = data.calibration
        for scan in data.scans:
            if scan.subject not in subjects:
                continue
            _, true_local = frame_transforms(scan.read_tforms(), calib)
            frames, square = predictor.read_inputs(scan, calib)
            pred = predictor.predict_local(frames, float("inf"), scan_code(scan.name))
            local, _, residual = predictor.register(scan, calib, pred.local, float("inf"), True, square)
            error = frame_pixel_errors(local, true_local, calib.T_scale, scan.image_size)
            samples.append((scan.subject, scan.name, residual, error))
            log(f"{scan.key}: {len(error)} transitions, mean error {error.mean():.3f} mm")
    if not samples:
        raise ErrorModelError(f"no scans of subject(s) {subjects} in {[str(d) for d in data_dirs]}")
    model = fit([s[1:] for s in samples])
    model.members = [{"name": m.name, "sha256": m.info["sha256"]} for m in members]
    model.subjects = sorted({s[0] for s in samples})
    model.in_plane = in_plane
    report = {"held_out": held_out_rho(samples), "scans": len(samples)}
    model.save(Path(weights_dir) / ERROR_MODEL)
    return model, report

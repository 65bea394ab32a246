"""Scoring of predictions: the metrics, the strict read policy, ``./evaluate check`` and
``./evaluate score``, and the bounded worker that judges one scan's file.

This package is the public API that the runner (``tusrec.harness``), the cluster
(``tusrec.cluster`` units) and the organisers' own template call: import from here, not
from the modules. It imports only the floor (``tusrec.data``, ``geometry``, ``ddf``),
never the model, the ranking analysis or the harness.
"""

from tusrec.scoring.metrics import (
    PredictionValueError,
    landmark_errors,
    metrics_for_scan,
    pixel_errors,
    transform_pixel_error,
)
from tusrec.scoring.policy import max_prediction_bytes
from tusrec.scoring.score import (
    DESCRIPTIVE,
    ERRORS,
    FAILED,
    INVALID,
    MISSING,
    OK,
    STATUSES,
    TIMEOUT,
    Problem,
    ScoreLimits,
    ScoringJob,
    ScoringPlan,
    check_predictions,
    check_structure,
    file_signature,
    plan_scoring,
    prediction_path,
    scan_row,
    score_file,
    score_predictions,
    stray_entries,
    summary,
    write_metrics,
)

__all__ = [
    "DESCRIPTIVE",
    "ERRORS",
    "FAILED",
    "INVALID",
    "MISSING",
    "OK",
    "STATUSES",
    "TIMEOUT",
    "PredictionValueError",
    "Problem",
    "ScoreLimits",
    "ScoringJob",
    "ScoringPlan",
    "check_predictions",
    "check_structure",
    "file_signature",
    "landmark_errors",
    "max_prediction_bytes",
    "metrics_for_scan",
    "pixel_errors",
    "plan_scoring",
    "prediction_path",
    "scan_row",
    "score_file",
    "score_predictions",
    "stray_entries",
    "summary",
    "transform_pixel_error",
    "write_metrics",
]

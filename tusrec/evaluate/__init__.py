"""The evaluation harness: metrics, validation and scoring of predictions (and, on top of
them, ranking). Never imports the model: evaluate stands apart from predict."""

from tusrec.evaluate.metrics import metrics_for_scan

__all__ = ["metrics_for_scan"]

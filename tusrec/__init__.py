"""tusrec: trackerless freehand 3D ultrasound reconstruction for the TUS-REC challenge.

One package for the submission (predict) and the evaluation harness (landmarks,
evaluate). ``geometry`` and ``data`` are the floor every other module stands on.
"""

__version__ = "0.1.0"

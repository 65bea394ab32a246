"""An example model for a TUS-REC submission: in-plane motion by phase correlation.

A starting point that works, not a good model. For each pair of consecutive frames it
finds the shift of the image content by OpenCV's phase correlation and turns it into a
rigid transform: an in-plane translation, no rotation, no out-of-plane motion (which is
most of a freehand sweep). It needs no weights and no GPU. Replace it with your own.

The kit's predictor calls it as `predict --model /opt/team/model.py:transforms` (the
image's entrypoint): once per scan, ``transforms(frames, device)``, and turns what it
returns into the official GP/GL/LP/LL (or the compact form), streamed in chunks, within
the time limit. Three kinds of model are accepted (the kit's docs,
participants/submission.md):

- a rigid function like this one, ``transforms(frames, device) -> (N-1, 4, 4)``;
- a class with ``load(self, device)`` (called once, e.g. to read ``WEIGHTS``) and
  ``transforms(self, frames)``;
- the organisers' template function ``predict_ddfs(frames, landmark, data_path_calib,
  device) -> (GP, GL, LP, LL)``, for existing code that already makes the dense fields.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Files your model loads (checkpoints): the Dockerfile copies weights/ here, beside this file.
WEIGHTS = Path(__file__).resolve().parent / "weights"

# Pixel size (mm) along x and y: the challenge data's calibration (T_scale of its
# calib_matrix.csv, the same for every scan). A model that reads each scan's calibration
# file uses the template kind, which is handed its path.
PIXEL_MM = (0.229389190673828, 0.220979690551758)


def transforms(frames: np.ndarray, device) -> np.ndarray:
    """Frame-to-previous-frame transforms of one scan.

    frames: uint8 (N, H, W), the scan's frames. device: the torch.device the predictor
    chose (unused here: OpenCV runs on the CPU).
    Returns float64 (N-1, 4, 4): row i maps frame i+1's image millimetres to frame i's
    (x right, y down, z out of the image plane; docs/conventions.md section 2).
    """
    n, h, w = frames.shape
    out = np.tile(np.eye(4), (max(n - 1, 0), 1, 1))
    # The window tapers the borders, so that the image edges (and the dark margin around
    # the ultrasound fan) do not pull the estimate towards no motion.
    window = cv2.createHanningWindow((w, h), cv2.CV_64F)
    previous = frames[0].astype(np.float64) if n else None
    for i in range(1, n):
        current = frames[i].astype(np.float64)
        # (dx, dy): how far the content moved from the previous frame to this one, pixels.
        (dx, dy), _ = cv2.phaseCorrelate(previous, current, window)
        # A point at pixel q of this frame showed at q - (dx, dy) in the previous one.
        out[i - 1, 0, 3] = -dx * PIXEL_MM[0]
        out[i - 1, 1, 3] = -dy * PIXEL_MM[1]
        previous = current
    return out

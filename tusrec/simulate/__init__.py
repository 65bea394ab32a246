"""Synthetic freehand ultrasound of the forearm, in the TUS-REC data conventions.

    from tusrec.simulate import simulate_scan, scan_names, SimulatedScan
    scan = simulate_scan(subject=0, name="LH_Par_C_DtP", n_frames=500)
    scan.tforms            # (N, 4, 4) float32 tracker tool -> camera
    for chunk in scan.frame_chunks(32):   # (n, 480, 640) uint8, rendered lazily
        ...

Modules: anatomy (per-subject forearm volume), speckle (3D speckle fields), imaging
(convex-probe B-mode rendering), trajectory (scan protocols), scan (the public API).
"""

from .scan import SimulatedScan, simulate_scan
from .trajectory import scan_names

__all__ = ["SimulatedScan", "scan_names", "simulate_scan"]

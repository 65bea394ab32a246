"""Seeing a prediction: trajectories and reconstructed volumes per scan (``./evaluate show``).

    poses     predictions file (dense or compact) -> frame poses, per-frame GPE/LPE, fit residual
    volume    frames + poses -> a voxel volume in the first frame's image mm, in bounded memory
    figures   the trajectory and reconstruction figures (matplotlib, no pyplot)
    command   scans chosen -> PNGs, show.csv, show.html; reused by ``./evaluate rank --predictions``

Conventions: docs/conventions.md section 6.
"""

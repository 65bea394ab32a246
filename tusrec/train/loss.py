"""Training loss: point distances in mm between predicted and true transforms.

For transforms P, Q (4, 4) and a point p in image mm, |(P - Q) p| is how far apart the
two put p: the quantity the challenge scores (a DDF difference). The loss averages it
over probe points of the original image (corners and a grid, sampler.loss_points),
per transition (LPE-like) and over the transforms chained from the clip's first frame
(drift, GPE-like).
"""

from __future__ import annotations

import torch

from tusrec.geometry import compose_local
from tusrec.train.config import LossConfig

_EPS = 1e-12  # keeps the norm's gradient finite at a perfect prediction


def point_distance(P: torch.Tensor, Q: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Mean distance (mm) of the points under P and Q.

    P, Q: (B, n, 4, 4); points: (B, P, 4) homogeneous image mm. Returns (B, n).
    """
    diff = (P - Q)[..., :3, :] @ points[:, None].transpose(-1, -2)  # (B, n, 3, P)
    return torch.sqrt((diff**2).sum(-2) + _EPS).mean(-1)


def clip_loss(
    pred: torch.Tensor, true: torch.Tensor, points: torch.Tensor, weights: LossConfig
) -> dict[str, torch.Tensor]:
    """pred, true: (B, T-1, 4, 4) local transforms T(i->i-1) in image mm; points (B, P, 4).

    Returns {"loss", "points", "drift"}, scalars in mm: points = mean point distance per
    transition; drift = mean point distance of the chained transforms T(i->0) of the clip;
    loss = weights.points * points + weights.drift * drift.
    """
    per_step = point_distance(pred, true, points).mean()
    drift = point_distance(compose_local(pred, axis=1), compose_local(true, axis=1), points).mean()
    return {"loss": weights.points * per_step + weights.drift * drift, "points": per_step, "drift": drift}

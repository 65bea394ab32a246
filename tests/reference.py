"""Independent reference computations for the tests: literal, slow, float64 loops
straight from the formulas of docs/conventions.md sections 2 and 3. Nothing here imports tusrec."""

import numpy as np


def brute_force_ddfs(tforms, calib, H, W, reference):
    """(N-1, 3, H*W) DDFs by per-pixel loops; reference(i) is frame a of T(i->a)."""
    tr, ts = calib.T_rotation, calib.T_scale
    t = np.asarray(tforms, dtype=np.float64)
    out = np.zeros((len(t) - 1, 3, H * W))
    for i in range(1, len(t)):
        a = reference(i)
        T = np.linalg.inv(tr) @ np.linalg.inv(t[a]) @ t[i] @ tr
        for y in range(1, H + 1):
            for x in range(1, W + 1):
                p = np.array([x, y, 0.0, 1.0])
                out[i - 1, :, (y - 1) * W + (x - 1)] = (T @ ts @ p)[:3] - (ts @ p)[:3]
    return out


def global_ddfs(tforms, calib, H, W):
    return brute_force_ddfs(tforms, calib, H, W, lambda i: 0)


def local_ddfs(tforms, calib, H, W):
    return brute_force_ddfs(tforms, calib, H, W, lambda i: i - 1)


def mean_point_error(true, pred):
    """Mean Euclidean distance over every point: arrays (..., 3, P), looped."""
    true = np.asarray(true, dtype=np.float64).reshape(-1, 3, np.shape(true)[-1])
    pred = np.asarray(pred, dtype=np.float64).reshape(true.shape)
    total, count = 0.0, 0
    for f in range(true.shape[0]):
        for k in range(true.shape[2]):
            total += np.sqrt(sum((true[f, c, k] - pred[f, c, k]) ** 2 for c in range(3)))
            count += 1
    return total / count

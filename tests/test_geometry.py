"""Geometry conventions, each checked against an independent computation (scipy, numpy
SVD, literal formulas of docs/conventions.md section 2)."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tusrec import geometry as g


def random_rigid(rng, n, trans_sd=100.0):
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = Rotation.random(n, random_state=rng.integers(1 << 31)).as_matrix()
    T[:, :3, 3] = rng.normal(0, trans_sd, (n, 3))
    return T


def test_pixel_grid_is_one_based_row_major():
    H, W = 3, 5
    grid = g.pixel_grid(H, W)
    assert grid.shape == (4, H * W)
    # Independent: a frame whose value encodes its own (column, row), flattened like numpy.
    rows, cols = np.mgrid[0:H, 0:W]
    np.testing.assert_array_equal(grid[0], (cols + 1).reshape(-1))
    np.testing.assert_array_equal(grid[1], (rows + 1).reshape(-1))
    np.testing.assert_array_equal(grid[2:], [[0] * (H * W), [1] * (H * W)])
    # The fixed points named in docs/conventions.md section 2: index 0 is (1,1), W-1 is (W,1), W is (1,2).
    assert tuple(grid[:2, 0]) == (1, 1)
    assert tuple(grid[:2, W - 1]) == (W, 1)
    assert tuple(grid[:2, W]) == (1, 2)
    assert tuple(grid[:2, -1]) == (W, H)


def test_corners():
    c = g.image_corners(480, 640)
    assert c[:2].T.tolist() == [[1, 1], [640, 1], [1, 480], [640, 480]]


def test_frame_transforms_match_literal_formula():
    rng = np.random.default_rng(1)
    calib = g.default_calibration()
    tforms = random_rigid(rng, 6).astype(np.float32)  # stored as float32 in the real data
    glob, loc = g.frame_transforms(tforms, calib)
    assert glob.shape == loc.shape == (5, 4, 4)
    tr = calib.T_rotation
    t = tforms.astype(np.float64)
    for i in range(1, 6):
        expected_g = np.linalg.inv(tr) @ np.linalg.inv(t[0]) @ t[i] @ tr
        expected_l = np.linalg.inv(tr) @ np.linalg.inv(t[i - 1]) @ t[i] @ tr
        np.testing.assert_allclose(glob[i - 1], expected_g, atol=1e-9)
        np.testing.assert_allclose(loc[i - 1], expected_l, atol=1e-9)


def test_compose_local_gives_global_and_back():
    rng = np.random.default_rng(2)
    glob, loc = g.frame_transforms(random_rigid(rng, 8), g.default_calibration())
    np.testing.assert_allclose(g.compose_local(loc), glob, atol=1e-9)
    np.testing.assert_allclose(g.local_from_global(glob), loc, atol=1e-9)
    # Also for torch tensors (the model chains its predictions this way).
    out = g.compose_local(torch.as_tensor(loc))
    np.testing.assert_allclose(out.numpy(), glob, atol=1e-9)


def test_pose6_is_rotation_vector_then_translation_mm():
    pose = np.array([0.0, 0.0, np.pi / 2, 1.0, 2.0, 3.0])
    T = g.pose6_to_matrix(pose)
    # +90 degrees about z maps x to y; the translation is the last column.
    np.testing.assert_allclose(T @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)
    rng = np.random.default_rng(3)
    poses = np.concatenate([rng.normal(0, 0.7, (10, 3)), rng.normal(0, 50, (10, 3))], axis=1)
    T = g.pose6_to_matrix(poses)
    np.testing.assert_allclose(T[:, :3, :3], Rotation.from_rotvec(poses[:, :3]).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(T[:, :3, 3], poses[:, 3:])
    np.testing.assert_allclose(g.matrix_to_pose6(T), poses, atol=1e-9)


def test_invert_rigid_matches_general_inverse():
    T = random_rigid(np.random.default_rng(4), 5)
    np.testing.assert_allclose(g.invert_rigid(T), np.linalg.inv(T), atol=1e-9)


def svd_projection(M):
    """Independent closest rotation to M (Frobenius): U diag(1, 1, det(U V^T)) V^T."""
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.linalg.det(U @ Vt)])
    return U @ D @ Vt


def test_projected_mean_rotation():
    rng = np.random.default_rng(5)
    center = Rotation.random(random_state=6)
    members = (center * Rotation.from_rotvec(rng.normal(0, 0.2, (7, 3)))).as_matrix()
    mean = g.projected_mean_rotation(members)
    np.testing.assert_allclose(mean, svd_projection(members.mean(axis=0)), atol=1e-9)
    # Symmetric spread about an axis averages back to the centre.
    theta = 0.3
    pair = np.stack([Rotation.from_rotvec([0, 0, s * theta]).as_matrix() for s in (1, -1)])
    np.testing.assert_allclose(g.projected_mean_rotation(pair), np.eye(3), atol=1e-12)
    # Batched: members along dim 1.
    batch = np.stack([members, members[::-1]])
    np.testing.assert_allclose(g.projected_mean_rotation(batch, dim=1), np.stack([mean, mean]), atol=1e-9)


def test_geodesic_distance_and_disagreement():
    rng = np.random.default_rng(7)
    R1 = Rotation.random(9, random_state=8)
    R2 = R1 * Rotation.from_rotvec(rng.normal(0, 0.5, (9, 3)))
    d = g.geodesic_distance(R1.as_matrix(), R2.as_matrix())
    np.testing.assert_allclose(d, (R1.inv() * R2).magnitude(), atol=1e-7)
    theta = 0.3
    pair = np.stack([Rotation.from_rotvec([0, 0, s * theta]).as_matrix() for s in (1, -1)])
    np.testing.assert_allclose(g.rotation_disagreement(pair), theta**2, atol=1e-7)
    same = np.stack([np.eye(3)] * 4)
    assert g.rotation_disagreement(same) == pytest.approx(0.0, abs=1e-12)


def test_calibration_product_and_spacing():
    c = g.default_calibration()
    assert c.pixel_spacing_mm == (0.229389190673828, 0.220979690551758)
    np.testing.assert_allclose(c.T_pixel_to_tool, c.T_rotation @ c.T_scale)
    g.check_calibration(c)


def test_compose_local_is_differentiable_and_batched():
    rng = np.random.default_rng(9)
    _, loc = g.frame_transforms(random_rigid(rng, 6), g.default_calibration())
    batch = torch.tensor(np.stack([loc, loc[::-1].copy()]), requires_grad=True)  # (2, 5, 4, 4)
    out = g.compose_local(batch, axis=1)
    np.testing.assert_allclose(out[0].detach().numpy(), g.compose_local(loc), atol=1e-9)
    out[:, -1, :3, 3].sum().backward()  # in-place chaining would fail here
    assert batch.grad is not None and torch.isfinite(batch.grad).all()

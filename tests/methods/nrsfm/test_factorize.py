"""Tests for portrait3d.methods.nrsfm.factorize on synthetic rank-one data (eqs. 3-10).

Ground truth: ``B0`` = portrait3d's mean face, ``K`` smooth unit-norm basis shapes, random scaled
orthographic cameras, landmarks in [0, 1] plus Gaussian noise. The basis shapes are made
orthogonal to translations, scaling and infinitesimal rotations of ``B0``: those parts of a basis
shape are not determined by eq. 2 (cameras absorb them), and the factorisation removes them too
(:func:`~portrait3d.methods.nrsfm.factorize.fix_similarity_gauge`), so the truth is comparable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from portrait3d.face.pose import mean_face_68
from portrait3d.methods.nrsfm.factorize import (
    align_to_head_frame,
    canonical_basis,
    factorize,
    nonrigid_factorization,
    rigid_factorization,
)
from portrait3d.methods.nrsfm.model import RankOneModel, angles_from_rotation_matrix, rotation_matrix

torch.set_num_threads(1)

NOISE = 1e-3  # per coordinate, normalised units (0.5 px at 512 px)


def similarity_directions(b0: np.ndarray) -> np.ndarray:
    """Orthonormal ``[7, 3L]``: translations, scaling and small rotations of ``b0 [3, L]``."""
    num_points = b0.shape[1]
    dirs = []
    for axis in range(3):
        t = np.zeros((3, num_points))
        t[axis] = 1.0
        dirs.append(t.ravel())
    dirs.append(b0.ravel())
    for axis in range(3):
        dirs.append(np.cross(np.eye(3)[axis], b0.T).T.ravel())
    return np.linalg.qr(np.stack(dirs, 1))[0].T


def synthetic_model(num_basis: int = 3, seed: int = 0) -> RankOneModel:
    """Mean face (centred) and ``K`` smooth orthonormal basis shapes with no similarity part (float64)."""
    rng = np.random.default_rng(seed)
    mf = mean_face_68()
    b0 = (mf - mf.mean(0)).T.copy()
    sim = similarity_directions(b0)
    basis: list[np.ndarray] = []
    for _ in range(num_basis):
        # Sum of Gaussian bumps (width 0.08 = a third of the eye distance) around 4 landmarks.
        field = np.zeros((68, 3))
        for centre in mf[rng.choice(68, 4, replace=False)]:
            field += np.exp(-((mf - centre) ** 2).sum(1) / (2 * 0.08 ** 2))[:, None] * rng.normal(size=3)
        v = field.T.ravel()
        v -= sim.T @ (sim @ v)
        for u in basis:
            v -= u * (u @ v)
        basis.append(v / np.linalg.norm(v))
    b = np.stack(basis).reshape(num_basis, 3, 68) if num_basis else np.zeros((0, 3, 68))
    return RankOneModel(torch.tensor(b0), torch.tensor(b))


def synthetic_params(model: RankOneModel, n: int, seed: int = 0, yaw: float = 40.0, pitch: float = 20.0,
                     roll: float = 15.0, sigmas=(0.15, 0.10, 0.06)) -> torch.Tensor:
    """Random ``q [n, P]``: k in [0.8, 1.4] (face about 0.3-0.5 of the image), t near the centre."""
    rng = np.random.default_rng(seed + 1000)
    k = rng.uniform(0.8, 1.4, n)
    theta = np.stack([rng.uniform(-yaw, yaw, n), rng.uniform(-pitch, pitch, n), rng.uniform(-roll, roll, n)], 1)
    alpha = rng.normal(size=(n, model.num_basis)) * np.asarray(sigmas[:model.num_basis])
    t = 0.5 + rng.normal(0.0, 0.03, (n, 2))
    return model.layout.join(*(torch.tensor(a) for a in (k, theta, alpha, t)))


def synthetic_landmarks(model: RankOneModel, q: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = model.project(q)
    return x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def _deformations(model: RankOneModel, alpha: torch.Tensor) -> torch.Tensor:
    """Centred per-image 3D deformations ``sum_k alpha_k B_k`` -> ``[N, 3L]``."""
    d = alpha.double() @ model.B.double().reshape(model.num_basis, -1)
    return d - d.mean(0)


def test_rigid_exact():
    true = synthetic_model(num_basis=0)
    q = synthetic_params(true, 120, yaw=50.0)
    x = synthetic_landmarks(true, q, noise=0.0)
    rigid = rigid_factorization(x)
    assert float(rigid.residual.abs().max()) < 1e-10
    assert abs(float(rigid.k.mean()) - 1.0) < 1e-12
    res = factorize(x, 0, dtype=torch.float64)
    assert res.model.num_basis == 0 and res.params.shape == (120, 6)
    assert res.reprojection_rmse < 1e-9 and res.rigid_rmse < 1e-9
    err = (res.params[:, 1:4] - q[:, 1:4]).abs().max()
    assert err < 1e-6, f"angle error {err} deg"
    ratio = res.params[:, 0] / q[:, 0]
    assert float(ratio.std() / ratio.mean()) < 1e-9
    # The reference fixes the scale too: B0 is the mean face.
    torch.testing.assert_close(res.model.B0, true.B0, atol=1e-9, rtol=0)


def test_nonrigid_recovery():
    true = synthetic_model(num_basis=3)
    q = synthetic_params(true, 400)
    x = synthetic_landmarks(true, q, noise=NOISE)
    assert 0.0 < float(x.min()) and float(x.max()) < 1.0
    res = factorize(x, 3, steps=100)
    model, qr = res.model, res.params.double()
    assert model.B0.dtype == torch.float32 and res.params.dtype == torch.float32
    noise_rmse = math.sqrt(2) * NOISE  # RMS 2D distance of the noise
    assert res.reprojection_rmse < 1.05 * noise_rmse, f"RMSE {res.reprojection_rmse:.2e} vs noise {noise_rmse:.2e}"
    assert res.rigid_rmse > 5 * noise_rmse  # the deformations matter
    # Per-image head pose (after alignment to the mean face).
    err = (qr[:, 1:4] - q[:, 1:4]).abs()
    assert float(err.max()) < 2.0, f"max angle error (yaw, pitch, roll) {err.max(0).values.tolist()}"
    assert float(err.pow(2).mean().sqrt()) < 0.5, f"RMS angle error {err.pow(2).mean(0).sqrt().tolist()}"
    # Scale up to a global factor.
    ratio = qr[:, 0] / q[:, 0]
    assert float(ratio.std() / ratio.mean()) < 0.01, f"k ratio relative std {float(ratio.std() / ratio.mean()):.4f}"
    # Deformations: same per-image 3D deformations (the head frame and scale are fixed by the reference).
    dt, dr = _deformations(true, q[:, 4:7]), _deformations(model, qr[:, 4:7])
    rel = float((dr - dt).norm() / dt.norm())
    assert rel < 0.1, f"relative deformation error {rel:.3f}"
    u_true = torch.linalg.qr(true.B.reshape(3, -1).T)[0]
    u_rec = torch.linalg.qr(model.B.double().reshape(3, -1).T)[0]
    angles = torch.rad2deg(torch.acos(torch.linalg.svdvals(u_true.T @ u_rec).clamp(max=1.0)))
    assert float(angles.max()) < 5.0, f"subspace angles {angles.tolist()} deg"
    # Canonical gauge: centred alpha, orthonormal B ordered by alpha variance.
    alpha = qr[:, 4:7]
    assert float(alpha.mean(0).abs().max()) < 1e-3 * float(alpha.std(0).max())
    flat = model.B.double().reshape(3, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    var = alpha.var(0)
    assert bool((var[:-1] >= var[1:]).all())
    # The parameters reproduce the landmarks.
    rmse = float((model.project(res.params).double() - x).pow(2).sum(-1).mean().sqrt())
    assert abs(rmse - res.reprojection_rmse) < 1e-6


def test_plain_factorization_eqs_3_to_10():
    """Without the joint refinement: eqs. 3-10 alone explain most of the non-rigid residual."""
    true = synthetic_model(num_basis=2, seed=1)
    q = synthetic_params(true, 150, seed=1, sigmas=(0.1, 0.06))
    x = synthetic_landmarks(true, q, noise=NOISE)
    rigid = rigid_factorization(x)
    b, alpha = nonrigid_factorization(x, rigid, 2, steps=50)
    assert b.shape == (2, 3, 68) and alpha.shape == (150, 2)
    flat = b.reshape(2, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(2, dtype=torch.float64), atol=1e-9, rtol=0)
    cams = rigid.k[:, None, None] * rigid.rotation[:, :2]
    pred = cams @ torch.einsum("nk,kjl->njl", alpha, b)
    left = rigid.residual - pred.transpose(1, 2)
    rigid_rmse = float(rigid.residual.pow(2).sum(-1).mean().sqrt())
    nonrigid_rmse = float(left.pow(2).sum(-1).mean().sqrt())
    assert nonrigid_rmse < 0.5 * rigid_rmse, (rigid_rmse, nonrigid_rmse)
    res = factorize(x, 2, steps=50, refine_iters=0)
    assert res.reprojection_rmse < rigid_rmse


def test_canonical_basis_keeps_deformations():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(3, 3, 10, generator=gen, dtype=torch.float64)
    alpha = torch.randn(50, 3, generator=gen, dtype=torch.float64) + 0.3
    b2, a2 = canonical_basis(b, alpha)
    torch.testing.assert_close(a2 @ b2.reshape(3, -1), alpha @ b.reshape(3, -1))
    torch.testing.assert_close(b2.reshape(3, -1) @ b2.reshape(3, -1).T, torch.eye(3, dtype=torch.float64))
    var = a2.var(0)
    assert bool((var[:-1] >= var[1:]).all())
    flat = b2.reshape(3, -1)
    assert bool((flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all())


def test_align_resolves_mirror_with_reference():
    true = synthetic_model(num_basis=0)
    q = synthetic_params(true, 20)
    rot = rotation_matrix(q[:, 1:4])
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    a = rotation_matrix(torch.tensor([25.0, -10.0, 40.0], dtype=torch.float64))
    # A mirrored, rotated, rescaled version of the truth that projects identically.
    b0 = 2.0 * a @ mirror @ true.B0
    rot_m = mirror @ rot @ mirror @ a.T
    k = q[:, 0] / 2.0
    torch.testing.assert_close(k[:, None, None] * rot_m[:, :2] @ b0, q[:, 0, None, None] * rot[:, :2] @ true.B0)
    al = align_to_head_frame(b0, rot_m, k)
    assert al.mirrored and abs(al.scale - 0.5) < 1e-9
    torch.testing.assert_close(al.B0, true.B0)
    torch.testing.assert_close(al.rotation, rot)
    torch.testing.assert_close(al.k, q[:, 0])


def _mesh_like_face(num_points: int = 468, seed: int = 0) -> np.ndarray:
    """A face-like ``[L, 3]`` head-frame cloud with MediaPipe's nose tip (1) and outer eye corners (33, 263)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-1, 1, (num_points, 2)) * [0.18, 0.22]
    z = 0.16 - 1.5 * (xy ** 2).sum(1)  # a dome facing +z
    pts = np.column_stack([xy, z])
    pts[1] = [0.0, 0.0, 0.26]  # nose tip in front
    pts[33] = [-0.12, 0.1, 0.15]  # subject's right eye (head-frame x < 0)
    pts[263] = [0.12, 0.1, 0.15]
    return pts


def test_align_without_reference_mediapipe():
    """No 3D reference: the data's mean pose becomes frontal, the nose-in-front rule picks the mirror."""
    shape = _mesh_like_face()
    b0 = torch.tensor((shape - shape.mean(0)).T.copy())
    true = RankOneModel(b0, torch.zeros(0, 3, 468, dtype=torch.float64), scheme="mediapipe468")
    q = synthetic_params(true, 200, seed=3, yaw=35.0, pitch=15.0, roll=10.0)
    # Symmetric pose set: its chordal mean is the frontal pose.
    q = torch.cat([q, q * torch.tensor([1, -1, -1, -1, 1, 1], dtype=torch.float64)])
    x = synthetic_landmarks(true, q, noise=0.0)
    res = factorize(x, 0, scheme="mediapipe468", dtype=torch.float64)
    err = (res.params[:, 1:4] - q[:, 1:4]).abs()
    assert float(err.max()) < 0.5, f"max angle error {err.max(0).values.tolist()} deg"
    assert res.model.B0[2, 1] > res.model.B0[2, [33, 263]].mean()
    assert res.model.B0[0, 33] < res.model.B0[0, 263]


@pytest.mark.parametrize("mirrored", [False, True])
def test_align_without_reference_direct(mirrored):
    shape = _mesh_like_face()
    b0 = torch.tensor((shape - shape.mean(0)).T.copy())
    # Single-axis pairs +-a: their chordal mean is exactly the frontal pose.
    angles = torch.tensor([[20.0, 0, 0], [-20.0, 0, 0], [0, 10.0, 0], [0, -10.0, 0], [0, 0, 0]], dtype=torch.float64)
    rot = rotation_matrix(angles)
    a = rotation_matrix(torch.tensor([30.0, -20.0, 60.0], dtype=torch.float64))
    d = torch.diag(torch.tensor([1.0, 1.0, -1.0 if mirrored else 1.0], dtype=torch.float64))
    # An equivalent factorisation in another frame (and maybe the depth-reversed branch).
    b0_f, rot_f = a @ d @ b0, d @ rot @ d @ a.T
    torch.testing.assert_close((rot_f @ b0_f)[:, :2], (rot @ b0)[:, :2])
    al = align_to_head_frame(b0_f, rot_f, torch.ones(5, dtype=torch.float64), scheme="mediapipe468")
    assert al.mirrored == mirrored
    torch.testing.assert_close(angles_from_rotation_matrix(al.rotation), angles, atol=1e-9, rtol=0)
    torch.testing.assert_close(al.B0, b0)
    torch.testing.assert_close((al.rotation @ al.B0)[:, :2], (rot @ b0)[:, :2])


def test_factorize_rejects_bad_input():
    x = torch.rand(10, 68, 2)
    with pytest.raises(ValueError):
        factorize(x[:, :60], 1)  # wrong number of points for ibug68
    with pytest.raises(ValueError):
        factorize(x[:2], 0)  # too few images
    with pytest.raises(ValueError):
        factorize(x, 30)  # 3K > L
    with pytest.raises(ValueError):
        factorize(x, 1, scheme="unknown")
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        factorize(bad, 1)
    model = synthetic_model(num_basis=0)
    q = synthetic_params(model, 10)
    q[:, 1:4] = torch.tensor([10.0, 5.0, 0.0], dtype=torch.float64)  # one pose: no 3D to recover
    with pytest.raises(ValueError, match="pose variation"):
        factorize(model.project(q), 0)


def test_depth_prior_restores_the_reference_relief_of_a_flattened_face():
    from portrait3d.methods.nrsfm.factorize import depth_scale_to_reference, scale_depth

    ref = torch.tensor(mean_face_68(), dtype=torch.float32).T  # [3, 68]
    flat = ref.clone()
    flat[2] *= 0.5
    flat *= 3.0  # the factorisation's own scale does not matter
    basis = torch.randn(2, 3, 68) * 0.01
    model = RankOneModel(flat, basis)
    factor = depth_scale_to_reference(model)
    assert factor == pytest.approx(2.0, rel=1e-4)
    deep = scale_depth(model, factor)
    assert torch.allclose(deep.B0[2], 2 * flat[2]) and torch.equal(deep.B0[:2], flat[:2])
    assert torch.allclose(deep.B[:, 2], 2 * basis[:, 2]) and torch.equal(deep.B[:, :2], basis[:, :2])


def test_depth_scale_to_pose_recovers_the_true_relief_from_reference_yaws():
    """A model whose face is 0.8x too shallow over-states yaw; calibrating against the true yaws finds 1.25."""
    from portrait3d.methods.nrsfm.editor import depth_scale_to_pose
    from portrait3d.methods.nrsfm.factorize import scale_depth

    true = synthetic_model(2)
    q = synthetic_params(true, 300, yaw=25.0, pitch=10.0, roll=5.0)
    lm = synthetic_landmarks(true, q, 1e-3).float()
    shallow = scale_depth(true, 0.8)
    factor, info = depth_scale_to_pose(shallow, lm.numpy(), q[:, 1].numpy())
    assert "skipped" not in info and info["correlation"] > 0.95
    assert info["slope_before"] < 0.9 and abs(info["slope_after"] - 1) < 0.01
    assert factor == pytest.approx(1.25, rel=0.03)
    # Reference yaws unrelated to the faces: nothing to calibrate against.
    noise = np.random.default_rng(0).uniform(-25, 25, len(q))
    factor, info = depth_scale_to_pose(shallow, lm.numpy(), noise)
    assert factor == 1.0 and "correlate" in info["skipped"]

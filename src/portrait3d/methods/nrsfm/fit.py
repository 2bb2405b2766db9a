"""Fitting the rank-one model's per-image parameters to landmarks (eq. 11 of Haas et al.).

For a fixed shape model, each image's ``q = (k, theta, alpha, t)`` minimises

    || L_i - R(q_i) ||^2 + w ||alpha_i||^2                                            (eq. 11)

(``R`` the scaled orthographic projection of eq. 2; ``w = alpha_weight`` an optional ridge prior).
Images are independent small non-linear least-squares problems (``2L`` residuals, ``K + 6``
unknowns), so :func:`fit_params` solves them all at once with batched Levenberg-Marquardt, each
image with its own damping, from a closed-form start: an orthographic Procrustes fit of ``B0``
then a linear solve for ``alpha``. Because a face is nearly flat, the depth-reversed pose
``(-yaw, -pitch, roll)`` projects almost the same points; both are tried and the better fit wins.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from portrait3d.methods.nrsfm.model import RankOneModel, angles_from_rotation_matrix, rotation_matrix

__all__ = ["fit_params", "initial_params", "reprojection_error", "nearest_scaled_rotation"]

_DEPTH_FLIP = torch.tensor([-1.0, -1.0, 1.0])  # (yaw, pitch, roll) -> (-yaw, -pitch, roll)


def _as_landmarks(model: RankOneModel, landmarks) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(landmarks) if not isinstance(landmarks, torch.Tensor) else landmarks)
    if x.dim() != 3 or x.shape[1:] != (model.num_points, 2):
        raise ValueError(f"landmarks must be [N, {model.num_points}, 2], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("landmarks contain non-finite values")
    return x.to(device=model.B0.device, dtype=torch.float64)


def nearest_scaled_rotation(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest ``k [I2|0] R`` to affine cameras ``m`` (Frobenius norm; eqs. 5-6, 11).

    Args:
        m: ``[N, 2, 3]``.

    Returns:
        ``(k [N], R [N, 3, 3])``: ``R``'s first two rows are ``U V^T`` of ``m = U S V^T``, the third
        their cross product (so ``det R = +1``); ``k`` is the mean singular value, the
        least-squares scale for those rows.
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rows = u @ vh  # [N, 2, 3]
    third = torch.linalg.cross(rows[:, 0], rows[:, 1], dim=-1)
    return s.mean(-1), torch.cat([rows, third[:, None]], dim=1)


def _solve_alpha(model_b: torch.Tensor, cams: torch.Tensor, rhs: torch.Tensor, weight: float) -> torch.Tensor:
    """Ridge least squares for ``alpha`` given cameras: ``rhs_i = cams_i sum_k alpha_ik B_k`` (eq. 11, linear part).

    Args:
        model_b: ``[K, 3, L]`` centred bases; cams: ``[N, 2, 3]`` (``k [I2|0] R``); rhs: ``[N, 2, L]``.
    """
    n, k = cams.shape[0], model_b.shape[0]
    a = torch.einsum("nij,kjl->nilk", cams, model_b).reshape(n, -1, k)  # [N, 2L, K]
    ata = a.transpose(1, 2) @ a + (weight + 1e-12) * torch.eye(k, dtype=a.dtype, device=a.device)
    return torch.linalg.solve(ata, a.transpose(1, 2) @ rhs.reshape(n, -1, 1))[..., 0]


def initial_params(model: RankOneModel, landmarks: torch.Tensor, alpha_weight: float = 0.0,
                   depth_flip: bool = False) -> torch.Tensor:
    """Closed-form start for :func:`fit_params` (eq. 11), float64 ``[N, P]``.

    ``t`` = landmark centroid; ``(k, R)`` = nearest scaled rotation to the affine camera
    ``M = W B0^+`` (``W`` the centred landmarks, ``B0`` the centred mean shape); ``alpha`` = ridge
    least squares given that camera; ``t`` corrected for the centroid of the deformed shape.

    Args:
        model: the shape model.
        landmarks: ``[N, L, 2]``.
        alpha_weight: ridge weight on ``alpha`` (as in :func:`fit_params`).
        depth_flip: start from the depth-reversed pose ``(-yaw, -pitch, roll)`` instead.
    """
    x = _as_landmarks(model, landmarks)
    b0 = model.B0.to(torch.float64)
    b = model.B.to(torch.float64)
    b0c = b0 - b0.mean(1, keepdim=True)
    bc = b - b.mean(2, keepdim=True)
    centroid = x.mean(1)  # [N, 2]
    w = (x - centroid[:, None]).transpose(1, 2)  # [N, 2, L]
    m = w @ b0c.T @ torch.linalg.inv(b0c @ b0c.T)  # affine camera [N, 2, 3]
    k, rot = nearest_scaled_rotation(m)
    theta = angles_from_rotation_matrix(rot)
    if depth_flip:
        theta = theta * _DEPTH_FLIP.to(theta)
        rot = rotation_matrix(theta)
    cams = k[:, None, None] * rot[:, :2]
    if model.num_basis:
        alpha = _solve_alpha(bc, cams, w - cams @ b0c, alpha_weight)
    else:
        alpha = x.new_zeros(x.shape[0], 0)
    # The model's shapes need not be centred: put their centroid on the landmark centroid.
    shape_centroid = b0.mean(1) + alpha @ b.mean(2)  # [N, 3]
    t = centroid - (cams @ shape_centroid[..., None])[..., 0]
    return model.layout.join(k, theta, alpha, t)


def _cross(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``v [N, 3] x`` each column of ``s [N, 3, L]``."""
    return torch.linalg.cross(v[:, :, None].expand_as(s), s, dim=1)


def _residuals_and_jacobian(b0: torch.Tensor, b: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
                            sqrt_w: float, jacobian: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Residuals of eq. 11 (``[N, 2L + K]``: landmarks, then ``sqrt(w) alpha``) and their Jacobian ``[N, 2L + K, P]``.

    With ``R = Rz(roll) F Rx(-pitch) Ry(yaw)``: ``dR/dyaw = R [e_y]x``,
    ``dR/dpitch = -R [Ry(yaw)^T e_x]x``, ``dR/droll = [e_z]x R`` (per radian; angles are in degrees).
    """
    n, num_basis = q.shape[0], b.shape[0]
    k, theta, alpha, t = q[:, 0], q[:, 1:4], q[:, 4:4 + num_basis], q[:, 4 + num_basis:]
    shape = b0 + torch.einsum("nk,kjl->njl", alpha, b)  # [N, 3, L]
    rot = rotation_matrix(theta)
    rs = rot @ shape  # [N, 3, L]
    pts = k[:, None, None] * rs[:, :2] + t[:, :, None]
    res = torch.cat([(pts - x.transpose(1, 2)).transpose(1, 2).reshape(n, -1), sqrt_w * alpha], dim=1)
    if not jacobian:
        return res, None

    def flat(d: torch.Tensor) -> torch.Tensor:  # [N, 2, L] -> [N, 2L] in the residual's (l, xy) order
        return d.transpose(1, 2).reshape(n, -1)

    deg = torch.pi / 180.0
    kk = k[:, None, None]
    e = torch.eye(3, dtype=q.dtype, device=q.device)
    yaw = theta[:, 0] * deg
    u = torch.stack([torch.cos(yaw), torch.zeros_like(yaw), torch.sin(yaw)], dim=1)  # Ry(yaw)^T e_x
    cols = [
        flat(rs[:, :2]),
        flat(kk * (rot[:, :2] @ _cross(e[1].expand(n, 3), shape))) * deg,
        flat(-kk * (rot[:, :2] @ _cross(u, shape))) * deg,
        flat(kk * torch.stack([-rs[:, 1], rs[:, 0]], dim=1)) * deg,
    ]
    cams = kk * rot[:, :2]
    cols += [flat(cams @ b[j]) for j in range(num_basis)]
    ones, zeros = torch.ones_like(rs[:, 0]), torch.zeros_like(rs[:, 0])
    cols += [flat(torch.stack([ones, zeros], 1)), flat(torch.stack([zeros, ones], 1))]
    jac = torch.stack(cols, dim=2)  # [N, 2L, P]
    prior = torch.zeros(n, num_basis, q.shape[1], dtype=q.dtype, device=q.device)
    prior[:, :, 4:4 + num_basis] = sqrt_w * torch.eye(num_basis, dtype=q.dtype, device=q.device)
    return res, torch.cat([jac, prior], dim=1)


def _canonical(q: torch.Tensor, num_basis: int) -> torch.Tensor:
    """Same projection, ``k > 0`` and angles in their principal ranges."""
    q = q.clone()
    rot = rotation_matrix(q[:, 1:4])
    neg = q[:, 0] < 0
    # -k [I2|0] R == k [I2|0] Rz(180) R: flip the sign of k into the rotation.
    rot[neg, :2] = -rot[neg, :2]
    q[:, 0] = q[:, 0].abs()
    q[:, 1:4] = angles_from_rotation_matrix(rot)
    return q


def _levenberg_marquardt(model: RankOneModel, x: torch.Tensor, q: torch.Tensor, steps: int,
                         alpha_weight: float, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched LM on eq. 11 from ``q [N, P]``; returns ``(q, cost [N])``."""
    b0 = model.B0.to(torch.float64)
    b = model.B.to(torch.float64)
    sqrt_w = float(alpha_weight) ** 0.5
    r = _residuals_and_jacobian(b0, b, q, x, sqrt_w, jacobian=False)[0]
    cost = (r * r).sum(-1)
    mu = torch.full_like(cost, 1e-3)
    done = torch.zeros_like(cost, dtype=torch.bool)
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="fit (eq. 11)", leave=False)
    for _ in iterator:
        active = ~done
        if not active.any():
            break
        qa, xa, ra = q[active], x[active], r[active]
        jac = _residuals_and_jacobian(b0, b, qa, xa, sqrt_w)[1]  # [n, 2L + K, P]
        jtj = jac.transpose(1, 2) @ jac
        g = jac.transpose(1, 2) @ ra[..., None]
        # Marquardt's scaling: damping proportional to the curvature of each parameter, since
        # k, angles (degrees), alpha and t have unrelated units.
        diag = torch.diagonal(jtj, dim1=1, dim2=2).clamp_min(1e-12)
        delta = -torch.linalg.solve(jtj + mu[active, None, None] * torch.diag_embed(diag) + 1e-15 * eye, g)[..., 0]
        q_new = qa + delta
        r_new = _residuals_and_jacobian(b0, b, q_new, xa, sqrt_w, jacobian=False)[0]
        cost_new = (r_new * r_new).sum(-1)
        ok = torch.isfinite(cost_new) & (cost_new <= cost[active])
        gain = (cost[active] - cost_new) / cost[active].clamp_min(1e-300)
        idx = active.nonzero()[:, 0]
        q[idx[ok]] = q_new[ok]
        r[idx[ok]] = r_new[ok]
        cost[idx[ok]] = cost_new[ok]
        mu[idx] = torch.where(ok, (mu[idx] * 0.3).clamp_min(1e-12), mu[idx] * 10.0)
        # Converged: an accepted step that no longer improves, or damping so large nothing moves.
        step_small = delta.abs().amax(-1) < 1e-10 * (1.0 + qa.abs().amax(-1))
        done[idx] = (ok & ((gain < 1e-12) | step_small)) | (mu[idx] > 1e12) | (cost[idx] == 0)
    return q, cost


def fit_params(model: RankOneModel, landmarks, init: Optional[torch.Tensor] = None, steps: int = 200,
               alpha_weight: float = 0.0, progress: bool = False) -> torch.Tensor:
    """Per-image parameters ``q`` minimising eq. 11 for a fixed model (batched Levenberg-Marquardt).

    Without ``init``, starts from :func:`initial_params` and from its depth-reversed twin
    ``(-yaw, -pitch, roll)`` and keeps, per image, the better fit: a safeguard for noisy,
    near-frontal landmarks, whose affine start can land in the depth-reversed local minimum (on
    synthetic data the first start alone already recovers yaw up to +-85 deg).

    Args:
        model: the shape model (its device is used).
        landmarks: ``[N, L, 2]`` normalised image coordinates (numpy or torch).
        init: optional start ``[N, P]`` (then only that start is refined).
        steps: maximum LM iterations.
        alpha_weight: weight ``w`` of the prior ``w ||alpha||^2`` (landmark units squared).
        progress: tqdm progress bar.

    Returns:
        ``[N, P]`` in the model's dtype, with ``k > 0`` and angles in their principal ranges.
    """
    x = _as_landmarks(model, landmarks)
    if x.shape[0] == 0:
        return x.new_zeros(0, model.layout.size, dtype=model.B0.dtype)
    if init is not None:
        q0 = torch.as_tensor(init).to(device=x.device, dtype=torch.float64)
        if q0.shape != (x.shape[0], model.layout.size):
            raise ValueError(f"init must be [{x.shape[0]}, {model.layout.size}], got {tuple(q0.shape)}")
        q, _ = _levenberg_marquardt(model, x, q0.clone(), steps, alpha_weight, progress)
    else:
        starts = [initial_params(model, x, alpha_weight, flip) for flip in (False, True)]
        q_all, cost_all = _levenberg_marquardt(model, x.repeat(2, 1, 1), torch.cat(starts), steps,
                                               alpha_weight, progress)
        n = x.shape[0]
        better = cost_all[n:] < cost_all[:n]
        q = torch.where(better[:, None], q_all[n:], q_all[:n])
    return _canonical(q, model.num_basis).to(model.B0.dtype)


def reprojection_error(model: RankOneModel, q: torch.Tensor, landmarks) -> torch.Tensor:
    """Per-image RMS landmark distance ``sqrt(mean_l ||L_il - R(q_i)_l||^2)`` (eq. 11 residual).

    Args:
        model: the shape model.
        q: ``[N, P]``.
        landmarks: ``[N, L, 2]``.

    Returns:
        ``[N]`` in normalised image units, float64.
    """
    x = _as_landmarks(model, landmarks)
    pred = model.project(torch.as_tensor(q).to(device=x.device, dtype=torch.float64))
    return ((pred.to(torch.float64) - x) ** 2).sum(-1).mean(-1).sqrt()

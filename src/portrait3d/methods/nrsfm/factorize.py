"""Learning the rank-one model from landmarks by factorisation (eqs. 3-10 of Haas et al.).

1. **Rigid** (:func:`rigid_factorization`, eqs. 3-6): the centred landmarks of all images, stacked
   into ``W`` (``2N x L``), are factorised by a rank-3 SVD into affine cameras and a shape,
   ``W ~ M_hat B_hat``; the metric upgrade ``Q`` makes every camera pair of rows a scaled
   orthonormal pair, giving per-image scale ``k_i`` and rotation ``R_i`` and the mean shape ``B0``.
2. **Non-rigid** (:func:`nonrigid_factorization`, eqs. 7-10): the rigid residual ``dW = W - M0 B0``
   spans (up to noise) a ``3K``-dimensional row space ``V``; basis shapes are ``B_k = D_k V``, and
   ``D`` and the coefficients ``alpha`` minimise eq. 10 with the cameras fixed.
3. **Refinement** (in :func:`factorize`; ``refine_iters=0`` skips it): alternate a few
   Levenberg-Marquardt steps of eq. 11 per image (pose and ``alpha`` given the shapes) with the
   exact least-squares update of ``B0`` and ``B`` given the parameters (eq. 2 is linear in the
   shapes), with an extrapolating line search. Steps 1-2 fit the rigid part with a rank-3 affine
   model and never revisit the cameras, so deformations leak into the poses (several degrees
   for realistic deformations); the refinement brings them to the noise level.
4. **Head frame** (:func:`align_to_head_frame`): the factorisation is defined up to a global
   rotation, mirror and scale; these are fixed so that ``theta = 0`` faces the camera, as in
   :mod:`portrait3d.face.pose`.

Gauge. Eq. 2 leaves more freedom than the global frame, and :func:`factorize` fixes it:

* ``alpha`` has zero mean over the data (:func:`center_alpha`: the mean goes into ``B0``);
* no ``B_k`` contains a translation, scaling or (to first order) rotation of ``B0``
  (:func:`fix_similarity_gauge`): those would be indistinguishable from changes of ``t``, ``k``
  or ``theta``, so the angles and scales are those of the mean shape;
* the ``B_k`` are orthonormal (so ``||B_k||_F = 1``, the constraint of eq. 10), ordered by the
  variance of their (uncorrelated) coefficients, signed so their largest entry is positive
  (:func:`canonical_basis`).

All computations are float64 on the CPU; :func:`factorize` returns the model and parameters in
``dtype`` on the CPU (move the model with ``.to(device)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from portrait3d.methods.nrsfm.fit import fit_params, nearest_scaled_rotation
from portrait3d.methods.nrsfm.model import (
    ParamLayout,
    RankOneModel,
    angles_from_rotation_matrix,
    get_scheme,
    rotation_matrix,
)

__all__ = [
    "RigidResult",
    "HeadFrameAlignment",
    "FactorizationResult",
    "rigid_factorization",
    "nonrigid_factorization",
    "canonical_basis",
    "center_alpha",
    "fix_similarity_gauge",
    "align_to_head_frame",
    "factorize",
]

_MIRROR = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # D = diag(1, 1, -1)
_FRONTAL = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # F = R(0, 0, 0)


class RigidResult(NamedTuple):
    """Output of :func:`rigid_factorization` (float64).

    Attributes:
        k: ``[N]`` scales (mean 1: ``B0`` is in image units).
        rotation: ``[N, 3, 3]`` head-to-camera rotations (proper), in the factorisation's frame.
        B0: ``[3, L]`` centred mean shape.
        t: ``[N, 2]`` translations (the landmark centroids).
        residual: ``[N, L, 2]`` landmarks minus the rigid projection.
    """

    k: torch.Tensor
    rotation: torch.Tensor
    B0: torch.Tensor
    t: torch.Tensor
    residual: torch.Tensor


class HeadFrameAlignment(NamedTuple):
    """Output of :func:`align_to_head_frame`.

    The model maps as ``B0' = s T B0``, ``B_k' = T B_k``, ``alpha' = s alpha``, ``k' = k / s`` and
    ``R' = D^m R T^T`` (``T`` orthogonal, ``m`` = 1 if ``det T = -1``, ``D = diag(1, 1, -1)``),
    which leaves every projection unchanged.

    Attributes:
        B0: ``[3, L]``; B: ``[K, 3, L]`` or ``None``; rotation: ``[N, 3, 3]``; k: ``[N]``;
        alpha: ``[N, K]`` or ``None``; transform: ``T [3, 3]``; scale: ``s``;
        mirrored: whether ``T`` includes the mirror (the depth-reversed branch was taken).
    """

    B0: torch.Tensor
    B: Optional[torch.Tensor]
    rotation: torch.Tensor
    k: torch.Tensor
    alpha: Optional[torch.Tensor]
    transform: torch.Tensor
    scale: float
    mirrored: bool


@dataclass
class FactorizationResult:
    """Output of :func:`factorize`.

    Attributes:
        model: the learnt :class:`~portrait3d.methods.nrsfm.model.RankOneModel` (head frame).
        params: ``[N, P]`` per-image ``q = (k, theta, alpha, t)``; ``model.project(params)``
            reproduces the landmarks.
        reprojection_rmse: RMS landmark distance of ``model.project(params)`` (normalised units).
        rigid_rmse: the same for the rigid factorisation alone (eqs. 3-6).
    """

    model: RankOneModel
    params: torch.Tensor
    reprojection_rmse: float
    rigid_rmse: float


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_landmarks(landmarks, num_points: Optional[int] = None) -> torch.Tensor:
    x = landmarks if isinstance(landmarks, torch.Tensor) else torch.as_tensor(np.asarray(landmarks))
    if x.dim() != 3 or x.shape[-1] != 2:
        raise ValueError(f"landmarks must be [N, L, 2], got {tuple(x.shape)}")
    if num_points is not None and x.shape[1] != num_points:
        raise ValueError(f"landmarks have {x.shape[1]} points, the scheme has {num_points}")
    if x.shape[0] < 3:
        raise ValueError(f"need at least 3 images to factorise, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("landmarks contain non-finite values")
    # Small dense problems: the CPU in float64 is accurate and fast enough.
    return x.detach().to(device="cpu", dtype=torch.float64)


def _cameras(k: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``k [I2|0] R`` -> ``[N, 2, 3]`` (the camera rows ``M_i`` of eq. 3)."""
    return k[:, None, None] * rotation[:, :2]


def _rmse(residual: torch.Tensor) -> float:
    return float((residual ** 2).sum(-1).mean().sqrt())


# --------------------------------------------------------------------------------------------
# Rigid factorisation (eqs. 3-6)
# --------------------------------------------------------------------------------------------


def _metric_upgrade(m_hat: torch.Tensor) -> torch.Tensor:
    """Corrective ``Q [3, 3]`` making ``M_hat Q`` scaled orthographic (eqs. 5-6).

    With ``G = Q Q^T`` symmetric, each image's rows ``a, b`` of ``M_hat`` must satisfy
    ``a^T G a - b^T G b = 0`` (equal scales) and ``a^T G b = 0`` (orthogonal rows): linear,
    homogeneous in the 6 entries of ``G``. The least-squares solution with ``||g|| = 1`` (the
    scale normalisation; the overall scale is fixed later) is the last right singular vector.
    """
    a, b = m_hat[0::2], m_hat[1::2]  # [N, 3] each

    def phi(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Coefficients of (g11, g12, g13, g22, g23, g33) in u^T G v.
        return torch.stack([u[:, 0] * v[:, 0], u[:, 0] * v[:, 1] + u[:, 1] * v[:, 0],
                            u[:, 0] * v[:, 2] + u[:, 2] * v[:, 0], u[:, 1] * v[:, 1],
                            u[:, 1] * v[:, 2] + u[:, 2] * v[:, 1], u[:, 2] * v[:, 2]], dim=-1)

    system = torch.cat([phi(a, a) - phi(b, b), phi(a, b)])  # [2N, 6]
    _, sv, vh = torch.linalg.svd(system, full_matrices=False)
    if float(sv[-2]) <= 1e-10 * float(sv[0]):
        # A second null vector: the views do not constrain the 3D shape (e.g. one pose only).
        raise ValueError("the landmarks show too little pose variation for the metric upgrade (eqs. 5-6)")
    g = vh[-1]
    gm = torch.stack([torch.stack([g[0], g[1], g[2]]), torch.stack([g[1], g[3], g[4]]),
                      torch.stack([g[2], g[4], g[5]])])
    if float((phi(a, a) @ g).mean()) < 0:  # k_i^2 = a^T G a must be positive
        gm = -gm
    evals, evecs = torch.linalg.eigh(gm)
    # Noise can make G indefinite; clip to keep Q real and invertible.
    evals = evals.clamp_min(1e-6 * float(evals.max()))
    return evecs * evals.sqrt()


def rigid_factorization(landmarks) -> RigidResult:
    """Rigid structure from motion under scaled orthography (eqs. 3-6).

    Centre each image (``t_i`` = centroid), stack the centred landmarks into ``W [2N, L]``, take
    the rank-3 SVD ``W ~ M_hat B_hat`` (eqs. 3-4), upgrade to a metric (scaled orthographic)
    camera ``M0 = M_hat Q``, ``B0 = Q^-1 B_hat`` (eqs. 5-6), and read per image ``k_i`` and the
    nearest rotation ``R_i`` from its two rows of ``M0`` (third row = cross product). The global
    scale is fixed by ``mean(k) = 1``. Frame and mirror are arbitrary (see
    :func:`align_to_head_frame`).

    Args:
        landmarks: ``[N, L, 2]``, ``N >= 3``.

    Returns:
        :class:`RigidResult` (float64).
    """
    x = _as_landmarks(landmarks)
    n, num_points, _ = x.shape
    t = x.mean(1)
    w = (x - t[:, None]).transpose(1, 2).reshape(2 * n, num_points)  # rows x_1, y_1, x_2, ...
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:3].sqrt()
    m_hat = u[:, :3] * root  # [2N, 3] (eq. 4)
    b_hat = root[:, None] * vh[:3]  # [3, L]
    q = _metric_upgrade(m_hat)
    m0 = (m_hat @ q).reshape(n, 2, 3)
    b0 = torch.linalg.solve(q, b_hat)
    k, rotation = nearest_scaled_rotation(m0)
    scale = k.mean()
    k, b0 = k / scale, b0 * scale
    pred = _cameras(k, rotation) @ b0 + t[:, :, None]
    return RigidResult(k, rotation, b0, t, x - pred.transpose(1, 2))


# --------------------------------------------------------------------------------------------
# Non-rigid factorisation (eqs. 7-10)
# --------------------------------------------------------------------------------------------


def _solve_alpha_given_d(cams: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-image least squares for ``alpha`` in ``C_i = M_i sum_k alpha_ik D_k`` (eq. 10 with ``D`` fixed).

    Args: cams ``[N, 2, 3]``, c ``[N, 2, 3K]``, d ``[K, 3, 3K]``. Returns ``[N, K]``.
    """
    n, num_basis = cams.shape[0], d.shape[0]
    a = torch.einsum("nij,kjl->nilk", cams, d).reshape(n, -1, num_basis)
    ata = a.transpose(1, 2) @ a
    ridge = 1e-12 * ata.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]  # keeps a degenerate D solvable
    ata = ata + ridge * torch.eye(num_basis, dtype=a.dtype, device=a.device)
    return torch.linalg.solve(ata, a.transpose(1, 2) @ c.reshape(n, -1, 1))[..., 0]


def _solve_d_given_alpha(cams: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Least squares for ``D`` given ``alpha`` (eq. 10 with ``alpha`` fixed).

    The columns of ``C_i`` decouple: column ``j`` is ``sum_k alpha_ik M_i D_k[:, j]``, so one
    ``[2N, 3K]`` design matrix ``[alpha_i1 M_i, ..., alpha_iK M_i]`` serves all ``3K`` columns.
    Returns ``[K, 3, 3K]``.
    """
    n, num_basis = alpha.shape
    design = (alpha[:, None, :, None] * cams[:, :, None, :]).reshape(2 * n, 3 * num_basis)
    sol = torch.linalg.lstsq(design, c.reshape(2 * n, -1)).solution  # [3K, 3K]
    return sol.reshape(num_basis, 3, -1)


def _normalise_d(d: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the scale of each ``D_k`` into ``alpha`` so that ``||B_k||_F = ||D_k||_F = 1``."""
    norms = d.flatten(1).norm(dim=1).clamp_min(1e-300)
    return d / norms[:, None, None], alpha * norms


def _data_term(cams: torch.Tensor, c: torch.Tensor, d: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``sum_i ||C_i - M_i sum_k alpha_ik D_k||^2`` (the data term of eq. 10 inside the row space)."""
    shapes = torch.einsum("nk,kjl->njl", alpha, d)
    return ((c - cams @ shapes) ** 2).sum()


def canonical_basis(B: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical gauge of a basis: same deformations ``alpha B``, orthonormal ``B_k``, ordered.

    ``alpha B`` is invariant under ``B -> G B``, ``alpha -> alpha G^-1``. Take the SVD of the
    centred deformations ``(alpha - mean alpha) B = U S V^T``: ``B' = V^T`` (orthonormal, so
    ``||B'_k||_F = 1`` as eq. 10 asks), ``alpha' = alpha B B'^T`` (columns uncorrelated,
    variance descending). Sign: the largest-magnitude entry of each ``B'_k`` is positive.

    Args:
        B: ``[K, 3, L]``; alpha: ``[N, K]``.

    Returns:
        ``(B' [K, 3, L], alpha' [N, K])``.
    """
    num_basis = B.shape[0]
    if num_basis == 0:
        return B, alpha
    flat = B.reshape(num_basis, -1)
    deform = (alpha - alpha.mean(0)) @ flat
    vh = torch.linalg.svd(deform, full_matrices=False)[2][:num_basis]
    peak = vh.gather(1, vh.abs().argmax(1, keepdim=True))
    vh = vh * torch.where(peak < 0, -1.0, 1.0).to(vh)
    return vh.reshape(B.shape), alpha @ flat @ vh.T


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` -> cross-product matrices ``[..., 3, 3]`` (``skew(v) @ u = v x u``)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def fix_similarity_gauge(
    B0: torch.Tensor, B: torch.Tensor, k: torch.Tensor, rotation: torch.Tensor, alpha: torch.Tensor,
    *, rotations: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove from each basis shape the parts that are a scaling or rotation of ``B0`` (gauge of eq. 2).

    Eq. 2 does not determine these parts: adding ``c_k B0`` to ``B_k`` is undone exactly by
    ``k_i -> k_i (1 - c . alpha_i)``, ``alpha_i -> alpha_i / (1 - c . alpha_i)``, and adding an
    infinitesimal rotation ``omega_k x B0`` is undone to first order by rotating each image by
    ``Omega_i = sum_k alpha_ik omega_k``. Without this gauge the per-image scale and pose would
    soak up part of the deformations (and vice versa). The ``B_k`` must be centred (translations
    are the remaining similarity motions).

    * Scale (exact): ``B_k' = B_k - c_k B0``, ``c_k = <B_k, B0> / ||B0||^2``,
      ``k' = k (1 + alpha c)``, ``alpha' = alpha / (1 + alpha c)`` (skipped if some
      ``1 + alpha c <= 0.1``, where the reparameterisation would be ill-conditioned).
    * Rotation (first order, if ``rotations``): ``B_k' = B_k - omega_k x B0`` (least-squares
      ``omega_k``), ``R_i' = R_i exp([Omega_i]_x)``; refit the poses afterwards.

    Args:
        B0: ``[3, L]``; B: ``[K, 3, L]``; k: ``[N]``; rotation: ``[N, 3, 3]``; alpha: ``[N, K]``.

    Returns:
        ``(B', k', rotation', alpha')``.
    """
    if B.shape[0] == 0:
        return B, k, rotation, alpha
    c = (B * B0).sum((1, 2)) / (B0 ** 2).sum()  # [K]
    denom = 1.0 + alpha @ c
    if float(denom.min()) > 0.1:
        B = B - c[:, None, None] * B0
        k, alpha = k * denom, alpha / denom[:, None]
    if rotations:
        # dirs[a] = e_a x B0 (columnwise): the motion of B0 under a small rotation about axis a.
        dirs = torch.einsum("aij,jl->ail", _skew(torch.eye(3, dtype=B0.dtype, device=B0.device)), B0)
        gram = torch.einsum("ajl,bjl->ab", dirs, dirs)
        omega = torch.linalg.solve(gram, torch.einsum("kjl,ajl->ak", B, dirs)).T  # [K, 3]
        B = B - torch.einsum("ka,ajl->kjl", omega, dirs)
        rotation = rotation @ torch.linalg.matrix_exp(_skew(alpha @ omega))
    return B, k, rotation, alpha


def center_alpha(B0: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the mean coefficients into the mean shape: ``B0' = B0 + sum_k mean(alpha_k) B_k``.

    Returns ``(B0' [3, L], alpha - mean(alpha) [N, K])``; every shape of eq. 2 is unchanged.
    """
    if B.shape[0] == 0:
        return B0, alpha
    mean = alpha.mean(0)
    return B0 + torch.einsum("k,kjl->jl", mean, B), alpha - mean


def nonrigid_factorization(
    landmarks,
    rigid: RigidResult,
    num_basis: int,
    steps: int = 2000,
    lr: float = 1e-3,
    unit_norm_weight: float = 1.0,
    seed: int = 0,
    als_iters: int = 100,
    num_starts: int = 4,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis shapes and coefficients from the rigid residual, cameras fixed (eqs. 7-10).

    ``dW = W - M0 B0`` (eq. 7); its top ``3K`` right singular vectors ``V [3K, L]`` span the
    deformations (eq. 8); ``B_k = D_k V`` with ``D = [D_1; ...; D_K] in R^{3K x 3K}`` (eq. 9). ``D``
    and ``alpha`` minimise (eq. 10)

        sum_i ||dW_i - k_i [I2|0] R_i sum_k alpha_ik B_k||^2 / ||dW||^2
            + unit_norm_weight * sum_k (||B_k||_F^2 - 1)^2

    (the data term divided by ``||dW||^2`` to make the weight unit-free). Since ``V`` has
    orthonormal rows, the data term only needs ``C = dW V^T`` (``[2N, 3K]``). Start: alternating
    exact least squares (``alpha`` given ``D`` per image, ``D`` given ``alpha`` in one solve) from
    identity blocks ``D_k`` and ``num_starts - 1`` random orthogonal ``D`` (seeded), the best kept;
    then ``steps`` of full-batch Adam on eq. 10 (cosine-decayed ``lr``; ``alpha`` is optimised
    relative to its initial spread, so one ``lr`` suits both), keeping the best iterate.

    Args:
        landmarks: ``[N, L, 2]``, the same as given to :func:`rigid_factorization`.
        rigid: its result.
        num_basis: ``K`` (``3K <= min(L, 2N)``).
        steps: Adam steps (0: alternating least squares only).
        lr: Adam learning rate.
        unit_norm_weight: ``lambda`` of the unit-norm penalty (fixes the ``alpha``/``B`` scale gauge).
        seed: seed of the random starts.
        als_iters: alternating least-squares iterations per start.
        num_starts: number of starts.
        progress: tqdm progress bar over the Adam steps.

    Returns:
        ``(B [K, 3, L], alpha [N, K])``, float64, in the gauge of :func:`canonical_basis`
        (``alpha`` not centred; see :func:`center_alpha`).
    """
    x = _as_landmarks(landmarks)
    n, num_points, _ = x.shape
    if num_basis == 0:
        return x.new_zeros(0, 3, num_points), x.new_zeros(n, 0)
    if num_basis < 0 or 3 * num_basis > min(num_points, 2 * n):
        raise ValueError(f"num_basis must be in [0, {min(num_points, 2 * n) // 3}], got {num_basis}")
    cams = _cameras(rigid.k, rigid.rotation)  # [N, 2, 3]
    dw = rigid.residual.transpose(1, 2)  # [N, 2, L] (eq. 7)
    vh = torch.linalg.svd(dw.reshape(2 * n, num_points), full_matrices=False)[2]
    v = vh[:3 * num_basis]  # [3K, L] (eq. 8)
    c = dw @ v.T  # [N, 2, 3K]
    total = max(float((dw ** 2).sum()), 1e-300)

    gen = torch.Generator().manual_seed(seed)
    starts = [torch.eye(3 * num_basis, dtype=torch.float64)]
    for _ in range(max(0, num_starts - 1)):
        starts.append(torch.linalg.qr(torch.randn(3 * num_basis, 3 * num_basis, generator=gen,
                                                  dtype=torch.float64))[0])
    best = None
    for d0 in starts:
        d = d0.reshape(num_basis, 3, 3 * num_basis)
        for _ in range(als_iters):
            alpha = _solve_alpha_given_d(cams, c, d)
            d, alpha = _normalise_d(_solve_d_given_alpha(cams, c, alpha), alpha)
        alpha = _solve_alpha_given_d(cams, c, d)
        err = float(_data_term(cams, c, d, alpha))
        if best is None or err < best[0]:
            best = (err, d, alpha)
    _, d, alpha = best

    if steps > 0:
        d, alpha = _adam_eq10(cams, c, d, alpha, total, steps, lr, unit_norm_weight, progress)
    b = (d @ v).reshape(num_basis, 3, num_points)  # eq. 9
    return canonical_basis(b, alpha)


def _adam_eq10(cams, c, d, alpha, total, steps, lr, weight, progress):
    """Full-batch Adam on eq. 10 from ``(d, alpha)``; returns the best iterate."""
    spread = alpha.std(0).clamp_min(1e-12) if alpha.shape[0] > 1 else alpha.abs().clamp_min(1e-12)
    d_p = d.clone().requires_grad_(True)
    a_p = (alpha / spread).clone().requires_grad_(True)
    opt = torch.optim.Adam([d_p, a_p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def loss_fn():
        data = _data_term(cams, c, d_p, a_p * spread) / total
        norms2 = (d_p ** 2).flatten(1).sum(1)  # ||B_k||_F^2 = ||D_k||_F^2 (V orthonormal)
        return data + weight * ((norms2 - 1.0) ** 2).sum()

    best_loss, best = float("inf"), (d, alpha)
    iterator = range(steps + 1)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="non-rigid (eq. 10)", leave=False)
    for i in iterator:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        value = float(loss.detach())
        if value < best_loss:
            best_loss = value
            best = (d_p.detach().clone(), (a_p * spread).detach().clone())
        if i == steps or not math.isfinite(value):
            break
        loss.backward()
        opt.step()
        sched.step()
    return best


# --------------------------------------------------------------------------------------------
# Head frame
# --------------------------------------------------------------------------------------------


def _proper_procrustes(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Rotation ``A`` and scale ``s`` minimising ``||s A src - dst||`` (both centred ``[3, L]``).

    Returns ``(A, s, residual)``.
    """
    u, sv, vh = torch.linalg.svd(dst @ src.T)
    fix = torch.ones(3, dtype=src.dtype, device=src.device)
    fix[2] = torch.sign(torch.linalg.det(u @ vh))  # forbid reflections
    a = u @ torch.diag(fix) @ vh
    s = float((sv * fix).sum() / (src ** 2).sum())
    return a, s, float(((s * a @ src - dst) ** 2).sum())


def _chordal_mean(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation nearest (Frobenius) to the mean of ``rotation [N, 3, 3]``."""
    u, _, vh = torch.linalg.svd(rotation.mean(0))
    fix = torch.ones(3, dtype=rotation.dtype, device=rotation.device)
    fix[2] = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag(fix) @ vh


def align_to_head_frame(
    B0: torch.Tensor,
    rotation: torch.Tensor,
    k: torch.Tensor,
    *,
    B: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    scheme: str = "ibug68",
    reference=None,
) -> HeadFrameAlignment:
    """Rotate (and maybe mirror and rescale) a factorised model into the head frame of
    :mod:`portrait3d.face.pose`, so that the per-image angles are head poses.

    The factorisation (eqs. 3-10) fixes the model only up to a global rotation, scale and
    mirror ``B0 -> D B0``, ``R -> D R D`` (``D = diag(1, 1, -1)``; the depth reversal, which turns
    ``(yaw, pitch, roll)`` into ``(-yaw, -pitch, roll)``).

    * With a 3D ``reference`` (default for ``ibug68``: :func:`portrait3d.face.pose.mean_face_68`):
      for both mirror branches, the similarity (rotation + scale) best aligning the centred
      ``B0`` to the centred reference (orthogonal Procrustes); the branch with the smaller
      residual wins, and ``B0`` takes the reference's scale (world units).
    * Otherwise: the rotation making the chordal mean of the per-image rotations frontal
      (``theta = 0``: the data's mean pose is taken as frontal), and the mirror branch that puts
      the nose tip in front (+z) of the outer eye corners; the scale is kept.

    Args:
        B0: ``[3, L]``; rotation: ``[N, 3, 3]``; k: ``[N]``;
        B: optional ``[K, 3, L]`` (rotated with ``B0``); alpha: optional ``[N, K]`` (rescaled).
        scheme: landmark scheme (for the default reference and the nose/eye indices).
        reference: ``[L, 3]`` head-frame points, ``None`` for the scheme's default, or ``False``
            to use the rotation-mean rule even for ``ibug68``.

    Returns:
        :class:`HeadFrameAlignment`.
    """
    sch = get_scheme(scheme)
    dtype = B0.dtype
    mirror = _MIRROR.to(dtype=dtype, device=B0.device)
    b0c = B0 - B0.mean(1, keepdim=True)
    ref = None if reference is False else _centred_reference(reference, sch.name, B0)
    if ref is not None:
        fits = [_proper_procrustes(b0c * (mirror[:, None] if m else 1.0), ref) for m in (False, True)]
        mirrored = fits[1][2] < fits[0][2]
        a, scale, _ = fits[int(mirrored)]
        t_mat = a * mirror if mirrored else a  # A D: mirror, then rotate onto the reference
    else:
        # R_i' = R_i A^T with A = F mean(R): then mean(R') = F, the frontal pose.
        a = _FRONTAL.to(dtype=dtype, device=B0.device) @ _chordal_mean(rotation)
        nose, eyes = sch.nose_tip, list(sch.eye_outer)
        z = (a @ b0c)[2]
        mirrored = bool(z[nose] < z[eyes].mean())
        scale = 1.0
        # D A: rotate, then mirror depth; D R' D keeps the frontal mean.
        t_mat = mirror[:, None] * a if mirrored else a
    rot = rotation @ t_mat.T
    if mirrored:
        rot = mirror[:, None] * rot  # D R T^T keeps det +1
    return HeadFrameAlignment(
        B0=scale * (t_mat @ B0),
        B=None if B is None else torch.einsum("ij,kjl->kil", t_mat, B),
        rotation=rot,
        k=k / scale,
        alpha=None if alpha is None else alpha * scale,
        transform=t_mat,
        scale=float(scale),
        mirrored=bool(mirrored),
    )


def _centred_reference(reference, scheme: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The 3D reference points as a centred ``[3, L]`` tensor in ``like``'s dtype and device (``reference=None``:
    the scheme's default, :func:`portrait3d.face.pose.mean_face_68` for ``ibug68``); None when there is none."""
    if reference is None and scheme == "ibug68":
        from portrait3d.face.pose import mean_face_68

        reference = mean_face_68()
    if reference is None:
        return None
    ref = torch.tensor(np.array(reference, dtype=np.float64), dtype=like.dtype, device=like.device).T
    if ref.shape != like.shape:
        raise ValueError(f"reference must be [{like.shape[1]}, 3], got {tuple(ref.T.shape)}")
    return ref - ref.mean(1, keepdim=True)


def depth_scale_to_reference(model: RankOneModel, reference=None) -> float:
    """The factor that gives the mean shape ``B0``'s relief the reference face's relief, relative to its width.

    Under (weak-perspective) factorisation the depth of the shape is the weakest-determined quantity: when the
    heads turn through a narrow range (generated faces: yaw std about 10 degrees), a shallower face turned
    further explains the landmarks almost as well (the bas-relief ambiguity), and every angle then comes out in
    the wrong units. With ``B0`` in the head frame, the factor is ``s_z / s_xy``: the least-squares scales of
    its depth row and of its image-plane rows onto the reference's (default for ``ibug68``:
    :func:`portrait3d.face.pose.mean_face_68`, a measured 3D mean face).
    """
    b0 = model.B0.detach().to(torch.float64)
    ref = _centred_reference(reference, model.scheme, b0)
    if ref is None:
        raise ValueError(f"no default 3D reference for the {model.scheme!r} scheme")
    b0 = b0 - b0.mean(1, keepdim=True)
    s_xy = float((b0[:2] * ref[:2]).sum() / b0[:2].square().sum())
    s_z = float((b0[2] * ref[2]).sum() / b0[2].square().sum())
    return s_z / s_xy


def scale_depth(model: RankOneModel, factor: float) -> RankOneModel:
    """The model with the depth (z) rows of ``B0`` and every basis shape multiplied by ``factor``."""
    b0, b = model.B0.detach().clone(), model.B.detach().clone()
    b0[2] *= factor
    if b.numel():
        b[:, 2] *= factor
    return RankOneModel(b0, b, scheme=model.scheme)


# --------------------------------------------------------------------------------------------
# Joint refinement and the whole pipeline
# --------------------------------------------------------------------------------------------


def _solve_shapes(x: torch.Tensor, q: torch.Tensor, num_basis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``B0, B`` given all per-image parameters (eq. 2 is linear in the shapes).

    Per landmark, ``x_il - t_i = sum_j a_ij M_i s_jl`` with ``a_i = (1, alpha_i)``, ``M_i = k_i
    [I2|0] R_i``: one ``[2N, 3(K+1)]`` design matrix for all ``L`` landmarks.
    """
    k, theta, alpha, t = ParamLayout(num_basis).split(q)
    n = q.shape[0]
    cams = _cameras(k, rotation_matrix(theta))
    coef = torch.cat([torch.ones_like(k)[:, None], alpha], dim=1)  # [N, K+1]
    design = (coef[:, None, :, None] * cams[:, :, None, :]).reshape(2 * n, 3 * (num_basis + 1))
    rhs = (x - t[:, None]).transpose(1, 2).reshape(2 * n, -1)
    sol = torch.linalg.lstsq(design, rhs).solution.reshape(num_basis + 1, 3, -1)
    return sol[0], sol[1:]


def factorize(
    landmarks,
    num_basis: int,
    scheme: str = "ibug68",
    steps: int = 2000,
    progress: bool = False,
    *,
    lr: float = 1e-3,
    unit_norm_weight: float = 1.0,
    refine_iters: int = 100,
    refine_steps: int = 5,
    refine_tol: float = 1e-5,
    fit_steps: int = 200,
    seed: int = 0,
    reference=None,
    dtype: torch.dtype = torch.float32,
) -> FactorizationResult:
    """Learn a rank-one model and per-image parameters from landmarks (eqs. 3-10, then eq. 11).

    Rigid factorisation (eqs. 3-6), non-rigid factorisation (eqs. 7-10), ``refine_iters`` rounds
    of joint refinement (eq. 11 per image, then least-squares shapes), canonical gauge
    (:func:`center_alpha`, :func:`canonical_basis`) and head-frame alignment
    (:func:`align_to_head_frame`), and a final eq. 11 fit so that the parameters are optimal for
    the returned model.

    Args:
        landmarks: ``[N, L, 2]`` normalised image coordinates, ``L`` = the scheme's points.
        num_basis: ``K`` (0 gives a rigid model).
        scheme: landmark scheme name.
        steps: Adam steps of eq. 10.
        progress: tqdm progress bars.
        lr, unit_norm_weight, seed: see :func:`nonrigid_factorization`.
        refine_iters: maximum joint refinement rounds (0: the plain factorisation of eqs. 3-10).
        refine_steps: Levenberg-Marquardt iterations of eq. 11 per round.
        refine_tol: stop refining when a round lowers the RMSE by less than this fraction.
        fit_steps: Levenberg-Marquardt iterations of the final eq. 11 fit.
        reference: see :func:`align_to_head_frame`.
        dtype: dtype of the returned model and parameters.

    Returns:
        :class:`FactorizationResult`.
    """
    sch = get_scheme(scheme)
    x = _as_landmarks(landmarks, sch.num_points)
    rigid = rigid_factorization(x)
    b, alpha = nonrigid_factorization(x, rigid, num_basis, steps=steps, lr=lr,
                                      unit_norm_weight=unit_norm_weight, seed=seed, progress=progress)
    q = torch.cat([rigid.k[:, None], angles_from_rotation_matrix(rigid.rotation), alpha, rigid.t], dim=1)
    model, q = _canonical_model(rigid.B0, b, q, sch.name, reference)
    model, q = _refine(x, model, q, sch.name, reference, refine_iters, refine_steps, refine_tol, progress)
    q = fit_params(model, x, init=q, steps=fit_steps).to(torch.float64)
    # Only exact re-expressions from here on, so q stays optimal for the returned model.
    model, q = _canonical_model(model.B0, model.B, q, sch.name, reference, rotation_gauge=False)
    model = model.to(dtype)
    q = q.to(dtype)
    rmse = _rmse(model.project(q).to(torch.float64) - x)
    return FactorizationResult(model=model, params=q, reprojection_rmse=rmse, rigid_rmse=_rmse(rigid.residual))


def _refine(x: torch.Tensor, model: RankOneModel, q: torch.Tensor, scheme: str, reference, iters: int,
            steps: int, tol: float, progress: bool) -> tuple[RankOneModel, torch.Tensor]:
    """Joint refinement: alternate eq. 11 (a few LM steps) and least-squares shapes, with extrapolation.

    Plain alternation converges linearly, slowly when pose and deformation are entangled; like the
    line search of alternating least squares for PARAFAC, each round also tries a longer step
    ``old + omega (new - old)`` along its own update and keeps it when it fits better (``omega``
    grows while that works and shrinks when it does not).
    """
    num_basis = model.num_basis
    rounds = range(iters)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="refine", leave=False)
    omega, prev, gauge = 2.0, float("inf"), True
    for _ in rounds:
        b0_old, b_old = model.B0.to(torch.float64), model.B.to(torch.float64)
        # A few LM iterations per round suffice: the alternation, not eq. 11, sets the pace.
        q_new = fit_params(model, x, init=q, steps=steps).to(torch.float64)
        b0_new, b_new = _solve_shapes(x, q_new, num_basis)
        cost = _rmse(_project(b0_new, b_new, q_new, scheme) - x)
        step = q_new - q
        step[:, 1:4] = torch.remainder(step[:, 1:4] + 180.0, 360.0) - 180.0  # angles may have wrapped
        q_ext = q + omega * step
        b0_ext, b_ext = b0_old + omega * (b0_new - b0_old), b_old + omega * (b_new - b_old)
        cost_ext = _rmse(_project(b0_ext, b_ext, q_ext, scheme) - x)
        if cost_ext < cost:
            q_new, b0_new, b_new, cost = q_ext, b0_ext, b_ext, cost_ext
            omega = min(2.0 * omega, 64.0)
        else:
            omega = max(2.0, omega / 4.0)
        model, q = _canonical_model(b0_new, b_new, q_new, scheme, reference, rotation_gauge=gauge)
        if prev - cost <= tol * cost:
            if not gauge:
                break
            # The rotation gauge is only first-order exact, so it keeps a tiny residual: settle
            # the last rounds without it (the pose-deformation split is fixed by then).
            gauge = False
        prev = cost
    return model, q


def _project(b0: torch.Tensor, b: torch.Tensor, q: torch.Tensor, scheme: str) -> torch.Tensor:
    return RankOneModel(b0, b, scheme=scheme).project(q)


def _canonical_model(b0: torch.Tensor, b: torch.Tensor, q: torch.Tensor, scheme: str, reference,
                     rotation_gauge: bool = True) -> tuple[RankOneModel, torch.Tensor]:
    """Centred shapes, similarity gauge, canonical basis, head frame; ``q`` re-expressed (float64).

    Exact (projections unchanged) except for the first-order rotation gauge (``rotation_gauge``).
    """
    num_basis = b.shape[0]
    b0, b = b0.to(torch.float64), b.to(torch.float64)
    k, theta, alpha, t = ParamLayout(num_basis).split(q)
    rot = rotation_matrix(theta)
    # Centring the shapes shifts every projection by a constant; move it into t.
    centroid = b0.mean(1) + alpha @ b.mean(2) if num_basis else b0.mean(1).expand(q.shape[0], 3)
    t = t + (_cameras(k, rot) @ centroid[..., None])[..., 0]
    b0, b = b0 - b0.mean(1, keepdim=True), b - b.mean(2, keepdim=True)
    # center_alpha moves B0, which moves the directions the gauge removes: iterate to the fixed point.
    for _ in range(3):
        b0, alpha = center_alpha(b0, b, alpha)
        b, k, rot, alpha = fix_similarity_gauge(b0, b, k, rot, alpha, rotations=rotation_gauge)
    b0, alpha = center_alpha(b0, b, alpha)  # exactly centred alpha; B stays orthogonal to B0 up to O(mean^2)
    b, alpha = canonical_basis(b, alpha)
    al = align_to_head_frame(b0, rot, k, B=b, alpha=alpha, scheme=scheme, reference=reference)
    # Alignment rotates B: re-fix the sign rule in the final frame.
    b_final, alpha_final = canonical_basis(al.B, al.alpha)
    model = RankOneModel(al.B0, b_final, scheme=scheme)
    q = model.layout.join(al.k, angles_from_rotation_matrix(al.rotation), alpha_final, t)
    return model, q

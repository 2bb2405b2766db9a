"""Differentiable EG3D camera for 3D GAN inversion with pose optimisation (Ko et al., WACV 2023).

Ko et al. optimise the camera viewpoint ``pi`` together with the latent code (main paper, Algorithm 1;
the joint baseline of the supplement, Algorithm 3). :class:`CameraParams` is that ``pi`` as an
``nn.Module``: head-pose angles in degrees plus the paper's learnable camera translation, turned into
EG3D's 25-d label by a differentiable re-implementation of
:func:`portrait3d.networks.eg3d.camera.camera_from_angles` (same float64 / float32 steps, so an
untranslated camera reproduces that function's label to float32 rounding).

Parameterisation (per camera ``n`` of a batch of ``N``)
--------------------------------------------------------
* ``yaw``, ``pitch``, ``roll`` in **degrees**, with :func:`camera_from_angles`' head-pose
  convention (positive yaw: head turned to its left; positive pitch: head tilted up; positive roll:
  face turned clockwise in the image). Roll may be frozen (``optimize_roll=False``, the default, as
  EG3D's own cameras have no roll).
* ``translation`` ``t`` (3-vector, world units): a rigid translation of the whole camera. The
  rotation is the look-at rotation of the *untranslated* camera, the position is
  ``radius * direction(yaw, pitch) + t``. ``t = 0`` gives exactly EG3D's look-at camera.
* fixed buffers: ``radius`` (2.7), ``pivot`` (0, 0, 0.2), normalised ``intrinsics`` (from
  ``fov_deg`` = 18.837, or copied from a label), and ``rotation_offset`` ``[N, 3, 3]``, a fixed
  right-multiplied rotation that is the identity for look-at cameras and lets :meth:`from_label`
  reproduce *any* rigid camera exactly (e.g. a PnP camera from the face pipeline that does not look
  at the pivot).

The cam2world matrix is ``[[R_lookat(o0) Rz(roll)^T R_off, o0 + t], [0, 0, 0, 1]]`` with
``o0 = radius * (-cos p sin y, -sin p, cos p cos y)``.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.geometry.rotations import axis_rotation
from portrait3d.networks.eg3d.camera import (
    camera_from_angles,
    camera_vector,
    create_cam2world_matrix,
    fov_to_intrinsics,
    normalize_vecs,
    pose_angles_from_camera,
)

__all__ = ["CameraParams", "fov_from_intrinsics", "rotation_z_transposed", "view_camera"]

_PITCH_LIMIT = 89.0  # degrees; the look-at frame degenerates at +-90

Scalar = Union[float, Sequence[float], torch.Tensor]


def _vector(value: Scalar, n: int | None = None) -> torch.Tensor:
    """float32 ``[N]`` from a float, a sequence or a tensor (broadcast to ``n`` when given)."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(-1)
    if n is not None and t.numel() == 1 and n != 1:
        t = t.expand(n).clone()
    return t


def rotation_z_transposed(roll_rad: torch.Tensor) -> torch.Tensor:
    """``Rz(roll)^T`` ``[N, 3, 3]`` for rolls ``[N]`` (radians), as :func:`camera_from_angles` applies it.

    ``cam2world' = cam2world @ Rz(roll)^T`` turns the camera about its viewing axis so the face turns
    clockwise in the image by ``roll``. Differentiable; the dtype of ``roll_rad`` is kept.
    """
    return axis_rotation(roll_rad, 2).transpose(-1, -2)


class CameraParams(nn.Module):
    """Learnable EG3D camera(s): head-pose angles (degrees) + camera translation (Ko et al., Alg. 1).

    Args:
        yaw, pitch, roll: degrees; floats or ``[N]`` (broadcast to the batch size).
        translation: ``[3]`` or ``[N, 3]`` world units (default zeros).
        radius: distance of the untranslated camera from the world origin (EG3D: 2.7).
        pivot: point the untranslated camera looks at (EG3D: ``(0, 0, 0.2)``).
        fov_deg: field of view for the default intrinsics (EG3D: 18.837).
        intrinsics: normalised ``[3, 3]`` or ``[N, 3, 3]`` intrinsics overriding ``fov_deg``.
        optimize_roll: make ``roll`` a trainable parameter (else a frozen one).
        optimize_translation: make ``translation`` trainable (else frozen at its value).

    Parameters: ``yaw``, ``pitch``, ``roll`` ``[N]`` and ``translation`` ``[N, 3]`` (all
    ``nn.Parameter``; frozen ones have ``requires_grad=False``). :meth:`label` is differentiable w.r.t.
    every trainable one.
    """

    def __init__(self, yaw: Scalar = 0.0, pitch: Scalar = 0.0, roll: Scalar = 0.0,
                 translation: torch.Tensor | Sequence[float] | None = None, radius: float = 2.7,
                 pivot: Sequence[float] = (0.0, 0.0, 0.2), fov_deg: float = 18.837,
                 intrinsics: torch.Tensor | None = None, optimize_roll: bool = False,
                 optimize_translation: bool = True) -> None:
        super().__init__()
        sizes = [_vector(v).numel() for v in (yaw, pitch, roll)]
        if translation is not None:
            tr = torch.as_tensor(translation, dtype=torch.float32).detach().clone().reshape(-1, 3)
            sizes.append(tr.shape[0])
        n = max(sizes)
        if any(s not in (1, n) for s in sizes):
            raise UsageError(f"camera parameters have inconsistent batch sizes {sizes}")
        self.yaw = nn.Parameter(_vector(yaw, n))
        self.pitch = nn.Parameter(_vector(pitch, n))
        self.roll = nn.Parameter(_vector(roll, n), requires_grad=bool(optimize_roll))
        tr = torch.zeros(n, 3) if translation is None else tr.expand(n, 3).clone()
        self.translation = nn.Parameter(tr, requires_grad=bool(optimize_translation))
        self.radius = float(radius)
        self.register_buffer("pivot", torch.tensor([float(v) for v in pivot], dtype=torch.float32))
        intr = fov_to_intrinsics(fov_deg) if intrinsics is None else torch.as_tensor(intrinsics, dtype=torch.float32)
        intr = intr.detach().clone().reshape(-1, 3, 3)
        if intr.shape[0] not in (1, n):
            raise UsageError(f"got {intr.shape[0]} intrinsics for {n} cameras")
        self.register_buffer("intrinsics", intr.expand(n, 3, 3).clone())
        self.register_buffer("rotation_offset", torch.eye(3).expand(n, 3, 3).clone())

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_label(cls, c: torch.Tensor, pivot: Sequence[float] = (0.0, 0.0, 0.2), optimize_roll: bool = False,
                   optimize_translation: bool = True) -> "CameraParams":
        """Initialise from EG3D labels ``c`` ``[25]`` / ``[N, 25]`` so that :meth:`label` reproduces them.

        ``yaw, pitch, roll, radius`` come from
        :func:`portrait3d.networks.eg3d.camera.pose_angles_from_camera` (yaw / pitch / radius from the
        camera position, roll from the rotation), the intrinsics are copied, ``t = 0``, and whatever
        rotation the look-at camera at ``pivot`` does not explain is stored in the fixed
        ``rotation_offset`` (identity, to float32 rounding, for labels of :func:`camera_from_angles`
        with the same pivot). Batched labels must share one radius.
        """
        c = torch.as_tensor(c).detach()
        flat = c.reshape(-1, c.shape[-1]).to(torch.float32)
        if flat.shape[-1] != 25:
            raise UsageError(f"camera labels must be [25] or [N, 25], got {tuple(c.shape)}")
        yaw, pitch, roll, radius = pose_angles_from_camera(flat)
        radius = torch.as_tensor(radius, dtype=torch.float64).reshape(-1)
        if float(radius.max() - radius.min()) > 1e-4 * float(radius.mean()):
            raise UsageError("from_label needs cameras at one common distance from the origin")
        cam = cls(yaw=torch.as_tensor(yaw).reshape(-1).float(), pitch=torch.as_tensor(pitch).reshape(-1).float(),
                  roll=torch.as_tensor(roll).reshape(-1).float(), radius=float(radius.mean()), pivot=pivot,
                  intrinsics=flat[:, 16:25].reshape(-1, 3, 3), optimize_roll=optimize_roll,
                  optimize_translation=optimize_translation).to(c.device)
        with torch.no_grad():
            base = cam._rotation(with_offset=False).to(torch.float64)       # R_lookat Rz^T
            target = flat[:, :16].reshape(-1, 4, 4)[:, :3, :3].to(torch.float64)
            cam.rotation_offset.copy_((base.transpose(1, 2) @ target).to(torch.float32))
        return cam

    # ------------------------------------------------------------------ geometry

    @property
    def batch_size(self) -> int:
        return int(self.yaw.shape[0])

    def origin(self, translated: bool = True) -> torch.Tensor:
        """Camera positions ``[N, 3]`` (float32): ``radius * direction(yaw, pitch) (+ t)``."""
        yaw = torch.deg2rad(self.yaw.to(torch.float64))
        pitch = torch.deg2rad(self.pitch.to(torch.float64).clamp(-_PITCH_LIMIT, _PITCH_LIMIT))
        o = self.radius * torch.stack([-torch.cos(pitch) * torch.sin(yaw), -torch.sin(pitch),
                                       torch.cos(pitch) * torch.cos(yaw)], dim=-1)
        o = o.to(torch.float32)
        return o + self.translation if translated else o

    def _rotation(self, with_offset: bool = True) -> torch.Tensor:
        """Camera-to-world rotation ``[N, 3, 3]``: look-at at the untranslated position, roll, offset."""
        o0 = self.origin(translated=False)
        look = create_cam2world_matrix(normalize_vecs(self.pivot.to(o0) - o0), o0)[:, :3, :3]
        rz_t = rotation_z_transposed(torch.deg2rad(self.roll.to(torch.float64)))
        rot = (look.to(torch.float64) @ rz_t).to(torch.float32)   # as camera_from_angles: float64, rounded once
        return rot @ self.rotation_offset if with_offset else rot

    def cam2world(self) -> torch.Tensor:
        """Camera-to-world matrices ``[N, 4, 4]`` (OpenCV axes), differentiable."""
        rot = self._rotation()
        pos = self.origin(translated=True)
        top = torch.cat([rot, pos[:, :, None]], dim=2)                          # [N, 3, 4]
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=top.device).expand(top.shape[0], 1, 4)
        return torch.cat([top, bottom], dim=1)

    def label(self) -> torch.Tensor:
        """EG3D camera labels ``[N, 25]`` (16 row-major cam2world + 9 intrinsics), differentiable."""
        return camera_vector(self.cam2world(), self.intrinsics)

    def forward(self) -> torch.Tensor:
        return self.label()

    # ------------------------------------------------------------------ bookkeeping

    def angle_parameters(self) -> list[nn.Parameter]:
        """The trainable angle parameters (yaw, pitch and, if not frozen, roll)."""
        return [p for p in (self.yaw, self.pitch, self.roll) if p.requires_grad]

    def translation_parameters(self) -> list[nn.Parameter]:
        """``[translation]`` when it is trainable, else ``[]``."""
        return [self.translation] if self.translation.requires_grad else []

    def state(self, index: int = 0) -> dict[str, float]:
        """Plain floats of camera ``index`` for logs: ``yaw, pitch, roll`` (degrees), ``tx, ty, tz``."""
        t = self.translation[index].detach().cpu().tolist()
        return {"yaw": float(self.yaw.detach()[index]), "pitch": float(self.pitch.detach()[index]),
                "roll": float(self.roll.detach()[index]), "tx": t[0], "ty": t[1], "tz": t[2]}

    def extra_repr(self) -> str:
        return f"n={self.batch_size}, radius={self.radius}, pivot={self.pivot.tolist()}"


def fov_from_intrinsics(intrinsics: torch.Tensor) -> float:
    """Inverse of :func:`fov_to_intrinsics` (same 3.14159 / 1.414 constants): degrees from ``f = K[0, 0]``."""
    f = float(torch.as_tensor(intrinsics).reshape(-1, 9)[0, 0])
    return math.atan(1.0 / (f * 1.414)) * 360.0 / 3.14159


def view_camera(base: torch.Tensor, yaw_deg: float, pitch_deg: float | None = None) -> torch.Tensor:
    """Camera ``[1, 25]`` at head yaw ``yaw_deg`` (absolute, degrees) on EG3D's look-at sphere.

    Keeps the roll, distance from the origin and intrinsics of ``base`` (``[25]`` or ``[1, 25]``), and its
    pitch unless ``pitch_deg`` is given; looks at EG3D's pivot ``(0, 0, 0.2)``.
    """
    base = base.reshape(-1)[:25].detach().float().cpu()
    _, pitch0, roll0, radius = pose_angles_from_camera(base)
    pitch = float(pitch0 if pitch_deg is None else pitch_deg)
    if not -90 < pitch < 90:
        raise UsageError(f"pitch must lie strictly between -90 and 90 degrees, got {pitch:g}")
    c = camera_from_angles(float(yaw_deg), pitch, radius=float(radius), roll_deg=float(roll0))
    c[16:] = base[16:]
    return c[None]

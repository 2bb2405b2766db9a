"""Rotations, once. Every rotation in portrait3d is built here, and each convention has a name.

Axes: all our 3D frames are right-handed. Camera frames follow OpenCV/EG3D (``x`` right, ``y`` down, ``z`` forward);
the head frame follows EG3D's world (``x`` to the head's left as seen by the viewer, ``y`` up, ``z`` out of the face).
Angles are in degrees at every public boundary except where a function says radians.

Conventions (``yaw > 0`` turns the head to its left, ``pitch > 0`` raises the chin, ``roll > 0`` turns the face
clockwise in the image):

* **head-to-camera** (the face pipeline, NRSfM's ``R(theta)`` of Haas et al. eq. 2):
  ``R = Rz(roll) F Rx(-pitch) Ry(yaw)`` with ``F = diag(1, -1, -1)`` (head ``y`` up / ``z`` out -> camera ``y``
  down / ``z`` forward). :func:`head_rotation`, :func:`head_angles`.
* **camera-yxz** (the 3D-inversion pose estimator, Ko et al.): ``R = Ry(-yaw) Rx(pitch) Rz(roll)``, the
  camera-to-world rotation of EG3D's look-at camera up to its pivot offset. :func:`camera_rotation`,
  :func:`camera_angles`.
* **view-zyx** (LiftedGAN / Unsup3d's viewpoint ``w``): ``R = Rz(r_z) Ry(r_y) Rx(r_x)`` with radians about the camera
  axes. :func:`view_rotation`.
* **6D** (Zhou et al. 2019, "On the Continuity of Rotation Representations"): the first two columns, completed by
  Gram-Schmidt. :func:`rotation_6d_to_matrix`, :func:`matrix_to_rotation_6d`.

Everything is batched over leading dimensions and differentiable; numpy callers use :func:`head_rotation_np`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["axis_rotation", "head_rotation", "head_angles", "head_rotation_np", "head_angles_np", "camera_rotation",
           "camera_angles", "view_rotation", "rotation_6d_to_matrix", "matrix_to_rotation_6d", "FLIP_YZ"]

FLIP_YZ = np.diag([1.0, -1.0, -1.0])
"""``F``: head frame (``y`` up, ``z`` out of the face) to camera frame (``y`` down, ``z`` forward)."""


def axis_rotation(angle: torch.Tensor, axis: int) -> torch.Tensor:
    """Right-handed rotations ``[..., 3, 3]`` by ``angle [...]`` (radians) about axis 0 (x), 1 (y) or 2 (z)."""
    c, s = angle.cos(), angle.sin()
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == 0:
        rows = [[o, z, z], [z, c, -s], [z, s, c]]
    elif axis == 1:
        rows = [[c, z, s], [z, o, z], [-s, z, c]]
    elif axis == 2:
        rows = [[c, -s, z], [s, c, z], [z, z, o]]
    else:
        raise ValueError(f"axis must be 0, 1 or 2, not {axis}")
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


# ----------------------------------------------------------------------------- head-to-camera
def head_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Head-to-camera rotations ``Rz(roll) F Rx(-pitch) Ry(yaw)``: ``[..., 3]`` (yaw, pitch, roll) degrees ->
    ``[..., 3, 3]`` (closed form: one stack instead of three products)."""
    rad = torch.deg2rad(angles)
    cy, cp, cr = torch.cos(rad).unbind(-1)
    sy, sp, sr = torch.sin(rad).unbind(-1)
    rows = [
        cr * cy - sr * sp * sy, sr * cp, cr * sy + sr * sp * cy,
        sr * cy + cr * sp * sy, -cr * cp, sr * sy - cr * sp * cy,
        cp * sy, sp, -cp * cy,
    ]
    return torch.stack(rows, dim=-1).reshape(*angles.shape[:-1], 3, 3)


def head_angles(rotation: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`head_rotation`: ``[..., 3, 3] -> [..., 3]`` degrees; pitch in [-90, 90], yaw and roll in
    (-180, 180]."""
    yaw = torch.atan2(rotation[..., 2, 0], -rotation[..., 2, 2])
    pitch = torch.asin(rotation[..., 2, 1].clamp(-1.0, 1.0))
    roll = torch.atan2(rotation[..., 0, 1], -rotation[..., 1, 1])
    return torch.rad2deg(torch.stack([yaw, pitch, roll], dim=-1))


def head_rotation_np(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """:func:`head_rotation` of one pose as float64 numpy ``[3, 3]``."""
    a = torch.tensor([float(yaw_deg), float(pitch_deg), float(roll_deg)], dtype=torch.float64)
    return head_rotation(a).numpy()


def head_angles_np(rotation: np.ndarray) -> tuple[float, float, float]:
    """:func:`head_angles` of one float64 rotation: ``(yaw, pitch, roll)`` in degrees."""
    r = np.asarray(rotation, dtype=np.float64)
    yaw = math.atan2(r[2, 0], -r[2, 2])
    pitch = math.asin(min(1.0, max(-1.0, r[2, 1])))
    roll = math.atan2(r[0, 1], -r[1, 1])
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


# ----------------------------------------------------------------------------- camera-yxz
def camera_rotation(angles: torch.Tensor) -> torch.Tensor:
    """``Ry(-yaw) Rx(pitch) Rz(roll)``: ``[..., 3]`` (yaw, pitch, roll) degrees -> ``[..., 3, 3]``."""
    yaw, pitch, roll = torch.deg2rad(angles).unbind(-1)
    return axis_rotation(-yaw, 1) @ axis_rotation(pitch, 0) @ axis_rotation(roll, 2)


def camera_angles(rotation: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`camera_rotation` (valid for ``|pitch| < 90``, where yaw and roll separate)."""
    r = rotation
    yaw = torch.atan2(-r[..., 0, 2], r[..., 2, 2])
    pitch = torch.asin((-r[..., 1, 2]).clamp(-1.0, 1.0))
    roll = torch.atan2(r[..., 1, 0], r[..., 1, 1])
    return torch.rad2deg(torch.stack([yaw, pitch, roll], dim=-1))


# ----------------------------------------------------------------------------- view-zyx
def view_rotation(rx: torch.Tensor, ry: torch.Tensor, rz: torch.Tensor) -> torch.Tensor:
    """``Rz(rz) Ry(ry) Rx(rx)`` from radians about the camera axes (Unsup3d's viewpoint), ``[...] -> [..., 3, 3]``."""
    return axis_rotation(rz, 2) @ axis_rotation(ry, 1) @ axis_rotation(rx, 0)


# ----------------------------------------------------------------------------- 6D
def rotation_6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Zhou et al.'s continuous 6D representation -> rotation: Gram-Schmidt on the two 3-vectors, ``b3 = b1 x b2``;
    ``[..., 6] -> [..., 3, 3]`` proper rotations (columns ``b1, b2, b3``)."""
    if x.shape[-1] != 6:
        raise ValueError(f"6D rotations must have a last dimension of 6, not {x.shape[-1]}")
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = F.normalize(a1, dim=-1, eps=1e-8)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1, eps=1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(rotation: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotation_6d_to_matrix` for rotations: the first two columns, ``[..., 3, 3] -> [..., 6]``."""
    return torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)

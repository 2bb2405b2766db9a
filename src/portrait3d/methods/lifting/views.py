"""D_V viewpoints and the face pipeline's head pose: one convention, used by the losses and the evaluation.

D_V / Unsup3d viewpoints are ``(r_x, r_y, r_z, t_x, t_y, t_z)``: radians about the camera axes
(:func:`portrait3d.geometry.render.rotation_from_view`). The face pipeline's head pose is ``(yaw, pitch, roll)`` in
degrees: +yaw = head turned to its left, +pitch = chin up, +roll = clockwise in the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["head_pose_from_view", "view_from_head_pose"]

_F = np.diag([1.0, -1.0, -1.0])  # the frontal head in camera axes (face pipeline)


def head_pose_from_view(view: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Face-pipeline head pose of D_V viewpoints (see the module docstring).

    Args:
        view: ``[N, >=3]`` or ``[>=3]``: ``(r_x, r_y, r_z, ...)`` in radians (Unsup3d axes); any
            translation columns are ignored.

    Returns:
        float64 ``[N, 3]`` (or ``[3]``): ``(yaw, pitch, roll)`` in degrees, +yaw = head turned to
        its left, +pitch = chin up, +roll = clockwise in the image.
    """
    from portrait3d.face.pose import angles_from_rotation
    from portrait3d.geometry.render import rotation_from_view

    v = torch.as_tensor(np.asarray(view.detach().cpu() if isinstance(view, torch.Tensor) else view,
                                   dtype=np.float64))
    single = v.ndim == 1
    v = v.reshape(-1, v.shape[-1])[:, :3]
    rot, _ = rotation_from_view(v)
    head = rot.numpy() @ _F
    out = np.array([angles_from_rotation(r) for r in head], dtype=np.float64).reshape(-1, 3)
    return out[0] if single else out


def view_from_head_pose(yaw: float | Sequence[float] | np.ndarray, pitch: float | Sequence[float] | np.ndarray = 0.0,
                        roll: float | Sequence[float] | np.ndarray = 0.0) -> torch.Tensor:
    """Inverse of :func:`head_pose_from_view`: float32 ``[N, 6]`` viewpoints (no translation).

    ``R_v = R_fp F`` (``F = F^-1``) decomposed as ``R_z(r_z) R_y(r_y) R_x(r_x)``:
    ``r_y = asin(-R[2, 0])``, ``r_x = atan2(R[2, 1], R[2, 2])``, ``r_z = atan2(R[1, 0], R[0, 0])``.
    Angles broadcast; degrees in, radians out.
    """
    from portrait3d.face.pose import rotation_from_angles

    y, p, r = np.broadcast_arrays(np.atleast_1d(np.asarray(yaw, np.float64)), np.asarray(pitch, np.float64),
                                  np.asarray(roll, np.float64))
    rows = []
    for a, b, c in zip(y.ravel(), p.ravel(), r.ravel()):
        rv = rotation_from_angles(a, b, c) @ _F
        ry = math.asin(min(1.0, max(-1.0, -rv[2, 0])))
        rx = math.atan2(rv[2, 1], rv[2, 2])
        rz = math.atan2(rv[1, 0], rv[0, 0])
        rows.append([rx, ry, rz, 0.0, 0.0, 0.0])
    return torch.tensor(rows, dtype=torch.float32)

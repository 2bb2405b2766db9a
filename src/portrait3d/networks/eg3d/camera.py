"""EG3D camera utilities (pure PyTorch reimplementation of ``eg3d/camera_utils.py``).

EG3D camera convention
----------------------
* World frame: y up; faces look toward **+z** (the frontal camera sits on the +z axis).
  For a face looking toward +z with +y up, the subject's *left* is world **+x** and the
  subject's right is world -x.
* Extrinsics are camera-to-world matrices in the OpenCV convention: camera x = image right,
  camera y = image down, camera z = viewing direction. For the frontal camera the rotation is
  ``diag(1, -1, -1)``, so world +x (the subject's left) appears on the image right, as in an
  ordinary, non-mirrored photograph.
* Intrinsics are normalized by the image size (principal point at ``(0.5, 0.5)``).
* The conditioning / rendering label ``c`` is ``[cam2world.flatten() (16), intrinsics.flatten() (9)]``
  (row-major), shape ``[25]``.

Angles
------
:func:`camera_from_angles` takes head-pose angles in degrees: yaw 0 / pitch 0 is frontal,
positive yaw turns the head to its left, positive pitch tilts it up, and the optional positive
roll tilts the head toward its left shoulder (the camera turns about its viewing axis; in the image
the face turns clockwise). :func:`pose_angles_from_camera` inverts it, roll included. :func:`look_at_pose` keeps
EG3D's raw ``LookAtPoseSampler`` parameters (``horizontal``, ``vertical`` in radians), with which
the official scripts pass ``pi/2 + angle_y`` and ``pi/2 + angle_p``: there a positive ``angle_y``
turns the head to its *right*, and ``angle_p`` is not a geometric angle (the camera elevation is
``asin(-2 angle_p / pi)``). The camera always sits at ``radius`` from the world origin (not from
the pivot) and looks at the pivot.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

from portrait3d.geometry.rotations import axis_rotation

__all__ = [
    "fov_to_intrinsics",
    "normalize_vecs",
    "create_cam2world_matrix",
    "look_at_pose",
    "camera_vector",
    "camera_from_angles",
    "angles_from_camera",
    "pose_angles_from_camera",
    "roll_from_camera",
]

AngleLike = Union[float, Sequence[float], torch.Tensor]


def fov_to_intrinsics(fov_deg: float, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Normalized pinhole intrinsics from a field of view, as EG3D's ``FOV_to_intrinsics``.

    The official code approximates pi by ``3.14159`` and sqrt(2) by ``1.414``; both constants are
    kept here so the focal length is bit-identical (``fov_deg=18.837`` gives ``f = 4.2634``).

    Args:
        fov_deg: field of view in degrees.
        device: device of the returned tensor.

    Returns:
        float32 tensor ``[3, 3]``: ``[[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]``.
    """
    focal_length = float(1 / (math.tan(fov_deg * 3.14159 / 360) * 1.414))
    return torch.tensor(
        [[focal_length, 0, 0.5], [0, focal_length, 0.5], [0, 0, 1]], device=device
    )


def normalize_vecs(vectors: torch.Tensor) -> torch.Tensor:
    """Divide by the L2 norm over the last dim (no epsilon, as official ``math_utils``).

    Args:
        vectors: tensor ``[..., D]``.

    Returns:
        tensor ``[..., D]`` of unit vectors.
    """
    return vectors / torch.norm(vectors, dim=-1, keepdim=True)


def create_cam2world_matrix(forward: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrix from a viewing direction and a camera position (y up, no roll).

    Args:
        forward: viewing directions ``[N, 3]`` (need not be normalized).
        origin: camera positions ``[N, 3]``.

    Returns:
        cam2world ``[N, 4, 4]`` (OpenCV axes: columns are right, down, forward, position).
    """
    forward = normalize_vecs(forward)
    up = torch.tensor([0, 1, 0], dtype=torch.float, device=origin.device).expand_as(forward)

    # Sign flips make camera x = image right and camera y = image down (OpenCV).
    right = -normalize_vecs(torch.cross(up, forward, dim=-1))
    up = normalize_vecs(torch.cross(forward, right, dim=-1))

    n = forward.shape[0]
    rotation = torch.eye(4, device=origin.device).unsqueeze(0).repeat(n, 1, 1)
    rotation[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    translation = torch.eye(4, device=origin.device).unsqueeze(0).repeat(n, 1, 1)
    translation[:, :3, 3] = origin
    # Same matmul as official so -0/+0 and rounding are identical.
    return translation @ rotation


def _as_column(value: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Float32 column ``[B, 1]`` from a Python float or a tensor ``[B]``/``[B, 1]``/scalar."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(-1, 1)
    return torch.full((1, 1), float(value), dtype=torch.float32, device=device)


def look_at_pose(
    horizontal_rad: Union[float, torch.Tensor],
    vertical_rad: Union[float, torch.Tensor],
    lookat: torch.Tensor,
    radius: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """``LookAtPoseSampler.sample`` without randomness (zero standard deviations).

    ``horizontal_rad`` is the azimuth (``pi/2`` = on the +z axis), ``vertical_rad`` the polar
    parameter (``pi/2`` = horizontal), clamped to ``[1e-5, pi - 1e-5]`` as official. The camera is
    placed at distance ``radius`` from the world origin and looks at ``lookat``.

    Args:
        horizontal_rad: float or tensor ``[B]``.
        vertical_rad: float or tensor ``[B]`` (broadcast against ``horizontal_rad``).
        lookat: point looked at, ``[3]`` (or ``[B, 3]``).
        radius: float or tensor ``[B]``.

    Returns:
        cam2world ``[B, 4, 4]`` (``B = 1`` for scalar inputs).
    """
    device = lookat.device
    h = _as_column(horizontal_rad, device)
    v = _as_column(vertical_rad, device)
    h, v = torch.broadcast_tensors(h, v)
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)

    theta = h
    v = v / math.pi
    phi = torch.arccos(1 - 2 * v)

    if isinstance(radius, torch.Tensor):
        radius = radius.to(device=device, dtype=torch.float32).reshape(-1, 1)
    batch = h.shape[0]
    origins = torch.zeros((batch, 3), device=device)
    origins[:, 0:1] = radius * torch.sin(phi) * torch.cos(math.pi - theta)
    origins[:, 2:3] = radius * torch.sin(phi) * torch.sin(math.pi - theta)
    origins[:, 1:2] = radius * torch.cos(phi)

    forward = normalize_vecs(lookat.to(torch.float32) - origins)
    return create_cam2world_matrix(forward, origins)


def camera_vector(cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Pack extrinsics and intrinsics into EG3D's 25-d camera label.

    Args:
        cam2world: ``[N, 4, 4]``.
        intrinsics: ``[3, 3]`` (shared) or ``[N, 3, 3]``.

    Returns:
        ``[N, 25]``: 16 row-major cam2world entries followed by 9 row-major intrinsics entries.
    """
    n = cam2world.shape[0]
    intr = intrinsics.reshape(-1, 9).to(cam2world)
    if intr.shape[0] == 1:
        intr = intr.expand(n, 9)
    return torch.cat([cam2world.reshape(-1, 16), intr], dim=1)


def _is_batched(x: AngleLike) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() > 0
    return not isinstance(x, (int, float))


def camera_from_angles(
    yaw_deg: AngleLike,
    pitch_deg: AngleLike,
    radius: float = 2.7,
    fov_deg: float = 18.837,
    pivot: Sequence[float] = (0.0, 0.0, 0.2),
    roll_deg: AngleLike = 0.0,
) -> torch.Tensor:
    """EG3D 25-d camera label for a head pose given as true angles in degrees.

    Conventions (portrait3d's, stated in head-pose terms so that estimated poses plug in):

    * yaw 0, pitch 0: the camera looks at the face from the front, at ``(0, 0, radius)``.
    * positive **yaw** turns the head to **its left** (the camera moves around to the subject's
      right, world -x; the nose points toward the image right). Yaw is the geometric azimuth.
    * positive **pitch** tilts the head **up** (the camera moves below the face, world -y, and
      sees more of the chin). Pitch is the geometric elevation of the camera, negated.
    * positive **roll** tilts the head toward **its left shoulder**: the camera is rotated about
      its own viewing axis (its position and the point it looks at are unchanged) so that the face
      turns **clockwise** in the image by ``roll`` (the top of the head moves toward the image
      right): camera coordinates become ``Rz(roll) @ p``. With roll 0 (the default) the label is
      exactly EG3D's look-at camera.

    The camera sits at ``radius`` from the world origin and looks at ``pivot`` with the EG3D
    look-at frame and :func:`fov_to_intrinsics`, exactly as ``LookAtPoseSampler`` does. In EG3D's
    raw sampler parameters this is ``horizontal = pi/2 - yaw`` and
    ``vertical = (pi/2) (1 + sin(pitch))``: EG3D's scripts add their "pitch" to ``vertical``
    directly, which is not a geometric angle (see :func:`look_at_pose` to reproduce those).

    Args:
        yaw_deg: float, or sequence / tensor ``[N]``.
        pitch_deg: float, or sequence / tensor ``[N]`` (broadcast against ``yaw_deg``), in (-90, 90).
        radius: distance of the camera from the world origin.
        fov_deg: field of view in degrees.
        pivot: point looked at.
        roll_deg: float, or sequence / tensor ``[N]`` (broadcast against the other angles).

    Returns:
        float32 ``[25]`` for scalar angles, ``[N, 25]`` otherwise.
    """
    batched = _is_batched(yaw_deg) or _is_batched(pitch_deg) or _is_batched(roll_deg)
    device = torch.device("cpu")
    for a in (yaw_deg, pitch_deg, roll_deg):
        if isinstance(a, torch.Tensor):
            device = a.device
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float64, device=device).reshape(-1))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float64, device=device).reshape(-1))
    roll = torch.deg2rad(torch.as_tensor(roll_deg, dtype=torch.float64, device=device).reshape(-1))
    yaw, pitch, roll = torch.broadcast_tensors(yaw, pitch, roll)
    if bool((pitch.abs() >= math.pi / 2).any()):
        raise ValueError("pitch must lie strictly between -90 and 90 degrees")
    # Position on the sphere in float64, then the official float32 look-at frame.
    origins = float(radius) * torch.stack(
        [-torch.cos(pitch) * torch.sin(yaw), -torch.sin(pitch), torch.cos(pitch) * torch.cos(yaw)], dim=-1)
    origins = origins.to(torch.float32)
    lookat = torch.tensor(list(pivot), dtype=torch.float32, device=device)
    cam2world = create_cam2world_matrix(normalize_vecs(lookat - origins), origins)
    if bool((roll != 0).any()):
        # world2cam' = Rz(roll) world2cam in camera axes (x right, y down), i.e.
        # cam2world' = cam2world Rz(roll)^T; computed in float64 and rounded once.
        rz_t = axis_rotation(roll, 2).transpose(-1, -2)
        cam2world = cam2world.clone()
        cam2world[:, :3, :3] = (cam2world[:, :3, :3].to(torch.float64) @ rz_t).to(torch.float32)
    c = camera_vector(cam2world, fov_to_intrinsics(fov_deg, device=device))
    return c if batched else c[0]


def angles_from_camera(
    c: torch.Tensor,
) -> Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor], Union[float, torch.Tensor]]:
    """Inverse of :func:`camera_from_angles` from the camera position (pivot and FOV are not recovered).

    ``radius = |t|``, ``yaw = atan2(-t_x, t_z)``, ``pitch = asin(-t_y / radius)`` with ``t`` the camera
    position (``c[[3, 7, 11]]``), in float64.

    Args:
        c: camera label ``[25]`` or ``[N, 25]`` (or a cam2world ``[4, 4]`` / ``[N, 4, 4]``).

    Returns:
        ``(yaw_deg, pitch_deg, radius)``: Python floats for a single camera, float64 tensors ``[N]``
        otherwise.
    """
    single = c.dim() == 1 or (c.dim() == 2 and c.shape == (4, 4))
    flat = c.reshape(-1, 16) if c.shape[-1] == 4 else c.reshape(-1, c.shape[-1])
    t = flat[:, [3, 7, 11]].to(torch.float64)
    radius = torch.linalg.vector_norm(t, dim=-1)
    yaw = torch.rad2deg(torch.atan2(-t[:, 0], t[:, 2]))
    pitch = torch.rad2deg(torch.asin((-t[:, 1] / radius).clamp(-1, 1)))
    if single:
        return float(yaw[0]), float(pitch[0]), float(radius[0])
    return yaw, pitch, radius


def _flat16(c: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """``[N, 16]`` cam2world entries of a label ``[25]`` / ``[N, 25]`` or cam2world ``[4, 4]`` / ``[N, 4, 4]``."""
    single = c.dim() == 1 or (c.dim() == 2 and c.shape == (4, 4))
    flat = c.reshape(-1, 16) if c.shape[-1] == 4 else c.reshape(-1, c.shape[-1])
    return flat[:, :16], single


def roll_from_camera(c: torch.Tensor) -> Union[float, torch.Tensor]:
    """Roll in degrees (rotation about the viewing axis) of a camera, as :func:`camera_from_angles` sets it.

    ``roll = atan2(R[1, 0], -R[1, 1])`` with ``R`` the cam2world rotation (``R[1, 0]``: world-y
    component of the camera's right axis, ``R[1, 1]``: that of its down axis), in float64. It is 0
    for EG3D's look-at cameras (their right axis is horizontal).

    Args:
        c: camera label ``[25]`` or ``[N, 25]`` (or a cam2world ``[4, 4]`` / ``[N, 4, 4]``).

    Returns:
        Python float for a single camera, float64 tensor ``[N]`` otherwise.
    """
    flat, single = _flat16(c)
    r = flat.to(torch.float64)
    roll = torch.rad2deg(torch.atan2(r[:, 4], -r[:, 5]))
    return float(roll[0]) if single else roll


def pose_angles_from_camera(
    c: torch.Tensor,
) -> Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor], Union[float, torch.Tensor],
           Union[float, torch.Tensor]]:
    """Inverse of :func:`camera_from_angles` including roll: ``(yaw_deg, pitch_deg, roll_deg, radius)``.

    ``yaw``, ``pitch`` and ``radius`` are those of :func:`angles_from_camera` (camera position
    around the world origin); ``roll`` is :func:`roll_from_camera`.

    Args:
        c: camera label ``[25]`` or ``[N, 25]`` (or a cam2world ``[4, 4]`` / ``[N, 4, 4]``).

    Returns:
        Python floats for a single camera, float64 tensors ``[N]`` otherwise.
    """
    yaw, pitch, radius = angles_from_camera(c)
    return yaw, pitch, roll_from_camera(c), radius

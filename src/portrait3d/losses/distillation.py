"""Losses that distil a 3D generator from a 2D teacher's samples (see :mod:`portrait3d.training.teacher`).

* :func:`reconstruction_loss`: the render of the teacher's latent from the teacher sample's camera against the
  sample, at the output resolution and at the neural-rendering resolution (EG3D's ``image_raw``);
* :func:`mesh_depth_loss`: the rendered depth at the face-mesh points against the mesh's own relative depth, up to
  a per-sample shift (the mesh fixes the shape of the face, not its distance); :func:`relief_loss` is the same
  for any depth map whose pixel size is known (LiftedGAN's canonical depth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mesh_depth_loss", "reconstruction_loss", "relief_loss", "world_units_per_pixel"]


def reconstruction_loss(image: torch.Tensor, image_raw: torch.Tensor, target: torch.Tensor,
                        perceptual: torch.nn.Module | None = None, perceptual_weight: float = 1.0) -> torch.Tensor:
    """Per-sample ``L1(image, x) + L1(image_raw, down(x)) + w_p * P(image, x)``, shape ``[N]``.

    Args:
        image: the super-resolved render ``[N, 3, R, R]`` in ``[-1, 1]``.
        image_raw: the neural render ``[N, 3, r, r]`` (its first three feature channels).
        target: the teacher sample ``[N, 3, R, R]``.
        perceptual: a feature distance ``(x, y) -> [N]`` (e.g. :class:`~portrait3d.losses.perceptual.PerceptualLoss`)
            on the full-size images, or None.
    """
    # antialiased resizing has no bfloat16 kernel on the CPU: resize in float32, then match the renders
    raw_target = F.interpolate(target.float(), size=image_raw.shape[-2:], mode="bilinear", align_corners=False,
                               antialias=True).to(image_raw.dtype)
    target = target.to(image.dtype)
    loss = (image - target).abs().mean([1, 2, 3]) + (image_raw - raw_target).abs().mean([1, 2, 3])
    if perceptual is not None and perceptual_weight > 0:
        loss = loss + perceptual_weight * perceptual(image, target).to(loss.dtype)
    return loss


def world_units_per_pixel(cameras: torch.Tensor, resolution: int) -> torch.Tensor:
    """Size of one pixel at the look-at distance, ``[N]``: ``|t| / (f_x R)`` for EG3D cameras ``[N, 25]`` (the
    cam2world translation ``t`` and the normalised focal length ``f_x``)."""
    c2w = cameras[:, :16].view(-1, 4, 4)
    return c2w[:, :3, 3].norm(dim=1) / (cameras[:, 16] * resolution)


def mesh_depth_loss(depth: torch.Tensor, mesh: torch.Tensor, cameras: torch.Tensor, resolution: int,
                    scale: float = 1.0) -> torch.Tensor:
    """Shift-invariant L1 between rendered depth and the face mesh's relative depth, per sample ``[N]``.

    :func:`relief_loss` with the pixel size of EG3D cameras, ``u`` = :func:`world_units_per_pixel`: only the
    relief counts, so a flat billboard pays the whole depth range of the face and a head at any distance pays
    nothing.

    Args:
        depth: rendered depth ``[N, 1, h, w]`` (ray distance, world units) over the same field of view as the
            ``resolution`` x ``resolution`` image the mesh was measured on.
        mesh: ``[N, P, 3]`` points ``(x, y, z)`` in that image's pixels (pixel centres at integers).
        cameras: ``[N, 25]`` EG3D cameras of the images.
        scale: ``s``, how far to trust the mesh's depth scale (MediaPipe's ``z`` is only roughly metric).
    """
    return relief_loss(depth, mesh, scale * world_units_per_pixel(cameras, resolution), resolution)


def relief_loss(depth: torch.Tensor, mesh: torch.Tensor, units: torch.Tensor | float, resolution: int) -> torch.Tensor:
    """Shift-invariant L1 between a depth map and a face mesh's relative depth, per sample ``[N]``.

    With ``d_i`` the depth bilinearly sampled at mesh point ``i`` and ``t_i = z_i u`` the mesh's depth in world
    units (``z_i`` in pixels, ``u`` the world size of one pixel), the loss is ``mean_i |d_i - t_i - b|`` with
    ``b = median_i (d_i - t_i)`` (held fixed), over the points inside the image.

    Args:
        depth: ``[N, 1, h, w]`` over the same field of view as the ``resolution`` x ``resolution`` image the mesh
            was measured on.
        mesh: ``[N, P, 3]`` points ``(x, y, z)`` in that image's pixels (pixel centres at integers), ``z``
            larger = farther, as ``depth``.
        units: ``u``, world units per pixel, a scalar or ``[N]``.
    """
    grid = ((mesh[..., :2] + 0.5) / resolution * 2 - 1).to(depth.dtype)
    d = F.grid_sample(depth, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)[:, 0, 0]
    u = torch.as_tensor(units, dtype=d.dtype, device=d.device).reshape(-1, 1)
    t = mesh[..., 2].to(d.dtype) * u
    r = d - t
    inside = (grid.abs() <= 1).all(-1).to(d.dtype)
    b = r.detach().median(dim=1, keepdim=True).values
    return ((r - b).abs() * inside).sum(1) / inside.sum(1).clamp_min(1)

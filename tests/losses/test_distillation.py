"""Distillation losses: reconstruction against a teacher sample and shift-invariant mesh depth."""

from __future__ import annotations

import torch

from portrait3d.losses.distillation import mesh_depth_loss, reconstruction_loss, world_units_per_pixel
from portrait3d.networks.eg3d.camera import camera_from_angles

R = 64


def _cams(n: int) -> torch.Tensor:
    return torch.stack([camera_from_angles(0.0, 0.0)] * n)


def test_reconstruction_is_zero_on_the_target_and_grows_with_the_error():
    x = torch.rand(2, 3, R, R) * 2 - 1
    raw = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert reconstruction_loss(x, raw, x).abs().max() < 1e-6
    small = reconstruction_loss(x + 0.1, raw, x)
    big = reconstruction_loss(x + 0.5, raw + 0.5, x)
    assert (small > 0.09).all() and (big > small).all()


def test_world_units_per_pixel_is_the_pixel_size_at_the_look_at_distance():
    c = _cams(1)
    radius, focal = c[0, :16].view(4, 4)[:3, 3].norm(), c[0, 16]
    assert torch.allclose(world_units_per_pixel(c, R), radius / (focal * R))


def _mesh(n: int, points: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, points, 2, generator=g) * (R - 16) + 8
    z = -12 * torch.exp(-((xy - R / 2) ** 2).sum(-1) / 200)  # a nose-like bump toward the camera
    return torch.cat([xy, z[..., None]], -1)


def _depth_of(mesh_z_fn, cams: torch.Tensor, offset: float) -> torch.Tensor:
    """A depth map that is exactly the relief ``mesh_z_fn(x, y)`` in world units plus ``offset``."""
    ys, xs = torch.meshgrid(torch.arange(R, dtype=torch.float32), torch.arange(R, dtype=torch.float32), indexing="ij")
    u = world_units_per_pixel(cams, R)
    return (offset + mesh_z_fn(xs, ys)[None] * u[:, None, None])[:, None]


def test_mesh_depth_is_zero_for_the_true_relief_at_any_distance_and_large_for_a_billboard():
    cams = _cams(2)
    mesh = _mesh(2)

    def bump(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -12 * torch.exp(-((x - R / 2) ** 2 + (y - R / 2) ** 2) / 200)

    for offset in (2.0, 2.7, 3.1):
        assert mesh_depth_loss(_depth_of(bump, cams, offset), mesh, cams, R).max() < 2e-4
    flat = mesh_depth_loss(torch.full((2, 1, R, R), 2.7), mesh, cams, R)
    assert (flat > 0.005).all()  # the relief of the bump, a few pixels' worth of world units
    inverted = mesh_depth_loss(_depth_of(lambda x, y: -bump(x, y), cams, 2.7), mesh, cams, R)
    assert (inverted > flat).all()  # a hollow face is worse than a flat one


def test_mesh_depth_backpropagates_to_the_depth_map():
    cams = _cams(1)
    depth = torch.full((1, 1, R, R), 2.7, requires_grad=True)
    mesh_depth_loss(depth, _mesh(1), cams, R).sum().backward()
    assert depth.grad is not None and depth.grad.abs().sum() > 0

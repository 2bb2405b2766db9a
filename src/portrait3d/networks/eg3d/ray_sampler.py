"""EG3D ray sampler (pure PyTorch reimplementation of ``volumetric_rendering/ray_sampler.py``)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["RaySampler"]


class RaySampler(torch.nn.Module):
    """One ray per pixel centre for OpenCV-convention cameras with normalized intrinsics.

    Pixels are ordered row-major (index ``= row * resolution + col``); pixel ``(row, col)`` has
    normalized image coordinates ``u = (col + 0.5) / res``, ``v = (row + 0.5) / res``. The skew
    term is handled as in the official code. No parameters or buffers.
    """

    def forward(
        self, cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Generate rays.

        Args:
            cam2world: camera-to-world matrices ``[N, 4, 4]``.
            intrinsics: normalized intrinsics ``[N, 3, 3]``.
            resolution: image side length ``R`` (``M = R * R`` rays).

        Returns:
            ``(ray_origins [N, M, 3], ray_dirs [N, M, 3])``, directions of unit length.
        """
        n, m = cam2world.shape[0], resolution**2
        device = cam2world.device
        cam_locs_world = cam2world[:, :3, 3]
        fx = intrinsics[:, 0, 0].unsqueeze(-1)
        fy = intrinsics[:, 1, 1].unsqueeze(-1)
        cx = intrinsics[:, 0, 2].unsqueeze(-1)
        cy = intrinsics[:, 1, 2].unsqueeze(-1)
        sk = intrinsics[:, 0, 1].unsqueeze(-1)

        idx = torch.arange(resolution, dtype=torch.float32, device=device)
        uv = torch.stack(torch.meshgrid(idx, idx, indexing="ij")) * (1.0 / resolution) + (
            0.5 / resolution
        )
        # flip(0): first component becomes the column index (u), second the row index (v).
        uv = uv.flip(0).reshape(2, -1).transpose(1, 0)
        uv = uv.unsqueeze(0).repeat(n, 1, 1)

        x_cam = uv[:, :, 0].view(n, -1)
        y_cam = uv[:, :, 1].view(n, -1)
        z_cam = torch.ones((n, m), device=device)

        # Operation order kept from the official code (float32 parity).
        x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx * z_cam
        y_lift = (y_cam - cy) / fy * z_cam

        cam_rel_points = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
        world_rel_points = torch.bmm(cam2world, cam_rel_points.permute(0, 2, 1)).permute(0, 2, 1)[
            :, :, :3
        ]

        ray_dirs = world_rel_points - cam_locs_world[:, None, :]
        ray_dirs = F.normalize(ray_dirs, dim=2)
        ray_origins = cam_locs_world.unsqueeze(1).repeat(1, ray_dirs.shape[1], 1)
        return ray_origins, ray_dirs

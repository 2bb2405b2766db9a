"""Tensor -> image conversion and grids (files are written with :func:`portrait3d.face.io.save_image`)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "depth_to_uint8", "make_grid"]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` (or ``[C, H, W]``) in ``[-1, 1]`` -> ``uint8 [N, H, W, C]`` (or ``[H, W, C]``)."""
    squeeze = img.ndim == 3
    if squeeze:
        img = img[None]
    x = (img.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[0] if squeeze else x


def depth_to_uint8(depth: torch.Tensor) -> np.ndarray:
    """``[N, 1, H, W]`` depth -> ``uint8 [N, H, W, 3]``, near = bright, normalised per image."""
    d = depth.detach().float().cpu()
    lo = d.amin(dim=(1, 2, 3), keepdim=True)
    hi = d.amax(dim=(1, 2, 3), keepdim=True)
    x = 1 - (d - lo) / (hi - lo).clamp_min(1e-8)
    return (x * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [N, H, W, C]`` into one image with ``cols`` columns and white padding."""
    n, h, w, c = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid

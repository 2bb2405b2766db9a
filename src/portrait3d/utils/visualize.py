"""Everything that turns tensors into pictures: images, depth, normals, shading, grids, landmark overlays.

Files are written with :func:`portrait3d.face.io.save_image` or :mod:`portrait3d.utils.io`.
Conventions: images are ``[-1, 1]`` RGB tensors ``[N, 3, H, W]``; depth maps are camera distances (near = bright in
every picture); normals face the camera (``y`` down, ``n_z < 0``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "from_uint8", "depth_to_uint8", "colour_depth", "normal_to_uint8", "shading_to_uint8", "make_grid",
           "draw_points"]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` (or ``[C, H, W]``) in ``[-1, 1]`` -> ``uint8 [N, H, W, C]`` (or ``[H, W, C]``)."""
    squeeze = img.ndim == 3
    if squeeze:
        img = img[None]
    x = (img.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[0] if squeeze else x


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`to_uint8` up to rounding: ``uint8 [N, H, W, C]`` (or ``[H, W, C]``, which gains the
    batch axis) -> float ``[N, C, H, W]`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


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


def colour_depth(depth: torch.Tensor, size: int) -> np.ndarray:
    """``[N, 1, h, w]`` depth -> ``uint8 [N, size, size, 3]``: near = bright (matplotlib 'inferno'),
    normalised per image between its 1st and 99th depth percentiles."""
    from matplotlib import colormaps

    d = torch.nn.functional.interpolate(depth.float().cpu(), size=(size, size), mode="bilinear",
                                        align_corners=False)[:, 0]
    flat = d.flatten(1)
    lo = flat.quantile(0.01, dim=1)[:, None, None]
    hi = flat.quantile(0.99, dim=1)[:, None, None]
    x = (1 - (d - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).numpy()
    return (colormaps["inferno"](x)[..., :3] * 255).round().astype(np.uint8)


def normal_to_uint8(normal: torch.Tensor) -> np.ndarray:
    """Camera-facing normals ``[N, 3, H, W]`` (``y`` down, ``n_z < 0``) -> ``uint8 [N, H, W, 3]`` in the
    usual normal-map colours (red = right, green = up, blue = towards the viewer)."""
    n = normal.detach().float().cpu() * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    return ((n + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def shading_to_uint8(shading: torch.Tensor) -> np.ndarray:
    """Shading ``[N, 1, H, W]`` -> grey ``uint8 [N, H, W, 3]``, each image divided by its maximum."""
    s = shading.detach().float().cpu()
    s = s / s.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return (s.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def draw_points(image: np.ndarray, points01: np.ndarray, color: tuple[int, int, int], radius: int = 1) -> np.ndarray:
    """Copy of ``image`` (uint8) with normalised points ``[L, 2]`` drawn as filled dots."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    for x, y in np.asarray(points01, dtype=np.float64):
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(out, (int(round(x * w - 0.5)), int(round(y * h - 0.5))), radius, color, -1, cv2.LINE_AA)
    return out

"""Image sharpness: the variance of the Laplacian, a blur measure that needs no learned network.

A blurred image loses the high frequencies the Laplacian responds to, so its variance falls (Pech-Pacheco et al.,
*Diatom autofocusing in brightfield microscopy*, ICPR 2000). It compares generators with real photos at one
resolution: it says nothing about whether the detail is plausible, only whether there is any.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["laplacian_variance", "mean_laplacian_variance"]

_LUMA = np.array([0.299, 0.587, 0.114])


def laplacian_variance(image: np.ndarray) -> float:
    """``Var(∇²Y)`` of one image's luma ``Y`` in ``[0, 1]``, with the 4-neighbour Laplacian
    ``∇²Y[i, j] = Y[i-1, j] + Y[i+1, j] + Y[i, j-1] + Y[i, j+1] - 4 Y[i, j]`` over the interior pixels.

    Args:
        image: ``uint8 [H, W, 3]`` RGB or ``[H, W]`` grey, ``H, W >= 3``.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected a uint8 [H, W, 3] or [H, W] image, got {img.dtype} {img.shape}")
    if min(img.shape[:2]) < 3:
        raise ValueError(f"the image must be at least 3 x 3 pixels, got {img.shape[:2]}")
    y = (img.astype(np.float64) @ _LUMA if img.ndim == 3 else img.astype(np.float64)) / 255.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return float(lap.var())


def mean_laplacian_variance(images: Iterable[np.ndarray]) -> float:
    """Mean of :func:`laplacian_variance` over ``images`` (an array ``[N, H, W, 3]`` or an iterable of images)."""
    values = [laplacian_variance(im) for im in images]
    if not values:
        raise ValueError("no images")
    return float(np.mean(values))

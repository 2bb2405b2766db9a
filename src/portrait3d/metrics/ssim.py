"""SSIM and MS-SSIM in pure PyTorch (differentiable).

SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) compares local means, variances and covariance under
a Gaussian window ``w`` (side ``win``, std ``sigma``, normalised to sum 1)::

    mu_x = w * x,  sigma_x^2 = w * x^2 - mu_x^2,  sigma_xy = w * (x y) - mu_x mu_y
    l  = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)              (luminance)
    cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)         (contrast-structure)
    SSIM = mean(l * cs),   C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range

The filtering is "valid" (no padding): only window positions fully inside the image are averaged,
which is what ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` reports (it filters the whole image, then crops the ``(win - 1) / 2``
border before averaging). Colour images are scored per channel and the channels averaged (as
skimage's ``channel_axis``).

MS-SSIM (Wang, Simoncelli, Bovik 2003) evaluates the contrast-structure term at ``M`` scales,
halving the image between scales with a 2x2 average pool (an odd last row / column is dropped),
and the luminance term only at the coarsest scale::

    MS-SSIM = mean(l_M * cs_M)^(w_M) * prod_{j < M} mean(cs_j)^(w_j)

computed per channel (negative per-channel means are clamped to 0 before the fractional power,
as common implementations do) and then averaged over the channels. The standard configuration
uses 5 scales with the weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` and an 11-px window,
which needs images of at least ``11 * 2^4 = 176`` px: it does **not** fit the 128 px images of
portrait3d's generators (the 4th halving gives 8 px < 11). The remedy used here (the usual one for
small images): keep only the first ``M`` scales at which the image side is still at least ``win``
(4 scales for 128 px: 128, 64, 32, 16) and renormalise their weights to sum to 1; the window size is
unchanged. :func:`ms_ssim_scales` tells how many scales an image size gets; with one scale
MS-SSIM equals SSIM.

Shapes: ``x``, ``y`` ``[N, C, H, W]`` (same shape, same value range, e.g. ``[-1, 1]`` with
``data_range=2``) -> ``[N]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["MS_SSIM_WEIGHTS", "gaussian_window", "ssim", "ms_ssim", "ms_ssim_scales"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang et al. 2003 (finest scale first)."""

K1, K2 = 0.01, 0.03


def gaussian_window(win: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """1-D Gaussian ``[win]`` centred on the middle tap, normalised to sum 1 (``win`` odd)."""
    if win < 1 or win % 2 == 0:
        raise ValueError(f"win must be a positive odd number, not {win}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    r = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images, got {x.dtype} (convert and set data_range)")


def _filter(img: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable "valid" Gaussian filtering of ``[N, C, H, W]`` -> ``[N, C, H - win + 1, W - win + 1]``."""
    c = img.shape[1]
    k = g.numel()
    out = F.conv2d(img, g.reshape(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(out, g.reshape(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, g: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means ``(SSIM [N, C], contrast-structure [N, C])`` over the valid window positions."""
    win = g.numel()
    if min(x.shape[-2:]) < win:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the {win}-px window")
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    n, c = x.shape[:2]
    # one filtering pass over the five statistics
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu_x, mu_y, xx, yy, xy = stats.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
    return (lum * cs_map).reshape(n, c, -1).mean(-1), cs_map.reshape(n, c, -1).mean(-1)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Gaussian window, valid positions only, channels averaged).

    Args:
        x, y: ``[N, C, H, W]`` floating-point images of one shape; ``H, W >= win``.
        data_range: max - min of the value range (2 for ``[-1, 1]``, 1 for ``[0, 1]``, 255 for bytes).
        win: odd window side; sigma: Gaussian std in pixels.
    Returns:
        ``[N]`` (1 for identical images), differentiable w.r.t. both inputs.
    Raises:
        ValueError: shapes differ, not 4-D, or smaller than the window.
    """
    _check_pair(x, y)
    g = gaussian_window(win, sigma, x.dtype, x.device)
    s, _ = _ssim_cs(x, y, float(data_range), g)
    return s.mean(1)


def ms_ssim_scales(size: int, win: int = 11, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Number of MS-SSIM scales for an image side ``size``: the largest ``M <= max_scales`` such that the
    side after ``M - 1`` halvings (``size // 2^(M-1)``) is still at least ``win`` (0 if ``size < win``)."""
    m, s = 0, int(size)
    while m < max_scales and s >= win:
        m += 1
        s //= 2
    return m


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM per image (Wang et al. 2003; see the module docstring for the small-image rule).

    Args:
        x, y: ``[N, C, H, W]`` floating-point images of one shape; ``min(H, W) >= win``.
        data_range: max - min of the value range.
        weights: per-scale exponents, finest scale first. When the image is too small for all of
            them, only the first ``M`` (:func:`ms_ssim_scales`) are used, divided by their sum.
        win, sigma: Gaussian window side (odd) and std.
    Returns:
        ``[N]`` in ``[0, 1]`` (1 for identical images), differentiable.
    Raises:
        ValueError: shapes differ, not 4-D, smaller than the window, or bad weights.
    """
    _check_pair(x, y)
    w = [float(v) for v in weights]
    if not w or any(not (v >= 0) for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {tuple(weights)}")
    m = ms_ssim_scales(min(x.shape[-2:]), win, len(w))
    if m == 0:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the {win}-px window")
    total = sum(w[:m])
    w_t = torch.tensor([v / total for v in w[:m]], dtype=x.dtype, device=x.device)
    g = gaussian_window(win, sigma, x.dtype, x.device)
    values = []
    for j in range(m):
        s, cs = _ssim_cs(x, y, float(data_range), g)
        values.append(s if j == m - 1 else cs)
        if j < m - 1:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
            y = F.avg_pool2d(y, kernel_size=2, stride=2)
    v = torch.stack(values, dim=0)                        # [M, N, C]
    # v^w with v <= 0 -> 0, written so that the gradient stays finite (no 0^w with w < 1 in the graph)
    pos = v > 0
    powered = torch.where(pos, torch.where(pos, v, torch.ones_like(v)) ** w_t.reshape(m, 1, 1),
                          torch.zeros_like(v))
    per_channel = torch.prod(powered, dim=0)               # [N, C]
    return per_channel.mean(1)

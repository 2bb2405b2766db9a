"""Peak signal-to-noise ratio of 8-bit images."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two ``uint8`` images of one shape: ``10 log10(255^2 / MSE)`` (``inf`` when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)

"""Pure-PyTorch ops shared by the networks and methods."""

from __future__ import annotations

import torch

from portrait3d.networks.ops import gaussian_blur


def test_gaussian_blur_keeps_constants_and_mean():
    x = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)
    y = torch.zeros(1, 1, 9, 9)
    y[..., 4, 4] = 1
    b = gaussian_blur(y, 1.0)
    assert b[..., 4, 4] < 1 and b[..., 4, 4] == b.max() and abs(b.sum().item() - 1) < 1e-5
    assert gaussian_blur(y, 0) is y


def test_gaussian_blur_radius_bounds_the_taps():
    """An explicit radius truncates (and renormalises) the kernel: an impulse spreads exactly ``radius`` pixels."""
    y = torch.zeros(1, 1, 11, 11)
    y[..., 5, 5] = 1
    for radius, expected in ((2, 2), (None, 3)):  # default: ceil(3 sigma)
        b = gaussian_blur(y, 1.0, radius=radius)[0, 0, 5]
        nonzero = (b > 0).nonzero().flatten()
        assert int(nonzero.max() - 5) == expected and int(5 - nonzero.min()) == expected
        assert abs(gaussian_blur(y, 1.0, radius=radius).sum().item() - 1) < 1e-5

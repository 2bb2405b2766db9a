import numpy as np
import pytest

from portrait3d.metrics.sharpness import laplacian_variance, mean_laplacian_variance
from portrait3d.networks.ops import gaussian_blur


def _noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_flat_and_linear_images_have_zero_laplacian():
    assert laplacian_variance(np.full((16, 16, 3), 90, np.uint8)) == 0.0
    ramp = np.tile(np.arange(0, 160, 10, dtype=np.uint8), (16, 1))  # linear in x: the Laplacian is 0
    assert laplacian_variance(ramp) == pytest.approx(0.0, abs=1e-18)


def test_blur_lowers_sharpness_monotonically():
    import torch

    img = _noise(0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    values = [laplacian_variance(img)]
    for sigma in (0.7, 1.5, 3.0):
        blurred = gaussian_blur(x, sigma).round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()
        values.append(laplacian_variance(blurred))
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.05 * values[0]


def test_known_value_and_mean_over_a_set():
    # A checkerboard of 0 / 1: every interior Laplacian is -4 or +4 (luma 0 or 1), so the variance is 16.
    board = ((np.indices((10, 10)).sum(0) % 2) * 255).astype(np.uint8)
    assert laplacian_variance(board) == pytest.approx(16.0)
    imgs = np.stack([_noise(1), _noise(2)])
    expected = (laplacian_variance(imgs[0]) + laplacian_variance(imgs[1])) / 2
    assert mean_laplacian_variance(imgs) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((2, 8, 3), np.uint8),
                                 np.zeros((8, 8, 4), np.uint8)])
def test_bad_images_are_refused(bad):
    with pytest.raises(ValueError):
        laplacian_variance(bad)
    with pytest.raises(ValueError, match="no images"):
        mean_laplacian_variance([])

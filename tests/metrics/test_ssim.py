"""portrait3d.metrics.ssim: SSIM matches skimage, MS-SSIM behaves (identity, noise, small images, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from portrait3d.metrics.ssim import MS_SSIM_WEIGHTS, gaussian_window, ms_ssim, ms_ssim_scales, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 2, c: int = 3, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth image pair in ``[-1, 1]`` ``[n, c, size, size]`` (float64): blurred noise and a noisy copy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g, dtype=torch.float64) * 2 - 1
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)  # blurred: structure at several scales
    x = (x - x.amin()) / (x.amax() - x.amin()) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def test_identical_is_one():
    x, _ = _images()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=x.dtype), atol=1e-12)
    x128 = torch.rand(1, 3, 128, 128) * 2 - 1
    assert torch.allclose(ms_ssim(x128, x128), torch.ones(1), atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "blurred"])
@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_matches_skimage(kind: str, data_range: float):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    if kind == "random":
        x = torch.rand(2, 3, 40, 36, generator=g, dtype=torch.float64)
        y = torch.rand(2, 3, 40, 36, generator=g, dtype=torch.float64)
    else:
        x, y = _images(n=2, c=3, size=40, seed=2)
        x, y = (x + 1) / 2, (y + 1) / 2  # [0, 1]
    x, y = x * data_range, y * data_range
    ours = ssim(x, y, data_range=data_range).numpy()
    for i in range(len(x)):
        ref = structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(), channel_axis=2,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=data_range)
        assert abs(ours[i] - ref) < 1e-3, (kind, i, ours[i], ref)
    # float32 inputs give the same to well within the tolerance
    assert np.allclose(ssim(x.float(), y.float(), data_range=data_range).numpy(), ours, atol=1e-4)


def test_grayscale_matches_skimage():
    from skimage.metrics import structural_similarity

    x, y = _images(n=1, c=1, size=32, seed=3)
    ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=2.0)
    assert abs(float(ssim(x, y)[0]) - ref) < 1e-3


def test_ms_ssim_decreases_with_noise():
    x, _ = _images(n=1, c=3, size=128, seed=4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    scores = [float(ms_ssim(x, (x + s * noise).clamp(-1, 1))[0]) for s in (0.0, 0.05, 0.2, 0.5, 1.0)]
    assert scores[0] == pytest.approx(1.0, abs=1e-9)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_small_image_scales_and_weights():
    assert ms_ssim_scales(256) == 5
    assert ms_ssim_scales(176) == 5
    assert ms_ssim_scales(175) == 4
    assert ms_ssim_scales(128) == 4  # 128, 64, 32, 16 (8 < 11)
    assert ms_ssim_scales(21) == 1
    assert ms_ssim_scales(10) == 0
    # one scale: MS-SSIM is SSIM
    x, y = _images(n=2, c=3, size=20, seed=6)
    assert torch.allclose(ms_ssim(x, y), ssim(x, y), atol=1e-12)
    # 128 px with 5 weights == 128 px with the first 4 (renormalising is scale-free)
    x, y = _images(n=1, c=3, size=128, seed=7)
    assert torch.allclose(ms_ssim(x, y), ms_ssim(x, y, weights=[3 * v for v in MS_SSIM_WEIGHTS[:4]]), atol=1e-12)


def test_shapes_errors_and_gradient():
    x, y = _images(n=3, c=3, size=32, seed=8)
    assert ssim(x, y).shape == (3,) and ms_ssim(x, y).shape == (3,)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[:, :, :31])
    with pytest.raises(ValueError, match="same shape"):
        ms_ssim(x, y[:2])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim(x[0], y[0])
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(ValueError, match="odd"):
        ssim(x, y, win=10)
    with pytest.raises(ValueError, match="weights"):
        ms_ssim(x, y, weights=())
    with pytest.raises(TypeError):
        ssim(x.to(torch.uint8), y.to(torch.uint8))
    assert gaussian_window(11, 1.5).sum().item() == pytest.approx(1.0)
    # differentiable, finite gradients (also where a per-scale term is clamped to 0)
    xr = x.clone().requires_grad_(True)
    (1 - ms_ssim(xr, -y)).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
    xr.grad = None
    (1 - ssim(xr, y)).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0

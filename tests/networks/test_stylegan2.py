"""StyleGAN2 networks: shapes, official call signatures, W/W+, noise, truncation, architectures."""

from __future__ import annotations

import pytest
import torch

from portrait3d.networks import ops
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig


def test_mapping_and_synthesis_shapes(tiny_stylegan2):
    G = tiny_stylegan2
    ws = G.mapping(torch.randn(3, 32), None)
    assert ws.shape == (3, G.num_ws, 32) and G.num_ws == 6
    img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (3, 3, 16, 16)


def test_truncation_and_cutoff(tiny_stylegan2):
    G = tiny_stylegan2
    z = torch.randn(2, 32)
    ws1 = G.mapping(z, None)
    ws0 = G.mapping(z, None, truncation_psi=0)
    assert torch.allclose(ws0, G.mapping.w_avg.expand_as(ws0))
    half = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
    assert torch.allclose(half[:, :2], G.mapping.w_avg.lerp(ws1[:, :2], 0.5))
    assert torch.equal(half[:, 2:], ws1[:, 2:])


def test_w_plus_differs_from_w(tiny_stylegan2):
    G = tiny_stylegan2
    ws = G.mapping(torch.randn(1, 32), None)
    wplus = ws.clone()
    wplus[:, -2:] = G.mapping(torch.randn(1, 32), None)[:, -2:]
    a, b = (G.synthesis(w, noise_mode="const") for w in (ws, wplus))
    assert not torch.allclose(a, b)


def test_noise_modes(tiny_stylegan2):
    G = tiny_stylegan2
    ws = G.mapping(torch.randn(1, 32), None)
    const = [G.synthesis(ws, noise_mode="const") for _ in range(2)]
    rand = [G.synthesis(ws, noise_mode="random") for _ in range(2)]
    assert torch.equal(const[0], const[1]) and not torch.equal(rand[0], rand[1])
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="bogus")


def test_fused_and_unfused_modconv_agree(tiny_stylegan2):
    G = tiny_stylegan2
    ws = G.mapping(torch.randn(2, 32), None)
    a = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    b = G.synthesis(ws, noise_mode="const", fused_modconv=False)
    assert (a - b).abs().max() < 1e-5
    # on a CPU the default is the shared convolution (measured faster there; bench/bench_modconv.py)
    assert torch.equal(G.synthesis(ws, noise_mode="const"), b)


def test_demodulation_equals_the_modulated_weight_norm():
    """modulated_conv2d's demodulation (computed as sum_i s_i^2 sum_k w_oik^2) matches StyleGAN2's eq. 3 written out:
    the modulated weight w'_oik = s_i w_oik divided by its norm over (i, k), as a grouped convolution."""
    from portrait3d.networks.ops import modulated_conv2d

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 9, 9, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    styles = torch.randn(2, 5, generator=g)
    w = weight[None] * styles[:, None, :, None, None]
    w = w / w.square().sum(dim=[2, 3, 4], keepdim=True).add(1e-8).sqrt()
    ref = torch.cat([torch.nn.functional.conv2d(x[n:n + 1], w[n], padding=1) for n in range(2)])
    for fused in (True, False):
        out = modulated_conv2d(x, weight, styles, padding=1, fused_modconv=fused)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["orig", "skip", "resnet"])
def test_architectures_and_labels(arch):
    torch.manual_seed(0)
    G = Generator(StyleGAN2Config(z_dim=16, c_dim=4, w_dim=16, img_resolution=8,
                                  mapping=MappingConfig(num_layers=2),
                                  synthesis=SynthesisConfig(channel_base=64, channel_max=16, architecture=arch)))
    img = G(torch.randn(2, 16), torch.eye(4)[:2])
    assert img.shape == (2, 3, 8, 8) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="label c"):
        G(torch.randn(2, 16), None)


def test_gradient_reaches_ws(tiny_stylegan2):
    ws = tiny_stylegan2.mapping(torch.randn(1, 32), None).detach().requires_grad_(True)
    tiny_stylegan2.synthesis(ws, noise_mode="const").square().mean().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0


def test_shape_errors_are_readable(tiny_stylegan2):
    with pytest.raises(ValueError, match=r"ws has shape \[1, 3, 32\]"):
        tiny_stylegan2.synthesis(torch.zeros(1, 3, 32))


def test_upfirdn2d_matches_direct_convolution():
    """Upsampling by zero insertion + FIR equals a transposed convolution with the filter."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    f = ops.setup_filter([1, 3, 3, 1])
    y = ops.upsample2d(x, f)
    k = (f * 4).flip([0, 1])[None, None].repeat(2, 1, 1, 1)
    ref = torch.nn.functional.conv_transpose2d(x, k, stride=2, padding=1, groups=2)
    assert y.shape == (1, 2, 10, 10)
    assert torch.allclose(y, ref, atol=1e-6)
    # Downsampling keeps a constant image constant.
    d = ops.downsample2d(torch.ones(1, 1, 8, 8), f)
    assert torch.allclose(d[..., 1:-1, 1:-1], torch.ones_like(d[..., 1:-1, 1:-1]))


def test_bias_act_gain_and_clamp():
    x = torch.tensor([-2.0, 1.0, 300.0])
    y = ops.bias_act(x, act="lrelu", clamp=256)
    assert torch.allclose(y[:2], torch.tensor([-0.4, 1.0]) * 2**0.5)
    assert y[2] == 256

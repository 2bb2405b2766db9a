"""Tests for the EG3D ray sampler, ray marcher, renderer, decoder and density grid."""

import math

import numpy as np
import pytest
import torch

from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.networks.eg3d.decoder import OSGDecoder
from portrait3d.networks.eg3d.ray_sampler import RaySampler
from portrait3d.networks.eg3d.renderer import (
    ImportanceRenderer,
    MipRayMarcher2,
    create_samples,
    generate_planes,
    get_ray_limits_box,
    project_onto_planes,
    sample_density_grid,
    sample_from_planes,
)

PIVOT = torch.tensor([0.0, 0.0, 0.2])


def _opts(**kw):
    o = dict(
        ray_start=2.25,
        ray_end=3.3,
        box_warp=1,
        depth_resolution=6,
        depth_resolution_importance=6,
        disparity_space_sampling=False,
        clamp_mode="softplus",
    )
    o.update(kw)
    return o


def _rays(res=4, yaw=(0.0, 15.0), pitch=(0.0, -10.0)):
    c = camera_from_angles(list(yaw), list(pitch))
    return RaySampler()(c[:, :16].view(-1, 4, 4), c[:, 16:].view(-1, 3, 3), res)


def _scene(seed=0):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(2, 3, 8, 8, 8, generator=g)
    torch.manual_seed(seed)
    decoder = OSGDecoder(8, {"decoder_lr_mul": 1, "decoder_output_dim": 4})
    return planes, decoder


# ----------------------------------------------------------------------------- rays


def test_ray_sampler_unit_dirs_and_centre_ray():
    res = 5  # odd, so the centre pixel sits exactly on the principal point
    c = camera_from_angles([0.0, 25.0], [0.0, -12.0])
    cam2world = c[:, :16].view(-1, 4, 4)
    origins, dirs = RaySampler()(cam2world, c[:, 16:].view(-1, 3, 3), res)
    assert origins.shape == (2, res * res, 3) and dirs.shape == (2, res * res, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, res * res), atol=1e-6)
    assert torch.equal(origins, cam2world[:, None, :3, 3].expand(-1, res * res, -1))
    centre = dirs[:, (res * res) // 2]
    to_pivot = PIVOT - cam2world[:, :3, 3]
    assert torch.allclose(centre, to_pivot / to_pivot.norm(dim=-1, keepdim=True), atol=1e-6)


def test_ray_sampler_pixel_layout():
    # Row-major pixels: moving right in the image goes to world +x, down goes to world -y (frontal).
    origins, dirs = _rays(res=4, yaw=(0.0,), pitch=(0.0,))
    d = dirs[0].view(4, 4, 3)
    assert d[0, 3, 0] > d[0, 0, 0]
    assert d[3, 0, 1] < d[0, 0, 1]


# ----------------------------------------------------------------------------- planes


def test_plane_projection_keeps_official_quirk():
    p = torch.tensor([[[0.1, 0.2, 0.3]]])
    proj = project_onto_planes(generate_planes(), p)
    assert torch.allclose(proj[:, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.3, 0.1]]))


def test_sample_from_planes_shape_and_box_warp():
    feats = torch.arange(2 * 3 * 2 * 4 * 4, dtype=torch.float32).view(2, 3, 2, 4, 4)
    coords = torch.zeros(2, 5, 3)
    out = sample_from_planes(generate_planes(), feats, coords, box_warp=1.0)
    assert out.shape == (2, 3, 5, 2)
    # The origin maps to the plane centre: mean of the four central texels.
    assert torch.allclose(out[0, 0, 0], feats[0, 0, :, 1:3, 1:3].mean((-1, -2)))
    far = torch.full((1, 1, 3), 1.0)  # well outside the [-0.5, 0.5] box -> zero padding
    assert torch.equal(sample_from_planes(generate_planes(), feats[:1], far, box_warp=1.0), torch.zeros(1, 3, 1, 2))


# ----------------------------------------------------------------------------- ray marcher


@pytest.mark.parametrize("white_back", [False, True])
def test_ray_marcher_constant_density_slab(white_back):
    n_samples, delta, t0 = 40, 0.05, 2.0
    i0, i1 = 10, 30  # raw density s on samples [i0, i1], effectively zero elsewhere
    sigma = 3.0
    raw = math.log(math.expm1(sigma)) + 1  # softplus(raw - 1) == sigma
    depths = (t0 + delta * torch.arange(n_samples, dtype=torch.float32)).view(1, 1, -1, 1)
    dens = torch.full((1, 1, n_samples, 1), -1e4)
    dens[:, :, i0 : i1 + 1] = raw
    color = torch.tensor([0.2, 0.5, 0.9])
    colors = color.expand(1, 1, n_samples, 3).clone()
    rgb, depth, weights = MipRayMarcher2()(colors, dens, depths, {"clamp_mode": "softplus", "white_back": white_back})
    assert weights.shape == (1, 1, n_samples - 1, 1)

    k = i1 - i0  # intervals fully inside the slab
    q = math.exp(-sigma * delta)
    total = 1 - math.exp(-sigma * k * delta)  # analytic opacity of the slab
    assert abs(weights.sum().item() - total) < 1e-5
    # Discrete expected depth: geometric weights q^j over the slab's interval midpoints.
    mean_j = q / (1 - q) - k * q**k / (1 - q**k)
    expected_depth = t0 + delta * i0 + delta / 2 + delta * mean_j
    assert abs(depth.item() - expected_depth) < 1e-5
    expected_rgb = color * total + ((1 - total) if white_back else 0.0)
    assert torch.allclose(rgb[0, 0], expected_rgb * 2 - 1, atol=1e-5)


def test_ray_marcher_empty_ray_depth_clamped():
    depths = torch.linspace(2.0, 3.0, 8).view(1, 1, 8, 1)
    dens = torch.full((1, 1, 8, 1), -1e4)
    rgb, depth, weights = MipRayMarcher2()(torch.zeros(1, 1, 8, 3), dens, depths, {"clamp_mode": "softplus"})
    assert torch.equal(weights, torch.zeros_like(weights))
    assert depth.item() == pytest.approx(3.0)  # NaN -> inf -> clamped to max depth
    assert torch.equal(rgb, -torch.ones(1, 1, 3))


def test_ray_marcher_rejects_other_clamp_modes():
    x = torch.zeros(1, 1, 3, 1)
    with pytest.raises(ValueError):
        MipRayMarcher2()(x, x, x, {"clamp_mode": "relu"})


# ----------------------------------------------------------------------------- sampling


def test_sample_stratified_deterministic_bin_middles():
    r = ImportanceRenderer()
    origins = torch.zeros(1, 2, 3)
    d = r.sample_stratified(origins, 2.0, 3.0, 5, deterministic=True)
    delta = (3.0 - 2.0) / 4
    expected = torch.linspace(2.0, 3.0, 5) + 0.5 * delta
    assert d.shape == (1, 2, 5, 1)
    assert torch.allclose(d[0, 1, :, 0], expected)
    rnd = r.sample_stratified(origins, 2.0, 3.0, 5)
    assert ((rnd[..., 0] - torch.linspace(2.0, 3.0, 5)) >= 0).all()
    assert ((rnd[..., 0] - torch.linspace(2.0, 3.0, 5)) < delta).all()


def test_sample_stratified_tensor_limits_and_disparity():
    r = ImportanceRenderer()
    origins = torch.zeros(1, 2, 3)
    start = torch.tensor([[[2.0], [2.5]]])
    end = torch.tensor([[[3.0], [3.5]]])
    d = r.sample_stratified(origins, start, end, 3, deterministic=True)
    assert torch.allclose(d[0, 1, :, 0], torch.tensor([2.75, 3.25, 3.75]))
    disp = r.sample_stratified(origins, 2.0, 4.0, 3, disparity_space_sampling=True, deterministic=True)
    s = torch.tensor([0.25, 0.75, 1.25])
    assert torch.allclose(disp[0, 0, :, 0], 1 / (1 / 2.0 * (1 - s) + 1 / 4.0 * s))
    disp_t = r.sample_stratified(origins, start, end, 3, disparity_space_sampling=True, deterministic=True)
    assert disp_t.shape == (1, 2, 3, 1)


def test_sample_pdf_det_monotone_within_bins():
    g = torch.Generator().manual_seed(0)
    bins = torch.cumsum(torch.rand(3, 9, generator=g) + 0.1, -1)
    weights = torch.rand(3, 7, generator=g)
    weights[1, 2:5] = 0.0
    s = ImportanceRenderer.sample_pdf(bins, weights, 16, det=True)
    assert s.shape == (3, 16)
    assert (s[:, 1:] >= s[:, :-1]).all()
    # Each sample lies inside the bin it was drawn from.
    w = weights + 1e-5
    cdf = torch.cat([torch.zeros(3, 1), torch.cumsum(w / w.sum(-1, keepdim=True), -1)], -1)
    u = torch.linspace(0, 1, 16).expand(3, 16).contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    lo = torch.gather(bins, 1, (inds - 1).clamp_min(0))
    hi = torch.gather(bins, 1, inds.clamp_max(7))
    assert ((s >= lo - 1e-6) & (s <= hi + 1e-6)).all()
    assert torch.equal(s, ImportanceRenderer.sample_pdf(bins, weights, 16, det=True))


def test_sample_pdf_uniform_weights_is_linear():
    bins = torch.linspace(1.0, 2.0, 6).expand(2, 6)
    s = ImportanceRenderer.sample_pdf(bins, torch.ones(2, 5), 5, det=True)
    assert torch.allclose(s, torch.linspace(1.0, 2.0, 5).expand(2, 5), atol=1e-6)


def test_ray_limits_box():
    o = torch.tensor([[0.0, 0.0, 2.7], [0.0, 2.0, 2.7]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    tmin, tmax = get_ray_limits_box(o, d, 1.0)
    assert tmin.shape == (2, 1)
    assert torch.allclose(tmin[0], torch.tensor([2.2])) and torch.allclose(tmax[0], torch.tensor([3.2]))
    assert tmin[1].item() == -1 and tmax[1].item() == -2


# ----------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("auto", [False, True])
def test_renderer_deterministic_and_random(auto):
    planes, decoder = _scene()
    origins, dirs = _rays()
    opts = _opts(ray_start="auto", ray_end="auto") if auto else _opts()
    r = ImportanceRenderer()
    with torch.no_grad():
        a = r(planes, decoder, origins, dirs, dict(opts), deterministic=True)
        b = r(planes, decoder, origins, dirs, dict(opts), deterministic=True)
        torch.manual_seed(1)
        c = r(planes, decoder, origins, dirs, dict(opts))
        torch.manual_seed(2)
        d = r(planes, decoder, origins, dirs, dict(opts))
    rgb, depth, wsum = a
    assert rgb.shape == (2, 16, 4) and depth.shape == (2, 16, 1) and wsum.shape == (2, 16, 1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(c[0], d[0])
    assert not torch.equal(a[0], c[0])
    assert torch.isfinite(rgb).all() and (rgb >= -1.01).all() and (rgb <= 1.01).all()


def test_renderer_without_importance_and_disparity():
    planes, decoder = _scene()
    origins, dirs = _rays()
    r = ImportanceRenderer()
    with torch.no_grad():
        rgb, depth, _ = r(planes, decoder, origins, dirs, _opts(depth_resolution_importance=0), deterministic=True)
        rgb2, _, _ = r(planes, decoder, origins, dirs, _opts(disparity_space_sampling=True), deterministic=True)
    assert rgb.shape == rgb2.shape == (2, 16, 4)
    assert ((depth >= 2.25) & (depth <= 3.3 + 0.5 * 1.05 / 5)).all()


def test_renderer_gradient_flows_to_planes_and_decoder():
    planes, decoder = _scene()
    planes.requires_grad_(True)
    origins, dirs = _rays()
    rgb, depth, _ = ImportanceRenderer()(planes, decoder, origins, dirs, _opts(), deterministic=True)
    (rgb.sum() + depth.sum()).backward()
    assert planes.grad is not None and torch.isfinite(planes.grad).all()
    assert planes.grad.abs().sum() > 0
    assert decoder.net[0].weight.grad.abs().sum() > 0


def test_renderer_state_dict_and_device_move():
    r = ImportanceRenderer()
    assert list(r.state_dict().keys()) == []
    assert torch.equal(r.to(torch.float32).plane_axes, generate_planes())


# ----------------------------------------------------------------------------- decoder


def test_osg_decoder_keys_and_math():
    torch.manual_seed(0)
    dec = OSGDecoder(8, {"decoder_lr_mul": 0.5, "decoder_output_dim": 3})
    assert list(dec.state_dict().keys()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert isinstance(dec.net[1], torch.nn.Softplus)
    with torch.no_grad():
        dec.net[0].bias.normal_()
        dec.net[2].bias.normal_()
    feats = torch.randn(2, 3, 5, 8)
    out = dec(feats, torch.zeros(2, 5, 3))
    assert out["rgb"].shape == (2, 5, 3) and out["sigma"].shape == (2, 5, 1)

    def fc(x, layer, n_in):
        return x @ (layer.weight * (0.5 / math.sqrt(n_in))).t() + layer.bias * 0.5

    x = feats.mean(1).reshape(10, 8)
    y = fc(torch.nn.functional.softplus(fc(x, dec.net[0], 8)), dec.net[2], 64).view(2, 5, 4)
    assert torch.allclose(out["sigma"], y[..., :1], atol=1e-5)
    assert torch.allclose(out["rgb"], torch.sigmoid(y[..., 1:]) * 1.002 - 0.001, atol=1e-5)


# ----------------------------------------------------------------------------- density grid


def test_create_samples_grid():
    n = 4
    samples, corner, size = create_samples(n, [0, 0, 0], 1.0)
    assert samples.shape == (1, n**3, 3)
    assert np.allclose(corner, [-0.5, -0.5, -0.5]) and size == pytest.approx(1.0 / 3)
    # Column 2 varies fastest and is an exact grid.
    assert torch.allclose(samples[0, :n, 2], torch.linspace(-0.5, 0.5, n))
    # Official float-division quirk: column 1 of sample i = b*N + c is (b + c/N) voxels.
    i = 1 * n + 3
    assert samples[0, i, 1].item() == pytest.approx(-0.5 + (1 + 3 / n) * size, abs=1e-6)


def test_sample_density_grid_chunking():
    def decode(coords):
        return (coords[..., :1] * 2 + coords[..., 2:3]).clone()

    big, corner, size = sample_density_grid(decode, resolution=5, cube_length=1.0, max_batch=1000)
    small, _, _ = sample_density_grid(decode, resolution=5, cube_length=1.0, max_batch=7)
    assert big.shape == (5, 5, 5)
    assert torch.equal(big, small)
    samples, _, _ = create_samples(5, [0, 0, 0], 1.0)
    assert torch.equal(big.reshape(-1), decode(samples)[0, :, 0])
    assert np.allclose(corner, -0.5) and size == pytest.approx(0.25)


@pytest.mark.parametrize("sigma, low, high", [(-3.0, 0.15, 1.0), (60.0, 0.0, 0.05)])
def test_depth_spread_is_small_at_a_surface_and_large_in_fog(sigma, low, high):
    """Thin fog (uniform low density) spreads each ray's opacity over its whole range; a dense medium stops the
    ray at once."""

    def decoder(features: torch.Tensor, directions: torch.Tensor) -> dict:
        n, k = features.shape[0], features.shape[2]
        return {"rgb": torch.zeros(n, k, 3), "sigma": torch.full((n, k, 1), sigma)}

    planes = torch.zeros(2, 3, 4, 8, 8)
    origins, dirs = _rays()
    with torch.no_grad():
        rgb, depth, total, spread = ImportanceRenderer()(planes, decoder, origins, dirs,
                                                         _opts(depth_resolution=24, depth_resolution_importance=0),
                                                         deterministic=True, with_spread=True)
    assert spread.shape == depth.shape and torch.isfinite(spread).all()
    assert ((spread > low) & (spread < high)).all(), spread.flatten()[:4]

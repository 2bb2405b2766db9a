"""EG3D generator: official signatures, determinism, super-resolution variants, density grid."""

from __future__ import annotations

import pytest
import torch

from portrait3d import camera_from_angles
from portrait3d.networks.eg3d.superresolution import build_superresolution


def test_synthesis_outputs(tiny_eg3d):
    G = tiny_eg3d
    z = torch.randn(2, 32)
    c = camera_from_angles([0.0, 25.0], [0.0, -10.0])
    ws = G.mapping(z, c, truncation_psi=0.7)
    assert ws.shape == (2, G.num_ws, 512)
    out = G.synthesis(ws, c, noise_mode="const", deterministic=True)
    assert out["image"].shape == (2, 3, 128, 128)
    assert out["image_raw"].shape == (2, 3, 16, 16)
    assert out["image_depth"].shape == (2, 1, 16, 16)
    lo, hi = G.rendering_kwargs["ray_start"], G.rendering_kwargs["ray_end"]
    assert out["image_depth"].min() >= lo - 1e-4 and out["image_depth"].max() <= hi + 0.1
    again = G.synthesis(ws, c, noise_mode="const", deterministic=True)
    assert all(torch.equal(out[k], again[k]) for k in out)
    low = G.synthesis(ws, c, neural_rendering_resolution=8, noise_mode="const", deterministic=True)
    assert low["image_raw"].shape == (2, 3, 8, 8) and low["image"].shape == (2, 3, 128, 128)


def test_camera_shape_checked(tiny_eg3d):
    ws = tiny_eg3d.mapping(torch.randn(1, 32), camera_from_angles([0.0], [0.0]))
    with pytest.raises(ValueError, match="camera c must have shape"):
        tiny_eg3d.synthesis(ws, torch.zeros(1, 16))


def test_gradients_reach_ws_and_camera(tiny_eg3d):
    c = camera_from_angles([5.0], [0.0]).requires_grad_(True)
    ws = tiny_eg3d.mapping(torch.randn(1, 32), c.detach()).detach().requires_grad_(True)
    out = tiny_eg3d.synthesis(ws, c, noise_mode="const", deterministic=True)
    (out["image"].mean() + out["image_depth"].mean()).backward()
    assert ws.grad.abs().sum() > 0 and c.grad[:, :16].abs().sum() > 0


def test_given_planes_render_as_the_backbone_would_and_still_carry_the_camera_gradient(tiny_eg3d):
    G = tiny_eg3d
    c = camera_from_angles([0.0, 25.0], [0.0, -10.0])
    ws = G.mapping(torch.randn(2, 32), c)
    planes = G.planes(ws, noise_mode="const")
    assert planes.shape[:3] == (2, 3, G.config.plane_channels)
    full = G.synthesis(ws, c, noise_mode="const", deterministic=True)
    given = G.synthesis(ws, c, noise_mode="const", deterministic=True, planes=planes)
    assert all(torch.equal(full[k], given[k]) for k in full)
    cam = c[:1].clone().requires_grad_(True)
    G.synthesis(ws[:1], cam, noise_mode="const", deterministic=True, planes=planes[:1])["image"].mean().backward()
    assert cam.grad[:, :16].abs().sum() > 0


def test_density_grid(tiny_eg3d):
    ws = tiny_eg3d.mapping(torch.randn(1, 32), camera_from_angles([0.0], [0.0]))
    sigma, corner, voxel = tiny_eg3d.density_grid(ws, resolution=12, max_batch=500)
    assert sigma.shape == (12, 12, 12) and torch.isfinite(sigma).all()
    assert voxel == pytest.approx(tiny_eg3d.rendering_kwargs["box_warp"] / 11)


@pytest.mark.parametrize("name,res,inp", [("SuperresolutionHybrid2X", 128, 32), ("SuperresolutionHybrid4X", 256, 64),
                                          ("SuperresolutionHybrid8X", 512, 128),
                                          ("SuperresolutionHybrid8XDC", 512, 128)])
def test_superresolution_variants(name, res, inp):
    sr = build_superresolution(name, channels=32, img_resolution=res, sr_num_fp16_res=4, sr_antialias=True)
    x = torch.randn(1, 32, inp, inp)
    with torch.no_grad():
        y = sr(x[:, :3], x, torch.randn(1, 14, 512), noise_mode="none")
    assert y.shape == (1, 3, res, res)
    assert ("resample_filter" in dict(sr.named_buffers())) == (name != "SuperresolutionHybrid8XDC")


def test_unknown_superresolution_is_refused():
    with pytest.raises(ValueError, match="unsupported super-resolution"):
        build_superresolution("Bogus", channels=32, img_resolution=128, sr_num_fp16_res=0)


def test_rendering_at_the_sr_input_size_keeps_image_raw_and_trains():
    """Rendered at the super-resolution's own input size (no resize), the SR's in-place skip add once overwrote
    ``image_raw`` and broke backward in fp32 (bench_eg3d_cost's 64 px rendering row)."""
    from tests.conftest import make_tiny_eg3d

    G = make_tiny_eg3d().train().requires_grad_(True)
    size = G.superresolution.input_resolution
    seen = {}

    def keep(module, args):
        seen["rgb"] = args[0].detach().clone()  # returns None: the inputs pass unchanged

    hook = G.superresolution.register_forward_pre_hook(keep)
    z = torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0))
    from portrait3d.networks.eg3d.camera import camera_from_angles

    c = camera_from_angles([0.0, 10.0], [0.0, 0.0]).reshape(2, 25)
    out = G(z, c, neural_rendering_resolution=size, noise_mode="const")
    hook.remove()
    assert out["image_raw"].shape[-1] == size
    torch.testing.assert_close(out["image_raw"].detach(), seen["rgb"])
    (out["image"].square().mean() + out["image_raw"].square().mean()).backward()
    assert G.superresolution.block0.conv0.weight.grad is not None and G.decoder.net[0].weight.grad is not None


def test_wtri_equals_wplus_when_the_codes_are_its_rows():
    """Oh & Jo's W_tri: with w_shared, the three plane codes and w_sp equal to the W+ rows they replace, the
    render is the W+ render; a different code for one plane changes only that plane."""
    from tests.conftest import make_tiny_eg3d

    G = make_tiny_eg3d().eval()
    g = torch.Generator().manual_seed(0)
    c = camera_from_angles([0.0, 20.0], [0.0, -5.0]).reshape(2, 25)
    ws = G.mapping(torch.randn(2, G.z_dim, generator=g), c) + 0.1 * torch.randn(2, G.num_ws, G.w_dim, generator=g)
    w = G.wtri_from_ws(ws)
    assert w.shared.shape == (2, G.wtri_shared_rows, G.w_dim) and w.planes.shape == (2, 3, 3, G.w_dim)
    with torch.no_grad():
        a = G.synthesis(ws, c, noise_mode="const", deterministic=True)
        b = G.synthesis_wtri(w, c, noise_mode="const", deterministic=True)
        torch.testing.assert_close(G.planes_wtri(w, noise_mode="const"), G.planes(ws, noise_mode="const"))
        torch.testing.assert_close(G.planes_wtri(w, batched=False, noise_mode="const"),
                                   G.planes_wtri(w, batched=True, noise_mode="const"))  # one grouped call = 3 calls
        for key in ("image", "image_raw", "image_depth"):
            torch.testing.assert_close(b[key], a[key])
        moved = G.wtri_from_ws(ws)
        moved.planes[:, 1] += 0.5
        pa, pb = G.planes(ws, noise_mode="const"), G.planes_wtri(moved, noise_mode="const")
        torch.testing.assert_close(pa[:, 0], pb[:, 0])  # (equal up to the grouped convolution's summation order)
        torch.testing.assert_close(pa[:, 2], pb[:, 2])
        assert not torch.allclose(pa[:, 1], pb[:, 1])
    with pytest.raises(ValueError, match="noise_mode"):
        G.planes_wtri(w)
    with pytest.raises(ValueError, match="W_tri code"):
        G.planes_wtri(type(w)(w.shared[:, :-1], w.planes, w.sr), noise_mode="const")

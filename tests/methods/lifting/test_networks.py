"""LiftedGAN lifting networks (Sec. 3.1): shapes and ranges of D_V / D_L / M / D_S / D_T, the
border of the transformation map, de-lighting, the lifted forward pass and the save / load format.

The renderer (:mod:`portrait3d.geometry.render`) is written separately; these tests use
:class:`StubRenderer` (same API, a simple differentiable warp) unless a test needs the real one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from portrait3d.checkpoints.safe_pickle import CheckpointError
from portrait3d.methods.lifting.networks import (
    DepthDecoder,
    LiftConfig,
    LiftedGenerator,
    LightNet,
    StyleManipulator,
    TransformDecoder,
    ViewNet,
    albedo_from_image,
    border_mask,
    canonical_light,
    light_to_direction,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class StubRenderOutput(NamedTuple):
    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor


class StubRenderer:
    """Differentiable stand-in with the renderer's API: normals by finite differences (facing the
    camera, ``n_z < 0``), Lambertian shading of the albedo as given, and a "render" that shifts pixels
    by ``sin(angle) * relief * T + t (+ flow)`` (grid_sample), so gradients reach depth, image, view
    and the transformation map."""

    @staticmethod
    def normals_from_depth(depth: torch.Tensor, cfg: Any = None) -> torch.Tensor:
        dx = F.pad(depth[:, :, 1:] - depth[:, :, :-1], (0, 1))
        dy = F.pad(depth[:, 1:] - depth[:, :-1], (0, 0, 0, 1))
        n = torch.stack([dx * 10, dy * 10, -torch.ones_like(depth)], dim=1)
        return n / n.norm(dim=1, keepdim=True)

    @staticmethod
    def shade(albedo, normal, ambient, diffuse, direction):
        d = direction / direction.norm(dim=1, keepdim=True)
        cos = -(normal * d[:, :, None, None]).sum(1, keepdim=True)
        shading = ambient.reshape(-1, 1, 1, 1) + diffuse.reshape(-1, 1, 1, 1) * cos.clamp(min=0)
        return albedo * shading, shading

    @staticmethod
    def render(depth, image, view, cfg=None, flow=None, transform_map=None):
        n, h, w = depth.shape
        theta = torch.eye(2, 3, dtype=image.dtype).expand(n, 2, 3)
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        relief = (depth - depth.mean(dim=(1, 2), keepdim=True)) * 5
        t = transform_map[:, 0] if transform_map is not None else torch.ones_like(depth)
        off = torch.stack([torch.sin(view[:, 1, None, None]) * relief * t + view[:, 3, None, None],
                           torch.sin(view[:, 0, None, None]) * relief * t + view[:, 4, None, None]], dim=-1)
        if flow is not None:
            off = off + flow[:, :2].permute(0, 2, 3, 1)
        img = F.grid_sample(image, grid + off, align_corners=False, padding_mode="border")
        return StubRenderOutput(img, torch.ones(n, 1, h, w), depth[:, None])


def tiny_config(**kw: Any) -> LiftConfig:
    base = dict(w_dim=32, image_size=16, mlp_dim=32, mlp_layers=3, decoder_mlp_dim=32, decoder_mlp_layers=1,
                decoder_channel_base=128, decoder_channel_max=16, decoder_channel_min=8, border_width=1)
    base.update(kw)
    return LiftConfig(**base)


def make_model(g2d, **kw: Any) -> LiftedGenerator:
    torch.manual_seed(1)
    return LiftedGenerator(g2d, tiny_config(**kw), renderer=StubRenderer(), generator_ref="tiny-test-generator")


def randomize_manipulator(model: LiftedGenerator) -> None:
    """Give M a non-zero last layer (it starts at zero, i.e. w0 = w)."""
    last = model.nets["manipulator"].mlp[-1]
    with torch.no_grad():
        last.weight.normal_(0, 0.05)
        last.bias.normal_(0, 0.05)


def test_config_validation_and_dict_round_trip():
    cfg = tiny_config()
    assert LiftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="power of two"):
        tiny_config(image_size=48)
    with pytest.raises(ValueError, match="transform_channels"):
        tiny_config(transform_channels=4)
    with pytest.raises(ValueError, match="min_depth"):
        tiny_config(min_depth=1.2)
    with pytest.raises(ValueError, match="unknown"):
        LiftConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_view_and_light_ranges():
    cfg = tiny_config()
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 50  # large inputs saturate the tanh
    view = ViewNet(cfg)(w)
    assert view.shape == (64, 6)
    r = math.radians(60)
    assert view[:, :3].abs().max() <= r + 1e-6 and view[:, :3].abs().max() > 0.5 * r
    assert view[:, 3:5].abs().max() <= 0.1 + 1e-7 and view[:, 5].abs().max() <= 0.01 + 1e-7
    light = LightNet(cfg)(w)
    assert light.shape == (64, 4)
    assert light[:, :2].min() >= 0 and light[:, :2].max() <= 1
    assert light[:, 2:].abs().max() <= 1
    torch.testing.assert_close(LightNet.from_raw(LightNet.to_raw(light)), light)
    d = light_to_direction(light)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(64))
    assert (d[:, 2] > 0).all()
    l0 = canonical_light(light)
    torch.testing.assert_close(l0[:, :2], light[:, :2])
    assert (l0[:, 2:] == 0).all()
    torch.testing.assert_close(light_to_direction(l0), torch.tensor([[0.0, 0.0, 1.0]]).expand(64, 3))


def test_manipulator_is_residual_and_identity_at_init():
    cfg = tiny_config()
    m = StyleManipulator(cfg)
    w, light, view = torch.randn(4, 32), torch.rand(4, 4), torch.randn(4, 6) * 0.1
    assert torch.equal(m(w, light, view), w)
    with torch.no_grad():
        m.mlp[-1].bias.fill_(0.5)
    torch.testing.assert_close(m(w, light, view), w + 0.5)
    torch.testing.assert_close(m(w, light, view) - w, m.delta(w, light, view))


@pytest.mark.parametrize("channels", [1, 3])
def test_decoders_shapes_ranges_and_zero_border(channels):
    cfg = tiny_config(transform_channels=channels, border_width=2)
    torch.manual_seed(0)
    w0 = torch.randn(3, 32) * 3
    depth_net, t_net = DepthDecoder(cfg), TransformDecoder(cfg)
    with torch.no_grad():  # make the outputs non-trivial everywhere
        for p in list(depth_net.parameters()) + list(t_net.parameters()):
            p.add_(torch.randn_like(p) * 0.5)
    depth = depth_net(w0)
    assert depth.shape == (3, 1, 16, 16)
    assert depth.min() >= cfg.min_depth - 1e-6 and depth.max() <= cfg.max_depth + 1e-6
    b = border_mask(16, 2).bool().expand(3, 1, 16, 16)
    assert (depth[b] == cfg.border_depth).all()
    assert depth[~b].std() > 0
    t = t_net(w0, depth)
    assert t.shape == (3, channels, 16, 16)
    border = border_mask(16, 2).bool().expand(3, channels, 16, 16)
    assert (t[border] == 0).all(), "eq. 1: the transformation map is exactly 0 on the border"
    if channels == 1:
        assert t.min() >= 0 and t.max() <= 1
        # without the blur, T is exactly 1 on the face (depth in front of the background plane)
        t_net.cfg = dataclasses.replace(cfg, transform_blur_sigma=0.0)
        t_sharp = t_net(w0, depth)
        face = (depth <= cfg.border_depth - 0.01) & ~border
        assert face.any() and (t_sharp[face] == 1).all()
        assert (t_sharp[border] == 0).all()
    else:
        assert t.abs().max() <= cfg.transform_max_offset + 1e-7
        assert t[~border].abs().max() > 0


def test_border_mask():
    m = border_mask(8, 2)[0, 0]
    assert m.sum() == 64 - 16 and (m[2:6, 2:6] == 0).all()
    assert border_mask(8, 0).sum() == 0


def test_albedo_from_image_inverts_lambertian_shading():
    torch.manual_seed(0)
    albedo = torch.rand(2, 3, 8, 8) * 2 - 1
    shading = torch.rand(2, 1, 8, 8) * 0.8 + 0.2
    image = ((albedo + 1) * 0.5 * shading) * 2 - 1
    torch.testing.assert_close(albedo_from_image(image, shading), albedo)
    # the shading is clamped from below, so the albedo stays finite
    assert torch.isfinite(albedo_from_image(image, torch.zeros_like(shading))).all()


def test_lifted_forward_shapes_and_consistency(tiny_stylegan2):
    model = make_model(tiny_stylegan2)
    randomize_manipulator(model)
    torch.manual_seed(0)
    w = tiny_stylegan2.mapping(torch.randn(3, 32), None)[:, 0]
    out = model(w)
    s, n = 16, 3
    assert out.view.shape == (n, 6) and out.light.shape == (n, 4)
    assert out.w0.shape == (n, 32) and out.ws0.shape == (n, tiny_stylegan2.num_ws, 32)
    for name in ("canonical_image", "albedo", "image"):
        assert getattr(out, name).shape == (n, 3, s, s), name
    assert out.depth.shape == (n, s, s) and out.transform.shape == (n, 1, s, s)
    assert out.shading.shape == (n, 1, s, s)
    assert all(torch.isfinite(t).all() for t in out if isinstance(t, torch.Tensor))
    assert not torch.equal(out.w0, out.w)  # M moved the code
    torch.testing.assert_close(out.ws0, out.ws0[:, :1].expand_as(out.ws0))  # one residual on every layer
    # the canonical image is G2D(w0)
    torch.testing.assert_close(out.canonical_image, tiny_stylegan2.synthesis(out.ws0, noise_mode="const"))
    # a W+ input with equal layers gives the same result
    out2 = model(w[:, None].expand(-1, tiny_stylegan2.num_ws, -1))
    torch.testing.assert_close(out2.image, out.image)
    with pytest.raises(ValueError, match="expected w"):
        model(torch.randn(2, 31))


def test_render_view_rotates_relights_and_flips(tiny_stylegan2):
    model = make_model(tiny_stylegan2)
    torch.manual_seed(0)
    out = model(tiny_stylegan2.mapping(torch.randn(2, 32), None)[:, 0])
    same = model.render_view(out)
    torch.testing.assert_close(same.image, out.image)
    yaw = torch.tensor([0.0, math.radians(30), 0, 0, 0, 0])
    rotated = model.render_view(out, view=yaw)
    assert rotated.image.shape == out.image.shape and not torch.allclose(rotated.image, out.image)
    relit = model.render_view(out, light=torch.tensor([0.2, 0.8, 0.9, -0.5]))
    assert not torch.allclose(relit.shading, out.shading)
    flipped = model.render_view(out, view=torch.zeros(6), light=torch.tensor([1.0, 0.0, 0.0, 0.0]), flip=True)
    frontal = model.render_view(out, view=torch.zeros(6), light=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(flipped.image, frontal.image.flip(-1))  # ambient light, frontal view


def test_g2d_is_frozen_and_not_a_lifting_parameter(tiny_stylegan2):
    model = make_model(tiny_stylegan2)
    ids = {id(p) for p in model.lifting_parameters()}
    assert not any(id(p) in ids for p in tiny_stylegan2.parameters())
    assert not any(p.requires_grad for p in tiny_stylegan2.parameters())
    model.train()
    assert model.nets.training and not model.g2d.training


def test_save_load_round_trip(tiny_stylegan2, tmp_path):
    model = make_model(tiny_stylegan2, transform_channels=3)
    randomize_manipulator(model)
    path = model.save(tmp_path / "lift.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(model.nets.state_dict()) and not any(k.startswith("g2d") for k in keys)
    assert meta["format"] == "portrait3d-lifting" and meta["generator"] == "tiny-test-generator"
    loaded = LiftedGenerator.load(path, g2d=tiny_stylegan2, renderer=StubRenderer())
    assert loaded.cfg == model.cfg and loaded.generator_ref == "tiny-test-generator"
    for k, v in model.nets.state_dict().items():
        assert torch.equal(loaded.nets.state_dict()[k], v), k
    w = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(w).image, model.eval()(w).image)
    with pytest.raises(FileExistsError):
        model.save(path)
    model.save(path, overwrite=True)


def test_half_save_stores_float16_and_loads_as_float32(tiny_stylegan2, tmp_path):
    from safetensors import safe_open

    model = make_model(tiny_stylegan2)
    path = model.save(tmp_path / "half.safetensors", half=True)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float16, torch.int64}
    loaded = LiftedGenerator.load(path, g2d=tiny_stylegan2, renderer=StubRenderer())
    for k, v in model.nets.state_dict().items():
        got = loaded.nets.state_dict()[k]
        assert got.dtype == v.dtype, k
        torch.testing.assert_close(got, v.half().to(v.dtype)), k


def test_load_rejects_bad_files_with_one_line_error(tiny_stylegan2, tmp_path):
    model = make_model(tiny_stylegan2)
    good = model.save(tmp_path / "good.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all" * 3)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    for bad in (garbage, truncated, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(ValueError) as e:
            LiftedGenerator.load(bad, g2d=tiny_stylegan2, renderer=StubRenderer())
        assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value), bad.name
    # weights that do not fit the config
    other = LiftedGenerator(tiny_stylegan2, tiny_config(mlp_dim=16), renderer=StubRenderer())
    state = {k: v.contiguous() for k, v in other.nets.state_dict().items()}
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    mixed = tmp_path / "mixed.safetensors"
    save_file(state, str(mixed), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match"):
        LiftedGenerator.load(mixed, g2d=tiny_stylegan2, renderer=StubRenderer())


def test_config_w_dim_must_match_generator(tiny_stylegan2):
    with pytest.raises(ValueError, match="w_dim"):
        LiftedGenerator(tiny_stylegan2, tiny_config(w_dim=64), renderer=StubRenderer())


def test_with_real_renderer(tiny_stylegan2):
    pytest.importorskip("portrait3d.geometry.render")
    torch.manual_seed(1)
    model = LiftedGenerator(tiny_stylegan2, tiny_config())
    randomize_manipulator(model)
    out = model(torch.randn(2, 32))
    assert out.image.shape == (2, 3, 16, 16) and torch.isfinite(out.image).all()
    assert out.albedo.shape == (2, 3, 16, 16) and torch.isfinite(out.albedo).all()
    assert out.mask.shape == (2, 1, 16, 16) and out.normal.shape == (2, 3, 16, 16)
    assert model.renderer_cfg.image_size == 16  # default renderer config follows LiftConfig
    out.image.mean().backward()
    for name in ("view", "light", "manipulator", "depth", "transform"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nets[name].parameters()), name
    assert all(p.grad is None for p in tiny_stylegan2.parameters())


def test_real_renderer_config_is_saved(tiny_stylegan2, tmp_path):
    rmod = pytest.importorskip("portrait3d.geometry.render")
    cfg = rmod.RendererConfig(image_size=16, fov=12.0)
    model = LiftedGenerator(tiny_stylegan2, tiny_config(), renderer_cfg=cfg)
    path = model.save(tmp_path / "lift.safetensors")
    loaded = LiftedGenerator.load(path, g2d=tiny_stylegan2)
    assert loaded.resolved_renderer_cfg() == cfg
    w = torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(w).image, model.eval()(w).image)


def test_frontal_render_under_neutral_light_reproduces_canonical_image(tiny_stylegan2):
    """A = G2D(w0) / s(L0) and the renderer's shading / projection are consistent: rendering the albedo
    at the canonical view V0 = 0 under L0 gives G2D(w0) back (hard rasteriser, pixel-centred mesh)."""
    pytest.importorskip("portrait3d.geometry.render")
    torch.manual_seed(1)
    model = LiftedGenerator(tiny_stylegan2, tiny_config())
    randomize_manipulator(model)
    with torch.no_grad():
        out = model(torch.randn(2, 32))
        r = model.render_view(out, view=torch.zeros(6), light=canonical_light(out.light))
    assert (r.shading > model.cfg.min_shading).all()  # no clamping in the de-lighting
    torch.testing.assert_close(r.image, out.canonical_image, atol=1e-5, rtol=0)


def test_renderer_size_must_match(tiny_stylegan2):
    rmod = pytest.importorskip("portrait3d.geometry.render")
    model = LiftedGenerator(tiny_stylegan2, tiny_config(), renderer_cfg=rmod.RendererConfig(image_size=32))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 32))

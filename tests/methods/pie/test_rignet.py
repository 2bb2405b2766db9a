"""RigNet: identity at start, modes, the rig distance, and StyleRig's losses on tiny random networks (each term
zero where it should be, gradients reach RigNet), files."""

from __future__ import annotations

import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.pie.estimator import EstimatorConfig, ParamEstimator
from portrait3d.methods.pie.rignet import RigNet, RigNetConfig, mode_params, rig_distance, rignet_losses, with_mode
from tests.methods.pie.test_face_model import tiny_rig


def test_untrained_rignet_changes_nothing():
    net = RigNet(RigNetConfig(num_ws=4, w_dim=8, mode="pose", param_dim=3))
    ws = torch.randn(2, 4, 8)
    torch.testing.assert_close(net(ws, torch.randn(2, 3)), ws)
    with pytest.raises(ValueError):
        net(torch.randn(2, 3, 8), torch.randn(2, 3))
    with pytest.raises(ValueError):
        net(ws, torch.randn(2, 5))
    with pytest.raises(ValueError):
        RigNet(RigNetConfig(mode="hair"))


def test_modes_and_rig_distance():
    rig = tiny_rig()
    a = rig.neutral(2)
    b = a.replace(angles=torch.tensor([[20.0, 0, 0], [5.0, 0, 0]]))
    assert mode_params(b, "pose").shape == (2, 3) and mode_params(b, "light").shape == (2, 27)
    mixed = with_mode(a, b, "pose")
    assert torch.equal(mixed.angles, b.angles) and torch.equal(mixed.light, a.light)
    d = rig_distance(rig, a, b)
    assert rig_distance(rig, a, a).abs().max() < 1e-6 and d[0] > d[1] > 0  # larger turn, larger distance


def test_stylerig_losses_zero_where_they_should_be_and_train(tiny_stylegan2):
    torch.manual_seed(0)
    G = tiny_stylegan2
    rig = tiny_rig()
    est = ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1), input_size=64)).eval()
    with torch.no_grad():
        est.head.weight.normal_(0, 0.05)  # parameters that depend on the image
    ws = G.mapping(torch.randn(3, G.z_dim), None)
    vs = G.mapping(torch.randn(3, G.z_dim), None)

    def render(w):
        return G.synthesis(w, noise_mode="const")

    net = RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode="pose", param_dim=3))
    same = rignet_losses(net, render, est, rig, ws, ws)
    assert same["rec"] == 0 and same["edit"] < 1e-6 and same["consist"] < 1e-6  # its own parameters: no change
    terms = rignet_losses(net, render, est, rig, ws, vs)
    assert terms["rec"] == 0 and terms["edit"] > 0  # untrained: the target's pose is not reached
    terms["loss"].backward()
    assert net.dec_weight.grad.abs().sum() > 0


def test_save_load(tmp_path):
    net = RigNet(RigNetConfig(num_ws=4, w_dim=8, mode="light", param_dim=27))
    with torch.no_grad():
        net.dec_weight.normal_()
    back = RigNet.load(net.save(tmp_path / "r.safetensors"))
    ws, p = torch.randn(2, 4, 8), torch.randn(2, 27)
    torch.testing.assert_close(back(ws, p), net(ws, p))
    with pytest.raises(UsageError):
        RigNet.load(tmp_path / "missing.safetensors")


def test_rignet_training_resumes_bit_exactly(tiny_stylegan2, tmp_path, one_thread):
    from safetensors.torch import load_file

    from portrait3d.methods.pie.train import RigNetTrainConfig, train_rignet

    rig = tiny_rig()
    rig.save(tmp_path / "rig.safetensors")
    est = ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1), input_size=64))
    with torch.no_grad():
        est.head.weight.normal_(0, 0.05)
    est.save(tmp_path / "est.safetensors")

    def cfg(kimg: float) -> RigNetTrainConfig:
        return RigNetTrainConfig(estimator=str(tmp_path / "est.safetensors"), rig=str(tmp_path / "rig.safetensors"),
                                 mode="pose", batch=2, total_kimg=kimg, snapshot_kimg=0.002, lr=1e-2)

    a, b = tmp_path / "a", tmp_path / "b"
    export = train_rignet(cfg(0.004), a, progress=False, G=tiny_stylegan2)
    train_rignet(cfg(0.002), b, progress=False, G=tiny_stylegan2)
    train_rignet(cfg(0.004), b, resume=b, progress=False, G=tiny_stylegan2)
    sa = load_file(str(a / "snapshot-00000002" / "state.safetensors"))
    sb = load_file(str(b / "snapshot-00000002" / "state.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    net = RigNet.load(export)
    assert net.config.mode == "pose" and net.dec_weight.abs().sum() > 0  # it learned something
    with pytest.raises(UsageError, match="mode"):
        train_rignet(RigNetTrainConfig(mode="hair"), tmp_path / "c", progress=False, G=tiny_stylegan2)

"""Encoder E / pose estimator P networks: shapes, rotations, cameras, file format."""

from __future__ import annotations

import json

import pytest
import torch

from portrait3d.methods.inversion3d import (
    EncoderConfig,
    LatentEncoder,
    PoseConfig,
    PoseEstimator,
    angles_from_rotation,
    camera_from_pose,
    load_module,
    matrix_to_rotation_6d,
    rotation_6d_to_matrix,
    rotation_from_angles,
    save_module,
)
from portrait3d.networks.eg3d.camera import camera_from_angles, pose_angles_from_camera

TINY = dict(layers=(1, 1, 1, 1), width=8, input_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, res: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _randomize_head(P: PoseEstimator, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = P.head[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * std / last.weight.shape[1] ** 0.5)
        last.bias.copy_(torch.randn(last.bias.shape, generator=g) * std)


def test_encoder_shapes_and_mean_latent(tiny_eg3d):
    G = tiny_eg3d
    with torch.no_grad():
        G.backbone.mapping.w_avg.normal_()
    E = LatentEncoder(EncoderConfig(**TINY, head_channels=32), G).eval()
    assert E.config.w_dim == G.w_dim and E.num_ws == G.num_ws
    assert torch.equal(E.w_avg, G.backbone.mapping.w_avg)
    assert E.w_avg.data_ptr() != G.backbone.mapping.w_avg.data_ptr()  # a copy, not a view
    x = _images(2)
    ws = E(x)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    # Fresh encoder: delta is exactly zero, so every layer is the generator's mean latent.
    assert torch.equal(E.delta(x), torch.zeros(2, G.w_dim))
    assert torch.equal(ws, G.backbone.mapping.w_avg.expand(2, G.num_ws, -1))
    with pytest.raises(ValueError):
        LatentEncoder(EncoderConfig(**TINY))  # no dims and no generator
    with pytest.raises(ValueError):
        LatentEncoder(EncoderConfig(**TINY, w_dim=64), G)
    with pytest.raises(ValueError):
        LatentEncoder(EncoderConfig(layers=(1, 1, 1, 1), width=8, input_size=48), G)


def test_encoder_input_resize_and_gradients(tiny_eg3d):
    E = LatentEncoder(EncoderConfig(**{**TINY, "input_size": 128}, head_channels=32), tiny_eg3d)
    with torch.no_grad():
        E.mlp[-1].weight.normal_(0, 0.01)
    x = _images(2, 64)  # upsampled to 128 inside
    E(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in E.parameters())


def test_pose_shapes_frontal_start_and_roll():
    P = PoseEstimator(PoseConfig(**TINY)).eval()
    out = P(_images(3))
    assert out.angles.shape == (3, 3) and out.rotation.shape == (3, 3, 3) and out.translation.shape == (3, 3)
    assert torch.equal(out.angles, torch.zeros(3, 3)) and torch.equal(out.translation, torch.zeros(3, 3))
    assert torch.allclose(out.rotation, torch.eye(3).expand(3, 3, 3))
    assert P.camera(_images(3)).shape == (3, 25)
    Pr = PoseEstimator(PoseConfig(**TINY, roll=True, translation=False)).eval()
    out = Pr(_images(2))
    assert torch.allclose(out.rotation, torch.eye(3).expand(2, 3, 3)) and torch.allclose(out.angles, torch.zeros(2, 3))
    _randomize_head(Pr)
    out = Pr(_images(2))
    assert (out.angles[:, 2].abs() > 1e-3).all()  # roll is predicted
    assert torch.equal(out.translation, torch.zeros(2, 3))


def test_6d_conversion_gives_proper_rotations():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)) * 3
    R = rotation_6d_to_matrix(x)
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(64), atol=1e-5)
    # First column is the normalised first vector; the second lies in the span of the two inputs.
    assert torch.allclose(R[:, :, 0], x[:, :3] / x[:, :3].norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_rotation_6d(R)), R, atol=1e-6)
    with pytest.raises(ValueError):
        rotation_6d_to_matrix(torch.zeros(2, 5))


def test_angles_rotation_round_trip_and_camera_convention():
    a = torch.tensor([[20.0, -10.0, 15.0], [-35.0, 25.0, -8.0], [0.0, 0.0, 0.0], [60.0, 45.0, 30.0]])
    R = rotation_from_angles(a)
    assert torch.allclose(angles_from_rotation(R), a, atol=1e-4)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4), atol=1e-6)
    # R carries the frontal camera to the posed one: with the pivot at the origin the EG3D label is
    # R @ diag(1, -1, -1) at R @ (0, 0, radius).
    c = camera_from_angles(a[:, 0], a[:, 1], pivot=(0.0, 0.0, 0.0), roll_deg=a[:, 2])[:, :16].view(-1, 4, 4)
    assert torch.allclose(c[:, :3, :3], R @ torch.diag(torch.tensor([1.0, -1.0, -1.0])), atol=1e-6)
    assert torch.allclose(c[:, :3, 3], R @ torch.tensor([0.0, 0.0, 2.7]), atol=1e-5)


def test_camera_equals_camera_from_angles_for_zero_offset():
    P = PoseEstimator(PoseConfig(**TINY)).eval()
    _randomize_head(P)
    with torch.no_grad():  # zero the offset outputs only
        P.head[-1].weight[2:].zero_()
        P.head[-1].bias[2:].zero_()
    x = _images(3)
    with torch.no_grad():
        out = P(x)
        cam = P.camera(x)
    assert torch.equal(out.translation, torch.zeros(3, 3))
    assert (out.angles[:, :2].abs() > 0.1).all() and torch.equal(out.angles[:, 2], torch.zeros(3))
    assert torch.equal(cam, camera_from_angles(out.angles[:, 0], out.angles[:, 1]))
    yaw, pitch, roll, radius = pose_angles_from_camera(cam)
    assert torch.allclose(yaw.float(), out.angles[:, 0], atol=1e-3)
    assert torch.allclose(pitch.float(), out.angles[:, 1], atol=1e-3)
    assert torch.allclose(radius.float(), torch.full((3,), 2.7), atol=1e-5)


def test_camera_offset_and_roll():
    P = PoseEstimator(PoseConfig(**TINY, roll=True)).eval()
    _randomize_head(P)
    x = _images(2)
    with torch.no_grad():
        out = P(x)
        cam = P.camera(x)
    assert (out.translation.abs() > 0).all()
    ref = camera_from_angles(out.angles[:, 0], out.angles[:, 1], roll_deg=out.angles[:, 2])
    assert torch.allclose(cam[:, [3, 7, 11]] - ref[:, [3, 7, 11]], out.translation, atol=1e-6)
    keep = [i for i in range(25) if i not in (3, 7, 11)]
    assert torch.equal(cam[:, keep], ref[:, keep])


def test_camera_is_differentiable():
    P = PoseEstimator(PoseConfig(**TINY)).train()
    _randomize_head(P)
    P.camera(_images(2)).square().sum().backward()
    assert P.head[-1].weight.grad.abs().sum() > 0
    a = torch.tensor([[10.0, 5.0, 0.0]], requires_grad=True)
    camera_from_pose(a, torch.tensor([[0.01, 0.0, 0.0]]))[:, 3].sum().backward()
    assert a.grad[0, 0] != 0


def test_save_load_round_trip(tmp_path, tiny_eg3d):
    E = LatentEncoder(EncoderConfig(**TINY, head_channels=32), tiny_eg3d).eval()
    with torch.no_grad():
        E.mlp[-1].weight.normal_(0, 0.01)
        E.w_avg.normal_()
    P = PoseEstimator(PoseConfig(**TINY, roll=True, pivot=(0.0, 0.05, 0.2))).eval()
    _randomize_head(P)
    x = _images(2)
    for net, name in ((E, "enc.safetensors"), (P, "pose.safetensors")):
        path = save_module(net, tmp_path / name)
        loaded = load_module(path)
        assert type(loaded) is type(net) and loaded.config == net.config
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        sd, sd2 = net.state_dict(), loaded.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        with torch.no_grad():
            a, b = net(x), loaded(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
        with pytest.raises(FileExistsError):
            save_module(net, path)
        save_module(net, path, overwrite=True)
        small = load_module(save_module(net, tmp_path / f"half-{name}", half=True))
        assert (tmp_path / f"half-{name}").stat().st_size < 0.6 * path.stat().st_size
        sd3 = small.state_dict()
        assert all(sd3[k].dtype == sd[k].dtype for k in sd)  # float16 on disk, float32 in the network
        assert all(torch.allclose(sd3[k].float(), sd[k].float(), rtol=1e-3, atol=1e-4) for k in sd)
    with pytest.raises(TypeError):
        save_module(torch.nn.Linear(2, 2), tmp_path / "lin.safetensors")


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    P = PoseEstimator(PoseConfig(**TINY))
    good = save_module(P, tmp_path / "p.safetensors")
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "garbage.safetensors": b"\x00\x01not a safetensors file" * 10,
        "empty.safetensors": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    sd = {k: v.contiguous() for k, v in P.state_dict().items()}
    meta = {"format": "portrait3d-module", "format_version": "1", "class": "PoseEstimator",
            "config": json.dumps(PoseConfig(**{**TINY, "width": 16}).to_dict())}
    save_file(sd, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    save_file(sd, str(tmp_path / "unknown.safetensors"), metadata={**meta, "class": "os.system"})
    save_file(sd, str(tmp_path / "badcfg.safetensors"), metadata={**meta, "config": '{"bogus": 1}'})
    for name in [*cases, "foreign.safetensors", "mismatch.safetensors", "unknown.safetensors", "badcfg.safetensors",
                 "missing.safetensors"]:
        with pytest.raises(ValueError) as info:
            load_module(tmp_path / name)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(name), msg

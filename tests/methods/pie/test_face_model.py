"""PIE's face rig: SH shading, normals, pose convention, rendering gradients, files; on a tiny synthetic head and
on the shipped rig."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.pie.face_model import (
    FaceModel,
    FaceModelConfig,
    ambient_light,
    sh_basis,
    shade_sh,
    vertex_normals,
)


def _hemisphere(rings: int = 6, segments: int = 12, radius: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A half sphere bulging toward +z (out of the face, head frame): vertices [V, 3], outward faces [F, 3]."""
    verts = [[0.0, 0.0, radius]]
    for r in range(1, rings + 1):
        polar = r / rings * math.pi / 2
        for s in range(segments):
            az = 2 * math.pi * s / segments
            verts.append([radius * math.sin(polar) * math.cos(az), radius * math.sin(polar) * math.sin(az),
                          radius * math.cos(polar)])
    faces = []
    for s in range(segments):
        faces.append([0, 1 + s, 1 + (s + 1) % segments])
    for r in range(rings - 1):
        a, b = 1 + r * segments, 1 + (r + 1) * segments
        for s in range(segments):
            s1 = (s + 1) % segments
            faces += [[a + s, b + s, b + s1], [a + s, b + s1, a + s1]]
    return torch.tensor(verts), torch.tensor(faces)


def tiny_rig() -> FaceModel:
    verts, faces = _hemisphere()
    v = len(verts)
    g = torch.Generator().manual_seed(0)
    cfg = FaceModelConfig(vertices=v, identity_components=3, expression_components=2, albedo_components=2,
                          expression_names=["a", "b"], image_size=64)
    return FaceModel(cfg, verts, 0.01 * torch.randn(3, v, 3, generator=g), 0.01 * torch.randn(2, v, 3, generator=g),
                     torch.full((v, 3), 0.6), 0.05 * torch.randn(2, v, 3, generator=g), faces)


def test_ambient_light_shades_every_normal_alike():
    n = torch.nn.functional.normalize(torch.randn(1, 50, 3), dim=-1)
    albedo = torch.rand(1, 50, 3)
    out = shade_sh(albedo, n, ambient_light(1, 0.8))
    torch.testing.assert_close(out, 0.8 * albedo)
    assert sh_basis(n).shape == (1, 50, 9)


def test_directional_light_brightens_the_facing_side():
    # band-1 x coefficient -1 adds a1 c1 n_x: brighter for normals toward +x (the image's right)
    light = ambient_light(1, 0.5).reshape(1, 3, 9)
    light[:, :, 3] = -1.0
    n = torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [0, 0, -1.0]]])
    c = shade_sh(torch.ones(1, 3, 3), n, light.reshape(1, 27))[0, :, 0]
    assert c[0] > c[2] > c[1]


def test_vertex_normals_point_out():
    verts, faces = _hemisphere()
    n = vertex_normals(verts[None], faces)[0]
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(verts)), atol=1e-5)
    assert (n * verts).sum(-1).min() > 0  # outward on a sphere about the origin
    assert n[0, 2] > 0.99                   # the pole faces +z


def test_render_pose_convention_and_gradients():
    rig = tiny_rig()
    p = rig.neutral(1)
    out = rig(p)
    assert out["image"].shape == (1, 3, 64, 64) and out["mask"].shape == (1, 1, 64, 64)
    ys, xs = torch.nonzero(out["mask"][0, 0] > 0.5, as_tuple=True)
    assert abs(xs.float().mean() - 31.5) < 1.0 and abs(ys.float().mean() - 31.5) < 1.0  # centred
    # yaw > 0 turns the head to its left: the pole (the nose) moves to the image's right
    turned = rig(p.replace(angles=torch.tensor([[20.0, 0.0, 0.0]])))
    assert turned["points"][0, 0, 0] > out["points"][0, 0, 0] + 1
    # pitch > 0 raises the chin: the pole moves up (smaller row)
    up = rig(p.replace(angles=torch.tensor([[0.0, 15.0, 0.0]])))
    assert up["points"][0, 0, 1] < out["points"][0, 0, 1] - 1
    # gradients reach shape, albedo, light and pose
    q = p.replace(identity=p.identity.clone().requires_grad_(True), albedo=p.albedo.clone().requires_grad_(True),
                  light=p.light.clone().requires_grad_(True),
                  angles=torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True))
    o = rig(q)
    (o["image"].square().sum() + o["points"].square().sum() * 1e-4).backward()
    for t in (q.identity, q.albedo, q.light, q.angles):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    rig = tiny_rig()
    path = rig.save(tmp_path / "rig.safetensors")
    back = FaceModel.load(path)
    assert back.config == rig.config
    torch.testing.assert_close(back.mean_shape, rig.mean_shape, atol=1e-3, rtol=1e-3)  # float16 storage
    assert torch.equal(back.faces, rig.faces)
    with pytest.raises(FileExistsError):
        rig.save(path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    for bad in (tmp_path / "bad.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(UsageError):
            FaceModel.load(bad)


def test_shipped_rig_loads_and_renders():
    rig = FaceModel.load("face-rig")
    assert rig.config.vertices == 468 and len(rig.config.expression_names) == rig.config.expression_components
    out = rig(rig.neutral(2), 64)
    assert out["image"].shape == (2, 3, 64, 64) and torch.isfinite(out["image"]).all()
    assert 0.15 < out["mask"].mean() < 0.8
    from pathlib import Path

    card = (Path(__file__).resolve().parents[3] / "src/portrait3d/models/face-rig/MODEL_CARD.md").read_text()
    assert "UTKFace" in card and "non-commercial" in card


def test_shipped_rig_turns_the_way_the_face_pipeline_measures(one_thread):
    pytest.importorskip("mediapipe")
    from portrait3d.methods.pie.build import measured_render_yaw

    got = measured_render_yaw(FaceModel.load("face-rig"), (-20.0, 0.0, 20.0))
    assert all(v is not None for v in got.values()), got
    assert got[-20.0] < -8 and got[20.0] > 8 and abs(got[0.0]) < 4
    assert np.isfinite(list(got.values())).all()

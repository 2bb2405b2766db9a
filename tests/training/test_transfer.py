"""Packing a run for a lent accelerator and back: data as JPEGs, snapshot in float16, resumable after."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import make_dataset

from portrait3d.face.dataset import AlignedFaceDataset
from portrait3d.training.stylegan2 import preset, train_stylegan2
from portrait3d.training.transfer import pack_data, pack_snapshot, unpack_data, unpack_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def test_data_round_trip(tmp_path):
    root = make_dataset(tmp_path / "data", 10, 32)
    info = pack_data(root, tmp_path / "faces.npz", n=6)
    assert info["faces"] == 6
    assert unpack_data(tmp_path / "faces.npz", tmp_path / "back") == 6
    a = AlignedFaceDataset(root, mirror=False)
    b = AlignedFaceDataset(tmp_path / "back", mirror=False)
    idx = np.linspace(0, 9, 6).round().astype(int)
    for j, i in enumerate(idx):
        img_a, cam_a = a[int(i)]
        img_b, cam_b = b[j]
        assert torch.equal(cam_a, cam_b)
        assert (img_a - img_b).abs().mean() < 0.05  # JPEG quality 90


def test_snapshot_round_trip_resumes(tmp_path):
    data = make_dataset(tmp_path / "data", 12, 32)
    cfg = preset("tiny")
    cfg.run.batch, cfg.run.total_kimg, cfg.run.snapshot_kimg = 4, 0.008, 0.008
    train_stylegan2(cfg, data, tmp_path / "run")
    files = pack_snapshot(tmp_path / "run", tmp_path / "packed")
    assert {p.name for p in files} == {"G.safetensors", "G_ema.safetensors", "D.safetensors", "run.json"}
    folder = unpack_snapshot(tmp_path / "packed", tmp_path / "run2")
    meta = json.loads((folder / "state.json").read_text())
    assert (meta["step"], meta["images_seen"]) == (2, 8)
    cfg.run.total_kimg = 0.016
    train_stylegan2(cfg, data, tmp_path / "run2", resume=tmp_path / "run2")
    assert (tmp_path / "run2" / "snapshot-00000004").is_dir()


def test_eg3d_snapshot_round_trip_resumes(tmp_path):
    """An EG3D run with the projected discriminator travels too: weights in float16, then it trains on."""
    from safetensors.torch import load_file

    from portrait3d.training import eg3d as E

    data = make_dataset(tmp_path / "data", 8, 128)

    def cfg(steps: int) -> E.EG3DTrainConfig:
        c = E.preset("tiny")
        c.run.batch, c.run.total_kimg, c.run.threads = 2, steps * 2 / 1000, 1
        c.discriminator = "projected"
        c.PD = E.ProjectedDiscriminatorConfig(c_dim=25, feature_resolution=64, proj_channels=8, head_channels=8,
                                              head_channels_max=16, cmap_dim=8)
        return c

    E.train_eg3d(cfg(1), data, tmp_path / "run")
    files = pack_snapshot(tmp_path / "run", tmp_path / "packed")
    assert {p.name for p in files} == {"G.safetensors", "G_ema.safetensors", "D.safetensors", "run.json"}
    assert json.loads((tmp_path / "packed" / "run.json").read_text())["trainer"] == "eg3d"
    folder = unpack_snapshot(tmp_path / "packed", tmp_path / "run2")
    before = load_file(str(next((tmp_path / "run").glob("snapshot-*")) / "state.safetensors"))
    after = load_file(str(folder / "state.safetensors"))
    for k in (k for k in before if k.startswith(("G.", "G_ema.", "D.")) and before[k].is_floating_point()):
        assert torch.allclose(after[k], before[k].half().float()), k  # the carried weights, rounded to float16
    E.train_eg3d(cfg(2), data, tmp_path / "run2", resume=tmp_path / "run2")
    assert (tmp_path / "run2" / "snapshot-00000002").is_dir()


def test_packing_refuses_other_trainers(tmp_path):
    from portrait3d.errors import UsageError

    snap = tmp_path / "snapshot-00000001"
    snap.mkdir()
    (snap / "state.json").write_text(json.dumps({"format": "x", "trainer": "pie-estimator"}))
    with pytest.raises(UsageError, match="only stylegan2 and eg3d snapshots"):
        pack_snapshot(snap, tmp_path / "packed")


def test_teacher_set_round_trip(tmp_path):
    """A teacher set with turned views travels as JPEGs + float16 meshes and loads back view for view."""
    from portrait3d.training.teacher import TeacherSet
    from portrait3d.training.transfer import pack_teacher, unpack_teacher
    from portrait3d.utils.io import write_json, write_npy

    g = np.random.default_rng(0)
    n, res = 6, 32
    yy, xx = np.mgrid[0:res, 0:res]
    smooth = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1).astype(np.uint8)  # JPEG-friendly images
    root = tmp_path / "teacher"
    root.mkdir()
    write_npy(root / "images.npy", np.stack([np.roll(smooth, i, 1) for i in range(n)]))
    write_npy(root / "latents.npy", g.standard_normal((n, 8)).astype(np.float32))
    write_npy(root / "mesh.npy", g.uniform(0, res, (n, 468, 3)).astype(np.float32))
    write_npy(root / "view_images.npy", np.stack([[np.roll(smooth, -i - v, 0) for v in (1, 2)] for i in range(n)]))
    write_npy(root / "view_mesh.npy", g.uniform(0, res, (n, 2, 468, 3)).astype(np.float32))
    write_npy(root / "view_cameras.npy", g.standard_normal((n, 2, 25)).astype(np.float32))
    write_json(root / "labels.json", {"labels": [[f"s{i}", g.standard_normal(25).tolist()] for i in range(n)],
                                      "summary": {"network": "synthetic"}})
    info = pack_teacher(root, tmp_path / "teacher.npz", n=4)
    assert (info["latents"], info["views"]) == (4, 3)
    assert unpack_teacher(tmp_path / "teacher.npz", tmp_path / "back") == 4
    a, b = TeacherSet.load(root), TeacherSet.load(tmp_path / "back")
    assert b.network == "synthetic" and len(b) == 4 and b.num_views == 3
    idx = torch.as_tensor(np.linspace(0, n - 1, 4).round().astype(int))
    for view in range(3):
        xa, ca, za, ma = a.batch(idx, torch.full((4,), view))
        xb, cb, zb, mb = b.batch(torch.arange(4), torch.full((4,), view))
        assert torch.equal(ca, cb) and torch.equal(za, zb)
        assert torch.allclose(ma, mb, atol=0.02)  # float16 pixels
        assert (xa - xb).abs().mean() < 0.05  # JPEG quality 90

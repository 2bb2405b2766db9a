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

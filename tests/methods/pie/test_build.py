"""Building the face rig: Procrustes, triangles from MediaPipe's tessellation, expression features, the whole
fit on synthetic meshes with known poses and expressions, and the command on real photos."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import make_dataset, make_photo_dataset

pytest.importorskip("mediapipe")

from portrait3d.geometry.rotations import head_rotation_np  # noqa: E402
from portrait3d.methods.pie.build import (  # noqa: E402
    EXPRESSION_NAMES,
    build_face_model,
    expression_features,
    mesh_triangles,
    pixels_to_world,
    procrustes,
)
from portrait3d.methods.pie.face_model import FaceModel, FaceModelConfig  # noqa: E402


def test_procrustes_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3))
    rot = head_rotation_np(25.0, -10.0, 5.0)
    dst = 1.7 * src @ rot.T + np.array([0.1, -0.2, 2.5])
    s, r, t = procrustes(src, dst)
    assert s == pytest.approx(1.7) and np.allclose(r, rot) and np.allclose(t, [0.1, -0.2, 2.5])
    mirrored = src * np.array([-1, 1, 1])
    _, r, _ = procrustes(src, mirrored)
    assert np.linalg.det(r) == pytest.approx(1.0)  # never a reflection


def test_triangles_from_the_tessellation():
    ref = FaceModel.load("face-rig").mean_shape.numpy().astype(np.float64)
    faces = mesh_triangles(ref)
    count = Counter(tuple(sorted(e)) for f in faces for e in combinations(f, 2))
    assert max(count.values()) <= 2 and len(faces) > 800
    assert set(np.unique(faces)) == set(range(468))
    v0, v1, v2 = (ref[faces[:, k]] for k in range(3))
    assert (np.cross(v1 - v0, v2 - v0)[:, 2] > 0).mean() > 0.9  # wound outward: most face the viewer (+z)


def _synthetic_meshes(n: int, seed: int = 0):
    """MediaPipe-like pixel meshes of the shipped mean face with a known mouth opening and known head poses."""
    rig = FaceModel.load("face-rig")
    mean = rig.mean_shape.numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    ids = rig.identity_basis.numpy().astype(np.float64)
    lower = mean[:, 1] < mean[14, 1] + 1e-9            # the lower lip and everything below it
    opening = rng.uniform(0, 1, n)
    yaw, pitch = rng.uniform(-25, 25, n), rng.uniform(-12, 12, n)
    unit = pixels_to_world(np.array([[1.0, 0.0, 0.0]]), 128, 18.837, 2.7)[0, 0] - pixels_to_world(
        np.zeros((1, 3)), 128, 18.837, 2.7)[0, 0]
    pts = []
    for i in range(n):
        s = mean + np.tensordot(rng.normal(0, 0.1, len(ids)), ids, 1)  # identity small next to the mouth
        s[lower, 1] -= 0.03 * opening[i]                 # open the mouth: the jaw drops
        cam = s @ (head_rotation_np(yaw[i], pitch[i], 0.0)).T
        px = cam / unit
        px[:, :2] += 63.5
        pts.append(px)
    cols = np.full((n, 468, 3), 0.6) + rng.normal(0, 0.01, (n, 468, 3))
    return np.stack(pts), cols, yaw, pitch, opening


def test_build_recovers_pose_and_the_mouth():
    pts, cols, yaw, pitch, opening = _synthetic_meshes(60)
    cfg = FaceModelConfig(identity_components=6, albedo_components=3)
    model, rep = build_face_model(pts, cols, cfg)
    assert np.abs(np.asarray(rep["yaw_deg"]) - yaw).max() < 1.5     # symmetry fixes yaw's zero
    got_pitch = np.asarray(rep["pitch_deg"])
    assert np.abs(got_pitch - got_pitch.mean() - (pitch - pitch.mean())).max() < 1.5  # pitch: up to the mean
    feats = expression_features(pts[:, :, :] * np.array([1, -1, -1]))  # features are pose-free only in the head frame
    assert feats.shape == (60, len(EXPRESSION_NAMES))
    mouth = model.expression_basis[EXPRESSION_NAMES.index("mouth_open")].numpy()
    lower = model.mean_shape.numpy()[:, 1] < model.mean_shape.numpy()[14, 1] + 1e-6
    assert np.abs(mouth[lower, 1]).mean() > 3 * np.abs(mouth[~lower, 1]).mean()  # it moves the jaw, not the rest
    assert mouth[lower, 1].mean() < 0                                           # down
    assert model.config.expression_names == list(EXPRESSION_NAMES)
    assert 0 < rep["explained_variance"]["expression"] < 1
    with pytest.raises(ValueError, match="too few"):
        build_face_model(pts[:5], cols[:5], cfg)


def test_face_rig_command(tmp_path, one_thread):

    from portrait3d.interfaces.cli import main

    root = make_photo_dataset(tmp_path / "utk", 60)
    out = tmp_path / "rig"
    args = ["train", "face-rig", "--data", str(root), "--out", str(out), "--count", "60", "--identity", "5",
            "--albedo", "5", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"face_model.safetensors", "face_model.json", "preview.png",
                                               "MODEL_CARD.md"}
    rig = FaceModel.load(out / "face_model.safetensors")
    assert rig.config.identity_components == 5 and torch.isfinite(rig.mean_shape).all()
    res = CliRunner().invoke(main, args)  # no clobbering without --force
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(main, ["train", "face-rig", "--data", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 2 and "images.npy" in res.output
    few = make_dataset(tmp_path / "discs", 50, 32)  # no faces at all
    res = CliRunner().invoke(main, ["train", "face-rig", "--data", str(few), "--out", str(tmp_path / "x"),
                                    "--count", "50"])
    assert res.exit_code == 2 and "too few" in res.output

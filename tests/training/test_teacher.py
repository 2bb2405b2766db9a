"""Teacher sets: a 2D generator's samples with latents, measured cameras and face meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.training.teacher import MESH_POINTS, TeacherSet, build_teacher_set

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_generator_without_faces_cannot_teach_and_writes_nothing(tiny_stylegan2, tmp_path):
    with pytest.raises(UsageError, match="cannot teach faces"):
        build_teacher_set(tiny_stylegan2, tmp_path / "t", 2, max_samples=4, progress=False)
    assert not (tmp_path / "t" / "labels.json").exists()


def test_loading_a_folder_that_is_not_a_set_names_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match="latents.npy"):
        TeacherSet.load(tmp_path)


def test_default_2d_teaches_faces_whose_latents_remake_them(tmp_path):
    from portrait3d.checkpoints.load import load_network
    from portrait3d.utils.visualize import to_uint8

    G = load_network("default-2d")
    summary = build_teacher_set(G, tmp_path / "t", 4, seed=3, network_name="default-2d", progress=False)
    assert summary["count"] == 4 and summary["face_rate"] > 0.5
    t = TeacherSet.load(tmp_path / "t")
    _img, cams, z, mesh = t.batch(torch.arange(4))
    with torch.no_grad():
        again = to_uint8(G(z, torch.zeros(4, 0), noise_mode="const"))
    assert np.abs(again.astype(int) - np.asarray(t.images).astype(int)).max() <= 1
    rot = cams[:, :16].view(-1, 4, 4)[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-4)
    assert mesh.shape == (4, MESH_POINTS, 3) and ((mesh[..., :2] > 0) & (mesh[..., :2] < 128)).all()
    # the nose tip (mesh point 1) is nearer the camera than the cheeks (234, 454) on these near-frontal faces
    assert (mesh[:, 1, 2] < mesh[:, [234, 454], 2].min(1).values).all()
    with pytest.raises(UsageError, match="already holds"):
        build_teacher_set(G, tmp_path / "t", 1, progress=False)


def test_turned_views_show_the_same_latent_from_measured_cameras(tmp_path):
    from portrait3d.checkpoints.load import load_network
    from portrait3d.face.pose import pose_from_camera
    from portrait3d.training.teacher import add_teacher_views

    G = load_network("default-2d")
    build_teacher_set(G, tmp_path / "t", 8, seed=5, network_name="default-2d", progress=False)
    summary = add_teacher_views(G, tmp_path / "t", (-20.0, 20.0), progress=False)
    left, right = summary["measured_yaw_change_median"]
    assert left < -5 and right > 5  # the heads really turn, each way
    t = TeacherSet.load(tmp_path / "t")
    assert t.num_views == 3
    img, cams, z, _ = t.batch(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    assert torch.equal(z[0], z[1]) and not torch.equal(img[0], img[1])
    yaw = torch.as_tensor(pose_from_camera(cams)[0])
    assert yaw[1] < yaw[0] < yaw[2] or summary["views_without_face"] > 0
    with pytest.raises(UsageError, match="already has turned views"):
        add_teacher_views(G, tmp_path / "t", (10.0,), progress=False)
    with pytest.raises(UsageError, match="view 3"):
        t.batch(torch.tensor([0]), torch.tensor([3]))

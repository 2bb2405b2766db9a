"""Tests for portrait3d.methods.nrsfm.model: eq. 2, rotations in the face pipeline's convention, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from portrait3d.face.pose import angles_from_rotation, estimate_head_pose, mean_face_68, rotation_from_angles
from portrait3d.methods.nrsfm.model import (
    SCHEMES,
    ParamLayout,
    RankOneModel,
    angles_from_rotation_matrix,
    get_scheme,
    join,
    rotation_matrix,
    split,
)

torch.set_num_threads(1)


def _mean_face_model(num_basis: int = 0, seed: int = 0) -> RankOneModel:
    b0 = torch.tensor(mean_face_68().T.copy())
    b = torch.randn(num_basis, 3, 68, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.01
    return RankOneModel(b0, b)


def _q(model: RankOneModel, k=1.0, yaw=0.0, pitch=0.0, roll=0.0, alpha=None, t=(0.5, 0.5)) -> torch.Tensor:
    a = torch.zeros(model.num_basis, dtype=torch.float64) if alpha is None else torch.as_tensor(alpha).double()
    return model.layout.join(torch.tensor(float(k)).double(), torch.tensor([yaw, pitch, roll]).double(), a,
                             torch.tensor(t).double())[None]


def test_rotation_matches_face_pose():
    gen = np.random.default_rng(0)
    angles = np.stack([gen.uniform(-170, 170, 50), gen.uniform(-85, 85, 50), gen.uniform(-170, 170, 50)], 1)
    ours = rotation_matrix(torch.tensor(angles)).numpy()
    ref = np.stack([rotation_from_angles(*a) for a in angles])
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    back = angles_from_rotation_matrix(torch.tensor(ref)).numpy()
    np.testing.assert_allclose(back, angles, atol=1e-9)
    np.testing.assert_allclose(back, np.array([angles_from_rotation(r) for r in ref]), atol=1e-9)
    # Batched over any leading shape, and differentiable.
    a = torch.tensor(angles[:6].reshape(2, 3, 3), requires_grad=True)
    r = rotation_matrix(a)
    assert r.shape == (2, 3, 3, 3)
    r[..., 0, 2].sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_param_layout():
    lay = ParamLayout(3)
    assert lay.size == 9
    assert lay.names() == ["k", "yaw", "pitch", "roll", "alpha1", "alpha2", "alpha3", "tx", "ty"]
    assert (lay.k, lay.yaw, lay.pitch, lay.roll) == (0, 1, 2, 3)
    assert lay.theta == slice(1, 4) and lay.alpha == slice(4, 7) and lay.t == slice(7, 9)
    assert lay.alpha_index(2) == 6
    q = torch.arange(18.0).reshape(2, 9)
    k, theta, alpha, t = lay.split(q)
    assert k.shape == (2,) and theta.shape == (2, 3) and alpha.shape == (2, 3) and t.shape == (2, 2)
    assert torch.equal(lay.join(k, theta, alpha, t), q)
    assert torch.equal(join(*split(q)), q)
    assert ParamLayout(0).names() == ["k", "yaw", "pitch", "roll", "tx", "ty"]
    with pytest.raises(ValueError):
        lay.split(torch.zeros(2, 8))
    with pytest.raises(ValueError):
        ParamLayout(-1)


def test_schemes():
    ibug = get_scheme("ibug68")
    assert (ibug.num_points, ibug.nose_tip, ibug.eye_outer) == (68, 30, (36, 45))
    assert ibug.mouth == tuple(range(48, 68)) and ibug.jaw == tuple(range(17))
    # eye_outer is (subject's right, subject's left): head-frame x (= subject's left) increases.
    mf = mean_face_68()
    assert mf[ibug.eye_outer[0], 0] < 0 < mf[ibug.eye_outer[1], 0]
    mp = get_scheme("mediapipe468")
    assert (mp.num_points, mp.nose_tip, mp.eye_outer) == (468, 1, (33, 263))
    assert len(mp.mouth) == 40 and len(set(mp.mouth)) == 40 and max(mp.mouth) < 468
    assert set(SCHEMES) == {"ibug68", "mediapipe468"}
    with pytest.raises(ValueError, match="unknown landmark scheme"):
        get_scheme("ibug5")


def test_project_eq2_and_pose_directions():
    model = _mean_face_model(num_basis=2)
    nose, (eye_r, eye_l) = 30, (36, 45)
    front = model.project(_q(model))[0]
    # Frontal: subject's right eye on the image left, forehead above (smaller y) the chin.
    assert front[eye_r, 0] < front[eye_l, 0] and front[27, 1] < front[8, 1]
    assert model.project(_q(model, yaw=20))[0, nose, 0] > front[nose, 0]  # yaw > 0: nose to image right
    assert model.project(_q(model, pitch=20))[0, nose, 1] < front[nose, 1]  # pitch > 0: nose up
    rolled = model.project(_q(model, roll=15))[0]
    assert rolled[eye_l, 1] > rolled[eye_r, 1]  # roll > 0: the subject's left eye drops
    # Eq. 2 written out.
    q = _q(model, k=0.7, yaw=12, pitch=-7, roll=3, alpha=[0.5, -1.0], t=(0.4, 0.6))
    shape = model.B0 + 0.5 * model.B[0] - 1.0 * model.B[1]
    expect = 0.7 * torch.tensor(rotation_from_angles(12, -7, 3))[:2] @ shape + torch.tensor([[0.4], [0.6]])
    torch.testing.assert_close(model.project(q)[0], expect.T)
    assert model.shapes(q[:, model.layout.alpha]).shape == (1, 3, 68)


def test_project_angles_are_estimate_head_pose_angles():
    """A pose set in eq. 2 is measured as the same pose by the face pipeline (near-orthographic camera)."""
    model = _mean_face_model()
    size = 512
    for yaw, pitch, roll in [(30, 0, 0), (0, 20, 0), (0, 0, 15), (-40, -15, 10), (55, 10, -20)]:
        lm = model.project(_q(model, k=1.2, yaw=yaw, pitch=pitch, roll=roll))[0].numpy() * size
        pose = estimate_head_pose(lm, (size, size), focal=20.0 * size)
        np.testing.assert_allclose(pose.angles, (yaw, pitch, roll), atol=1.0,
                                   err_msg=f"pose {(yaw, pitch, roll)} measured as {pose.angles}")


def test_model_validation():
    b0 = torch.zeros(3, 68)
    with pytest.raises(ValueError):
        RankOneModel(torch.zeros(3, 67), torch.zeros(0, 3, 67))
    with pytest.raises(ValueError):
        RankOneModel(b0, torch.zeros(2, 3, 60))
    with pytest.raises(ValueError):
        RankOneModel(b0, torch.zeros(0, 3, 68), scheme="nope")
    m = RankOneModel(torch.zeros(3, 468), torch.zeros(4, 3, 468), scheme="mediapipe468")
    assert (m.num_points, m.num_basis, m.layout.size) == (468, 4, 10)
    with pytest.raises(ValueError):
        m.shapes(torch.zeros(1, 3))


def test_save_load_round_trip(tmp_path):
    model = _mean_face_model(num_basis=3).float()
    path = model.save(tmp_path / "m.safetensors")
    loaded = RankOneModel.load(path)
    assert loaded.scheme == "ibug68" and loaded.num_basis == 3
    assert loaded.B0.dtype == torch.float32
    torch.testing.assert_close(loaded.B0, model.B0, rtol=0, atol=0)
    torch.testing.assert_close(loaded.B, model.B, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        model.save(path)
    model.save(path, overwrite=True)
    # Buffers follow the module (state_dict, .to).
    assert set(loaded.state_dict()) == {"B0", "B"}
    assert loaded.to(torch.float64).B.dtype == torch.float64
    rigid = RankOneModel(model.B0, torch.zeros(0, 3, 68))
    assert RankOneModel.load(rigid.save(tmp_path / "rigid.safetensors")).num_basis == 0
    assert RankOneModel.from_tensors(model.state_tensors()).num_basis == 3


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    cases = {}
    (tmp_path / "text.safetensors").write_text("hello, not tensors")
    cases["text"] = tmp_path / "text.safetensors"
    save_file({"B0": torch.zeros(3, 68)}, tmp_path / "nometa.safetensors")
    cases["no metadata"] = tmp_path / "nometa.safetensors"
    good_meta = {"format": "portrait3d-nrsfm-rank1", "format_version": "1",
                 "config": json.dumps({"scheme": "ibug68", "num_points": 68, "num_basis": 2})}
    save_file({"B0": torch.zeros(3, 68), "B": torch.zeros(3, 3, 68)}, tmp_path / "shape.safetensors", good_meta)
    cases["wrong shape"] = tmp_path / "shape.safetensors"
    save_file({"B0": torch.zeros(3, 68)}, tmp_path / "missing.safetensors", good_meta)
    cases["missing tensor"] = tmp_path / "missing.safetensors"
    save_file({"B0": torch.zeros(3, 68), "B": torch.zeros(2, 3, 68)}, tmp_path / "ver.safetensors",
              {**good_meta, "format_version": "7"})
    cases["version"] = tmp_path / "ver.safetensors"
    save_file({"B0": torch.zeros(3, 68), "B": torch.zeros(2, 3, 68)}, tmp_path / "cfg.safetensors",
              {**good_meta, "config": "{not json"})
    cases["bad config"] = tmp_path / "cfg.safetensors"
    save_file({"B0": torch.full((3, 68), float("nan")), "B": torch.zeros(2, 3, 68)}, tmp_path / "nan.safetensors",
              good_meta)
    cases["nan"] = tmp_path / "nan.safetensors"
    for name, path in cases.items():
        with pytest.raises(ValueError) as info:
            RankOneModel.load(path)
        assert "\n" not in str(info.value), name
    with pytest.raises(FileNotFoundError):
        RankOneModel.load(tmp_path / "absent.safetensors")

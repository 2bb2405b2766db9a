"""PIE's parameter estimator: neutral start, closed-form targets, losses and gradients, files, and a tiny
resumable training run on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.pie.estimator import (
    EstimatorConfig,
    LossWeights,
    ParamEstimator,
    estimator_losses,
    landmark_error_px,
    rig_targets,
)
from portrait3d.methods.pie.face_model import RigParams
from tests.conftest import make_photo_dataset
from tests.methods.pie.test_face_model import tiny_rig

TINY = dict(width=8, layers=(1, 1, 1, 1), input_size=64)


def _images(n: int, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_untrained_estimator_returns_the_neutral_rig():
    rig = tiny_rig()
    est = ParamEstimator(EstimatorConfig.for_rig(rig, **TINY))
    p = est(_images(2))
    n = rig.neutral(2)
    for f in RigParams.FIELDS:
        torch.testing.assert_close(getattr(p, f), getattr(n, f))
    with pytest.raises(ValueError):
        est(torch.zeros(2, 1, 64, 64))


def _posed_meshes(rig, params: RigParams) -> np.ndarray:
    """What MediaPipe reports for a rig render: pixel x, y and the depth in the same pixel units."""
    cam = rig.to_camera(rig.shape(params.identity, params.expression), params.angles, params.translation)
    xy = rig.project(cam)
    unit = 2 * rig.config.camera_distance * np.tan(np.radians(rig.config.fov_deg) / 2) / (rig.config.image_size - 1)
    return torch.cat([xy, (cam[..., 2:] - rig.config.camera_distance) / unit], -1).double().numpy()


def test_closed_form_targets_recover_pose_and_shape():
    rig = tiny_rig()
    g = torch.Generator().manual_seed(1)
    n = 6
    truth = rig.neutral(n).replace(identity=torch.randn(n, 3, generator=g), expression=torch.randn(n, 2, generator=g),
                                   angles=torch.tensor([[15.0, 5, 0], [-20, 0, 3], [0, -10, 0], [5, 5, 0], [0, 0, 0],
                                                        [25, 0, 0]]))
    pts = _posed_meshes(rig, truth)
    tg = rig_targets(pts, np.full((n, pts.shape[1], 3), 0.6), rig, noise_px=0.1)
    got = RigParams(**{k: torch.from_numpy(v) for k, v in tg.items()})
    assert (got.angles - truth.angles).abs().max() < 2.0  # weak perspective against the perspective render
    assert landmark_error_px(rig, got, torch.from_numpy(pts).float()).max() < 0.5


def test_losses_have_gradients_and_fall_when_overfitting():
    rig = tiny_rig()
    est = ParamEstimator(EstimatorConfig.for_rig(rig, **TINY))
    target = rig.neutral(4).replace(angles=torch.tensor([[10.0, 0, 0], [-10, 0, 0], [0, 8, 0], [0, -8, 0]]))
    batch = {"image": _images(4), "points": torch.from_numpy(_posed_meshes(rig, target)).float(),
             **{f"target_{f}": getattr(target, f) for f in RigParams.FIELDS}}
    w = LossWeights()
    first = estimator_losses(est, rig, batch, w)
    assert all(torch.isfinite(v) for v in first.values())
    first["loss"].backward()
    assert est.backbone.conv1.weight.grad.abs().sum() > 0 or est.head.weight.grad.abs().sum() > 0
    w = LossWeights(photometric=0.0)  # random images: nothing to match photometrically; pose and landmarks fit
    first = estimator_losses(est, rig, batch, w)
    opt = torch.optim.Adam(est.parameters(), lr=3e-3)
    for _ in range(30):
        terms = estimator_losses(est, rig, batch, w)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert terms["loss"] < 0.5 * first["loss"] and terms["landmark_px"] < first["landmark_px"]


def test_save_load(tmp_path):
    rig = tiny_rig()
    est = ParamEstimator(EstimatorConfig.for_rig(rig, **TINY))
    with torch.no_grad():
        est.head.bias.normal_()
    path = est.save(tmp_path / "e.safetensors")
    back = ParamEstimator.load(path)
    x = _images(1)
    torch.testing.assert_close(back(x).vector(), est.eval()(x).vector())
    (tmp_path / "bad.safetensors").write_text("x")
    with pytest.raises(UsageError):
        ParamEstimator.load(tmp_path / "bad.safetensors")


def test_training_run_on_real_photos_resumes_bit_exactly(tmp_path, one_thread):
    pytest.importorskip("mediapipe")

    from portrait3d.methods.pie.train import EstimatorTrainConfig, evaluate_estimator, train_estimator

    root = make_photo_dataset(tmp_path / "utk", 24)

    def cfg(kimg: float) -> EstimatorTrainConfig:
        c = EstimatorTrainConfig(count=24, batch=4, total_kimg=kimg, snapshot_kimg=0.008, sample_kimg=0.008,
                                 grid_samples=4, bf16=False)
        c.net = EstimatorConfig(**TINY)
        return c

    straight, split = tmp_path / "a", tmp_path / "b"
    export = train_estimator(root, straight, cfg(0.016), progress=False)
    train_estimator(root, split, cfg(0.008), progress=False)
    train_estimator(root, split, cfg(0.016), resume=split, progress=False)
    from safetensors.torch import load_file

    a = load_file(str(straight / "snapshot-00000004" / "state.safetensors"))
    b = load_file(str(split / "snapshot-00000004" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "samples" / "fit-00000004.png").is_file() and (straight / "targets.npz").is_file()
    from portrait3d.methods.pie.face_model import FaceModel

    ev = evaluate_estimator(ParamEstimator.load(export), FaceModel.load("face-rig"), root, count=8)
    assert ev["faces"] >= 6 and np.isfinite(ev["landmark_px"]) and ev["landmark_px_closed_form_fit"] < 3.0

"""Tests for portrait3d.face.pose: head pose by PnP on synthetic views, EG3D camera round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.conftest import shared_path

from portrait3d.errors import UsageError
from portrait3d.face.pose import (
    EG3D_FOV_DEG,
    MEAN_FACE_PATH,
    HeadPose,
    angles_from_rotation,
    camera_from_pose,
    estimate_head_pose,
    focal_from_fov,
    mean_face_68,
    pose_from_camera,
    project_points,
    rotation_from_angles,
)
from portrait3d.networks.eg3d.camera import (
    angles_from_camera,
    camera_from_angles,
    pose_angles_from_camera,
    roll_from_camera,
)

MIRROR = np.array([16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                   26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 27, 28, 29, 30, 35, 34, 33, 32, 31,
                   45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
                   54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])
EG3D_SIZE = (512, 512)
PHOTO_SIZE = (1000, 800)


def _random_views(kind: str, shape_noise: float, axis_scale: float, n: int, seed: int):
    """Synthetic landmark sets: (landmarks [68,2], image size, focal, true angles), 0.5 px noise.

    ``kind='eg3d'``: 512 px aligned crop, EG3D focal, head origin about 2.7 in front of the camera.
    ``kind='photo'``: 1000x800 photo, focal = diagonal, head 3-5 units away, off-centre.
    ``shape_noise``: per-coordinate Gaussian perturbation of the mean face, as a fraction of its
    outer-eye-corner distance; ``axis_scale``: std of independent x/y/z scalings (face proportions).
    """
    rng = np.random.default_rng(seed)
    mean = mean_face_68()
    eye = np.linalg.norm(mean[45] - mean[36])
    for _ in range(n):
        angles = (rng.uniform(-40, 40), rng.uniform(-25, 25), rng.uniform(-20, 20))
        shape = (mean - mean.mean(0)) * rng.normal(1.0, axis_scale, 3) + mean.mean(0)
        shape = shape + rng.normal(0.0, shape_noise * eye, shape.shape)
        if kind == "eg3d":
            size, focal = EG3D_SIZE, focal_from_fov(EG3D_FOV_DEG, EG3D_SIZE)
            t = np.array([0.0, 0.0, 2.7]) + rng.normal(0.0, 0.03, 3)
        else:
            size, focal = PHOTO_SIZE, math.hypot(*PHOTO_SIZE)
            t = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(3.0, 5.0)])
        uv = project_points(shape, rotation_from_angles(*angles), t, focal, size)
        yield uv + rng.normal(0.0, 0.5, uv.shape), size, focal, np.array(angles)


def _max_errors(views) -> np.ndarray:
    errors = []
    for uv, size, focal, truth in views:
        pose = estimate_head_pose(uv, size, focal=focal)
        errors.append(np.abs(np.array(pose.angles) - truth))
    return np.array(errors)


# ------------------------------------------------------------------------------------------------
# Mean face and angle conventions
# ------------------------------------------------------------------------------------------------


def test_mean_face_frame():
    p = mean_face_68()
    raw = np.load(MEAN_FACE_PATH)
    assert raw.dtype == np.float32 and raw.shape == (68, 3)
    # Exactly left-right symmetric about x = 0 with iBUG's partner labels.
    assert np.allclose(p[MIRROR] * [-1, 1, 1], p, atol=1e-6)
    assert p[45, 0] > 0 > p[36, 0]  # +x = the subject's left (point 45: left outer eye corner)
    assert p[27, 1] > p[30, 1] > p[8, 1]  # +y = up: nose bridge above nose tip above chin
    assert p[30, 2] > p[27, 2] > p[[0, 16], 2].mean()  # +z = forward: nose tip in front of the jaw
    assert np.linalg.norm(p[45] - p[36]) == pytest.approx(0.24, abs=1e-5)
    assert np.allclose(p.mean(0), [0.0, 0.0, 0.16], atol=1e-5)


def test_rotation_angles_round_trip():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in zip(rng.uniform(-170, 170, 50), rng.uniform(-85, 85, 50), rng.uniform(-170, 170, 50)):
        r = rotation_from_angles(yaw, pitch, roll)
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.linalg.det(r) == pytest.approx(1.0)
        assert np.allclose(angles_from_rotation(r), (yaw, pitch, roll), atol=1e-9)
    assert np.array_equal(rotation_from_angles(0, 0, 0), np.diag([1.0, -1.0, -1.0]))


def _project_frontal(points: np.ndarray, size=EG3D_SIZE) -> np.ndarray:
    focal = focal_from_fov(EG3D_FOV_DEG, size)
    return project_points(points, np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, 2.7]), focal, size)


def test_sign_yaw_head_turned_to_its_left():
    # Turn the head about its own vertical axis so that its nose moves toward its left (+x).
    a = math.radians(25)
    turn = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    p = mean_face_68() @ turn.T
    assert p[30, 0] > 0
    uv = _project_frontal(p)
    pose = estimate_head_pose(uv, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert pose.yaw_deg == pytest.approx(25, abs=0.01)
    assert uv[30, 0] > uv[:, 0].mean()  # the nose points toward the image right


def test_sign_pitch_chin_up():
    a = math.radians(15)  # nose moves up (+y), chin forward
    tilt = np.array([[1, 0, 0], [0, math.cos(a), math.sin(a)], [0, -math.sin(a), math.cos(a)]])
    p = mean_face_68() @ tilt.T
    assert p[30, 1] > mean_face_68()[30, 1] and p[8, 2] > mean_face_68()[8, 2]
    uv = _project_frontal(p)
    pose = estimate_head_pose(uv, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert pose.pitch_deg == pytest.approx(15, abs=0.01)


def test_sign_roll_clockwise_in_image():
    uv = _project_frontal(mean_face_68())
    a = math.radians(12)  # clockwise on screen (image y points down)
    centre = np.array([(EG3D_SIZE[0] - 1) / 2, (EG3D_SIZE[1] - 1) / 2])
    rot2d = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    uv_r = (uv - centre) @ rot2d.T + centre
    assert uv_r[42:48, 1].mean() > uv_r[36:42, 1].mean()  # the subject's left eye (image right) drops
    pose = estimate_head_pose(uv_r, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert pose.roll_deg == pytest.approx(12, abs=0.01)
    assert abs(pose.yaw_deg) < 0.01 and abs(pose.pitch_deg) < 0.01


def test_mirrored_image_negates_yaw_and_roll():
    truth = (30.0, -12.0, 9.0)
    focal = focal_from_fov(EG3D_FOV_DEG, EG3D_SIZE)
    uv = project_points(mean_face_68(), rotation_from_angles(*truth), [0.05, -0.02, 2.7], focal, EG3D_SIZE)
    mirrored = uv[MIRROR].copy()
    mirrored[:, 0] = EG3D_SIZE[0] - 1 - mirrored[:, 0]
    pose = estimate_head_pose(mirrored, EG3D_SIZE, focal=focal)
    assert np.allclose(pose.angles, (-30.0, -12.0, -9.0), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Accuracy on synthetic views
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eg3d", "photo"])
def test_exact_shape_recovers_pose(kind):
    errors = _max_errors(_random_views(kind, 0.0, 0.0, 60, seed=2))
    print(f"\n{kind}, mean shape, 0.5 px noise: max |error| yaw/pitch/roll = {errors.max(0).round(3)} deg")
    assert errors.max() < 1.0  # faces are 100-170 px wide in the photo set-up


@pytest.mark.parametrize("kind", ["eg3d", "photo"])
def test_perturbed_shapes_within_2_degrees(kind):
    """Shape mismatch: each landmark moved by N(0, 1.5 % of the eye-corner width) per coordinate."""
    errors = _max_errors(_random_views(kind, 0.015, 0.0, 120, seed=3))
    print(f"\n{kind}, perturbed shapes, 0.5 px noise: max |error| yaw/pitch/roll = "
          f"{errors.max(0).round(3)} deg, 95th percentile {np.percentile(errors, 95, axis=0).round(3)}")
    assert errors.max() < 2.0


def test_face_proportion_mismatch_is_the_dominant_error():
    """Documents the sensitivity: faces 3 % wider / taller / deeper (independently) than the model."""
    errors = _max_errors(_random_views("eg3d", 0.0, 0.03, 120, seed=4))
    p95 = np.percentile(errors, 95, axis=0)
    print(f"\nproportions +-3 %: max |error| {errors.max(0).round(3)} deg, 95th percentile {p95.round(3)}")
    assert np.median(errors) < 1.0 and p95.max() < 3.0 and errors.max() < 6.0


def test_translation_and_error_fields():
    focal = focal_from_fov(EG3D_FOV_DEG, EG3D_SIZE)
    t = np.array([0.03, -0.05, 2.6])
    uv = project_points(mean_face_68(), rotation_from_angles(10, 5, -3), t, focal, EG3D_SIZE)
    pose = estimate_head_pose(uv, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert np.allclose(pose.translation, t, atol=1e-6)
    assert pose.reprojection_error < 1e-6 and pose.focal == pytest.approx(focal)
    assert np.allclose(pose.rotation, rotation_from_angles(*pose.angles), atol=1e-12)
    assert np.allclose(pose.camera_position, -pose.rotation.T @ t)


def test_default_focal_is_image_diagonal_and_inputs_checked():
    size = (640, 480)
    uv = project_points(mean_face_68(), rotation_from_angles(-20, 10, 0), [0, 0, 4.0], 800.0, size)
    assert estimate_head_pose(uv, size).focal == pytest.approx(800.0)
    assert estimate_head_pose(uv, size, focal=800.0).reprojection_error < 1e-6
    with pytest.raises(ValueError):
        estimate_head_pose(uv[:5], size)
    with pytest.raises(ValueError):
        estimate_head_pose(np.full((68, 2), np.nan), size)
    with pytest.raises(ValueError):
        estimate_head_pose(uv, size, focal=-1.0)
    with pytest.raises(ValueError):
        estimate_head_pose(uv, (0, 480))


# ------------------------------------------------------------------------------------------------
# EG3D cameras
# ------------------------------------------------------------------------------------------------


def test_camera_from_angles_roll_keeps_default_and_round_trips():
    assert torch.equal(camera_from_angles(20.0, -5.0, roll_deg=0.0), camera_from_angles(20.0, -5.0))
    rng = np.random.default_rng(5)
    for yaw, pitch, roll in zip(rng.uniform(-80, 80, 30), rng.uniform(-80, 80, 30), rng.uniform(-170, 170, 30)):
        c = camera_from_angles(float(yaw), float(pitch), roll_deg=float(roll))
        y, p, r, radius = pose_angles_from_camera(c)
        assert abs(y - yaw) < 1e-4 and abs(p - pitch) < 1e-4 and abs(r - roll) < 1e-4
        assert abs(radius - 2.7) < 1e-5
        # Roll turns the camera about its viewing axis only: position and forward axis unchanged.
        c0 = camera_from_angles(float(yaw), float(pitch))
        assert torch.allclose(c[[2, 6, 10, 3, 7, 11]], c0[[2, 6, 10, 3, 7, 11]], atol=1e-6)
        assert angles_from_camera(c) == angles_from_camera(c0)
    # Batched roll.
    c = camera_from_angles(torch.tensor([10.0, -20.0]), 5.0, roll_deg=torch.tensor([3.0, -7.0]))
    assert torch.allclose(roll_from_camera(c), torch.tensor([3.0, -7.0], dtype=torch.float64), atol=1e-4)


def test_camera_roll_turns_face_clockwise_in_image():
    c = camera_from_angles(0.0, 0.0, roll_deg=15.0)
    world2cam = torch.linalg.inv(c[:16].reshape(4, 4)).double()
    up = world2cam[:3, :3] @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # head up, camera axes
    # Head up points toward image up (-y) rotated clockwise: toward the image right (+x).
    assert up[0] == pytest.approx(math.sin(math.radians(15)), abs=1e-6)
    assert up[1] == pytest.approx(-math.cos(math.radians(15)), abs=1e-6)


def test_pose_camera_round_trip_exact():
    rng = np.random.default_rng(6)
    for yaw, pitch, roll in zip(rng.uniform(-80, 80, 40), rng.uniform(-70, 70, 40), rng.uniform(-90, 90, 40)):
        c = camera_from_pose((yaw, pitch, roll))
        assert c.shape == (25,) and c.dtype == torch.float32
        y, p, r = pose_from_camera(c)
        assert abs(y - yaw) < 1e-4 and abs(p - pitch) < 1e-4 and abs(r - roll) < 1e-4
        cam2world = c[:16].reshape(4, 4).double()
        # The camera's rotation is the head pose; it sits at radius 2.7 and looks at the pivot.
        assert np.allclose(cam2world[:3, :3].T.numpy(), rotation_from_angles(yaw, pitch, roll), atol=1e-6)
        assert cam2world[:3, 3].norm().item() == pytest.approx(2.7, abs=1e-5)
        to_pivot = torch.tensor([0.0, 0.0, 0.2], dtype=torch.float64) - cam2world[:3, 3]
        assert torch.allclose(cam2world[:3, 2], to_pivot / to_pivot.norm(), atol=1e-6)
    batch = torch.stack([camera_from_pose((10.0, 5.0, -3.0)), camera_from_pose((-30.0, 0.0, 0.0))])
    y, p, r = pose_from_camera(batch)
    assert torch.allclose(torch.stack([y, p, r], 1), torch.tensor([[10.0, 5.0, -3.0], [-30.0, 0.0, 0.0]],
                                                                   dtype=torch.float64), atol=1e-4)


def test_frontal_pose_is_default_camera_and_parallax():
    assert torch.equal(camera_from_pose((0.0, 0.0, 0.0)), camera_from_angles(0.0, 0.0))
    assert torch.equal(camera_from_pose(HeadPose.from_angles(0, 0, 0)), camera_from_angles(0.0, 0.0))
    # The pivot lies in front of the origin: the camera position turns a little less than the head.
    yaw_c, pitch_c, _ = angles_from_camera(camera_from_pose((20.0, 0.0, 0.0)))
    assert 18.0 < yaw_c < 19.0 and abs(pitch_c) < 1e-6
    assert pose_from_camera(camera_from_angles(0.0, 0.0)) == (0.0, 0.0, 0.0)


def _render_eg3d_landmarks(c: torch.Tensor, points: np.ndarray, size=EG3D_SIZE) -> np.ndarray:
    """Project head-frame points with an EG3D label (normalised intrinsics) to integer-centred px."""
    cam2world = c[:16].reshape(4, 4).double().numpy()
    k = c[16:].reshape(3, 3).double().numpy()
    world2cam = np.linalg.inv(cam2world)
    cam = points @ world2cam[:3, :3].T + world2cam[:3, 3]
    uvn = (cam / cam[:, 2:3]) @ k.T
    return uvn[:, :2] * np.array(size) - 0.5  # EG3D: principal point 0.5 = pixel 255.5 of 512


def test_estimated_camera_of_frontal_face_is_camera_from_angles_zero():
    c0 = camera_from_angles(0.0, 0.0)
    uv = _render_eg3d_landmarks(c0, mean_face_68())
    pose = estimate_head_pose(uv, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert max(abs(a) for a in pose.angles) < 1e-4
    assert torch.allclose(camera_from_pose(pose), c0, atol=1e-5)
    # With 0.5 px landmark noise the camera stays within a few thousandths.
    noisy = uv + np.random.default_rng(7).normal(0.0, 0.5, uv.shape)
    assert torch.allclose(camera_from_pose(estimate_head_pose(noisy, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)), c0,
                          atol=0.02)


def test_estimated_camera_reproduces_eg3d_view():
    """A view rendered with an EG3D label is estimated back to (nearly) the same label."""
    c = camera_from_pose((25.0, -10.0, 6.0))
    uv = _render_eg3d_landmarks(c, mean_face_68())
    pose = estimate_head_pose(uv, EG3D_SIZE, fov_deg=EG3D_FOV_DEG)
    assert np.allclose(pose.angles, (25.0, -10.0, 6.0), atol=1e-3)
    assert torch.allclose(camera_from_pose(pose), c, atol=1e-4)
    # Frontal look-at camera at 2.7 looking at (0, 0, 0.2): the head origin is about 2.7 away.
    assert np.linalg.norm(pose.translation) == pytest.approx(2.7, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# Real photo
# ------------------------------------------------------------------------------------------------


def test_real_photo_obama_is_frontal():
    dlib = pytest.importorskip("dlib")
    cv2 = pytest.importorskip("cv2")
    from portrait3d.face.models import dlib_model_path

    path = shared_path("data/portraits/face_recognition/examples/obama.jpg")
    bgr = cv2.imread(str(path))
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    boxes = dlib.get_frontal_face_detector()(rgb, 1)
    assert len(boxes) == 1
    shape = dlib.shape_predictor(str(dlib_model_path("shape_68")))(rgb, boxes[0])
    landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
    pose = estimate_head_pose(landmarks, (rgb.shape[1], rgb.shape[0]))
    print(f"\nobama.jpg: yaw {pose.yaw_deg:.1f}, pitch {pose.pitch_deg:.1f}, roll {pose.roll_deg:.1f} deg, "
          f"RMS {pose.reprojection_error:.1f} px")
    assert abs(pose.yaw_deg) < 15 and abs(pose.pitch_deg) < 20 and abs(pose.roll_deg) < 10


# ----------------------------------------------------------------------------- the 468-point mesh fit
@pytest.mark.parametrize("yaw", [-80.0, -60.0, -30.0, 0.0, 45.0, 75.0])
def test_mesh_fit_recovers_profile_poses(yaw):
    from portrait3d.face.pose import estimate_head_pose_mesh, mean_face_468

    v, _ = mean_face_468()
    size, focal = (256, 256), focal_from_fov(EG3D_FOV_DEG, (256, 256))
    rot = rotation_from_angles(yaw, 8.0, -3.0)
    pts = project_points(v, rot, np.array([0.0, 0.0, 5.4]), focal, size)
    pts = pts + np.random.default_rng(0).normal(0, 0.5, pts.shape)
    pose = estimate_head_pose_mesh(pts, size, fov_deg=EG3D_FOV_DEG)
    assert abs(pose.yaw_deg - yaw) < 1 and abs(pose.pitch_deg - 8) < 1 and abs(pose.roll_deg + 3) < 1
    assert pose.reprojection_error < 1.5


def test_mesh_fit_ignores_hidden_points():
    """At 70 deg the far cheek is hidden; a predictor's guesses for it (here: pulled toward a frontal face) must
    not drag the yaw, and the visibility refit drops them."""
    from portrait3d.face.pose import _vertex_normals, estimate_head_pose_mesh, mean_face_468

    v, f = mean_face_468()
    size, focal = (256, 256), focal_from_fov(EG3D_FOV_DEG, (256, 256))
    rot, t = rotation_from_angles(70.0, 0.0, 0.0), np.array([0.0, 0.0, 5.4])
    pts = project_points(v, rot, t, focal, size)
    hidden = ((_vertex_normals(v, f) @ rot.T) * -(v @ rot.T + t)).sum(1) <= 0
    assert 20 < hidden.sum() < 300
    frontal = project_points(v, rotation_from_angles(0.0, 0.0, 0.0), t, focal, size)
    pts[hidden] = 0.5 * (pts[hidden] + frontal[hidden])
    assert abs(estimate_head_pose_mesh(pts, size, fov_deg=EG3D_FOV_DEG).yaw_deg - 70) < 3
    assert abs(estimate_head_pose_mesh(pts, size, fov_deg=EG3D_FOV_DEG, visibility_rounds=0).yaw_deg - 70) > \
        abs(estimate_head_pose_mesh(pts, size, fov_deg=EG3D_FOV_DEG).yaw_deg - 70)


def test_mesh_fit_checks_and_confidence():
    from portrait3d.face.pose import HeadPose, estimate_head_pose_mesh, pose_confidence

    with pytest.raises(UsageError):
        estimate_head_pose_mesh(np.zeros((68, 2)), (128, 128))
    with pytest.raises(UsageError):
        estimate_head_pose_mesh(np.full((468, 2), np.nan), (128, 128))
    good = HeadPose(10.0, 0.0, 0.0, np.eye(3), np.zeros(3), reprojection_error=0.5)
    assert pose_confidence(good, 100.0) == (True, [])
    ok, why = pose_confidence(HeadPose(10.0, 0.0, 0.0, np.eye(3), np.zeros(3), reprojection_error=8.0), 100.0)
    assert not ok and "fit a head pose poorly" in why[0]
    ok, why = pose_confidence(HeadPose(50.0, 0.0, 0.0, np.eye(3), np.zeros(3), reprojection_error=0.5), 100.0)
    assert ok and "trained on" in why[0]
    assert not pose_confidence(HeadPose(85.0, 0.0, 0.0, np.eye(3), np.zeros(3), reprojection_error=0.5), 100.0)[0]

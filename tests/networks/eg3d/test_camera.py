"""Tests for portrait3d.networks.eg3d.camera (EG3D camera conventions)."""

import math

import numpy as np
import pytest
import torch
from tests.conftest import PARITY

from portrait3d.networks.eg3d.camera import (
    angles_from_camera,
    camera_from_angles,
    camera_vector,
    create_cam2world_matrix,
    fov_to_intrinsics,
    look_at_pose,
)

FIXTURE = PARITY / "eg3d_128.npz"
PIVOT = torch.tensor([0.0, 0.0, 0.2])


def _split(c: torch.Tensor):
    return c[..., :16].reshape(-1, 4, 4), c[..., 16:].reshape(-1, 3, 3)


def test_intrinsics_values():
    k = fov_to_intrinsics(18.837)
    f = 1 / (math.tan(18.837 * 3.14159 / 360) * 1.414)  # official constants
    assert k.dtype == torch.float32 and k.shape == (3, 3)
    expected = torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], dtype=torch.float32)
    assert torch.equal(k, expected)
    assert abs(f - 4.2634) < 1e-4


@pytest.mark.parametrize(
    "yaw,pitch", [(0.0, 0.0), (20.0, -8.5), (-45.0, 30.0), (89.0, -60.0), (-170.0, 5.0), (0.1, -89.0)]
)
def test_round_trip_scalar(yaw, pitch):
    c = camera_from_angles(yaw, pitch, radius=2.7)
    assert c.shape == (25,) and c.dtype == torch.float32
    y, p, r = angles_from_camera(c)
    assert abs(y - yaw) < 1e-4
    assert abs(p - pitch) < 1e-4
    assert abs(r - 2.7) < 1e-5


def test_round_trip_batched_matches_scalar():
    yaws = torch.tensor([-30.0, 0.0, 12.5, 60.0])
    pitches = torch.tensor([10.0, 0.0, -20.0, 5.0])
    c = camera_from_angles(yaws, pitches)
    assert c.shape == (4, 25)
    single = torch.stack([camera_from_angles(float(a), float(b)) for a, b in zip(yaws, pitches)])
    assert torch.equal(c, single)
    y, p, r = angles_from_camera(c)
    assert torch.allclose(y, yaws.double(), atol=1e-4, rtol=0)
    assert torch.allclose(p, pitches.double(), atol=1e-4, rtol=0)
    assert torch.allclose(r, torch.full_like(r, 2.7), atol=1e-5, rtol=0)
    # Sequences are accepted too.
    assert torch.equal(camera_from_angles([-30.0, 0.0], [10.0, 0.0]), c[:2])


def test_frontal_camera_looks_at_pivot():
    c = camera_from_angles(0.0, 0.0)
    cam2world, k = _split(c)
    # Official LookAtPoseSampler: radius is measured from the world origin, not from the pivot.
    assert torch.allclose(cam2world[0, :3, 3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-6)
    forward = cam2world[0, :3, 2]
    to_pivot = PIVOT - cam2world[0, :3, 3]
    assert torch.allclose(forward, to_pivot / to_pivot.norm(), atol=1e-6)
    # OpenCV axes: x right (world +x), y down (world -y), z forward (world -z).
    assert torch.allclose(cam2world[0, :3, :3], torch.diag(torch.tensor([1.0, -1.0, -1.0])), atol=1e-6)
    assert torch.equal(cam2world[0, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.equal(k[0], fov_to_intrinsics(18.837))


def test_rotation_orthonormal_and_looks_at_pivot():
    c = camera_from_angles(torch.tensor([25.0, -40.0]), torch.tensor([-15.0, 20.0]))
    cam2world, _ = _split(c)
    rot = cam2world[:, :3, :3]
    eye = torch.eye(3).expand(2, 3, 3)
    assert torch.allclose(rot.transpose(1, 2) @ rot, eye, atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(2), atol=1e-6)
    to_pivot = PIVOT - cam2world[:, :3, 3]
    assert torch.allclose(rot[:, :, 2], to_pivot / to_pivot.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(cam2world[:, :3, 3].norm(dim=-1), torch.full((2,), 2.7), atol=1e-6)


def _eg3d_raw_pitch_to_deg(raw: float) -> float:
    """Geometric pitch (ours) of EG3D's raw ``vertical = pi/2 + raw`` sampler parameter."""
    return math.degrees(math.asin(2 * raw / math.pi))


def test_angle_signs():
    cam2world, _ = _split(camera_from_angles(30.0, 0.0))
    # Positive yaw turns the head to its left: the camera moves to the subject's right (world -x).
    assert cam2world[0, 0, 3] < -0.5
    assert abs(cam2world[0, 0, 3].item() - (-2.7 * math.sin(math.radians(30)))) < 1e-5
    cam2world, _ = _split(camera_from_angles(0.0, 20.0))
    # Positive pitch tilts the head up: the camera moves below the face (world -y), a true elevation.
    assert abs(cam2world[0, 1, 3].item() - (-2.7 * math.sin(math.radians(20.0)))) < 1e-5


def test_head_turns_left_in_image():
    """For positive yaw the nose (a point in front of the face) projects right of the face centre."""
    c = camera_from_angles(30.0, 0.0)
    cam2world, k = _split(c)
    world2cam = torch.linalg.inv(cam2world[0])
    def project(p):
        q = world2cam @ torch.tensor([*p, 1.0])
        return (k[0] @ (q[:3] / q[2]))[:2]
    nose, centre = project((0.0, 0.0, 0.5)), project((0.0, 0.0, 0.0))
    assert nose[0] > centre[0]  # image x grows to the right; the face looks toward image right


def test_pitch_rejects_poles():
    with pytest.raises(ValueError):
        camera_from_angles(0.0, 90.0)


def test_look_at_pose_matches_camera_from_angles():
    # EG3D raw sampler: horizontal = pi/2 + a turns the head to its right, i.e. our yaw = -a.
    pose = look_at_pose(math.pi / 2 + 0.35, math.pi / 2 - 0.15, PIVOT, radius=2.7)
    c = camera_from_angles(-math.degrees(0.35), _eg3d_raw_pitch_to_deg(-0.15))
    assert torch.allclose(pose.reshape(16), c[:16], atol=2e-6)


def test_create_cam2world_matrix_batch():
    origin = torch.tensor([[1.0, 0.5, 2.0], [0.0, 0.0, 3.0]])
    m = create_cam2world_matrix(-origin, origin)
    assert m.shape == (2, 4, 4)
    assert torch.allclose(m[:, :3, 3], origin)
    assert torch.allclose(m[:, :3, 2], -origin / origin.norm(dim=-1, keepdim=True), atol=1e-6)


def test_camera_vector_shared_and_batched_intrinsics():
    pose = look_at_pose(torch.tensor([1.4, 1.6]), torch.tensor([1.5, 1.7]), PIVOT, radius=2.7)
    k = fov_to_intrinsics(18.837)
    a = camera_vector(pose, k)
    b = camera_vector(pose, k.expand(2, 3, 3))
    assert a.shape == (2, 25) and torch.equal(a, b)
    assert torch.equal(a[:, :16].reshape(2, 4, 4), pose)
    assert torch.equal(a[1, 16:].reshape(3, 3), k)


@pytest.mark.skipif(not FIXTURE.exists(), reason="parity fixture not available")
def test_fixture_cameras_bit_exact():
    c_ref = torch.from_numpy(np.load(FIXTURE)["c"])
    c = camera_from_angles([0.0, -math.degrees(0.35)], [0.0, _eg3d_raw_pitch_to_deg(-0.15)])
    assert torch.allclose(c, c_ref, atol=2e-6)

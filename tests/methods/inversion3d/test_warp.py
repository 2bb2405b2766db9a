"""Differentiable camera (CameraParams) and depth-based warping (Ko et al.'s warping loss)."""

from __future__ import annotations

import math

import pytest
import torch

from portrait3d.methods.inversion3d.camera_params import CameraParams, fov_from_intrinsics
from portrait3d.methods.inversion3d.warp import (
    depth_edges,
    pixel_centres,
    project,
    split_camera,
    unproject,
    warp_image,
    warp_loss,
)
from portrait3d.networks.eg3d.camera import (
    camera_from_angles,
    camera_vector,
    fov_to_intrinsics,
    look_at_pose,
    pose_angles_from_camera,
)
from portrait3d.networks.eg3d.ray_sampler import RaySampler

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- CameraParams

@pytest.mark.parametrize("yaw,pitch,roll", [(0.0, 0.0, 0.0), (20.0, -10.0, 0.0), (-35.0, 12.0, 7.5), (60.0, 40.0, -20.0)])
def test_camera_params_reproduce_camera_from_angles(yaw, pitch, roll):
    c = camera_from_angles(yaw, pitch, roll_deg=roll)
    direct = CameraParams(yaw, pitch, roll).label()[0]
    assert torch.equal(direct, c)  # same float64 / float32 steps as camera_from_angles
    cam = CameraParams.from_label(c)
    torch.testing.assert_close(cam.label()[0], c, atol=1e-6, rtol=0)
    assert cam.state()["yaw"] == pytest.approx(yaw, abs=1e-4)
    assert cam.state()["pitch"] == pytest.approx(pitch, abs=1e-4)
    assert cam.state()["roll"] == pytest.approx(roll, abs=1e-4)
    torch.testing.assert_close(cam.rotation_offset[0], torch.eye(3), atol=1e-6, rtol=0)


def test_camera_params_batched_and_arbitrary_rigid_camera():
    c = camera_from_angles([10.0, -20.0, 0.0], [5.0, 0.0, -8.0], roll_deg=[0.0, 3.0, -4.0])
    cam = CameraParams.from_label(c, optimize_roll=True)
    assert cam.batch_size == 3
    torch.testing.assert_close(cam.label(), c, atol=1e-6, rtol=0)
    # a camera that does not look at the pivot (other look-at point, other FOV): still reproduced exactly
    other = camera_vector(look_at_pose(1.3, 1.7, torch.tensor([0.05, 0.1, 0.0]), 2.7), fov_to_intrinsics(14.0))
    cam = CameraParams.from_label(other)
    torch.testing.assert_close(cam.label(), other, atol=1e-6, rtol=0)
    assert (cam.rotation_offset[0] - torch.eye(3)).abs().max() > 1e-3
    assert fov_from_intrinsics(cam.intrinsics[0]) == pytest.approx(14.0, abs=1e-4)


def test_camera_translation_moves_the_camera_rigidly():
    cam = CameraParams(15.0, -5.0, translation=[0.1, -0.05, 0.2])
    base = camera_from_angles(15.0, -5.0)
    lab = cam.label()[0]
    torch.testing.assert_close(lab[[3, 7, 11]], base[[3, 7, 11]] + torch.tensor([0.1, -0.05, 0.2]))
    rot = [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert torch.equal(lab[rot], base[rot]) and torch.equal(lab[16:], base[16:])


def test_camera_params_gradients():
    cam = CameraParams.from_label(camera_from_angles(25.0, 10.0), optimize_roll=True)
    weights = torch.randn(1, 25, generator=torch.Generator().manual_seed(0))
    (cam.label() * weights).sum().backward()
    for p in (cam.yaw, cam.pitch, cam.roll, cam.translation):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    frozen = CameraParams(0.0, 0.0, optimize_roll=False, optimize_translation=False)
    assert not frozen.roll.requires_grad and not frozen.translation.requires_grad
    assert frozen.angle_parameters() == [frozen.yaw, frozen.pitch] and frozen.translation_parameters() == []
    # finite differences on yaw agree with autograd (degrees)
    cam2 = CameraParams(25.0, 10.0)
    f = lambda y: (CameraParams(y, 10.0).label().double() * weights.double()).sum()
    (cam2.label() * weights).sum().backward()
    with torch.no_grad():
        fd = (f(25.05) - f(24.95)) / 0.1
    assert float(cam2.yaw.grad) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


# ------------------------------------------------------------------------------------- projection

def _camera_with_skew():
    c = camera_from_angles([20.0], [-5.0], roll_deg=[4.0]).clone()
    c[0, 16 + 1] = 0.05   # skew
    c[0, 16 + 2] = 0.47   # principal point
    return c


def test_unproject_matches_ray_sampler_and_project_inverts_it():
    c = _camera_with_skew()
    c2w, k = split_camera(c)
    depth = 2.5 + torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    origins, dirs = RaySampler()(c2w, k, 8)
    expected = (origins + depth.reshape(1, -1, 1) * dirs).reshape(1, 8, 8, 3)
    points = unproject(depth, c2w, k)
    torch.testing.assert_close(points, expected, atol=2e-6, rtol=0)
    uv, dist, z = project(points, c2w, k, return_depth=True)
    torch.testing.assert_close(uv[0], pixel_centres(8, 8), atol=2e-6, rtol=0)
    torch.testing.assert_close(dist, depth[:, 0], atol=2e-6, rtol=0)
    assert (z > 0).all() and (z <= dist + 1e-6).all()


def test_identity_warp_returns_the_image():
    c = camera_from_angles([12.0], [3.0])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    depth = (2.6 + 0.05 * xx + 0.03 * yy ** 2)[None, None]
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    warped, mask = warp_image(image, depth.expand(2, 1, 16, 16), c, c, src_depth=depth)
    torch.testing.assert_close(warped, image, atol=5e-5, rtol=0)
    assert torch.equal(mask, torch.ones(2, 1, 16, 16))
    assert float(warp_loss(image, image, depth.expand(2, 1, 16, 16), c, c, source_depth=depth)) < 1e-8


def test_plane_warp_is_the_analytic_homography():
    """A world plane n.X = d seen by two cameras: the warp must equal the plane-induced homography
    H = K_s R_s^T (I + (o_d - o_s) n^T / (d - n^T o_d)) R_d K_d^-1 (pixel centres, normalised coordinates)."""
    res = 32
    src = camera_from_angles([5.0], [-3.0])
    dst = camera_from_angles([-15.0], [8.0], roll_deg=[6.0])
    n, d = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 0.1
    (s2w, ks), (d2w, kd) = split_camera(src), split_camera(dst)
    # depth of the plane from the destination camera, by ray casting (independent of warp.py)
    o, dirs = RaySampler()(d2w, kd, res)
    t = (d - o.double() @ n) / (dirs.double() @ n)
    depth = t.float().reshape(1, 1, res, res)
    # source image: a linear ramp, which bilinear sampling reproduces exactly inside the frame
    ramp = pixel_centres(res, res).permute(2, 0, 1)[None]                  # channels (u, v)
    warped, mask = warp_image(ramp, depth, src, dst)

    rs, os_ = s2w[0, :3, :3].double(), s2w[0, :3, 3].double()
    rd, od = d2w[0, :3, :3].double(), d2w[0, :3, 3].double()
    h = ks[0].double() @ rs.T @ (torch.eye(3, dtype=torch.float64) + torch.outer(od - os_, n) / (d - n @ od)) \
        @ rd @ torch.linalg.inv(kd[0].double())
    p = torch.cat([pixel_centres(res, res, dtype=torch.float64), torch.ones(res, res, 1, dtype=torch.float64)], -1)
    q = p @ h.T
    expected = (q[..., :2] / q[..., 2:]).permute(2, 0, 1)[None]            # [1, 2, H, W]
    interior = ((expected > 0.5 / res) & (expected < 1 - 0.5 / res)).all(1, keepdim=True)
    assert interior.float().mean() > 0.6
    torch.testing.assert_close(warped.double()[interior.expand_as(warped)], expected[interior.expand_as(expected)],
                               atol=1e-4, rtol=0)
    assert (mask[interior] == 1).all()
    outside = ((expected < -0.01) | (expected > 1.01)).any(1, keepdim=True)
    assert (mask[outside] == 0).all()


def test_occlusion_and_edge_masks():
    c_src, c_dst = camera_from_angles([10.0], [0.0]), camera_from_angles([0.0], [0.0])
    depth = torch.full((1, 1, 12, 12), 2.6)
    image = torch.rand(1, 3, 12, 12)
    _, visible = warp_image(image, depth, c_src, c_dst, src_depth=torch.full((1, 1, 12, 12), 5.0))
    _, hidden = warp_image(image, depth, c_src, c_dst, src_depth=torch.full((1, 1, 12, 12), 1.5))
    assert visible.mean() > 0.9 and hidden.sum() == 0
    step = depth.clone()
    step[..., 6:] = 3.2                                                      # a silhouette between columns 5 and 6
    edges = depth_edges(step, 0.05)[0, 0]
    assert edges[:, 5:7].all() and not edges[:, :4].any() and not edges[:, 8:].any()
    _, m = warp_image(image, step, c_dst, c_dst)
    assert (m[0, 0, :, 5:7] == 0).all() and (m[0, 0, :, :4] == 1).all()
    _, m_plain = warp_image(image, step, c_dst, c_dst, edge_aware=False)
    assert (m_plain == 1).all()


def test_warp_loss_gradients_reach_camera_and_depth(tiny_eg3d):
    G = tiny_eg3d
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3)), camera_from_angles([20.0], [5.0]))
    canon = camera_from_angles([0.0], [0.0])
    with torch.no_grad():
        x = G.synthesis(ws, camera_from_angles([20.0], [5.0]), deterministic=True)["image"]
        out_c = G.synthesis(ws, canon, deterministic=True)
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    img_c = torch.nn.functional.interpolate(out_c["image"], size=(16, 16), mode="area")
    cam = CameraParams.from_label(camera_from_angles([30.0], [5.0]))
    depth_c = out_c["image_depth"].clone().requires_grad_(True)
    loss = warp_loss(small, img_c, depth_c, cam.label(), canon, occlusion_tol=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for p in (cam.yaw, cam.pitch, cam.translation):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(depth_c.grad).all() and depth_c.grad.abs().sum() > 0
    yaw, pitch, _, _ = pose_angles_from_camera(cam.label().detach()[0])
    assert math.isclose(yaw, 30.0, abs_tol=1e-3) and math.isclose(pitch, 5.0, abs_tol=1e-3)

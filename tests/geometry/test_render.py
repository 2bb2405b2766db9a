"""LiftedGAN / Unsup3d renderer: shading, geometry, occlusion, identity view, gradients, export.

Timings live in ``bench/bench_lifting_renderer.py``.

Analytic references are computed independently of the renderer: rays ``K^-1 (u, v, 1)`` of the output
camera are intersected with planes / spheres in double precision.
"""

from __future__ import annotations

import math

import pytest
import torch

from portrait3d.methods.lifting import (
    RendererConfig,
    depth_to_points,
    faces_for_grid,
    mesh_from_depth,
    normals_from_depth,
    rasterize,
    render,
    rotation_from_view,
    save_obj,
    shade,
    transform_points,
    zero_border,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["hard", "soft"]


def _rays(size: int, cfg: RendererConfig) -> torch.Tensor:
    """``[S, S, 3]`` float64 ray directions ``K^-1 (u, v, 1)`` (z = 1) of an ``S x S`` camera."""
    a = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) / cfg.focal(size)
    return torch.stack([a[None, :].expand(size, size), a[:, None].expand(size, size),
                        torch.ones(size, size, dtype=torch.float64)], dim=-1)


def _view(pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0, t=(0.0, 0.0, 0.0), n: int = 1,
          dtype=torch.float32) -> torch.Tensor:
    """``[n, 6]`` viewpoint with angles given in degrees."""
    row = [math.radians(pitch), math.radians(yaw), math.radians(roll), *t]
    return torch.tensor([row] * n, dtype=dtype)


def _canonical_hit(rays: torch.Tensor, rot: torch.Tensor, plane_z: float, cfg: RendererConfig,
                   size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersect output rays with the canonical plane ``z = plane_z`` moved by ``P' = R (P - c) + c``.

    Returns ``(canonical pixel coords [S, S, 2] of the hit, view-space depth [S, S])``.
    """
    c = torch.tensor(cfg.center, dtype=torch.float64)
    o = (-c) @ rot + c                     # camera origin in the canonical frame: R^T (0 - c) + c
    d = rays @ rot                         # directions in the canonical frame: R^T r
    s = (plane_z - o[2]) / d[..., 2]
    q = o + s[..., None] * d               # canonical hit point
    f, cc = cfg.focal(size), (size - 1) / 2
    uv = q[..., :2] / q[..., 2:3] * f + cc
    view_z = ((q - c) @ rot.T + c)[..., 2]
    return uv, view_z


# --------------------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------------------

def test_fronto_parallel_plane_uniform_shading_and_identity_render():
    cfg = RendererConfig(image_size=32)
    n, h = 2, 32
    depth = torch.full((n, h, h), 1.05)
    normal = normals_from_depth(depth, cfg)
    assert normal.shape == (n, 3, h, h)
    assert torch.allclose(normal, torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1).expand_as(normal), atol=1e-6)

    albedo = torch.rand(n, 3, h, h, generator=torch.Generator().manual_seed(0))
    ambient, diffuse = torch.tensor([[0.3], [0.5]]), torch.tensor([[0.7], [0.4]])
    dxy = torch.tensor([[0.5, -0.3], [0.0, 0.0]])
    image, shading = shade(albedo, normal, ambient, diffuse, dxy)
    cos = 1.0 / torch.sqrt(1.0 + (dxy ** 2).sum(1, keepdim=True))         # angle between light and axis
    expected = (ambient + diffuse * cos).view(n, 1, 1, 1)
    assert shading.shape == (n, 1, h, h)
    assert torch.allclose(shading, expected.expand_as(shading), atol=1e-6)
    assert torch.allclose(image, albedo * expected, atol=1e-6)
    # [N, 3] directions are normalised and mean the same as the (x, y) shorthand.
    image3, _ = shade(albedo, normal, ambient, diffuse, 3.0 * torch.cat([dxy, torch.ones(n, 1)], 1))
    assert torch.allclose(image3, image, atol=1e-6)
    # Light travelling towards the camera (from behind the surface): ambient only.
    _, back = shade(albedo, normal, ambient, diffuse, torch.tensor([[0.0, 0.0, -1.0]] * n))
    assert torch.allclose(back, ambient.view(n, 1, 1, 1).expand_as(back), atol=1e-6)

    out = render(depth, image, torch.zeros(n, 6), cfg)
    assert out.image.shape == (n, 3, h, h) and out.mask.shape == out.depth.shape == (n, 1, h, h)
    assert (out.image - image).abs().max() < 1e-4
    assert bool((out.mask == 1).all())
    assert torch.allclose(out.depth, torch.full_like(out.depth, 1.05), atol=1e-5)


def _sphere_bump(h: int, cfg: RendererConfig, radius: float = 0.06, plane: float = 1.0):
    """Hemisphere of ``radius`` centred at ``(0, 0, plane)`` on the plane ``z = plane`` (float64)."""
    r = _rays(h, cfg)
    rr = (r ** 2).sum(-1)
    disc = plane ** 2 - rr * (plane ** 2 - radius ** 2)
    s = (plane - disc.clamp_min(0).sqrt()) / rr
    on = disc > 0
    depth = torch.where(on, torch.minimum(s, torch.full_like(s, plane)), torch.full_like(s, plane))
    normal = (s[..., None] * r - torch.tensor([0.0, 0.0, plane], dtype=torch.float64)) / radius
    return depth, normal.permute(2, 0, 1), on


def test_sphere_bump_gives_analytic_lambertian_pattern():
    cfg = RendererConfig(image_size=64)
    h = 64
    depth, n_true, on = _sphere_bump(h, cfg)
    d = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    d = d / d.norm()
    ka, kd = 0.2, 0.8
    normal = normals_from_depth(depth[None], cfg)[0]
    _, shading = shade(torch.ones(1, 3, h, h, dtype=torch.float64), normal[None],
                       torch.tensor([ka], dtype=torch.float64), torch.tensor([kd], dtype=torch.float64),
                       d[None, :2] / d[2])
    shading = shading[0, 0]
    expected = ka + kd * (-(n_true * d[:, None, None]).sum(0)).clamp_min(0)

    # Compare where the finite differences see only the sphere and it is not grazing.
    inner = on.clone()
    inner[1:-1, 1:-1] &= on[:-2, 1:-1] & on[2:, 1:-1] & on[1:-1, :-2] & on[1:-1, 2:]
    inner &= n_true[2] < -0.5
    assert int(inner.sum()) > 500
    err = (shading - expected)[inner].abs()
    assert float(err.max()) < 0.02 and float(err.mean()) < 0.005
    # Outside the bump: the plane is lit uniformly.
    flat = ~torch.nn.functional.max_pool2d(on[None, None].double(), 3, stride=1, padding=1)[0, 0].bool()
    assert int(flat.sum()) > 1000
    assert torch.allclose(shading[flat], torch.full_like(shading[flat], ka + kd * float(d[2])), atol=1e-6)

    # Brightest where the normal points at the light (n = -d): at the projection of c - radius * d.
    p = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - 0.06 * d
    u = p[:2] / p[2] * cfg.focal(h) + (h - 1) / 2
    masked = torch.where(on, shading, torch.full_like(shading, -1.0))
    row, col = divmod(int(masked.argmax()), h)
    assert math.hypot(col - float(u[0]), row - float(u[1])) < 1.5
    assert abs(float(masked.max()) - (ka + kd)) < 1e-3
    i_n = normal[:, row, col]
    assert float(-(i_n * d).sum()) > math.cos(math.radians(3))


# --------------------------------------------------------------------------------------------------
# Geometry and visibility
# --------------------------------------------------------------------------------------------------

def test_rotation_from_view_convention():
    v = torch.tensor([[0.3, -0.4, 0.5, 0.01, 0.02, 0.03]], dtype=torch.float64)
    rot, t = rotation_from_view(v)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64)[None], atol=1e-12)
    assert abs(float(torch.det(rot[0])) - 1) < 1e-12
    assert torch.allclose(t, v[:, 3:])
    cx, sx, cy, sy, cz, sz = math.cos(0.3), math.sin(0.3), math.cos(-0.4), math.sin(-0.4), math.cos(0.5), math.sin(0.5)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(rot[0], rz @ ry @ rx, atol=1e-12)                  # pitch, then yaw, then roll
    # Rotation about the object centre leaves the centre in place; the inverse undoes the motion.
    pts = torch.randn(1, 5, 3, dtype=torch.float64) * 0.1 + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    centre = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    assert torch.allclose(transform_points(centre, rot, torch.zeros_like(t), (0.0, 0.0, 1.0)), centre)
    moved = transform_points(pts, rot, t, (0.0, 0.0, 1.0))
    assert torch.allclose(transform_points(moved, rot, t, (0.0, 0.0, 1.0), inverse=True), pts, atol=1e-12)
    # [N, 5] (t_z = 0) and [N, 3] forms.
    assert torch.allclose(rotation_from_view(v[:, :5])[1], torch.tensor([[0.01, 0.02, 0.0]], dtype=torch.float64))
    assert torch.allclose(rotation_from_view(v[:, :3])[0], rot)


def test_rotated_plane_edges_and_depth_match_perspective_geometry():
    cfg = RendererConfig(image_size=64)
    h, z0, yaw = 64, 1.0, math.radians(30.0)
    out = render(torch.full((1, h, h), z0, dtype=torch.float64), torch.ones(1, 1, h, h, dtype=torch.float64),
                 _view(yaw=30.0, dtype=torch.float64), cfg)
    mask, depth = out.mask[0, 0].bool(), out.depth[0, 0]
    f, c = cfg.focal(h), (h - 1) / 2
    x_edge = (0 - c) / f * z0                                               # x of the column-0 vertices (< 0)

    def u_of(x: float) -> float:                                            # after yaw about (0, 0, z0)
        return f * x * math.cos(yaw) / (z0 - x * math.sin(yaw)) + c

    u_left, u_right = u_of(x_edge), u_of(-x_edge)
    cols = mask[h // 2].nonzero().squeeze(1)
    assert 0 < u_left < u_right < h - 1
    assert int(cols[0]) == math.ceil(u_left) and int(cols[-1]) == math.floor(u_right)
    assert u_right - (h - 1) / 2 > (h - 1) / 2 - u_left                       # the near (right) half is wider
    # Top edge: Y = y_edge on the moved plane, v = f Y / Z + c with Z found from the column.
    y_edge = (0 - c) / f * z0
    for col in (int(cols[0]) + 1, h // 2, int(cols[-1]) - 1):
        a = (col - c) / f
        x = a * z0 / (math.cos(yaw) + a * math.sin(yaw))
        zz = z0 - x * math.sin(yaw)
        v_top = f * y_edge / zz + c
        rows = mask[:, col].nonzero().squeeze(1)
        assert int(rows[0]) == max(0, math.ceil(v_top)), (col, v_top, int(rows[0]))
        assert int(rows[-1]) == min(h - 1, math.floor(2 * c - v_top))     # symmetric bottom edge
    # Depth of every covered pixel: ray / plane intersection in the output view.
    rot, _ = rotation_from_view(_view(yaw=30.0, dtype=torch.float64))
    _, view_z = _canonical_hit(_rays(h, cfg), rot[0], z0, cfg, h)
    assert float((depth - view_z)[mask].abs().max()) < 1e-9
    assert bool((depth[~mask] == cfg.background_depth).all())


@pytest.mark.parametrize("mode", MODES)
def test_near_square_occludes_far_plane_in_rotated_view(mode):
    cfg = RendererConfig(image_size=64, rasterizer=mode)
    h, near, far, lo, hi = 64, 0.9, 1.1, 16, 47
    depth = torch.full((1, h, h), far, dtype=torch.float64)
    depth[:, lo:hi + 1, lo:hi + 1] = near
    colour = torch.zeros(1, 3, h, h, dtype=torch.float64)
    colour[:, 0] = 1.0                                                      # far plane: red
    colour[:, :, lo:hi + 1, lo:hi + 1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    view = _view(yaw=12.0, pitch=-5.0, dtype=torch.float64)
    out = render(depth, colour, view, cfg)
    img, dep = out.image[0].permute(1, 2, 0), out.depth[0, 0]

    rot = rotation_from_view(view)[0][0]
    rays = _rays(h, cfg)
    uv_near, z_near = _canonical_hit(rays, rot, near, cfg, h)
    uv_far, z_far = _canonical_hit(rays, rot, far, cfg, h)
    m = 1.5 if mode == "hard" else 2.5
    on_far_plane = ((uv_far >= m) & (uv_far <= h - 1 - m)).all(-1)
    on_square = ((uv_near >= lo + m) & (uv_near <= hi - m)).all(-1)
    # Occlusion: these rays hit the square *and* the far plane behind it; the square must win.
    hidden = on_square & on_far_plane
    assert int(hidden.sum()) > 500
    tol = 1e-6 if mode == "hard" else 1e-3
    assert float((img[hidden] - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).abs().max()) < tol
    assert float((dep[hidden] - z_near[hidden]).abs().max()) < (1e-9 if mode == "hard" else 1e-4)
    assert bool((z_near[hidden] < z_far[hidden] - 0.1).all())
    # Rays that stay on one side of the square (and of the skirt joining it to the plane) between the two
    # depths see the far plane.
    outside = torch.zeros(h, h, dtype=torch.bool)
    for k in range(2):
        outside |= ((uv_near[..., k] < lo - m) & (uv_far[..., k] < lo - m)) \
            | ((uv_near[..., k] > hi + m) & (uv_far[..., k] > hi + m))
    visible = outside & on_far_plane
    assert int(visible.sum()) > 1000
    assert float((img[visible] - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).abs().max()) < tol
    assert float((dep[visible] - z_far[visible]).abs().max()) < (1e-9 if mode == "hard" else 1e-4)
    # Exact z-buffer: the result does not depend on the order in which triangles are drawn.
    if mode == "hard":
        pts = transform_points(depth_to_points(depth, cfg).reshape(1, -1, 3), *rotation_from_view(view), cfg.center)
        attrs = colour.reshape(1, 3, -1).transpose(1, 2)
        faces = faces_for_grid(h, h)
        a = rasterize(pts, faces, attrs, cfg)
        b = rasterize(pts, faces.flip(0), attrs, cfg)
        chunked = rasterize(pts, faces, attrs, RendererConfig(image_size=64, max_pairs=1))   # 64^2-pair chunks
        assert torch.equal(chunked.image, a.image) and torch.equal(chunked.depth, a.depth)
        assert torch.allclose(a.image, out.image) and torch.equal(a.mask, b.mask)
        assert torch.allclose(a.image, b.image, atol=1e-9) and torch.allclose(a.depth, b.depth, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_identity_view_reproduces_canonical_image(mode):
    cfg = RendererConfig(image_size=48, rasterizer=mode)
    g = torch.Generator().manual_seed(1)
    n, h = 2, 48
    raw = torch.nn.functional.interpolate(torch.randn(n, 1, 6, 6, generator=g), size=(h, h), mode="bicubic",
                                          align_corners=True)
    depth = cfg.rescale_depth(torch.tanh(raw))[:, 0]
    assert float(depth.min()) >= cfg.min_depth and float(depth.max()) <= cfg.max_depth
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(h, h), mode="bilinear",
                                             align_corners=True)
    image = smooth if mode == "soft" else torch.rand(n, 3, h, h, generator=g)
    out = render(depth, image, torch.zeros(n, 6), cfg)
    err = (out.image - image).abs()
    if mode == "hard":
        assert float(err.max()) < 1e-4
        assert bool((out.mask == 1).all())
        assert float((out.depth[:, 0] - depth).abs().max()) < 1e-5
    else:                                                                   # SoftRas blurs by ~sigma
        assert float(err.mean()) < 2e-3 and float(err.max()) < 2e-2
        assert float((out.depth[:, 0] - depth).abs().max()) < 1e-3
        assert float(out.mask[:, :, 1:-1, 1:-1].min()) > 0.9                # interior silhouette


def test_transform_map_and_flow():
    cfg = RendererConfig(image_size=32)
    g = torch.Generator().manual_seed(2)
    n, h = 2, 32
    depth = 1.0 + 0.05 * torch.rand(n, h, h, generator=g)
    image = torch.rand(n, 3, h, h, generator=g)
    view = _view(yaw=20.0, pitch=10.0, t=(0.01, -0.02, 0.03), n=n)
    # T = 0: no vertex follows the viewpoint, the canonical image comes back.
    still = render(depth, image, view, cfg, transform_map=torch.zeros(n, 1, h, h))
    assert float((still.image - image).abs().max()) < 1e-4
    # T = 1: the plain rigid motion.
    moved = render(depth, image, view, cfg)
    ones = render(depth, image, view, cfg, transform_map=torch.ones(n, h, h))
    assert torch.allclose(ones.image, moved.image) and torch.equal(ones.mask, moved.mask)
    # LiftedGAN fixes the border of T to 0: the mesh stays pinned to the frame, so no background
    # shows in a rotated view (the rigid motion alone uncovers some).
    t_map = zero_border(torch.ones(n, 1, h, h))
    assert float(t_map[:, :, 0].abs().max()) == 0 and float(t_map[:, :, :, :2].abs().max()) == 0
    assert float(t_map[:, :, 1:-1, 2:-2].min()) == 1
    border = render(depth, image, view, cfg, transform_map=t_map)
    assert bool((border.mask == 1).all()) and float(moved.mask.min()) == 0
    assert float((border.image - image)[:, :, 8:-8, 8:-8].abs().max()) > 0.1         # the inside still moves
    # A flow of 0.02 along every pixel's ray, K^-1 (u, v, 1) * 0.02, is the same as 0.02 more depth.
    flow = 0.02 * depth_to_points(torch.ones(n, h, h), cfg).permute(0, 3, 1, 2)
    shifted = render(depth, image, view, cfg, flow=flow)
    deeper = render(depth + 0.02, image, view, cfg)
    assert torch.allclose(shifted.image, deeper.image, atol=1e-5) and torch.equal(shifted.mask, deeper.mask)
    assert torch.allclose(shifted.depth, deeper.depth, atol=1e-5)
    assert float((shifted.depth - moved.depth)[moved.mask.bool() & shifted.mask.bool()].mean()) > 0.015


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------

def _pipeline(depth, albedo, ambient, diffuse, light, view, cfg):
    normal = normals_from_depth(depth, cfg)
    image, _ = shade(albedo, normal, ambient, diffuse, light)
    return render(depth, image, view, cfg)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_depth_albedo_light_and_view(mode):
    cfg = RendererConfig(image_size=24, rasterizer=mode)
    g = torch.Generator().manual_seed(3)
    n, h = 2, 24
    depth = (1.0 + 0.05 * torch.rand(n, h, h, generator=g)).requires_grad_()
    albedo = torch.rand(n, 3, h, h, generator=g).requires_grad_()
    ambient = torch.full((n, 1), 0.3, requires_grad=True)
    diffuse = torch.full((n, 1), 0.7, requires_grad=True)
    light = torch.tensor([[0.2, -0.1], [-0.3, 0.2]], requires_grad=True)
    view = _view(yaw=15.0, pitch=-5.0, roll=3.0, t=(0.01, 0.01, 0.02), n=n).requires_grad_()
    out = _pipeline(depth, albedo, ambient, diffuse, light, view, cfg)
    w = torch.rand(out.image.shape, generator=g)
    loss = (out.image * w).sum() + out.depth.sum() + out.mask.sum()
    loss.backward()
    for name, p in dict(depth=depth, albedo=albedo, ambient=ambient, diffuse=diffuse, light=light,
                        view=view).items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name
    assert bool((view.grad != 0).all())                                     # every angle and translation


def test_view_gradient_matches_finite_differences():
    cfg = RendererConfig(image_size=32)
    h = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, h, dtype=torch.float64), indexing="ij")
    depth = (1.0 - 0.04 * torch.exp(-(xx ** 2 + yy ** 2) * 2))[None]
    image = torch.stack([0.5 + 0.4 * torch.sin(2 * xx), 0.5 + 0.4 * torch.cos(3 * yy), 0.5 + 0.2 * xx * yy])[None]
    weight = torch.zeros(1, 3, h, h, dtype=torch.float64)
    weight[:, :, 8:-8, 8:-8] = 1.0                                          # away from the silhouette

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (render(depth, image, v, cfg).image * weight).sum()

    v0 = _view(yaw=10.0, pitch=5.0, t=(0.005, -0.004, 0.01), dtype=torch.float64).requires_grad_()
    loss(v0).backward()
    eps = 1e-5
    for k in range(6):
        dv = torch.zeros_like(v0)
        dv[0, k] = eps
        with torch.no_grad():
            fd = (loss(v0 + dv) - loss(v0 - dv)) / (2 * eps)
        assert abs(float(v0.grad[0, k]) - float(fd)) <= 0.02 * abs(float(fd)) + 1e-3, (k, v0.grad[0, k], fd)


# --------------------------------------------------------------------------------------------------
# Mesh export
# --------------------------------------------------------------------------------------------------

def test_mesh_from_depth_and_obj_export(tmp_path):
    h, w = 5, 7
    depth = torch.full((h, w), 1.0)
    depth[2, 3] = 0.95                                                      # a bump towards the camera
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(4))
    verts, faces, colors = mesh_from_depth(depth, image)
    assert verts.shape == (h * w, 3) and faces.shape == (2 * (h - 1) * (w - 1), 3) and colors.shape == (h * w, 3)
    assert torch.allclose(verts, depth_to_points(depth[None])[0].reshape(-1, 3))
    assert torch.allclose(colors[2 * w + 3], image[:, 2, 3])
    assert int(faces.min()) == 0 and int(faces.max()) == h * w - 1
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    assert bool((torch.cross(b - a, c - a, dim=1)[:, 2] < 0).all())         # all faces look at the camera
    path = save_obj(tmp_path / "face.obj", verts, faces, colors)
    lines = path.read_text().splitlines()
    vs = [ln for ln in lines if ln.startswith("v ")]
    fs = [ln for ln in lines if ln.startswith("f ")]
    assert len(vs) == h * w and len(fs) == faces.shape[0]
    first = [float(x) for x in vs[0].split()[1:]]
    assert len(first) == 6 and first[2] == pytest.approx(-1.0)                # y up, z towards the viewer
    assert first[1] == pytest.approx(-float(verts[0, 1]), abs=1e-6)
    assert fs[0] == "f {} {} {}".format(*(faces[0] + 1).tolist())

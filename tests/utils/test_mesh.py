"""Mesh extraction (density grid -> marching cubes) and PLY / OBJ export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from portrait3d.networks.eg3d.renderer import create_samples, sample_density_grid
from portrait3d.utils.mesh import Mesh, extract_mesh, mesh_from_density, write_obj, write_ply

trimesh = pytest.importorskip("trimesh")

pytestmark = pytest.mark.usefixtures("one_thread")

RADIUS = 0.3


def _sphere_sigma(points: torch.Tensor, peak: float = 100.0) -> torch.Tensor:
    """Density ``[..., 1]`` falling linearly from ``peak`` at the origin to 0 at ``RADIUS`` (level 10 at 0.9 R)."""
    return peak * (1 - points.norm(dim=-1, keepdim=True) / RADIUS)


class FakeSphereGenerator:
    """Stands in for a TriPlaneGenerator: a sphere whose colour is red on +x, blue on -x."""

    def __init__(self, peak: float = 100.0) -> None:
        self.peak = peak

    def density_grid(self, ws: torch.Tensor, resolution: int = 128, max_batch: int = 1_000_000,
                     **kwargs) -> tuple[torch.Tensor, np.ndarray, float]:
        return sample_density_grid(lambda p: _sphere_sigma(p, self.peak), resolution=resolution, cube_length=1.0,
                                   max_batch=max_batch)

    def sample_mixed(self, coords: torch.Tensor, dirs: torch.Tensor, ws: torch.Tensor, **kwargs):
        x = coords[..., :1]
        rgb = torch.cat([(x > 0).float(), torch.zeros_like(x), (x <= 0).float()], -1)  # image_raw scale [-1, 1]
        rgb = rgb * 2 - 1
        return {"rgb": torch.cat([rgb, torch.zeros(*rgb.shape[:-1], 29)], -1), "sigma": _sphere_sigma(coords)}


def _trimesh(mesh: Mesh):
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)


def test_sphere_density_gives_a_closed_outward_mesh():
    n = 40
    pts, corner, vs = create_samples(n, cube_length=1.0)
    mesh = mesh_from_density(_sphere_sigma(pts[0]).reshape(n, n, n), corner, vs, sheared=True)
    tm = _trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent
    assert mesh.euler_characteristic == 2
    r = 0.9 * RADIUS  # where the density is 10
    assert tm.volume == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.05)  # positive: normals point outward
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - r).max() < vs / 4
    assert mesh.level == 10.0 and mesh.level_source == "threshold"


def test_grid_full_to_the_edge_still_closes():
    # Density high everywhere in the box except the cleared border: the padding closes the surface.
    grid = np.full((16, 16, 16), 50.0, np.float32)
    grid[0, 0, 0] = 0.0
    mesh = mesh_from_density(grid, np.zeros(3), 1 / 15, border=0.0)
    assert _trimesh(mesh).is_watertight and mesh.euler_characteristic == 2


def test_percentile_fallback_when_nothing_crosses_the_threshold():
    n = 24
    pts, corner, vs = create_samples(n, cube_length=1.0)
    mesh = mesh_from_density(_sphere_sigma(pts[0], peak=5.0).reshape(n, n, n), corner, vs, threshold=10.0)
    assert mesh.level_source == "percentile" and mesh.level < 5.0
    assert _trimesh(mesh).is_watertight
    with pytest.raises(ValueError, match="constant"):
        mesh_from_density(np.zeros((8, 8, 8)), np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="cube"):
        mesh_from_density(np.zeros((8, 8, 4)), np.zeros(3), 0.1)


def test_extract_mesh_colours_from_the_decoder():
    mesh = extract_mesh(FakeSphereGenerator(), torch.zeros(1, 4, 8), resolution=32)
    assert _trimesh(mesh).is_watertight
    assert mesh.colors.dtype == np.uint8 and mesh.colors.shape == mesh.vertices.shape
    right = mesh.vertices[:, 0] > 0.02
    left = mesh.vertices[:, 0] < -0.02
    assert (mesh.colors[right] == [255, 0, 0]).all()  # +1 -> 255, -1 -> 0 (to_uint8's mapping)
    assert (mesh.colors[left] == [0, 0, 255]).all()


def test_ply_and_obj_round_trip_through_trimesh(tmp_path):
    mesh = extract_mesh(FakeSphereGenerator(), torch.zeros(1, 4, 8), resolution=20)
    ply = write_ply(mesh, tmp_path / "m.ply")
    loaded = trimesh.load(ply, process=False)
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.faces)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_array_equal(np.asarray(loaded.visual.vertex_colors)[:, :3], mesh.colors)
    assert loaded.is_watertight

    obj = write_obj(mesh, tmp_path / "m.obj")
    first_v = next(line for line in obj.read_text().splitlines() if line.startswith("v "))
    assert len(first_v.split()) == 7  # v x y z r g b
    loaded = trimesh.load(obj, process=False)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(loaded.visual.vertex_colors)[:, :3], mesh.colors)

    with pytest.raises(FileExistsError):
        write_ply(mesh, ply)
    with pytest.raises(FileExistsError):
        write_obj(mesh, obj)
    write_ply(mesh, ply, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.obj", "m.ply"]  # no temporary files left


def test_tiny_eg3d_mesh(tiny_eg3d):
    with torch.no_grad():
        ws = tiny_eg3d.mapping(torch.randn(1, tiny_eg3d.z_dim, generator=torch.Generator().manual_seed(1)),
                               torch.zeros(1, 25))
    mesh = extract_mesh(tiny_eg3d, ws, resolution=24)
    assert len(mesh.faces) > 0 and _trimesh(mesh).is_watertight
    assert mesh.colors.dtype == np.uint8 and len(np.unique(mesh.colors, axis=0)) > 1
    assert np.abs(mesh.vertices).max() <= 0.5 + 1e-4  # inside EG3D's box (box_warp 1)
    summary = mesh.summary()
    assert summary["vertices"] == len(mesh.vertices) and summary["level_source"] in ("threshold", "percentile")
    with pytest.raises(ValueError, match="at least 8"):
        extract_mesh(tiny_eg3d, ws, resolution=4)

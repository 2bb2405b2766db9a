"""Coloured triangle meshes from an EG3D generator: density grid -> marching cubes -> PLY / OBJ.

    mesh = extract_mesh(G, ws, resolution=128)      # Mesh(vertices [V,3], faces [F,3], colors uint8 [V,3])
    write_ply(mesh, "head.ply")                      # binary little-endian PLY with vertex colours
    write_obj(mesh, "head.obj")                      # OBJ with the common ``v x y z r g b`` extension

Geometry
--------
The raw (pre-activation) density is sampled on EG3D's shape-extraction grid with the generator's
:meth:`~portrait3d.networks.eg3d.triplane.TriPlaneGenerator.density_grid` (a cube of side
``box_warp`` centred on the world origin, as ``gen_samples.py``). As in EG3D's script, a border of
``int(border * resolution)`` voxels (default ``30/256`` of the side) is set to "empty" to drop the
density walls tri-plane models tend to grow at the edge of their box; the grid is then padded with
one further empty voxel on every side, so the iso-surface cannot leave the grid and marching cubes
(:func:`skimage.measure.marching_cubes`) yields a closed (watertight) surface.

The iso-level is ``threshold`` (EG3D uses sigma = 10). If the density never crosses it inside the
box (an untrained or very different network: everything empty, or everything occupied), the level
falls back to the ``fallback_percentile``-th percentile of the densities (default 90: the densest
10 % of the box counts as inside); :attr:`Mesh.level` and :attr:`Mesh.level_source` say which was
used. A grid whose density is constant has no surface at all (:class:`ValueError`).

Vertices are in EG3D world coordinates (y up, the face looking toward +z, subject's left at +x;
see :mod:`portrait3d.networks.eg3d.camera`), so ordinary viewers show the head upright. The grid
of ``density_grid`` keeps the official code's sub-voxel index shear (sample ``(a, b, c)`` lies at
``b + c/R`` along y); it is an affine map of the indices, undone exactly on the vertices.

Colours
-------
Vertex colours are the generator's own colour at each vertex: the first three of the tri-plane
decoder's colour features (``sample_mixed(...)['rgb'][..., :3]``, the channels that make up
``image_raw``), turned into pixels with the same mapping as every rendered image
(:func:`portrait3d.utils.visualize.to_uint8`: ``value * 127.5 + 128``). They are view independent and
cover the whole head, back included, but lack the detail the super-resolution module adds to the
final images (and look as pale as ``image_raw`` does for EG3D models: the decoder's sigmoid only
reaches the upper half of the ``[-1, 1]`` pixel range).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["Mesh", "extract_mesh", "mesh_from_density", "vertex_colors", "write_ply", "write_obj", "EG3D_SIGMA_THRESHOLD"]

EG3D_SIGMA_THRESHOLD = 10.0
_EMPTY = -1000.0  # density written outside the surface (EG3D's gen_samples.py uses -1000 for its border)


@dataclass
class Mesh:
    """A triangle mesh with per-vertex colours.

    Attributes:
        vertices: float32 ``[V, 3]`` world coordinates.
        faces: int64 ``[F, 3]`` vertex indices, counter-clockwise seen from outside (normals point out).
        colors: uint8 ``[V, 3]`` RGB.
        level: iso-level of the raw density the surface was extracted at.
        level_source: ``'threshold'`` or ``'percentile'`` (the fallback, see the module docstring).
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    level: float = EG3D_SIGMA_THRESHOLD
    level_source: str = "threshold"

    @property
    def euler_characteristic(self) -> int:
        """``V - E + F`` (2 for a closed surface of genus 0)."""
        edges = np.sort(self.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
        n_edges = len(np.unique(edges, axis=0)) if len(edges) else 0
        return int(len(self.vertices) - n_edges + len(self.faces))

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: counts, iso-level, bounding box."""
        lo = self.vertices.min(0).tolist() if len(self.vertices) else None
        hi = self.vertices.max(0).tolist() if len(self.vertices) else None
        return {"vertices": int(len(self.vertices)), "faces": int(len(self.faces)), "level": float(self.level),
                "level_source": self.level_source, "bounds_min": lo, "bounds_max": hi}


def _choose_level(sigmas: np.ndarray, threshold: float, percentile: float) -> tuple[float, str]:
    lo, hi = float(sigmas.min()), float(sigmas.max())
    if lo < threshold < hi:
        return float(threshold), "threshold"
    level = float(np.percentile(sigmas, percentile))
    if not lo < level < hi:  # the percentile sits on a plateau: move into the open range
        level = (lo + hi) / 2
    return level, "percentile"


def mesh_from_density(sigmas: np.ndarray | torch.Tensor, corner: Any, voxel_size: float,
                      threshold: float = EG3D_SIGMA_THRESHOLD, border: float = 30 / 256,
                      fallback_percentile: float = 90.0, sheared: bool = False) -> Mesh:
    """Closed iso-surface of a density grid (colours left white).

    Args:
        sigmas: raw density ``[R, R, R]``; ``sigmas[a, b, c]`` sits at ``corner + (a, b, c) * voxel_size``.
        corner: world position of voxel ``(0, 0, 0)``, ``[3]``.
        voxel_size: spacing of the grid in world units.
        threshold: iso-level (density above it is inside).
        border: fraction of the side, per face of the cube, that is cleared before meshing.
        fallback_percentile: percentile used as the level when nothing crosses ``threshold``.
        sheared: the grid is :func:`~portrait3d.networks.eg3d.renderer.create_samples`'s, whose sample
            ``(a, b, c)`` lies at ``(a + b'/R, b', c)`` with ``b' = b + c/R`` voxels from the corner (the official
            code's index arithmetic); vertices are mapped through that affine shear so they land exactly
            where the densities were sampled.
    Returns:
        :class:`Mesh` with white colours.
    Raises:
        ValueError: the grid is not a cube of side >= 2, or the density is constant (no surface).
    """
    from skimage.measure import marching_cubes

    grid = sigmas.detach().float().cpu().numpy() if isinstance(sigmas, torch.Tensor) else np.asarray(sigmas)
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or grid.shape[0] < 2:
        raise UsageError(f"density grid must be a cube [R, R, R] with R >= 2, got {list(grid.shape)}")
    if not np.isfinite(grid).all():
        raise UsageError("density grid holds NaN or infinite values")
    res = grid.shape[0]
    b = int(border * res)
    inner = grid[b:res - b, b:res - b, b:res - b] if b > 0 else grid
    if inner.size == 0 or float(inner.min()) == float(inner.max()):
        raise UsageError("the density is constant inside the box: there is no surface to extract")
    level, source = _choose_level(inner, threshold, fallback_percentile)
    empty = min(_EMPTY, level - 1.0)
    work = np.full_like(grid, empty)
    work[b:res - b, b:res - b, b:res - b] = inner
    work = np.pad(work, 1, mode="constant", constant_values=empty)  # the surface closes inside the padding
    verts, faces, _, _ = marching_cubes(work, level=level, allow_degenerate=False)
    idx = verts.astype(np.float64) - 1.0  # grid indices (a, b, c) of the unpadded grid
    if sheared:  # where create_samples really put sample (a, b, c): an affine map of the indices
        b_eff = idx[:, 1] + idx[:, 2] / res
        idx = np.stack([idx[:, 0] + b_eff / res, b_eff, idx[:, 2]], axis=1)
    verts = (idx * voxel_size + np.asarray(corner, dtype=np.float64).reshape(3)).astype(np.float32)
    # marching_cubes orients faces toward increasing density; flip them so normals point outward.
    faces = faces[:, ::-1]
    colors = np.full((len(verts), 3), 255, np.uint8)
    return Mesh(vertices=verts, faces=faces.astype(np.int64), colors=colors, level=level, level_source=source)


@torch.no_grad()
def vertex_colors(G: Any, ws: torch.Tensor, vertices: np.ndarray, batch: int = 262_144) -> np.ndarray:
    """Decoder colour of ``G`` at ``vertices [V, 3]`` -> uint8 ``[V, 3]`` (see the module docstring).

    ``G`` needs ``sample_mixed(coords [1, K, 3], dirs [1, K, 3], ws) -> {'rgb': [1, K, D>=3], ...}``.
    """
    from portrait3d.utils.visualize import to_uint8

    if len(vertices) == 0:
        return np.zeros((0, 3), np.uint8)
    pts = torch.as_tensor(np.asarray(vertices, np.float32), device=ws.device)[None]
    out = []
    for i in range(0, pts.shape[1], batch):
        chunk = pts[:, i:i + batch]
        dirs = torch.zeros_like(chunk)
        dirs[..., -1] = -1
        out.append(G.sample_mixed(chunk, dirs, ws[:1], noise_mode="const")["rgb"][0, :, :3].float())
    rgb = torch.cat(out)  # [V, 3], same scale as image_raw
    return to_uint8(rgb.T[None, :, :, None])[0, :, 0]


@torch.no_grad()
def extract_mesh(G: Any, ws: torch.Tensor, resolution: int = 128, threshold: float = EG3D_SIGMA_THRESHOLD,
                 border: float = 30 / 256, fallback_percentile: float = 90.0, batch: int = 262_144,
                 colors: bool = True) -> Mesh:
    """Coloured mesh of the head ``G`` generates for ``ws`` (see the module docstring).

    Args:
        G: an EG3D :class:`~portrait3d.networks.eg3d.triplane.TriPlaneGenerator` (or any object with its
            ``density_grid(ws, resolution=, max_batch=, noise_mode=)`` and
            ``sample_mixed(coords, dirs, ws, noise_mode=)``; noise is always ``"const"``).
        ws: ``[1, num_ws, w_dim]`` (only the first latent of a batch is used).
        resolution: grid side ``R`` (EG3D uses 512; 128 takes a few seconds on a CPU).
        threshold: raw-density iso-level (EG3D: 10); falls back to a percentile if nothing crosses it.
        border: fraction of the grid side cleared on every face of the cube (EG3D: 30/256).
        fallback_percentile: percentile of the densities used as the level in the fallback.
        batch: points per decoder call.
        colors: sample vertex colours (else white).
    Returns:
        :class:`Mesh` (vertices in world units, faces oriented outward, uint8 colours).
    """
    if resolution < 8:
        raise UsageError(f"mesh resolution must be at least 8, got {resolution}")
    sigmas, corner, voxel_size = G.density_grid(ws[:1], resolution=resolution, max_batch=batch, noise_mode="const")
    mesh = mesh_from_density(sigmas, corner, float(voxel_size), threshold=threshold, border=border,
                             fallback_percentile=fallback_percentile, sheared=True)
    if colors:
        mesh.colors = vertex_colors(G, ws, mesh.vertices, batch=batch)
    return mesh


def _check(mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.ascontiguousarray(mesh.vertices, dtype="<f4")
    f = np.ascontiguousarray(mesh.faces, dtype="<i4")
    c = np.ascontiguousarray(mesh.colors, dtype=np.uint8)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or c.shape != v.shape:
        raise UsageError(f"mesh arrays must be vertices [V, 3], faces [F, 3], colors [V, 3]; got "
                         f"{list(v.shape)}, {list(f.shape)}, {list(c.shape)}")
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise UsageError("mesh faces index vertices that do not exist")
    return v, f, c


def write_ply(mesh: Mesh, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``mesh`` as a binary little-endian PLY (``float x y z``, ``uchar red green blue``, faces as
    ``list uchar int``), atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from portrait3d.checkpoints.native import atomic_write

    v, f, c = _check(mesh)
    header = ("ply\nformat binary_little_endian 1.0\ncomment made by portrait3d\n"
              f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n").encode("ascii")
    vrec = np.empty(len(v), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vrec["p"], vrec["c"] = v, c
    frec = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", 3)])
    frec["n"], frec["i"] = 3, f

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(vrec.tobytes())
            fh.write(frec.tobytes())

    return atomic_write(path, write, overwrite=overwrite)


def write_obj(mesh: Mesh, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``mesh`` as Wavefront OBJ with vertex colours (``v x y z r g b``, colours in 0..1), atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from portrait3d.checkpoints.native import atomic_write

    v, f, c = _check(mesh)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(f"# made by portrait3d: {len(v)} vertices, {len(f)} faces\n")
            vc = np.concatenate([v.astype(np.float64), c.astype(np.float64) / 255], axis=1)
            np.savetxt(fh, vc, fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
            if len(f):
                np.savetxt(fh, f.astype(np.int64) + 1, fmt="f %d %d %d")

    return atomic_write(path, write, overwrite=overwrite)


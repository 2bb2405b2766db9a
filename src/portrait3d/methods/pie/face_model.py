"""PIE's face rig: a linear 3D face model with reflectance, spherical-harmonics light and a perspective camera.

PIE (Tewari et al., CVPR 2020) and StyleRig control a generator through the parameters of a 3D morphable model
(BFM, Sec. 3 of both papers): ``theta = (alpha, beta, delta, gamma, R, t)`` -- identity geometry, reflectance,
expression, illumination and pose. BFM's weights cannot be had here, so portrait3d builds its own model of the same
form from MediaPipe's 468-point face mesh fitted to real photos (:mod:`.build`):

* geometry ``S(alpha, delta) = S_mean + sum_k alpha_k B^id_k + sum_k delta_k B^exp_k`` (``[V, 3]``, head frame of
  :mod:`portrait3d.geometry.rotations`: ``x`` to the head's left, ``y`` up, ``z`` out of the face; world units of
  EG3D's camera, where the aligned 128 px crop spans ``2 d tan(fov / 2)`` at the camera distance ``d``);
* reflectance ``A(beta) = A_mean + sum_k beta_k B^alb_k`` (per-vertex RGB in ``[0, 1]``);
* illumination: second-order spherical harmonics per colour channel, 27 coefficients ``gamma``; a vertex with
  camera-frame normal ``n`` receives ``c = A (.) sum_{b<9} gamma_{:, b} H_b(n)`` with the irradiance-convolved basis
  ``H`` of Ramamoorthi & Hanrahan (2001), as MoFA / Deep3DFaceRecon use it (:func:`sh_basis`);
* pose: the head-to-camera rotation ``R(yaw, pitch, roll)`` of the face pipeline (degrees; ``yaw > 0`` turns the
  head to its left) and a translation, ``X_cam = R X + t`` with ``t = (0, 0, d)`` for a centred face;
* image formation: perspective projection with EG3D's field of view, rendered with the pure-PyTorch rasteriser of
  :mod:`portrait3d.geometry.render` (gradients reach every parameter through the vertex colours and positions).

Coefficients are scaled by their standard deviations on the training faces, so ``alpha, delta, beta ~ N(0, I)`` and
the statistical regulariser of MoFA is just ``||alpha||^2 + ||delta||^2 + ||beta||^2``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.geometry.render import RendererConfig, project_points, rasterize
from portrait3d.geometry.rotations import head_rotation

__all__ = ["BUILTIN_FACE_MODEL", "FACE_MODEL_FORMAT", "FaceModel", "FaceModelConfig", "RigParams", "sh_basis", "shade_sh",
           "vertex_normals"]

FACE_MODEL_FORMAT = "portrait3d-face-model"
BUILTIN_FACE_MODEL = "face-rig"   # the rig shipped in the package (models/face-rig, with its model card)
SH_COEFFS = 27  # 9 second-order SH coefficients per colour channel

# Irradiance-convolved SH (Ramamoorthi & Hanrahan 2001): a_l * c_l for bands l = 0, 1, 2.
_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))


@dataclass
class FaceModelConfig(ConfigMixin):
    """Sizes, camera and provenance of a face model (stored as JSON beside its tensors)."""

    vertices: int = 468
    identity_components: int = 40
    expression_components: int = 5
    expression_names: list[str] = field(default_factory=list)  # what each expression coefficient measures
    albedo_components: int = 40
    fov_deg: float = 18.837            # EG3D's field of view (the aligned crops' camera)
    camera_distance: float = 2.7       # EG3D's camera radius
    image_size: int = 128              # the aligned crops the model was fitted to
    explained_variance: dict[str, float] = field(default_factory=dict)  # share of each part's variance kept
    source: str = ""                   # what it was built from


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 irradiance-convolved SH basis functions ``H_b(n)`` of unit normals ``[..., 3]`` -> ``[..., 9]``.

    ``H = (a0 c0, -a1 c1 n_y, a1 c1 n_z, -a1 c1 n_x, a2 c2 n_x n_y, -a2 c2 n_y n_z, a2 c2 / (2 sqrt 3) (3 n_z^2 - 1),
    -a2 c2 n_x n_z, a2 c2 / 2 (n_x^2 - n_y^2))`` (Deep3DFaceRecon's ordering and signs).
    """
    x, y, z = normals.unbind(-1)
    a0c0, a1c1, a2c2 = _A[0] * _C[0], _A[1] * _C[1], _A[2] * _C[2]
    return torch.stack([
        torch.full_like(x, a0c0), -a1c1 * y, a1c1 * z, -a1c1 * x,
        a2c2 * x * y, -a2c2 * y * z, a2c2 / (2 * math.sqrt(3.0)) * (3 * z * z - 1), -a2c2 * x * z,
        a2c2 / 2 * (x * x - y * y)], dim=-1)


def shade_sh(albedo: torch.Tensor, normals: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Lambertian SH shading ``c = A (.) (H(n) gamma)``: albedo ``[N, V, 3]``, camera-frame normals ``[N, V, 3]``,
    light ``[N, 27]`` (9 coefficients for red, then green, then blue) -> colours ``[N, V, 3]``."""
    irradiance = torch.einsum("nvb,ncb->nvc", sh_basis(normals), light.reshape(-1, 3, 9))
    return albedo * irradiance


def ambient_light(n: int, level: float = 1.0, device: Any = None) -> torch.Tensor:
    """Light ``[n, 27]`` that shades every normal alike with irradiance ``level`` (only the constant band)."""
    light = torch.zeros(n, 3, 9, device=device)
    light[:, :, 0] = level / (_A[0] * _C[0])
    return light.reshape(n, SH_COEFFS)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals ``[N, V, 3]``: the area-weighted sum of the incident triangles' normals (faces ``[F, 3]``
    wound so that ``(v1 - v0) x (v2 - v0)`` points out of the surface)."""
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)                    # [N, F, 3], length = 2 x area
    vn = torch.zeros_like(vertices)
    for k in range(3):
        vn = vn.index_add(1, faces[:, k], fn)
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-12)


@dataclass
class RigParams:
    """One set of rig parameters ``theta`` per image (all tensors batched ``[N, ...]``).

    ``identity [N, K_id]``, ``expression [N, K_exp]``, ``albedo [N, K_alb]`` (in standard deviations),
    ``light [N, 27]`` (SH, camera frame), ``angles [N, 3]`` (yaw, pitch, roll in degrees, head-to-camera),
    ``translation [N, 3]`` (camera frame, world units; ``(0, 0, d)`` centres the face).
    """

    identity: torch.Tensor
    expression: torch.Tensor
    albedo: torch.Tensor
    light: torch.Tensor
    angles: torch.Tensor
    translation: torch.Tensor

    FIELDS = ("identity", "expression", "albedo", "light", "angles", "translation")

    def vector(self) -> torch.Tensor:
        """All parameters as one ``[N, P]`` vector (the order of :attr:`FIELDS`)."""
        return torch.cat([getattr(self, f) for f in self.FIELDS], dim=1)

    def detach(self) -> "RigParams":
        return RigParams(**{f: getattr(self, f).detach() for f in self.FIELDS})

    def replace(self, **changes: torch.Tensor) -> "RigParams":
        return RigParams(**{f: changes.get(f, getattr(self, f)) for f in self.FIELDS})


class FaceModel(nn.Module):
    """The linear face rig of the module docstring (buffers only: it is built, not trained by gradient)."""

    mean_shape: torch.Tensor       # [V, 3]
    identity_basis: torch.Tensor   # [K_id, V, 3], one standard deviation per component
    expression_basis: torch.Tensor  # [K_exp, V, 3]
    albedo_mean: torch.Tensor      # [V, 3]
    albedo_basis: torch.Tensor     # [K_alb, V, 3]
    faces: torch.Tensor            # [F, 3] long, outward winding

    def __init__(self, config: FaceModelConfig, mean_shape: torch.Tensor, identity_basis: torch.Tensor,
                 expression_basis: torch.Tensor, albedo_mean: torch.Tensor, albedo_basis: torch.Tensor,
                 faces: torch.Tensor) -> None:
        super().__init__()
        v = config.vertices
        checks = {"mean_shape": (mean_shape, (v, 3)), "albedo_mean": (albedo_mean, (v, 3)),
                  "identity_basis": (identity_basis, (config.identity_components, v, 3)),
                  "expression_basis": (expression_basis, (config.expression_components, v, 3)),
                  "albedo_basis": (albedo_basis, (config.albedo_components, v, 3))}
        for name, (t, shape) in checks.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or int(faces.min()) < 0 or int(faces.max()) >= v:
            raise ValueError("faces must be [F, 3] vertex indices")
        self.config = config
        for name, t in (("mean_shape", mean_shape), ("identity_basis", identity_basis),
                        ("expression_basis", expression_basis), ("albedo_mean", albedo_mean),
                        ("albedo_basis", albedo_basis)):
            self.register_buffer(name, t.float())
        self.register_buffer("faces", faces.long())

    # ------------------------------------------------------------------ parameters
    def neutral(self, n: int = 1) -> RigParams:
        """The mean face, frontal, centred, under ambient light of irradiance 1."""
        dev = self.mean_shape.device
        c = self.config
        t = torch.zeros(n, 3, device=dev)
        t[:, 2] = c.camera_distance
        return RigParams(torch.zeros(n, c.identity_components, device=dev),
                         torch.zeros(n, c.expression_components, device=dev),
                         torch.zeros(n, c.albedo_components, device=dev), ambient_light(n, device=dev),
                         torch.zeros(n, 3, device=dev), t)

    # ------------------------------------------------------------------ geometry and colour
    def shape(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """``S = S_mean + alpha B^id + delta B^exp``: ``[N, K_id]``, ``[N, K_exp]`` -> head-frame ``[N, V, 3]``."""
        return (self.mean_shape + torch.einsum("nk,kvc->nvc", identity, self.identity_basis)
                + torch.einsum("nk,kvc->nvc", expression, self.expression_basis))

    def reflectance(self, albedo: torch.Tensor) -> torch.Tensor:
        """``A = A_mean + beta B^alb``: ``[N, K_alb]`` -> ``[N, V, 3]``."""
        return self.albedo_mean + torch.einsum("nk,kvc->nvc", albedo, self.albedo_basis)

    def to_camera(self, shape: torch.Tensor, angles: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """``X_cam = R(yaw, pitch, roll) X + t``: head-frame ``[N, V, 3]`` -> camera-frame ``[N, V, 3]``."""
        rot = head_rotation(angles)                                       # [N, 3, 3]
        return torch.einsum("nij,nvj->nvi", rot, shape) + translation[:, None]

    def vertices(self, params: RigParams) -> torch.Tensor:
        """Camera-frame vertices ``[N, V, 3]`` of ``theta``: ``R S(alpha, delta) + t``."""
        return self.to_camera(self.shape(params.identity, params.expression), params.angles, params.translation)

    def colors(self, params: RigParams, vertices: torch.Tensor) -> torch.Tensor:
        """Shaded vertex colours ``[N, V, 3]``: the albedo of ``theta`` lit by its SH light at the normals of
        ``vertices`` (camera frame, as :meth:`vertices` gives them)."""
        return shade_sh(self.reflectance(params.albedo), vertex_normals(vertices, self.faces), params.light)

    def renderer_config(self, size: int | None = None) -> RendererConfig:
        c = self.config
        d = c.camera_distance
        return RendererConfig(image_size=size or c.image_size, fov=c.fov_deg, min_depth=0.5 * d, max_depth=1.5 * d,
                              camera_distance=d, background=0.0)

    def project(self, vertices: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Pixel coordinates ``[N, V, 2]`` (col, row; pixel centres at integers) of camera-frame vertices."""
        return project_points(vertices, self.renderer_config(size))[0]

    def forward(self, params: RigParams, size: int | None = None) -> dict[str, torch.Tensor]:
        """Render ``theta``: returns ``image [N, 3, S, S]`` (linear RGB in ``[0, 1]``, 0 off the face), ``mask
        [N, 1, S, S]``, ``depth [N, 1, S, S]``, the projected vertices ``points [N, V, 2]`` (pixels), the
        camera-frame ``vertices [N, V, 3]`` and their ``colors [N, V, 3]``."""
        cam = self.vertices(params)
        colors = self.colors(params, cam)
        out = rasterize(cam, self.faces, colors, self.renderer_config(size))
        return {"image": out.image, "mask": out.mask, "depth": out.depth, "points": self.project(cam, size),
                "vertices": cam, "colors": colors}

    def overlay(self, params: RigParams, images: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``images [N, 3, H, W]`` (``[-1, 1]``) with the rig rendered from ``params`` over the face: where the rig
        covers a pixel, ``alpha`` x render + (1 - alpha) x photo. For looking at fits and edits."""
        with torch.no_grad():
            out = self(params, images.shape[-1])
        render = out["image"].clamp(0, 1) * 2 - 1
        return torch.where(out["mask"] > 0.5, alpha * render + (1 - alpha) * images, images)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, half: bool = True) -> Path:
        """safetensors + JSON config (bases in float16 when ``half``: the shipped file stays small)."""
        from portrait3d.checkpoints.native import save_config_module

        return save_config_module(self, path, FACE_MODEL_FORMAT, overwrite, half)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FaceModel":
        """Read a face model written by :meth:`save` (no code is executed: safetensors + JSON), or the shipped one
        by its name ``'face-rig'``."""
        from portrait3d.checkpoints.native import read_safetensors_with_metadata

        if str(path) == BUILTIN_FACE_MODEL:
            path = Path(__file__).resolve().parents[2] / "models" / "face-rig" / "face_model.safetensors"
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no face model file at {path}")
        tensors, meta = read_safetensors_with_metadata(path, FACE_MODEL_FORMAT, "1", "not a portrait3d face model")
        try:
            cfg = FaceModelConfig.from_dict(json.loads(meta["config"]))
            return cls(cfg, **{k: tensors[k] if k == "faces" else tensors[k].float()
                               for k in ("mean_shape", "identity_basis", "expression_basis", "albedo_mean",
                                         "albedo_basis", "faces")})
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: corrupt face model ({str(e).splitlines()[0]})") from None

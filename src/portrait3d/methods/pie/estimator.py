"""PIE's parameter estimator ``theta(I)``: a MoFA-style CNN from a portrait to the face rig's parameters.

PIE (Tewari et al. 2020, Sec. 3) reads the rig parameters of an image with a model-based face autoencoder (MoFA,
Tewari et al. 2017): a CNN encoder whose decoder is the differentiable 3DMM renderer, trained self-supervised. Its
energies E_edit / E_inv (eqs. 9-13) need gradients of ``theta(I(w))`` with respect to ``w``, so the estimator is a
network, not a per-image fit. Ours is trained on real photos (:mod:`.train`) with

* a landmark loss: the rig's projected vertices against MediaPipe's 468-point mesh of the photo,
  ``L_lan = mean_v ||pi(R S_v + t) - m_v|| / S``;
* a photometric loss on the rendered face region, ``L_pho = mean_{p in M} |I_p - R(theta)_p|`` (MoFA eq. 4);
* the statistical regulariser ``L_reg = ||alpha||^2 + ||delta||^2 + ||beta||^2`` (coefficients are in standard
  deviations);
* a parameter loss towards closed-form fits of the rig to each photo's mesh (:func:`rig_targets`), which makes
  the start fast; its weight can be set to zero for pure self-supervision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.methods.pie.build import facing_camera, fit_sh_light, pixel_unit, pixels_to_world, procrustes
from portrait3d.methods.pie.face_model import FaceModel, RigParams, ambient_light, sh_basis, vertex_normals
from portrait3d.networks.resnet import ResNetBackbone

__all__ = ["ESTIMATOR_FORMAT", "EstimatorConfig", "LossWeights", "ParamEstimator", "estimator_losses", "rig_targets",
           "landmark_error_px", "photometric_error"]

ESTIMATOR_FORMAT = "portrait3d-pie-estimator"


@dataclass
class EstimatorConfig(ConfigMixin):
    """Network shape; the output sizes come from the face rig it was trained for."""

    identity: int = 40
    expression: int = 5
    albedo: int = 40
    camera_distance: float = 2.7
    input_size: int = 128
    width: int = 32
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    # output scales: a unit of the network's raw output in each parameter's units
    angle_scale: float = 30.0        # degrees
    shift_scale: float = 0.1         # world units, x and y
    depth_scale: float = 0.2         # relative change of the camera distance
    light_scale: float = 0.3

    @classmethod
    def for_rig(cls, rig: FaceModel, **kw: Any) -> "EstimatorConfig":
        c = rig.config
        return cls(identity=c.identity_components, expression=c.expression_components,
                   albedo=c.albedo_components, camera_distance=c.camera_distance, **kw)

    @property
    def outputs(self) -> int:
        return self.identity + self.expression + self.albedo + 27 + 6


class ParamEstimator(nn.Module):
    """``theta(I)``: ResNet (GroupNorm, batch-size independent) -> pooled features -> linear head.

    Input ``[N, 3, H, W]`` in ``[-1, 1]`` (resized to ``input_size``); output :class:`RigParams`. The head starts
    at zero, so an untrained estimator returns the neutral rig (mean face, frontal, centred, ambient light).
    """

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetBackbone(in_channels=3, width=config.width, layers=config.layers, norm="group")
        self.head = nn.Linear(self.backbone.pooled_channels, config.outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.bf16 = False  # run the backbone in bf16 autocast on CPU (AMX); the head and outputs stay fp32

    def forward(self, images: torch.Tensor) -> RigParams:
        c = self.config
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], not {list(images.shape)}")
        if images.shape[-1] != c.input_size or images.shape[-2] != c.input_size:
            images = F.interpolate(images, size=(c.input_size, c.input_size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > c.input_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and images.device.type == "cpu"):
            pooled = self.backbone(images).pooled
        raw = self.head(pooled.float())
        i, e, a = c.identity, c.expression, c.albedo
        parts = torch.split(raw, [i, e, a, 27, 3, 3], dim=1)
        n = len(raw)
        light = ambient_light(n, device=raw.device) + c.light_scale * parts[3]
        t = torch.stack([c.shift_scale * parts[5][:, 0], c.shift_scale * parts[5][:, 1],
                         c.camera_distance * (1 + c.depth_scale * parts[5][:, 2])], dim=1)
        return RigParams(parts[0], parts[1], parts[2], light, c.angle_scale * parts[4], t)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, meta: dict[str, Any] | None = None,
             half: bool = False) -> Path:
        """safetensors + JSON config; ``half`` stores float16 (shipped weights), loaded back as float32."""
        from portrait3d.checkpoints.native import save_config_module

        return save_config_module(self, path, ESTIMATOR_FORMAT, overwrite, half, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ParamEstimator":
        from portrait3d.checkpoints.native import load_config_module

        return load_config_module(path, cls, EstimatorConfig, ESTIMATOR_FORMAT, "PIE estimator")


# ----------------------------------------------------------------------------- closed-form targets


def rig_targets(points: np.ndarray, colors: np.ndarray, rig: FaceModel, noise_px: float = 1.0,
                noise_color: float = 0.05, rounds: int = 2) -> dict[str, np.ndarray]:
    """Fit the rig to MediaPipe meshes ``points [N, 468, 3]`` (pixels) with vertex ``colors [N, 468, 3]``.

    Per photo: Procrustes of the current rig shape onto the mesh (pose), then identity and expression by ridge
    regression on the bases (``(B B^T + lambda I)^-1 B (X - S_mean)``: the MAP estimate under the ``N(0, I)`` prior
    of the coefficients and mesh noise of ``noise_px`` pixels, ``lambda = sigma^2``), twice;
    SH light by least squares with the mean albedo on the visible vertices, then albedo coefficients the same way.
    The weak-perspective similarity ``P = s R X + t`` at camera distance ``d`` becomes the rig's perspective pose
    ``X_cam = R X + t'`` with ``t' = (t_x / s, t_y / s, d / s)``. Returns the :class:`RigParams` fields as float32
    arrays."""
    from portrait3d.geometry.rotations import head_angles

    c = rig.config
    cam = pixels_to_world(points, c.image_size, c.fov_deg, c.camera_distance)
    mean = rig.mean_shape.double().numpy()
    shape_b = torch.cat([rig.identity_basis, rig.expression_basis]).double().numpy().reshape(
        c.identity_components + c.expression_components, -1)
    unit = pixel_unit(c.image_size, c.fov_deg, c.camera_distance)
    gram = shape_b @ shape_b.T + (noise_px * unit) ** 2 * np.eye(len(shape_b))
    alb_b = rig.albedo_basis.double().numpy().reshape(c.albedo_components, -1)
    alb_mean = rig.albedo_mean.double().numpy()
    faces = rig.faces
    out: dict[str, list[np.ndarray]] = {k: [] for k in RigParams.FIELDS}
    for p, col in zip(cam, colors):
        coef = np.zeros(len(shape_b))
        for _ in range(rounds):
            current = mean + (coef @ shape_b).reshape(-1, 3)
            s, rot, t = procrustes(current, p)
            x = (rot.T @ (p - t).T).T / s
            coef = np.linalg.solve(gram, shape_b @ (x - mean).reshape(-1))
        fitted = mean + (coef @ shape_b).reshape(-1, 3)
        posed = torch.from_numpy(fitted @ rot.T)[None].float()
        normals = vertex_normals(posed, faces)[0].double().numpy()
        visible = facing_camera(normals)
        basis = sh_basis(torch.from_numpy(normals)).numpy()
        light, _ = fit_sh_light(basis, alb_mean, col, visible)                       # [3, 9]
        shading = basis @ light.T                                                    # [V, 3]
        design = (alb_b.reshape(len(alb_b), -1, 3) * shading[None])[:, visible].reshape(len(alb_b), -1)
        resid = (col - alb_mean * shading)[visible].reshape(-1)
        beta = np.linalg.solve(design @ design.T + noise_color ** 2 * np.eye(len(design)), design @ resid)
        out["identity"].append(coef[:c.identity_components])
        out["expression"].append(coef[c.identity_components:])
        out["albedo"].append(beta)
        out["light"].append(light.reshape(-1))
        out["angles"].append(head_angles(torch.from_numpy(rot)).numpy())
        out["translation"].append(np.array([t[0] / s, t[1] / s, c.camera_distance / s]))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- losses


@dataclass
class LossWeights(ConfigMixin):
    landmark: float = 1.0
    photometric: float = 1.0
    regularizer: float = 1e-3
    parameters: float = 0.1
    # parameter-loss scales: one unit of error in each field counts as 1
    param_scales: dict[str, float] = field(default_factory=lambda: {
        "identity": 1.0, "expression": 1.0, "albedo": 1.0, "light": 0.3, "angles": 10.0, "translation": 0.05})


def landmark_error_px(rig: FaceModel, params: RigParams, points: torch.Tensor) -> torch.Tensor:
    """Mean distance ``[N]`` in pixels between the rig's projected vertices and the mesh points ``[N, 468, 2+]``."""
    return (rig.project(rig.vertices(params)) - points[..., :2]).norm(dim=-1).mean(1)


def photometric_error(rig: FaceModel, params: RigParams, images: torch.Tensor) -> torch.Tensor:
    """MoFA's photometric term ``[N]``: the mean absolute colour difference between the rig rendered from ``params``
    and ``images [N, 3, S, S]`` (``[-1, 1]``) over the pixels the rig covers (0-1 scale)."""
    out = rig(params, images.shape[-1])
    mask = (out["mask"] > 0.5).float().detach()
    return ((out["image"] - (images + 1) / 2).abs() * mask).sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3)) + 1e-6)


def estimator_losses(est: ParamEstimator, rig: FaceModel, batch: dict[str, torch.Tensor],
                     w: LossWeights) -> dict[str, torch.Tensor]:
    """The training losses of the module docstring on ``batch`` (``image [N, 3, S, S]`` in ``[-1, 1]``, ``points
    [N, 468, 3]`` in pixels, optional ``target_<field>`` tensors). Returns the terms and ``loss``."""
    params = est(batch["image"])
    size = batch["image"].shape[-1]
    terms: dict[str, torch.Tensor] = {}
    lm = landmark_error_px(rig, params, batch["points"])
    terms["landmark_px"] = lm.mean()
    loss = w.landmark * (lm / size).mean()
    if w.photometric > 0:
        photo = photometric_error(rig, params, batch["image"])
        terms["photometric"] = photo.mean()
        loss = loss + w.photometric * photo.mean()
    reg = (params.identity.square().sum(1) + params.expression.square().sum(1) + params.albedo.square().sum(1))
    terms["regularizer"] = reg.mean()
    loss = loss + w.regularizer * reg.mean()
    if w.parameters > 0 and "target_angles" in batch:
        perr = sum(((getattr(params, f) - batch[f"target_{f}"]) / w.param_scales[f]).square().mean(1)
                   for f in RigParams.FIELDS)
        terms["parameters"] = perr.mean()
        terms["yaw_err_deg"] = (params.angles[:, 0] - batch["target_angles"][:, 0]).abs().mean()
        loss = loss + w.parameters * perr.mean()
    terms["loss"] = loss
    return terms

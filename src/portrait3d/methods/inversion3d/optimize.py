"""3D GAN inversion with pose optimisation (Ko et al., "3D GAN Inversion with Pose Optimization", WACV 2023).

Given a portrait ``x`` and an initial latent / camera (from the encoder and pose estimator of the
paper, or from our face pipeline), :func:`invert` finds ``(w, pi)`` with which the EG3D generator
reproduces ``x``, then optionally tunes the generator around that pivot. Three algorithms:

* **Algorithm 1** (Ko et al., main paper): start from ``(w_init, pi_init)``; alternate
  ``latent_steps_per_round`` *latent steps* -- Adam on ``w`` with the camera fixed, image loss
  ``L_img`` (pixel MSE + perceptual + identity) -- with ``camera_steps_per_round`` *camera steps* --
  Adam on the camera (yaw, pitch, optional roll, and the learnable translation ``t``) with ``w``
  fixed, on the depth-based warping loss ``L_warp`` (:mod:`.warp`: the input image warped to a
  canonical view ``pi_c`` with the rendered depth, compared with ``G(w, pi_c)``) plus
  ``camera_image_weight * L_img``; then optional pivotal tuning with depth smoothness (:mod:`.pti`).
* **Algorithm 2** (supplement baseline): the camera stays the given one (e.g. the face pipeline's
  estimate; used as is, never re-parameterised); optimise ``w`` on ``L_img``; optional PTI.
* **Algorithm 3** (supplement baseline): plain joint gradient descent on ``w`` and the camera on
  ``L_img`` (no warping loss, no alternation); optional PTI.

Common details (ours unless stated):

* ``L_img`` is :class:`ImageLoss`; its ``description`` names the perceptual network
  (EfficientNet-Lite0 by default -- an offline LPIPS substitute, **not LPIPS**).
* The renderer is called as ``G.synthesis(ws, c)`` with the camera being optimised: EG3D's
  synthesis takes no separate conditioning camera (conditioning only enters through the mapping
  network, which the optimisation bypasses; ``w_avg`` is computed with the initial camera as
  conditioning, as EG3D's projectors do). Ray sampling is deterministic during optimisation when the
  renderer supports it (``cfg.deterministic``), which removes the stratified-sampling noise from the
  gradients.
* latent space ``"w"`` (one ``w`` broadcast to all layers, the paper's ``w in R^{1 x 512}``) or
  ``"w+"``; learning rates follow the StyleGAN2 projector's ramp (linear warm-up, cosine decay,
  :mod:`portrait3d.methods.projector`), each block (latent / camera / joint) over its own steps;
  the projector's decaying Gaussian latent noise is added to ``w`` in latent and joint steps.
* ``precision="bf16"`` and ``optimization_samples`` (what ``invert3d`` uses by default) make the optimisation's
  renders and losses bf16 (AMX on CPUs) with fewer samples per ray; the result is rendered as the model was
  trained. On three deepface photos: 1.3-1.5x faster on one core, PSNR within 0.1 dB, dlib identity within 0.01
  and the camera within 1.4 degrees of the exact run.
* The generator is never modified (PTI tunes a copy); gradients are taken with
  ``torch.autograd.grad`` w.r.t. our own tensors only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from portrait3d.errors import UsageError
from portrait3d.losses.perceptual import PERCEPTUAL_SIZE
from portrait3d.methods.inversion3d.camera_params import CameraParams
from portrait3d.methods.inversion3d.losses import ImageLoss, LossWeights
from portrait3d.methods.inversion3d.pti import PTIConfig, pivotal_tuning, render, supports_planes
from portrait3d.methods.inversion3d.warp import warp_loss
from portrait3d.methods.projector.projector import (
    ProjectorConfig,
    as_target_image,
    compute_w_stats,
    device_of,
    latent_noise_scale,
    lr_at,
)

__all__ = ["ALGORITHMS", "ImageLoss", "InversionConfig", "InversionResult", "LossWeights", "invert",
           "phase_schedule"]

ALGORITHMS = {1: "alternating latent / camera steps with depth-based warping (Ko et al. Alg. 1)",
              2: "latent only, camera fixed to the initial estimate (supplement Alg. 2)",
              3: "joint latent + camera gradient descent on the image loss (supplement Alg. 3)"}


@dataclass
class InversionConfig:
    """Settings of :func:`invert`. Learning rates: ``lr_w`` in W units, ``lr_cam`` in degrees,
    ``lr_translation`` in world units (Adam step sizes before the ramp)."""

    algorithm: int = 1                    # 1 (Ko et al.), 2 (camera fixed), 3 (joint, image loss only)
    steps: int = 200                      # optimiser iterations in all (Alg. 1: 134 latent + 66 camera steps);
                                          # 0.1 dB below 225 on 20 held-out photos, same identity (README)
    space: str = "w"                      # "w" (one w for all layers) or "w+"
    lr_w: float = 0.01
    lr_cam: float = 0.5                   # degrees
    lr_translation: float = 0.005         # world units
    lr_rampup: float = 0.05               # fractions of each block's steps (projector schedule)
    lr_rampdown: float = 0.25
    latent_steps_per_round: int = 2       # Alg. 1 alternation: k latent steps ...
    camera_steps_per_round: int = 1       # ... then k camera steps, repeated (the camera's 5 numbers need fewer)
    mse_weight: float = 1.0
    perceptual_weight: float = 1.0
    identity_weight: float = 0.1          # only with landmarks
    warp_weight: float = 1.0              # L_warp in Alg. 1's camera steps
    camera_image_weight: float = 1.0      # L_img in Alg. 1's camera steps (0: warping loss only)
    camera_identity: bool = True          # the identity term inside the camera steps' L_img
    warp_norm: str = "l2"                 # "l2" or "l1" over the unmasked pixels
    warp_resolution: int | None = None    # size the warp is computed at (default: the depth's)
    canonical_yaw: float = 0.0            # pi_c of the warping loss (degrees)
    canonical_pitch: float = 0.0
    occlusion_tol: float = 0.05           # world units, see warp.warp_image
    optimize_roll: bool = False
    optimize_translation: bool = True
    initial_noise_factor: float = 0.05    # latent noise, in units of w_std (StyleGAN2 projector)
    noise_ramp: float = 0.75
    w_avg_samples: int = 10000
    w_avg_seed: int = 123
    perceptual: str = "efficientnet-lite0"
    perceptual_kwargs: dict[str, Any] = field(default_factory=dict)
    perceptual_no_upsample: bool = False  # EfficientNet-Lite0 at min(224, image size): a 128 px image is not
                                          # upsampled to 224 (no information added, about 12% of a step saved)
    deterministic: bool = True            # deterministic ray sampling during optimisation
    precision: str = "fp32"               # "bf16": optimisation renders and losses under bf16 autocast (AMX)
    optimization_samples: tuple[int, int] | None = None  # (stratified, importance) samples per ray while optimising
    pti: bool = False
    pti_config: PTIConfig = field(default_factory=PTIConfig)
    seed: int = 0

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"algorithm must be one of {sorted(ALGORITHMS)}, not {self.algorithm!r}")
        if self.space not in ("w", "w+"):
            raise UsageError(f"space must be 'w' or 'w+', not {self.space!r}")
        if self.steps < 0:
            raise UsageError(f"steps must be >= 0, not {self.steps}")
        if self.latent_steps_per_round < 1 or self.camera_steps_per_round < 1:
            raise UsageError("latent_steps_per_round and camera_steps_per_round must be >= 1")
        if self.warp_norm not in ("l1", "l2"):
            raise UsageError(f"warp_norm must be 'l1' or 'l2', not {self.warp_norm!r}")
        if self.w_avg_samples < 1:
            raise UsageError(f"w_avg_samples must be >= 1, not {self.w_avg_samples}")
        for name in ("lr_w", "lr_cam", "lr_translation", "lr_rampup", "lr_rampdown", "mse_weight",
                     "perceptual_weight", "identity_weight", "warp_weight", "camera_image_weight", "occlusion_tol",
                     "initial_noise_factor", "noise_ramp"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be a finite non-negative number, not {v!r}")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"precision must be 'fp32' or 'bf16', not {self.precision!r}")
        if self.optimization_samples is not None and (
                len(self.optimization_samples) != 2 or min(self.optimization_samples) < 1):
            raise UsageError(f"optimization_samples must be two counts >= 1, not {self.optimization_samples!r}")
        if self.warp_resolution is not None and self.warp_resolution < 2:
            raise UsageError(f"warp_resolution must be >= 2 or None, not {self.warp_resolution}")
        if not -90 < self.canonical_pitch < 90:
            raise UsageError("canonical_pitch must lie strictly between -90 and 90 degrees")
        if self.pti:
            self.pti_config.validate()


@dataclass
class InversionResult:
    """Output of :func:`invert`.

    Attributes:
        ws: ``[1, num_ws, w_dim]`` the optimised latent (``"w"``: the same row everywhere).
        camera: ``[1, 25]`` the optimised camera label (Alg. 2: the given one).
        G: the tuned copy of the generator when PTI ran, else the input ``G`` itself.
        image: ``[1, 3, R, R]`` ``G`` (above) rendered from ``ws`` and ``camera``.
        depth: ``[1, 1, r, r]`` its depth (``image_depth``).
        history: one dict per step (``step``, ``phase`` in ``latent`` / ``camera`` / ``joint`` /
            ``pti``, ``lr``, ``loss`` and its terms ``mse`` / ``perceptual`` / ``identity`` / ``warp`` /
            ``depth_smooth`` ..., the camera state ``yaw`` / ``pitch`` / ``roll`` / ``tx`` / ``ty`` / ``tz``
            before the step, and ``time`` in seconds).
        timings: seconds per phase (``setup``, ``latent``, ``camera``, ``joint``, ``pti``, ``render``,
            ``total``).
        algorithm: 1, 2 or 3.
        camera_state: final yaw / pitch / roll (degrees) and translation of the camera parameters.
        loss_description: :attr:`ImageLoss.description` of the image loss used.
        target: ``[1, 3, R, R]`` the target as compared.
    """

    ws: torch.Tensor
    camera: torch.Tensor
    G: nn.Module
    image: torch.Tensor
    depth: torch.Tensor
    history: list[dict[str, Any]]
    timings: dict[str, float]
    algorithm: int
    camera_state: dict[str, float] = field(default_factory=dict)
    loss_description: str = ""
    target: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- helpers

def phase_schedule(cfg: InversionConfig) -> list[str]:
    """The phase of every iteration: Alg. 1 repeats ``k_w`` ``"latent"`` then ``k_c`` ``"camera"``
    steps (starting with the latent block), Alg. 2 is all ``"latent"``, Alg. 3 all ``"joint"``."""
    if cfg.algorithm == 2:
        return ["latent"] * cfg.steps
    if cfg.algorithm == 3:
        return ["joint"] * cfg.steps
    period = cfg.latent_steps_per_round + cfg.camera_steps_per_round
    return ["latent" if i % period < cfg.latent_steps_per_round else "camera" for i in range(cfg.steps)]


def _lr(base: float, cfg: InversionConfig, t: float) -> float:
    """The StyleGAN2 projector's ramp (:func:`portrait3d.methods.projector.projector.lr_at`) for ``base``."""
    return lr_at(ProjectorConfig(lr=base, lr_rampup=cfg.lr_rampup, lr_rampdown=cfg.lr_rampdown), t)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "area" and x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _assign_grads(params: list[torch.Tensor], loss: torch.Tensor) -> None:
    """``p.grad = d loss / d p`` for our own tensors only (nothing accumulates in the generator)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g if g is not None else torch.zeros_like(p)


# ---------------------------------------------------------------------------------------------- invert

def invert(G: nn.Module, target: torch.Tensor, init_ws: torch.Tensor | None, init_camera: torch.Tensor | None,
           cfg: InversionConfig | None = None, landmarks: np.ndarray | None = None, progress: bool = True,
           callback: Callable[..., Any] | None = None, *, image_loss: ImageLoss | None = None) -> InversionResult:
    """Invert a portrait into EG3D: latent + camera (Ko et al. Algorithm 1, or baselines 2 / 3) [+ PTI].

    Args:
        G: EG3D :class:`~portrait3d.networks.eg3d.triplane.TriPlaneGenerator` (not modified).
        target: ``[1, 3, H, H]`` (or ``[3, H, H]``) in ``[-1, 1]``, an aligned square crop; resized
            to ``G.img_resolution``.
        init_ws: ``[1, num_ws, w_dim]`` initial latent (the encoder's ``w_avg + E(x)``), or ``None`` for
            ``w_avg`` (mean of ``cfg.w_avg_samples`` mapped latents, conditioned on ``init_camera``).
            With ``space="w"`` its rows are averaged into one ``w``.
        init_camera: ``[1, 25]`` initial camera label (pose estimator or face pipeline); ``None``: the
            frontal camera. Algorithm 2 keeps it unchanged.
        cfg: :class:`InversionConfig`.
        landmarks: ``[68, 2]`` iBUG landmarks in ``target``'s pixel coordinates (identity term).
        progress: tqdm bars.
        callback: ``callback(step, record, ws, camera, image)`` after every optimisation step (``ws``
            ``[1, num_ws, w_dim]`` without latent noise, ``camera`` ``[1, 25]``, ``image`` the step's
            rendering); returning ``True`` stops the optimisation (PTI still runs if enabled).
        image_loss: a ready :class:`ImageLoss` (e.g. shared between calls) instead of building one.

    Returns:
        :class:`InversionResult`.
    """
    from portrait3d.networks.eg3d.camera import camera_from_angles

    t_start = time.perf_counter()
    timings = {"setup": 0.0, "latent": 0.0, "camera": 0.0, "joint": 0.0, "pti": 0.0, "render": 0.0}
    cfg = cfg or InversionConfig()
    cfg.validate()
    dev = device_of(G)
    res = int(G.img_resolution)
    rk = getattr(G, "rendering_kwargs", {}) or {}
    pivot = tuple(float(v) for v in rk.get("avg_camera_pivot", (0.0, 0.0, 0.2)))
    radius = float(rk.get("avg_camera_radius", 2.7))
    target = as_target_image(target)
    target = target.to(dev, torch.float32)
    if init_camera is None:
        init_camera = camera_from_angles([0.0], [0.0], radius=radius, pivot=pivot)
    init_camera = torch.as_tensor(init_camera).detach().to(dev, torch.float32).reshape(-1, 25)
    if init_camera.shape[0] != 1:
        raise UsageError(f"init_camera: expected one label [1, 25], got {tuple(init_camera.shape)}")

    if image_loss is None:
        p_kwargs = dict(cfg.perceptual_kwargs)
        if cfg.perceptual_no_upsample and cfg.perceptual == "efficientnet-lite0" and "resize" not in p_kwargs:
            p_kwargs["resize"] = min(PERCEPTUAL_SIZE, res)
        image_loss = ImageLoss(target, landmarks=landmarks, resolution=res,
                               weights=LossWeights(cfg.mse_weight, cfg.perceptual_weight, cfg.identity_weight),
                               perceptual=cfg.perceptual, perceptual_kwargs=p_kwargs).to(dev)
    target_r = image_loss.target

    # -- initial latent ------------------------------------------------------------------------
    num_ws, w_dim = int(G.num_ws), int(G.w_dim)
    use_noise = cfg.initial_noise_factor > 0 and cfg.noise_ramp > 0
    w_std = 0.0
    if init_ws is None or use_noise:
        w_avg, w_std = compute_w_stats(G, cfg.w_avg_samples, cfg.w_avg_seed, c=init_camera)
    if init_ws is None:
        w0 = w_avg.reshape(1, 1, w_dim).expand(1, num_ws, w_dim)
    else:
        w0 = torch.as_tensor(init_ws).detach().to(dev, torch.float32)
        if w0.ndim == 2:
            w0 = w0[:, None].expand(1, num_ws, w_dim)
        if w0.shape != (1, num_ws, w_dim):
            raise UsageError(f"init_ws: expected [1, {num_ws}, {w_dim}], got {tuple(w0.shape)}")
    w_opt = (w0.mean(1, keepdim=True) if cfg.space == "w" else w0).clone().requires_grad_(True)

    def full_ws(w: torch.Tensor) -> torch.Tensor:
        return w.expand(1, num_ws, w_dim) if w.shape[1] == 1 else w

    # -- camera --------------------------------------------------------------------------------
    cam: CameraParams | None = None
    if cfg.algorithm in (1, 3):
        cam = CameraParams.from_label(init_camera, pivot=pivot, optimize_roll=cfg.optimize_roll,
                                      optimize_translation=cfg.optimize_translation).to(dev)

    def current_camera() -> torch.Tensor:
        return init_camera if cam is None else cam.label()

    canon = None
    if cfg.algorithm == 1:
        canon = CameraParams(cfg.canonical_yaw, cfg.canonical_pitch, radius=radius, pivot=pivot,
                             intrinsics=init_camera[0, 16:].reshape(3, 3)).to(dev).label().detach()

    # -- optimisers ----------------------------------------------------------------------------
    phases = phase_schedule(cfg)
    n_phase = {p: phases.count(p) for p in ("latent", "camera", "joint")}
    opt_w = torch.optim.Adam([w_opt], betas=(0.9, 0.999), lr=cfg.lr_w)
    cam_groups: list[dict[str, Any]] = []
    if cam is not None:
        if cam.angle_parameters():
            cam_groups.append({"params": cam.angle_parameters(), "lr": cfg.lr_cam, "base": cfg.lr_cam})
        if cam.translation_parameters():
            cam_groups.append({"params": cam.translation_parameters(), "lr": cfg.lr_translation,
                               "base": cfg.lr_translation})
    opt_cam = torch.optim.Adam(cam_groups, betas=(0.9, 0.999)) if cam_groups else None
    cam_params = [p for g in cam_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(int(cfg.seed))

    # the optimisation's renders: optionally fewer samples per ray and bf16 autocast; the result is rendered as
    # the model was trained (below)
    overrides = None
    if cfg.optimization_samples is not None:
        overrides = {"depth_resolution": int(cfg.optimization_samples[0]),
                     "depth_resolution_importance": int(cfg.optimization_samples[1])}
    bf16 = cfg.precision == "bf16"

    def step_render(ws: torch.Tensor, c: torch.Tensor, planes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = render(G, ws, c, cfg.deterministic, rendering=overrides, planes=planes)
        return {k: v.float() for k, v in out.items()}

    # While w is fixed (camera steps) its tri-planes are too: the camera render and the canonical render share one
    # backbone pass (camera steps took 0.82x the time on CPU).
    reuse_planes = supports_planes(G)
    planes_cache: dict[str, Any] = {"version": -1, "planes": None}

    def fixed_planes(ws: torch.Tensor) -> torch.Tensor | None:
        if not reuse_planes:
            return None
        if planes_cache["version"] != w_version:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                planes_cache.update(version=w_version, planes=G.planes(ws, noise_mode="const"))
        return planes_cache["planes"]

    def scored(image: torch.Tensor, identity: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, terms = image_loss(image, identity=identity)
        return loss.float(), terms

    # canonical rendering (constant while w is fixed) and the resized target for the warp
    canon_cache: dict[str, Any] = {"version": -1}
    w_version = 0

    def canonical_view() -> tuple[torch.Tensor, torch.Tensor, int]:
        if canon_cache["version"] != w_version:
            with torch.no_grad():
                ws_c = full_ws(w_opt.detach())
                out_c = step_render(ws_c, canon, fixed_planes(ws_c))
            size = cfg.warp_resolution or int(out_c["image_depth"].shape[-1])
            canon_cache.update(version=w_version, size=size, image=_resize(out_c["image"], size, "area"),
                               depth=_resize(out_c["image_depth"], size, "bilinear"),
                               target=_resize(target_r, size, "area"))
        return canon_cache["image"], canon_cache["depth"], canon_cache["size"]

    timings["setup"] = time.perf_counter() - t_start
    history: list[dict[str, Any]] = []
    counters = {"latent": 0, "camera": 0, "joint": 0}
    bar = None
    if progress and cfg.steps > 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"3D inversion (alg. {cfg.algorithm})", unit="step", leave=False)
    try:
        for step, phase in enumerate(phases):
            t0 = time.perf_counter()
            t_block = counters[phase] / max(1, n_phase[phase])
            counters[phase] += 1
            t_run = step / max(1, cfg.steps)
            record: dict[str, Any] = {"step": step, "phase": phase}
            if cam is not None:
                record.update(cam.state())
            if phase in ("latent", "joint"):
                lr_w = _lr(cfg.lr_w, cfg, t_block)
                for g in opt_w.param_groups:
                    g["lr"] = lr_w
                noise_scale = latent_noise_scale(w_std, cfg.initial_noise_factor, cfg.noise_ramp, t_run) \
                    if use_noise else 0.0
                w_noise = torch.randn(w_opt.shape, generator=gen).to(dev) * noise_scale
                c = current_camera() if phase == "joint" else current_camera().detach()
                out = step_render(full_ws(w_opt + w_noise), c)
                loss, terms = scored(out["image"])
                record.update(lr=lr_w, w_noise=noise_scale, **terms)
                params = [w_opt] + (cam_params if phase == "joint" else [])
                if phase == "joint" and opt_cam is not None:
                    for g in opt_cam.param_groups:
                        g["lr"] = _lr(g["base"], cfg, t_block)
            else:  # camera step of Algorithm 1
                for g in opt_cam.param_groups:
                    g["lr"] = _lr(g["base"], cfg, t_block)
                record["lr"] = opt_cam.param_groups[0]["lr"]
                c = current_camera()
                ws_fixed = full_ws(w_opt.detach())
                loss = c.new_zeros([])
                if cfg.camera_image_weight > 0:
                    out = step_render(ws_fixed, c, fixed_planes(ws_fixed))
                    l_img, terms = scored(out["image"], identity=cfg.camera_identity)
                    loss = loss + cfg.camera_image_weight * l_img
                    record.update(terms)
                else:
                    with torch.no_grad():
                        out = step_render(ws_fixed, c.detach(), fixed_planes(ws_fixed))
                img_c, depth_c, size = canonical_view()
                l_warp, _, mask = warp_loss(canon_cache["target"], img_c, depth_c, c, canon,
                                            source_depth=out["image_depth"].detach(),
                                            occlusion_tol=cfg.occlusion_tol, norm=cfg.warp_norm, return_parts=True)
                loss = loss + cfg.warp_weight * l_warp
                record.update(warp=float(l_warp.detach()), warp_valid=float(mask.mean()))
                params = cam_params
            record["loss"] = float(loss.detach())
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"inversion diverged at step {step} ({phase}): loss {record['loss']}")

            _assign_grads(params, loss)
            if phase in ("latent", "joint"):
                opt_w.step()
                opt_w.zero_grad(set_to_none=True)
                w_version += 1
            if phase in ("camera", "joint") and opt_cam is not None:
                opt_cam.step()
                opt_cam.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record["time"] = elapsed
            timings[phase] += elapsed
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "mse", "warp", "yaw")},
                                refresh=False)
            if callback is not None:
                with torch.no_grad():
                    stop = callback(step, record, full_ws(w_opt.detach()).clone(), current_camera().detach().clone(),
                                    out["image"].detach())
                if stop:
                    break
    finally:
        if bar is not None:
            bar.close()

    ws_final = full_ws(w_opt.detach()).clone()
    with torch.no_grad():
        camera_final = current_camera().detach().clone()
    camera_state = cam.state() if cam is not None else {}

    G_out: nn.Module = G
    if cfg.pti and cfg.pti_config.steps > 0:
        t0 = time.perf_counter()
        pcfg = cfg.pti_config
        same_net = pcfg.perceptual == cfg.perceptual and pcfg.perceptual_kwargs == cfg.perceptual_kwargs
        shared = image_loss.perceptual_module if same_net and image_loss.perceptual_module is not None else None
        pti_loss = ImageLoss(target, landmarks=landmarks, resolution=res,
                             weights=LossWeights(pcfg.mse_weight, pcfg.perceptual_weight, pcfg.identity_weight),
                             perceptual=shared if shared is not None else pcfg.perceptual,
                             perceptual_kwargs=pcfg.perceptual_kwargs, identity_loss=image_loss.identity_module).to(dev)
        G_out, pti_history = pivotal_tuning(G, ws_final, camera_final, target, pcfg, progress,
                                            landmarks=landmarks, image_loss=pti_loss, step_offset=len(history))
        history.extend(pti_history)
        timings["pti"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        out = render(G_out, ws_final, camera_final, cfg.deterministic)
    timings["render"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return InversionResult(ws=ws_final, camera=camera_final, G=G_out, image=out["image"].detach(),
                           depth=out["image_depth"].detach(), history=history, timings=timings,
                           algorithm=cfg.algorithm, camera_state=camera_state,
                           loss_description=image_loss.description, target=target_r)

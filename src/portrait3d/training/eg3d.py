"""EG3D trainer: camera-conditioned tri-plane generator against a dual discriminator.

    portrait3d train eg3d --data ~/.cache/portrait3d/utkface128 --out runs/eg3d \\
        --config cpu-small --kimg 200 --batch 8
    torchrun --nproc_per_node=4 -m portrait3d.interfaces.cli train eg3d --data ... --config gpu

As NVIDIA's EG3D ``training/loss.py`` (``StyleGAN2Loss`` with dual discrimination):

* cameras: fakes are rendered from cameras drawn from the dataset's labels (estimated by the face
  pipeline when the dataset was built, mirrored with the images); the mapping network is
  conditioned on the same camera, or with probability ``swap`` on another random dataset camera
  (generator pose conditioning, "GPC"; ``swap`` fades from 1 to ``rendering.gpc_reg_prob`` over
  ``gpc_reg_fade_kimg``);
* the discriminator sees ``{'image', 'image_raw'}`` and the rendering camera; for reals
  ``image_raw`` is the real image resized to the neural-rendering resolution (antialiased) and, with
  ``blur_raw_target``, blurred like the fakes during the initial blur fade;
* losses: non-saturating logistic; lazy R1 on both real inputs (every ``D_reg_interval``);
  density regularisation every ``G_reg_interval``: ``density_reg * L1(sigma(p), sigma(p + eps))``
  at 1000 random points per sample in the unit box, ``eps ~ N(0, density_reg_p_dist^2)``;
* neural rendering at ``neural_rendering_resolution`` (32 or 64; optionally faded to a final value),
  super-resolution to 128 (``SuperresolutionHybrid2X``).

Distillation (``distill``, a teacher set of :mod:`portrait3d.training.teacher`): each generator step also renders
teacher latents from their measured cameras and fits them (:mod:`portrait3d.losses.distillation`: image and raw
render, MediaPipe-mesh relief, the depth spread along each ray); ``adversarial=False`` drops the discriminator.

``density_reg``, ``density_reg_p_dist``, ``reg_type`` and ``gpc_reg_prob`` live in
``cfg.G.rendering`` (EG3D's ``rendering_kwargs``), so the exported generator carries them.
Randomness, sharding, checkpoints, progress: :mod:`portrait3d.training.randomness`, :mod:`~portrait3d.training.snapshots`, :mod:`~portrait3d.training.loop`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.losses.distillation import mesh_depth_loss, reconstruction_loss
from portrait3d.networks import ops
from portrait3d.networks.discriminator import DiscriminatorConfig, DualDiscriminator, filtered_resizing
from portrait3d.networks.eg3d.triplane import EG3DConfig, RenderingConfig, TriPlaneGenerator
from portrait3d.networks.projected import (
    DualProjectedDiscriminator,
    ProjectedDiscriminatorConfig,
    VisionAidedDiscriminator,
)
from portrait3d.networks.stylegan2 import MappingConfig, SynthesisConfig
from portrait3d.training import augment
from portrait3d.training.batches import make_loader
from portrait3d.training.distributed import DistInfo, broadcast_module, init_distributed, shutdown_distributed
from portrait3d.training.loop import MetricsFn, StepFn, run_loop
from portrait3d.training.memory import check_training_memory
from portrait3d.training.optim import Counters, Networks, gan_step, lazy_adam
from portrait3d.training.progress import save_grid
from portrait3d.training.randomness import BatchRandom, Shard
from portrait3d.training.run_config import RunConfig
from portrait3d.training.snapshots import init_generators, load_training_state
from portrait3d.training.stylegan2 import (
    DISCRIMINATORS,
    auto_r1_gamma,
    copy_matching,
    dataset_cameras,
    discriminator_losses,
    frontal_camera,
    generator_loss,
)
from portrait3d.training.teacher import TeacherSet

__all__ = ["PRESETS", "EG3DTrainConfig", "dataset_cameras", "gaussian_blur", "preset", "train_eg3d"]

PHASE_IDS = {"Gmain": 1, "Greg": 2, "Dmain": 3, "Dreg": 4}
DENSITY_REG_POINTS = 1000  # points per sample, as EG3D


@dataclass
class EG3DTrainConfig(ConfigMixin):
    """Everything an EG3D run needs besides the data; stored in every snapshot."""

    G: EG3DConfig = field(default_factory=EG3DConfig)
    D: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(c_dim=25))
    run: RunConfig = field(default_factory=RunConfig)
    lr_G: float = 0.0025
    lr_D: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8
    r1_gamma: float | None = None        # None: auto_r1_gamma(resolution, batch)
    D_reg_interval: int = 16
    G_reg_interval: int = 4              # density regularisation
    style_mixing_prob: float = 0.0       # EG3D trains without style mixing
    gpc_reg_fade_kimg: float = 1000.0
    neural_rendering_resolution_final: int | None = None  # None: keep G.neural_rendering_resolution
    neural_rendering_resolution_fade_kimg: float = 1000.0
    blur_init_sigma: float = 10.0
    blur_fade_kimg: float | None = None  # None: batch * 200 / 32 (EG3D); 0: no blur
    blur_raw_target: bool = True
    augment: str = "color"               # DiffAugment policy on (image, image_raw) pairs
    discriminator: str = "stylegan2"     # stylegan2 (EG3D's dual pixel D + R1), projected, or both
    PD: ProjectedDiscriminatorConfig = field(default_factory=lambda: ProjectedDiscriminatorConfig(c_dim=25))
    projected_weight: float = 1.0        # 'both': weight of the projected part of the losses
    adversarial: bool = True             # False: no discriminator steps (pure distillation)
    d_warmup_kimg: float = 0.0           # D trains alone this long before G's adversarial term starts (fine-tuning
                                         # from a trained G with a fresh D; G keeps its distillation meanwhile)
    distill: str | None = None           # a teacher set (portrait3d.training.teacher) to distil from, or None
    distill_weight: float = 1.0          # reconstruction of the teacher samples (L1 + perceptual)
    distill_perceptual: float = 0.25     # weight of the perceptual term inside the reconstruction
    distill_depth_weight: float = 10.0   # rendered depth at the face-mesh points vs the mesh's relief
    distill_depth_scale: float = 1.0     # trust in MediaPipe's depth scale (mesh_depth_loss's s)
    distill_spread_weight: float = 1.0   # depth spread along the teacher renders' rays: surfaces, not fog

    def gamma(self) -> float:
        if self.discriminator == "projected":
            return 0.0  # the projected discriminator needs no R1 (Sauer et al.)
        return self.r1_gamma if self.r1_gamma is not None else auto_r1_gamma(self.G.img_resolution, self.run.batch)

    def blur_fade(self) -> float:
        return self.blur_fade_kimg if self.blur_fade_kimg is not None else self.run.batch * 200 / 32

    def validate(self) -> None:
        augment.parse_policy(self.augment)
        if self.D.img_resolution != self.G.img_resolution or self.D.c_dim != 25:
            raise UsageError("D must be a 25-d camera-conditioned discriminator at the generator's resolution")
        if self.discriminator not in DISCRIMINATORS:
            raise UsageError(f"discriminator must be one of {DISCRIMINATORS}, not {self.discriminator!r}")
        if self.discriminator != "stylegan2":
            if self.PD.c_dim != 25:
                raise UsageError("the projected discriminator must be conditioned on the 25-d camera (PD.c_dim = 25)")
            self.PD.validate()
        if self.G.rendering.image_resolution != self.G.img_resolution:
            raise UsageError("G.rendering.image_resolution must equal G.img_resolution")
        if self.G.rendering.reg_type != "l1":
            raise UsageError("only EG3D's 'l1' density regularisation is implemented")
        if not self.adversarial and self.distill is None:
            raise UsageError("without the adversarial loss there is nothing to train on: give a teacher set (distill)")
        for name in ("distill_weight", "distill_perceptual", "distill_depth_weight", "distill_depth_scale",
                     "distill_spread_weight", "d_warmup_kimg"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise UsageError(f"{name} must be a finite number >= 0")


def _rendering(depth: int, depth_importance: int) -> RenderingConfig:
    return RenderingConfig(image_resolution=128,
                           superresolution_module="training.superresolution.SuperresolutionHybrid2X",
                           depth_resolution=depth, depth_resolution_importance=depth_importance)


def _cpu_small() -> EG3DTrainConfig:
    return EG3DTrainConfig(
        G=EG3DConfig(z_dim=512, w_dim=512, img_resolution=128, neural_rendering_resolution=32, sr_num_fp16_res=4,
                     mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
                     backbone=SynthesisConfig(channel_base=4096, channel_max=128, num_fp16_res=0, conv_clamp=None),
                     rendering=_rendering(24, 24), plane_resolution=128),
        D=DiscriminatorConfig(c_dim=25, img_resolution=128, channel_base=4096, channel_max=128),
        run=RunConfig(batch=8, total_kimg=500, snapshot_kimg=5, sample_kimg=1, workers=0, grid_samples=8))


def _gpu() -> EG3DTrainConfig:
    # EG3D's FFHQ networks (256 px tri-planes, 64 px neural rendering, 48+48 samples), 128 px output.
    return EG3DTrainConfig(
        G=EG3DConfig(z_dim=512, w_dim=512, img_resolution=128, neural_rendering_resolution=64, sr_num_fp16_res=4,
                     mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
                     backbone=SynthesisConfig(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None),
                     rendering=_rendering(48, 48), plane_resolution=256),
        D=DiscriminatorConfig(c_dim=25, img_resolution=128, channel_base=32768, channel_max=512),
        run=RunConfig(batch=32, total_kimg=25000, snapshot_kimg=200, sample_kimg=50, workers=3))


def _tiny() -> EG3DTrainConfig:
    # Smoke tests: tiny backbone and D; the 2X super-resolution (fixed widths) still outputs 128 px.
    return EG3DTrainConfig(
        G=EG3DConfig(z_dim=32, w_dim=512, img_resolution=128, neural_rendering_resolution=16, sr_num_fp16_res=4,
                     mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
                     backbone=SynthesisConfig(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None),
                     rendering=_rendering(6, 6), plane_resolution=32),
        D=DiscriminatorConfig(c_dim=25, img_resolution=128, channel_base=256, channel_max=16),
        run=RunConfig(batch=4, total_kimg=0.02, snapshot_kimg=0, sample_kimg=0, workers=0, progress=False,
                      grid_samples=4))


def _cpu_proj() -> EG3DTrainConfig:
    # The CPU recipe of default-2d carried to 3D: a backbone shaped like default-2d's synthesis network (so
    # --init-2d can start it from those weights), 32 px neural rendering with 2x super-resolution, 24+24 samples
    # per ray, the camera-conditioned dual projected discriminator, bf16 + channels_last.
    return EG3DTrainConfig(
        G=EG3DConfig(z_dim=256, w_dim=256, img_resolution=128, neural_rendering_resolution=32, sr_num_fp16_res=4,
                     mapping=MappingConfig(num_layers=4, w_avg_beta=0.998),
                     backbone=SynthesisConfig(channel_base=4096, channel_max=256, num_fp16_res=0, conv_clamp=None),
                     rendering=_rendering(24, 24), plane_resolution=128),
        D=DiscriminatorConfig(c_dim=25, img_resolution=128, channel_base=4096, channel_max=128),
        discriminator="projected", lr_G=0.0025, lr_D=0.002,
        run=RunConfig(batch=8, total_kimg=500, snapshot_kimg=4, sample_kimg=1, workers=0, grid_samples=8,
                      keep_snapshots=3, precision="bf16", channels_last=True))


PRESETS: dict[str, Callable[[], EG3DTrainConfig]] = {"cpu-small": _cpu_small, "cpu-proj": _cpu_proj, "gpu": _gpu,
                                                      "tiny": _tiny}


def preset(name: str) -> EG3DTrainConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- helpers


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """EG3D's discriminator-input blur: separable ``2^(-(t/sigma)^2)`` kernel over ``|t| <= 3 sigma``."""
    size = int(np.floor(sigma * 3))
    if size <= 0:
        return x
    f = torch.arange(-size, size + 1, device=x.device, dtype=torch.float32).div(sigma).square().neg().exp2()
    return ops.upfirdn2d(x, f / f.sum(), padding=size)


def neural_rendering_resolution(cfg: EG3DTrainConfig, images_seen: int) -> int:
    start = cfg.G.neural_rendering_resolution
    end = cfg.neural_rendering_resolution_final
    if end is None:
        return start
    alpha = min(images_seen / (cfg.neural_rendering_resolution_fade_kimg * 1e3), 1.0)
    return int(np.rint(start * (1 - alpha) + end * alpha))


def swapping_prob(cfg: EG3DTrainConfig, images_seen: int) -> float:
    alpha = min(images_seen / (cfg.gpc_reg_fade_kimg * 1e3), 1.0) if cfg.gpc_reg_fade_kimg > 0 else 1.0
    return (1 - alpha) + alpha * cfg.G.rendering.gpc_reg_prob


def blur_sigma(cfg: EG3DTrainConfig, images_seen: int) -> float:
    fade = cfg.blur_fade()
    return max(1 - images_seen / (fade * 1e3), 0) * cfg.blur_init_sigma if fade > 0 else 0.0


# ----------------------------------------------------------------------------- losses


def _mapping(G: TriPlaneGenerator, rnd: BatchRandom, z: torch.Tensor, c_cond: torch.Tensor, c_mix: torch.Tensor,
             mixing_prob: float, update_emas: bool) -> torch.Tensor:
    ws = G.mapping(z, c_cond, update_emas=update_emas)
    if mixing_prob > 0:
        cutoff = rnd.shared_randint(1, ws.shape[1])
        if rnd.shared_rand() < mixing_prob:
            ws[:, cutoff:] = G.mapping(rnd.randn(G.z_dim), c_mix, update_emas=False)[:, cutoff:]
    return ws


def _conditioning(rnd: BatchRandom, cams: torch.Tensor, c: torch.Tensor, swap: float) -> torch.Tensor:
    """The mapping network's camera per row: ``c``, or with probability ``swap`` another dataset camera (GPC)."""
    c_other = cams[rnd.randint(0, len(cams))]
    return torch.where(rnd.rand(1) < swap, c_other, c)


def _generate(G: TriPlaneGenerator, rnd: BatchRandom, cams: torch.Tensor, swap: float, nrr: int, mixing_prob: float,
              update_emas: bool, kw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Render this shard's samples; returns the output dict and the rendering cameras."""
    z = rnd.randn(G.z_dim)
    c = cams[rnd.randint(0, len(cams))]
    ws = _mapping(G, rnd, z, _conditioning(rnd, cams, c, swap), c, mixing_prob, update_emas)
    out = G.synthesis(ws, c, neural_rendering_resolution=nrr, update_emas=update_emas, random=rnd.source, **kw)
    return out, c


def _discriminate(D: DualDiscriminator, img: dict[str, torch.Tensor], c: torch.Tensor, rnd: BatchRandom,
                  policy: str, sigma: float, kw: dict[str, Any]) -> torch.Tensor:
    image = gaussian_blur(img["image"], sigma)
    raw = img["image_raw"]
    if augment.parse_policy(policy):
        # As EG3D with its augment pipe: the same transform on the image and the upsampled raw image.
        size = image.shape[-1]
        params = augment.sample_params(policy, rnd.global_rows, size, rnd.generator, image.device)
        params = params.take(rnd.shard.index, rnd.shard.count)
        raw_up = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        image = augment.apply(image, params)
        raw = F.interpolate(augment.apply(raw_up, params), size=raw.shape[-2:], mode="bilinear",
                            align_corners=False, antialias=True)
    return D({"image": image, "image_raw": raw}, c, **kw)


def _distill_loss(G: TriPlaneGenerator, r: BatchRandom, teacher: TeacherSet, cams: torch.Tensor, swap: float,
                  nrr: int, cfg: EG3DTrainConfig, perceptual: torch.nn.Module | None, fast: Any, device: torch.device,
                  kw: dict[str, Any], note: Callable[[str, torch.Tensor], None]) -> torch.Tensor:
    """Render teacher latents from the measured camera of one of their views (drawn per row); the weighted sum of
    reconstruction, mesh-depth and depth-spread losses, ``[rows]``.

    One view per latent cannot tell a surface from a fog that looks the same from that camera, and fog smears
    into streaks when the head turns; the spread term (the distortion loss of Mip-NeRF 360 in spirit: each ray's
    opacity kept near its depth) asks for the surface."""
    idx, view = r.randint(0, len(teacher)).cpu(), r.randint(0, teacher.num_views).cpu()
    x, c, z, mesh = (t.to(device, torch.float32) for t in teacher.batch(idx, view))
    c_cond = _conditioning(r, cams, c, swap)
    with fast.autocast(device):
        ws = G.mapping(z, c_cond)
        out = G.synthesis(ws, c, neural_rendering_resolution=nrr, random=r.source,
                          depth_spread=cfg.distill_spread_weight > 0, **kw)
        rec = reconstruction_loss(out["image"], out["image_raw"], x, perceptual, cfg.distill_perceptual)
    depth = mesh_depth_loss(out["image_depth"].float(), mesh, c, x.shape[-1], cfg.distill_depth_scale)
    note("distill_rec", rec)
    note("distill_depth", depth)
    loss = cfg.distill_weight * rec.float() + cfg.distill_depth_weight * depth
    if cfg.distill_spread_weight > 0:
        spread = out["image_depth_spread"].float().mean([1, 2, 3])
        note("distill_spread", spread)
        loss = loss + cfg.distill_spread_weight * spread
    return loss


def make_step(cfg: EG3DTrainConfig, nets: Networks, info: DistInfo, cams: torch.Tensor,
              teacher: TeacherSet | None = None) -> StepFn:
    """The per-step function for :func:`portrait3d.training.loop.run_loop` (``teacher``: distil from it)."""
    G, D = nets.G, nets.D
    run = cfg.run
    local = run.batch // info.world
    micro = run.batch_gpu or local
    if local % micro:
        raise UsageError(f"per-process batch {local} is not a multiple of batch_gpu {micro}")
    shards = Shard.rounds(info, local // micro)
    kw = {} if (run.amp and info.device.type == "cuda") else {"force_fp32": True}
    gamma = cfg.gamma()
    rendering = cfg.G.rendering
    fast = run.fast_path()  # bf16 autocast + channels_last
    if fast.compile or fast.compile_d:
        # The renderer draws its ray jitter inside the forward pass from a torch.Generator, which a compiled
        # graph does not hold; EG3D runs the fast path eagerly.
        raise UsageError("the EG3D trainer does not compile (use --no-compile; bf16 and channels_last work)")
    density_reg = rendering.density_reg
    perceptual = None
    if teacher is not None and cfg.distill_perceptual > 0 and cfg.distill_weight > 0:
        from portrait3d.losses.perceptual import PerceptualLoss

        # at the renders' own size: at 128 px the 224 px resize would double the cost for little
        perceptual = PerceptualLoss(resize=None).to(info.device).eval().requires_grad_(False)

    def step_fn(step: int, images_seen: int, batch: Any) -> dict[str, float]:
        real_all = batch[0].to(info.device, non_blocking=True).to(torch.float32)
        real_c_all = batch[1].to(info.device, non_blocking=True).to(torch.float32)
        nrr = neural_rendering_resolution(cfg, images_seen)
        swap = swapping_prob(cfg, images_seen)
        sigma = blur_sigma(cfg, images_seen)
        warming_up = cfg.adversarial and images_seen < cfg.d_warmup_kimg * 1000  # the fresh D trains alone
        real_raw_all = filtered_resizing(real_all, nrr)
        if cfg.blur_raw_target:
            real_raw_all = gaussian_blur(real_raw_all, sigma)
        n_rounds = len(shards)
        parts = [(real_all[k::n_rounds], real_raw_all[k::n_rounds], real_c_all[k::n_rounds]) for k in range(n_rounds)]
        stats: dict[str, list[torch.Tensor]] = {}

        def note(name: str, v: torch.Tensor) -> None:
            stats.setdefault(name, []).append(v.detach().float().mean())

        def rnd(phase: str, shard: Shard) -> BatchRandom:
            return BatchRandom(run.seed, (step, PHASE_IDS[phase]), shard, micro, info.device)

        def g_main(shard: Shard) -> torch.Tensor:
            r = rnd("Gmain", shard)
            loss = torch.zeros([], device=info.device)
            if cfg.adversarial and not warming_up:
                with fast.autocast(info.device):
                    out, c = _generate(G, r, cams, swap, nrr, cfg.style_mixing_prob, False, kw)
                    logits = _discriminate(D, out, c, r, cfg.augment, sigma, kw)
                loss = generator_loss(logits, cfg.projected_weight, cfg.discriminator)
                note("loss_G", loss)
            if teacher is not None:
                loss = loss + _distill_loss(G, r, teacher, cams, swap, nrr, cfg, perceptual, fast, info.device, kw,
                                            note).mean()
            return loss

        def g_reg(shard: Shard) -> torch.Tensor:
            r = rnd("Greg", shard)
            z = r.randn(G.z_dim)
            c = cams[r.randint(0, len(cams))]
            c_other = cams[r.randint(0, len(cams))]
            c_cond = c_other if r.shared_rand() < swap else c  # one decision per batch, as EG3D
            ws = _mapping(G, r, z, c_cond, c, cfg.style_mixing_prob, False)
            pts = r.rand(DENSITY_REG_POINTS, 3) * 2 - 1
            pts_near = pts + r.randn(DENSITY_REG_POINTS, 3) * rendering.density_reg_p_dist
            coords = torch.cat([pts, pts_near], dim=1)
            dirs = r.randn(2 * DENSITY_REG_POINTS, 3)
            sig = G.sample_mixed(coords, dirs, ws, update_emas=False, random=r.source, **kw)["sigma"]
            tv = F.l1_loss(sig[:, :DENSITY_REG_POINTS], sig[:, DENSITY_REG_POINTS:])
            note("density_tv", tv)
            return tv * density_reg

        def d_main(shard: Shard, real: torch.Tensor, real_raw: torch.Tensor, real_c: torch.Tensor) -> torch.Tensor:
            r = rnd("Dmain", shard)
            with fast.autocast(info.device):
                with torch.no_grad():
                    out, c = _generate(G, r, cams, swap, nrr, cfg.style_mixing_prob, True, kw)
                fake_logits = _discriminate(D, out, c, r, cfg.augment, sigma, kw)
                real_logits = _discriminate(D, {"image": real, "image_raw": real_raw}, real_c, r, cfg.augment, sigma,
                                            kw)
            loss = discriminator_losses(fake_logits, real_logits, cfg.projected_weight, cfg.discriminator)
            note("loss_D", loss)
            first = (lambda x: x[0] if isinstance(x, tuple) else x)
            note("score_real", first(real_logits).float())
            note("score_fake", first(fake_logits).float())
            return loss

        def d_reg(shard: Shard, real: torch.Tensor, real_raw: torch.Tensor, real_c: torch.Tensor) -> torch.Tensor:
            r = rnd("Dreg", shard)
            x = real.detach().requires_grad_(True)
            x_raw = real_raw.detach().requires_grad_(True)
            logits = _discriminate(D, {"image": x, "image_raw": x_raw}, real_c, r, cfg.augment, sigma, kw)
            if isinstance(logits, tuple):  # 'both': R1 on the pixel discriminator only
                logits = logits[0]
            g_img, g_raw = torch.autograd.grad(logits.sum(), [x, x_raw], create_graph=True)
            penalty = g_img.square().sum([1, 2, 3]) + g_raw.square().sum([1, 2, 3])
            note("r1_penalty", penalty)
            return (penalty * (gamma / 2)).mean()

        # while the fresh D warms up G learns only from the teacher; without one it waits
        return gan_step(nets, info, step, shards, parts, None if warming_up and teacher is None else g_main, g_reg,
                        (lambda s, p: d_main(s, *p)) if cfg.adversarial else None, lambda s, p: d_reg(s, *p),
                        g_reg_interval=cfg.G_reg_interval if density_reg > 0 else None,
                        d_reg_interval=cfg.D_reg_interval if gamma > 0 and cfg.adversarial else None, stats=stats)

    return step_fn


# ----------------------------------------------------------------------------- building and training


@torch.no_grad()
def init_from_2d(G3: TriPlaneGenerator, G2: torch.nn.Module) -> list[str]:
    """Start the tri-plane generator from a trained 2D StyleGAN2 wherever the shapes match (as Mimic3D starts 3D
    training from a 2D generator): every synthesis weight, bias and constant but the final ToRGB layers (3 colour
    channels there, 3 x C plane channels here), every mapping layer and the tracked ``w_avg``.

    The first mapping layer here also reads the camera embedding: its ``z`` columns take the 2D weights (rescaled,
    since the equalised-learning-rate gain ``1/sqrt(fan_in)`` counts the extra inputs) and its camera columns
    start at zero, so ``G3.mapping(z, c)`` equals ``G2.mapping(z)`` for every camera until training conditions it.
    A teacher sample ``G2(z)`` then has the same ``w`` here (what :mod:`portrait3d.training.teacher` relies on).
    A pose-conditioned 2D generator (``portrait3d train stylegan2 --pose-conditioned``) hands over its camera
    embedding and camera columns as they are: pose-conditioned pretraining.
    Returns the copied tensor names."""
    src = {f"synthesis.{k}": v for k, v in G2.synthesis.state_dict().items() if ".torgb." not in k}
    src.update({f"mapping.{k}": v for k, v in G2.mapping.state_dict().items()})
    dst = G3.backbone.state_dict()
    copied = copy_matching(dst, src, G3.z_dim)  # ToRGB styles drive colours there, not planes
    G3.backbone.load_state_dict(dst)
    return copied


def build_discriminator(cfg: EG3DTrainConfig) -> torch.nn.Module:
    """EG3D's dual pixel discriminator, the camera-conditioned dual projected one, or both side by side."""
    from portrait3d.losses.perceptual import load_efficientnet_lite0

    if cfg.discriminator == "stylegan2":
        return DualDiscriminator(cfg.D)
    proj = DualProjectedDiscriminator(cfg.PD, load_efficientnet_lite0())
    return proj if cfg.discriminator == "projected" else VisionAidedDiscriminator(DualDiscriminator(cfg.D), proj)


def _check_memory(cfg: EG3DTrainConfig, nets: Networks, info: DistInfo) -> None:
    """Refuse a micro-batch that cannot fit in memory (:mod:`portrait3d.training.memory`) before training starts."""
    c = frontal_camera(1, info.device)

    def forward() -> None:  # draws inside the probe, whose random streams are put back
        out = nets.G(torch.randn([1, cfg.G.z_dim], device=info.device, requires_grad=True), c)
        if cfg.adversarial:
            nets.D({"image": out["image"], "image_raw": out["image_raw"]}, c)

    check_training_memory(forward, [nets.G, nets.D], cfg.run.batch, cfg.run.batch_gpu, info.world, info.device,
                          f"{cfg.G.neural_rendering_resolution} px neural rendering")


def build_networks(cfg: EG3DTrainConfig, device: torch.device) -> Networks:
    """G, D, G_ema and optimisers, initialised from ``cfg.run.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.run.seed)
    fast = cfg.run.fast_path()
    G = fast.prepare(TriPlaneGenerator(cfg.G).train().requires_grad_(False).to(device))
    D = fast.prepare(build_discriminator(cfg).train().requires_grad_(False).to(device))
    G_ema = copy.deepcopy(G).eval()
    reg_G = cfg.G_reg_interval if cfg.G.rendering.density_reg > 0 else None
    opt_G = lazy_adam(G.parameters(), cfg.lr_G, cfg.betas, cfg.eps, reg_G)
    opt_D = lazy_adam(D.parameters(), cfg.lr_D, cfg.betas, cfg.eps, cfg.D_reg_interval if cfg.gamma() > 0 else None)
    return Networks(G, D, G_ema, opt_G, opt_D)


def train_eg3d(cfg: EG3DTrainConfig, data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               resume: str | os.PathLike[str] | None = None, metrics: MetricsFn | None = None,
               init_2d: str | os.PathLike[str] | None = None,
               init_from: str | os.PathLike[str] | None = None) -> Path:
    """Train (or continue training) an EG3D generator on a built :class:`AlignedFaceDataset`.

    ``init_2d``: a 2D StyleGAN2 checkpoint (or built-in name) whose weights start the tri-plane backbone where
    the shapes match (:func:`init_from_2d`; a new run only). ``init_from``: a trained EG3D generator of this
    config (e.g. the shipped ``default-3d``) whose weights start a new run's G and G_ema, with a fresh
    discriminator (:func:`~portrait3d.training.snapshots.init_generators`).

    Same conventions as :func:`portrait3d.training.stylegan2.train_stylegan2` (single process or
    ``torchrun``; ``out_dir`` layout; bit-exact ``resume``; ``metrics`` hook on rank 0). Sample
    grids show the EMA generator from fixed latents and dataset cameras (``fakes-*``) and its depth
    (``depth-*``). Returns the path of the exported EMA generator.
    """
    from portrait3d.checkpoints.native import save_network
    from portrait3d.face.dataset import AlignedFaceDataset
    cfg.validate()
    info = init_distributed(cfg.run.device)
    try:
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        run = cfg.run
        run.apply_threads()
        ds = AlignedFaceDataset(data_root, mirror=run.mirror, limit=run.limit)
        if ds.resolution != cfg.G.img_resolution:
            raise UsageError(f"dataset images are {ds.resolution} px but the generator makes {cfg.G.img_resolution} px")
        cams = dataset_cameras(ds).to(info.device)
        teacher = TeacherSet.load(cfg.distill) if cfg.distill is not None else None
        if teacher is not None:
            if teacher.images.shape[1] != cfg.G.img_resolution or teacher.latents.shape[1] != cfg.G.z_dim:
                raise UsageError(f"{cfg.distill}: the teacher's samples ({teacher.images.shape[1]} px, z of "
                                 f"{teacher.latents.shape[1]}) do not fit this generator ({cfg.G.img_resolution} px, "
                                 f"z of {cfg.G.z_dim})")
            if info.is_main:
                print(f"distilling from {len(teacher)} samples of {teacher.network} ({cfg.distill})")
        nets = build_networks(cfg, info.device)
        counters = Counters()
        if sum(x is not None for x in (resume, init_2d, init_from)) > 1:
            raise UsageError("give only one of --resume, --init-2d and --init-from")
        if init_from is not None:
            note = init_generators(nets, init_from)
            if info.is_main:
                print(note)
        if init_2d is not None:
            from portrait3d.checkpoints.load import load_network

            copied = init_from_2d(nets.G, load_network(init_2d, device=info.device))
            if not copied:
                raise UsageError(f"{init_2d}: no weight of this 2D generator fits the tri-plane backbone")
            nets.G_ema.load_state_dict(nets.G.state_dict())
            if info.is_main:
                print(f"initialised {len(copied)} backbone tensors from {init_2d}")
        if resume is not None:
            def check(meta: dict[str, Any]) -> None:
                old = EG3DTrainConfig.from_dict(meta["config"])
                if old.G != cfg.G or old.D != cfg.D:
                    raise UsageError("the snapshot was trained with other network settings than the given config "
                                     "(give the same --config and network options as the run)")

            counters, meta = load_training_state(resume, nets, "eg3d", check=check)
        for m in (nets.G, nets.D, nets.G_ema):
            broadcast_module(m, info)
        _check_memory(cfg, nets, info)
        sampler, loader = make_loader(ds, run, info, counters.step)
        out = Path(out_dir)
        g = torch.Generator().manual_seed(run.seed + 1)
        grid_z = torch.randn([run.grid_samples, cfg.G.z_dim], generator=g)
        grid_c = cams.cpu()[torch.randint(0, len(cams), [run.grid_samples], generator=g)]

        def export(path: Path) -> Any:
            nrr = neural_rendering_resolution(cfg, counters.images_seen)
            nets.G_ema.config = dataclasses.replace(nets.G_ema.config, neural_rendering_resolution=nrr)
            nets.G_ema.neural_rendering_resolution = nrr
            return save_network(nets.G_ema, path, overwrite=True)

        @torch.no_grad()
        def grid_fn() -> dict[str, torch.Tensor]:
            from portrait3d.networks.eg3d.camera import camera_from_angles
            from portrait3d.utils.visualize import depth_to_uint8

            nrr = neural_rendering_resolution(cfg, counters.images_seen)
            imgs, depths = [], []
            for z, c in zip(grid_z.split(4), grid_c.split(4)):
                o = nets.G_ema(z.to(info.device), c.to(info.device), neural_rendering_resolution=nrr,
                               noise_mode="const", deterministic=True)
                imgs.append(o["image"].cpu())
                depths.append(o["image_depth"].cpu())
            depth = torch.from_numpy(depth_to_uint8(torch.cat(depths))).permute(0, 3, 1, 2).float() / 127.5 - 1
            # Rows: yaw -30, 0, +30 degrees; columns: the first grid latents, conditioned on the frontal camera.
            z4 = grid_z[:4].to(info.device)
            ws = nets.G_ema.mapping(z4, frontal_camera(len(z4), info.device))
            views = [nets.G_ema.synthesis(ws, camera_from_angles(yaw, 0.0)[None].expand(len(z4), -1).to(info.device),
                                          neural_rendering_resolution=nrr, noise_mode="const",
                                          deterministic=True)["image"].cpu() for yaw in (-30.0, 0.0, 30.0)]
            return {"fakes": torch.cat(imgs), "depth": depth, "views": torch.cat(views)}

        if info.is_main and counters.step == 0 and run.grid_samples > 0:
            out.mkdir(parents=True, exist_ok=True)
            reals = torch.stack([ds[i][0] for i in sampler.positions(0, run.grid_samples)])
            save_grid(out / "reals.png", reals)
        return run_loop(trainer="eg3d", config=cfg.to_dict(), run=run, info=info, out_dir=out, nets=nets,
                        counters=counters, batches=iter(loader), step_fn=make_step(cfg, nets, info, cams, teacher),
                        grid_fn=grid_fn, export_fn=export, metrics=metrics)
    finally:
        shutdown_distributed(info)

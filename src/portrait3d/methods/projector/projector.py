"""Optimisation-based GAN inversion for our StyleGAN2 :class:`~portrait3d.networks.stylegan2.Generator`.

The recipe is the StyleGAN2 projector of Karras et al. ("Analyzing and Improving the Image Quality
of StyleGAN", sec. 5 / appendix D; NVlabs' ``projector.py``), re-implemented here and extended:

* start from ``w_avg``, the mean of ``w_avg_samples`` mapped random latents (our own deterministic
  estimate, not the generator's tracked EMA), with ``w_std`` = RMS distance of the samples to it;
* Adam (betas 0.9/0.999) on the latent and, optionally, on the per-layer constant noise maps, which
  start as fresh unit Gaussians;
* learning rate ``lr * ramp``: cosine ramp-down over the last ``lr_rampdown`` of the run, linear
  ramp-up over the first ``lr_rampup``;
* Gaussian noise of std ``w_std * initial_noise_factor * max(0, 1 - t / noise_ramp)^2`` added to
  the latent each step (explores early, vanishes after ``noise_ramp`` of the run);
* noise-map regulariser: for every map and every level of its 2x average-pooling pyramid (down to
  8x8), the squared mean auto-correlation with a one-pixel roll along x and y, weighted
  ``noise_reg_weight`` (1e5); after each step every map is re-normalised to zero mean, unit variance;
* the image loss is a weighted sum of pixel MSE, a perceptual distance
  (:class:`portrait3d.losses.PerceptualLoss`: EfficientNet-Lite0 features, not the official
  LPIPS/VGG16 -- see its ``description``) and, when the target's 68 landmarks are given, the face
  identity loss (:class:`portrait3d.losses.IdentityLoss`, chips aligned from the target landmarks).

Latent spaces: ``"w"`` optimises one w broadcast to all ``num_ws`` layers (the official projector),
``"w+"`` one w per layer, and ``"w->w+"`` W for the first half of the steps and then W+
initialised from that result (a hierarchical schedule as in PIE, Tewari et al. 2020); each phase
has its own learning-rate ramp and fresh Adam state, the latent-noise ramp runs over the whole run.

``G`` itself is never modified: the optimised noise maps are passed to the synthesis network with
:func:`torch.func.functional_call`, gradients are taken only w.r.t. our own tensors (nothing is
accumulated in ``G``'s ``.grad``), and ``G``'s train/eval mode is left alone (use ``G.eval()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from portrait3d.errors import UsageError

__all__ = ["SPACES", "PRECISIONS",
           "ProjectionResult", "ProjectorConfig", "compute_w_stats", "noise_buffer_names", "project",
           "resize_target", "synthesize", "as_target_image", "device_of", "lr_at", "latent_noise_scale",
           "scaled_landmarks", "image_loss_modules", "image_loss_terms", "finite_loss"]

SPACES = ("w", "w+", "w->w+")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ProjectorConfig:
    """Settings of :func:`project` (defaults: the official projector's, plus our loss terms)."""

    space: str = "w"                    # "w", "w+" or "w->w+" (W for half the steps, then W+)
    steps: int = 500
    lr: float = 0.1                     # initial learning rate
    lr_rampup: float = 0.05             # fraction of a phase with linear lr warm-up
    lr_rampdown: float = 0.25           # fraction of a phase with cosine lr decay
    initial_noise_factor: float = 0.05  # latent noise std at t=0, in units of w_std
    noise_ramp: float = 0.75            # fraction of the run over which the latent noise fades out
    optimize_noise: bool = True         # also optimise the constant noise maps (official: yes)
    noise_reg_weight: float = 1e5
    w_avg_samples: int = 10000
    w_avg_seed: int = 123
    mse_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: str = "efficientnet-lite0"   # perceptual_loss() name ("auto", "efficientnet-lite0", "lpips")
    perceptual_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"resize": 224}
    identity_weight: float = 0.1        # used only when landmarks are given
    # Ours: weight of the latent prior ||Σ^-1/2 (w - w_avg)||^2 / w_dim (1 on average for sampled w), from the
    # w_avg samples' covariance. Without it projections land far outside the samples (default-2d: Mahalanobis
    # norm 80-100 against 16 +- 2 for samples), where edit directions learned from samples no longer hold.
    latent_prior_weight: float = 0.0
    seed: int = 0                       # noise-map initialisation and latent noise
    # "bf16": the synthesis and the perceptual and identity networks run under bf16 autocast (AMX on a CPU); the
    # latent, the noise maps, the pixel loss and the optimiser stay float32.
    precision: str = "fp32"

    def validate(self) -> None:
        if self.space not in SPACES:
            raise UsageError(f"space must be one of {SPACES}, not {self.space!r}")
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, not {self.steps}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.w_avg_samples < 1:
            raise UsageError(f"w_avg_samples must be >= 1, not {self.w_avg_samples}")
        for name in ("lr", "lr_rampup", "lr_rampdown", "initial_noise_factor", "noise_ramp", "noise_reg_weight",
                     "mse_weight", "perceptual_weight", "identity_weight", "latent_prior_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be a finite non-negative number, not {v!r}")
        if self.space == "w->w+" and self.steps < 2:
            raise UsageError("space 'w->w+' needs at least 2 steps")


@dataclass
class ProjectionResult:
    """Output of :func:`project`.

    Attributes:
        ws: ``[1, num_ws, w_dim]`` the optimised latent (for ``"w"``, the same w in every row).
        noise: ``{name: [R, R] tensor}`` the noise maps to synthesise with, keyed by ``G``'s buffer
            names (``"synthesis.b4.conv1.noise_const"`` ...), detached copies.
        losses: one dict per step (``step``, ``phase``, ``lr``, ``w_noise``, ``mse``, ``perceptual``,
            ``identity``, ``noise_reg``, ``loss``; terms with zero weight are absent).
        image: ``[1, 3, R, R]`` ``G`` rendered from ``ws`` and ``noise`` (``noise_mode='const'``).
        target: ``[1, 3, R, R]`` the target as compared (resized to ``G.img_resolution``).
        space: the latent space of the run; perceptual: the perceptual network's description.
    """

    ws: torch.Tensor
    noise: dict[str, torch.Tensor]
    losses: list[dict[str, Any]]
    image: torch.Tensor
    target: torch.Tensor | None = None
    space: str = "w"
    perceptual: str = ""

    @property
    def w(self) -> torch.Tensor:
        """``[1, w_dim]``: the first row of :attr:`ws` (the w of a ``"w"`` projection)."""
        return self.ws[:, 0]


def noise_buffer_names(G: nn.Module) -> list[str]:
    """Names (relative to ``G``) of the constant noise maps of its synthesis layers."""
    return [n for n, _ in G.named_buffers() if n.endswith("noise_const")]


@torch.no_grad()
def compute_w_stats(G: nn.Module, num_samples: int = 10000, seed: int = 123, c: torch.Tensor | None = None,
                    batch: int = 1000, whitening: bool = False):
    """``(w_avg [1, w_dim], w_std)`` from ``num_samples`` latents ``z ~ N(0, I)`` (seeded, CPU
    generator, so the same on every device) mapped with truncation 1. ``w_std`` is the RMS
    Euclidean distance of the samples to the mean, as the official projector uses it. With
    ``whitening``, also ``Σ^-1/2 [w_dim, w_dim]`` of the samples' covariance (eigenvalues floored at
    1e-6 of the largest), as a third element."""
    dev = device_of(G)
    gen = torch.Generator().manual_seed(int(seed))
    ws_all = []
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        z = torch.randn([n, G.z_dim], generator=gen).to(dev)
        cc = None if c is None else c.to(dev).expand(n, -1)
        w = G.mapping(z, cc)[:, 0].to(torch.float64)
        ws_all.append(w.cpu())
    w = torch.cat(ws_all)
    w_avg = w.mean(0, keepdim=True)
    w_std = float(((w - w_avg).square().sum(1).mean()).sqrt())
    if not whitening:
        return w_avg.to(torch.float32).to(dev), w_std
    evals, evecs = torch.linalg.eigh(torch.cov((w - w_avg).T))
    evals = evals.clamp_min(float(evals.max()) * 1e-6)
    inv_sqrt = (evecs * evals.rsqrt()) @ evecs.T
    return w_avg.to(torch.float32).to(dev), w_std, inv_sqrt.to(torch.float32).to(dev)


def as_target_image(target: Any) -> torch.Tensor:
    """``target`` as one image tensor ``[1, 3, H, W]`` (a ``[3, H, W]`` one gains the batch axis)."""
    target = torch.as_tensor(target)
    if target.ndim == 3:
        target = target[None]
    if target.ndim != 4 or target.shape[0] != 1:
        raise UsageError(f"target: expected one image [1, 3, H, W] in [-1, 1], got {tuple(target.shape)}")
    return target


def resize_target(target: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[1, 3, H, H]`` -> ``[1, 3, R, R]``: area averaging when shrinking, bicubic when enlarging."""
    if target.ndim != 4 or target.shape[1] != 3:
        raise UsageError(f"target: expected [1, 3, H, W] in [-1, 1], got {tuple(target.shape)}")
    if target.shape[2] != target.shape[3]:
        raise UsageError(f"target must be square (an aligned face crop), got {target.shape[2]}x{target.shape[3]}")
    h = target.shape[2]
    if h == resolution:
        return target
    if h > resolution:
        return F.interpolate(target, size=(resolution, resolution), mode="area")
    return F.interpolate(target, size=(resolution, resolution), mode="bicubic", align_corners=False)


def device_of(G: nn.Module) -> torch.device:
    """The device of ``G``'s first parameter (CPU when it has none)."""
    for t in G.parameters():
        return t.device
    return torch.device("cpu")


def lr_at(cfg: ProjectorConfig, t: float) -> float:
    """Official schedule: cosine ramp-down over the last ``lr_rampdown``, linear ramp-up at the start."""
    ramp = 1.0 if cfg.lr_rampdown <= 0 else min(1.0, (1.0 - t) / cfg.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    if cfg.lr_rampup > 0:
        ramp *= min(1.0, t / cfg.lr_rampup)
    return cfg.lr * ramp


def latent_noise_scale(w_std: float, initial_noise_factor: float, noise_ramp: float, t: float) -> float:
    """Std of the latent noise at run fraction ``t``: ``w_std * initial_noise_factor * max(0, 1 - t / noise_ramp)^2``
    (0 when ``noise_ramp <= 0``)."""
    return w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2 if noise_ramp > 0 else 0.0


def _noise_regularizer(maps: list[torch.Tensor]) -> torch.Tensor:
    """Sum over maps and pyramid levels (down to 8x8) of the squared one-pixel auto-correlations."""
    reg = maps[0].new_zeros([])
    for m in maps:
        x = m[None, None]
        while True:
            reg = reg + (x * torch.roll(x, 1, dims=3)).mean() ** 2 + (x * torch.roll(x, 1, dims=2)).mean() ** 2
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, 2)
    return reg


def synthesize(G: nn.Module, ws: torch.Tensor, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``G.synthesis(ws, noise_mode='const')`` with ``noise`` (G-relative buffer names) in place of
    G's own noise maps, without modifying ``G``. Differentiable w.r.t. ``ws`` and ``noise``."""
    if not noise:
        return G.synthesis(ws, noise_mode="const")
    prefix = "synthesis."
    local = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in noise.items()}
    return functional_call(G.synthesis, local, (ws,), {"noise_mode": "const"}, strict=False)


def scaled_landmarks(landmarks, src: int, dst: int) -> np.ndarray:
    """``[68, 2]`` (or ``[5, 2]``) pixel landmarks of a ``src``-px image moved to the same image at ``dst`` px."""
    lm = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    lm = np.asarray(lm, dtype=np.float64)
    if lm.ndim == 3 and lm.shape[0] == 1:
        lm = lm[0]
    if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in (5, 68):
        raise UsageError(f"landmarks: expected [68, 2] (x, y) pixel coordinates of the target, got {lm.shape}")
    s = dst / src
    return (lm + 0.5) * s - 0.5


def finite_loss(loss: torch.Tensor, what: str, step: int) -> float:
    """``float(loss)``, or ``FloatingPointError`` naming ``what`` diverged at ``step``."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} diverged at step {step}: loss {value}")
    return value


def image_loss_modules(cfg: Any, target: torch.Tensor, src_size: int, landmarks=None,
                       perceptual_loss: nn.Module | None = None, identity_loss: nn.Module | None = None
                       ) -> tuple[nn.Module | None, nn.Module | None, list[torch.Tensor] | None]:
    """The perceptual and identity modules of an image loss against ``target`` ``[1, 3, R, R]`` (on its device, eval
    mode), and the target's perceptual features where the module can cache them.

    ``cfg`` holds ``perceptual_weight``, ``perceptual``, ``perceptual_kwargs`` and ``identity_weight``
    (:class:`ProjectorConfig`, or pivotal tuning's config); a zero weight gives ``None``. The identity term needs
    ``landmarks`` (``[68, 2]`` pixels of the target as given, ``src_size`` px) or a ready ``identity_loss``.

    Returns:
        ``(percept, ident, target_features)``; ``target_features`` is ``None`` when ``percept`` has no
        ``features`` / ``distance`` pair (then call ``percept(image, target)``).
    """
    dev, res = target.device, int(target.shape[-1])
    percept = ident = None
    if cfg.perceptual_weight > 0:
        if perceptual_loss is None:
            from portrait3d.losses.perceptual import perceptual_loss as make_perceptual

            perceptual_loss = make_perceptual(cfg.perceptual, **cfg.perceptual_kwargs)
        percept = perceptual_loss.to(dev).eval()
    if cfg.identity_weight > 0 and (landmarks is not None or identity_loss is not None):
        if identity_loss is None:
            from portrait3d.losses.identity import IdentityLoss

            identity_loss = IdentityLoss(target.cpu(), scaled_landmarks(landmarks, src_size, res))
        ident = identity_loss.to(dev).eval()
    feats = None
    if percept is not None and hasattr(percept, "features") and hasattr(percept, "distance"):
        with torch.no_grad():
            feats = [f.detach() for f in percept.features(target)]
    return percept, ident, feats


def image_loss_terms(img: torch.Tensor, target: torch.Tensor, cfg: Any, percept: nn.Module | None,
                     ident: nn.Module | None, target_features: list[torch.Tensor] | None,
                     amp: Callable[[], Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """``mse_weight * MSE(img, target) + perceptual_weight * P(img, target) + identity_weight * ID(img)`` and each
    term's value, for the modules of :func:`image_loss_modules` (``None`` leaves a term out; ``target_features``
    the target's cached perceptual features, or ``None``). ``amp()``: the autocast context the networks run in.
    ``img``, ``target``: ``[1, 3, R, R]`` float32."""
    loss = img.new_zeros([])
    terms: dict[str, float] = {}
    if cfg.mse_weight > 0:
        mse = (img - target).square().mean()
        loss = loss + cfg.mse_weight * mse
        terms["mse"] = float(mse.detach())
    if percept is not None:
        with amp():
            p = (percept.distance(img, target_features) if target_features is not None
                 else percept(img, target)).float().mean()
        loss = loss + cfg.perceptual_weight * p
        terms["perceptual"] = float(p.detach())
    if ident is not None:
        with amp():
            idl = ident(img).float().mean()
        loss = loss + cfg.identity_weight * idl
        terms["identity"] = float(idl.detach())
    return loss, terms


def project(G: nn.Module, target: torch.Tensor, cfg: ProjectorConfig | None = None, landmarks=None,
            progress: bool = True, callback: Callable[..., Any] | None = None, *,
            c: torch.Tensor | None = None, perceptual_loss: nn.Module | None = None,
            identity_loss: nn.Module | None = None) -> ProjectionResult:
    """Find the latent (and noise maps) with which ``G`` best reproduces ``target``.

    Args:
        G: a StyleGAN2 :class:`~portrait3d.networks.stylegan2.Generator` (not modified).
        target: ``[1, 3, H, H]`` (or ``[3, H, H]``) in ``[-1, 1]``; resized to ``G.img_resolution``
            (area averaging down, bicubic up).
        cfg: :class:`ProjectorConfig` (defaults if ``None``).
        landmarks: ``[68, 2]`` iBUG landmarks of the target in its own pixel coordinates; enables
            the identity term (``cfg.identity_weight``), whose chip alignment they fix.
        progress: tqdm bar.
        callback: ``callback(step, record, ws, image)`` after every step (``record`` = that step's
            loss dict, ``ws`` the current latent ``[1, num_ws, w_dim]`` without latent noise,
            ``image`` that step's synthesis); returning ``True`` stops early.
        c: label for conditional generators (``[1, c_dim]``), used for ``w_avg``.
        perceptual_loss / identity_loss: ready-made loss modules to use instead of building them
            from ``cfg`` (``identity_loss`` must accept images at ``G.img_resolution``).

    Returns:
        :class:`ProjectionResult`.
    """
    cfg = cfg or ProjectorConfig()
    cfg.validate()
    if getattr(G, "c_dim", 0) and c is None:
        raise UsageError(f"this generator is conditioned on a label (c_dim={G.c_dim}): pass c=")
    dev = device_of(G)
    res = int(G.img_resolution)
    target = as_target_image(target)
    src_size = int(target.shape[2])
    target_r = resize_target(target.to(dev, torch.float32), res).detach()

    # -- loss terms ------------------------------------------------------------------------
    percept, ident, target_feats = image_loss_modules(cfg, target_r, src_size, landmarks, perceptual_loss, identity_loss)

    # -- initial latent and noise maps --------------------------------------------------------
    if cfg.latent_prior_weight > 0:
        w_avg, w_std, w_whiten = compute_w_stats(G, cfg.w_avg_samples, cfg.w_avg_seed, c, whitening=True)
    else:
        w_avg, w_std = compute_w_stats(G, cfg.w_avg_samples, cfg.w_avg_seed, c)
    num_ws, w_dim = int(G.num_ws), int(G.w_dim)
    gen = torch.Generator().manual_seed(int(cfg.seed))  # CPU generator: same numbers on every device
    buffers = dict(G.named_buffers())
    noise_names = noise_buffer_names(G)
    if cfg.optimize_noise:
        noise = {n: torch.randn(buffers[n].shape, generator=gen).to(dev).requires_grad_(True) for n in noise_names}
    else:
        noise = {n: buffers[n].detach().clone() for n in noise_names}

    phases = [("w", cfg.steps)] if cfg.space == "w" else [("w+", cfg.steps)] if cfg.space == "w+" else \
        [("w", cfg.steps // 2), ("w+", cfg.steps - cfg.steps // 2)]

    def amp() -> Any:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    history: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"projecting ({cfg.space})", unit="step", leave=False)
    w_opt = w_avg.detach().clone()[:, None]  # [1, 1, w_dim]
    step, stopped = 0, False
    try:
        for phase, n_steps in phases:
            if phase == "w+" and w_opt.shape[1] == 1:
                w_opt = w_opt.detach().repeat(1, num_ws, 1)
            w_opt = w_opt.detach().clone().requires_grad_(True)
            params = [w_opt] + (list(noise.values()) if cfg.optimize_noise else [])
            opt = torch.optim.Adam(params, betas=(0.9, 0.999), lr=cfg.lr)
            for i in range(n_steps):
                t_phase = i / n_steps
                t = step / cfg.steps
                lr = lr_at(cfg, t_phase)
                for g in opt.param_groups:
                    g["lr"] = lr
                w_noise_scale = latent_noise_scale(w_std, cfg.initial_noise_factor, cfg.noise_ramp, t)
                w_noise = torch.randn(w_opt.shape, generator=gen).to(dev) * w_noise_scale
                ws = (w_opt + w_noise).expand(1, num_ws, w_dim)
                with amp():
                    img = synthesize(G, ws, noise).float()

                loss, terms = image_loss_terms(img, target_r, cfg, percept, ident, target_feats, amp)
                record: dict[str, Any] = {"step": step, "phase": phase, "lr": lr, "w_noise": w_noise_scale, **terms}
                if cfg.latent_prior_weight > 0:
                    prior = ((w_opt - w_avg[:, None]) @ w_whiten).square().sum(-1).mean() / w_dim
                    loss = loss + cfg.latent_prior_weight * prior
                    record["latent_prior"] = float(prior.detach())
                if cfg.optimize_noise and cfg.noise_reg_weight > 0 and noise:
                    reg = _noise_regularizer(list(noise.values()))
                    loss = loss + cfg.noise_reg_weight * reg
                    record["noise_reg"] = float(reg.detach())
                record["loss"] = finite_loss(loss, "projection", step)

                opt.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(loss, params, allow_unused=True)  # nothing lands in G's .grad
                for prm, g in zip(params, grads):
                    prm.grad = g if g is not None else torch.zeros_like(prm)
                opt.step()
                if cfg.optimize_noise:
                    with torch.no_grad():
                        for buf in noise.values():
                            buf -= buf.mean()
                            buf *= buf.square().mean().rsqrt()

                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                     if k in ("loss", "mse", "perceptual", "identity")}, refresh=False)
                step += 1
                if callback is not None and callback(step - 1, record, w_opt.detach().expand(1, num_ws, w_dim),
                                                     img.detach()):
                    stopped = True
                    break
            if stopped:
                break
    finally:
        if bar is not None:
            bar.close()

    ws_final = w_opt.detach().expand(1, num_ws, w_dim).clone()
    noise_final = {n: v.detach().clone() for n, v in noise.items()}
    with torch.no_grad():
        image = synthesize(G, ws_final, noise_final)
    return ProjectionResult(ws=ws_final, noise=noise_final, losses=history, image=image, target=target_r,
                            space=cfg.space, perceptual=getattr(percept, "description", "") if percept else "")

"""Pivotal Tuning Inversion for our StyleGAN2 (Roich et al., "Pivotal Tuning for Latent-based Editing of Real
Images", ACM TOG 2022), re-implemented.

After a projection has found the *pivot* ``w_p`` (PTI: a W projection, so that edit directions learned from samples
still hold there), the synthesis network is fine-tuned so that it renders the photo ``x`` at ``w_p``:

    L_pt = lambda_L2 * L2(x, G*(w_p)) + lambda_P * L_percep(x, G*(w_p)) [+ lambda_ID * L_ID] [+ lambda_R * L_R]

* ``L2``: pixel mean squared error;
* ``L_percep``: :class:`portrait3d.losses.PerceptualLoss` (EfficientNet-Lite0 features: our offline stand-in for
  PTI's LPIPS, not LPIPS; the description is recorded);
* ``L_ID``: an optional dlib identity term (ours; needs the photo's 68 landmarks);
* ``L_R``: PTI's optional locality regulariser (eq. 4-5 of the paper): for a random ``w_z = f(z)`` (truncation 0.5),
  ``w_r = w_p + alpha (w_z - w_p) / ||w_z - w_p||`` must render the same with the tuned and the original synthesis
  (L2 + perceptual).

PTI's defaults are kept (350 steps, Adam lr 3e-4, unit L2 / perceptual weights, ``alpha = 30``, locality off).
Only ``G.synthesis`` is tuned: the mapping network, and so the latent statistics the editors were fitted on, stay as
they were. The synthesis runs with ``noise_mode='const'`` and the generator's own noise maps, as every edit renders.

The caller's generator is never modified: a deep copy is tuned and returned.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from portrait3d.errors import UsageError
from portrait3d.methods.projector.projector import (
    PRECISIONS,
    as_target_image,
    device_of,
    finite_loss,
    image_loss_modules,
    image_loss_terms,
    resize_target,
)

__all__ = ["PTISettings", "PivotalTuningConfig", "PivotalTuningResult", "pivotal_tuning", "tuned_parameters",
           "locality_latent", "locality_distance", "sample_locality_code"]


@dataclass
class PTISettings:
    """PTI's own settings (Roich et al.; the official defaults), shared by the 2D tuner here and EG3D's
    (:class:`portrait3d.methods.inversion3d.pti.PTIConfig`)."""

    steps: int = 350                   # PTI: max_pti_steps
    lr: float = 3e-4                   # PTI: pti_learning_rate (Adam)
    mse_weight: float = 1.0            # PTI: pt_l2_lambda
    perceptual_weight: float = 1.0     # PTI: pt_lpips_lambda (ours: EfficientNet-Lite0 distance)
    identity_weight: float = 0.0       # ours: dlib identity to the photo (needs landmarks); 0 = off
    locality_weight: float = 0.0       # PTI's locality regulariser (0.1 for L2 and LPIPS when enabled); 0 = off
    locality_alpha: float = 30.0       # PTI: regulizer_alpha
    locality_truncation: float = 0.5   # truncation of the sampled w_z (as PTI samples them)
    perceptual: str = "efficientnet-lite0"
    perceptual_kwargs: dict[str, Any] = field(default_factory=dict)
    stop_threshold: float = 0.0        # stop once the perceptual term is below this (PTI: LPIPS 0.06); 0 = never
    seed: int = 0                      # the locality regulariser's latents

    def validate(self) -> None:
        """Raises :class:`~portrait3d.errors.UsageError` (a ``ValueError``) for a setting that cannot be used."""
        if self.steps < 0:
            raise UsageError(f"PTI steps must be >= 0, not {self.steps}")
        for name in ("lr", "mse_weight", "perceptual_weight", "identity_weight", "locality_weight",
                     "locality_alpha", "locality_truncation", "stop_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be a finite non-negative number, not {v!r}")


@dataclass
class PivotalTuningConfig(PTISettings):
    """Settings of :func:`pivotal_tuning`: PTI's (:class:`PTISettings`) and the precision of the tuning renders."""

    precision: str = "fp32"            # "bf16": synthesis and loss networks under bf16 autocast, Adam in float32
    min_resolution: int = 0            # ours: tune only the synthesis blocks of at least this resolution (64: the
                                       # fine layers; the coarse blocks that place the head stay G's); 0 = all (PTI)

    def validate(self) -> None:
        super().validate()
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.min_resolution < 0:
            raise UsageError(f"min_resolution must be >= 0, not {self.min_resolution}")


@dataclass
class PivotalTuningResult:
    """Output of :func:`pivotal_tuning`: the tuned copy of ``G``, one loss dict per step, and the tuned render of the
    pivot ``[1, 3, R, R]`` in ``[-1, 1]``."""

    generator: nn.Module
    losses: list[dict[str, Any]]
    image: torch.Tensor
    perceptual: str = ""


def tuned_parameters(G: nn.Module, min_resolution: int = 0) -> list[nn.Parameter]:
    """The synthesis parameters pivotal tuning moves: every one (``min_resolution`` 0, PTI), or those of the blocks
    ``b{res}`` with ``res >= min_resolution``. Raises :class:`UsageError` when that leaves none."""
    syn = G.synthesis
    if min_resolution <= 0:
        params = list(syn.parameters())
    else:
        params = [p for res in syn.block_resolutions if res >= min_resolution
                  for p in getattr(syn, f"b{res}").parameters()]
    if not params:
        raise UsageError(f"no synthesis block of resolution >= {min_resolution} "
                         f"(blocks: {', '.join(map(str, syn.block_resolutions))})")
    return params


def locality_latent(w_pivot: torch.Tensor, w_z: torch.Tensor, alpha: float) -> torch.Tensor:
    """PTI's eq. 4: ``w_r = w_p + alpha (w_z - w_p) / ||w_z - w_p||_2``, a code at distance ``alpha`` from the pivot
    towards a sampled ``w_z``; the norm is over each sample's whole code (all layers, as PTI's code computes it).
    Shapes ``[N, ...]``."""
    d = w_z - w_pivot
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-8).reshape([-1] + [1] * (d.ndim - 1))
    return w_pivot + alpha * d / norm


def sample_locality_code(G: nn.Module, w_pivot: torch.Tensor, cfg: PTISettings, generator: torch.Generator,
                         c: torch.Tensor | None = None) -> torch.Tensor:
    """One code of PTI's locality regulariser: ``z ~ N(0, I)`` from ``generator`` (a CPU generator, so the same
    codes on every device), ``w_z = f(z)`` at ``cfg.locality_truncation`` (label ``c`` for a conditional mapping),
    then :func:`locality_latent` at ``cfg.locality_alpha`` from the pivot ``[1, num_ws, w_dim]``. No gradients."""
    z = torch.randn([1, int(G.z_dim)], generator=generator).to(w_pivot.device)
    with torch.no_grad():
        w_z = G.mapping(z, c, truncation_psi=cfg.locality_truncation)  # [1, num_ws, w_dim]
        return locality_latent(w_pivot, w_z, cfg.locality_alpha)


def locality_distance(out: torch.Tensor, ref: torch.Tensor, percept: nn.Module | None,
                      amp: Callable[[], Any] | None = None) -> torch.Tensor:
    """PTI's locality regulariser for one code (eq. 5): ``L2(out, ref) + L_percep(out, ref)`` between the tuned and
    the original generator's renders ``[N, 3, R, R]`` (the perceptual part only with a ``percept`` module; under
    ``amp()`` when given)."""
    loc = (out - ref).square().mean()
    if percept is not None:
        with amp() if amp is not None else contextlib.nullcontext():
            loc = loc + percept(out, ref).float().mean()
    return loc


def pivotal_tuning(G: nn.Module, ws: torch.Tensor, target: torch.Tensor,
                   cfg: PivotalTuningConfig | None = None, landmarks: Any = None, progress: bool = True,
                   callback: Callable[..., Any] | None = None, *, perceptual_loss: nn.Module | None = None,
                   identity_loss: nn.Module | None = None) -> PivotalTuningResult:
    """Fine-tune a copy of ``G.synthesis`` so that it renders ``target`` at the pivot ``ws`` (PTI, eq. 3 / 6).

    Args:
        G: a StyleGAN2 :class:`~portrait3d.networks.stylegan2.Generator` (not modified).
        ws: ``[1, num_ws, w_dim]`` the pivot (a W projection repeated over the layers, or a W+ code).
        target: ``[1, 3, H, H]`` (or ``[3, H, H]``) in ``[-1, 1]``; resized to ``G.img_resolution``.
        cfg: :class:`PivotalTuningConfig` (PTI's defaults if ``None``).
        landmarks: ``[68, 2]`` landmarks of ``target`` in its own pixels, for the identity term.
        progress: tqdm bar.
        callback: ``callback(step, record, image)`` after every step; returning ``True`` stops early.
        perceptual_loss / identity_loss: ready-made loss modules to use instead of building them from ``cfg``.

    Returns:
        :class:`PivotalTuningResult` with the tuned deep copy (eval mode, no gradients).
    """
    cfg = cfg or PivotalTuningConfig()
    cfg.validate()
    dev = device_of(G)
    res = int(G.img_resolution)
    target = as_target_image(target)
    src_size = int(target.shape[2])
    target_r = resize_target(target.to(dev, torch.float32), res).detach()
    ws = ws.detach().to(dev, torch.float32)
    if ws.ndim != 3 or ws.shape[0] != 1 or ws.shape[1] != int(G.num_ws):
        raise UsageError(f"the pivot must be [1, {int(G.num_ws)}, {int(G.w_dim)}], not {list(ws.shape)}")

    percept, ident, target_feats = image_loss_modules(cfg, target_r, src_size, landmarks, perceptual_loss, identity_loss)
    for module in (percept, ident):
        if module is not None:
            module.requires_grad_(False)  # only the synthesis network's weights collect gradients

    G_t = copy.deepcopy(G).eval().requires_grad_(False)
    params = tuned_parameters(G_t, cfg.min_resolution)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def amp() -> Any:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    history: list[dict[str, Any]] = []
    bar = None
    if progress and cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pivotal tuning", unit="step", leave=False)
    try:
        for step in range(cfg.steps):
            with amp():
                img = G_t.synthesis(ws, noise_mode="const").float()
            loss, terms = image_loss_terms(img, target_r, cfg, percept, ident, target_feats, amp)
            record: dict[str, Any] = {"step": step, **terms}
            if cfg.locality_weight > 0:
                w_r = sample_locality_code(G, ws, cfg, gen)
                with torch.no_grad(), amp():
                    ref = G.synthesis(w_r, noise_mode="const").float()
                with amp():
                    out = G_t.synthesis(w_r, noise_mode="const").float()
                loc = locality_distance(out, ref, percept, amp)
                loss = loss + cfg.locality_weight * loc
                record["locality"] = float(loc.detach())
            record["loss"] = finite_loss(loss, "pivotal tuning", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "mse", "perceptual")},
                                refresh=False)
            if callback is not None and callback(step, record, img.detach()):
                break
            if cfg.stop_threshold > 0 and record.get("perceptual", math.inf) < cfg.stop_threshold:
                break
    finally:
        if bar is not None:
            bar.close()
    G_t.requires_grad_(False)
    for p in params:
        p.grad = None
    with torch.no_grad():
        image = G_t.synthesis(ws, noise_mode="const")
    return PivotalTuningResult(generator=G_t, losses=history, image=image,
                               perceptual=getattr(percept, "description", "") if percept else "")

"""Pseudo pairs ``{(w_ps, pi_ps), x_ps = G(w_ps, pi_ps)}`` for pre-training E and P.

Ko et al. 2023, main paper Sec. 3, "Latent Encoder E and Pose Estimator P".

The 3D generator renders an unlimited supply of images whose latent and camera are known:

* ``z ~ N(0, I)``; the camera ``pi`` is drawn per sample (below); ``ws = G.mapping(z, pi, psi)``, with one
  ``psi`` for all pairs or, given ``truncation_psi_max``, one per pair uniform in ``[psi, psi_max]`` (a wider
  spread of latents than one truncation, nearer to where real photos invert):
  EG3D's mapping network is **camera-conditioned**, and the pair is conditioned on its own
  rendering camera (the way EG3D renders its samples), so ``w`` carries a little pose information --
  the encoder learns exactly the latent that produced the image;
* ``x = G.synthesis(ws, pi, noise_mode='const', deterministic=True)``: constant noise maps and
  mid-bin (not jittered) ray samples, so a pair is a function of ``(z, pi)`` alone;
* cameras: yaw / pitch / roll in degrees with the convention of
  :func:`portrait3d.networks.eg3d.camera.camera_from_angles` (radius 2.7 around the origin, looking
  at ``pivot``), drawn either **uniformly** in ``[lo, hi]`` or from a **Gaussian** centred in the
  range with ``std = (hi - lo) / 4`` clipped to ``[lo, hi]`` (so the range is +-2 std; the Gaussian
  follows a dataset's concentration of near-frontal faces). The defaults (yaw +-30, pitch +-20) are a
  typical frontal-portrait range; set the ranges to the pose range the generator was trained on
  (outside it EG3D's renders degrade). Roll is off by default (range ``(0, 0)``).
  An optional camera-position offset ``t ~ N(0, translation_std^2)`` per axis (world units) is
  added to the camera position (:func:`.networks.camera_from_pose`): it teaches the pose
  estimator's offset head about slightly mis-centred crops.

Everything random comes from a caller-provided CPU ``torch.Generator`` (or, for
:class:`PseudoPairStream`, from a generator seeded by ``(seed, batch index)``), so pairs are
reproducible on any device and the stream can restart at any batch without replaying earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.methods.inversion3d.networks import camera_from_pose, generator_w_avg
from portrait3d.networks.ops import gaussian_blur
from portrait3d.training.randomness import derive_seed

__all__ = ["DISTRIBUTIONS", "PseudoPairConfig", "sample_poses", "sample_pseudo_pairs", "IndexedStream",
           "PseudoPairStream", "photometric_jitter"]

DISTRIBUTIONS = ("uniform", "gaussian")
_STREAM_KEY = 0x1E3D  # seed key of PseudoPairStream batches


@dataclass
class PseudoPairConfig(ConfigMixin):
    """How pseudo pairs are drawn (see the module docstring)."""

    yaw_range: tuple[float, float] = (-30.0, 30.0)      # degrees; positive: head turned to its left
    pitch_range: tuple[float, float] = (-20.0, 20.0)    # degrees; positive: head tilted up
    roll_range: tuple[float, float] = (0.0, 0.0)        # degrees; (0, 0): no roll
    distribution: str = "uniform"                       # "uniform" | "gaussian" (clipped, range = +-2 std)
    translation_std: float = 0.0                        # std of the camera-position offset, world units
    truncation_psi: float = 0.7
    truncation_psi_max: float | None = None             # set: psi per pair uniform in [truncation_psi, this]
    seed: int = 0
    radius: float = 2.7
    fov_deg: float = 18.837
    pivot: tuple[float, float, float] = (0.0, 0.0, 0.2)

    def validate(self) -> None:
        for name in ("yaw_range", "pitch_range", "roll_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, not {(lo, hi)}")
        if max(abs(v) for v in self.pitch_range) >= 90:
            raise ValueError("pitch_range must lie strictly between -90 and 90 degrees")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, not {self.distribution!r}")
        if self.translation_std < 0:
            raise ValueError("translation_std must be >= 0")
        if len(self.pivot) != 3:
            raise ValueError("pivot must be a 3-vector")
        if self.truncation_psi_max is not None and self.truncation_psi_max < self.truncation_psi:
            raise ValueError("truncation_psi_max must be >= truncation_psi")

    @property
    def has_roll(self) -> bool:
        return tuple(self.roll_range) != (0.0, 0.0)


def _draw(n: int, lo: float, hi: float, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` float32 values in ``[lo, hi]`` (uniform, or clipped Gaussian with std ``(hi - lo) / 4``)."""
    if distribution == "uniform":
        return lo + (hi - lo) * torch.rand(n, generator=generator)
    mid, std = (lo + hi) / 2, (hi - lo) / 4
    return (mid + std * torch.randn(n, generator=generator)).clamp(lo, hi)


def sample_poses(n: int, cfg: PseudoPairConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` poses on the CPU: ``(angles [n, 3] degrees (yaw, pitch, roll), translation [n, 3])``.

    Draw order (fixed, part of the reproducibility contract): yaw, pitch, roll, translation; a zero
    roll range or a zero ``translation_std`` draws nothing.
    """
    cfg.validate()
    yaw = _draw(n, *cfg.yaw_range, cfg.distribution, generator)
    pitch = _draw(n, *cfg.pitch_range, cfg.distribution, generator)
    roll = _draw(n, *cfg.roll_range, cfg.distribution, generator) if cfg.has_roll else torch.zeros(n)
    if cfg.translation_std > 0:
        translation = cfg.translation_std * torch.randn(n, 3, generator=generator)
    else:
        translation = torch.zeros(n, 3)
    return torch.stack([yaw, pitch, roll], dim=1), translation


@torch.no_grad()
def sample_pseudo_pairs(G: nn.Module, n: int, cfg: PseudoPairConfig,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Render ``n`` pseudo pairs with the EG3D generator ``G`` (on ``G``'s device).

    Args:
        G: :class:`~portrait3d.networks.eg3d.triplane.TriPlaneGenerator` (left in its mode; use ``eval()``).
        n: number of pairs.
        cfg: :class:`PseudoPairConfig`.
        generator: CPU generator for ``z`` and the cameras (default: one seeded with ``cfg.seed``).

    Returns:
        ``ws [n, num_ws, w_dim]``, ``z [n, z_dim]``, ``camera [n, 25]`` (rendering = conditioning
        camera), ``angles [n, 3]`` (yaw, pitch, roll in degrees), ``translation [n, 3]`` (camera
        offset), ``image [n, 3, R, R]`` in ``[-1, 1]``, ``depth [n, 1, r, r]`` (neural-rendering
        resolution).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    device = next(G.parameters()).device
    z = torch.randn(n, G.z_dim, generator=generator)
    angles, translation = sample_poses(n, cfg, generator)
    cam = camera_from_pose(angles if cfg.has_roll else angles[:, :2], translation if cfg.translation_std > 0 else None,
                           radius=cfg.radius, fov_deg=cfg.fov_deg, pivot=cfg.pivot)
    z, cam = z.to(device), cam.to(device)
    if cfg.truncation_psi_max is None:
        ws = G.mapping(z, cam, truncation_psi=cfg.truncation_psi)
    else:  # drawn last, so the other draws match a fixed-psi stream of the same seed
        psi = _draw(n, cfg.truncation_psi, cfg.truncation_psi_max, "uniform", generator).to(device)
        ws = G.mapping(z, cam, truncation_psi=1)
        w_avg = generator_w_avg(G).to(ws)
        ws = w_avg + psi.to(ws.dtype)[:, None, None] * (ws - w_avg)
    out = G.synthesis(ws, cam, noise_mode="const", deterministic=True)
    return {"ws": ws, "z": z, "camera": cam, "angles": angles.to(device), "translation": translation.to(device),
            "image": out["image"], "depth": out["image_depth"]}


class IndexedStream:
    """An endless iterator over ``batch_at(index)`` for ``index = start, start + 1, ...`` (subclasses define
    ``batch_at`` and set ``index``); a batch that depends only on its index makes a resumed run bit-exact."""

    index: int

    def batch_at(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self.batch_at(self.index)
        self.index += 1
        return out


class PseudoPairStream(IndexedStream):
    """Endless iterable of pseudo-pair batches rendered on the fly (nothing is written to disk).

    Batch ``k`` is ``sample_pseudo_pairs(G, batch, cfg, Generator().manual_seed(derive_seed(cfg.seed, KEY, k)))``:
    it depends only on ``(cfg, k)``, so two streams with the same seed yield the same batches, and a
    stream started at ``start`` (a resumed run) yields exactly what an uninterrupted one would.

    Args:
        G: the EG3D generator (eval mode).
        batch: pairs per batch.
        cfg: :class:`PseudoPairConfig`.
        start: index of the first batch.
        key: extra seed key, to derive independent streams from one seed (e.g. evaluation vs training).
    """

    def __init__(self, G: nn.Module, batch: int, cfg: PseudoPairConfig, start: int = 0, key: int = 0) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        cfg.validate()
        self.G, self.batch, self.cfg, self.key = G, batch, cfg, key
        self.index = start

    def batch_at(self, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` (see :func:`sample_pseudo_pairs` for its keys)."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, _STREAM_KEY, self.key, index))
        return sample_pseudo_pairs(self.G, self.batch, self.cfg, g)


def photometric_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random per-image photometric changes that leave the camera untouched (ours, for the pose estimator).

    Renders of a CPU-trained generator are smoother and more uniformly lit than the real photos P meets,
    so P trained on them alone learns cues that do not transfer. Each image gets, scaled by ``strength``
    (1: the ranges below):

    * brightness ``x + b``, ``b ~ U(-0.2, 0.2)``; contrast ``m + c (x - m)`` around the image mean,
      ``log c ~ U(-0.35, 0.35)``; saturation ``g + s (x - g)`` around the grey value, ``log s ~ U(-0.6, 0.6)``;
    * blur or sharpen ``x + a (x - blur_1(x))`` with a Gaussian of sigma 1 px over 5 taps, ``a ~ U(-1, 1.5)``
      (``a = -1``: blurred, ``a > 0``: unsharp-masked);
    * pixel noise ``N(0, n^2)``, ``n ~ U(0, 0.04)``; the result is clipped to ``[-1, 1]``.

    Args:
        image: ``[N, 3, H, W]`` in ``[-1, 1]``.
        strength: 0 returns ``image`` unchanged.
        generator: CPU generator for every draw (draw order fixed), so a run stays reproducible.
    """
    if strength <= 0:
        return image
    n, device, dtype = image.shape[0], image.device, image.dtype

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator)).to(device, dtype)

    b, c, s = strength * u(-0.2, 0.2), torch.exp(strength * u(-0.35, 0.35)), torch.exp(strength * u(-0.6, 0.6))
    a, noise_std = strength * u(-1.0, 1.5), strength * u(0.0, 0.04)
    noise = torch.randn(image.shape, generator=generator).to(device, dtype)
    x = image + b
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + c * (x - mean)
    grey = x.mean(1, keepdim=True)
    x = grey + s * (x - grey)
    x = x + a.clamp(min=-1.0) * (x - gaussian_blur(x, 1.0, radius=2)) + noise_std * noise
    return x.clamp(-1.0, 1.0)

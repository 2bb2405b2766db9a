"""Differentiable augmentation (DiffAugment, Zhao et al. 2020, "Differentiable Augmentation for
Data-Efficient GAN Training") for discriminator inputs.

The same random transformation family is applied to real *and* generated images before the
discriminator; since every operation is differentiable in the pixels, the generator is trained
through it and learns the un-augmented distribution. Policies (comma separated):

* ``color``: brightness ``x + (u - 1/2)``, saturation ``(x - mean_c) * 2u + mean_c`` and contrast
  ``(x - mean) * (u + 1/2) + mean`` with one ``u ~ U[0, 1)`` per image and operation;
* ``translation``: integer shift by up to 1/8 of the image size in each axis, zero fill;
* ``cutout``: one square of half the image size (centre uniform over the image) set to zero.

Randomness comes only from an explicit :class:`torch.Generator`. Parameters are drawn for a whole
*global* batch and the rows of this process are kept (``rows = rank::world``), so a sample is
augmented identically whether the batch runs in one process or is split across DDP ranks::

    params = sample_params("color,translation,cutout", batch=32, size=128, generator=g)
    y = apply(x, params.take(rank, world))          # or: diff_augment(x, policy, g, rank=.., world=..)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["POLICIES", "AugmentParams", "parse_policy", "sample_params", "apply", "diff_augment"]

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"color,translation"`` -> ``("color", "translation")``; ``""`` / ``"none"`` -> ``()``."""
    parts = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    bad = [p for p in parts if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown DiffAugment policy {', '.join(bad)!r} (known: {', '.join(POLICIES)})")
    return parts


@dataclass
class AugmentParams:
    """Per-image parameters of one augmentation draw; ``None`` for operations not in the policy.

    ``brightness``, ``saturation``, ``contrast``: ``float [N]`` uniforms in ``[0, 1)``;
    ``shift``: ``int64 [N, 2]`` (rows, columns) in pixels; ``cutout``: ``int64 [N, 2]`` square
    centres (rows, columns); ``size``: the image size the integers refer to.
    """

    size: int
    brightness: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    cutout: torch.Tensor | None = None

    def take(self, rank: int, world: int) -> "AugmentParams":
        """The rows ``rank::world`` (this process's share of a global batch)."""
        if world == 1:
            return self
        vals = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "size"}
        return replace(self, **{k: (v[rank::world] if v is not None else None) for k, v in vals.items()})


def sample_params(policy: str, batch: int, size: int, generator: torch.Generator,
                  device: torch.device | str | None = None) -> AugmentParams:
    """Draw parameters for ``batch`` images of ``size`` x ``size`` pixels from ``generator``.

    The draw order is fixed (brightness, saturation, contrast, shift, cutout), each op draws only
    when it is in the policy, so the same generator state gives the same parameters.
    """
    ops = parse_policy(policy)
    dev = generator.device
    out = AugmentParams(size=size)

    def uniform() -> torch.Tensor:
        return torch.rand([batch], generator=generator, device=dev)

    if "color" in ops:
        out.brightness, out.saturation, out.contrast = uniform(), uniform(), uniform()
    if "translation" in ops:
        s = int(size * TRANSLATION_RATIO + 0.5)
        out.shift = torch.randint(-s, s + 1, [batch, 2], generator=generator, device=dev)
    if "cutout" in ops:
        c = int(size * CUTOUT_RATIO + 0.5)
        out.cutout = torch.randint(0, size + (1 - c % 2), [batch, 2], generator=generator, device=dev)
    if device is not None:
        out = replace(out, **{f.name: getattr(out, f.name).to(device) for f in fields(out)
                              if f.name != "size" and getattr(out, f.name) is not None})
    return out


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[n, :, i, j] = x[n, :, i + dy_n, j + dx_n]``, zero outside (a differentiable gather)."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None] + shift[:, :1]  # [N, H]
    cols = torch.arange(w, device=x.device)[None] + shift[:, 1:]  # [N, W]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    x = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    x = x.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    return x * valid[:, None].to(x.dtype)


def _cutout(x: torch.Tensor, centre: torch.Tensor, size: int) -> torch.Tensor:
    n, _, h, w = x.shape
    c = int(size * CUTOUT_RATIO + 0.5)
    lo = centre - c // 2  # [N, 2]
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    in_rows = (rows >= lo[:, :1]) & (rows < lo[:, :1] + c)
    in_cols = (cols >= lo[:, 1:]) & (cols < lo[:, 1:] + c)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def apply(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment ``x [N, C, S, S]`` (``S = params.size``) with ``params`` (``N`` rows). Differentiable in ``x``."""
    if x.shape[-1] != params.size or x.shape[-2] != params.size:
        raise ValueError(f"parameters were drawn for {params.size} px images, got {list(x.shape)}")
    p = params
    if p.brightness is not None:
        x = x + (p.brightness.to(x.dtype) - 0.5).view(-1, 1, 1, 1)
    if p.saturation is not None:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (p.saturation.to(x.dtype) * 2).view(-1, 1, 1, 1) + mean
    if p.contrast is not None:
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - mean) * (p.contrast.to(x.dtype) + 0.5).view(-1, 1, 1, 1) + mean
    if p.shift is not None:
        x = _shift(x, p.shift)
    if p.cutout is not None:
        x = _cutout(x, p.cutout, p.size)
    return x.contiguous()


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator, *, rank: int = 0,
                 world: int = 1) -> torch.Tensor:
    """Augment this process's rows ``x [N, C, S, S]`` of a global batch of ``N * world`` images.

    Args:
        x: the local images (rows ``rank::world`` of the global batch).
        policy: comma-separated subset of :data:`POLICIES` (``""`` = identity).
        generator: source of all randomness (the same state on every rank).
        rank, world: which rows of the global draw belong to ``x``.
    """
    if not parse_policy(policy):
        return x
    params = sample_params(policy, x.shape[0] * world, x.shape[-1], generator, device=x.device)
    return apply(x, params.take(rank, world))

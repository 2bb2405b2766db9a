"""The lifting networks of LiftedGAN: Shi, Aggarwal and Jain, "Lifting 2D StyleGAN for 3D-Aware Face
Generation" (CVPR 2021), Sec. 3.1.

A frozen 2D StyleGAN2 ``G2D`` is "lifted" to a 3D-aware generator by five small networks that all
read the generator's latent ``w`` (W space):

* :class:`ViewNet` ``D_V: w -> V`` -- the viewpoint of ``G2D(w)``: rotation (pitch, yaw, roll) and
  translation (x, y, z), each a scaled ``tanh``;
* :class:`LightNet` ``D_L: w -> L`` -- the Lambertian light of ``G2D(w)``: ambient and diffuse
  strengths in ``[0, 1]`` and the light direction ``(dx, dy, 1) / |(dx, dy, 1)|`` with
  ``dx, dy in [-1, 1]`` (the parameterisation of Unsup3d, Wu et al. CVPR 2020);
* :class:`StyleManipulator` ``M: (w, L, V) -> w_{L,V}`` -- the code of the same face seen from
  viewpoint ``V`` under light ``L``. ``w0 = M(w, L0, V0)`` is the *canonical* code: frontal view
  ``V0 = 0`` and neutral light ``L0`` (the predicted ambient and diffuse strengths with a frontal
  direction ``dx = dy = 0``), so ``G2D(w0)`` is the canonical image;
* :class:`DepthDecoder` ``D_S: w0 -> S`` -- the canonical depth map;
* :class:`TransformDecoder` ``D_T: w0 -> T`` -- the transformation map of eq. 1 (see below).

The canonical image is de-lit into the albedo ``A = G2D(w0) / shading(S, L0)`` (Lambertian model;
:func:`albedo_from_image`), and the face is re-rendered at the predicted view and light by the
differentiable renderer of :mod:`portrait3d.geometry.render` (imported lazily, see
:class:`LiftedGenerator`), which is what the losses of :mod:`.losses` (Sec. 3.2) compare to
``G2D(w)``.

Ranges (documented choices; the paper's networks end with scaled ``tanh``):

=====================  ==============================  ===============================================
quantity               range                           source
=====================  ==============================  ===============================================
rotation x, y, z       ``±60°`` each (radians out)     authors' release (``xyz_rotation_range = 60``)
translation x, y       ``±0.1`` (renderer 3D units)    authors' release (``xy_translation_range``)
translation z          ``±0.01``                       authors' release (``z_translation_range``)
ambient, diffuse       ``[0, 1]`` (``tanh / 2 + 0.5``) Unsup3d / authors' release
light dx, dy           ``[-1, 1]`` (``tanh``)          Unsup3d / authors' release
depth                  ``[0.9, 1.1]``, border 1.05     authors' release (``min/max/border_depth``)
=====================  ==============================  ===============================================

View layout ``[N, 6]``: ``(rx, ry, rz, tx, ty, tz)`` -- rotations in **radians** about the x
(pitch), y (yaw) and z (roll) axes, translations in the renderer's 3D units. Light layout
``[N, 4]``: ``(ambient, diffuse, dx, dy)``.

Transformation map (eq. 1)
--------------------------
The depth map is a mesh over the image grid; rendering it at a new view moves every vertex.
Background and hair are not a rigid surface, so LiftedGAN blends each vertex between its moved
and its canonical position with a per-pixel map ``T``::

    v' = T * (R v + t) + (1 - T) * v                                             (eq. 1)

and fixes ``T = 0`` on the image border so the image frame never moves. With
``transform_channels = 1`` (default, the paper's scalar map) :class:`TransformDecoder` outputs
``T in [0, 1]`` (``sigmoid(x + 5)``, i.e. ~1 at initialisation; 1 on the face, where the depth is
in front of the border depth, then Gaussian-blurred, as in the authors' release), multiplied by a
border mask, and the renderer gets it as ``transform_map=``. With ``transform_channels = 3`` (an
alternative, not the paper's) it outputs a bounded camera-space offset field
``transform_max_offset * tanh(.)`` added to the canonical points (the renderer's ``flow=``), also
multiplied by the border mask. The border of the map is exactly 0 in both modes.

The style manipulator acts in W
-------------------------------
``M`` predicts one residual ``delta = MLP([w, L, V / range]) in R^{w_dim}`` (last layer
zero-initialised, so ``w0 = w`` at the start of training) and adds it to *every* one of the
``num_ws`` layers of the 2D generator's W+ code: for a plain W code (all layers equal) this is
exactly ``w0 = w + delta``; for a W+ input (e.g. truncation with a cutoff) the per-layer
differences are kept and the networks read the layer mean.

Saving
------
:meth:`LiftedGenerator.save` writes only the lifting networks (one ``.safetensors`` file, the
:class:`LiftConfig`, the renderer config and a reference to the 2D generator -- a name or path
that :func:`portrait3d.checkpoints.load_network` resolves -- in its JSON metadata);
:meth:`LiftedGenerator.load` reads it back (never executes code).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.checkpoints.safe_pickle import CheckpointError
from portrait3d.config import ConfigMixin
from portrait3d.networks.ops import gaussian_blur

__all__ = [
    "LIFT_FORMAT",
    "LiftConfig",
    "ViewNet",
    "LightNet",
    "StyleManipulator",
    "DepthDecoder",
    "TransformDecoder",
    "LiftOutput",
    "RenderedView",
    "LiftedGenerator",
    "albedo_from_image",
    "border_mask",
    "gaussian_blur",
    "light_to_direction",
    "canonical_light",
    "resize_images",
]

LIFT_FORMAT = "portrait3d-lifting"
LIFT_FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass
class LiftConfig(ConfigMixin):
    """Everything that defines the lifting networks (saved as JSON beside the weights).

    Attributes:
        w_dim: latent size of the 2D generator's W space.
        image_size: resolution ``S`` of the 3D outputs (depth, albedo, transformation map, renders);
            ``G2D``'s images are resized to it. A power of two >= 8 (64 or 128 in practice).
        mlp_dim, mlp_layers: width and depth (linear layers) of the D_V / D_L / M MLPs (paper's
            release: 512 and 4).
        decoder_mlp_dim, decoder_mlp_layers: the MLP that maps ``w0`` to the 1x1 seed of the
            D_S / D_T deconvolution decoders.
        decoder_channel_base, decoder_channel_max, decoder_channel_min: decoder width at
            resolution ``r`` is ``clamp(decoder_channel_base // r, min, max)``.
        rotation_range_deg: ``|rx|, |ry|, |rz| <= rotation_range_deg`` (degrees).
        xy_translation_range, z_translation_range: ``|tx|, |ty| <= xy``, ``|tz| <= z``.
        min_depth, max_depth: canonical depth range (``tanh`` of the mean-subtracted decoder output
            rescaled to it).
        border_depth: depth the image border is clamped to (the background plane).
        border_width: width in pixels of the border where the depth is clamped and ``T = 0``.
        transform_channels: 1 = scalar blend map of eq. 1 (renderer ``transform_map=``);
            3 = bounded camera-space offset field (renderer ``flow=``).
        transform_max_offset: bound of the offset field (3 channels only).
        transform_blur_sigma: Gaussian blur (pixels at ``image_size``) of the scalar map; 0 = none.
        min_shading: the shading is clamped to ``>= min_shading`` before de-lighting (albedo).
    """

    w_dim: int = 512
    image_size: int = 64
    mlp_dim: int = 512
    mlp_layers: int = 4
    decoder_mlp_dim: int = 256
    decoder_mlp_layers: int = 2
    decoder_channel_base: int = 4096
    decoder_channel_max: int = 256
    decoder_channel_min: int = 16
    rotation_range_deg: float = 60.0
    xy_translation_range: float = 0.1
    z_translation_range: float = 0.01
    min_depth: float = 0.9
    max_depth: float = 1.1
    border_depth: float = 1.05
    border_width: int = 2
    transform_channels: int = 1
    transform_max_offset: float = 0.1
    transform_blur_sigma: float = 1.0
    min_shading: float = 1e-2

    def __post_init__(self) -> None:
        s = int(self.image_size)
        if s < 8 or s & (s - 1):
            raise ValueError(f"image_size must be a power of two >= 8, not {self.image_size}")
        if self.w_dim < 1 or self.mlp_dim < 1 or self.decoder_mlp_dim < 1:
            raise ValueError("w_dim, mlp_dim and decoder_mlp_dim must be positive")
        if self.mlp_layers < 1 or self.decoder_mlp_layers < 0:
            raise ValueError("mlp_layers must be >= 1 and decoder_mlp_layers >= 0")
        if not 1 <= self.decoder_channel_min <= self.decoder_channel_max:
            raise ValueError("need 1 <= decoder_channel_min <= decoder_channel_max")
        if not self.min_depth < self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be < max_depth ({self.max_depth})")
        if self.transform_channels not in (1, 3):
            raise ValueError(f"transform_channels must be 1 (blend map) or 3 (offset field), "
                             f"not {self.transform_channels}")
        if not 0 <= self.border_width < s // 2:
            raise ValueError(f"border_width must be in [0, image_size/2), not {self.border_width}")
        if self.rotation_range_deg <= 0 or self.xy_translation_range < 0 or self.z_translation_range < 0:
            raise ValueError("rotation range must be positive and translation ranges non-negative")
        if self.min_shading <= 0:
            raise ValueError("min_shading must be positive")

    @property
    def view_ranges(self) -> torch.Tensor:
        """``[6]`` half-widths of the view parameters (radians, 3D units)."""
        r = math.radians(self.rotation_range_deg)
        t, z = self.xy_translation_range, self.z_translation_range
        return torch.tensor([r, r, r, t, t, z])


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _mlp(cin: int, cout: int, dim: int, layers: int) -> nn.Sequential:
    """``layers`` linear layers ``cin -> dim -> ... -> cout`` with LeakyReLU(0.2) between them."""
    mods: list[nn.Module] = []
    for i in range(layers - 1):
        mods += [nn.Linear(cin if i == 0 else dim, dim), nn.LeakyReLU(0.2)]
    mods.append(nn.Linear(cin if layers == 1 else dim, cout))
    return nn.Sequential(*mods)


def _groups(c: int) -> int:
    """GroupNorm groups of 4 channels when possible."""
    return c // 4 if c % 4 == 0 and c >= 4 else 1


def border_mask(size: int, width: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[1, 1, size, size]``: 1 in the ``width``-pixel frame of the image, 0 inside (eq. 1)."""
    m = torch.ones(1, 1, size, size, device=device, dtype=dtype)
    if width > 0:
        m[..., width:size - width, width:size - width] = 0
    else:
        m.zero_()
    return m


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, size, size]`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=min(images.shape[-2:]) > size)


def light_to_direction(light: torch.Tensor) -> torch.Tensor:
    """Unit light direction ``[N, 3]`` from the light ``[N, 4]`` = (ambient, diffuse, dx, dy):
    ``(dx, dy, 1) / |(dx, dy, 1)|`` (Unsup3d's parameterisation)."""
    d = torch.cat([light[:, 2:4], torch.ones_like(light[:, :1])], dim=1)
    return d / d.norm(dim=1, keepdim=True)


def canonical_light(light: torch.Tensor) -> torch.Tensor:
    """The neutral light ``L0 [N, 4]`` of a predicted light: same ambient and diffuse strengths,
    frontal direction (``dx = dy = 0``) -- the light of the canonical image ``G2D(w0)``."""
    return torch.cat([light[:, :2], torch.zeros_like(light[:, 2:4])], dim=1)


def albedo_from_image(image: torch.Tensor, shading: torch.Tensor, min_shading: float = 1e-2) -> torch.Tensor:
    """De-light an image under the Lambertian model ``I = A * s`` (Sec. 3.1, the albedo
    ``A = G2D(w0) / shading(S, L0)`` of the canonical image under the neutral light ``L0``).

    Args:
        image: ``[N, 3, H, W]`` in ``[-1, 1]``.
        shading: ``[N, 1, H, W]`` (or ``[N, 3, H, W]``) Lambertian shading ``a + b max(0, n.l)``.
        min_shading: the shading is clamped from below before dividing.

    Returns:
        ``[N, 3, H, W]`` albedo in the image range (``2 (I01 / s) - 1``; may exceed 1 where the
        shading is < 1, which is what lets the re-lit render reproduce the image).
    """
    return ((image + 1) * 0.5 / shading.clamp(min=min_shading)) * 2 - 1


def _normals_nchw(normal: torch.Tensor) -> torch.Tensor:
    """Normals ``[N, 3, H, W]`` from either ``[N, 3, H, W]`` or ``[N, H, W, 3]``."""
    if normal.ndim == 4 and normal.shape[1] != 3 and normal.shape[-1] == 3:
        return normal.permute(0, 3, 1, 2)
    return normal


# ----------------------------------------------------------------------------------------------
# D_V, D_L, M
# ----------------------------------------------------------------------------------------------

class ViewNet(nn.Module):
    """D_V (Sec. 3.1): ``w [N, w_dim] -> view [N, 6]`` = (rx, ry, rz) radians, (tx, ty, tz).

    Each output is ``range * tanh(.)`` with the ranges of :attr:`LiftConfig.view_ranges`.
    """

    def __init__(self, cfg: LiftConfig) -> None:
        super().__init__()
        self.mlp = _mlp(cfg.w_dim, 6, cfg.mlp_dim, cfg.mlp_layers)
        self.register_buffer("ranges", cfg.view_ranges, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mlp(w)) * self.ranges.to(w)

    def normalize(self, view: torch.Tensor) -> torch.Tensor:
        """Physical view ``[N, 6]`` -> ``[-1, 1]`` units (divide by the ranges)."""
        return view / self.ranges.to(view).clamp(min=1e-12)


class LightNet(nn.Module):
    """D_L (Sec. 3.1): ``w [N, w_dim] -> light [N, 4]`` = (ambient, diffuse, dx, dy).

    ``ambient = tanh / 2 + 0.5``, ``diffuse = tanh / 2 + 0.5`` (both in ``[0, 1]``) and
    ``dx, dy = tanh`` (``[-1, 1]``), as in Unsup3d; see :func:`light_to_direction`.
    """

    def __init__(self, cfg: LiftConfig) -> None:
        super().__init__()
        self.mlp = _mlp(cfg.w_dim, 4, cfg.mlp_dim, cfg.mlp_layers)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.from_raw(torch.tanh(self.mlp(w)))

    @staticmethod
    def from_raw(raw: torch.Tensor) -> torch.Tensor:
        """``tanh`` outputs ``[N, 4]`` in ``[-1, 1]`` -> light (ambient, diffuse, dx, dy)."""
        return torch.cat([raw[:, :2] * 0.5 + 0.5, raw[:, 2:4]], dim=1)

    @staticmethod
    def to_raw(light: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`from_raw` (every component back in ``[-1, 1]``)."""
        return torch.cat([light[:, :2] * 2 - 1, light[:, 2:4]], dim=1)


class StyleManipulator(nn.Module):
    """M (Sec. 3.1): ``(w [N, w_dim], light [N, 4], view [N, 6]) -> w_{L,V} [N, w_dim]``.

    Residual in W: ``w_{L,V} = w + MLP([w, L_raw, V / range])`` with the last layer zero-initialised
    (identity at the start). :meth:`delta` returns the residual alone so the caller can add it to
    every layer of a W+ code (``ws + delta[:, None]``).
    """

    def __init__(self, cfg: LiftConfig) -> None:
        super().__init__()
        self.mlp = _mlp(cfg.w_dim + 4 + 6, cfg.w_dim, cfg.mlp_dim, cfg.mlp_layers)
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.register_buffer("ranges", cfg.view_ranges, persistent=False)

    def delta(self, w: torch.Tensor, light: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Residual ``[N, w_dim]`` for the target light / view (physical units)."""
        v = view / self.ranges.to(view).clamp(min=1e-12)
        return self.mlp(torch.cat([w, LightNet.to_raw(light), v], dim=1))

    def forward(self, w: torch.Tensor, light: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return w + self.delta(w, light, view)


# ----------------------------------------------------------------------------------------------
# D_S, D_T
# ----------------------------------------------------------------------------------------------

class _DeconvDecoder(nn.Module):
    """``w [N, w_dim] -> [N, out_channels, S, S]``: an MLP to a 1x1 seed, a 4x4 transposed
    convolution, then (stride-2 transposed conv -> GN -> ReLU -> 3x3 conv -> GN -> ReLU) per doubling
    up to ``S``, and a 3x3 output convolution (no activation)."""

    def __init__(self, cfg: LiftConfig, out_channels: int) -> None:
        super().__init__()

        def ch(res: int) -> int:
            return max(cfg.decoder_channel_min, min(cfg.decoder_channel_max, cfg.decoder_channel_base // res))

        z = cfg.decoder_mlp_dim
        self.mlp = (nn.Sequential(*[m for i in range(cfg.decoder_mlp_layers)
                                    for m in (nn.Linear(cfg.w_dim if i == 0 else z, z), nn.LeakyReLU(0.2))])
                    if cfg.decoder_mlp_layers > 0 else nn.Identity())
        seed_dim = z if cfg.decoder_mlp_layers > 0 else cfg.w_dim
        layers: list[nn.Module] = [nn.ConvTranspose2d(seed_dim, ch(4), 4, 1, 0, bias=False), nn.ReLU()]
        res = 4
        while res < cfg.image_size:
            cin, cout = ch(res), ch(res * 2)
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU()]
            res *= 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(ch(cfg.image_size), out_channels, 3, 1, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.mlp(w)
        return self.head(self.body(x[:, :, None, None]))


class DepthDecoder(nn.Module):
    """D_S (Sec. 3.1): ``w0 [N, w_dim] -> depth [N, 1, S, S]`` in ``[min_depth, max_depth]``.

    ``d = tanh(x - mean_xy(x))`` rescaled to the depth range, then the ``border_width`` frame is
    set to ``border_depth`` (the background plane, as the authors' release clamps it).
    """

    def __init__(self, cfg: LiftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = _DeconvDecoder(cfg, 1)
        # Start from the flat plane: a randomly initialised head turns the body's random features into
        # full-range depth noise, which the flip and rotation losses then spend thousands of steps
        # smoothing away (the head's gradients stay non-zero, so learning starts at once).
        nn.init.zeros_(self.decoder.head.weight)
        self.register_buffer("border", border_mask(cfg.image_size, cfg.border_width), persistent=False)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        x = self.decoder(w0)
        d = torch.tanh(x - x.mean(dim=(2, 3), keepdim=True))
        d = (d + 1) * 0.5 * (self.cfg.max_depth - self.cfg.min_depth) + self.cfg.min_depth
        b = self.border.to(d)
        return d * (1 - b) + b * self.cfg.border_depth


class TransformDecoder(nn.Module):
    """D_T (Sec. 3.1, eq. 1): ``w0 [N, w_dim] (, depth [N, 1, S, S]) -> T [N, C, S, S]``, border = 0.

    ``C = 1``: ``T = sigmoid(x + 5)`` in ``[0, 1]``, forced to 1 where ``depth`` is in front of the
    background (``depth <= border_depth - 0.01``, when a depth is given), blurred, then multiplied
    by ``1 - border``. ``C = 3``: ``T = transform_max_offset * tanh(x) * (1 - border)``.
    """

    def __init__(self, cfg: LiftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = _DeconvDecoder(cfg, cfg.transform_channels)
        self.register_buffer("border", border_mask(cfg.image_size, cfg.border_width), persistent=False)

    def forward(self, w0: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        x = self.decoder(w0)
        keep = 1 - self.border.to(x)
        if self.cfg.transform_channels > 1:
            return self.cfg.transform_max_offset * torch.tanh(x) * keep
        t = torch.sigmoid(x + 5)
        if depth is not None:
            d = depth if depth.ndim == 4 else depth[:, None]
            face = (d <= self.cfg.border_depth - 0.01).to(t)
            t = face + (1 - face) * t
        t = gaussian_blur(t, self.cfg.transform_blur_sigma)
        return t * keep


# ----------------------------------------------------------------------------------------------
# The lifted generator
# ----------------------------------------------------------------------------------------------

class RenderedView(NamedTuple):
    """A render of the canonical 3D face (all ``S x S``).

    Fields: ``image [N, 3, S, S]`` in ``[-1, 1]``; ``mask [N, 1, S, S]`` (renderer's coverage);
    ``depth`` (renderer's rendered depth, ``[N, 1, S, S]``); ``shading [N, 1, S, S]`` (canonical
    frame); ``normal [N, 3, S, S]`` (canonical normals); ``lit [N, 3, S, S]`` the shaded canonical
    texture that was rendered (``[-1, 1]`` range).
    """

    image: torch.Tensor
    mask: torch.Tensor | None
    depth: torch.Tensor | None
    shading: torch.Tensor
    normal: torch.Tensor
    lit: torch.Tensor


class LiftOutput(NamedTuple):
    """Everything :meth:`LiftedGenerator.forward` predicts (``N`` faces, ``S = image_size``).

    Fields:
        w: ``[N, w_dim]`` input latent (layer mean of ``ws``); ws: ``[N, num_ws, w_dim]``.
        view: ``[N, 6]`` (rx, ry, rz radians, tx, ty, tz) = D_V(w).
        light: ``[N, 4]`` (ambient, diffuse, dx, dy) = D_L(w).
        w0: ``[N, w_dim]`` canonical code M(w, L0, V0); ws0: ``[N, num_ws, w_dim]``.
        canonical_image: ``[N, 3, S, S]`` G2D(w0) resized to S.
        albedo: ``[N, 3, S, S]`` canonical image de-lit under L0.
        depth: ``[N, S, S]`` canonical depth D_S(w0).
        transform: ``[N, C, S, S]`` transformation map D_T(w0), border = 0.
        image: ``[N, 3, S, S]`` re-rendered at (view, light) -- compared to G2D(w).
        mask: ``[N, 1, S, S]`` render coverage (None if the renderer gives none).
        shading: ``[N, 1, S, S]`` canonical-frame shading under ``light``.
        normal: ``[N, 3, S, S]`` canonical normals (facing the camera, renderer's convention).
    """

    w: torch.Tensor
    ws: torch.Tensor
    view: torch.Tensor
    light: torch.Tensor
    w0: torch.Tensor
    ws0: torch.Tensor
    canonical_image: torch.Tensor
    albedo: torch.Tensor
    depth: torch.Tensor
    transform: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor | None
    shading: torch.Tensor
    normal: torch.Tensor


def _load_renderer() -> Any:
    """The renderer module, imported on first use (it may not exist when this module is imported)."""
    return importlib.import_module("portrait3d.geometry.render")


class LiftedGenerator(nn.Module):
    """The 3D-aware generator of Sec. 3.1: a frozen 2D StyleGAN2 ``g2d`` plus the lifting networks.

    Args:
        g2d: the 2D generator (``mapping``, ``synthesis(ws)``, ``num_ws``, ``w_dim``,
            ``img_resolution``); frozen and kept in eval mode.
        cfg: :class:`LiftConfig` (default: ``LiftConfig(w_dim=g2d.w_dim)``).
        renderer_cfg: the renderer's ``RendererConfig`` (default: ``RendererConfig(image_size,
            min_depth, max_depth)`` from ``cfg``; its ``image_size`` should equal ``cfg.image_size``).
        generator_ref: name or path of ``g2d`` written into saved files (for :meth:`load`).
        renderer: an object with ``render``, ``shade`` and ``normals_from_depth`` (default: the
            module :mod:`portrait3d.geometry.render`, imported lazily).

    Only the lifting networks (``self.nets``: ``view``, ``light``, ``manipulator``, ``depth``,
    ``transform``) are trainable; optimise :meth:`lifting_parameters`.
    """

    def __init__(self, g2d: nn.Module, cfg: LiftConfig | None = None, renderer_cfg: Any = None,
                 generator_ref: str | None = None, renderer: Any = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else LiftConfig(w_dim=int(g2d.w_dim))
        if int(g2d.w_dim) != cfg.w_dim:
            raise ValueError(f"LiftConfig.w_dim = {cfg.w_dim} but the 2D generator has w_dim = {g2d.w_dim}")
        self.cfg = cfg
        self.g2d = g2d.requires_grad_(False).eval()
        self.num_ws = int(g2d.num_ws)
        self.renderer_cfg = renderer_cfg
        self.generator_ref = generator_ref
        self._renderer = renderer
        self._saved_renderer_cfg: dict[str, Any] | None = None  # from a loaded file, built on first use
        self.nets = nn.ModuleDict({
            "view": ViewNet(cfg),
            "light": LightNet(cfg),
            "manipulator": StyleManipulator(cfg),
            "depth": DepthDecoder(cfg),
            "transform": TransformDecoder(cfg),
        })

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def renderer(self) -> Any:
        """The renderer backend (module or object with ``render`` / ``shade`` / ``normals_from_depth``)."""
        if self._renderer is None:
            self._renderer = _load_renderer()
        return self._renderer

    def train(self, mode: bool = True) -> "LiftedGenerator":
        super().train(mode)
        self.g2d.eval()  # the 2D generator is frozen, always
        return self

    def lifting_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (the five lifting networks; never ``g2d``'s)."""
        return list(self.nets.parameters())

    def split_latent(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w [N, w_dim]`` or ``ws [N, num_ws, w_dim]`` -> (``w [N, w_dim]`` layer mean, ``ws``)."""
        if w.ndim == 2 and w.shape[1] == self.cfg.w_dim:
            return w, w[:, None].expand(-1, self.num_ws, -1)
        if w.ndim == 3 and tuple(w.shape[1:]) == (self.num_ws, self.cfg.w_dim):
            return w.mean(dim=1), w
        raise ValueError(f"expected w [N, {self.cfg.w_dim}] or ws [N, {self.num_ws}, {self.cfg.w_dim}], "
                         f"got {tuple(w.shape)}")

    def synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        """``G2D(ws)`` at ``image_size``: ``ws [N, num_ws, w_dim] -> [N, 3, S, S]`` (constant noise)."""
        return resize_images(self.g2d.synthesis(ws, noise_mode="const"), self.cfg.image_size)

    def manipulate(self, w: torch.Tensor, ws: torch.Tensor, light: torch.Tensor,
                   view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M applied in W: (``w_{L,V} [N, w_dim]``, ``ws_{L,V} [N, num_ws, w_dim]``)."""
        delta = self.nets["manipulator"].delta(w, light, view)
        return w + delta, ws + delta[:, None]

    def resolved_renderer_cfg(self, renderer_cfg: Any = None) -> Any:
        """The renderer config to use: ``renderer_cfg``, else the model's, else the renderer's
        ``RendererConfig(image_size, min_depth, max_depth)`` built from :class:`LiftConfig`
        (None for a backend without ``RendererConfig``)."""
        if renderer_cfg is not None:
            self._check_renderer_cfg(renderer_cfg)
            return renderer_cfg
        if self.renderer_cfg is None:
            make = getattr(self.renderer, "RendererConfig", None)
            if make is not None:
                saved = self._saved_renderer_cfg
                self.renderer_cfg = (make(**saved) if saved else
                                     make(image_size=self.cfg.image_size, min_depth=self.cfg.min_depth,
                                          max_depth=self.cfg.max_depth))
        self._check_renderer_cfg(self.renderer_cfg)
        return self.renderer_cfg

    def _check_renderer_cfg(self, rcfg: Any) -> None:
        size = getattr(rcfg, "image_size", None)
        if size is not None and int(size) != self.cfg.image_size:
            raise ValueError(f"renderer image_size {size} != LiftConfig.image_size {self.cfg.image_size}")

    def normals(self, depth: torch.Tensor, renderer_cfg: Any = None) -> torch.Tensor:
        """Canonical normals ``[N, 3, S, S]`` of ``depth [N, S, S]`` (renderer's ``normals_from_depth``)."""
        return _normals_nchw(self.renderer.normals_from_depth(depth, self.resolved_renderer_cfg(renderer_cfg)))

    def shade(self, albedo: torch.Tensor, normal: torch.Tensor,
              light: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lambertian shading ``I = A * (k_a + k_d max(0, <l, n>))`` through the renderer's ``shade``
        on the linear albedo ``(A + 1) / 2``: (lit image ``[N, 3, S, S]`` in the ``[-1, 1]`` range,
        shading ``[N, 1, S, S]``)."""
        lit, shading = self.renderer.shade((albedo + 1) * 0.5, normal, light[:, 0:1], light[:, 1:2],
                                           light_to_direction(light))
        return lit * 2 - 1, shading

    def render_from(self, depth: torch.Tensor, albedo: torch.Tensor, transform: torch.Tensor | None,
                    view: torch.Tensor, light: torch.Tensor, renderer_cfg: Any = None) -> RenderedView:
        """Shade the canonical albedo under ``light`` and render the depth mesh at ``view``.

        Args:
            depth: ``[N, S, S]`` canonical depth; albedo: ``[N, 3, S, S]``; transform: ``[N, C, S, S]``
            (eq. 1; 1 channel -> ``transform_map=``, 3 -> ``flow=``) or None; view: ``[N, 6]``;
            light: ``[N, 4]``.
        """
        cfg = self.resolved_renderer_cfg(renderer_cfg)
        normal = self.normals(depth, cfg)
        lit, shading = self.shade(albedo, normal, light)
        if transform is None:
            r = self.renderer.render(depth, lit, view, cfg)
        elif transform.shape[1] == 1:
            r = self.renderer.render(depth, lit, view, cfg, transform_map=transform)
        else:
            r = self.renderer.render(depth, lit, view, cfg, flow=transform)
        return RenderedView(image=r.image, mask=getattr(r, "mask", None), depth=getattr(r, "depth", None),
                            shading=shading, normal=normal, lit=lit)

    # -- forward -----------------------------------------------------------------------------
    def canonical(self, w: torch.Tensor, renderer_cfg: Any = None) -> dict[str, torch.Tensor]:
        """The 3D decomposition of ``w`` (no final render): view, light, w0, canonical image,
        depth, transformation map, normal, neutral shading and albedo (see :class:`LiftOutput`)."""
        w, ws = self.split_latent(w)
        view = self.nets["view"](w)
        light = self.nets["light"](w)
        light0 = canonical_light(light)
        w0, ws0 = self.manipulate(w, ws, light0, torch.zeros_like(view))
        canonical_image = self.synthesize(ws0)
        depth = self.nets["depth"](w0)
        transform = self.nets["transform"](w0, depth)
        depth = depth[:, 0]
        normal = self.normals(depth, renderer_cfg)
        # shading of the neutral light L0 (frontal direction): s0 = a + b max(0, n . (0, 0, 1))
        _, shading0 = self.shade(torch.zeros_like(canonical_image), normal, light0)
        albedo = albedo_from_image(canonical_image, shading0, self.cfg.min_shading)
        return {"w": w, "ws": ws, "view": view, "light": light, "w0": w0, "ws0": ws0,
                "canonical_image": canonical_image, "depth": depth, "transform": transform,
                "normal": normal, "albedo": albedo}

    def forward(self, w: torch.Tensor, renderer_cfg: Any = None) -> LiftOutput:
        """``w [N, w_dim]`` or ``ws [N, num_ws, w_dim]`` -> :class:`LiftOutput` (re-rendered at the
        predicted view and light)."""
        c = self.canonical(w, renderer_cfg)
        r = self.render_from(c["depth"], c["albedo"], c["transform"], c["view"], c["light"], renderer_cfg)
        return LiftOutput(w=c["w"], ws=c["ws"], view=c["view"], light=c["light"], w0=c["w0"], ws0=c["ws0"],
                          canonical_image=c["canonical_image"], albedo=c["albedo"], depth=c["depth"],
                          transform=c["transform"], image=r.image, mask=r.mask, shading=r.shading,
                          normal=r.normal)

    def render_view(self, out: LiftOutput, view: torch.Tensor | None = None, light: torch.Tensor | None = None,
                    flip: bool = False, renderer_cfg: Any = None) -> RenderedView:
        """Rotate / relight a lifted face.

        Args:
            out: a :class:`LiftOutput`.
            view: ``[N, 6]`` or ``[6]`` (radians / 3D units; default: the predicted ``out.view``).
            light: ``[N, 4]`` or ``[4]`` (ambient, diffuse, dx, dy; default: ``out.light``).
            flip: render the horizontally mirrored depth and albedo (the flipped reconstruction
                of Sec. 3.2; the transformation map is not mirrored).
        """
        n = out.depth.shape[0]
        view = out.view if view is None else torch.as_tensor(view, dtype=out.view.dtype, device=out.view.device)
        light = out.light if light is None else torch.as_tensor(light, dtype=out.light.dtype, device=out.light.device)
        view = view.expand(n, -1) if view.ndim == 1 or view.shape[0] == 1 else view
        light = light.expand(n, -1) if light.ndim == 1 or light.shape[0] == 1 else light
        depth, albedo = out.depth, out.albedo
        if flip:
            depth, albedo = depth.flip(-1), albedo.flip(-1)
        return self.render_from(depth, albedo, out.transform, view, light, renderer_cfg)

    # -- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, half: bool = False) -> Path:
        """Write the lifting networks as one ``.safetensors`` file, atomically.

        ``half`` stores floating-point weights in float16 (shipped models); :meth:`load` casts them back.

        ``__metadata__``: ``{"format": "portrait3d-lifting", "format_version": "1", "config":
        <LiftConfig JSON>, "generator": <generator_ref or "">, "generator_w_dim", "generator_num_ws",
        "renderer_config": <JSON of the RendererConfig dataclass, or "">}``. The 2D generator's
        weights are not stored.
        """
        from safetensors.torch import save_file

        from portrait3d.checkpoints.native import atomic_write

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.nets.state_dict().items()}
        if half:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        meta = {"format": LIFT_FORMAT, "format_version": LIFT_FORMAT_VERSION,
                "config": json.dumps(self.cfg.to_dict()), "generator": self.generator_ref or "",
                "generator_w_dim": str(self.cfg.w_dim), "generator_num_ws": str(self.num_ws),
                "renderer_config": json.dumps(dataclasses.asdict(self.renderer_cfg))
                if dataclasses.is_dataclass(self.renderer_cfg) else ""}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], g2d: nn.Module | None = None, renderer_cfg: Any = None,
             device: str | torch.device = "cpu", renderer: Any = None) -> "LiftedGenerator":
        """Read a file written by :meth:`save` (eval mode, frozen).

        Args:
            g2d: the 2D generator; default: ``load_network(<generator reference in the file>)``.

        Raises:
            CheckpointError (a ``ValueError``): unreadable / foreign file, bad config, a 2D
                generator that does not fit, or mismatched weights -- one-line message.
        """
        from portrait3d.checkpoints.native import read_safetensors_with_metadata
        from portrait3d.checkpoints.state import load_state_strict

        p = Path(path)
        state, meta = read_safetensors_with_metadata(
            p, LIFT_FORMAT, LIFT_FORMAT_VERSION,
            foreign="not a portrait3d lifting file (no portrait3d-lifting metadata)",
            version_label="lifting format version")
        try:
            cfg = LiftConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{p.name}: invalid LiftConfig ({msg})") from None
        ref = meta.get("generator") or None
        if g2d is None:
            if ref is None:
                raise CheckpointError(f"{p.name}: no 2D generator reference in the file; pass g2d=")
            from portrait3d.checkpoints import load_network

            g2d = load_network(ref, device=device)
        if int(g2d.w_dim) != cfg.w_dim or str(int(g2d.num_ws)) != meta.get("generator_num_ws", str(int(g2d.num_ws))):
            raise CheckpointError(f"{p.name}: the 2D generator (w_dim {g2d.w_dim}, num_ws {g2d.num_ws}) does not "
                                  f"match the lifting file (w_dim {cfg.w_dim}, num_ws {meta.get('generator_num_ws')})")
        model = cls(g2d, cfg, renderer_cfg=renderer_cfg, generator_ref=ref, renderer=renderer)
        if meta.get("renderer_config"):
            try:
                saved = json.loads(meta["renderer_config"])
            except json.JSONDecodeError:
                raise CheckpointError(f"{p.name}: unreadable renderer config") from None
            if not isinstance(saved, dict):
                raise CheckpointError(f"{p.name}: unreadable renderer config")
            model._saved_renderer_cfg = saved
        load_state_strict(model.nets, state, f"{p.name}: lifting networks")
        return model.to(device).eval().requires_grad_(False)

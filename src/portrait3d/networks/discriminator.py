"""StyleGAN2 discriminator and EG3D's dual discriminator.

Layouts and parameter names follow NVlabs' ``training/networks_stylegan2.py`` (``Discriminator``)
and EG3D's ``training/dual_discriminator.py`` (``DualDiscriminator``: the super-resolved image and
the raw neural rendering, resized to the same size, are concatenated into 6 channels, Sec. 4.2 of
the EG3D paper). Conditioning on a label ``c`` (EG3D: the camera) uses the projection
discriminator of StyleGAN2-ADA: ``D(x, c) = <phi(x), cmap(c)> / sqrt(cmap_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.networks import ops
from portrait3d.networks.stylegan2 import Conv2dLayer, FullyConnectedLayer, MappingNetwork

__all__ = ["DiscriminatorBlock", "MinibatchStdLayer", "DiscriminatorEpilogue", "Discriminator",
           "DualDiscriminator", "DiscriminatorConfig", "filtered_resizing"]


class DiscriminatorBlock(nn.Module):
    """One resolution: (fromRGB) + conv 3x3 + conv 3x3 with 2x downsampling (+ resnet skip).

    Shape: ``x [N, C_in, R, R], img [N, img_channels, R, R] -> (x [N, C_out, R/2, R/2], img or None)``.
    """

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter: tuple[int, ...] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 use_fp16: bool = False, fp16_channels_last: bool = False, freeze_layers: int = 0) -> None:
        if in_channels not in (0, tmp_channels):
            raise ValueError("in_channels must be 0 or tmp_channels")
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", ops.setup_filter(list(resample_filter)))
        self.num_layers = 0

        def trainable() -> bool:
            idx = self.first_layer_idx + self.num_layers
            self.num_layers += 1
            return idx >= freeze_layers

        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation=activation,
                                       trainable=trainable(), conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation,
                                 trainable=trainable(), conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation, down=2,
                                 trainable=trainable(), resample_filter=resample_filter, conv_clamp=conv_clamp,
                                 channels_last=self.channels_last)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None,
                force_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        ref = x if x is not None else img
        if ref.device.type != "cuda":
            force_fp32 = True
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if x is not None:
            x = x.to(dtype=dtype, memory_format=memory_format)
        if self.in_channels == 0 or self.architecture == "skip":
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = ops.downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            x = y.add_(x)
        else:
            x = self.conv0(x)
            x = self.conv1(x)
        return x, img


class MinibatchStdLayer(nn.Module):
    """Append the mean per-group standard deviation as extra feature maps (Karras et al. 2018).

    Shape: ``[N, C, H, W] -> [N, C + num_channels, H, W]``.
    """

    def __init__(self, group_size: int | None, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)
        y = (y + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4])
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch-std, conv, fully connected, output (projected onto ``cmap`` when conditioned).

    Shape: ``x [N, C, 4, 4] -> [N, 1]``.
    """

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor | None, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


@dataclass
class DiscriminatorConfig(ConfigMixin):
    """Settings of :class:`Discriminator` / :class:`DualDiscriminator` (official keyword names)."""

    c_dim: int = 0
    img_resolution: int = 128
    img_channels: int = 3
    architecture: str = "resnet"
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    cmap_dim: int | None = None
    mbstd_group_size: int | None = 4
    mbstd_num_channels: int = 1
    disc_c_noise: float = 0.0  # dual discriminator only: noise added to the camera label


class Discriminator(nn.Module):
    """StyleGAN2 discriminator (resnet architecture by default), label-conditioned when ``c_dim > 0``.

    Shape: ``img [N, img_channels, R, R], c [N, c_dim] -> logits [N, 1]``.
    """

    input_channel_factor = 1

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.c_dim = cfg.c_dim
        self.img_resolution = cfg.img_resolution
        self.img_resolution_log2 = int(math.log2(cfg.img_resolution))
        img_channels = cfg.img_channels * self.input_channel_factor
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(cfg.channel_base // res, cfg.channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - cfg.num_fp16_res), 8)
        cmap_dim = cfg.cmap_dim if cfg.cmap_dim is not None else channels[4]
        if cfg.c_dim == 0:
            cmap_dim = 0
        common = dict(img_channels=img_channels, architecture=cfg.architecture, conv_clamp=cfg.conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            in_channels = channels[res] if res < cfg.img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels[res], channels[res // 2], resolution=res,
                                       first_layer_idx=layer_idx, use_fp16=res >= fp16_resolution, **common)
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=cfg.c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None)
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4,
                                        mbstd_group_size=cfg.mbstd_group_size,
                                        mbstd_num_channels=cfg.mbstd_num_channels, **common)

    def _input(self, img: Any) -> torch.Tensor:
        return img

    def forward(self, img: Any, c: torch.Tensor | None = None, update_emas: bool = False,
                **block_kwargs: Any) -> torch.Tensor:
        x = None
        img = self._input(img)
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, **block_kwargs)
        cmap = None
        if self.c_dim > 0:
            cmap = self.mapping(None, self._condition(c))
        return self.b4(x, img, cmap)

    def _condition(self, c: torch.Tensor) -> torch.Tensor:
        return c


def filtered_resizing(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize used to bring EG3D's raw rendering to the final resolution."""
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DualDiscriminator(Discriminator):
    """EG3D's dual discriminator: sees ``cat(image, upsample(image_raw))`` (6 channels), camera-conditioned.

    Input: ``{'image': [N, 3, R, R], 'image_raw': [N, 3, r, r]}`` and ``c [N, 25]``.
    """

    input_channel_factor = 2

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__(config)
        self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))
        self.disc_c_noise = config.disc_c_noise

    def _input(self, img: dict[str, torch.Tensor]) -> torch.Tensor:
        raw = filtered_resizing(img["image_raw"], img["image"].shape[-1])
        return torch.cat([img["image"], raw], 1)

    def _condition(self, c: torch.Tensor) -> torch.Tensor:
        if self.disc_c_noise > 0:
            c = c + torch.randn_like(c) * c.std(0) * self.disc_c_noise
        return c

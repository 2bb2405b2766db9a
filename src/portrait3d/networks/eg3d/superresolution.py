"""EG3D super-resolution modules (Chan et al., "Efficient Geometry-aware 3D GANs", Sec. 4.2).

Two StyleGAN2 synthesis blocks lift the neural rendering (32-128 px, 32 feature
channels) to the output resolution, modulated by the last ``w`` of the backbone.
Module names and layouts follow ``training/superresolution.py`` so official weights
load one to one.

====================  ==========  ===================  ===========================
class                  output px   input resampled to   blocks
====================  ==========  ===================  ===========================
Hybrid2X               128         64                   NoUp(C,128)@64, Up(128,64)@128
Hybrid4X               256         128 (if smaller)     NoUp(C,128)@128, Up(128,64)@256
Hybrid8X               512         128                  Up(C,128)@256, Up(128,64)@512
Hybrid8XDC             512         128                  Up(C,256)@256, Up(256,128)@512
====================  ==========  ===================  ===========================
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.networks import ops
from portrait3d.networks.stylegan2 import SynthesisBlock

__all__ = ["SuperresolutionHybrid2X", "SuperresolutionHybrid4X", "SuperresolutionHybrid8X",
           "SuperresolutionHybrid8XDC", "SUPERRESOLUTION_MODULES", "build_superresolution"]


class _Superresolution(nn.Module):
    """Shared forward: resample inputs to ``input_resolution``, run ``block0`` then ``block1``.

    Shape: ``rgb [N, 3, r, r], x [N, C, r, r], ws [N, num_ws, w_dim] -> [N, 3, R, R]``
    (EG3D's models: ``w_dim = 512``).
    """

    output_resolution: int
    input_resolution: int
    # (in, out, block resolution, upsample?) for block0 (in = ``channels``) and block1.
    block0_spec: tuple[int, int, bool]
    block1_spec: tuple[int, int, int, bool]
    resample_only_if_smaller = False
    has_filter = True

    def __init__(self, channels: int, img_resolution: int, sr_num_fp16_res: int, sr_antialias: bool = True,
                 num_fp16_res: int = 4, conv_clamp: float | None = None, channel_base: int | None = None,
                 channel_max: int | None = None, w_dim: int = 512, **block_kwargs: Any) -> None:
        super().__init__()
        if img_resolution != self.output_resolution:
            raise ValueError(f"{type(self).__name__} produces {self.output_resolution} px, "
                             f"not {img_resolution}")
        use_fp16 = sr_num_fp16_res > 0
        clamp = 256 if use_fp16 else None  # official: the SR clamps exactly when it may run in fp16
        self.sr_antialias = sr_antialias
        out0, res0, up0 = self.block0_spec
        in1, out1, res1, up1 = self.block1_spec
        self.block0 = SynthesisBlock(channels, out0, w_dim=w_dim, resolution=res0, img_channels=3, is_last=False,
                                     use_fp16=use_fp16, conv_clamp=clamp, upsample=up0, **block_kwargs)
        self.block1 = SynthesisBlock(in1, out1, w_dim=w_dim, resolution=res1, img_channels=3, is_last=True,
                                     use_fp16=use_fp16, conv_clamp=clamp, upsample=up1, **block_kwargs)
        if self.has_filter:
            self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        size = x.shape[-1]
        needs = size < self.input_resolution if self.resample_only_if_smaller else size != self.input_resolution
        if needs:
            target = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=target, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        else:
            # The skip adds into ``rgb`` in place; unresized it is a view of the rendered features (and the caller's
            # ``image_raw``), so it would overwrite both, and fail backward where the official fp16 cast copies.
            rgb = rgb.clone()
        x, rgb = self.block0(x, rgb, ws, **block_kwargs)
        x, rgb = self.block1(x, rgb, ws, **block_kwargs)
        return rgb


class SuperresolutionHybrid2X(_Superresolution):
    """32/64 px neural rendering -> 128 px."""

    output_resolution, input_resolution = 128, 64
    block0_spec = (128, 64, False)
    block1_spec = (128, 64, 128, True)


class SuperresolutionHybrid4X(_Superresolution):
    """128 px neural rendering -> 256 px (inputs smaller than 128 are upsampled)."""

    output_resolution, input_resolution = 256, 128
    block0_spec = (128, 128, False)
    block1_spec = (128, 64, 256, True)
    resample_only_if_smaller = True


class SuperresolutionHybrid8X(_Superresolution):
    """128 px neural rendering -> 512 px."""

    output_resolution, input_resolution = 512, 128
    block0_spec = (128, 256, True)
    block1_spec = (128, 64, 512, True)


class SuperresolutionHybrid8XDC(_Superresolution):
    """128 px neural rendering -> 512 px with wider blocks (the FFHQ ``ffhq512-128.pkl`` model)."""

    output_resolution, input_resolution = 512, 128
    block0_spec = (256, 256, True)
    block1_spec = (256, 128, 512, True)
    has_filter = False  # the official 8XDC registers no resample_filter buffer


SUPERRESOLUTION_MODULES: dict[str, type[_Superresolution]] = {
    "training.superresolution.SuperresolutionHybrid2X": SuperresolutionHybrid2X,
    "training.superresolution.SuperresolutionHybrid4X": SuperresolutionHybrid4X,
    "training.superresolution.SuperresolutionHybrid8X": SuperresolutionHybrid8X,
    "training.superresolution.SuperresolutionHybrid8XDC": SuperresolutionHybrid8XDC,
}


def build_superresolution(name: str, **kwargs: Any) -> _Superresolution:
    """Construct the super-resolution module named as in EG3D's ``rendering_kwargs['superresolution_module']``."""
    short = {k.rsplit(".", 1)[-1]: v for k, v in SUPERRESOLUTION_MODULES.items()}
    cls = SUPERRESOLUTION_MODULES.get(name) or short.get(name)
    if cls is None:
        raise ValueError(f"unsupported super-resolution module {name!r} (supported: {', '.join(short)})")
    return cls(**kwargs)

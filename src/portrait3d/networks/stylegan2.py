"""StyleGAN2 generator (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN").

Module and parameter names mirror NVlabs' ``training/networks.py`` (stylegan2-ada-pytorch)
and ``training/networks_stylegan2.py`` (stylegan3 / EG3D), so an official state dict
loads one to one and results match the official reference path.

Call signatures are the official ones::

    ws  = G.mapping(z, c, truncation_psi=0.7, truncation_cutoff=None)   # [N, num_ws, w_dim]
    img = G.synthesis(ws, noise_mode='const')                           # [N, C, H, W] in ~[-1, 1]
    img = G(z, c, truncation_psi=0.7)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.networks import ops

__all__ = [
    "FullyConnectedLayer",
    "Conv2dLayer",
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "Generator",
    "MappingConfig",
    "SynthesisConfig",
    "StyleGAN2Config",
]

FusedModconv = bool | str  # True, False or 'inference_only' (fused when not training)


class FullyConnectedLayer(nn.Module):
    """Equalised-learning-rate linear layer: ``y = act(x (g_w W)^T + g_b b)``.

    Args:
        in_features, out_features: sizes.
        bias: learn an additive bias.
        activation: name in :data:`portrait3d.networks.ops.ACTIVATIONS`.
        lr_multiplier: scales both the runtime weight gain and the bias gain.
        bias_init: initial bias value.
    Shape:
        ``[N, in_features] -> [N, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1, bias_init: float = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return ops.bias_act(x, b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalised-learning-rate convolution with optional FIR up/downsampling.

    Shape: ``[N, C_in, H, W] -> [N, C_out, H*up/down, W*up/down]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 resample_filter: Sequence[int] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 channels_last: bool = False, trainable: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ops.ACTIVATIONS[activation].def_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        bias_t = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias_t) if bias_t is not None else None
        else:
            self.register_buffer("weight", weight)
            if bias_t is not None:
                self.register_buffer("bias", bias_t)
            else:
                self.bias = None

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = ops.conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                                padding=self.padding, flip_weight=(self.up == 1))
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class MappingNetwork(nn.Module):
    """Mapping f: Z (and label c) -> W, broadcast to ``num_ws`` copies, with truncation.

    Shape: ``z [N, z_dim], c [N, c_dim] -> ws [N, num_ws, w_dim]``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.998) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            _check_shape(z, [None, self.z_dim], "z")
            x = ops.normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this generator is conditioned on a label c of {self.c_dim} values")
            _check_shape(c, [None, self.c_dim], "c")
            y = ops.normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            assert self.w_avg_beta is not None, "truncation needs the tracked w_avg"
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution + noise + bias + lrelu (one "style" layer).

    Shape: ``x [N, C_in, R/up, R/up], w [N, w_dim] -> [N, C_out, R, R]``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[int] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.act_gain = ops.ACTIVATIONS[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                gain: float = 1, noise_input: torch.Tensor | None = None) -> torch.Tensor:
        """``noise_input [N, 1, R, R]``: the unit-variance noise of ``noise_mode='random'``, drawn by the
        caller (a compiled graph then holds no random op, and the caller owns the seed)."""
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', not {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random" and noise_input is not None:
            noise = noise_input * self.noise_strength
        elif self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = ops.modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                                 resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                                 fused_modconv=fused_modconv)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, no demodulation.

    Shape: ``x [N, C_in, R, R], w [N, w_dim] -> [N, img_channels, R, R]``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = ops.modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return ops.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const | 2x up conv) + conv + ToRGB.

    ``upsample=False`` gives EG3D's ``SynthesisBlockNoUp`` (same resolution in and out).

    Shape: ``x [N, C_in, R/2, R/2], img [N, img_channels, R/2, R/2], ws [N, num_conv+num_torgb, w_dim]
    -> (x [N, C_out, R, R], img [N, img_channels, R, R])``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter: Sequence[int] = (1, 3, 3, 1),
                 conv_clamp: float | None = 256, use_fp16: bool = False, fp16_channels_last: bool = False,
                 fused_modconv_default: FusedModconv = True, upsample: bool = True, **layer_kwargs: Any) -> None:
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be 'orig', 'skip' or 'resnet', not {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.fused_modconv_default = fused_modconv_default
        self.upsample = upsample
        # StyleGAN2-ADA's code runs use_fp16 blocks in float16 on every device (EG3D's and
        # stylegan3's fall back to float32 off CUDA). True reproduces ADA's CPU arithmetic.
        self.fp16_on_cpu = False
        self.register_buffer("resample_filter", ops.setup_filter(list(resample_filter)))
        self.num_conv = 0
        self.num_torgb = 0
        up = 2 if upsample else 1
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=up,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=up,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                force_fp32: bool = False, fused_modconv: FusedModconv | None = None, update_emas: bool = False,
                noise_inputs: Sequence[torch.Tensor] | None = None,
                **layer_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], "ws")
        w_iter = iter(ws.unbind(dim=1))
        noise_iter = iter(noise_inputs) if noise_inputs is not None else itertools.repeat(None)
        if ws.device.type != "cuda" and not self.fp16_on_cpu:
            force_fp32 = True  # fp16 is a CUDA speed-up only; our CPU path stays float32
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if fused_modconv is None and self.fp16_on_cpu:
            # StyleGAN2-ADA's rule: the grouped (fused) path only in float32 or for a single sample.
            fused_modconv = (not self.training) and (dtype == torch.float32 or int(ws.shape[0]) == 1)
        if fused_modconv is None and ws.device.type == "cpu":
            # Same maths; on a CPU the shared convolution of scaled activations beat the grouped one 1.3-1.65x with
            # gradients and 1.2-1.3x in bf16 or batches (default-2d, one thread), losing only one float32 image
            # without gradients (0.89x). bench/bench_modconv.py.
            fused_modconv = False
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == "inference_only":
            fused_modconv = not self.training

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            in_res = self.resolution // 2 if self.upsample else self.resolution
            _check_shape(x, [None, self.in_channels, in_res, in_res], "x")
            x = x.to(dtype=dtype, memory_format=memory_format)

        def layer(conv: SynthesisLayer, x: torch.Tensor, **kw: Any) -> torch.Tensor:
            return conv(x, next(w_iter), fused_modconv=fused_modconv, noise_input=next(noise_iter), **kw,
                        **layer_kwargs)

        if self.in_channels == 0:
            x = layer(self.conv1, x)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = layer(self.conv0, x)
            x = layer(self.conv1, x, gain=math.sqrt(0.5))
            x = y.add_(x)
        else:
            x = layer(self.conv0, x)
            x = layer(self.conv1, x)

        if img is not None and self.upsample:
            img = ops.upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img.add_(y) if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """Synthesis g: W+ -> image, a stack of :class:`SynthesisBlock` from 4x4 to ``img_resolution``.

    Shape: ``ws [N, num_ws, w_dim] -> [N, img_channels, img_resolution, img_resolution]``.
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 4, **block_kwargs: Any) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, not {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2**i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            is_last = res == self.img_resolution
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res, img_channels=img_channels,
                                   is_last=is_last, use_fp16=(res >= fp16_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def noise_shapes(self, batch: int) -> list[list[int]]:
        """Shapes ``[N, 1, R, R]`` of the per-layer noise inputs, in the order ``noise_inputs`` takes them."""
        return [[batch, 1, layer.resolution, layer.resolution]
                for res in self.block_resolutions
                for layer in (getattr(getattr(self, f"b{res}"), "conv0", None), getattr(self, f"b{res}").conv1)
                if layer is not None]

    def forward(self, ws: torch.Tensor, noise_inputs: Sequence[torch.Tensor] | None = None,
                **block_kwargs: Any) -> torch.Tensor:
        """``noise_inputs``: unit-variance noise per layer (shapes :meth:`noise_shapes`) used by
        ``noise_mode='random'`` instead of drawing it inside the network."""
        _check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        n_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            cur_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            kw = dict(block_kwargs)
            if noise_inputs is not None:
                kw["noise_inputs"] = noise_inputs[n_idx:n_idx + block.num_conv]
                n_idx += block.num_conv
            x, img = block(x, img, cur_ws, **kw)
        return img


@dataclass
class MappingConfig(ConfigMixin):
    """Mapping network settings (official ``mapping_kwargs``)."""

    num_layers: int = 8
    embed_features: int | None = None
    layer_features: int | None = None
    activation: str = "lrelu"
    lr_multiplier: float = 0.01
    w_avg_beta: float | None = 0.995


@dataclass
class SynthesisConfig(ConfigMixin):
    """Synthesis network settings (official ``synthesis_kwargs``)."""

    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    architecture: str = "skip"
    resample_filter: list[int] = field(default_factory=lambda: [1, 3, 3, 1])
    use_noise: bool = True
    fp16_channels_last: bool = False
    fused_modconv_default: FusedModconv = "inference_only"


@dataclass
class StyleGAN2Config(ConfigMixin):
    """Everything needed to build a :class:`Generator`; saved as JSON beside our safetensors."""

    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 3
    mapping: MappingConfig = field(default_factory=MappingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


    def validate(self) -> None:
        """Raise ``ValueError`` for dimensions no generator can have."""
        m, y = self.mapping, self.synthesis
        _check_dims("StyleGAN2Config", z_dim=("nonneg", self.z_dim), c_dim=("nonneg", self.c_dim),
                    w_dim=("pos", self.w_dim), img_resolution=("pow2", self.img_resolution),
                    img_channels=("pos", self.img_channels), mapping_num_layers=("pos", m.num_layers),
                    channel_base=("pos", y.channel_base), channel_max=("pos", y.channel_max),
                    num_fp16_res=("nonneg", y.num_fp16_res))
        if self.z_dim == 0 and self.c_dim == 0:
            raise ValueError("StyleGAN2Config needs z_dim > 0 or c_dim > 0")
        for name, value in (("z_dim", self.z_dim), ("c_dim", self.c_dim), ("w_dim", self.w_dim),
                            ("img_channels", self.img_channels), ("synthesis.channel_max", y.channel_max)):
            if value > MAX_WIDTH:  # a width squared is a weight: beyond this the allocation alone would fail
                raise ValueError(f"StyleGAN2Config.{name} must be at most {MAX_WIDTH}, not {value}")
        if y.channel_base < self.img_resolution:  # channels = channel_base // resolution: a block would have none
            raise ValueError(f"StyleGAN2Config.synthesis.channel_base ({y.channel_base}) must be at least "
                             f"img_resolution ({self.img_resolution}): every block needs a channel")


MAX_WIDTH = 8192
"""The largest width (latent, channel, conditioning) a StyleGAN2 config may ask for: published ones use 512."""
MAX_DIM = 1 << 17
"""The largest size a config may give any dimension or count: published generators stay below 2^16 (channel_base
32768, w_dim 512); a tampered config asking for more would only make the allocator fail (found by the fuzzer)."""


def _check_dims(where: str, **dims: Any) -> None:
    """Refuse configurations no network can have (a tampered or corrupt config) before any tensor is built."""
    for name, v in dims.items():
        kind, value = v
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and kind == "pos":
            ok = 0 < value <= MAX_DIM
        elif ok and kind == "nonneg":
            ok = 0 <= value <= MAX_DIM
        elif ok and kind == "pow2":
            ok = 4 <= value <= 8192 and value & (value - 1) == 0
        if not ok:
            need = {"pos": f"an integer from 1 to {MAX_DIM}", "nonneg": f"an integer from 0 to {MAX_DIM}",
                    "pow2": "a power of two from 4 to 8192"}[kind]
            raise ValueError(f"{where}.{name} must be {need}, not {value!r}")


class Generator(nn.Module):
    """StyleGAN2 generator G = g ∘ f with the official call signatures.

    Shape: ``z [N, z_dim], c [N, c_dim] -> img [N, img_channels, R, R]``.
    """

    def __init__(self, config: StyleGAN2Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.z_dim = config.z_dim
        self.c_dim = config.c_dim
        self.w_dim = config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        syn = dataclasses.asdict(config.synthesis)
        use_noise = syn.pop("use_noise")
        self.synthesis = SynthesisNetwork(w_dim=config.w_dim, img_resolution=config.img_resolution,
                                          img_channels=config.img_channels, use_noise=use_noise, **syn)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=config.z_dim, c_dim=config.c_dim, w_dim=config.w_dim,
                                      num_ws=self.num_ws, **dataclasses.asdict(config.mapping))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_emas: bool = False,
                **synthesis_kwargs: Any) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)


def _check_shape(t: torch.Tensor | None, shape: list[int | None], name: str) -> None:
    """Raise a readable error when ``t`` does not have ``shape`` (None = any size)."""
    if t is None or t.ndim != len(shape) or any(s is not None and int(d) != s for d, s in zip(t.shape, shape)):
        got = None if t is None else list(t.shape)
        want = ["*" if s is None else s for s in shape]
        raise ValueError(f"{name} has shape {got}, expected {want}")

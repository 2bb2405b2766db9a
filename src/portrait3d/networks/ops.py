"""Pure-PyTorch reference versions of the custom ops used by StyleGAN2 and EG3D.

NVIDIA's code ships CUDA kernels for ``bias_act``, ``upfirdn2d`` and
``filtered_lrelu`` plus a reference path in plain PyTorch. We keep only the
reference semantics, written out here, so every network runs on any device
without compiling anything. The order of floating point operations follows
the reference path, which is what makes our outputs match official ones to
~1e-6 in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "RandomSource",
    "draw_rand",
    "draw_randn",
    "ACTIVATIONS",
    "bias_act",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
    "downsample2d",
    "conv2d_resample",
    "normalize_2nd_moment",
    "modulated_conv2d",
    "gaussian_blur",
]


class RandomSource(Protocol):
    """Where a network draws the random numbers of its forward pass (ray jitter, importance samples, noise).

    Networks take it as an explicit argument (``random=``) instead of reading the global RNG, so a trainer can make
    every number a function of ``(seed, step, sample)``, independent of how the batch is split across processes
    (:class:`portrait3d.training.randomness.BatchRandom` is one). ``None`` means the global RNG, as the official code.
    The first dimension of ``size`` is batch-major (``N`` or ``N * M``).
    """

    def rand(self, size: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...

    def randn(self, size: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...


def draw_rand(random: RandomSource | None, size: Sequence[int], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``U[0, 1)`` numbers of ``size`` from ``random`` (the global RNG when ``None``)."""
    dtype = dtype or torch.get_default_dtype()
    if random is None:
        return torch.rand(list(size), device=device, dtype=dtype)
    return random.rand(list(size), device=device, dtype=dtype)


def draw_randn(random: RandomSource | None, size: Sequence[int], device: torch.device,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``N(0, 1)`` numbers of ``size`` from ``random`` (the global RNG when ``None``)."""
    dtype = dtype or torch.get_default_dtype()
    if random is None:
        return torch.randn(list(size), device=device, dtype=dtype)
    return random.randn(list(size), device=device, dtype=dtype)


@dataclass(frozen=True)
class Activation:
    """An activation with its default slope (``alpha``) and output gain."""

    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation(lambda x, a: x, 0.0, 1.0),
    "relu": Activation(lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add a bias, apply an activation, scale by ``gain`` and clamp to ``±clamp``.

    Args:
        x: input of any shape.
        b: bias of shape ``[x.shape[dim]]`` or None.
        dim: the axis ``b`` runs along.
        act: one of :data:`ACTIVATIONS`.
        alpha: activation slope (lrelu), default per activation.
        gain: output scale, default per activation (``sqrt(2)`` for lrelu).
        clamp: clamp magnitude after the gain; None disables.
    """
    spec = ACTIVATIONS[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(
    f: Sequence[float] | torch.Tensor,
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1,
    separable: bool | None = None,
) -> torch.Tensor:
    """Turn a 1-D FIR kernel into the 2-D (outer product) filter used by upfirdn2d.

    Returns a float32 tensor ``[fh, fw]`` (or ``[fw]`` when ``separable``),
    normalised to sum to ``gain``.
    """
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = f.ger(f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    assert len(v) == 2
    return int(v[0]), int(v[1])


def _padding4(p: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(p, int):
        return p, p, p, p
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    assert len(p) == 4
    return int(p[0]), int(p[1]), int(p[2]), int(p[3])


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int | Sequence[int] = 1,
    down: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter and downsample a batch of images.

    Args:
        x: ``[N, C, H, W]``.
        f: filter ``[fh, fw]`` or separable ``[fw]``, float32, or None (identity).
        up, down: integer factors (x, y).
        padding: ``int``, ``[px, py]`` or ``[x0, x1, y0, y1]``; negative crops.
        flip_filter: False = convolution, True = correlation.
        gain: overall gain applied to the filter.
    Returns:
        ``[N, C, H', W']``.
    """
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape
    upx, upy = _pair(up)
    downx, downy = _pair(down)
    px0, px1, py0, py1 = _padding4(padding)

    x = x.reshape([n, c, h, 1, w, 1])
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape([n, c, h * upy, w * upx])

    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]

    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([c, 1] + [1] * f.ndim)
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=c)
    else:
        x = F.conv2d(x, f.unsqueeze(2), groups=c)
        x = F.conv2d(x, f.unsqueeze(3), groups=c)
    return x[:, :, ::downy, ::downx]


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, padding: int = 0,
               flip_filter: bool = False, gain: float = 1) -> torch.Tensor:
    """Upsample ``[N,C,H,W]`` by ``up`` with the FIR filter ``f`` (gain ``up**2`` keeps the mean)."""
    upx, upy = _pair(up)
    px0, px1, py0, py1 = _padding4(padding)
    fw, fh = _filter_size(f)
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * upx * upy)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, padding: int = 0,
                 flip_filter: bool = False, gain: float = 1) -> torch.Tensor:
    """Low-pass filter ``[N,C,H,W]`` with ``f`` and keep every ``down``-th pixel."""
    downx, downy = _pair(down)
    px0, px1, py0, py1 = _padding4(padding)
    fw, fh = _filter_size(f)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain)


def _conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int | Sequence[int] = 0,
            groups: int = 1, transpose: bool = False, flip_weight: bool = True) -> torch.Tensor:
    # F.conv2d is a correlation; flip_weight=False asks for a true convolution.
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> torch.Tensor:
    """2-D convolution with optional FIR up/downsampling, as StyleGAN2's ``conv2d_resample``.

    Args:
        x: ``[N, C_in, H, W]``; w: ``[C_out, C_in/groups, kh, kw]``.
        f: resampling filter from :func:`setup_filter` (needed when up/down > 1).
        padding: padding of the upsampled image.
    Returns:
        ``[N, C_out, H*up/down, W*up/down]`` (given "same" padding).
    """
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _padding4(padding)
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    if kw == 1 and kh == 1 and (down > 1 and up == 1):
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv2d(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and (up > 1 and down == 1):
        x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter)
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv2d(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        # Transposed strided convolution, then the FIR filter: the fast official path.
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw)
            w = w.transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv2d(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x
    if up == 1 and down == 1 and px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv2d(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter)
    x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit root-mean-square along ``dim`` (StyleGAN's pixel norm of z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """Modulated (and demodulated) convolution, StyleGAN2 paper eq. 1–3.

    ``w'_ijk = s_i w_ijk`` (modulation), ``w''_ijk = w'_ijk / sqrt(sum_ik w'^2 + eps)``
    (demodulation), executed either as one grouped convolution (fused) or by
    scaling activations before and after a shared convolution.

    Args:
        x: ``[N, C_in, H, W]``.
        weight: ``[C_out, C_in, kh, kw]``.
        styles: ``[N, C_in]``.
        noise: broadcastable to the output, added after demodulation.
    Returns:
        ``[N, C_out, H', W']``.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape

    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise to avoid fp16 overflow; demodulation undoes the scale.
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    dcoefs = None
    if demodulate:
        # sum_ik (s_i w_oik)^2 = sum_i s_i^2 (sum_k w_oik^2): the same sum without the [N, C_out, C_in, kh, kw]
        # modulated weight, whose elementwise ops (and their backward) dominated a CPU projection step.
        dcoefs = ((styles.square().unsqueeze(1) * weight.square().sum(dim=[2, 3]).unsqueeze(0)).sum(dim=2)
                  + 1e-8).rsqrt()                                                      # [N, C_out]
    w = None
    if fused_modconv:
        scale = styles.reshape(batch_size, 1, -1)
        if demodulate:
            scale = scale * dcoefs.reshape(batch_size, -1, 1)                          # [N, C_out, C_in]
        w = weight.unsqueeze(0) * scale.unsqueeze(-1).unsqueeze(-1)

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:
            x = torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        elif noise is not None:
            x = x.add_(noise.to(x.dtype))
        return x

    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``x [N, C, H, W]``: taps ``exp(-t^2 / (2 sigma^2))`` normalised to sum 1 over
    ``|t| <= radius`` (default ``ceil(3 sigma)``; at most ``min(H, W) - 1``), reflect padding, rows then columns.
    ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x
    radius = max(1, min(math.ceil(3 * sigma) if radius is None else int(radius), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

"""EfficientNet-Lite0 (Tan & Le 2019, the Lite variant): the frozen ImageNet feature network of the
perceptual distance (:mod:`portrait3d.losses.perceptual`, where its weights are loaded and the port is
documented) and of the projected discriminator (:mod:`portrait3d.networks.projected`).

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish, and with
the stem (32) and head (1280) widths fixed. Module names mirror the checkpoint's keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EFFICIENTNET_LITE0_LAYERS", "EFFICIENTNET_LITE0_CHANNELS", "EFFICIENTNET_LITE0_STRIDES",
           "EfficientNetLite0"]

# (expand ratio, kernel, stride, output channels, repeats) per stage
_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
_STEM, _HEAD = 32, 1280
_BN_EPS = 1e-3
_LITE0_MEAN = 0.498
_LITE0_STD = 0.502

EFFICIENTNET_LITE0_LAYERS: tuple[str, ...] = ("stem",) + tuple(f"stage{i}" for i in range(7)) + ("head",)
"""Feature taps of :meth:`EfficientNetLite0.features`: ``stem`` (after stem BN + ReLU6, stride 2),
``stage0`` .. ``stage6`` (output of the last block of each stage; strides 2, 4, 8, 16, 16, 32, 32)
and ``head`` (1280 channels after the head conv + BN + ReLU6, stride 32)."""

EFFICIENTNET_LITE0_CHANNELS: dict[str, int] = {"stem": _STEM, **{f"stage{i}": s[3] for i, s in enumerate(_LITE0_STAGES)},
                                                "head": _HEAD}
"""Channels of each tap."""
EFFICIENTNET_LITE0_STRIDES: dict[str, int] = {"stem": 2, "stage0": 2, "stage1": 4, "stage2": 8, "stage3": 16,
                                               "stage4": 16, "stage5": 32, "stage6": 32, "head": 32}
"""Output stride of each tap (input size / tap size, TF "SAME" padding)."""


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ----------------------------------------------------------------------------------------------

def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow ``"SAME"`` padding: output size ``ceil(in / stride)``, the odd pixel at the end."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _Conv(nn.Conv2d):
    """Bias-free convolution with TF "SAME" (default) or symmetric ``k//2`` padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, padding: str = "same"):
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', not {padding!r}")
        super().__init__(cin, cout, kernel, stride, padding=0 if padding == "same" else kernel // 2,
                         groups=groups, bias=False)
        self.tf_same = padding == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS)


def _conv_bn(conv: _Conv, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode as one convolution with the batch norm folded into its weights and bias,
    ``w' = w g / sqrt(v + eps)``, ``b' = beta - m g / sqrt(v + eps)`` (the same function, one kernel fewer: in a
    bf16 training step the separate batch norms of this frozen network took as long as a tenth of its convs)."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * scale[:, None, None, None]
    b = bn.bias - bn.running_mean * scale
    if conv.tf_same:
        x = _same_pad(x, conv.kernel_size[0], conv.stride[0])
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, padding: str):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _Conv(cin, mid, 1, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv(mid, mid, kernel, stride, groups=mid, padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = _Conv(mid, cout, 1, padding=padding)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(_conv_bn(self._expand_conv, self._bn0, y))
        y = F.relu6(_conv_bn(self._depthwise_conv, self._bn1, y))
        y = _conv_bn(self._project_conv, self._bn2, y)
        return y + x if self.residual else y  # (drop-connect is a training-only op)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ImageNet, 1000 classes), our PyTorch definition.

    ``forward(x)``: ``x`` ``[N, 3, H, W]`` already normalised (see :meth:`normalize`) -> logits
    ``[N, 1000]``. ``features(x, layers)`` returns the requested taps of
    :data:`EFFICIENTNET_LITE0_LAYERS`. Any input size works (trained at 224x224).
    Use :func:`load_efficientnet_lite0` for the trained weights.
    """

    mean = _LITE0_MEAN
    std = _LITE0_STD

    def __init__(self, num_classes: int = 1000, padding: str = "same"):
        super().__init__()
        self._conv_stem = _Conv(3, _STEM, 3, 2, padding=padding)
        self._bn0 = _bn(_STEM)
        blocks, self._stage_ends, cin = [], [], _STEM
        for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if r == 0 else 1, padding))
                cin = cout
            self._stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv(cin, _HEAD, 1, padding=padding)
        self._bn1 = _bn(_HEAD)
        self._fc = nn.Linear(_HEAD, num_classes)

    @classmethod
    def normalize(cls, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` -> network input (``(x01 - 0.498) / 0.502`` per channel)."""
        return ((images + 1) * 0.5 - cls.mean) / cls.std

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """The taps ``layers`` (names from :data:`EFFICIENTNET_LITE0_LAYERS`), in that order; the
        network runs only as deep as the deepest requested tap."""
        unknown = [l for l in layers if l not in EFFICIENTNET_LITE0_LAYERS]
        if unknown:
            raise ValueError(f"unknown EfficientNet-Lite0 layer(s) {unknown}; choose from {EFFICIENTNET_LITE0_LAYERS}")
        depth = max(EFFICIENTNET_LITE0_LAYERS.index(l) for l in layers)
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(_conv_bn(self._conv_stem, self._bn0, x))
        out["stem"] = x
        stage = 0
        for i, block in enumerate(self._blocks):
            if stage + 1 > depth:
                break
            x = block(x)
            if i == self._stage_ends[stage]:
                out[f"stage{stage}"] = x
                stage += 1
        if depth == len(EFFICIENTNET_LITE0_LAYERS) - 1:
            out["head"] = F.relu6(_conv_bn(self._conv_head, self._bn1, x))
        return [out[l] for l in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h,) = self.features(x, ["head"])
        return self._fc(h.mean(dim=(2, 3)))

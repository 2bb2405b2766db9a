"""Plain-PyTorch ResNet backbones (He et al. 2016, BasicBlock), shared by every method's encoders and estimators
(3D inversion's E and P, PIE's parameter estimator). No torchvision: the layouts are written out here."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "RESNET_LAYERS", "BackboneOutput", "BasicBlock", "ResNetBackbone"]

RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, not {kind!r}")


class BasicBlock(nn.Module):
    """ResNet basic block: ``3x3 conv -> norm -> ReLU -> 3x3 conv -> norm``, plus the (projected) input, ReLU.

    Shape: ``[N, in_channels, H, W] -> [N, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            _norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class BackboneOutput(NamedTuple):
    """``features``: ``(C2, C3, C4, C5)`` with ``[N, width * 2^k, H / 2^(k+2), W / 2^(k+2)]``
    (``k = 0..3``); ``pooled``: global average of ``C5``, ``[N, 8 * width]``."""

    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    pooled: torch.Tensor


class ResNetBackbone(nn.Module):
    """Plain-PyTorch ResNet (He et al. 2016) of BasicBlocks, without the classifier.

    Stem ``7x7/2 conv -> norm -> ReLU -> 3x3/2 max-pool``, then four stages of ``layers[k]`` blocks
    with ``width * (1, 2, 4, 8)`` channels and strides ``(1, 2, 2, 2)``. The last norm of every
    block starts at zero (Goyal et al. 2017), so each block starts as the identity.

    Args:
        depth: 18 or 34 (ResNet-18 / ResNet-34 layer counts), ignored when ``layers`` is given.
        in_channels: input channels.
        width: channels of the first stage (64 for the standard networks).
        layers: blocks per stage, e.g. ``(1, 1, 1, 1)`` for tests.
        norm: ``"batch"`` (BatchNorm, standard) or ``"group"`` (GroupNorm, batch-size independent).

    Shape: ``[N, in_channels, H, W] -> BackboneOutput`` (``H, W`` multiples of 32 keep the pyramid exact).
    """

    def __init__(self, depth: int = 34, in_channels: int = 3, width: int = 64,
                 layers: Sequence[int] | None = None, norm: str = "batch") -> None:
        super().__init__()
        if layers is None:
            if depth not in RESNET_LAYERS:
                raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)} (BasicBlock ResNets), not {depth}")
            layers = RESNET_LAYERS[depth]
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, not {layers}")
        if width < 1 or in_channels < 1:
            raise ValueError("width and in_channels must be positive")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        self.width = width
        self.out_channels = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = _norm(norm, width)
        stages = []
        cin = width
        for k, (n, cout) in enumerate(zip(layers, self.out_channels)):
            blocks = [BasicBlock(cin, cout, 1 if k == 0 else 2, norm)]
            blocks += [BasicBlock(cout, cout, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @property
    def pooled_channels(self) -> int:
        return self.out_channels[-1]

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return BackboneOutput((c2, c3, c4, c5), c5.mean(dim=(2, 3)))

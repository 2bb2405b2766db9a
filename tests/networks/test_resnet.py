"""The shared ResNet backbone: pyramid shapes, layouts, norms."""

from __future__ import annotations

import pytest
import torch

from portrait3d.networks.resnet import ResNetBackbone


def _images(n: int, res: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_backbone_pyramid_shapes():
    net = ResNetBackbone(layers=(1, 1, 1, 1), width=8).eval()
    out = net(_images(2, 64))
    assert [tuple(f.shape) for f in out.features] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert out.pooled.shape == (2, 64)
    r34 = ResNetBackbone(depth=34)
    assert [len(s) for s in (r34.layer1, r34.layer2, r34.layer3, r34.layer4)] == [3, 4, 6, 3]
    assert r34.pooled_channels == 512
    assert ResNetBackbone(depth=18, width=4).layer3.__len__() == 2
    with pytest.raises(ValueError):
        ResNetBackbone(depth=50)
    with pytest.raises(ValueError):
        ResNetBackbone(layers=(1, 1, 1), width=8)
    gn = ResNetBackbone(layers=(1, 1, 1, 1), width=8, norm="group").eval()
    assert gn(_images(1, 64)).pooled.shape == (1, 64)

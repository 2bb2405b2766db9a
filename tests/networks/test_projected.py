"""Projected discriminator (Sauer et al. 2021) on tiny inputs with a random-weight feature network."""

from __future__ import annotations

import pytest
import torch

from portrait3d.networks.discriminator import Discriminator, DiscriminatorConfig
from portrait3d.networks.efficientnet import EfficientNetLite0
from portrait3d.networks.projected import ProjectedDiscriminator, ProjectedDiscriminatorConfig, VisionAidedDiscriminator

pytestmark = pytest.mark.usefixtures("one_thread")


def _disc(c_dim: int = 0, **kw) -> ProjectedDiscriminator:
    torch.manual_seed(0)
    cfg = ProjectedDiscriminatorConfig(c_dim=c_dim, feature_resolution=64, proj_channels=8, head_channels=8,
                                       head_channels_max=16, cmap_dim=8, **kw)
    return ProjectedDiscriminator(cfg, EfficientNetLite0()).train()


def test_forward_backward_feature_net_frozen():
    D = _disc()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    logits = D(x)
    # taps at strides 4, 8, 16, 32 of 64 px: 16, 8, 4, 2 -> heads end at 4, 4, 4, 2
    assert logits.shape == (4, 16 + 16 + 16 + 4) and logits.dtype == torch.float32
    D.requires_grad_(True)
    (torch.relu(1 - logits).mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0             # gradients reach the image
    assert all(p.grad is None for p in D.features.parameters())      # ... never the feature net's weights
    assert all(not p.requires_grad for p in D.features.parameters())
    assert all(p.grad is not None for p in D.heads.parameters() if p.requires_grad)
    assert not D.features.training                                    # BN statistics of ImageNet kept


def test_state_dict_holds_heads_and_fixed_mixing_only():
    D = _disc()
    keys = D.state_dict().keys()
    assert not any(k.startswith("_features") or "_conv_stem" in k for k in keys)
    assert any(k.startswith("mixer.ccm") for k in keys) and any(k.startswith("heads.") for k in keys)
    assert all(not k.startswith("mixer.") for k, _ in D.named_parameters())  # mixing is not trained
    again = _disc()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in D.state_dict().items() if k.startswith("mixer."))
    D.double()
    assert next(D.features.parameters()).dtype == torch.float64      # _apply moves the frozen net too


def test_conditioned_and_vision_aided():
    D = _disc(c_dim=25)
    c = torch.randn(2, 25)
    x = torch.randn(2, 3, 64, 64)
    assert D(x, c).shape == (2, 52)
    with pytest.raises(ValueError, match="conditioned"):
        D(x)
    pix = Discriminator(DiscriminatorConfig(img_resolution=32, channel_base=64, channel_max=16))
    both = VisionAidedDiscriminator(pix, _disc())
    a, b = both(torch.randn(4, 3, 32, 32))
    assert a.shape == (4, 1) and b.shape[0] == 4


def test_config_validation():
    with pytest.raises(ValueError, match="taps"):
        ProjectedDiscriminatorConfig(taps=["stage9"]).validate()
    with pytest.raises(ValueError, match="increasing"):
        ProjectedDiscriminatorConfig(taps=["stage2", "stage1"]).validate()
    with pytest.raises(ValueError, match="multiple"):
        ProjectedDiscriminatorConfig(feature_resolution=40).validate()


def test_dual_projected_judges_image_and_raw_render_with_the_camera():
    from portrait3d.networks.projected import DualProjectedDiscriminator

    torch.manual_seed(0)
    cfg = ProjectedDiscriminatorConfig(c_dim=25, feature_resolution=64, proj_channels=8, head_channels=8,
                                       head_channels_max=16, cmap_dim=8)
    D = DualProjectedDiscriminator(cfg, EfficientNetLite0()).train()
    image = torch.randn(2, 3, 32, 32, requires_grad=True)
    raw = torch.randn(2, 3, 16, 16, requires_grad=True)
    c = torch.randn(2, 25)
    D.eval()  # (in training, spectral norm's power iteration moves a little at every call)
    k = D(image, c).shape[1]
    logits = D({"image": image, "image_raw": raw}, c)
    assert logits.shape == (2, 2 * k)
    assert torch.allclose(logits[:, :k], D(image, c), atol=1e-6)  # first half: the image alone
    assert not torch.allclose(logits, D({"image": image, "image_raw": raw}, torch.randn(2, 25)))  # camera matters
    D.train()
    logits = D({"image": image, "image_raw": raw}, c)
    logits.mean().backward()
    assert image.grad.abs().sum() > 0 and raw.grad.abs().sum() > 0  # both halves reach the generator
    assert all(p.grad is None for p in D.features.parameters())


def test_efficientnet_eval_folds_batch_norm_into_the_convolutions_exactly():
    from portrait3d.networks import efficientnet as E

    torch.manual_seed(0)
    net = E.EfficientNetLite0()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)

    def reference(mod: torch.nn.Module, inp: torch.Tensor) -> list[torch.Tensor]:
        # the unfused definition: batch norm after each convolution, with the running statistics
        import torch.nn.functional as F

        def cb(conv, bn, t):
            return F.batch_norm(conv(t), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

        y = F.relu6(cb(mod._conv_stem, mod._bn0, inp))
        outs = [y]
        for i, blk in enumerate(mod._blocks):
            z = y
            if blk.has_expand:
                z = F.relu6(cb(blk._expand_conv, blk._bn0, z))
            z = F.relu6(cb(blk._depthwise_conv, blk._bn1, z))
            z = cb(blk._project_conv, blk._bn2, z)
            y = z + y if blk.residual else z
            if i in mod._stage_ends[:3]:
                outs.append(y)
        return outs

    with torch.no_grad():
        got = net.eval().features(x, ["stem", "stage0", "stage1", "stage2"])
        want = reference(net, x)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)

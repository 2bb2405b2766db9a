"""Shared fixtures: paths into ../shared and tiny random networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "fixtures" / "parity"


def shared_path(relative: str) -> Path:
    """Path under ../shared; skips the test cleanly when it is absent."""
    p = SHARED / relative
    if not p.exists():
        pytest.skip(f"{p} not available (../shared is absent)")
    return p


def parity_file(name: str) -> Path:
    """Path of a parity fixture; skips the test cleanly when ../shared is absent."""
    p = PARITY / name
    if not p.exists():
        pytest.skip(f"parity fixture {p} not available (../shared is absent)")
    return p


@pytest.fixture
def tiny_stylegan2():
    from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

    torch.manual_seed(0)
    g = Generator(StyleGAN2Config(z_dim=32, w_dim=32, img_resolution=16,
                                  mapping=MappingConfig(num_layers=2),
                                  synthesis=SynthesisConfig(channel_base=256, channel_max=32)))
    # Non-trivial noise strengths and w_avg so every term of the forward pass matters.
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
        g.mapping.w_avg.normal_()
    return g.eval()


@pytest.fixture
def tiny_eg3d():
    from portrait3d.networks.eg3d.triplane import EG3DConfig, RenderingConfig, TriPlaneGenerator
    from portrait3d.networks.stylegan2 import MappingConfig, SynthesisConfig

    torch.manual_seed(0)
    g = TriPlaneGenerator(EG3DConfig(
        z_dim=32, w_dim=512, img_resolution=128, neural_rendering_resolution=16, sr_num_fp16_res=4,
        mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
        backbone=SynthesisConfig(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None),
        rendering=RenderingConfig(image_resolution=128,
                                  superresolution_module="training.superresolution.SuperresolutionHybrid2X",
                                  depth_resolution=8, depth_resolution_importance=8),
        plane_resolution=32))
    return g.eval()

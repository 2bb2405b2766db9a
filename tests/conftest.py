"""Shared fixtures: paths into ../shared and tiny random networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def run_cli(*args):
    """``portrait3d ARGS...`` in click's test runner (arguments as strings); returns the click ``Result``."""
    from click.testing import CliRunner

    from portrait3d.interfaces.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, pattern: str | None = None) -> None:
    """A usage failure: exit code 2, and stderr ends with the one ``error: ...`` line (containing ``pattern`` if
    given) -- progress bars and notes may come before it -- and no traceback."""
    import re

    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in re.split(r"[\r\n]+", result.stderr) if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr[-2000:]
    err = lines[-1]
    assert "Traceback" not in result.output, err
    if pattern is not None:
        assert pattern in err, err


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


def make_tiny_eg3d():
    """A small random EG3D (128 px output, 16 px neural rendering) for fast end-to-end tests."""
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


def make_tiny_wtri_encoder(G):
    """A small random W_tri encoder for ``G`` (2 iterations) whose heads are not zero, so that its code moves."""
    from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig

    torch.manual_seed(0)
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, width=8, layers=(1, 1, 1, 1), head_channels=16,
                                                      fpn_channels=8, input_size=64, iterations=2))
    with torch.no_grad():
        enc.mlp[-1].weight.normal_(0, 0.01)
        enc.sr_head.weight.normal_(0, 0.01)
    return enc


@pytest.fixture
def tiny_eg3d():
    return make_tiny_eg3d()


def make_cli_stylegan2():
    """A 32 px random StyleGAN2 (z = w = 16) that CLI tests save and pass as ``--network``."""
    from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

    torch.manual_seed(0)
    return Generator(StyleGAN2Config(z_dim=16, w_dim=16, img_resolution=32, mapping=MappingConfig(num_layers=2),
                                     synthesis=SynthesisConfig(channel_base=128, channel_max=16)))


# fork starts multi-process test workers in ~0.1 s instead of re-importing torch in each (~5-15 s on 2 busy cores).
START_METHOD = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"


def make_dataset(root: Path, n: int, res: int, seed: int = 0) -> Path:
    """A dataset folder in :mod:`portrait3d.face.dataset`'s on-disk format: discs on a background."""
    from portrait3d.networks.eg3d.camera import camera_from_angles

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    images = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        images.append(np.where(disc, rng.uniform(0, 255, 3), rng.uniform(0, 128, 3)).astype(np.uint8))
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", np.stack(images))
    cams = camera_from_angles(rng.uniform(-30, 30, n).tolist(), rng.uniform(-15, 15, n).tolist())
    labels = [[f"{i:04d}.jpg", c.tolist()] for i, c in enumerate(cams)]
    (root / "labels.json").write_text(json.dumps({"labels": labels}))
    return root


def make_photo_dataset(root: Path, n: int, size: int = 128) -> Path:
    """A dataset folder of the first ``n`` UTKFace photos of ../shared, resized (not aligned) to ``size``, with their
    file names (which carry UTKFace's labels) and zero cameras; skips the test when ../shared is absent."""
    from PIL import Image

    photos = sorted(shared_path("data/utkface").iterdir())[:n]
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)))
                                           for p in photos]))
    (root / "labels.json").write_text(json.dumps({"labels": [[p.name, [0.0] * 25] for p in photos]}))
    return root


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on the 2-core machine, busy with training, two OpenMP threads
    oversubscribe and made Inception / identity / projector tests 3-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

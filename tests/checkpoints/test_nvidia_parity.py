"""Official NVIDIA pickles in ../shared/fixtures/parity load and reproduce the official outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import parity_file

from portrait3d import load_network
from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
from portrait3d.networks.stylegan2 import Generator, SynthesisBlock

TOL = 1e-4


def _arrays(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(parity_file(name)).items()}


@pytest.fixture(scope="module")
def sg2():
    return load_network(parity_file("stylegan2_64.pkl")), _arrays("stylegan2_64.npz")


@pytest.fixture(scope="module")
def eg3d():
    return load_network(parity_file("eg3d_128.pkl")), _arrays("eg3d_128.npz")


def test_stylegan2_config_read_from_pickle(sg2):
    G, _ = sg2
    meta = json.loads(parity_file("stylegan2_64.json").read_text())
    assert isinstance(G, Generator)
    assert G.num_ws == meta["num_ws"]
    assert G.img_resolution == meta["init_kwargs"]["img_resolution"]
    assert G.mapping.w_avg_beta == 0.995  # ADA's default, read from the pickle


@pytest.mark.parametrize("psi,key", [(1.0, "ws_psi1"), (0.7, "ws_psi07")])
def test_stylegan2_mapping(sg2, psi, key):
    G, d = sg2
    ws = G.mapping(d["z"], d["c"], truncation_psi=psi)
    assert (ws - d[key]).abs().max().item() < TOL


def _fp16_on_cpu(G: Generator, on: bool) -> None:
    for m in G.modules():
        if isinstance(m, SynthesisBlock):
            m.fp16_on_cpu = on


@pytest.mark.parametrize("ws_key,img_key", [("ws_psi1", "img_psi1"), ("ws_plus", "img_plus")])
def test_stylegan2_synthesis(sg2, ws_key, img_key):
    G, d = sg2
    img = G.synthesis(d[ws_key], noise_mode="const")
    assert img.shape == d[img_key].shape
    err = (img - d[img_key]).abs().max().item()
    # Our CPU path is float32. StyleGAN2-ADA's own code has no CPU fallback to float32: its
    # use_fp16 blocks (here the top four) run in float16 even on a CPU, which is how the expected
    # image was produced, so float32 differs from it by float16 rounding (measured 7.0e-3 max,
    # 1.1e-3 mean on images of magnitude ~5). The test below pins that explanation down.
    assert err < 1e-2, err


def test_stylegan2_image_gap_is_float16_rounding(sg2):
    """The float32-vs-expected gap is the same size as our own float32-vs-float16 gap, and the
    fp16-emulated path is closer to the expected image than float32 is."""
    G, d = sg2
    ref = d["img_psi1"]
    img32 = G.synthesis(d["ws_psi1"], noise_mode="const")
    _fp16_on_cpu(G, True)
    try:
        img16 = G.synthesis(d["ws_psi1"], noise_mode="const")
    finally:
        _fp16_on_cpu(G, False)
    gap_ref = (img32 - ref).abs().mean().item()
    gap_16 = (img32 - img16).abs().mean().item()
    assert 0.5 < gap_ref / gap_16 < 2.0
    assert (img16 - ref).abs().mean().item() < gap_ref
    # And the part of the network that ADA runs in float32 (mapping) matches to 1e-4 above.


def test_eg3d_config_read_from_pickle(eg3d):
    G, _ = eg3d
    meta = json.loads(parity_file("eg3d_128.json").read_text())
    assert isinstance(G, TriPlaneGenerator)
    assert G.neural_rendering_resolution == meta["neural_rendering_resolution"]
    assert G.rendering_kwargs["depth_resolution"] == meta["init_kwargs"]["rendering_kwargs"]["depth_resolution"]


def test_eg3d_mapping(eg3d):
    G, d = eg3d
    assert (G.mapping(d["z"], d["c"], truncation_psi=1) - d["ws"]).abs().max().item() < TOL


def test_eg3d_planes(eg3d):
    G, d = eg3d
    planes = G.backbone.synthesis(d["ws"], noise_mode="const").view(len(d["ws"]), 3, 32, 256, 256)
    assert (planes[0, :, :, 96:160, 96:160] - d["planes_crop"]).abs().max().item() < TOL


def test_eg3d_rendering(eg3d):
    G, d = eg3d
    out = G.synthesis(d["ws"], d["c"], noise_mode="const", deterministic=True)
    for key in ("image_raw", "image_depth", "image"):
        assert out[key].shape == d[key].shape, key
        assert (out[key] - d[key]).abs().max().item() < TOL, key


def test_eg3d_random_sampling_differs_but_stays_close(eg3d):
    """Without deterministic=True the stratified jitter is random, as in the official renderer."""
    G, d = eg3d
    torch.manual_seed(1)
    out = G.synthesis(d["ws"][:1], d["c"][:1], noise_mode="const")
    assert not torch.equal(out["image_depth"], d["image_depth"][:1])
    assert (out["image_depth"] - d["image_depth"][:1]).abs().mean().item() < 0.05

"""The default models ship inside the package and load by name, with no ../shared needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import portrait3d
from portrait3d import camera_from_angles, load_network
from portrait3d.checkpoints.load import BUILTIN_NETWORKS, builtin_network_path
from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
from portrait3d.networks.stylegan2 import Generator

PKG = Path(portrait3d.__file__).resolve().parent


@pytest.mark.parametrize("name", sorted(BUILTIN_NETWORKS))
def test_shipped_with_model_card(name):
    folder = (PKG / BUILTIN_NETWORKS[name]).parent
    assert (PKG / BUILTIN_NETWORKS[name]).is_file()
    card = (folder / "MODEL_CARD.md").read_text()
    assert "UTKFace" in card and "non-commercial" in card.lower()


def test_total_size_within_budget():
    """Generators and every file shipped beside them (editors, lifting, pose estimator, cards, previews)."""
    total = sum(p.stat().st_size for p in (PKG / "models").rglob("*") if p.is_file())
    assert total <= 80 * 2**20


def test_builtin_network_path_names_the_shipped_generator():
    for name, rel in BUILTIN_NETWORKS.items():
        assert builtin_network_path(name) == PKG / rel
    assert builtin_network_path("no-such-network") is None
    assert builtin_network_path(PKG / BUILTIN_NETWORKS["default-2d"]) is None  # a path is not a name


def test_default_2d_generates():
    G = load_network("default-2d")
    assert isinstance(G, Generator) and G.img_resolution == 128
    img = G(torch.randn(2, G.z_dim), None, truncation_psi=0.7, noise_mode="const")
    assert img.shape == (2, 3, 128, 128) and torch.isfinite(img).all()


def test_default_3d_generates():
    G = load_network("default-3d")
    assert isinstance(G, TriPlaneGenerator) and G.img_resolution == 128
    c = camera_from_angles([0.0, 20.0], [0.0, 0.0])
    ws = G.mapping(torch.randn(2, G.z_dim), camera_from_angles([0.0, 0.0], [0.0, 0.0]), truncation_psi=0.7)
    out = G.synthesis(ws, c, noise_mode="const", deterministic=True)
    assert out["image"].shape == (2, 3, 128, 128) and torch.isfinite(out["image"]).all()

"""Landmark data: latent spaces, synthesis, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.methods.nrsfm.data import (
    LandmarkDataConfig,
    LandmarkSet,
    build_landmark_set,
    latents_to_ws,
    sample_latents,
    synthesize,
)


@pytest.mark.parametrize("space", ["z", "w", "w+"])
def test_sample_latents_shapes_and_determinism(tiny_stylegan2, space):
    G = tiny_stylegan2
    a = sample_latents(G, 5, space, seed=3)
    b = sample_latents(G, 5, space, seed=3)
    assert torch.equal(a, b)
    want = {"z": (5, G.z_dim), "w": (5, G.w_dim), "w+": (5, G.num_ws, G.w_dim)}[space]
    assert tuple(a.shape) == want
    ws = latents_to_ws(G, a.reshape(5, -1) if space == "w+" else a, space)
    assert tuple(ws.shape) == (5, G.num_ws, G.w_dim)


def test_w_plus_codes_are_style_mixed(tiny_stylegan2):
    wp = sample_latents(tiny_stylegan2, 20, "w+", seed=0)
    # Layer 0 and the last layer come from different w for every code (crossover in 1..num_ws-1).
    assert not torch.allclose(wp[:, 0], wp[:, -1])
    # ... and every layer equals either the first or the last layer's code.
    for i in range(wp.shape[1]):
        same = torch.isclose(wp[:, i], wp[:, 0]).all(1) | torch.isclose(wp[:, i], wp[:, -1]).all(1)
        assert same.all()


def test_z_space_matches_mapping(tiny_stylegan2):
    G = tiny_stylegan2
    z = sample_latents(G, 3, "z", seed=1)
    w = G.mapping(z, torch.zeros(3, 0))
    assert torch.allclose(latents_to_ws(G, z, "z"), w)
    img = synthesize(G, z, "z")
    assert img.shape == (3, 3, G.img_resolution, G.img_resolution)


def test_build_landmark_set_caches(tiny_stylegan2, tmp_path):
    cfg = LandmarkDataConfig(num_samples=6, space="w", backend="dlib", detector="template", batch=4)
    s = build_landmark_set(tiny_stylegan2, cfg, cache_dir=tmp_path, progress=False)
    assert s.landmarks.shape == (6, 68, 2) and s.latents.shape == (6, tiny_stylegan2.w_dim)
    assert s.valid.all()  # the template box always gives dlib a face region
    files = list(tmp_path.glob("landmarks_*.npz"))
    assert len(files) == 1
    again = build_landmark_set(tiny_stylegan2, cfg, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.landmarks, s.landmarks)
    # Another generator (same config) must not hit this cache.
    with torch.no_grad():
        tiny_stylegan2.synthesis.b4.const.add_(1.0)
    build_landmark_set(tiny_stylegan2, cfg, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("landmarks_*.npz"))) == 2


def test_landmark_set_rejects_garbage(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a landmark set"):
        LandmarkSet.load(p)


def test_config_validation():
    with pytest.raises(ValueError, match="latent space"):
        LandmarkDataConfig(space="s").validate()
    with pytest.raises(ValueError, match="backend"):
        LandmarkDataConfig(backend="x").validate()

"""Pseudo pairs: shapes, determinism, camera ranges and conditioning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from portrait3d.methods.inversion3d import PseudoPairConfig, PseudoPairStream, sample_poses, sample_pseudo_pairs
from portrait3d.networks.eg3d.camera import camera_from_angles, pose_angles_from_camera

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pairs_shapes_and_conditioning(tiny_eg3d):
    G = tiny_eg3d
    cfg = PseudoPairConfig(truncation_psi=0.5)
    pairs = sample_pseudo_pairs(G, 2, cfg, _gen(0))
    assert pairs["ws"].shape == (2, G.num_ws, G.w_dim)
    assert pairs["z"].shape == (2, G.z_dim)
    assert pairs["camera"].shape == (2, 25) and pairs["angles"].shape == (2, 3) and pairs["translation"].shape == (2, 3)
    assert pairs["image"].shape == (2, 3, 128, 128) and pairs["depth"].shape == (2, 1, 16, 16)
    assert torch.isfinite(pairs["image"]).all() and torch.isfinite(pairs["depth"]).all()
    # Conditioning camera = rendering camera; the label is camera_from_angles' for the drawn angles.
    a = pairs["angles"]
    assert torch.equal(pairs["camera"], camera_from_angles(a[:, 0], a[:, 1]))
    with torch.no_grad():
        ws = G.mapping(pairs["z"], pairs["camera"], truncation_psi=0.5)
        img = G.synthesis(ws, pairs["camera"], noise_mode="const", deterministic=True)["image"]
    assert torch.equal(ws, pairs["ws"]) and torch.equal(img, pairs["image"])


def test_pairs_deterministic_per_seed(tiny_eg3d):
    cfg = PseudoPairConfig()
    a = sample_pseudo_pairs(tiny_eg3d, 2, cfg, _gen(3))
    b = sample_pseudo_pairs(tiny_eg3d, 2, cfg, _gen(3))
    c = sample_pseudo_pairs(tiny_eg3d, 2, cfg, _gen(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["z"], c["z"]) and not torch.equal(a["image"], c["image"])
    # Default generator: seeded with cfg.seed; global RNG untouched and irrelevant.
    torch.manual_seed(123)
    d = sample_pseudo_pairs(tiny_eg3d, 1, dataclasses.replace(cfg, seed=9))
    torch.manual_seed(456)
    e = sample_pseudo_pairs(tiny_eg3d, 1, dataclasses.replace(cfg, seed=9))
    assert all(torch.equal(d[k], e[k]) for k in d)


def test_stream_is_deterministic_and_random_access(tiny_eg3d):
    cfg = PseudoPairConfig(seed=5)
    s1 = PseudoPairStream(tiny_eg3d, 1, cfg)
    b0, b1 = next(s1), next(s1)
    s2 = PseudoPairStream(tiny_eg3d, 1, cfg, start=1)
    assert all(torch.equal(b1[k], v) for k, v in next(s2).items())
    assert not torch.equal(b0["z"], b1["z"])
    assert torch.equal(PseudoPairStream(tiny_eg3d, 1, cfg).batch_at(0)["image"], b0["image"])
    assert not torch.equal(PseudoPairStream(tiny_eg3d, 1, cfg, key=1).batch_at(0)["z"], b0["z"])
    assert not torch.equal(PseudoPairStream(tiny_eg3d, 1, dataclasses.replace(cfg, seed=6)).batch_at(0)["z"], b0["z"])
    with pytest.raises(ValueError):
        PseudoPairStream(tiny_eg3d, 0, cfg)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_cameras_within_range(distribution):
    cfg = PseudoPairConfig(yaw_range=(-25.0, 35.0), pitch_range=(-10.0, 15.0), roll_range=(-5.0, 5.0),
                           distribution=distribution)
    angles, translation = sample_poses(4000, cfg, _gen(0))
    for i, (lo, hi) in enumerate((cfg.yaw_range, cfg.pitch_range, cfg.roll_range)):
        assert angles[:, i].min() >= lo and angles[:, i].max() <= hi
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        if distribution == "uniform":  # covers the range evenly
            assert abs(float(angles[:, i].mean()) - mid) < 0.05 * half
            assert angles[:, i].min() < lo + 0.02 * half and angles[:, i].max() > hi - 0.02 * half
        else:  # std (hi - lo) / 4, clipped at +-2 std (about 4.6% at the bounds)
            assert abs(float(angles[:, i].std()) - half / 2) < 0.1 * half
            frac = float(((angles[:, i] == lo) | (angles[:, i] == hi)).float().mean())
            assert 0.02 < frac < 0.08
    assert torch.equal(translation, torch.zeros(4000, 3))
    # The labels encode the drawn angles exactly (inverse of camera_from_angles).
    cams = camera_from_angles(angles[:50, 0], angles[:50, 1], roll_deg=angles[:50, 2])
    yaw, pitch, roll, radius = pose_angles_from_camera(cams)
    assert torch.allclose(yaw.float(), angles[:50, 0], atol=1e-3)
    assert torch.allclose(pitch.float(), angles[:50, 1], atol=1e-3)
    assert torch.allclose(roll.float(), angles[:50, 2], atol=1e-3)


def test_roll_off_by_default_and_translation(tiny_eg3d):
    angles, translation = sample_poses(500, PseudoPairConfig(), _gen(1))
    assert torch.equal(angles[:, 2], torch.zeros(500))
    assert (angles[:, 0].abs() <= 30).all() and (angles[:, 1].abs() <= 20).all()
    cfg = PseudoPairConfig(translation_std=0.05, roll_range=(-10.0, 10.0))
    _, t = sample_poses(4000, cfg, _gen(2))
    assert abs(float(t.std()) - 0.05) < 0.005
    pairs = sample_pseudo_pairs(tiny_eg3d, 2, cfg, _gen(2))
    a = pairs["angles"]
    ref = camera_from_angles(a[:, 0], a[:, 1], roll_deg=a[:, 2])
    assert torch.allclose(pairs["camera"][:, [3, 7, 11]] - ref[:, [3, 7, 11]], pairs["translation"], atol=1e-6)
    assert (a[:, 2] != 0).all()


def test_config_validation():
    for bad in (dict(yaw_range=(10.0, -10.0)), dict(pitch_range=(-90.0, 10.0)), dict(distribution="beta"),
                dict(translation_std=-1.0)):
        with pytest.raises(ValueError):
            PseudoPairConfig(**bad).validate()
    cfg = PseudoPairConfig(roll_range=(-3.0, 4.0))
    assert PseudoPairConfig.from_dict(cfg.to_dict()) == cfg


def test_photometric_jitter_keeps_shape_range_and_is_reproducible():
    from portrait3d.methods.inversion3d.pseudo import photometric_jitter

    x = torch.rand(4, 3, 16, 16, generator=_gen(0)) * 2 - 1
    assert photometric_jitter(x, 0.0, _gen(1)) is x
    a, b = photometric_jitter(x, 1.0, _gen(1)), photometric_jitter(x, 1.0, _gen(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1
    change = (a - x).abs().mean((1, 2, 3))
    assert (change > 0.01).all()  # every image is changed
    assert not torch.equal(a, photometric_jitter(x, 1.0, _gen(2)))
    weak = (photometric_jitter(x, 0.1, _gen(1)) - x).abs().mean()
    assert weak < change.mean()  # strength scales the change

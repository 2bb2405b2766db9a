"""Pivotal tuning of a tiny random StyleGAN2: it fits an out-of-range target at the pivot, leaves G alone, and its
locality regulariser holds the renders of other latents."""

from __future__ import annotations

import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.projector.pti import PivotalTuningConfig, locality_latent, pivotal_tuning

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(G):
    return {k: v.detach().clone() for k, v in G.state_dict().items()}


def _pivot_and_target(G):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.z_dim, generator=gen), None)
        other = G.synthesis(G.mapping(torch.randn(1, G.z_dim, generator=gen), None), noise_mode="const")
    return ws, other  # a target that no change of latent explains: another sample's image


def test_tuning_fits_the_target_and_leaves_G_alone(tiny_stylegan2):
    G = tiny_stylegan2
    ws, target = _pivot_and_target(G)
    before = _snapshot(G)
    res = pivotal_tuning(G, ws, target, PivotalTuningConfig(steps=60, lr=3e-3, perceptual_weight=0.0),
                         progress=False)
    mse = [r["mse"] for r in res.losses]
    assert len(mse) == 60 and mse[-1] < 0.3 * mse[0]
    torch.testing.assert_close((res.image - target).square().mean(), torch.tensor(mse[-1]), rtol=0.3, atol=1e-3)
    after = _snapshot(G)
    assert all(torch.equal(before[k], after[k]) for k in before) and all(p.grad is None for p in G.parameters())
    tuned = res.generator.state_dict()
    # only the synthesis network moved: the mapping (and the latent statistics editors rely on) is G's
    assert all(torch.equal(tuned[k], before[k]) for k in before if k.startswith("mapping."))
    assert any(not torch.equal(tuned[k], before[k]) for k in before if k.startswith("synthesis."))
    assert all(not p.requires_grad for p in res.generator.parameters()) and not res.generator.training


def test_fine_layer_tuning_moves_only_the_blocks_asked(tiny_stylegan2):
    G = tiny_stylegan2
    ws, target = _pivot_and_target(G)
    top = max(G.synthesis.block_resolutions)
    res = pivotal_tuning(G, ws, target, PivotalTuningConfig(steps=20, lr=3e-3, perceptual_weight=0.0,
                                                             min_resolution=top), progress=False)
    before, tuned = _snapshot(G), res.generator.state_dict()
    moved = {k for k in before if not torch.equal(tuned[k], before[k])}
    assert moved and all(k.startswith(f"synthesis.b{top}.") for k in moved)
    assert res.losses[-1]["mse"] < res.losses[0]["mse"]
    with pytest.raises(UsageError, match="no synthesis block"):
        pivotal_tuning(G, ws, target, PivotalTuningConfig(steps=1, min_resolution=2 * top), progress=False)


def test_locality_latent_lies_alpha_from_the_pivot():
    w_p, w_z = torch.zeros(2, 8), torch.randn(2, 8)
    w_r = locality_latent(w_p, w_z, 30.0)
    torch.testing.assert_close((w_r - w_p).norm(dim=-1), torch.full((2,), 30.0))
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(w_r - w_p, w_z - w_p), torch.ones(2))
    # a [N, num_ws, w_dim] code moves alpha in all its layers together (PTI's norm over the whole code)
    w_p, w_z = torch.zeros(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close((locality_latent(w_p, w_z, 30.0) - w_p).flatten(1).norm(dim=1), torch.full((2,), 30.0))


def test_locality_regulariser_holds_other_latents(tiny_stylegan2):
    G = tiny_stylegan2
    ws, target = _pivot_and_target(G)
    probe = G.mapping(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(9)), None)
    with torch.no_grad():
        ref = G.synthesis(probe, noise_mode="const")

    def drift(weight: float) -> float:
        cfg = PivotalTuningConfig(steps=40, lr=3e-3, perceptual_weight=0.0, locality_weight=weight, locality_alpha=3.0)
        res = pivotal_tuning(G, ws, target, cfg, progress=False)
        with torch.no_grad():
            return float((res.generator.synthesis(probe, noise_mode="const") - ref).square().mean())

    assert drift(10.0) < 0.7 * drift(0.0)


def test_bad_settings_are_refused(tiny_stylegan2):
    G = tiny_stylegan2
    ws, target = _pivot_and_target(G)
    with pytest.raises(UsageError, match="lr"):
        pivotal_tuning(G, ws, target, PivotalTuningConfig(lr=-1.0), progress=False)
    with pytest.raises(UsageError, match="precision"):
        pivotal_tuning(G, ws, target, PivotalTuningConfig(precision="fp8"), progress=False)
    with pytest.raises(UsageError, match="min_resolution"):
        pivotal_tuning(G, ws, target, PivotalTuningConfig(min_resolution=-1), progress=False)
    with pytest.raises(UsageError, match="pivot"):
        pivotal_tuning(G, ws[:, :1], target, PivotalTuningConfig(steps=1), progress=False)

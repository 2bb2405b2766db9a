"""The regressor φ (eq. 12)."""

from __future__ import annotations

import numpy as np
import torch

from portrait3d.methods.nrsfm.regressor import ParamRegressor, RegressorConfig, train_regressor


def test_regressor_learns_a_smooth_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 16)).astype(np.float32)
    a = rng.normal(size=(16, 5))
    # Parameters of very different scales (degrees vs. small coefficients), as q has.
    q = np.tanh(x @ a) * np.array([30.0, 10.0, 0.01, 1.0, 0.2]) + np.array([0.0, 5.0, 0.5, 0.0, 0.3])
    phi, hist = train_regressor(x, q, RegressorConfig(hidden=64, epochs=40, batch=64, lr=3e-3), progress=False)
    assert hist["val"][-1] < 0.1 * hist["val"][0], hist["val"]
    with torch.no_grad():
        pred = phi(torch.as_tensor(x[:200])).numpy()
    # Relative error per component, scale-free thanks to the output normalisation.
    rel = np.abs(pred - q[:200]).mean(0) / q[:200].std(0)
    assert (rel < 0.3).all(), rel


def test_forward_denormalises():
    phi = ParamRegressor(4, 3, hidden=8, layers=2)
    with torch.no_grad():
        phi.q_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        phi.q_std.copy_(torch.tensor([10.0, 1.0, 0.1]))
    x = torch.randn(5, 4)
    assert torch.allclose(phi(x), phi.q_mean + phi.q_std * phi.normalised(x))


def test_rejects_non_finite():
    import pytest

    with pytest.raises(ValueError, match="finite"):
        train_regressor(np.zeros((20, 3)), np.full((20, 2), np.nan), RegressorConfig(epochs=1), progress=False)

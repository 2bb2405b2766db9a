"""Tests for portrait3d.methods.nrsfm.fit: per-image parameters for a fixed model (eq. 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.methods.nrsfm.fit import fit_params, initial_params, nearest_scaled_rotation, reprojection_error
from portrait3d.methods.nrsfm.model import rotation_matrix
from tests.methods.nrsfm.test_factorize import synthetic_landmarks, synthetic_model, synthetic_params

torch.set_num_threads(1)


def _with_yaw_50(q: torch.Tensor) -> torch.Tensor:
    q = q.clone()
    q[0, 1:4] = torch.tensor([50.0, 10.0, -5.0], dtype=q.dtype)
    q[1, 1:4] = torch.tensor([-50.0, -15.0, 8.0], dtype=q.dtype)
    return q


def test_fit_recovers_exact_params():
    model = synthetic_model(num_basis=3)
    q = _with_yaw_50(synthetic_params(model, 100, seed=5, yaw=60.0, pitch=25.0, roll=20.0))
    x = synthetic_landmarks(model, q, noise=0.0)
    qf = fit_params(model, x)
    assert qf.shape == q.shape and qf.dtype == torch.float64
    err = (qf - q).abs().max(0).values
    assert float(err[1:4].max()) < 1e-6, f"angle errors {err[1:4].tolist()}"
    assert float(err[4:7].max()) < 1e-6, f"alpha errors {err[4:7].tolist()}"
    assert float(reprojection_error(model, qf, x).max()) < 1e-10


def test_fit_recovers_params_with_noise():
    true = synthetic_model(num_basis=3)
    model = synthetic_model(num_basis=3).float()
    q = _with_yaw_50(synthetic_params(true, 100, seed=6, yaw=60.0))
    x = synthetic_landmarks(true, q, noise=1e-3, seed=1).float()
    qf = fit_params(model, x)
    assert qf.dtype == torch.float32
    d = (qf.double() - q).abs()
    assert float(d[:, 1:4].max()) < 1.0, f"max angle errors {d[:, 1:4].max(0).values.tolist()} deg"
    assert float(d[:2, 1].max()) < 1.0, f"yaw +-50 errors {d[:2, 1].tolist()}"
    sigma = q[:, 4:7].std(0)
    assert bool((d[:, 4:7].pow(2).mean(0).sqrt() < 0.3 * sigma).all()), \
        f"alpha RMS errors {d[:, 4:7].pow(2).mean(0).sqrt().tolist()} vs spread {sigma.tolist()}"
    assert float((d[:, 0] / q[:, 0]).max()) < 0.02
    rmse = reprojection_error(model, qf, x)
    assert rmse.shape == (100,) and float(rmse.median()) < 1.5e-3


def test_fit_from_init_and_alpha_prior():
    model = synthetic_model(num_basis=3)
    q = synthetic_params(model, 30, seed=7)
    x = synthetic_landmarks(model, q, noise=0.0)
    start = q.clone()
    start[:, 1:4] += 5.0
    start[:, 4:7] = 0.0
    qf = fit_params(model, x, init=start)
    assert float((qf - q).abs().max()) < 1e-6
    shrunk = fit_params(model, x, alpha_weight=1e-3)
    assert float(shrunk[:, 4:7].norm()) < float(q[:, 4:7].norm())
    with pytest.raises(ValueError):
        fit_params(model, x, init=start[:, :5])
    with pytest.raises(ValueError):
        fit_params(model, x[:, :60])


def test_initial_params_and_nearest_scaled_rotation():
    gen = np.random.default_rng(0)
    angles = torch.tensor(np.stack([gen.uniform(-60, 60, 20), gen.uniform(-30, 30, 20), gen.uniform(-30, 30, 20)], 1))
    rot = rotation_matrix(angles)
    k = torch.tensor(gen.uniform(0.5, 2.0, 20))
    k2, rot2 = nearest_scaled_rotation(k[:, None, None] * rot[:, :2])
    torch.testing.assert_close(k2, k)
    torch.testing.assert_close(rot2, rot)
    model = synthetic_model(num_basis=0)
    q = synthetic_params(model, 20, seed=2)
    x = synthetic_landmarks(model, q, noise=0.0)
    torch.testing.assert_close(initial_params(model, x), q)  # rigid: the closed form is exact
    flipped = initial_params(model, x, depth_flip=True)
    torch.testing.assert_close(flipped[:, 1:3], -q[:, 1:3])

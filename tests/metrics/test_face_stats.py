"""Face metrics: toy descriptor sets (exact properties) and the face pipeline on real aligned faces."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import shared_path

from portrait3d.metrics.face_stats import FaceSetStats, compare, fd_dlib, kid, mean_pairwise_distance


def _set(seed: int, n: int = 300, shift: float = 0.0, scale: float = 0.05) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, (n, 128))


def test_a_set_against_itself_is_zero():
    a = _set(0)
    assert fd_dlib(a, a) == pytest.approx(0, abs=1e-6)
    # unbiased MMD^2: zero in expectation for one distribution, tiny next to a real difference
    assert abs(kid(a, a, subsets=10, subset_size=100)) < 0.01 * kid(a, _set(2, shift=0.1), subsets=10)


def test_distances_grow_with_the_difference():
    a, b, far = _set(0), _set(1), _set(2, shift=0.1)
    assert fd_dlib(a, b) < 0.2 * fd_dlib(a, far)
    assert kid(a, b, subsets=10) < 0.1 * kid(a, far, subsets=10)
    assert kid(a, far, subsets=10) > 0


def test_mean_pairwise_distance():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx((5 + 0 + 5) / 3)
    assert mean_pairwise_distance(np.zeros((5, 128))) == 0  # one person: no diversity


def test_compare_ratios():
    d = _set(0)
    s = FaceSetStats(10, 9, d, np.linspace(-20, 20, len(d)), np.linspace(-5, 5, len(d)))
    m = compare(s, s)
    assert m["yaw_std_ratio"] == pytest.approx(1) and m["identity_diversity_ratio"] == pytest.approx(1)
    assert m["detection"] == pytest.approx(0.9) and m["fd_dlib"] == pytest.approx(0, abs=1e-6)
    frozen = FaceSetStats(10, 10, np.repeat(d[:1], 10, 0), np.zeros(10), np.zeros(10))
    m = compare(frozen, s)
    assert m["yaw_std_ratio"] == 0 and m["identity_diversity_ratio"] == 0


def test_face_pipeline_on_real_faces():
    from PIL import Image

    from portrait3d.metrics.face_stats import measure_faces

    photos = sorted(shared_path("data/utkface").iterdir())[:6]
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((128, 128))) for p in photos]
    noise = np.random.default_rng(0).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    s = measure_faces(imgs + list(noise))
    assert s.n == 8 and s.detected >= 5 and len(s.descriptors) >= 5  # the noise images hold no face
    assert s.detected <= 6
    norms = np.linalg.norm(s.descriptors, axis=1)
    assert np.all(np.abs(s.yaw) < 60) and np.all((norms > 0.5) & (norms < 2))  # dlib descriptors: norm ~1.4

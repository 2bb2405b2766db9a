"""Face detection rate: the fraction of generated images in which MediaPipe BlazeFace finds a face.

A cheap, interpretable sanity metric for face generators: a well-trained model scores close to
the rate on real aligned faces (near 1), a random or collapsed one close to 0. BlazeFace runs
with its two bundled models (full- and short-range, merged) at ``min_score`` 0.5 and *without*
the dlib fallback, so the number measures one fixed detector.

For EG3D the rate is measured per camera (by default yaw -30, 0 and +30 degrees, pitch 0): the
same latents, conditioned on the frontal camera, rendered from each view, so a drop at the side
views shows geometry that does not hold up when the head turns.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["EVAL_YAWS", "eval_cameras", "faces_found", "detection_rate", "generator_detection_rates"]

EVAL_YAWS = (-30.0, 0.0, 30.0)
"""Yaw angles (degrees, positive = head turned to its left) at which EG3D generators are evaluated."""


def eval_cameras(yaws: Sequence[float] = EVAL_YAWS, pitch: float = 0.0) -> list[torch.Tensor]:
    """EG3D camera labels ``[25]`` for ``yaws`` at ``pitch`` (see ``camera_from_angles``)."""
    from portrait3d.networks.eg3d.camera import camera_from_angles

    return [camera_from_angles(float(y), float(pitch)) for y in yaws]


def _detector(min_score: float):
    from portrait3d.face.detect import FaceDetector

    return FaceDetector("mediapipe", min_score=min_score, fallback=False)


def faces_found(images: np.ndarray, detector=None, min_score: float = 0.5) -> np.ndarray:
    """Per image, whether BlazeFace finds at least one face.

    Args:
        images: ``uint8 [N, H, W, 3]`` RGB (or one ``[H, W, 3]`` image).
        detector: a ``FaceDetector`` to reuse (default: a fresh ``FaceDetector('mediapipe',
            fallback=False)``, closed afterwards).
        min_score: BlazeFace confidence threshold when ``detector`` is not given.
    Returns:
        ``bool [N]``.
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UsageError(f"expected uint8 images [N, H, W, 3], got {arr.dtype} {arr.shape}")
    own = detector is None
    det = _detector(min_score) if own else detector
    try:
        return np.array([len(det.detect(im)) > 0 for im in arr], dtype=bool)
    finally:
        if own:
            det.close()


def detection_rate(images: np.ndarray, detector=None, min_score: float = 0.5) -> float:
    """Fraction of ``images`` (``uint8 [N, H, W, 3]``) with a BlazeFace detection, in ``[0, 1]``."""
    found = faces_found(images, detector, min_score)
    return float(found.mean()) if len(found) else float("nan")


@torch.no_grad()
def generator_detection_rates(G: torch.nn.Module, cameras: Sequence[torch.Tensor] | None = None, n: int = 1000,
                              batch: int = 16, seed: int = 0, truncation_psi: float = 1.0,
                              min_score: float = 0.5, device: str | torch.device | None = None,
                              progress: bool = True) -> list[float]:
    """Detection rate of ``n`` samples of ``G``, one rate per camera.

    Args:
        G: StyleGAN2 ``Generator`` (``cameras`` must be ``None``; one rate is returned) or EG3D
            ``TriPlaneGenerator`` (default cameras: :func:`eval_cameras`, yaw -30/0/+30).
        cameras: EG3D camera labels ``[25]`` to render from. Every view shows the same ``n``
            faces: latents are mapped with the frontal camera and the tri-planes are synthesised
            once per batch, then rendered from each camera.
        n: number of faces (per camera).
        batch: generator batch size.
        seed: latent seed.
        truncation_psi: 1 (no truncation) measures the whole distribution.
        min_score: BlazeFace confidence threshold.
        device: where to run ``G`` (default: where its parameters are).
    Returns:
        Rates in ``[0, 1]`` in the order of ``cameras`` (a one-element list for StyleGAN2).
    """
    from tqdm import tqdm

    from portrait3d.networks.eg3d.camera import camera_from_angles
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
    from portrait3d.utils.visualize import to_uint8

    is_3d = isinstance(G, TriPlaneGenerator)
    if not is_3d and cameras is not None:
        raise UsageError("cameras only apply to an EG3D generator")
    if is_3d and cameras is None:
        cameras = eval_cameras()
    dev = torch.device(device) if device is not None else next(G.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    views = list(cameras) if is_3d else [None]
    hits = np.zeros(len(views), dtype=np.int64)
    det = _detector(min_score)
    try:
        with tqdm(total=n * len(views), desc="detection rate", unit="img", disable=not progress) as bar:
            done = 0
            while done < n:
                k = min(batch, n - done)
                z = torch.randn(k, G.z_dim, generator=gen).to(dev)
                if is_3d:
                    c_front = camera_from_angles(0.0, 0.0).to(dev).expand(k, 25)
                    ws = G.mapping(z, c_front, truncation_psi=truncation_psi)
                    for j, cam in enumerate(views):
                        c = cam.reshape(1, 25).to(dev, torch.float32).expand(k, 25)
                        out = G.synthesis(ws, c, noise_mode="const", cache_backbone=(j == 0),
                                          use_cached_backbone=(j > 0))
                        hits[j] += int(faces_found(to_uint8(out["image"]), det).sum())
                        bar.update(k)
                else:
                    img = G(z, torch.zeros(k, G.c_dim, device=dev), truncation_psi=truncation_psi,
                            noise_mode="const")
                    hits[0] += int(faces_found(to_uint8(img), det).sum())
                    bar.update(k)
                done += k
    finally:
        det.close()
        if is_3d:
            G._last_planes = None  # do not keep the last batch's tri-planes alive
    return [float(h) / n for h in hits]

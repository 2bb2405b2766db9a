"""Differentiable face-identity loss from our dlib face-ResNet port.

:class:`IdentityLoss` compares images with fixed reference faces through
:class:`portrait3d.face.identity.IdentityEncoder` (dlib's face-recognition ResNet, 128-D
descriptors): ``loss = 1 - cos(emb(image), emb(reference))``, one value per image.

Fixed chip transform
--------------------
The encoder needs a face chip: the 150x150 crop that dlib's similarity alignment (from the
landmarks) cuts out of the image. During optimisation (GAN inversion, editing) the edited image has
no landmarks of its own that we could differentiate -- the 68-point predictor is a non-differentiable
regression-tree ensemble, and re-detecting every step would also move the crop under the optimiser.
So the chip transform is computed **once, from the reference landmarks**, and reused for every
image: gradients flow through the pixels only (bilinear sampling + the network), never through the
geometry. This is right as long as the optimised image stays roughly aligned with the reference
(projection of that same photo, small edits); for images whose face has moved, recompute the
transform (or construct a new loss) from fresh landmarks.

Images are ``[N, 3, H, W]`` float RGB in ``[-1, 1]`` (our generators' range); they are mapped to the
encoder's 0..255 range internally. When an image's size differs from the reference's, the transform
is rescaled (pixel centres at integer coordinates, as in :mod:`portrait3d.face.landmarks`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from portrait3d.face.identity import CHIP_SIZE, IdentityEncoder, extract_chips

__all__ = ["IdentityLoss", "identity_similarity", "rescale_transform", "to_encoder_range"]


def to_encoder_range(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images -> the encoder's float 0..255 (not clamped, so gradients never vanish)."""
    return (images.to(torch.float32) + 1.0) * 127.5


def rescale_transform(transform: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """Re-express ``[..., 2, 3]`` chip->image affines for an image resized from ``src_size`` to
    ``dst_size`` (``(H, W)``; pixel centres at integers: ``x' = (x + 0.5) * s - 0.5``)."""
    t = np.array(transform, dtype=np.float64, copy=True)
    sy, sx = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    for row, s in ((0, sx), (1, sy)):
        t[..., row, :2] *= s
        t[..., row, 2] = (t[..., row, 2] + 0.5) * s - 0.5
    return t


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected [N, 3, H, W] RGB in [-1, 1], got {shape}")


def _as_transforms(transforms, n: int | None) -> np.ndarray:
    t = np.asarray(transforms.detach().cpu().double() if isinstance(transforms, torch.Tensor) else transforms,
                   dtype=np.float64)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1:] not in ((2, 3), (3, 3)):
        raise ValueError(f"transforms: expected [N, 2, 3] chip->image affines, got shape {t.shape}")
    t = t[:, :2]
    if n is not None and t.shape[0] not in (1, n):
        raise ValueError(f"got {t.shape[0]} transforms for {n} reference images")
    return t


def _default_encoder() -> IdentityEncoder:
    """dlib's trained weights (the .dat is parsed once per process), smooth chips."""
    return IdentityEncoder(quantize=False)


class IdentityLoss(nn.Module):
    """``1 - cos(emb(image), emb(reference))`` with a chip transform fixed by the reference.

    Args:
        reference: ``[M, 3, H, W]`` reference images in ``[-1, 1]`` (``M`` = 1 broadcasts to any
            batch; otherwise ``forward`` needs ``N == M``). May be omitted when
            ``reference_embedding`` is given.
        landmarks: ``[M, 68, 2]`` (or ``[68, 2]``; 5-point sets in dlib's order also work) pixel
            coordinates of the reference faces -> the chip transforms (dlib's alignment).
        transforms: instead of ``landmarks``, the ``[M, 2, 3]`` chip->image affines (as from
            :meth:`IdentityEncoder.transforms` / :func:`portrait3d.face.identity.face_chip_transform`).
        reference_embedding: ``[M, 128]`` descriptors to compare with, instead of embedding
            ``reference`` (then ``transforms`` or ``landmarks`` only place the chips of the
            optimised images, and ``image_size`` gives the size they refer to).
        image_size: ``(H, W)`` the landmarks/transforms refer to; default: the reference's size.
        encoder: an :class:`IdentityEncoder` (default: dlib's trained weights, smooth chips:
            ``quantize=False`` -- dlib's 8-bit truncation would only add straight-through noise).

    ``forward(images)`` -> ``[N]``; differentiable w.r.t. ``images`` (see the module docstring for
    why the geometry is held fixed). The encoder is frozen.
    """

    description = "1 - cosine similarity of dlib face-ResNet (128-D) descriptors, chips aligned from the reference landmarks"

    def __init__(self, reference: torch.Tensor | None = None, landmarks=None, *, transforms=None,
                 reference_embedding: torch.Tensor | None = None, image_size: tuple[int, int] | None = None,
                 encoder: IdentityEncoder | None = None):
        super().__init__()
        if (landmarks is None) == (transforms is None):
            raise ValueError("IdentityLoss needs exactly one of landmarks= (reference face landmarks) "
                             "or transforms= (fixed chip transforms)")
        if reference is None and reference_embedding is None:
            raise ValueError("IdentityLoss needs reference images or reference_embedding=")
        self.encoder = encoder if encoder is not None else _default_encoder()
        self.encoder.requires_grad_(False).eval()
        if reference is not None:
            _check_images(reference, "reference")
            if image_size is None:
                image_size = (int(reference.shape[2]), int(reference.shape[3]))
        if image_size is None:
            raise ValueError("image_size=(H, W) is needed when no reference images are given")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if landmarks is not None:
            if isinstance(landmarks, (list, tuple)):
                landmarks = np.stack([np.asarray(l, np.float64) for l in landmarks])
            transforms = self.encoder.transforms(landmarks)
        m = reference.shape[0] if reference is not None else None
        self._transforms = _as_transforms(transforms, m)
        if reference_embedding is None:
            with torch.no_grad():
                reference_embedding = self.embed(reference.detach())
        emb = torch.as_tensor(reference_embedding, dtype=torch.float32).detach()
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != 128:
            raise ValueError(f"reference_embedding: expected [M, 128], got {tuple(emb.shape)}")
        self.register_buffer("reference_embedding", emb)

    def train(self, mode: bool = True) -> "IdentityLoss":
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def transforms(self) -> np.ndarray:
        """The fixed ``[M, 2, 3]`` chip->image affines (for images of :attr:`image_size`)."""
        return self._transforms.copy()

    def _transforms_for(self, images: torch.Tensor) -> np.ndarray:
        n, size = images.shape[0], (int(images.shape[2]), int(images.shape[3]))
        t = self._transforms
        if t.shape[0] == 1 and n != 1:
            t = np.repeat(t, n, axis=0)
        elif t.shape[0] != n:
            raise ValueError(f"got {n} images for {t.shape[0]} fixed chip transforms (1 broadcasts)")
        return t if size == self.image_size else rescale_transform(t, self.image_size, size)

    def chips(self, images: torch.Tensor) -> torch.Tensor:
        """The aligned ``[N, 3, 150, 150]`` chips (0..255) the encoder sees, differentiable."""
        _check_images(images)
        return extract_chips(to_encoder_range(images), self._transforms_for(images), CHIP_SIZE,
                             antialias=self.encoder.antialias, quantize=self.encoder.quantize)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 128]`` descriptors of ``images`` through the fixed chip transform."""
        return self.encoder.embed_aligned(self.chips(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.embed(images)
        ref = self.reference_embedding
        if ref.shape[0] != 1 and ref.shape[0] != emb.shape[0]:
            raise ValueError(f"got {emb.shape[0]} images for {ref.shape[0]} reference embeddings")
        return 1.0 - F.cosine_similarity(emb, ref.to(emb), dim=-1)


def _to_batch(img) -> torch.Tensor:
    """numpy uint8 ``[H, W, 3]`` / ``[N, H, W, 3]`` or tensors in [-1, 1] -> ``[N, 3, H, W]`` in [-1, 1]."""
    if isinstance(img, np.ndarray):
        a = img[None] if img.ndim == 3 else img
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"expected an [H, W, 3] RGB array, got shape {img.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()
        return t / 127.5 - 1.0 if img.dtype == np.uint8 else t
    t = torch.as_tensor(img)
    t = t[None] if t.ndim == 3 else t
    _check_images(t)
    return t.float()


def _landmark_batch(lm, n: int) -> Sequence:
    a = lm.detach().cpu().numpy() if isinstance(lm, torch.Tensor) else np.asarray(lm, np.float64)
    a = a[None] if a.ndim == 2 else a
    if a.shape[0] != n:
        raise ValueError(f"got {a.shape[0]} landmark sets for {n} images")
    return a


@torch.no_grad()
def identity_similarity(img_a, img_b, lm_a, lm_b, encoder: IdentityEncoder | None = None) -> torch.Tensor:
    """Cosine similarity ``[N]`` of the identity descriptors of two (batches of) faces, each with
    its own landmarks (not differentiable; for reports). Images: tensors ``[N, 3, H, W]`` /
    ``[3, H, W]`` in ``[-1, 1]`` or uint8 ``[H, W, 3]`` arrays; landmarks ``[N, 68, 2]`` / ``[68, 2]``
    pixel coordinates. ``1 - similarity`` is :class:`IdentityLoss`'s value."""
    enc = encoder if encoder is not None else _default_encoder()
    a, b = _to_batch(img_a), _to_batch(img_b)
    dev = next(enc.parameters()).device
    ea = enc(to_encoder_range(a.to(dev)), _landmark_batch(lm_a, a.shape[0]))
    eb = enc(to_encoder_range(b.to(dev)), _landmark_batch(lm_b, b.shape[0]))
    return F.cosine_similarity(ea, eb, dim=-1)

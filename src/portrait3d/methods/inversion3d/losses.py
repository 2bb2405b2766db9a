"""The image loss of 3D GAN inversion (Ko et al. eq. 3): pixel MSE + perceptual + identity, shared by the latent /
camera optimisation (:mod:`.optimize`) and pivotal tuning (:mod:`.pti`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from portrait3d.errors import UsageError
from portrait3d.methods.projector.projector import as_target_image, resize_target, scaled_landmarks

__all__ = ["ImageLoss", "LossWeights"]


@dataclass
class LossWeights:
    """Weights of :class:`ImageLoss`'s terms."""

    mse: float = 1.0
    perceptual: float = 1.0
    identity: float = 0.1


class ImageLoss(nn.Module):
    """``L_img = w_mse * MSE + w_p * perceptual + w_id * identity`` against a fixed target.

    Args:
        target: ``[1, 3, H, H]`` in ``[-1, 1]``; resized to ``resolution`` (area down, bicubic up).
        landmarks: ``[68, 2]`` iBUG landmarks in ``target``'s pixel coordinates; enable the identity
            term (:class:`portrait3d.losses.IdentityLoss`, chip alignment fixed by them).
        weights: :class:`LossWeights`; a zero weight skips (and never builds) that term.
        resolution: size of the images the loss will see (the generator's ``img_resolution``);
            default: the target's.
        perceptual: a perceptual-distance module (``features`` / ``distance`` interface of
            :mod:`portrait3d.losses.perceptual`) or a :func:`~portrait3d.losses.perceptual_loss` name.
        perceptual_kwargs: arguments for building it by name (e.g. ``{"resize": 224}``).
        identity_loss: a ready identity module (``forward(images) -> [N]``) instead of building one.

    ``forward(image [N, 3, R, R], identity=True) -> (loss scalar, {"mse", "perceptual", "identity": float})``
    (only the active terms; ``identity=False`` leaves the identity term out of this call). The perceptual features of
    the target are computed once.
    """

    def __init__(self, target: torch.Tensor, landmarks: np.ndarray | None = None, weights: LossWeights | None = None,
                 resolution: int | None = None, perceptual: str | nn.Module = "efficientnet-lite0",
                 perceptual_kwargs: dict[str, Any] | None = None, identity_loss: nn.Module | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        target = as_target_image(target)
        src_size = int(target.shape[2])
        res = int(resolution) if resolution is not None else src_size
        self.register_buffer("target", resize_target(target.to(torch.float32), res).detach())
        self.perceptual_module: nn.Module | None = None
        if self.weights.perceptual > 0:
            if isinstance(perceptual, str):
                from portrait3d.losses.perceptual import perceptual_loss

                perceptual = perceptual_loss(perceptual, **(perceptual_kwargs or {}))
            self.perceptual_module = perceptual.to(target.device).eval()
        self.identity_module: nn.Module | None = None
        if self.weights.identity > 0 and (identity_loss is not None or landmarks is not None):
            if identity_loss is None:
                from portrait3d.losses.identity import IdentityLoss

                identity_loss = IdentityLoss(self.target.cpu(), scaled_landmarks(landmarks, src_size, res))
            self.identity_module = identity_loss.to(target.device).eval()
        self._target_feats: list[torch.Tensor] | None = None
        if self.perceptual_module is not None and hasattr(self.perceptual_module, "features"):
            with torch.no_grad():
                self._target_feats = [f.detach() for f in self.perceptual_module.features(self.target)]

    @property
    def description(self) -> str:
        """Which terms and networks the loss uses (quote it next to reported numbers)."""
        parts = [f"{self.weights.mse:g} x pixel MSE"] if self.weights.mse > 0 else []
        if self.perceptual_module is not None:
            desc = getattr(self.perceptual_module, "description", type(self.perceptual_module).__name__)
            parts.append(f"{self.weights.perceptual:g} x perceptual [{desc}]")
        if self.identity_module is not None:
            desc = getattr(self.identity_module, "description", type(self.identity_module).__name__)
            parts.append(f"{self.weights.identity:g} x identity [{desc}]")
        return " + ".join(parts) if parts else "(no active term)"

    def forward(self, image: torch.Tensor, identity: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        if image.shape[-2:] != self.target.shape[-2:]:
            raise UsageError(f"image size {tuple(image.shape[-2:])} differs from the loss resolution "
                             f"{tuple(self.target.shape[-2:])}")
        loss = image.new_zeros([])
        terms: dict[str, float] = {}
        if self.weights.mse > 0:
            mse = (image - self.target).square().mean()
            loss = loss + self.weights.mse * mse
            terms["mse"] = float(mse.detach())
        if self.perceptual_module is not None:
            if self._target_feats is not None:
                p = self.perceptual_module.distance(image, self._target_feats).mean()
            else:
                p = self.perceptual_module(image, self.target).mean()
            loss = loss + self.weights.perceptual * p
            terms["perceptual"] = float(p.detach())
        if identity and self.identity_module is not None:
            idl = self.identity_module(image).mean()
            loss = loss + self.weights.identity * idl
            terms["identity"] = float(idl.detach())
        return loss, terms


# ---------------------------------------------------------------------------------------------- config

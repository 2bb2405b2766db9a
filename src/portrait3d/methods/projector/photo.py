"""A photo into a 2D generator's W / W+ space: align it in the default crop, then run the projector."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.face.pipeline import face_landmarks68, several_faces_note
from portrait3d.methods.projector.projector import ProjectorConfig, project
from portrait3d.utils.visualize import to_uint8

__all__ = ["FAST_PERCEPTUAL_MAX", "PhotoLatent", "project_photo"]

FAST_PERCEPTUAL_MAX = 224
"""The largest input of the perceptual loss on the fast path (the network's own training size)."""


@dataclass
class PhotoLatent:
    """A photo put into a latent space by the projector."""

    latent: torch.Tensor            # [1, w_dim] for 'w', [1, num_ws * w_dim] for 'w+'
    aligned: np.ndarray             # the crop that was inverted, uint8 [R, R, 3]
    projection: np.ndarray          # the projected latent rendered, uint8 [R, R, 3]
    info: dict[str, Any]
    landmarks: np.ndarray | None = None  # dlib's 68 points of the crop, pixels [68, 2]
    generator: nn.Module | None = None   # the generator tuned to the photo by pivotal tuning (None: not tuned)


def project_photo(G: nn.Module, space: str, image: np.ndarray | Path, project_steps: int, face_index: int | None,
                  name: str = "photo", progress: bool = True, latent_prior_weight: float = 0.0,
                  identity_weight: float = 0.1, callback: Callable[..., Any] | None = None,
                  fast: bool = False, pti_steps: int = 0) -> PhotoLatent:
    """Align ``image`` (an array or a path) in portrait3d's default crop and project it into ``space``.

    Raises:
        FaceError: no face, or ``face_index`` out of range; UsageError: a space the projector does not have.
        Several faces without ``face_index``: the largest is used, and ``info["notes"]`` says so.
    ``latent_prior_weight``: :class:`ProjectorConfig`'s, to keep the latent where edit directions hold;
    ``identity_weight``: its dlib identity term's; ``callback``: :func:`project`'s, after every step; ``fast``: the
    projector in bf16 (:attr:`ProjectorConfig.precision`) with the perceptual loss at the generator's size (up to
    :data:`FAST_PERCEPTUAL_MAX`) instead of 224 px; ``pti_steps``: that many
    steps of pivotal tuning (:func:`~portrait3d.methods.projector.pti.pivotal_tuning`, PTI's losses, the same
    precision as the projection) after the projection, whose tuned generator is returned in
    :attr:`PhotoLatent.generator` and renders :attr:`PhotoLatent.projection`.
    """
    from portrait3d.face.pipeline import FacePipeline

    if space not in ("w", "w+"):
        raise UsageError(f"photos can be projected only into W or W+, not {space!r}")
    with FacePipeline(style="default", output_size=int(G.img_resolution)) as pipe:
        face = pipe(image, face_index=face_index)
    aligned = face.aligned.image
    target = torch.as_tensor(aligned).permute(2, 0, 1)[None].float() / 127.5 - 1
    landmarks = face_landmarks68(face)
    cfg = ProjectorConfig(space=space, steps=project_steps, latent_prior_weight=latent_prior_weight,
                          identity_weight=identity_weight)
    if fast:
        cfg.precision = "bf16"
        cfg.perceptual_kwargs = {"resize": min(int(G.img_resolution), FAST_PERCEPTUAL_MAX)}
    from portrait3d.losses.perceptual import perceptual_loss

    # one perceptual network for the projection and the tuning after it
    percept = perceptual_loss(cfg.perceptual, **cfg.perceptual_kwargs) if cfg.perceptual_weight > 0 else None
    res = project(G, target, cfg, landmarks=landmarks, progress=progress, callback=callback, perceptual_loss=percept)
    latent = res.ws[:, 0] if space == "w" else res.ws.reshape(1, -1)
    info = {"photo": name, "num_faces": face.num_faces, "photo_pose_deg": list(face.pose.angles),
            "projection_steps": project_steps, "projection_fast": bool(fast), "pti_steps": int(pti_steps),
            "notes": several_faces_note(face, face_index, name)}
    image, tuned = res.image, None
    if pti_steps > 0:
        from portrait3d.methods.projector.pti import PivotalTuningConfig, pivotal_tuning

        pti_cfg = PivotalTuningConfig(steps=pti_steps, precision=cfg.precision, perceptual=cfg.perceptual,
                                      perceptual_kwargs=dict(cfg.perceptual_kwargs))
        tuned_res = pivotal_tuning(G, res.ws, target, pti_cfg, progress=progress, perceptual_loss=percept)
        image, tuned = tuned_res.image, tuned_res.generator
        last = tuned_res.losses[-1] if tuned_res.losses else {}
        info["pti_last"] = {k: v for k, v in last.items() if k in ("mse", "perceptual", "loss")}
    return PhotoLatent(latent=latent.detach(), aligned=aligned, projection=to_uint8(image)[0], info=info,
                       landmarks=landmarks, generator=tuned)

"""The W_tri encoder's losses (Oh & Jo, eqs. 1-4).

For photos ``x`` with cameras ``c``, the encoder's codes after each ReStyle iteration ``w_t`` and their renders
``y_t = G(w_t, c)``:

* reconstruction (eq. 1), summed over the iterations as ReStyle trains:
  ``L_rec = ||x - y||_2 + lambda_p L_p(x, y) + lambda_id (1 - cos(R(x), R(y))) + lambda_sim (1 - cos(F(x), F(y)))``
  with ``L_p`` the perceptual distance (EfficientNet-Lite0 features here, LPIPS when the user brings VGG weights),
  ``R`` dlib's face descriptor on a fixed chip (the aligned crops share one face placement) and ``F`` a global image
  feature standing in for e4e's MoCo similarity (the pooled EfficientNet-Lite0 features: no MoCo weights offline);
* regularisation (eq. 2): ``L_reg = ||E(x) - w_avg||^2`` over every part of the code;
* multi-view cycle (eq. 3): with ``p_hat`` drawn from the training cameras, ``L_cyc = ||E(x) - E(G(E(x), p_hat))||_1``
  -- the code of the re-rendered novel view must be the code it came from;
* total (eq. 4): ``L = L_rec + lambda_reg L_reg + lambda_cyc L_cyc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from portrait3d.config import ConfigMixin
from portrait3d.networks.eg3d.triplane import WTri

__all__ = ["WTriLossConfig", "code_distance", "wtri_losses"]


@dataclass
class WTriLossConfig(ConfigMixin):
    l2: float = 1.0
    perceptual: float = 0.8       # pSp / e4e's LPIPS weight
    identity: float = 0.1
    similarity: float = 0.5
    reg: float = 0.0005
    cyc: float = 0.1


def code_distance(a: WTri, b: WTri, p: int = 1) -> torch.Tensor:
    """Mean ``|a - b|^p`` over every part of two codes, ``[N]``."""
    parts = [(a.shared - b.shared), (a.planes - b.planes), (a.sr - b.sr)]
    return torch.stack([d.abs().pow(p).flatten(1).mean(1) for d in parts]).mean(0)


def wtri_losses(enc: Any, G: Any, x: torch.Tensor, c: torch.Tensor, novel_cameras: torch.Tensor,
                w: WTriLossConfig, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                identity: Callable[[torch.Tensor], torch.Tensor] | None = None,
                features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                keep_codes: bool = False, cyc_scale: float = 1.0) -> dict[str, Any]:
    """Eqs. 1-4 on photos ``x [N, 3, H, W]`` (``[-1, 1]``) with cameras ``c [N, 25]``; ``novel_cameras [N, 25]``
    are the ``p_hat`` of the cycle. ``identity(images) -> [N]`` is ``1 - cos`` to the photos' descriptors (an
    :class:`~portrait3d.losses.identity.IdentityLoss` built on ``x``); ``features(images) -> [N, D]`` the global
    feature of the similarity term. ``cyc_scale`` multiplies ``lambda_cyc`` (0 skips the cycle: a lazy cycle,
    evaluated every k-th step with ``cyc_scale = k``, as StyleGAN2 evaluates R1). Returns the terms and ``loss``
    (and, with ``keep_codes``, the list of codes of the iterations under ``codes``)."""
    codes, images = enc.invert(G, x, c)
    terms: dict[str, torch.Tensor] = {}
    rec = torch.zeros((), device=x.device)
    feat_x = features(x).detach() if features is not None and w.similarity > 0 else None
    for y in images:
        rec = rec + w.l2 * (y - x).square().mean()
        if perceptual is not None and w.perceptual > 0:
            rec = rec + w.perceptual * perceptual(y, x).mean()
        if identity is not None and w.identity > 0:
            rec = rec + w.identity * identity(y).mean()
        if feat_x is not None:
            rec = rec + w.similarity * (1 - F.cosine_similarity(features(y), feat_x, dim=-1)).mean()
    terms["rec"] = rec / len(images)
    terms["l2_last"] = (images[-1] - x).square().mean().detach()
    final = codes[-1]
    w_avg = G.backbone.mapping.w_avg.detach()
    avg = G.wtri_from_ws(w_avg[None, None].expand(len(x), G.num_ws, -1))
    terms["reg"] = code_distance(final, avg, p=2).mean()
    loss = terms["rec"] + w.reg * terms["reg"]
    if w.cyc > 0 and cyc_scale > 0:
        novel = G.synthesis_wtri(final, novel_cameras, noise_mode="const")["image"]
        again, _ = enc.invert(G, novel, novel_cameras, keep_images=False)
        terms["cyc"] = code_distance(final, again[-1], p=1).mean()
        loss = loss + cyc_scale * w.cyc * terms["cyc"]
    terms["loss"] = loss
    if keep_codes:
        terms["codes"] = codes
    return terms

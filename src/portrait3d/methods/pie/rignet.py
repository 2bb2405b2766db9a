"""RigNet (Tewari et al., "StyleRig", CVPR 2020, Sec. 4), one network per rig mode, as PIE uses them.

RigNet edits a StyleGAN latent so that the image takes some of a target's rig parameters:
``w_hat = RigNet(w, p) = w + D(E(w), p)``. Per StyleGAN layer ``i``, a linear encoder ``E_i`` compresses
``w_i`` to ``l_i`` (32-d), which is concatenated with the target parameters ``p`` of one *mode* and decoded by a
linear ``D_i`` back to an offset of ``w_i``. Modes partition the rig parameters (:class:`~.face_model.RigParams`):
``pose`` (yaw, pitch, roll), ``expression`` (the expression coefficients) and ``light`` (the 27 SH coefficients).

Training is self-supervised with the differentiable face rig and the parameter estimator ``theta`` applied to
generated images (StyleRig Sec. 4.2), for a source latent ``w`` and a target ``v`` with ``theta_w = theta(G(w))``,
``theta_v = theta(G(v))``:

* reconstruction: ``L_rec = ||RigNet(w, theta_w^mode) - w||^2`` (asked for its own parameters, nothing changes);
* editing: the edited image must show the target's mode parameters: rig renders of
  ``theta(G(w_hat))^mode U theta_v^other`` against renders of ``theta_v`` (landmarks and colours, :func:`rig_distance`);
* consistency: and keep everything else of the source: renders of ``theta_w^mode U theta(G(w_hat))^other``
  against renders of ``theta_w``.

The renders compare parameters where it matters (a pixel of the face moves or changes colour), which is how StyleRig
weights parameters of very different scales.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.methods.pie.face_model import FaceModel, RigParams

__all__ = ["MODES", "RIGNET_FORMAT", "RigNet", "RigNetConfig", "mode_params", "with_mode", "rig_distance",
           "rignet_losses"]

RIGNET_FORMAT = "portrait3d-pie-rignet"
MODES = {"pose": ("angles",), "expression": ("expression",), "light": ("light",)}


def mode_params(p: RigParams, mode: str) -> torch.Tensor:
    """The parameters of one mode as ``[N, P_mode]``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    return torch.cat([getattr(p, f) for f in MODES[mode]], dim=1)


def with_mode(p: RigParams, q: RigParams, mode: str) -> RigParams:
    """``p`` with the parameters of ``mode`` taken from ``q`` (the other fields of ``p`` unchanged)."""
    return p.replace(**{f: getattr(q, f) for f in MODES[mode]})


@dataclass
class RigNetConfig(ConfigMixin):
    num_ws: int = 12
    w_dim: int = 256
    mode: str = "pose"
    param_dim: int = 3       # size of the mode's parameter vector
    latent_dim: int = 32     # l_i, StyleRig's choice


class RigNet(nn.Module):
    """``w_hat = w + D(E(w), p)`` with per-layer linear ``E_i: w_dim -> latent_dim`` and
    ``D_i: latent_dim + param_dim -> w_dim`` (StyleRig Fig. 2). Input ``ws [N, num_ws, w_dim]`` and the mode's
    target parameters ``[N, param_dim]``; the decoder starts at zero, so an untrained RigNet changes nothing."""

    def __init__(self, config: RigNetConfig) -> None:
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {config.mode!r}")
        self.config = config
        c = config
        self.enc_weight = nn.Parameter(torch.randn(c.num_ws, c.w_dim, c.latent_dim) / c.w_dim ** 0.5)
        self.enc_bias = nn.Parameter(torch.zeros(c.num_ws, c.latent_dim))
        self.dec_weight = nn.Parameter(torch.zeros(c.num_ws, c.latent_dim + c.param_dim, c.w_dim))
        self.dec_bias = nn.Parameter(torch.zeros(c.num_ws, c.w_dim))

    def forward(self, ws: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        c = self.config
        if ws.ndim != 3 or tuple(ws.shape[1:]) != (c.num_ws, c.w_dim):
            raise ValueError(f"ws must be [N, {c.num_ws}, {c.w_dim}], not {list(ws.shape)}")
        if params.shape != (len(ws), c.param_dim):
            raise ValueError(f"params must be [N, {c.param_dim}], not {list(params.shape)}")
        lat = torch.einsum("nid,idl->nil", ws, self.enc_weight) + self.enc_bias       # [N, num_ws, latent]
        x = torch.cat([lat, params[:, None].expand(-1, c.num_ws, -1)], dim=2)
        return ws + torch.einsum("nil,ild->nid", x, self.dec_weight) + self.dec_bias

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, meta: dict[str, Any] | None = None,
             half: bool = False) -> Path:
        from portrait3d.checkpoints.native import save_config_module

        return save_config_module(self, path, RIGNET_FORMAT, overwrite, half, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RigNet":
        from portrait3d.checkpoints.native import load_config_module

        return load_config_module(path, cls, RigNetConfig, RIGNET_FORMAT, "RigNet")


def rig_distance(rig: FaceModel, a: RigParams, b: RigParams, size: int = 64,
                 photometric: float = 1.0) -> torch.Tensor:
    """How differently two parameter sets render, ``[N]``: the mean distance of the projected vertices (in units of
    the image size) plus ``photometric`` x the mean absolute colour difference of the vertices seen in both."""
    ra, rb = rig.vertices(a), rig.vertices(b)
    d = (rig.project(ra, size) - rig.project(rb, size)).norm(dim=-1).mean(1) / size
    if photometric > 0:
        d = d + photometric * (rig.colors(a, ra) - rig.colors(b, rb)).abs().mean((1, 2))
    return d


def rignet_losses(net: RigNet, G: Callable[[torch.Tensor], torch.Tensor], theta: Callable[[torch.Tensor], RigParams],
                  rig: FaceModel, ws: torch.Tensor, vs: torch.Tensor, rec_weight: float = 1.0,
                  edit_weight: float = 1.0, consist_weight: float = 1.0,
                  target_fn: Callable[[RigParams], RigParams] | None = None) -> dict[str, torch.Tensor]:
    """StyleRig's losses (module docstring) for source latents ``ws`` and targets ``vs`` (``[N, num_ws, w_dim]``).

    ``G(ws) -> images [N, 3, H, W]`` in ``[-1, 1]``; ``theta(images) -> RigParams`` (the estimator);
    ``target_fn`` may change the targets' parameters (e.g. poses beyond the generator's usual range).
    """
    mode = net.config.mode
    with torch.no_grad():
        th_w = theta(G(ws))
        th_v = theta(G(vs))
        if target_fn is not None:
            th_v = target_fn(th_v)
    rec = (net(ws, mode_params(th_w, mode)) - ws).square().mean()
    w_hat = net(ws, mode_params(th_v, mode))
    th_hat = theta(G(w_hat))
    edit = rig_distance(rig, with_mode(th_v, th_hat, mode), th_v).mean()
    consist = rig_distance(rig, with_mode(th_hat, th_w, mode), th_w).mean()
    loss = rec_weight * rec + edit_weight * edit + consist_weight * consist
    return {"loss": loss, "rec": rec.detach(), "edit": edit.detach(), "consist": consist.detach()}

"""PIE's embedding and editing (Tewari et al. 2020, Sec. 4, eqs. 6-15).

A portrait ``I`` is embedded as the latent ``w`` minimising (eq. 6)

    E(w) = E_syn + lambda_id E_id + lambda_edit E_edit + lambda_inv E_inv + lambda_recog E_recog

* ``E_syn`` (eq. 7): ``||I - G(w)||^2`` plus a perceptual distance of the images downsampled so the feature network
  sees at most ``perceptual_max_size`` pixels (the paper's x4 at 1024 px; EfficientNet-Lite0 features here, the
  project's ImageNet substitute, or LPIPS-VGG when the user brings the weights);
* ``E_id`` (eq. 8): ``w`` is a fixed point of every RigNet given its own parameters,
  ``||G(RigNet(w, theta(G(w))^m)) - G(w)||^2``;
* ``E_edit`` (eqs. 9-11): for target parameters ``v`` sampled per step, ``w_hat = RigNet(w, v^m)`` must show them:
  the rig renders of ``theta(G(w_hat))^m`` and of ``v^m`` (each over ``theta(G(w))``'s other parameters) agree
  (landmarks and colours, :func:`~.rignet.rig_distance`);
* ``E_inv`` (eqs. 12-13): the edit can be undone, ``RigNet(w_hat, theta(G(w))^m)`` renders as ``G(w)``: the pixel
  difference on the face (the rig's mask) plus the rig distance of their parameters;
* ``E_recog`` (eqs. 14-15): ``1 - cos`` of dlib identity descriptors between ``I`` and ``G(w)`` and between
  ``G(w)`` and each ``G(w_hat)``; the face chips of generated images are placed by the rig's projected eye corners
  and nose (the differentiable dlib port of :mod:`portrait3d.losses.identity`).

The optimisation is hierarchical: first in W (one code for all layers), then in W+ (one per layer), each with Adam
and its own step size (``lr_w``, ``lr``) decaying linearly to ``lr_final`` times it. Edits then run RigNets in
sequence (pose first), with the feedback step ``theta_new = theta + (theta - theta_est)`` that corrects what the
first pass missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.methods.pie.estimator import ParamEstimator
from portrait3d.methods.pie.face_model import FaceModel, RigParams
from portrait3d.methods.pie.rignet import MODES, RigNet, mode_params, rig_distance, with_mode

__all__ = ["MP_DLIB5", "PieConfig", "PieEmbedder", "EmbedResult"]

# MediaPipe mesh indices of dlib's 5 points (image-right eye outer / inner, image-left eye outer / inner, nose base)
MP_DLIB5 = (263, 362, 33, 133, 2)
EDIT_ORDER = ("pose", "expression", "light")


@dataclass
class PieConfig(ConfigMixin):
    steps_w: int = 150                 # CPU default (the paper: 2,000)
    steps_wplus: int = 100             # (the paper: 1,000)
    lr: float = 0.02                   # Adam step size in W+
    lr_w: float = 0.1                  # and in the W stage: the StyleGAN2 projector's W step size (0.02 as in W+
                                       # left the W stage short of the photo; the README's PIE section has the sweep)
    lr_final: float = 0.1              # each stage's step size at its end, as a fraction of its start
    perceptual_weight: float = 1.0
    perceptual_max_size: int = 256
    id_weight: float = 1.0             # lambda_id
    edit_weight: float = 1.0           # lambda_edit
    inv_weight: float = 1.0            # lambda_inv
    recog_weight: float = 10.0         # lambda_recog; 1 -> 3 -> 10: identity kept in 62 -> 75 -> 100% of 8 edits
    modify_every: int = 2              # E_id / E_edit / E_inv / the edits' E_recog every k steps (their cost)
    pose_range_deg: float = 30.0       # E_edit's sampled yaw / pitch targets: uniform within +- this
    light_std: float = 0.3             # and SH light: the current light plus this much noise
    seed: int = 0
    modes: list[str] = field(default_factory=lambda: ["pose"])


@dataclass
class EmbedResult:
    ws: torch.Tensor                   # [1, num_ws, w_dim]
    params: RigParams                  # theta(G(ws))
    history: list[dict[str, float]]


class PieEmbedder:
    """Embeds and edits portraits with a generator, the face rig, the estimator and one RigNet per mode."""

    def __init__(self, G: Any, rig: FaceModel, estimator: ParamEstimator, rignets: dict[str, RigNet],
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 identity_encoder: Any = None) -> None:
        for mode, net in rignets.items():
            if mode not in MODES or net.config.mode != mode:
                raise UsageError(f"RigNet for {mode!r} is a {net.config.mode!r} RigNet")
            if (net.config.num_ws, net.config.w_dim) != (G.num_ws, G.w_dim):
                raise UsageError(f"the {mode} RigNet was trained for another generator (W+ of "
                                 f"{net.config.num_ws} x {net.config.w_dim}, not {G.num_ws} x {G.w_dim})")
        self.G = G.eval().requires_grad_(False)
        self.rig = rig
        self.estimator = estimator.eval().requires_grad_(False)
        self.rignets = {m: n.eval().requires_grad_(False) for m, n in rignets.items()}
        self.perceptual = perceptual
        self.identity_encoder = identity_encoder

    # ------------------------------------------------------------------ pieces
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        return self.G.synthesis(ws, noise_mode="const")

    def theta(self, images: torch.Tensor) -> RigParams:
        return self.estimator(images)

    def _five_points(self, p: RigParams, size: int) -> np.ndarray:
        pts = self.rig.project(self.rig.vertices(p), size)
        return pts[:, list(MP_DLIB5)].detach().cpu().numpy().astype(np.float64)

    def _descriptor(self, images: torch.Tensor, five: np.ndarray) -> torch.Tensor:
        """dlib descriptors ``[N, 128]`` of ``images`` (``[-1, 1]``) on chips placed by ``five [N, 5, 2]``."""
        from portrait3d.losses.identity import to_encoder_range

        return self.identity_encoder(to_encoder_range(images), five)

    # ------------------------------------------------------------------ energies
    def energies(self, ws: torch.Tensor, target: torch.Tensor, target_desc: torch.Tensor | None, cfg: PieConfig,
                 g: torch.Generator, modify: bool) -> dict[str, torch.Tensor]:
        """The terms of eq. 6 for latents ``ws [1, num_ws, w_dim]`` and the portrait ``target [1, 3, H, W]``."""
        img = self.render(ws)
        terms: dict[str, torch.Tensor] = {"syn_pixel": (img - target).square().mean()}
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            k = max(1, img.shape[-1] // cfg.perceptual_max_size)
            a, b = (F.avg_pool2d(x, k) if k > 1 else x for x in (img, target))
            terms["syn_perceptual"] = self.perceptual(a, b).mean()
        th = self.theta(img)
        size = img.shape[-1]
        desc = None
        if target_desc is not None and cfg.recog_weight > 0:
            desc = self._descriptor(img, self._five_points(th, size))
            terms["recog"] = (1 - F.cosine_similarity(desc, target_desc, dim=-1)).mean()
        if modify:
            with torch.no_grad():  # E_inv's face region, the same for every mode
                mask = (self.rig(th.detach(), size)["mask"] > 0.5).float()
            for mode in cfg.modes:
                net = self.rignets[mode]
                own = net(ws, mode_params(th, mode))
                terms[f"id_{mode}"] = (self.render(own) - img).square().mean()
                v = self._sample(mode, th.detach(), cfg, g)
                w_hat = net(ws, mode_params(v, mode))
                img_hat = self.render(w_hat)
                th_hat = self.theta(img_hat)
                terms[f"edit_{mode}"] = rig_distance(self.rig, with_mode(th.detach(), th_hat, mode),
                                                     with_mode(th.detach(), v, mode)).mean()
                back = self.render(net(w_hat, mode_params(th, mode)))
                inv_pix = ((back - img).square() * mask).sum() / (3 * mask.sum() + 1e-6)
                terms[f"inv_{mode}"] = inv_pix + rig_distance(self.rig, self.theta(back), th).mean()
                if desc is not None:
                    d_hat = self._descriptor(img_hat, self._five_points(th_hat, size))
                    terms[f"recog_{mode}"] = (1 - F.cosine_similarity(d_hat, desc, dim=-1)).mean()
        total = terms["syn_pixel"] + cfg.perceptual_weight * terms.get("syn_perceptual", 0.0)
        for name, v in terms.items():
            if name.startswith("id_"):
                total = total + cfg.id_weight * v
            elif name.startswith("edit_"):
                total = total + cfg.edit_weight * v
            elif name.startswith("inv_"):
                total = total + cfg.inv_weight * v
            elif name.startswith("recog"):
                total = total + cfg.recog_weight * v
        terms["total"] = total
        return terms

    def _sample(self, mode: str, cur: RigParams, cfg: PieConfig, g: torch.Generator) -> RigParams:
        n = cur.angles.shape[0]
        if mode == "pose":
            a = torch.zeros(n, 3)
            a[:, :2] = (torch.rand(n, 2, generator=g) * 2 - 1) * cfg.pose_range_deg
            return cur.replace(angles=a)
        if mode == "expression":
            return cur.replace(expression=torch.randn(cur.expression.shape, generator=g))
        return cur.replace(light=cur.light + cfg.light_std * torch.randn(cur.light.shape, generator=g))

    # ------------------------------------------------------------------ embedding
    def embed(self, image: torch.Tensor, cfg: PieConfig, landmarks5: np.ndarray | None = None,
              progress: Callable[[int, dict[str, float]], None] | None = None) -> EmbedResult:
        """Hierarchical embedding of ``image [1, 3, H, W]`` in ``[-1, 1]`` (at the generator's resolution);
        ``landmarks5 [5, 2]`` (dlib order) place its identity chip for ``E_recog`` (None: no ``E_recog``)."""
        G = self.G
        if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] != G.img_resolution:
            raise UsageError(f"the portrait must be [1, 3, {G.img_resolution}, {G.img_resolution}], "
                             f"not {list(image.shape)}")
        for m in cfg.modes:
            if m not in self.rignets:
                raise UsageError(f"no RigNet for mode {m!r} (have: {', '.join(self.rignets) or 'none'})")
        target_desc = None
        if landmarks5 is not None and self.identity_encoder is not None and cfg.recog_weight > 0:
            with torch.no_grad():
                target_desc = self._descriptor(image, np.asarray(landmarks5, np.float64)[None])
        g = torch.Generator().manual_seed(cfg.seed)
        w = G.mapping.w_avg.detach()[None, None].clone()                       # W: one code
        history: list[dict[str, float]] = []
        step = 0
        for stage, steps in (("W", cfg.steps_w), ("W+", cfg.steps_wplus)):
            if steps <= 0:
                continue
            if stage == "W+":
                w = w.detach().expand(-1, G.num_ws, -1).clone()
            w = w.detach().requires_grad_(True)
            lr = cfg.lr_w if stage == "W" else cfg.lr
            opt = torch.optim.Adam([w], lr=lr)
            for k in range(steps):
                lr_now = lr * (1 - (1 - cfg.lr_final) * k / max(steps - 1, 1))
                for group in opt.param_groups:
                    group["lr"] = lr_now
                ws = w.expand(-1, G.num_ws, -1) if stage == "W" else w
                modify = bool(cfg.modes) and cfg.modify_every > 0 and step % cfg.modify_every == 0
                terms = self.energies(ws, image, target_desc, cfg, g, modify)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                rec = {"step": step, "stage": stage, "lr": lr_now, **{n: float(v.detach()) for n, v in terms.items()}}
                history.append(rec)
                if progress is not None:
                    progress(step, rec)
                step += 1
        ws = (w.expand(-1, G.num_ws, -1) if w.shape[1] == 1 else w).detach()
        with torch.no_grad():
            params = self.theta(self.render(ws))
        return EmbedResult(ws, params, history)

    # ------------------------------------------------------------------ editing
    @torch.no_grad()
    def edit(self, ws: torch.Tensor, targets: dict[str, RigParams], feedback: bool = True
             ) -> tuple[torch.Tensor, dict[str, dict[str, list[float]]]]:
        """Apply the target parameters of each mode in ``targets`` (pose first, then expression, then light), each
        with one feedback step. Returns the edited latents and, per mode, the target and measured parameters."""
        report: dict[str, dict[str, list[float]]] = {}
        for mode in EDIT_ORDER:
            if mode not in targets:
                continue
            if mode not in self.rignets:
                raise UsageError(f"no RigNet for mode {mode!r} (have: {', '.join(self.rignets) or 'none'})")
            net = self.rignets[mode]
            want = mode_params(targets[mode], mode)
            out = net(ws, want)
            got = mode_params(self.theta(self.render(out)), mode)
            if feedback:
                out = net(ws, want + (want - got))
                got = mode_params(self.theta(self.render(out)), mode)
            report[mode] = {"target": want[0].tolist(), "measured": got[0].tolist()}
            ws = out
        return ws, report

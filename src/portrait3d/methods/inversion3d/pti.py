"""Pivotal tuning of the EG3D generator with depth regularisation (Ko et al., WACV 2023).

After the latent code and camera are found (the *pivot* ``(w_p, pi_p)``), Ko et al. fine-tune the
generator around it as in Pivotal Tuning Inversion (Roich et al., "Pivotal Tuning for Latent-based
Editing of Real Images", ACM TOG 2022, the "pivotal tuning" step), adding a **depth smoothness
regulariser** on the rendered depth ("generator tuning with depth regularization": the last stage
of the main paper's Algorithm 1) because free tuning of a NeRF-based generator on one view tends
to distort the geometry (bumps, floaters) while fitting the image:

    L_pt = lambda_L2 * L2(x, G*(w_p, pi_p)) + lambda_P * L_percep(x, G*(w_p, pi_p))
           + lambda_depth * L_DS(D*(w_p, pi_p)) [+ lambda_sym * L_sym] [+ lambda_nv * L_nv] [+ lambda_R * L_R]

* ``L2``: pixel mean squared error (PTI's ``L2``);
* ``L_percep``: :class:`portrait3d.losses.PerceptualLoss` (EfficientNet-Lite0 features, our offline
  stand-in for PTI's LPIPS -- not LPIPS; the description is recorded);
* ``L_DS``: depth smoothness of the rendered depth map, the depth smoothness loss of RegNeRF
  (Niemeyer et al., CVPR 2022) over the whole map instead of patches: the mean squared
  difference of the depths of neighbouring pixels (``order=1``); ``order=2`` penalises second
  differences instead (curvature, so a slanted plane is free). :func:`depth_smoothness`;
* ``L_sym``: an optional mirrored pseudo view (ours, after the facial symmetry prior of Yin et al., "3D GAN
  Inversion with Facial Symmetry Prior", CVPR 2023, without its masks): a face is nearly left-right symmetric, so
  the flipped photo is what the camera mirrored across the face's plane of symmetry would see; tuning on it too
  (pixel MSE + perceptual, ``symmetry_weight``) gives PTI a second view of the head, which one view leaves free
  (:func:`portrait3d.face.dataset.mirror_camera`). Off by default;
* ``L_nv``: an optional novel-view identity term (ours): at head yaws ``novel_view_yaws`` (absolute, the pivot's
  pitch, one view per step in turn) the tuned render's dlib descriptor must match the photo's,
  ``1 - cos(f(G*(w_p, pi_k)), f(x))``. Tuning on one view fits the photo's side of the head and leaves the others free
  to drift from the person; a recognition network gives the unseen views a target that needs no pixels. The chips are
  placed by the 68 landmarks detected on the pivot's own render of each view before tuning (a view without a face is
  skipped). Off by default. Note that dlib's network is also what ``bench/eval_inversion3d.py`` measures identity
  with, so figures with this term on measure identity with the network that was optimised (README says so);
* ``L_R``: PTI's optional locality regulariser (Roich et al., "locality regularization"): for a
  random ``w_z = f(z)`` (truncation 0.5), ``w_r = w_p + alpha (w_z - w_p) / ||w_z - w_p||`` must
  render the same with the tuned and the original generator (L2 + perceptual, weighted
  ``locality_weight``; PTI uses 0.1 for each).

PTI's defaults are kept where they exist (350 steps, Adam lr 3e-4, unit L2 / perceptual weights,
``alpha = 30``, locality weights 0.1 when enabled, off by default); ``lambda_depth`` is our choice
(the value used by Ko et al. is not given in the text we have).

The caller's generator is never modified: a deep copy is tuned and returned.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from portrait3d.methods.projector.projector import device_of, finite_loss, scaled_landmarks
from portrait3d.methods.projector.pti import PTISettings, locality_distance, sample_locality_code

__all__ = ["PTIConfig", "depth_smoothness", "novel_view_identity_terms", "pivotal_tuning", "render"]


@dataclass
class PTIConfig(PTISettings):
    """Settings of :func:`pivotal_tuning`: PTI's (:class:`~portrait3d.methods.projector.pti.PTISettings`: steps,
    learning rate, loss weights, locality regulariser), Ko et al.'s depth regulariser and our optional terms."""

    depth_smooth_weight: float = 1.0      # lambda_depth of Ko et al.'s depth regulariser (our value)
    depth_smooth_order: int = 1           # 1: RegNeRF's squared first differences; 2: second differences
    locality_interval: int = 1            # apply the locality term every k steps
    symmetry_weight: float = 0.0          # the mirrored pseudo view (flipped photo at the mirrored camera); 0 = off
                                          # (at 1 on 6 photos: same identity kept, -5 dB PSNR; README)
    novel_view_identity_weight: float = 0.0   # lambda_nv: dlib identity of novel views to the photo; 0 = off
    novel_view_yaws: tuple[float, ...] = (-40.0, -20.0, 20.0, 40.0)  # absolute head yaws (deg) of those views
    deterministic: bool = True            # deterministic ray sampling while tuning (less gradient noise)

    def validate(self) -> None:
        super().validate()
        if self.depth_smooth_order not in (1, 2):
            raise ValueError(f"depth_smooth_order must be 1 or 2, not {self.depth_smooth_order}")
        if self.locality_interval < 1:
            raise ValueError(f"locality_interval must be >= 1, not {self.locality_interval}")
        for name in ("depth_smooth_weight", "symmetry_weight", "novel_view_identity_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, not {v!r}")
        if self.novel_view_identity_weight > 0:
            if not self.novel_view_yaws:
                raise ValueError("novel_view_identity_weight > 0 needs at least one novel_view_yaws entry")
            bad = [y for y in self.novel_view_yaws if not (math.isfinite(y) and -90 < y < 90)]
            if bad:
                raise ValueError(f"novel_view_yaws must lie strictly between -90 and 90 degrees, not {bad}")


def depth_smoothness(depth: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Depth smoothness regulariser ``L_DS`` of a rendered depth map (RegNeRF's depth smoothness loss, as a mean).

    ``order=1``: ``mean_ij (d_ij - d_i+1,j)^2 + mean_ij (d_ij - d_i,j+1)^2``;
    ``order=2``: the same with second differences ``d_i-1 - 2 d_i + d_i+1`` along rows and columns.

    Args:
        depth: ``[N, 1, H, W]`` (or ``[N, H, W]``) rendered depth (``image_depth``).
        order: 1 or 2.

    Returns:
        scalar, differentiable.
    """
    d = depth if depth.ndim == 4 else depth[:, None]
    if order == 1:
        dy = d[:, :, 1:, :] - d[:, :, :-1, :]
        dx = d[:, :, :, 1:] - d[:, :, :, :-1]
    elif order == 2:
        dy = d[:, :, 2:, :] - 2 * d[:, :, 1:-1, :] + d[:, :, :-2, :]
        dx = d[:, :, :, 2:] - 2 * d[:, :, :, 1:-1] + d[:, :, :, :-2]
    else:
        raise ValueError(f"order must be 1 or 2, not {order}")
    return dy.square().mean() + dx.square().mean()


def _synthesis_takes(G: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(G.synthesis).parameters
    except (TypeError, ValueError):
        return False


def _supports_deterministic(G: nn.Module) -> bool:
    return _synthesis_takes(G, "deterministic")


def supports_planes(G: nn.Module) -> bool:
    """Whether ``G`` computes tri-planes alone (``G.planes(ws)``) and renders given ones (``synthesis(planes=)``)."""
    return callable(getattr(G, "planes", None)) and _synthesis_takes(G, "planes")


def render(G: nn.Module, ws: torch.Tensor, c: torch.Tensor, deterministic: bool = True,
           rendering: dict[str, Any] | None = None, planes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``G.synthesis(ws, c, noise_mode='const')`` with deterministic ray sampling when supported (``rendering``:
    rendering settings overridden for this call, e.g. fewer samples per ray; ``planes``: ``ws``'s tri-planes,
    already computed, for generators whose synthesis takes them).

    EG3D's synthesis takes the camera once: it places the rays (and the mapping network, which
    we do not run here, would take it as conditioning); ``ws [N, num_ws, w_dim]``, ``c [N, 25]`` ->
    ``{'image' [N, 3, R, R], 'image_raw', 'image_depth' [N, 1, r, r]}``.
    """
    kw: dict[str, Any] = {"noise_mode": "const"}
    if deterministic and _supports_deterministic(G):
        kw["deterministic"] = True
    if rendering:
        kw["rendering"] = rendering
    if planes is not None:
        kw["planes"] = planes
    return G.synthesis(ws, c, **kw)


def novel_view_identity_terms(G: nn.Module, ws: torch.Tensor, camera: torch.Tensor, yaws: tuple[float, ...],
                              reference_embedding: torch.Tensor,
                              landmarks_of: Callable[[np.ndarray], np.ndarray | None],
                              deterministic: bool = True, encoder: nn.Module | None = None
                              ) -> list[tuple[float, torch.Tensor, nn.Module]]:
    """The views of :class:`PTIConfig`'s ``L_nv``: ``[(yaw, camera [1, 25], IdentityLoss)]``, one per yaw whose pivot
    render has a face.

    Each view's camera is ``camera`` turned to head yaw ``yaw`` (absolute degrees; pitch, roll, distance and
    intrinsics kept: :func:`~portrait3d.methods.inversion3d.camera_params.view_camera`). Its identity loss compares
    with ``reference_embedding`` ``[1, 128]`` (the photo's dlib descriptor), its chip placed by the landmarks found on
    ``G``'s render of the pivot ``ws`` at that camera. ``encoder``: the dlib network to use (default: one built for
    the first view), shared by every view.
    """
    from portrait3d.losses.identity import IdentityLoss
    from portrait3d.methods.inversion3d.camera_params import view_camera
    from portrait3d.utils.visualize import to_uint8

    dev = ws.device
    res = int(G.img_resolution)
    terms: list[tuple[float, torch.Tensor, nn.Module]] = []
    for yaw in yaws:
        cam = view_camera(camera, float(yaw)).to(dev)
        with torch.no_grad():
            img = to_uint8(render(G, ws, cam, deterministic)["image"].float())[0]
        lm = landmarks_of(img)
        if lm is None:
            continue
        loss = IdentityLoss(reference_embedding=reference_embedding.detach().cpu(), landmarks=lm,
                            image_size=(res, res), encoder=encoder).to(dev).eval()
        encoder = loss.encoder
        terms.append((float(yaw), cam, loss))
    return terms


def pivotal_tuning(G: nn.Module, ws: torch.Tensor, camera: torch.Tensor, target: torch.Tensor,
                   cfg: PTIConfig | None = None, progress: bool = True, *, landmarks: np.ndarray | None = None,
                   image_loss: nn.Module | None = None, callback: Callable[..., Any] | None = None,
                   step_offset: int = 0, landmarks_of: Callable[[np.ndarray], np.ndarray | None] | None = None,
                   ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune a copy of the EG3D generator around the pivot ``(ws, camera)`` (PTI + depth smoothness).

    Args:
        G: the EG3D :class:`~portrait3d.networks.eg3d.triplane.TriPlaneGenerator` (never modified:
            no parameter, buffer, ``.grad`` or mode of it changes).
        ws: pivot latent ``[1, num_ws, w_dim]``.
        camera: pivot camera label ``[1, 25]``.
        target: ``[1, 3, H, H]`` in ``[-1, 1]`` (resized to ``G.img_resolution``).
        cfg: :class:`PTIConfig`.
        progress: tqdm bar.
        landmarks: ``[68, 2]`` target landmarks (pixel coordinates of ``target``) for the optional
            identity term.
        image_loss: a ready :class:`portrait3d.methods.inversion3d.losses.ImageLoss` to use for the
            reconstruction terms instead of building one from ``cfg``.
        callback: ``callback(step, record, G_tuned, image)`` after every step; ``True`` stops.
        step_offset: added to the ``step`` of every record (to continue an inversion's history).
        landmarks_of: the 68-landmark finder that places the novel views' chips (``L_nv``; default: the face
            pipeline's, :meth:`portrait3d.face.pipeline.FacePipeline.find_landmarks68`).

    Returns:
        ``(G_tuned, history)``: the tuned copy (eval mode, ``requires_grad`` off) and one dict per
        step (``step``, ``phase='pti'``, ``lr``, ``loss``, ``mse``, ``perceptual``, ``identity``,
        ``depth_smooth``, ``symmetry``, ``novel_view_identity`` with ``novel_view_yaw``, ``locality``; zero-weight
        terms absent).

    Raises:
        ValueError: ``L_nv`` asked without ``landmarks`` (the photo's descriptor needs them).
    """
    from portrait3d.methods.inversion3d.losses import ImageLoss, LossWeights

    cfg = cfg or PTIConfig()
    cfg.validate()
    dev = device_of(G)
    ws = ws.detach().to(dev)
    camera = camera.detach().to(dev).reshape(-1, 25)
    if image_loss is None:
        image_loss = ImageLoss(target.to(dev), landmarks=landmarks, resolution=int(G.img_resolution),
                               weights=LossWeights(cfg.mse_weight, cfg.perceptual_weight, cfg.identity_weight),
                               perceptual=cfg.perceptual, perceptual_kwargs=cfg.perceptual_kwargs).to(dev)

    G_t = copy.deepcopy(G)
    G_t.requires_grad_(False)
    params = [p for n, p in G_t.named_parameters() if not n.startswith("backbone.mapping.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    use_locality = cfg.locality_weight > 0
    percept = getattr(image_loss, "perceptual_module", None)
    mirror_loss = mirror_cam = None
    if cfg.symmetry_weight > 0:
        from portrait3d.face.dataset import mirror_camera

        # the flipped target at the mirrored camera; pixel + perceptual only (dlib's chip is placed for the photo)
        mirror_loss = ImageLoss(image_loss.target.flip(-1),
                                weights=LossWeights(cfg.mse_weight, cfg.perceptual_weight, 0),
                                perceptual=percept if percept is not None else cfg.perceptual,
                                perceptual_kwargs=cfg.perceptual_kwargs).to(dev)
        mirror_cam = mirror_camera(camera[0].cpu())[None].to(dev)

    novel_views: list[tuple[float, torch.Tensor, nn.Module]] = []
    if cfg.novel_view_identity_weight > 0 and cfg.steps > 0:
        ident = getattr(image_loss, "identity_module", None)
        if (ident is None or not hasattr(ident, "reference_embedding")) and landmarks is not None:
            from portrait3d.losses.identity import IdentityLoss

            tgt = image_loss.target
            ident = IdentityLoss(tgt.cpu(), scaled_landmarks(landmarks, int(target.shape[-1]), int(tgt.shape[-1])))
        if ident is None or not hasattr(ident, "reference_embedding"):
            raise ValueError("the novel-view identity term needs the photo's landmarks (landmarks=)")
        pipe = None
        if landmarks_of is None:
            from portrait3d.face.pipeline import FacePipeline

            pipe = FacePipeline(style="default")
            landmarks_of = pipe.find_landmarks68
        try:
            # the photo's descriptor and every view share one dlib network
            novel_views = novel_view_identity_terms(G, ws, camera, tuple(cfg.novel_view_yaws),
                                                    ident.reference_embedding, landmarks_of, cfg.deterministic,
                                                    encoder=getattr(ident, "encoder", None))
        finally:
            if pipe is not None:
                pipe.close()

    history: list[dict[str, Any]] = []
    bar = None
    if progress and cfg.steps > 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="pivotal tuning", unit="step", leave=False)
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            out = render(G_t, ws, camera, cfg.deterministic)
            loss, terms = image_loss(out["image"])
            record: dict[str, Any] = {"step": step_offset + step, "phase": "pti", "lr": cfg.lr, **terms}
            if cfg.depth_smooth_weight > 0:
                ds = depth_smoothness(out["image_depth"], cfg.depth_smooth_order)
                loss = loss + cfg.depth_smooth_weight * ds
                record["depth_smooth"] = float(ds.detach())
            if mirror_loss is not None:
                sym, _ = mirror_loss(render(G_t, ws, mirror_cam, cfg.deterministic)["image"])
                loss = loss + cfg.symmetry_weight * sym
                record["symmetry"] = float(sym.detach())
            if novel_views:
                yaw, nv_cam, nv_loss = novel_views[step % len(novel_views)]
                nv = nv_loss(render(G_t, ws, nv_cam, cfg.deterministic)["image"]).mean()
                loss = loss + cfg.novel_view_identity_weight * nv
                record["novel_view_identity"], record["novel_view_yaw"] = float(nv.detach()), yaw
            if use_locality and step % cfg.locality_interval == 0:
                w_r = sample_locality_code(G, ws, cfg, gen, c=camera)
                with torch.no_grad():
                    ref = render(G, w_r, camera, cfg.deterministic)["image"]
                img_r = render(G_t, w_r, camera, cfg.deterministic)["image"]
                loc = locality_distance(img_r, ref, percept)
                loss = loss + cfg.locality_weight * loc
                record["locality"] = float(loc.detach())
            record["loss"] = finite_loss(loss, "pivotal tuning", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record["time"] = time.perf_counter() - t0
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "mse", "depth_smooth")},
                                refresh=False)
            if callback is not None and callback(step, record, G_t, out["image"].detach()):
                break
            if cfg.stop_threshold > 0 and record.get("perceptual", math.inf) < cfg.stop_threshold:
                break
    finally:
        if bar is not None:
            bar.close()
    for p in G_t.parameters():
        p.grad = None
    G_t.requires_grad_(False)
    G_t.train(G.training)
    return G_t, history

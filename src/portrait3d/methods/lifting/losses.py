"""Training losses of LiftedGAN (Shi, Aggarwal and Jain, CVPR 2021), Sec. 3.2 (eqs. 2-9).

Every term is its own function so ablations can switch it off; :func:`lift_losses` computes only
the terms whose weight in :class:`LiftLossWeights` is non-zero and returns them (already
weighted) in a dict with their sum under ``"total"``.

Terms (``I = G2D(w)`` resized to the lifting resolution, ``Î`` the re-render of the lifted face):

* ``rec`` -- reconstruction (:func:`image_loss`): ``|Î - I|_1 + λ_perc P(Î, I)``. ``P`` is
  :class:`portrait3d.losses.perceptual.PerceptualLoss`, an LPIPS-style distance on ImageNet
  EfficientNet-Lite0 features -- a substitute, **not LPIPS** (the paper uses a VGG perceptual loss);
* ``flip`` -- flipped reconstruction (:func:`flip_reconstruction_loss`): the same with the depth
  and albedo mirrored horizontally (symmetry prior of Unsup3d, used by LiftedGAN);
* ``perturb_image`` -- perturbation loss part I (:func:`perturbation_image_loss`): sample a new
  light ``L'`` and view ``V'`` (:func:`sample_perturbation`), let the style manipulator produce
  ``w' = M(w, L', V')``, read back ``(L~, V~) = (D_L(w'), D_V(w'))`` and render the lifted face at
  ``(L~, V~)``: that render must look like ``G2D(w')`` (target without gradient) -- the 3D model
  has to explain what the 2D generator draws under a new pose / light;
* ``perturb_generator`` -- part II (:func:`perturbation_generator_loss`): ``G2D(w')`` must look
  like the render at ``(L', V')`` (target without gradient) -- the perturbed render must be
  reproducible by the 2D generator, which trains ``M``;
* ``perturb_param`` -- the light / view cycle (:func:`perturbation_param_loss`):
  ``|L~ - L'|^2 + |V~_rot - V'_rot|^2`` (tanh units) -- D_L, D_V applied to ``w'`` recover the
  perturbation;
* ``latent_prior`` -- Gaussian prior on ``w'`` (:func:`latent_prior_loss`):
  ``0.5 mean((w' - w_avg)^2) / sigma^2`` with ``sigma`` the mean per-dimension std of W;
* ``identity`` -- (:func:`identity_loss`) ``1 - cos`` between face-recognition descriptors of the
  canonical image ``G2D(w0)`` and the perturbed render, for perturbed yaws within
  ``±identity_max_yaw_deg``. Descriptors come from
  :class:`portrait3d.losses.identity.IdentityLoss` (dlib face ResNet) through its fixed chip
  transform (:func:`make_identity_loss`); the paper uses a different face embedding and a squared
  L2 distance;
* ``albedo_rank`` -- (:func:`albedo_rank_loss`) nuclear norm of the high-pass (first Laplacian-
  pyramid band: ``x - blur(x)``) of the gray albedo inside the face;
* ``mesh_depth`` -- **ours, not in the paper** (off by default): the canonical depth follows the relief of
  MediaPipe's face mesh measured on the canonical image (:func:`mesh_relief_loss`, :class:`FaceMeshTargets`),
  up to a per-face shift. Without it the depth learnt from a CPU-sized run stays a shallow relief (renders
  asked to turn 30 degrees turned about 5);
* ``view_pose`` -- **ours, not in the paper** (off by default): D_V's rotation follows the head pose the face
  pipeline measures on ``G2D(w)`` (:func:`view_pose_loss`: PnP of MediaPipe's mesh). Tried against canonical
  (D_V = 0) faces that are off frontal by 5.6 degrees (std): 2 kimg of it halved D_V's error but left the
  canonical faces off frontal (4.4 degrees), so the shipped model does not use it.

Weights (:class:`LiftLossWeights`) are those of the authors' released FFHQ-256 configuration,
which we take as the paper's Sec. 4 values (the paper text itself was not at hand); each term here
carries its *absolute* weight (e.g. ``flip = λ_rec λ_flip = 5 x 0.8``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.methods.lifting.networks import LiftedGenerator, LiftOutput, LightNet, gaussian_blur, resize_images

__all__ = [
    "ABLATIONS",
    "LiftLossWeights",
    "LiftLossConfig",
    "WStats",
    "Perturbation",
    "w_statistics",
    "sample_w",
    "image_loss",
    "reconstruction_loss",
    "flip_reconstruction_loss",
    "sample_perturbation",
    "perturb",
    "perturbation_image_loss",
    "perturbation_generator_loss",
    "perturbation_param_loss",
    "latent_prior_loss",
    "identity_loss",
    "centered_chip_transform",
    "make_identity_loss",
    "nuclear_norm",
    "albedo_highpass",
    "albedo_rank_loss",
    "FaceMeshTargets",
    "mesh_relief_loss",
    "head_views",
    "view_pose_loss",
    "lift_losses",
]



#: Ablation name (``--ablate``) -> the :class:`LiftLossWeights` terms it sets to 0. ``perturb`` removes
#: the whole perturbation branch (eqs. 4-7: both image terms, the parameter cycle and the prior on the
#: perturbed code); the identity loss (eq. 8) keeps sampling its own perturbed views.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "flip": ("flip",),
    "perturb": ("perturb_image", "perturb_generator", "perturb_param", "latent_prior"),
    "identity": ("identity",),
    "albedo": ("albedo_rank",),
}

@dataclass
class LiftLossWeights:
    """Absolute weight of each term (0 = not computed).

    Values from the authors' released FFHQ-256 config (``lam_rec 5, lam_perc 1, lam_flip 0.8,
    lam_perturb_im 2, lam_perturb_param 4, lam_identity_perturb 1, lam_reg_style 0.5,
    lam_albedo_rank 1e-2``); ``perc`` is the relative weight of the perceptual part inside every
    image loss. The perceptual network and face embedding differ from the paper's, so these
    balances are a starting point, not tuned values for our substitutes.
    """

    rec: float = 5.0
    flip: float = 4.0
    perc: float = 1.0
    perturb_image: float = 2.0
    perturb_generator: float = 2.0
    perturb_param: float = 4.0
    latent_prior: float = 0.5
    identity: float = 1.0
    albedo_rank: float = 1e-2
    mesh_depth: float = 0.0
    view_pose: float = 0.0

    def __post_init__(self) -> None:
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LiftLossWeights.{f} must be a finite number >= 0, not {v!r}")


@dataclass
class LiftLossConfig:
    """Sampling and shape settings of the losses.

    Attributes:
        perturb_yaw_deg, perturb_pitch_deg: perturbed view angles ~ U(±yaw) and U(±pitch), roll 0
            (release: 45 and 15).
        perturb_tx_per_sin_yaw: perturbed x translation = this * sin(yaw) (release: 0.2 in tanh units
            of the ±0.1 range = 0.02).
        identity_max_yaw_deg: identity loss only on perturbed yaws within ±this (release: 25).
        albedo_highpass_sigma: Gaussian sigma (pixels) of the blur removed from the albedo
            (release: sigma 4 at 256 px; default here: ``4 * S / 256``).
        rank_downsample: average-pooling factor before the nuclear norm (release: 4 at 256 px;
            default here: ``max(1, 4 * S / 256)``).
        rank_mode: ``"batch"`` -- one matrix ``[N, h*w]`` whose rows are the images' flattened
            residuals (the authors' release: albedo details should span a low-dimensional space
            across faces); ``"image"`` -- each image's ``[h, w]`` residual is its own matrix and the
            nuclear norms are averaged.
        image_clamp: clamp ``G2D`` targets to ``[-1, 1]``.
        mesh_depth_scale: how far to trust the depth scale of MediaPipe's mesh in :func:`mesh_relief_loss`
            (its ``z`` is only roughly metric; > 1 asks for a deeper relief).
    """

    perturb_yaw_deg: float = 45.0
    perturb_pitch_deg: float = 15.0
    perturb_tx_per_sin_yaw: float = 0.02
    identity_max_yaw_deg: float = 25.0
    albedo_highpass_sigma: float | None = None
    rank_downsample: int | None = None
    rank_mode: Literal["batch", "image"] = "batch"
    image_clamp: bool = True
    mesh_depth_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.rank_mode not in ("batch", "image"):
            raise ValueError(f"rank_mode must be 'batch' or 'image', not {self.rank_mode!r}")


class WStats(NamedTuple):
    """Mean ``[w_dim]`` and scalar std (mean over dimensions) of the W distribution."""

    mean: torch.Tensor
    std: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Latents
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def w_statistics(g2d: nn.Module, num_samples: int = 10000, seed: int = 0, batch: int = 4096) -> WStats:
    """Estimate the mean and std of W (``mapping(z)``, ``z ~ N(0, I)``) for the Gaussian prior of
    eq. 7 (release: 50k samples; ``std`` = mean over dimensions of the per-dimension std)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(g2d.parameters()).device
    ws = []
    for i in range(0, num_samples, batch):
        n = min(batch, num_samples - i)
        z = torch.randn(n, g2d.z_dim, generator=g).to(dev)
        ws.append(g2d.mapping(z, None)[:, 0].float())
    w = torch.cat(ws)
    return WStats(w.mean(0), w.std(0).mean())


@torch.no_grad()
def sample_w(g2d: nn.Module, n: int, truncation: float = 0.7, generator: torch.Generator | None = None) -> torch.Tensor:
    """A training batch ``[n, w_dim]``: ``w = mapping(z)`` with truncation towards ``w_avg``
    (release: 0.7)."""
    dev = next(g2d.parameters()).device
    z = torch.randn(n, g2d.z_dim, generator=generator).to(dev)
    return g2d.mapping(z, None, truncation_psi=truncation)[:, 0]


# ----------------------------------------------------------------------------------------------
# Image losses (eqs. 2-3)
# ----------------------------------------------------------------------------------------------

def image_loss(x: torch.Tensor, y: torch.Tensor, perceptual: nn.Module | None = None,
               perc_weight: float = 1.0) -> torch.Tensor:
    """``mean |x - y| + perc_weight * mean P(x, y)`` for images ``[N, 3, H, W]`` in ``[-1, 1]``
    (the image distance used by eqs. 2-5); the perceptual part is skipped when ``perc_weight``
    is 0 or ``perceptual`` is None."""
    loss = (x - y).abs().mean()
    if perc_weight > 0 and perceptual is not None:
        loss = loss + perc_weight * perceptual(x, y).mean()
    return loss


def reconstruction_loss(out: LiftOutput, target: torch.Tensor, perceptual: nn.Module | None = None,
                        perc_weight: float = 1.0) -> torch.Tensor:
    """Eq. 2: the re-render ``out.image [N, 3, S, S]`` against ``G2D(w)`` ``target [N, 3, S, S]``."""
    return image_loss(out.image, target, perceptual, perc_weight)


def flip_reconstruction_loss(model: LiftedGenerator, out: LiftOutput, target: torch.Tensor,
                             perceptual: nn.Module | None = None, perc_weight: float = 1.0,
                             renderer_cfg: Any = None) -> torch.Tensor:
    """Eq. 3: reconstruction with the canonical depth and albedo mirrored horizontally (same view,
    light and transformation map) -- faces are roughly symmetric in the canonical frame."""
    flipped = model.render_view(out, flip=True, renderer_cfg=renderer_cfg)
    return image_loss(flipped.image, target, perceptual, perc_weight)


# ----------------------------------------------------------------------------------------------
# Perturbation (eqs. 4-7)
# ----------------------------------------------------------------------------------------------

class Perturbation(NamedTuple):
    """The perturbed parameters and the cycle through the style manipulator.

    Fields: ``light [N, 4]`` / ``view [N, 6]`` the sampled L', V'; ``w [N, w_dim]`` /
    ``ws [N, num_ws, w_dim]`` the code ``w' = M(w, L', V')``; ``light_rec`` / ``view_rec``
    ``D_L(w')``, ``D_V(w')``; ``yaw_deg [N]`` the sampled yaw.
    """

    light: torch.Tensor
    view: torch.Tensor
    w: torch.Tensor
    ws: torch.Tensor
    light_rec: torch.Tensor
    view_rec: torch.Tensor
    yaw_deg: torch.Tensor


def sample_perturbation(light: torch.Tensor, cfg: LiftLossConfig | None = None,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample L' and V' for a batch (Sec. 3.2, perturbation).

    Light: the batch's own predicted lights, shuffled (ambient/diffuse and direction by two
    independent permutations) -- realistic lights, detached. View: pitch ~ U(±perturb_pitch_deg),
    yaw ~ U(±perturb_yaw_deg), roll 0, ``tx = perturb_tx_per_sin_yaw * sin(yaw)``, ``ty = tz = 0``.

    Returns: ``(light' [N, 4], view' [N, 6], yaw_deg [N])``.
    """
    cfg = cfg or LiftLossConfig()
    n, dev, dt = light.shape[0], light.device, light.dtype
    p1 = torch.randperm(n, generator=generator).to(dev)
    p2 = torch.randperm(n, generator=generator).to(dev)
    light_p = torch.cat([light[p1, :2], light[p2, 2:4]], dim=1).detach()
    u = torch.rand(n, 2, generator=generator).to(dev, dt) * 2 - 1
    pitch = u[:, 0] * cfg.perturb_pitch_deg
    yaw = u[:, 1] * cfg.perturb_yaw_deg
    view_p = torch.zeros(n, 6, device=dev, dtype=dt)
    view_p[:, 0] = torch.deg2rad(pitch)
    view_p[:, 1] = torch.deg2rad(yaw)
    view_p[:, 3] = cfg.perturb_tx_per_sin_yaw * torch.sin(torch.deg2rad(yaw))
    return light_p, view_p, yaw


def perturb(model: LiftedGenerator, out: LiftOutput, cfg: LiftLossConfig | None = None,
            generator: torch.Generator | None = None) -> Perturbation:
    """Sample (L', V'), form ``w' = M(w, L', V')`` (residual on every W+ layer) and read back
    ``D_L(w')``, ``D_V(w')``."""
    light_p, view_p, yaw = sample_perturbation(out.light, cfg, generator)
    w_p, ws_p = model.manipulate(out.w.detach(), out.ws.detach(), light_p, view_p)
    return Perturbation(light=light_p, view=view_p, w=w_p, ws=ws_p, light_rec=model.nets["light"](w_p),
                        view_rec=model.nets["view"](w_p), yaw_deg=yaw)


def perturbation_image_loss(model: LiftedGenerator, out: LiftOutput, pert: Perturbation,
                            perceptual: nn.Module | None = None, perc_weight: float = 1.0,
                            renderer_cfg: Any = None, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 (perturbation, part I): render at ``(D_L(w'), D_V(w'))`` vs ``G2D(w')`` (no gradient
    into the target). Returns ``(loss, perturbed render [N, 3, S, S])``."""
    with torch.no_grad():
        target = model.synthesize(pert.ws)
        target = target.clamp(-1, 1) if clamp else target
    render = model.render_view(out, view=pert.view_rec, light=pert.light_rec, renderer_cfg=renderer_cfg).image
    return image_loss(render, target.detach(), perceptual, perc_weight), render


def perturbation_generator_loss(model: LiftedGenerator, out: LiftOutput, pert: Perturbation,
                                perceptual: nn.Module | None = None, perc_weight: float = 1.0,
                                renderer_cfg: Any = None) -> torch.Tensor:
    """Eq. 5 (perturbation, part II): ``G2D(w')`` vs the render at the sampled ``(L', V')`` (no
    gradient into the render) -- the perturbed render must be reproducible by the 2D generator
    from ``w'``; the gradient reaches ``M`` through the frozen ``G2D``."""
    with torch.no_grad():
        target = model.render_view(out, view=pert.view, light=pert.light, renderer_cfg=renderer_cfg).image
    regenerated = model.synthesize(pert.ws)
    return image_loss(regenerated, target.detach(), perceptual, perc_weight)


def perturbation_param_loss(model: LiftedGenerator, pert: Perturbation) -> torch.Tensor:
    """Eq. 6: light / view cycle ``mean (L~ - L')^2 + mean (V~_rot - V'_rot)^2`` in the networks'
    ``tanh`` units (rotations divided by their range; translations not constrained, as released)."""
    light = (LightNet.to_raw(pert.light_rec) - LightNet.to_raw(pert.light)).square().mean()
    vn = model.nets["view"]
    view = (vn.normalize(pert.view_rec) - vn.normalize(pert.view))[:, :3].square().mean()
    return light + view


def latent_prior_loss(w: torch.Tensor, stats: WStats) -> torch.Tensor:
    """Eq. 7, Gaussian prior on the manipulated code: ``0.5 mean((w' - mu)^2) / sigma^2``
    (``w [N, w_dim]`` or ``[N, num_ws, w_dim]``)."""
    mean, std = stats.mean.to(w), stats.std.to(w)
    return 0.5 * (w - mean).square().mean() / std.square()


# ----------------------------------------------------------------------------------------------
# Identity (eq. 8)
# ----------------------------------------------------------------------------------------------

def centered_chip_transform(image_size: int, fraction: float = 0.8) -> np.ndarray:
    """``[1, 2, 3]`` chip->image affine that maps dlib's 150x150 chip onto the centred square of
    side ``fraction * image_size`` -- a fixed alignment for generators trained on aligned face crops
    (FFHQ-style). A transform from the average face's landmarks is more faithful when available."""
    from portrait3d.face.identity import CHIP_SIZE

    side = fraction * image_size
    s = side / CHIP_SIZE
    off = (image_size - side) / 2 + 0.5 * s - 0.5  # pixel centres at integer coordinates
    return np.array([[[s, 0.0, off], [0.0, s, off]]], dtype=np.float64)


def make_identity_loss(image_size: int, transform: Any = None, encoder: Any = None) -> nn.Module:
    """An :class:`IdentityLoss` usable for :func:`identity_loss` (only its ``embed`` is used):
    fixed chip transform (default :func:`centered_chip_transform`), dlib weights unless
    ``encoder`` is given."""
    from portrait3d.losses.identity import IdentityLoss

    t = centered_chip_transform(image_size) if transform is None else transform
    kw = {} if encoder is None else {"encoder": encoder}
    return IdentityLoss(reference_embedding=torch.zeros(1, 128), transforms=t,
                        image_size=(image_size, image_size), **kw)


def identity_loss(identity: nn.Module, canonical: torch.Tensor, rotated: torch.Tensor, yaw_deg: torch.Tensor,
                  max_yaw_deg: float = 25.0) -> torch.Tensor:
    """Eq. 8: ``mean (1 - cos(E(canonical), E(rotated)))`` over the faces with ``|yaw| < max_yaw_deg``
    (``E`` = ``identity.embed``; images ``[N, 3, S, S]``); 0 (still in the graph) when none qualify."""
    keep = yaw_deg.abs() < max_yaw_deg
    if not bool(keep.any()):
        return rotated.sum() * 0.0
    ec = identity.embed(canonical[keep])
    er = identity.embed(rotated[keep])
    return (1 - F.cosine_similarity(ec, er, dim=-1)).mean()


# ----------------------------------------------------------------------------------------------
# Albedo rank (eq. 9)
# ----------------------------------------------------------------------------------------------

def nuclear_norm(m: torch.Tensor) -> torch.Tensor:
    """Nuclear norm (sum of singular values) of ``m [..., R, C]`` -> ``[...]``."""
    return torch.linalg.svdvals(m).sum(dim=-1)


def albedo_highpass(albedo: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gray albedo minus its Gaussian blur (first Laplacian-pyramid band): ``[N, 3, S, S] -> [N, 1, S, S]``."""
    gray = albedo.mean(dim=1, keepdim=True)
    return gray - gaussian_blur(gray, sigma)


def albedo_rank_loss(albedo: torch.Tensor, depth: torch.Tensor, border_depth: float,
                     cfg: LiftLossConfig | None = None) -> torch.Tensor:
    """Eq. 9: nuclear norm of the high-pass gray albedo inside the face (``depth <= border - 0.01``),
    average-pooled by ``rank_downsample``.

    Args:
        albedo: ``[N, 3, S, S]``; depth: ``[N, S, S]``.

    ``rank_mode="batch"``: ``|| [r_1; ...; r_N] ||_*`` of the ``[N, h*w]`` matrix of flattened
    residuals (released implementation); ``"image"``: mean over images of ``|| r_i ||_*`` with
    ``r_i`` the ``[h, w]`` residual.
    """
    cfg = cfg or LiftLossConfig()
    s = albedo.shape[-1]
    sigma = cfg.albedo_highpass_sigma if cfg.albedo_highpass_sigma is not None else 4.0 * s / 256
    down = cfg.rank_downsample if cfg.rank_downsample is not None else max(1, round(4 * s / 256))
    mask = (depth[:, None] <= border_depth - 0.01).to(albedo)
    r = albedo_highpass(albedo, sigma) * mask
    if down > 1:
        r = F.avg_pool2d(r, down, stride=down)
    if cfg.rank_mode == "batch":
        return nuclear_norm(r.reshape(r.shape[0], -1))
    return nuclear_norm(r[:, 0]).mean()


# ----------------------------------------------------------------------------------------------
# Face-mesh relief (ours)
# ----------------------------------------------------------------------------------------------

class FaceMeshTargets:
    """MediaPipe's 468-point face mesh of images, as targets for :func:`mesh_relief_loss`.

    Runs the face pipeline (:class:`portrait3d.face.analyzer.FaceAnalyzer`: detector, then the mesh on an
    upscaled copy) on each image; deterministic, so a resumed run stays bit-exact.

    Args:
        detector: the analyzer's detector (``'template'``: the aligned crop's fixed face box, which never misses
            a face that the mesh itself can fit).
    """

    def __init__(self, detector: str = "template") -> None:
        from portrait3d.face.analyzer import FaceAnalyzer

        self.analyzer = FaceAnalyzer(detector)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [N, 3, S, S]`` in ``[-1, 1]`` -> ``(mesh [N, 468, 3]`` in their pixels, ``z`` in pixel units,
        larger = farther; ``found [N]`` bool). Rows without a face are zeros."""
        from portrait3d.utils.visualize import to_uint8

        arr = to_uint8(images.detach().float().clamp(-1, 1))
        mesh = torch.zeros(len(arr), 468, 3)
        found = torch.zeros(len(arr), dtype=torch.bool)
        for i, img in enumerate(arr):
            r = self.analyzer.landmarks_and_mesh(np.ascontiguousarray(img))
            if r is not None:
                mesh[i] = torch.from_numpy(r[1][:468].astype(np.float32))
                found[i] = True
        return mesh.to(images.device), found.to(images.device)


def mesh_relief_loss(depth: torch.Tensor, mesh: torch.Tensor, found: torch.Tensor,
                     renderer_cfg: Any = None, scale: float = 1.0) -> torch.Tensor:
    """Shift-invariant L1 between the canonical depth and the face mesh's relief (ours, not in the paper).

    ``mean over faces with a mesh of mean_i |d_i - z_i u - b|`` (:func:`portrait3d.losses.distillation.relief_loss`)
    with ``u = scale * camera_distance / f``, ``camera_distance / f`` the world size of a pixel at the rotation
    centre (``f`` the renderer's focal length in pixels) and ``b`` the median offset: the mesh fixes the relief,
    not the distance.

    Args:
        depth: canonical depth ``[N, S, S]``; mesh: ``[N, 468, 3]`` in pixels of the ``S x S`` canonical image;
            found: ``[N]`` bool, faces whose mesh was measured; renderer_cfg: a :class:`RendererConfig`.
    """
    from portrait3d.geometry.render import RendererConfig
    from portrait3d.losses.distillation import relief_loss

    if not bool(found.any()):
        return depth.sum() * 0.0
    cfg = renderer_cfg or RendererConfig(image_size=int(depth.shape[-1]))
    size = int(depth.shape[-1])
    per_face = relief_loss(depth[found][:, None], mesh[found], scale * cfg.camera_distance / cfg.focal(size), size)
    return per_face.sum() / depth.shape[0]


def head_views(mesh: torch.Tensor, found: torch.Tensor, renderer_cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """D_V viewpoints of faces from their MediaPipe meshes: :func:`portrait3d.face.pose.estimate_head_pose_mesh`
    (PnP with the renderer's camera), converted with :func:`portrait3d.methods.lifting.views.view_from_head_pose`.

    Returns:
        ``(views [N, 3]`` rotation ``(r_x, r_y, r_z)`` in radians, ``ok [N]`` bool: mesh found and PnP solved).
    """
    from portrait3d.face.pose import estimate_head_pose_mesh
    from portrait3d.methods.lifting.views import view_from_head_pose

    size = int(renderer_cfg.image_size)
    views = torch.zeros(mesh.shape[0], 3)
    ok = torch.zeros(mesh.shape[0], dtype=torch.bool)
    for i in torch.nonzero(found.cpu())[:, 0].tolist():
        try:
            pose = estimate_head_pose_mesh(mesh[i].detach().cpu().numpy(), (size, size), focal=renderer_cfg.focal(size))
        except ValueError:
            continue
        views[i] = view_from_head_pose(pose.yaw_deg, pose.pitch_deg, pose.roll_deg)[0, :3]
        ok[i] = True
    return views.to(mesh.device), ok.to(mesh.device)


def view_pose_loss(view: torch.Tensor, target: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``sum over faces with a measured pose of |V_rot - V*_rot|^2 / N`` (radians; ours, not in the paper): D_V's
    rotation ``view [N, >=3]`` against the face pipeline's ``target [N, 3]``."""
    if not bool(ok.any()):
        return view.sum() * 0.0
    return (view[ok, :3] - target[ok].to(view.dtype)).square().sum() / view.shape[0]


# ----------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _default_perceptual() -> nn.Module:
    from portrait3d.losses.perceptual import PerceptualLoss

    return PerceptualLoss()


@functools.lru_cache(maxsize=1)
def _default_face_mesh() -> FaceMeshTargets:
    return FaceMeshTargets()


def lift_losses(model: LiftedGenerator, g2d: nn.Module | None, batch_w: torch.Tensor,
                weights: LiftLossWeights | None = None, renderer_cfg: Any = None, *,
                config: LiftLossConfig | None = None, perceptual: nn.Module | None = None,
                identity: nn.Module | None = None, w_stats: WStats | None = None,
                generator: torch.Generator | None = None, out: LiftOutput | None = None,
                face_mesh: FaceMeshTargets | None = None) -> dict[str, torch.Tensor]:
    """All Sec. 3.2 terms for one batch, weighted; terms with weight 0 are not computed.

    Args:
        model: the :class:`LiftedGenerator` (its lifting nets are trained).
        g2d: the frozen 2D generator producing the targets ``G2D(w)`` (default: ``model.g2d``).
        batch_w: ``[N, w_dim]`` or ``[N, num_ws, w_dim]`` (e.g. :func:`sample_w`).
        weights: :class:`LiftLossWeights`; renderer_cfg: passed to the renderer.
        config: :class:`LiftLossConfig`.
        perceptual: image distance ``(x, y) -> [N]`` (default: a cached ``PerceptualLoss()``,
            built only when ``weights.perc > 0`` and an image term is on).
        identity: object with ``embed(images) -> [N, D]`` (default: :func:`make_identity_loss`,
            built only when ``weights.identity > 0``).
        w_stats: :class:`WStats` for the latent prior (default: :func:`w_statistics` of ``g2d``).
        generator: RNG for the perturbation.
        out: a precomputed ``model(batch_w)`` (to reuse the forward pass).
        face_mesh: mesh targets of the canonical images and of ``G2D(w)`` (default: one cached
            :class:`FaceMeshTargets`, built only when ``weights.mesh_depth`` or ``weights.view_pose`` is > 0).

    Returns:
        ``{"rec", "flip", "perturb_image", "perturb_generator", "perturb_param", "latent_prior",
        "identity", "albedo_rank", "mesh_depth", "view_pose"}`` (present when their weight > 0), each a weighted scalar,
        and ``"total"``.
    """
    wt = weights or LiftLossWeights()
    cfg = config or LiftLossConfig()
    g2d = g2d if g2d is not None else model.g2d
    image_terms = wt.rec > 0 or wt.flip > 0 or wt.perturb_image > 0 or wt.perturb_generator > 0
    if perceptual is None and wt.perc > 0 and image_terms:
        perceptual = _default_perceptual().to(batch_w.device)
    if out is None:
        out = model(batch_w, renderer_cfg=renderer_cfg)
    terms: dict[str, torch.Tensor] = {}

    if wt.rec > 0 or wt.flip > 0 or wt.view_pose > 0:
        with torch.no_grad():
            _, ws = model.split_latent(batch_w)
            target = resize_images(g2d.synthesis(ws, noise_mode="const"), model.cfg.image_size)
            target = target.clamp(-1, 1) if cfg.image_clamp else target
        if wt.rec > 0:
            terms["rec"] = wt.rec * reconstruction_loss(out, target, perceptual, wt.perc)
        if wt.flip > 0:
            terms["flip"] = wt.flip * flip_reconstruction_loss(model, out, target, perceptual, wt.perc, renderer_cfg)

    need_pert = (wt.perturb_image > 0 or wt.perturb_generator > 0 or wt.perturb_param > 0
                 or wt.latent_prior > 0 or wt.identity > 0)
    if need_pert:
        pert = perturb(model, out, cfg, generator)
        rotated = None
        if wt.perturb_image > 0:
            loss, rotated = perturbation_image_loss(model, out, pert, perceptual, wt.perc, renderer_cfg,
                                                    cfg.image_clamp)
            terms["perturb_image"] = wt.perturb_image * loss
        if wt.perturb_generator > 0:
            terms["perturb_generator"] = wt.perturb_generator * perturbation_generator_loss(
                model, out, pert, perceptual, wt.perc, renderer_cfg)
        if wt.perturb_param > 0:
            terms["perturb_param"] = wt.perturb_param * perturbation_param_loss(model, pert)
        if wt.latent_prior > 0:
            stats = w_stats if w_stats is not None else w_statistics(g2d)
            terms["latent_prior"] = wt.latent_prior * latent_prior_loss(pert.w, stats)
        if wt.identity > 0:
            if identity is None:
                identity = make_identity_loss(model.cfg.image_size).to(batch_w.device)
            if rotated is None:
                rotated = model.render_view(out, view=pert.view_rec, light=pert.light_rec,
                                            renderer_cfg=renderer_cfg).image
            terms["identity"] = wt.identity * identity_loss(identity, out.canonical_image, rotated, pert.yaw_deg,
                                                            cfg.identity_max_yaw_deg)

    if wt.albedo_rank > 0:
        terms["albedo_rank"] = wt.albedo_rank * albedo_rank_loss(out.albedo, out.depth, model.cfg.border_depth, cfg)

    if wt.mesh_depth > 0 or wt.view_pose > 0:
        face_mesh = face_mesh or _default_face_mesh()
    if wt.view_pose > 0:
        mesh, found = face_mesh(target)
        views, ok = head_views(mesh, found, model.resolved_renderer_cfg(renderer_cfg))
        terms["view_pose"] = wt.view_pose * view_pose_loss(out.view, views, ok)
    if wt.mesh_depth > 0:
        mesh, found = face_mesh(out.canonical_image)
        terms["mesh_depth"] = wt.mesh_depth * mesh_relief_loss(out.depth, mesh, found,
                                                               model.resolved_renderer_cfg(renderer_cfg),
                                                               cfg.mesh_depth_scale)

    total = sum(terms.values()) if terms else out.image.sum() * 0.0
    terms["total"] = total  # type: ignore[assignment]
    return terms

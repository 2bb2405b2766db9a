"""Pre-training of the latent encoder E and the pose estimator P on pseudo pairs (Ko et al., WACV 2023).

    portrait3d train encoder --network default-3d --out runs/inv3d-E --kimg 200
    portrait3d train pose --network default-3d --out runs/inv3d-P --kimg 200

The paper (Sec. 3, "Latent Encoder E and Pose Estimator P") trains both networks on pairs
``x_ps = G(w_ps, pi_ps)`` rendered by the frozen generator (:mod:`.pseudo`), E "following the
training strategy of e4e" (Tov et al. 2021) with G and its discriminator D; the issue cites the
supplement's eqs. 1-6 for these losses. The "supp. eq." numbers below assign them to the terms in
the order the issue lists the terms (E: 1-4, P: 5-6); the supplement's text was not available to
us, so that assignment is unchecked. Terms marked "ours" are not among them.

Encoder (``x = x_ps``, ``pi = pi_ps`` the pair's known camera, ``w_hat = w_avg + E(x)``,
``x_hat = G(w_hat, pi)``)::

    L_E = l2 ||x - x_hat||^2                      (supp. eq. 1: pixel MSE, mean over pixels)
        + lp  L_perc(x, x_hat)                    (supp. eq. 2: LPIPS in the paper; here
                                                   portrait3d.losses.PerceptualLoss, an
                                                   EfficientNet-Lite0 feature distance -- NOT LPIPS)
        + ladv softplus(-D(x_hat, pi))            (supp. eq. 3: non-saturating adversarial term
                                                   against the generator's own, frozen, dual
                                                   discriminator; only when a D is given)
        + lreg ||E(x)||^2 = ||w_hat - w_avg||^2   (supp. eq. 4: e4e-style delta regulariser, sum
                                                   over w_dim, mean over the batch)
        + llat ||w_hat - w_ps||^2                 (ours, off by default: a latent loss that pseudo
                                                   pairs make possible because w_ps is known; w_ps
                                                   is the per-layer code, compared layer-wise)

Pose estimator (``P(x) -> (angles, R, t)``)::

    L_P = lang ||angles - angles_ps||^2           (supp. eq. 5: yaw, pitch (and roll when P has
                                                   roll) in radians^2, summed, mean over the batch)
        + lrot ||R - R_ps||_F^2                   (with roll: chordal loss on the 6D-derived
                                                   rotation, Zhou et al. 2019)
        + lt   ||t - t_ps||^2                     (supp. eq. 6: camera-position offset, world units)
        + lrep ||G(w_ps, P(x)) - x||^2            (ours, off by default: photometric re-rendering
                                                   with the pair's known w through the
                                                   differentiable camera; this is the pixel term of
                                                   the paper's joint latent / camera optimisation,
                                                   Sec. 3 "Optimization" subsection, not a pre-training
                                                   loss of the paper)

The generator and D are frozen (eval mode, ``requires_grad`` off); gradients reach only E / P.
Renders use ``noise_mode='const'`` and mid-bin ray samples (``deterministic=True``), batches come
from :class:`.pseudo.PseudoPairStream` seeded by ``(seed, step)`` (or, with ``pairs``, from a pair cache
rendered once, :mod:`.pair_cache`: a CPU run regressing latents or cameras alone then trains about 20x faster
per pair), so a run is a function of its config and a resumed run continues **bit-exactly** (snapshot:
weights, EMA, Adam state and RNG states in ``state.safetensors``, counters and configs in ``state.json``;
written to a temporary folder and renamed into place). Every ``sample_kimg`` a PNG grid of ``input | reconstruction``
pairs (for P: the input and ``G(w_ps, P(x))``) is written to ``samples/``; the final EMA (or, with
``ema_kimg = 0``, last) weights are exported as ``encoder.safetensors`` / ``pose.safetensors``
(:func:`.networks.save_module`).

:func:`pose_error_deg` measures P alone on fresh pseudo pairs (mean / median absolute angle errors),
:func:`encoder_error` E alone (latent error and the PSNR of ``G(E(x))``, beside the ``w_avg`` start's).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.checkpoints.fingerprint import module_fingerprint
from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.methods.inversion3d.networks import (
    EncoderConfig,
    LatentEncoder,
    PoseConfig,
    PoseEstimator,
    rotation_from_angles,
    save_module,
)
from portrait3d.methods.inversion3d.pair_cache import CachedPairStream, PairCache, read_cache_meta
from portrait3d.methods.inversion3d.pseudo import PseudoPairConfig, PseudoPairStream, photometric_jitter
from portrait3d.training.distributed import DistInfo
from portrait3d.training.fast import PRECISIONS, FastPath
from portrait3d.training.loop import due
from portrait3d.training.optim import ema_beta, ema_update
from portrait3d.training.progress import Progress
from portrait3d.training.randomness import derive_seed
from portrait3d.training.snapshots import find_snapshot, load_module_snapshot, prune_snapshots, save_module_snapshot

__all__ = [
    "EncoderTrainConfig", "PoseTrainConfig", "encoder_losses", "pose_losses", "train_encoder", "train_pose",
    "pose_error_deg", "encoder_error", "load_eg3d_discriminator", "resolve_device", "with_cache_settings",
]

TRAINERS = {"encoder": "inversion3d-encoder", "pose": "inversion3d-pose"}
EXPORT_NAMES = {"encoder": "encoder.safetensors", "pose": "pose.safetensors"}
_INIT_KEY = 0x1A17     # network initialisation seed key
_GRID_KEY = 0x6A1D     # PseudoPairStream key of the fixed sample-grid pairs
_EVAL_KEY = 0xE7A1     # PseudoPairStream key of pose_error_deg's pairs (never the training stream)
_AUGMENT_KEY = 0xA06E  # seed key of the per-step photometric jitter


# ----------------------------------------------------------------------------- configuration


@dataclass
class _TrainCommon(ConfigMixin):
    """Fields shared by both trainers (durations and intervals in thousands of pseudo pairs)."""

    batch: int = 8
    total_kimg: float = 200.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    ema_kimg: float = 1.0            # EMA half-life; 0: no EMA (the last weights are exported)
    ema_rampup: float | None = 0.05  # half-life <= rampup * images seen (as the GAN trainers)
    snapshot_kimg: float = 10.0      # resumable snapshot; 0: only at the end
    sample_kimg: float = 2.0         # sample grid; 0: none
    grid_samples: int = 8
    keep_snapshots: int = 0          # keep only the newest N snapshot folders; 0: keep all
    seed: int = 0                    # network initialisation (pseudo.seed seeds the data)
    device: str = "auto"             # 'auto' | 'cpu' | 'cuda'
    precision: str = "fp32"          # 'fp32' | 'bf16': pseudo-pair renders and the step in bf16 autocast
    pairs: str = ""                  # a pair cache (.pair_cache) to draw batches from; its settings replace pseudo
    augment: float = 0.0             # photometric jitter of the network's input (pseudo.photometric_jitter); 0: off

    def _validate_common(self) -> None:
        if self.batch < 1:
            raise UsageError(f"batch must be >= 1, not {self.batch}")
        if self.total_kimg < 0 or self.lr <= 0 or self.ema_kimg < 0:
            raise UsageError("total_kimg and ema_kimg must be >= 0 and lr > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.augment < 0:
            raise UsageError("augment must be >= 0")
        self.pseudo.validate()  # type: ignore[attr-defined]


@dataclass
class EncoderTrainConfig(_TrainCommon, ConfigMixin):
    """Settings of :func:`train_encoder` (loss weights: e4e's defaults where e4e has the term)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pseudo: PseudoPairConfig = field(default_factory=PseudoPairConfig)
    lambda_l2: float = 1.0
    lambda_perceptual: float = 0.8
    lambda_adv: float = 0.1          # used only when a discriminator is given
    lambda_reg: float = 2e-4
    lambda_latent: float = 0.0
    perceptual_resize: int | None = 224

    def validate(self) -> None:
        self._validate_common()
        for k in ("lambda_l2", "lambda_perceptual", "lambda_adv", "lambda_reg", "lambda_latent"):
            if getattr(self, k) < 0:
                raise UsageError(f"{k} must be >= 0")


@dataclass
class PoseTrainConfig(_TrainCommon, ConfigMixin):
    """Settings of :func:`train_pose`.

    The pseudo pairs default to a 0.02 world-unit camera-offset jitter (about 4 px at 128 px) so the
    offset head learns something; the camera constants of ``pose`` and ``pseudo`` must agree.
    """

    batch: int = 16
    pose: PoseConfig = field(default_factory=PoseConfig)
    pseudo: PseudoPairConfig = field(default_factory=lambda: PseudoPairConfig(translation_std=0.02))
    lambda_angle: float = 1.0
    lambda_rotation: float = 1.0     # used only when pose.roll
    lambda_translation: float = 10.0
    lambda_reproj: float = 0.0

    def validate(self) -> None:
        self._validate_common()
        for k in ("lambda_angle", "lambda_rotation", "lambda_translation", "lambda_reproj"):
            if getattr(self, k) < 0:
                raise UsageError(f"{k} must be >= 0")
        p, q = self.pose, self.pseudo
        if (p.radius, p.fov_deg, tuple(p.pivot)) != (q.radius, q.fov_deg, tuple(q.pivot)):
            raise UsageError("pose and pseudo must use the same camera radius, fov_deg and pivot")
        if q.has_roll and not p.roll:
            raise UsageError("the pseudo pairs have roll but the pose estimator does not predict it (set pose.roll)")


def resolve_device(device: str) -> torch.device:
    """``'auto'`` (CUDA when available), ``'cpu'`` or ``'cuda'`` -> a :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    return torch.device(device)


# ----------------------------------------------------------------------------- losses


def _render(G: nn.Module, ws: torch.Tensor, camera: torch.Tensor) -> dict[str, torch.Tensor]:
    return G.synthesis(ws, camera, noise_mode="const", deterministic=True)


def encoder_losses(E: LatentEncoder, G: nn.Module, batch: dict[str, torch.Tensor], cfg: EncoderTrainConfig,
                   perceptual: nn.Module | None = None, D: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The encoder objective ``L_E`` of the module docstring on one pseudo-pair batch.

    Args:
        E: the encoder (its mode is left alone); G: the frozen EG3D generator.
        batch: :func:`.pseudo.sample_pseudo_pairs` output (``image [N,3,R,R]``, ``camera [N,25]``, ``ws``).
        perceptual: ``forward(x, y) -> [N]`` distance, needed when ``cfg.lambda_perceptual > 0``.
        D: frozen :class:`~portrait3d.networks.discriminator.DualDiscriminator` or ``None`` (no adversarial term).

    Returns:
        scalar tensors ``loss`` (weighted total, differentiable w.r.t. E) and the unweighted terms
        ``reg`` and, when active, ``l2``, ``perceptual``, ``adv``, ``latent``; plus ``recon``
        (``x_hat [N, 3, R, R]``, detached) when an image term is on (otherwise G is not run).
    """
    x, cam = batch["image"].float(), batch["camera"]
    delta = E.delta(x).float()                           # [N, w_dim]; fp32 reductions under bf16 autocast
    x = batch.get("target", x).float()                   # the clean pair when the input was jittered
    w_hat = E.w_avg + delta
    ws = w_hat.unsqueeze(1).repeat(1, G.num_ws, 1)       # [N, num_ws, w_dim]
    terms: dict[str, torch.Tensor] = {"reg": delta.square().sum(1).mean()}
    loss = cfg.lambda_reg * terms["reg"]
    # Rendering x_hat (and back-propagating through G) costs most of a step: skip it when no image term is on
    # (a latent-regression-only run)
    if cfg.lambda_l2 > 0 or cfg.lambda_perceptual > 0 or (D is not None and cfg.lambda_adv > 0):
        out = _render(G, ws, cam)
        x_hat = out["image"].float()
        terms["l2"] = (x_hat - x).square().mean()
        loss = loss + cfg.lambda_l2 * terms["l2"]
        if cfg.lambda_perceptual > 0:
            if perceptual is None:
                raise UsageError("lambda_perceptual > 0 needs a perceptual loss module")
            terms["perceptual"] = perceptual(x_hat, x).float().mean()
            loss = loss + cfg.lambda_perceptual * terms["perceptual"]
        if D is not None and cfg.lambda_adv > 0:
            logits = D({"image": x_hat, "image_raw": out["image_raw"]}, cam)
            terms["adv"] = F.softplus(-logits.float()).mean()
            loss = loss + cfg.lambda_adv * terms["adv"]
        terms["recon"] = x_hat.detach()
    if cfg.lambda_latent > 0:
        terms["latent"] = (ws - batch["ws"]).square().sum(2).mean()
        loss = loss + cfg.lambda_latent * terms["latent"]
    terms["loss"] = loss
    return terms


def pose_losses(P: PoseEstimator, G: nn.Module | None, batch: dict[str, torch.Tensor],
                cfg: PoseTrainConfig) -> dict[str, torch.Tensor]:
    """The pose objective ``L_P`` of the module docstring on one pseudo-pair batch.

    Args:
        P: the pose estimator (mode left alone); G: the frozen generator (needed only for
            ``lambda_reproj > 0``).
        batch: :func:`.pseudo.sample_pseudo_pairs` output (``image``, ``angles [N,3]``, ``translation [N,3]``, ``ws``).

    Returns:
        scalar tensors ``loss`` and the unweighted terms ``angle``, ``translation`` (and ``rotation``,
        ``reproj`` when active), plus ``yaw_err`` / ``pitch_err`` / ``roll_err`` (mean absolute
        errors in degrees, detached) for the progress bar.
    """
    pred = P(batch["image"])
    pred = pred._replace(angles=pred.angles.float(), rotation=pred.rotation.float(),
                         translation=pred.translation.float())  # fp32 reductions under bf16 autocast
    gt = batch["angles"]
    k = 3 if P.config.roll else 2
    diff = torch.deg2rad(pred.angles - gt)[:, :k]
    terms: dict[str, torch.Tensor] = {
        "angle": diff.square().sum(1).mean(),
        "translation": (pred.translation - batch["translation"]).square().sum(1).mean(),
    }
    loss = cfg.lambda_angle * terms["angle"] + cfg.lambda_translation * terms["translation"]
    if P.config.roll and cfg.lambda_rotation > 0:
        terms["rotation"] = (pred.rotation - rotation_from_angles(gt)).square().sum((1, 2)).mean()
        loss = loss + cfg.lambda_rotation * terms["rotation"]
    if cfg.lambda_reproj > 0:
        if G is None:
            raise UsageError("lambda_reproj > 0 needs the generator")
        img = _render(G, batch["ws"], P.camera_from_output(pred))["image"].float()
        terms["reproj"] = (img - batch.get("target", batch["image"]).float()).square().mean()
        loss = loss + cfg.lambda_reproj * terms["reproj"]
    terms["loss"] = loss
    err = (pred.angles - gt).detach().abs().mean(0)
    terms.update(yaw_err=err[0], pitch_err=err[1], roll_err=err[2])
    return terms


# ----------------------------------------------------------------------------- snapshots


def _save_snapshot(folder: Path, trainer: str, config: dict[str, Any], net: nn.Module, ema: nn.Module | None,
                   opt: torch.optim.Optimizer, step: int, images_seen: int, export_name: str) -> Path:
    """Write ``folder`` (``state.safetensors``, ``state.json``, the exported network) atomically."""
    exported = ema if ema is not None else net
    return save_module_snapshot(folder, trainer, config, net, opt, step, images_seen,
                                {export_name: lambda path: save_module(exported, path)}, ema=ema)


def _load_snapshot(path: str | os.PathLike[str], trainer: str, net: nn.Module, ema: nn.Module | None,
                   opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore ``net``, ``ema``, ``opt`` and the RNG states in place; returns ``(step, images_seen)``."""
    return load_module_snapshot(path, trainer, net, opt, ema)


# ----------------------------------------------------------------------------- the loop


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` twice -> ``[2N, C, H, W]`` as ``a0, b0, a1, b1, ...``."""
    if a.shape[2:] != b.shape[2:]:
        b = F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False)
    return torch.stack([a, b], dim=1).flatten(0, 1)


def _fp32(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pseudo pairs rendered under bf16 autocast, as float32 (the losses compare in float32)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}


def _save_pairs_grid(path: Path, inputs: torch.Tensor, outputs: torch.Tensor) -> Path:
    """PNG grid of ``input | output`` pairs (``[N, 3, H, W]`` in ``[-1, 1]``), about square."""
    from portrait3d.face.io import save_image
    from portrait3d.utils.visualize import make_grid, to_uint8

    pairs_per_row = max(1, int(math.ceil(math.sqrt(len(inputs)))))
    return save_image(path, make_grid(to_uint8(_interleave(inputs, outputs)), 2 * pairs_per_row), overwrite=True)


def _train(kind: str, net: nn.Module, G: nn.Module, cfg: _TrainCommon, out_dir: Path, resume: Any, progress: bool,
           loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
           grid_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor], device: torch.device,
           augment: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None) -> Path:
    """The loop both trainers share; ``augment(batch, step)`` (optional) changes a training batch as a function of
    its step, so a resumed run stays bit-exact."""
    trainer, export_name = TRAINERS[kind], EXPORT_NAMES[kind]
    out_dir = Path(out_dir)
    config = cfg.to_dict()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_kimg > 0 else None
    step = images_seen = 0
    if resume is not None:
        step, images_seen = _load_snapshot(resume, trainer, net, ema, opt)
    total = int(round(cfg.total_kimg * 1000))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples").mkdir(exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"trainer": trainer, "config": config,
                                                     "network": net.config.to_dict()}, indent=1))
    fast = FastPath(cfg.precision)
    stream: PseudoPairStream | CachedPairStream
    if cfg.pairs:
        stream = CachedPairStream(_open_cache(cfg.pairs, G), cfg.batch, cfg.pseudo.seed,  # type: ignore[attr-defined]
                                  start=step, device=device)
    else:
        stream = PseudoPairStream(G, cfg.batch, cfg.pseudo, start=step)  # type: ignore[attr-defined]
    grid_batch = None
    if cfg.sample_kimg > 0 and cfg.grid_samples > 0:
        grid_stream = PseudoPairStream(G, cfg.grid_samples, cfg.pseudo, key=_GRID_KEY)  # type: ignore[attr-defined]
        with fast.autocast(device):
            grid_batch = _fp32(grid_stream.batch_at(0))

    def grid() -> None:
        if grid_batch is None:
            return
        shown = ema if ema is not None else net
        was_training = shown.training
        shown.eval()
        with torch.no_grad(), fast.autocast(device):
            recon = grid_fn(shown, grid_batch).float()
        shown.train(was_training)
        _save_pairs_grid(out_dir / "samples" / f"{kind}-{step:08d}.png", grid_batch["image"], recon)

    def snapshot() -> None:
        folder = out_dir / f"snapshot-{step:08d}"
        _save_snapshot(folder, trainer, config, net, ema, opt, step, images_seen, export_name)
        prune_snapshots(out_dir, cfg.keep_snapshots)
        bar.write(f"snapshot {folder} (kimg {images_seen / 1000:.3f})")

    bar = Progress(DistInfo(device=device), total, min(images_seen, total), out_dir / "log.jsonl", progress)
    try:
        if step == 0:
            grid()
        while images_seen < total:
            t0 = time.perf_counter()
            net.train()
            with fast.autocast(device):
                batch = _fp32(next(stream))
                if augment is not None:
                    batch = augment(batch, step)
                terms = loss_fn(net, batch)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            if ema is not None:
                ema_update(ema, net, ema_beta(cfg.batch, cfg.ema_kimg, cfg.ema_rampup, images_seen))
            prev = images_seen
            images_seen += cfg.batch
            step += 1
            stats = {k: float(v.detach()) for k, v in terms.items() if v.ndim == 0}
            sec = time.perf_counter() - t0
            bar.update(cfg.batch, {"step": step, "kimg": images_seen / 1000, "sec": round(sec, 4), **stats})
            done = images_seen >= total
            if due(prev, images_seen, cfg.sample_kimg) or (done and cfg.sample_kimg > 0):
                grid()
            if due(prev, images_seen, cfg.snapshot_kimg) or done:
                snapshot()
        final = save_module(ema if ema is not None else net, out_dir / export_name, overwrite=True)
    finally:
        bar.close()
    return final


def _open_cache(root: str, G: nn.Module) -> PairCache:
    cache = PairCache(root)
    if cache.meta.get("generator_sha256") != module_fingerprint(G):
        raise UsageError(f"{root} holds pairs of another generator (its weights differ from --network's); build a "
                         f"cache of this one with 'portrait3d train pseudo-pairs'")
    return cache


def with_cache_settings(cfg: Any) -> Any:
    """``cfg`` with ``pseudo`` replaced by its pair cache's (``cfg.pairs``) settings, so the run's config.json
    says which pairs it was trained on and the camera checks see the cache's cameras."""
    if not cfg.pairs:
        return cfg
    pseudo = PseudoPairConfig.from_dict(read_cache_meta(cfg.pairs)["pseudo"])
    return dataclasses.replace(cfg, pseudo=dataclasses.replace(pseudo, seed=cfg.pseudo.seed))


def _prepare_generator(G: nn.Module, device: torch.device) -> nn.Module:
    if getattr(G, "c_dim", None) != 25 or not hasattr(G, "synthesis") or not hasattr(G, "num_ws"):
        raise UsageError("G must be an EG3D TriPlaneGenerator (25-d camera conditioning)")
    return G.to(device).eval().requires_grad_(False)


def train_encoder(G: nn.Module, cfg: EncoderTrainConfig, out_dir: str | os.PathLike[str],
                  resume: str | os.PathLike[str] | None = None, progress: bool = True,
                  D: nn.Module | None = None) -> Path:
    """Train a :class:`LatentEncoder` for ``G`` on pseudo pairs; returns the exported ``encoder.safetensors``.

    Args:
        G: EG3D generator; moved to the device and set to eval mode with ``requires_grad`` off.
        cfg: :class:`EncoderTrainConfig` (``cfg.encoder`` ``w_dim`` / ``num_ws`` are taken from ``G``).
        out_dir: run folder (``config.json``, ``log.jsonl``, ``samples/``, ``snapshot-*/``, final export).
        resume: snapshot folder, or run folder (newest snapshot), to continue from bit-exactly;
            ``cfg.total_kimg`` may be larger than the snapshot's.
        progress: tqdm bar.
        D: optional frozen dual discriminator for the adversarial term (:func:`load_eg3d_discriminator`).

    With ``cfg.pairs`` the batches come from that pair cache (:mod:`.pair_cache`), whose pseudo-pair settings
    replace ``cfg.pseudo`` (its ``seed`` then orders the cache's pairs).
    """
    cfg = with_cache_settings(cfg)
    cfg.validate()
    device = resolve_device(cfg.device)
    G = _prepare_generator(G, device)
    cfg = dataclasses.replace(cfg, encoder=cfg.encoder.for_generator(G))
    torch.manual_seed(derive_seed(cfg.seed, _INIT_KEY))
    E = LatentEncoder(cfg.encoder, G).to(device)
    perceptual = None
    if cfg.lambda_perceptual > 0:
        from portrait3d.losses import PerceptualLoss

        perceptual = PerceptualLoss(resize=cfg.perceptual_resize).to(device).eval().requires_grad_(False)
    if D is not None:
        if getattr(D, "c_dim", None) != 25 or getattr(D, "img_resolution", None) != G.img_resolution:
            raise UsageError("D must be a camera-conditioned dual discriminator at the generator's resolution")
        D = D.to(device).eval().requires_grad_(False)

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = encoder_losses(net, G, batch, cfg, perceptual, D)  # type: ignore[arg-type]
        terms.pop("recon", None)
        return terms

    def grid_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _render(G, net(batch["image"]), batch["camera"])["image"]

    return _train("encoder", E, G, cfg, Path(out_dir), resume, progress, loss_fn, grid_fn, device, _augment(cfg))


def train_pose(G: nn.Module, cfg: PoseTrainConfig, out_dir: str | os.PathLike[str],
               resume: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Train a :class:`PoseEstimator` on pseudo pairs of ``G``; returns the exported ``pose.safetensors``.

    Arguments as :func:`train_encoder` (``cfg.pairs`` too). The sample grid shows each input next to
    ``G(w_ps, P(x))``, the pair's own latent rendered from the predicted camera.
    """
    cfg = with_cache_settings(cfg)
    cfg.validate()
    device = resolve_device(cfg.device)
    G = _prepare_generator(G, device)
    torch.manual_seed(derive_seed(cfg.seed, _INIT_KEY))
    P = PoseEstimator(cfg.pose).to(device)

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pose_losses(net, G, batch, cfg)  # type: ignore[arg-type]

    def grid_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _render(G, batch["ws"], net.camera(batch["image"]))["image"]  # type: ignore[operator]

    return _train("pose", P, G, cfg, Path(out_dir), resume, progress, loss_fn, grid_fn, device, _augment(cfg))


def _augment(cfg: _TrainCommon) -> Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None:
    """The per-step photometric jitter of the network's input (``None`` when ``cfg.augment`` is 0); seeded by
    ``(pseudo seed, step)`` so a resumed run stays bit-exact."""
    if cfg.augment <= 0:
        return None

    def augment(batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        seed = cfg.pseudo.seed  # type: ignore[attr-defined]
        g = torch.Generator().manual_seed(derive_seed(seed, _AUGMENT_KEY, step))
        # the image terms still compare renders with the clean pair
        return {**batch, "image": photometric_jitter(batch["image"], cfg.augment, g), "target": batch["image"]}

    return augment


# ----------------------------------------------------------------------------- evaluation and helpers


def _fresh_pairs(G: nn.Module, n: int, cfg: PseudoPairConfig, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``n`` pairs of the evaluation stream (a key no trainer or cache uses), in batches."""
    stream = PseudoPairStream(G, batch, cfg, key=_EVAL_KEY)
    done = 0
    while done < n:
        m = min(batch, n - done)
        yield {k: v[:m] for k, v in next(stream).items()}
        done += m


@torch.no_grad()
def pose_error_deg(P: PoseEstimator, G: nn.Module, n: int, cfg: PseudoPairConfig, batch: int = 16) -> dict[str, float]:
    """Camera error of P alone on ``n`` fresh pseudo pairs (a stream key the trainers never use).

    Returns:
        ``{"n", "yaw_mean", "yaw_median", "pitch_mean", "pitch_median", "roll_mean", "roll_median"}``
        (absolute errors in degrees) and ``"translation_mean"`` (mean Euclidean error of the camera
        offset, world units). P's train / eval mode is restored afterwards (it runs in eval mode).
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, not {n}")
    was_training = P.training
    P.eval()
    errs, terr = [], []
    try:
        for pairs in _fresh_pairs(G, n, cfg, batch):
            pred = P(pairs["image"])
            errs.append((pred.angles - pairs["angles"]).abs().cpu())
            terr.append((pred.translation - pairs["translation"]).norm(dim=1).cpu())
    finally:
        P.train(was_training)
    e = torch.cat(errs).double()
    out: dict[str, float] = {"n": float(n)}
    for i, name in enumerate(("yaw", "pitch", "roll")):
        out[f"{name}_mean"] = float(e[:, i].mean())
        out[f"{name}_median"] = float(e[:, i].median())
    out["translation_mean"] = float(torch.cat(terr).double().mean())
    return out


@torch.no_grad()
def encoder_error(E: LatentEncoder, G: nn.Module, n: int, cfg: PseudoPairConfig, batch: int = 16) -> dict[str, float]:
    """E alone on ``n`` fresh pseudo pairs (the stream key of :func:`pose_error_deg`, never a training stream
    nor a pair cache's), beside the encoder-free start ``w_avg``.

    Returns:
        ``{"n", "latent", "latent_avg", "psnr", "psnr_avg"}``: ``latent`` the mean ``||w_hat - w||^2`` (summed
        over ``w_dim``), ``psnr`` of ``G(w_hat, pi)`` against the pair's image ``x`` (dB, images mapped to
        ``[0, 1]``); the ``_avg`` values with ``w_hat = w_avg``. E's train / eval mode is restored afterwards.
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, not {n}")
    was_training = E.training
    E.eval()
    lat, lat0, mse, mse0 = [], [], [], []
    try:
        for pairs in _fresh_pairs(G, n, cfg, batch):
            x, cam, w = pairs["image"].float(), pairs["camera"], pairs["ws"][:, 0].float()
            w_hat = E.w(x).float()
            w_avg = E.w_avg.expand_as(w_hat)
            for guess, lat_out, mse_out in ((w_hat, lat, mse), (w_avg, lat0, mse0)):
                lat_out.append((guess - w).square().sum(1).cpu())
                ws = guess.unsqueeze(1).repeat(1, G.num_ws, 1)
                img = _render(G, ws, cam)["image"].float()
                mse_out.append(((img.clamp(-1, 1) - x.clamp(-1, 1)) / 2).square().mean((1, 2, 3)).cpu())
    finally:
        E.train(was_training)

    def psnr(errs: list[torch.Tensor]) -> float:
        return float((-10 * torch.log10(torch.cat(errs).double().clamp_min(1e-10))).mean())

    return {"n": float(n), "latent": float(torch.cat(lat).double().mean()),
            "latent_avg": float(torch.cat(lat0).double().mean()), "psnr": psnr(mse), "psnr_avg": psnr(mse0)}


def load_eg3d_discriminator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The dual discriminator ``D`` of an EG3D training snapshot (:mod:`portrait3d.training.eg3d`).

    ``path`` is a snapshot folder or a run folder (its newest snapshot); only ``state.json`` and
    ``state.safetensors`` are read. Returns D in eval mode with ``requires_grad`` off.
    """
    from safetensors.torch import load_file

    from portrait3d.checkpoints.state import load_state_strict
    from portrait3d.networks.discriminator import DiscriminatorConfig, DualDiscriminator

    folder = find_snapshot(path)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("trainer") != "eg3d":
        raise UsageError(f"{folder} is not an EG3D training snapshot")
    D = DualDiscriminator(DiscriminatorConfig(**meta["config"]["D"]))
    tensors = load_file(str(folder / "state.safetensors"))
    load_state_strict(D, {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}, "EG3D discriminator")
    return D.to(device).eval().requires_grad_(False)

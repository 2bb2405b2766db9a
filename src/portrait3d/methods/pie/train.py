"""Training PIE's parameter estimator on real photos (:mod:`.estimator` has the losses).

The run folder holds ``targets.npz`` (MediaPipe meshes of the training photos and the rig's closed-form fit to
each: computed once, the slow part), ``snapshot-<step>/`` folders (``state.safetensors`` + ``state.json``,
resumable bit-exactly: batches are drawn from ``(seed, step)``, so no data-order state is needed), sample grids
``samples/fit-<step>.png`` (photo | rig render overlaid) and the exported ``estimator.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.methods.pie.build import collect_meshes
from portrait3d.methods.pie.estimator import (
    EstimatorConfig,
    LossWeights,
    ParamEstimator,
    estimator_losses,
    landmark_error_px,
    photometric_error,
    rig_targets,
)
from portrait3d.methods.pie.face_model import FaceModel, RigParams
from portrait3d.training.loop import fit_module
from portrait3d.training.snapshots import load_module_snapshot

__all__ = ["EstimatorTrainConfig", "RigNetTrainConfig", "evaluate_estimator", "fit_targets", "prepare_targets",
           "train_estimator", "train_rignet"]

TRAINER = "pie-estimator"
EXPORT_NAME = "estimator.safetensors"


@dataclass
class EstimatorTrainConfig(ConfigMixin):
    rig: str = "face-rig"              # face model file or the shipped rig's name
    count: int = 10000                 # training photos (evenly spaced over the dataset)
    batch: int = 16
    total_kimg: float = 200.0
    lr: float = 1e-3
    net: EstimatorConfig = field(default_factory=EstimatorConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    bf16: bool = True                  # backbone in bf16 autocast (AMX) with channels_last; losses in fp32
    snapshot_kimg: float = 4.0
    sample_kimg: float = 2.0
    keep_snapshots: int = 2
    grid_samples: int = 8
    seed: int = 0


def fit_targets(data_root: str | os.PathLike[str], count: int, rig: FaceModel,
                progress: bool = False) -> dict[str, np.ndarray]:
    """MediaPipe meshes and closed-form rig fits of ``count`` evenly spaced photos of a built dataset:
    ``photos`` (how many were tried), ``index`` (those with a face), ``points`` and ``target_<field>``."""
    images = np.load(Path(data_root) / "images.npy", mmap_mode="r")
    if images.shape[1] != rig.config.image_size:
        raise UsageError(f"the dataset's images are {images.shape[1]} px but the rig was fitted to "
                         f"{rig.config.image_size} px crops")
    pick = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    pts, cols, ok = collect_meshes((np.asarray(images[i]) for i in pick), total=len(pick), progress=progress)
    if len(pts) < 2:
        raise UsageError(f"{data_root}: MediaPipe found a face in {len(pts)} of {len(pick)} images")
    tg = rig_targets(pts, cols, rig)
    return {"photos": np.array(len(pick)), "index": pick[ok], "points": pts.astype(np.float32),
            **{f"target_{k}": v for k, v in tg.items()}}


def prepare_targets(data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str], count: int, rig: FaceModel,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`fit_targets`, cached as ``out_dir/targets.npz`` (recomputed when the count differs)."""
    path = Path(out_dir) / "targets.npz"
    if path.is_file():
        with np.load(path) as d:
            if int(d["count"]) == count:
                return {k: d[k] for k in d.files}
    out = {"count": np.array(count), **fit_targets(data_root, count, rig, progress)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("targets.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def _batch(images: np.ndarray, data: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    from portrait3d.utils.visualize import from_uint8

    img = from_uint8(np.stack([np.asarray(images[data["index"][r]]) for r in rows]))
    out = {"image": img, "points": torch.from_numpy(data["points"][rows])}
    out.update({k: torch.from_numpy(data[k][rows]) for k in data if k.startswith("target_")})
    return out


def _grid(path: Path, rig: FaceModel, est: ParamEstimator, batch: dict[str, torch.Tensor]) -> None:
    """``photo | rig render over the photo`` pairs."""
    from portrait3d.face.io import save_image
    from portrait3d.utils.visualize import make_grid, to_uint8

    photo = batch["image"]
    with torch.no_grad():
        over = rig.overlay(est(photo), photo)
    save_image(path, make_grid(to_uint8(torch.stack([photo, over], 1).flatten(0, 1)), 4), overwrite=True)


def train_estimator(data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: EstimatorTrainConfig,
                    resume: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Train (or continue) the estimator on a built dataset of real photos; returns the exported file."""
    out = Path(out_dir)
    rig = FaceModel.load(cfg.rig)
    cfg.net = EstimatorConfig.for_rig(rig, **{k: getattr(cfg.net, k) for k in ("input_size", "width", "layers")})
    data = prepare_targets(data_root, out, cfg.count, rig, progress=progress)
    images = np.load(Path(data_root) / "images.npy", mmap_mode="r")
    torch.manual_seed(cfg.seed)
    est = ParamEstimator(cfg.net)
    opt = torch.optim.Adam(est.parameters(), lr=cfg.lr)
    step = images_seen = 0
    if resume is not None:
        step, images_seen = load_module_snapshot(resume, TRAINER, est, opt)
    est.bf16 = cfg.bf16
    if cfg.bf16:
        est.backbone.to(memory_format=torch.channels_last)
    total = int(round(cfg.total_kimg * 1000))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"trainer": TRAINER, "config": cfg.to_dict()}, indent=1))
    n = len(data["index"])
    grid_rows = np.linspace(0, n - 1, min(cfg.grid_samples, n)).round().astype(int)
    grid_batch = _batch(images, data, grid_rows)

    def losses(step: int) -> dict[str, torch.Tensor]:
        rows = np.random.default_rng((cfg.seed, step)).integers(0, n, cfg.batch)
        est.train()
        return estimator_losses(est, rig, _batch(images, data, rows), cfg.weights)

    def samples(step: int) -> None:
        _grid(out / "samples" / f"fit-{step:08d}.png", rig, est.eval(), grid_batch)

    if step == 0 and cfg.sample_kimg > 0:
        samples(0)
    seen = fit_module(est, opt, out, TRAINER, cfg.to_dict(), EXPORT_NAME, step, images_seen, total, cfg.batch,
                cfg.snapshot_kimg, cfg.keep_snapshots, progress, losses,
                samples if cfg.sample_kimg > 0 else None, cfg.sample_kimg)
    return est.save(out / EXPORT_NAME, overwrite=True, meta={"images_seen": seen, "rig": cfg.rig})


@torch.no_grad()
def evaluate_estimator(est: ParamEstimator, rig: FaceModel, data_root: str | os.PathLike[str], count: int = 200,
                       progress: bool = False, data: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Landmark error (pixels, all 468 mesh points) and photometric error (mean absolute, 0-255, on the rendered
    face) of the estimator on ``count`` photos of a dataset (held-out photos for the model card), beside the
    closed-form fit to each photo's mesh. ``data``: :func:`fit_targets` of those photos, when already computed."""
    if data is None:
        data = fit_targets(data_root, count, rig, progress)
    images = np.load(Path(data_root) / "images.npy", mmap_mode="r")
    n = len(data["index"])
    lm, photo, lm_fit, yaw_err = [], [], [], []
    for start in range(0, n, 16):
        b = _batch(images, data, np.arange(start, min(start + 16, n)))
        p = est.eval()(b["image"])
        fit = RigParams(**{f: b[f"target_{f}"] for f in RigParams.FIELDS})
        lm.append(landmark_error_px(rig, p, b["points"]))
        lm_fit.append(landmark_error_px(rig, fit, b["points"]))
        photo.append(photometric_error(rig, p, b["image"]))
        yaw_err.append((p.angles[:, 0] - fit.angles[:, 0]).abs())
    cat = torch.cat
    return {"photos": float(data["photos"]), "faces": float(n),
            "landmark_px": float(cat(lm).mean()), "landmark_px_closed_form_fit": float(cat(lm_fit).mean()),
            "photometric_0_255": float(cat(photo).mean() * 255), "yaw_vs_fit_deg": float(cat(yaw_err).mean())}


# ----------------------------------------------------------------------------- RigNet


@dataclass
class RigNetTrainConfig(ConfigMixin):
    network: str = "default-2d"        # the StyleGAN2 generator whose W+ space RigNet edits
    estimator: str = ""                # trained parameter estimator file
    rig: str = "face-rig"
    mode: str = "pose"
    batch: int = 8
    total_kimg: float = 16.0
    lr: float = 1e-4                   # StyleRig: Adam, 1e-4
    truncation: float = 0.7            # latents drawn from G's mapping with this truncation
    # pose mode: this share of the targets get yaw and pitch drawn uniformly within +- uniform_pose_deg, so that
    # edits beyond the generator's usual pose spread are trained too (StyleRig draws every target from G)
    uniform_pose_share: float = 0.5
    uniform_pose_deg: float = 30.0
    rec_weight: float = 1.0
    edit_weight: float = 1.0
    consist_weight: float = 1.0
    snapshot_kimg: float = 2.0
    keep_snapshots: int = 2
    seed: int = 0


def train_rignet(cfg: RigNetTrainConfig, out_dir: str | os.PathLike[str], resume: str | os.PathLike[str] | None = None,
                 progress: bool = True, G: Any = None) -> Path:
    """Train one RigNet (StyleRig Sec. 4.2) for ``cfg.mode`` on samples of ``cfg.network`` (or the given ``G``);
    resumable bit-exactly (latents are drawn from ``(seed, step)``). Returns the exported ``rignet-<mode>.safetensors``."""
    from portrait3d.methods.pie.rignet import MODES, RigNet, RigNetConfig, mode_params, rignet_losses

    if cfg.mode not in MODES:
        raise UsageError(f"mode must be one of {sorted(MODES)}, not {cfg.mode!r}")
    out = Path(out_dir)
    if G is None:
        from portrait3d.checkpoints import load_network

        G = load_network(cfg.network)
    if getattr(G, "c_dim", 0) != 0 or not hasattr(G, "synthesis"):
        raise UsageError(f"{cfg.network}: RigNet edits an unconditional 2D StyleGAN2 generator")
    G = G.eval().requires_grad_(False)
    rig = FaceModel.load(cfg.rig)
    est = ParamEstimator.load(cfg.estimator).requires_grad_(False)
    est.bf16 = True
    dim = mode_params(rig.neutral(1), cfg.mode).shape[1]
    torch.manual_seed(cfg.seed)
    net = RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode=cfg.mode, param_dim=dim))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    trainer = f"pie-rignet-{cfg.mode}"
    export = f"rignet-{cfg.mode}.safetensors"
    step = images_seen = 0
    if resume is not None:
        step, images_seen = load_module_snapshot(resume, trainer, net, opt)
    total = int(round(cfg.total_kimg * 1000))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"trainer": trainer, "config": cfg.to_dict()}, indent=1))

    def render(ws: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return G.synthesis(ws, noise_mode="const").float()

    def latents(step: int, key: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step, key]).generate_state(1)[0]))
        with torch.no_grad():
            return G.mapping(torch.randn(cfg.batch, G.z_dim, generator=g), None, truncation_psi=cfg.truncation)

    def losses(step: int) -> dict[str, torch.Tensor]:
        ws, vs = latents(step, 0), latents(step, 1)
        target_fn = None
        if cfg.mode == "pose" and cfg.uniform_pose_share > 0:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step, 2]).generate_state(1)[0]))
            pick = torch.rand(cfg.batch, generator=g) < cfg.uniform_pose_share
            drawn = (torch.rand(cfg.batch, 2, generator=g) * 2 - 1) * cfg.uniform_pose_deg

            def target_fn(p: RigParams) -> RigParams:
                a = p.angles.clone()
                a[pick, :2] = drawn[pick]
                return p.replace(angles=a)
        return rignet_losses(net, render, est, rig, ws, vs, cfg.rec_weight, cfg.edit_weight, cfg.consist_weight,
                             target_fn=target_fn)

    seen = fit_module(net, opt, out, trainer, cfg.to_dict(), export, step, images_seen, total, cfg.batch,
                cfg.snapshot_kimg, cfg.keep_snapshots, progress, losses)
    return net.save(out / export, overwrite=True, meta={"images_seen": seen, "network": cfg.network})

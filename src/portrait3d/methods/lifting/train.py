"""Train the lifting networks of LiftedGAN (Shi, Aggarwal and Jain, CVPR 2021) on a frozen 2D StyleGAN2.

    portrait3d train lift --network default-2d --out runs/lift
    portrait3d train lift --network default-2d --out runs/lift --resume runs/lift
    portrait3d train lift --network G.safetensors --out runs/lift-noflip --ablate flip

There is no dataset: every step samples a fresh batch of latents ``w = mapping(z)`` with truncation
(:func:`portrait3d.methods.lifting.losses.sample_w`, 0.7 as released), lifts them with
:class:`~portrait3d.methods.lifting.networks.LiftedGenerator` and minimises the Sec. 3.2 losses of
:func:`~portrait3d.methods.lifting.losses.lift_losses` with Adam. Only the five lifting networks
(D_V, D_L, M, D_S, D_T) are trained; the 2D generator stays frozen.

Defaults are the authors' released FFHQ-256 configuration: batch 8, Adam ``lr = 1e-4``,
``betas = (0.9, 0.999)``, weight decay ``5e-4``, 10 epochs of 5000 steps (400 kimg); the loss
weights of :class:`~portrait3d.methods.lifting.losses.LiftLossWeights`. The perceptual distance is
portrait3d's EfficientNet-Lite0 feature distance (not the paper's VGG loss) evaluated at the lifting
resolution unless ``perceptual_resize`` says otherwise; the identity term uses dlib's face ResNet.

Ablations (``--ablate``, Sec. 4.4-style studies): ``flip`` drops the flipped reconstruction (eq. 3);
``perturb`` drops the perturbation terms (eqs. 4-7: ``perturb_image``, ``perturb_generator``,
``perturb_param``, ``latent_prior``; the identity term keeps sampling its own perturbed views);
``identity`` drops eq. 8; ``albedo`` drops the albedo rank term (eq. 9).

Run folder (``OUT``):

* ``snapshot-<step>/``: ``state.safetensors`` (lifting networks ``nets.*``, Adam state
  ``opt.state.<i>.<k>``, W statistics ``extra.*``, RNG states ``rng.*``), ``state.json`` (format,
  configuration, counters, optimiser hyper-parameters) and ``lifted.safetensors`` -- written into a
  temporary folder and renamed into place;
* ``samples/grid-<step>.png``: fixed latents, one column per face, rows ``G2D(w)`` | canonical albedo |
  canonical depth | canonical normals | shading | re-rendered | rotated -30 deg | rotated +30 deg |
  relit (light from the left);
* ``log.jsonl`` (one record per step: the weighted loss terms, seconds), ``config.json``;
* ``lifted.safetensors``: the final lifting networks (:meth:`LiftedGenerator.save`), which
  ``portrait3d lift --lifted`` reads.

Resuming is bit-exact: every random draw of step ``k`` comes from generators seeded by
``(seed, k)``, and the snapshot restores the weights, the Adam moments and the global RNG state, so
2 + 2 steps give exactly the weights of 4 uninterrupted steps (same device and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.geometry.render import RendererConfig
from portrait3d.methods.lifting.losses import (
    ABLATIONS,
    FaceMeshTargets,
    LiftLossConfig,
    LiftLossWeights,
    WStats,
    lift_losses,
    make_identity_loss,
    sample_w,
    w_statistics,
)
from portrait3d.methods.lifting.networks import LiftConfig, LiftedGenerator, LiftOutput
from portrait3d.training.snapshots import claim_run_folder
from portrait3d.utils.visualize import normal_to_uint8, shading_to_uint8

__all__ = ["ABLATIONS", "GRID_ROWS", "LiftTrainConfig", "TRAINER", "generator_matches", "grid_rows",
           "load_lift_state", "read_lift_snapshot", "relight", "save_lift_state",
           "train_lifting", "yaw_view"]

TRAINER = "lifting"

GRID_ROWS = ("G2D(w)", "albedo", "depth", "normal", "shading", "re-rendered", "yaw -30", "yaw +30", "relit")

# Stream ids of the per-step generators (see derive_seed).
_LATENTS, _PERTURB, _GRID = 1, 2, 3


# ----------------------------------------------------------------------------- configuration


@dataclass
class LiftTrainConfig(ConfigMixin):
    """Everything a lifting run needs besides the 2D generator; stored in every snapshot.

    Attributes:
        network: reference to the 2D generator (built-in name or path) written into lifted files.
        batch: latents per step (release: 8).
        total_kimg: training length in thousands of latents (release: 50k steps x 8 = 400).
        lr, betas, weight_decay: Adam (release: 1e-4, (0.9, 0.999), 5e-4).
        truncation: truncation psi of the sampled latents (release: 0.7).
        snapshot_kimg, sample_kimg: intervals of resumable snapshots and sample grids (0 = only at the end).
        grid_samples: faces (columns) in a sample grid.
        seed: initialisation, latents, perturbations and grid latents.
        device: ``'auto'`` (CUDA when available), ``'cpu'`` or ``'cuda'``.
        threads: torch CPU threads (None: torch's default).
        w_stats_samples: latents used to estimate the W mean / std of the latent prior (release: 50k).
        perceptual_resize: side the perceptual network sees (None: the lifting resolution).
        weights: loss weights before ablation; losses: sampling and shape settings of the losses.
        lift: the lifting networks; renderer: camera / rasteriser (None: built from ``lift``).
        ablate: names of :data:`ABLATIONS` switched off.
    """

    network: str = "default-2d"
    batch: int = 8
    total_kimg: float = 400.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    truncation: float = 0.7
    snapshot_kimg: float = 40.0
    sample_kimg: float = 4.0
    grid_samples: int = 8
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    w_stats_samples: int = 10000
    perceptual_resize: int | None = None
    weights: LiftLossWeights = field(default_factory=LiftLossWeights)
    losses: LiftLossConfig = field(default_factory=LiftLossConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    renderer: RendererConfig | None = None
    ablate: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise a one-line :class:`ValueError` on an inconsistent configuration."""
        unknown = [a for a in self.ablate if a not in ABLATIONS]
        if unknown:
            raise UsageError(f"unknown ablation(s) {unknown}: choose from {', '.join(ABLATIONS)}")
        if self.batch < 1:
            raise UsageError(f"batch must be >= 1, not {self.batch}")
        if not (math.isfinite(self.total_kimg) and self.total_images() >= 1):
            raise UsageError(f"total_kimg must cover at least one latent, not {self.total_kimg}")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.weight_decay < 0:
            raise UsageError("lr must be positive and weight_decay >= 0")
        if not 0 <= self.truncation <= 1:
            raise UsageError(f"truncation must be in [0, 1], not {self.truncation}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("device 'cuda' requested but CUDA is not available")
        if self.w_stats_samples < 2 or self.grid_samples < 0 or self.snapshot_kimg < 0 or self.sample_kimg < 0:
            raise UsageError("w_stats_samples must be >= 2; grid_samples and intervals >= 0")
        if self.perceptual_resize is not None and self.perceptual_resize < 8:
            raise UsageError(f"perceptual_resize must be >= 8 or None, not {self.perceptual_resize}")
        if self.resolved_renderer().image_size != self.lift.image_size:
            raise UsageError(f"renderer image_size {self.resolved_renderer().image_size} != "
                             f"lift image_size {self.lift.image_size}")

    def resolved_renderer(self) -> RendererConfig:
        """The renderer config (``renderer``, or one matching ``lift``'s size and depth range)."""
        if self.renderer is not None:
            return self.renderer
        return RendererConfig(image_size=self.lift.image_size, min_depth=self.lift.min_depth,
                              max_depth=self.lift.max_depth)

    def effective_weights(self) -> LiftLossWeights:
        """``weights`` with the ablated terms set to 0."""
        off = {name: 0.0 for a in self.ablate for name in ABLATIONS[a]}
        return dataclasses.replace(self.weights, **off)

    def resolved_device(self) -> torch.device:
        cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return torch.device("cuda" if cuda else "cpu")

    def total_images(self) -> int:
        return int(round(self.total_kimg * 1000))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["ablate"] = list(self.ablate)
        d["renderer"] = dataclasses.asdict(self.resolved_renderer())
        return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------- helpers


def _resolve_reference(ref: str) -> Path | None:
    """The file a generator reference names (built-in name or path), or None when it is not there."""
    from portrait3d.checkpoints.load import builtin_network_path

    p = builtin_network_path(ref) or Path(ref).expanduser()
    return p.resolve() if p.is_file() else None


def generator_matches(a: str | None, b: str | None) -> bool | None:
    """Whether two generator references (built-in names or paths) name the same file.

    Returns True / False when it can be decided, None when a reference is empty or names no
    existing file (e.g. a generator that was moved since training).
    """
    if not a or not b:
        return None
    if a == b:
        return True
    pa, pb = _resolve_reference(a), _resolve_reference(b)
    if pa is None or pb is None:
        return None
    return pa == pb


def yaw_view(yaw_deg: float | torch.Tensor, n: int = 1, tx_per_sin_yaw: float = 0.02,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Viewpoints ``[n, 6]`` turned by ``yaw_deg`` from the canonical (frontal) view.

    Pitch and roll are 0; ``tx = tx_per_sin_yaw * sin(yaw)`` as in the training perturbation
    (:class:`LiftLossConfig`), so renders look like the views the networks were trained on. Positive
    yaw moves the nose towards the image's left (renderer convention).
    """
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float32, device=device).reshape(-1)
    v = torch.zeros(yaw.numel(), 6, device=device)
    v[:, 1] = torch.deg2rad(yaw)
    v[:, 3] = tx_per_sin_yaw * torch.sin(v[:, 1])
    return v.expand(n, 6).clone() if yaw.numel() == 1 else v


def _image_uint8(images: torch.Tensor) -> np.ndarray:
    from portrait3d.utils.visualize import to_uint8

    return to_uint8(images.clamp(-1, 1))


def _depth_uint8(depth: torch.Tensor) -> np.ndarray:
    """Canonical depth ``[N, S, S]`` -> colour-mapped ``uint8 [N, S, S, 3]`` (near = bright)."""
    from portrait3d.utils.visualize import colour_depth

    return colour_depth(depth[:, None], int(depth.shape[-1]))


def relight(light: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """``light [N, 4]`` with its direction replaced by ``(dx, dy)`` (ambient / diffuse kept)."""
    out = light.clone()
    out[:, 2], out[:, 3] = dx, dy
    return out


@torch.no_grad()
def grid_rows(model: LiftedGenerator, w: torch.Tensor, tx_per_sin_yaw: float = 0.02) -> np.ndarray:
    """The rows of a sample grid for latents ``w [N, w_dim]`` (see :data:`GRID_ROWS`).

    Returns ``uint8 [len(GRID_ROWS) * N, S, S, 3]`` ordered row by row.
    """
    out: LiftOutput = model(w)
    n, dev = w.shape[0], w.device
    rows = [
        _image_uint8(model.synthesize(out.ws)),
        _image_uint8(out.albedo),
        _depth_uint8(out.depth),
        normal_to_uint8(out.normal),
        shading_to_uint8(out.shading),
        _image_uint8(out.image),
        _image_uint8(model.render_view(out, view=yaw_view(-30.0, n, tx_per_sin_yaw, dev)).image),
        _image_uint8(model.render_view(out, view=yaw_view(30.0, n, tx_per_sin_yaw, dev)).image),
        _image_uint8(model.render_view(out, light=relight(out.light, 1.0, 0.0)).image),
    ]
    return np.concatenate(rows)


# ----------------------------------------------------------------------------- snapshots


def save_lift_state(folder: Path, cfg: LiftTrainConfig, model: LiftedGenerator, opt: torch.optim.Optimizer,
                    step: int, images_seen: int, stats: WStats) -> Path:
    """Write a resumable snapshot folder atomically (temporary sibling renamed into place).

    ``state.safetensors``: ``nets.*`` (lifting networks), ``opt.state.<i>.<k>`` (Adam moments),
    ``extra.w_mean`` / ``extra.w_std`` (latent-prior statistics), ``rng.*`` (global RNG states).
    ``state.json``: format, trainer, configuration, step, images seen, optimiser hyper-parameters.
    ``lifted.safetensors``: :meth:`LiftedGenerator.save`.
    """
    from portrait3d.training.snapshots import (
        STATE_FORMAT,
        STATE_VERSION,
        optimizer_tensors,
        rng_tensors,
        write_snapshot_folder,
    )

    tensors = {f"nets.{k}": v for k, v in model.nets.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(opt, "opt")
    tensors.update(opt_tensors)
    tensors.update({"extra.w_mean": stats.mean, "extra.w_std": stats.std.reshape(1)})
    tensors.update(rng_tensors())
    meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "trainer": TRAINER, "config": cfg.to_dict(),
            "step": step, "images_seen": images_seen, "kimg": images_seen / 1000, "optimizer": opt_meta,
            "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_snapshot_folder(folder, tensors, meta,
                                 {"lifted.safetensors": lambda path: model.save(path, overwrite=True)})


def read_lift_snapshot(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(snapshot folder, state.json)`` of a snapshot folder or a run folder (its newest snapshot)."""
    from portrait3d.training.snapshots import STATE_FORMAT, find_snapshot

    folder = find_snapshot(path)
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{folder}: unreadable state.json") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise UsageError(f"{folder} is not a portrait3d training snapshot")
    if meta.get("trainer") != TRAINER:
        raise UsageError(f"{folder} is a {meta.get('trainer')} snapshot, not a lifting one")
    return folder, meta


def load_lift_state(folder: Path, meta: dict[str, Any], model: LiftedGenerator,
                    opt: torch.optim.Optimizer) -> tuple[int, int, WStats]:
    """Restore networks, Adam and the global RNG from a snapshot (in place); returns
    ``(step, images_seen, W statistics)``."""
    from safetensors.torch import load_file

    from portrait3d.checkpoints.state import load_state_strict
    from portrait3d.training.snapshots import load_optimizer, restore_rng

    tensors = load_file(str(folder / "state.safetensors"))
    dev = next(model.nets.parameters()).device
    sd = {k[5:]: v for k, v in tensors.items() if k.startswith("nets.")}
    load_state_strict(model.nets, sd, "snapshot lifting networks")
    load_optimizer(opt, tensors, "opt", meta["optimizer"])
    restore_rng(tensors)
    stats = WStats(tensors["extra.w_mean"].to(dev), tensors["extra.w_std"].reshape(()).to(dev))
    return int(meta["step"]), int(meta["images_seen"]), stats


# ----------------------------------------------------------------------------- training


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (a run stopped after its last snapshot), atomically."""
    from portrait3d.checkpoints.native import atomic_write

    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(rec_step, int) and rec_step <= step:
            keep.append(line)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)), overwrite=True)


def _check_resume(cfg: LiftTrainConfig, meta: dict[str, Any], folder: Path) -> None:
    try:
        old = LiftTrainConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{folder}: unreadable configuration ({str(e).splitlines()[0][:100]})") from None
    if old.lift != cfg.lift or old.resolved_renderer() != cfg.resolved_renderer():
        raise UsageError(f"{folder} was trained with other lifting-network or renderer settings")
    if generator_matches(old.network, cfg.network) is False:
        raise UsageError(f"{folder} lifts the 2D generator {old.network!r}, not {cfg.network!r}")


def _build_losses(cfg: LiftTrainConfig, weights: LiftLossWeights, dev: torch.device) -> dict[str, Any]:
    """Perceptual and identity networks, built once (only when their terms are on)."""
    from portrait3d.losses.perceptual import PerceptualLoss

    image_terms = weights.rec > 0 or weights.flip > 0 or weights.perturb_image > 0 or weights.perturb_generator > 0
    perceptual = PerceptualLoss(resize=cfg.perceptual_resize).to(dev) if weights.perc > 0 and image_terms else None
    identity = make_identity_loss(cfg.lift.image_size).to(dev) if weights.identity > 0 else None
    face_mesh = FaceMeshTargets() if weights.mesh_depth > 0 or weights.view_pose > 0 else None
    return {"perceptual": perceptual, "identity": identity, "face_mesh": face_mesh}


def train_lifting(g2d: nn.Module, cfg: LiftTrainConfig, out_dir: str | os.PathLike[str],
                  resume: str | os.PathLike[str] | None = None, progress: bool = True, force: bool = False) -> Path:
    """Train (or continue training) the lifting networks of ``g2d``; returns ``out_dir/lifted.safetensors``.

    Args:
        g2d: the frozen 2D StyleGAN2 generator (``cfg.network`` is the reference saved with it).
        cfg: :class:`LiftTrainConfig`.
        out_dir: run folder (see the module docstring).
        resume: a snapshot folder, or a run folder (its newest snapshot): continue bit-exactly.
            ``cfg`` may change the schedule, not the networks or the renderer.
        progress: tqdm bar with the loss terms.
        force: start over in an ``out_dir`` that already holds a run (its snapshots, samples and log
            are removed). Without it such a folder is refused unless resuming.

    Raises:
        ValueError / FileExistsError / FileNotFoundError: bad configuration, occupied run folder,
            missing or mismatched snapshot -- one-line messages.
    """
    from portrait3d.checkpoints.native import atomic_write
    from portrait3d.training.distributed import DistInfo, all_reduce_grads
    from portrait3d.training.loop import due
    from portrait3d.training.progress import Progress, save_grid
    from portrait3d.training.randomness import derive_seed

    cfg.validate()
    if int(g2d.w_dim) != cfg.lift.w_dim:
        raise UsageError(f"LiftConfig.w_dim = {cfg.lift.w_dim} but the 2D generator has w_dim = {g2d.w_dim}")
    if getattr(g2d, "c_dim", 0) != 0 or not hasattr(g2d, "synthesis"):
        raise UsageError("LiftedGAN needs an unconditional 2D StyleGAN2 generator")
    out = Path(out_dir)
    snap = read_lift_snapshot(resume) if resume is not None else None
    if snap is not None:
        _check_resume(cfg, snap[1], snap[0])
    same_run = snap is not None and snap[0].resolve().parent == out.resolve()
    claim_run_folder(out, snap[0] if snap is not None else None, force, exports=("lifted.safetensors",))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = cfg.resolved_device()
    rcfg = cfg.resolved_renderer()
    weights = cfg.effective_weights()

    g2d = g2d.to(dev).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = LiftedGenerator(g2d, cfg.lift, rcfg, generator_ref=cfg.network).to(dev)
    opt = torch.optim.Adam(model.lifting_parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if snap is not None:
        step, images_seen, stats = load_lift_state(snap[0], snap[1], model, opt)
        if same_run:
            _truncate_log(out / "log.jsonl", step)
        for group in opt.param_groups:  # the schedule may change on resume
            group.update(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        step, images_seen = 0, 0
        stats = w_statistics(g2d, num_samples=cfg.w_stats_samples, seed=cfg.seed)
    nets = _build_losses(cfg, weights, dev)
    total = cfg.total_images()
    grid_w = sample_w(g2d, cfg.grid_samples, cfg.truncation,
                      torch.Generator().manual_seed(derive_seed(cfg.seed, _GRID))) if cfg.grid_samples else None

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    config_text = json.dumps({"trainer": TRAINER, "config": cfg.to_dict()}, indent=1)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_text), overwrite=True)
    info = DistInfo(device=dev)

    def grid() -> None:
        if grid_w is None:
            return
        model.eval()
        rows = grid_rows(model, grid_w, cfg.losses.perturb_tx_per_sin_yaw)
        model.train()
        save_grid(out / "samples" / f"grid-{step:08d}.png", rows, cols=cfg.grid_samples)

    def snapshot() -> None:
        folder = save_lift_state(out / f"snapshot-{step:08d}", cfg, model, opt, step, images_seen, stats)
        bar.write(f"snapshot {folder} (kimg {images_seen / 1000:.3f})")

    bar = Progress(info, total, min(images_seen, total), out / "log.jsonl", progress)
    try:
        if step == 0 and cfg.sample_kimg > 0:
            grid()
        model.train()
        params = model.lifting_parameters()
        while images_seen < total:
            t0 = time.perf_counter()
            w = sample_w(g2d, cfg.batch, cfg.truncation,
                         torch.Generator().manual_seed(derive_seed(cfg.seed, step, _LATENTS)))
            terms = lift_losses(model, g2d, w, weights, rcfg, config=cfg.losses, perceptual=nets["perceptual"],
                                identity=nets["identity"], w_stats=stats, face_mesh=nets["face_mesh"],
                                generator=torch.Generator().manual_seed(derive_seed(cfg.seed, step, _PERTURB)))
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            all_reduce_grads(params, info)  # single process: replaces NaN / inf gradients, as our GAN loops do
            opt.step()
            prev = images_seen
            images_seen += cfg.batch
            step += 1
            sec = time.perf_counter() - t0
            record = {"step": step, "kimg": images_seen / 1000, "sec": round(sec, 4),
                      **{k: float(v.detach()) for k, v in terms.items()}}
            bar.update(cfg.batch, record)
            done = images_seen >= total
            if due(prev, images_seen, cfg.sample_kimg) or done:
                grid()
            if due(prev, images_seen, cfg.snapshot_kimg) or done:
                snapshot()
        final = model.save(out / "lifted.safetensors", overwrite=True)
    finally:
        bar.close()
    return final


# ----------------------------------------------------------------------------- command line

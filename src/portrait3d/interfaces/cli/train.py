"""``portrait3d train ...``: every trainer (StyleGAN2, EG3D, LiftedGAN, the 3D-inversion encoder and pose
estimator) and the compact snapshot transfer used by the device scripts.

\b
Examples (CPU recipe of default-2d; see README "Training"):
  portrait3d train stylegan2 --data DATA --out RUN64 --config cpu-proj --resolution 64
  portrait3d train stylegan2 --data DATA --out RUN128 --config cpu-proj --grow-from RUN64
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.interfaces.cli.base import CONTEXT_SETTINGS, FiniteFloat, fail_cleanly, main
from portrait3d.methods.inversion3d import train as inv
from portrait3d.methods.lifting import train as lifting
from portrait3d.training import eg3d as e3d
from portrait3d.training import stylegan2 as sg2
from portrait3d.training import transfer
from portrait3d.training.loop import MetricsFn
from portrait3d.training.run_config import apply_cli_options
from portrait3d.training.snapshots import claim_run_folder


@main.group(context_settings=CONTEXT_SETTINGS)
def train() -> None:
    """Train generators and the networks of each method (resumable; snapshots in the run folder)."""


# ----------------------------------------------------------------------------- options shared by the GAN trainers

def run_options(presets: Iterable[str], *, data_help: str, lr_d_default: float,
                extra: Sequence[Callable[[Any], Any]] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``click`` options every trainer has, with the trainer's own options (``extra``) after ``--lr-d``.

    The command receives ``data``, ``out``, ``preset_name``, ``resume`` and ``fid`` (handled by the
    trainer) and the overrides that :func:`apply_cli_options` applies (``kimg``, ``batch``, ...,
    ``gamma``, ``lr_g``, ``lr_d``); every override is ``None`` when not given.
    """
    dir_in = click.Path(exists=True, file_okay=False, path_type=Path)
    options = [
        click.option("--data", type=dir_in, required=True, help=data_help),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder."),
        click.option("--config", "preset_name", type=click.Choice(sorted(presets)), default="cpu-small",
                     help="Network and schedule preset."),
        click.option("--kimg", type=FiniteFloat(), default=None, help="Total training length in thousands of images [preset]."),
        click.option("--batch", type=int, default=None, help="Global batch size [preset]."),
        click.option("--batch-gpu", type=int, default=None, help="Per-process micro-batch (gradient accumulation)."),
        click.option("--resume", type=dir_in, default=None,
                     help="Snapshot folder (or run folder: newest snapshot) to continue from."),
        click.option("--gamma", type=FiniteFloat(), default=None, help="R1 weight [0.0002 * res^2 / batch]."),
        click.option("--lr-g", type=FiniteFloat(), default=None, help="Generator learning rate [0.0025]."),
        click.option("--lr-d", type=FiniteFloat(), default=None, help=f"Discriminator learning rate [{lr_d_default:g}]."),
        *extra,
        click.option("--seed", type=int, default=None, help="Random seed [0]."),
        click.option("--snap", type=FiniteFloat(), default=None, help="Snapshot interval in kimg [preset]."),
        click.option("--sample-every", type=FiniteFloat(), default=None, help="Sample-grid interval in kimg [preset]."),
        click.option("--metrics-every", type=FiniteFloat(), default=None, help="Metrics interval in kimg [preset]."),
        click.option("--fid", type=int, default=0, help="FID with N generated images as the metrics hook (0 = none)."),
        click.option("--workers", type=int, default=None, help="Data-loading processes per rank [preset]."),
        click.option("--threads", type=int, default=None, help="CPU threads per process [torch default]."),
        click.option("--max-minutes", type=FiniteFloat(0), default=None,
                     help="Stop with a snapshot after this much wall time (0 = no limit) [0]."),
        click.option("--limit", type=int, default=None, help="Use only the first N faces."),
        click.option("--mirror/--no-mirror", default=None, help="X-flip augmentation [on]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Device [auto]."),
        click.option("--amp/--no-amp", default=None, help="fp16 blocks on CUDA [on]."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="Arithmetic: fp32, or bf16 autocast (AMX on CPU) with fp32 weights and losses [preset]."),
        click.option("--channels-last/--no-channels-last", default=None, help="NHWC weights and activations [preset]."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the generator (first steps compile for ~1-2 min) [preset]."),
        click.option("--compile-d/--no-compile-d", "compile_d", default=None,
                     help="torch.compile the discriminator too (faster for the pixel D, slower for the projected D "
                          "here) [preset]."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [on]."),
        click.option("--force", is_flag=True, help="Start over in an OUT that already holds a run (its snapshots, "
                                                    "samples and log are deleted)."),
    ]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # click lists options in decoration order, innermost last
            f = option(f)
        return f

    return decorate



def run_cli(train_fn: Callable[..., Path], cfg: Any, data: Path, out: Path, resume: Path | None, fid: int,
            make_fid_hook: Callable[[torch.device], MetricsFn], force: bool = False) -> None:
    """The end of a trainer's command: the run folder claimed, optional metrics hook, training, the exported path.

    ``make_fid_hook(device)`` is called only when ``fid > 0``; the metrics interval then defaults to the
    snapshot interval.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        claim_run_folder(out, resume, force, exports=("G_ema.safetensors",))
    hook = None
    if fid > 0:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if (
            cfg.run.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
        hook = make_fid_hook(dev)
        if cfg.run.metrics_kimg <= 0:
            cfg.run.metrics_kimg = cfg.run.snapshot_kimg
    path = train_fn(cfg, data, out, resume=resume, metrics=hook)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"exported {path}")


# ----------------------------------------------------------------------------- GAN trainers

@train.command("stylegan2")
@run_options(sg2.PRESETS, data_help="Built dataset folder (images.npy + labels.json).", lr_d_default=0.0025, extra=[
    click.option("--augment", "policy", type=str, default=None, help="DiffAugment policy, '' for none."),
    click.option("--mixing", type=FiniteFloat(0, 1), default=None, help="Style-mixing probability [0.9]."),
    click.option("--pl-weight", type=FiniteFloat(), default=None, help="Path-length regularisation weight [0 = off]."),
    click.option("--discriminator", type=click.Choice(sg2.DISCRIMINATORS), default=None,
                 help="stylegan2 (pixel, R1), projected (EfficientNet-Lite0 features, hinge) or both [preset]."),
    click.option("--resolution", type=click.Choice(["32", "64", "128", "256", "512", "1024"]), default=None,
                 help="Train G and D at this size (the dataset is box-filtered down) [preset]."),
    click.option("--channel-base", type=click.IntRange(64, 65536), default=None,
                 help="Width of G and D: channels at resolution r are min(base / r, 256 or the preset's maximum) "
                      "[preset]."),
    click.option("--grow-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                 help="Start from a snapshot at the same or a lower resolution (progressive growing)."),
    click.option("--init-from", type=str, default=None,
                 help="Start a new run from this trained generator's weights (checkpoint or built-in name, e.g. "
                      "default-2d) with a fresh discriminator: how training continues when the run folder is gone."),
    click.option("--pose-conditioned", is_flag=True,
                 help="Condition G's mapping and D on each photo's 25-d camera (pose-conditioned pretraining for "
                      "`train eg3d --init-2d`); with --init-from an unconditional G, its camera columns start at "
                      "zero. Give it again with --resume."),
    click.option("--face-metrics", type=click.IntRange(0), default=0,
                 help="Face metrics (FD-dlib, detection, pose spread, identity diversity) on N samples at each "
                      "metrics interval (0 = none; ~0.1 s per sample)."),
])
@fail_cleanly
def stylegan2_cmd(data: Path, out: Path, preset_name: str, resume: Path | None, fid: int, policy: str | None,
         mixing: float | None, pl_weight: float | None, discriminator: str | None, resolution: str | None,
         channel_base: int | None, grow_from: Path | None, init_from: str | None, pose_conditioned: bool,
         face_metrics: int, **overrides: Any) -> None:
    """Train a StyleGAN2 on an aligned-face dataset (single process or under torchrun).

    \b
    The CPU recipe: 64 px first, then grow to 128 px:
      portrait3d train stylegan2 --data DATA --out RUN64 --config cpu-proj --resolution 64
      portrait3d train stylegan2 --data DATA --out RUN128 --config cpu-proj --grow-from RUN64
    Pose-conditioned pretraining for EG3D, from the shipped 2D generator:
      portrait3d train stylegan2 --data DATA --out RUNPC --config cpu-proj --init-from default-2d --pose-conditioned
      portrait3d train eg3d --data DATA --out RUN3D --config cpu-proj --init-2d RUNPC/G_ema.safetensors ...
    """
    cfg = sg2.preset(preset_name)
    force = overrides.pop("force")
    apply_cli_options(cfg, **overrides)
    for name, v in (("augment", policy), ("style_mixing_prob", mixing), ("pl_weight", pl_weight),
                    ("discriminator", discriminator)):
        if v is not None:
            setattr(cfg, name, v)
    if resolution is not None:
        cfg.G.img_resolution = cfg.D.img_resolution = int(resolution)
    if channel_base is not None:
        cfg.G.synthesis = dataclasses.replace(cfg.G.synthesis, channel_base=channel_base)
        cfg.D.channel_base = channel_base
    if pose_conditioned:
        cfg.G.c_dim = cfg.D.c_dim = cfg.PD.c_dim = sg2.CAMERA_DIM
    train = functools.partial(sg2.train_stylegan2, grow_from=grow_from, init_from=init_from)
    def make_hooks(dev: torch.device) -> MetricsFn:
        cams = None
        if pose_conditioned:  # conditioned samples take the training photos' cameras
            from portrait3d.face.dataset import AlignedFaceDataset

            cams = sg2.dataset_cameras(AlignedFaceDataset(data, mirror=cfg.run.mirror))
        return sg2._hooks(sg2.fid_hook(data, fid, dev, cameras=cams) if fid > 0 else None,
                          sg2.face_metrics_hook(data, face_metrics, dev, cameras=cams) if face_metrics > 0 else None)

    run_cli(train, cfg, data, out, resume, max(fid, face_metrics), make_hooks, force=force)


@train.command("eg3d")
@run_options(e3d.PRESETS, data_help="Built dataset folder (images.npy + labels.json with cameras).", lr_d_default=0.002,
             extra=[
    click.option("--neural-res", type=click.Choice(["32", "64"]), default=None,
                 help="Neural rendering resolution [preset]."),
    click.option("--neural-res-final", type=int, default=None, help="Fade the neural rendering resolution to this."),
    click.option("--plane-channels", type=click.IntRange(1, 256), default=None,
                 help="Channels per tri-plane [preset: 32]; thinner planes train faster (give it again with "
                      "--resume)."),
    click.option("--plane-resolution", type=click.Choice(["32", "64", "128", "256"]), default=None,
                 help="Tri-plane resolution [preset]; smaller planes train faster (give it again with --resume)."),
    click.option("--density-reg", type=FiniteFloat(), default=None, help="Density regularisation weight [0.25]."),
    click.option("--density-reg-p-dist", type=FiniteFloat(), default=None, help="Density regularisation offset std [0.004]."),
    click.option("--gpc-prob", type=FiniteFloat(0, 1), default=None, help="Camera swapping probability [0.5]."),
    click.option("--blur-fade", type=FiniteFloat(), default=None, help="Blur fade-out in kimg [batch * 200 / 32]; 0 = none."),
    click.option("--augment", "policy", type=str, default=None, help="DiffAugment policy ['color'], '' for none."),
    click.option("--discriminator", type=click.Choice(sg2.DISCRIMINATORS), default=None,
                 help="stylegan2 (EG3D's dual pixel D, R1), projected (camera-conditioned, on EfficientNet-Lite0 "
                      "features of the image and the raw render, hinge) or both [preset]."),
    click.option("--init-2d", type=str, default=None,
                 help="Start the tri-plane backbone from this 2D StyleGAN2 (checkpoint or built-in name, e.g. "
                      "default-2d) where shapes match; a new run only."),
    click.option("--init-from", type=str, default=None,
                 help="Start a new run from this trained generator's weights (checkpoint or built-in name, e.g. "
                      "default-3d) with a fresh discriminator: how training continues when the run folder is gone. "
                      "To fine-tune, add --blur-fade 0 (EG3D's start-up blur would hide the detail from D for "
                      "50 kimg) and consider --d-warmup."),
    click.option("--distill", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                 help="Also fit the renders to this teacher set's samples (portrait3d train teacher-set), with "
                      "their face-mesh depth."),
    click.option("--distill-weight", type=FiniteFloat(0), default=None, help="Teacher reconstruction weight [1]."),
    click.option("--distill-perceptual", type=FiniteFloat(0), default=None,
                 help="Weight of the EfficientNet-Lite0 feature distance inside the teacher reconstruction [0.25]."),
    click.option("--distill-depth-weight", type=FiniteFloat(0), default=None, help="Teacher mesh-depth weight [10]."),
    click.option("--distill-spread-weight", type=FiniteFloat(0), default=None,
                 help="Weight of the depth spread along the teacher renders' rays (surfaces, not fog) [1]."),
    click.option("--adversarial/--no-adversarial", default=True, show_default=True,
                 help="Train against the discriminator (--no-adversarial: distillation only, needs --distill)."),
    click.option("--d-warmup", type=FiniteFloat(0), default=None,
                 help="kimg the fresh discriminator trains alone before G's adversarial term starts (fine-tuning a "
                      "trained G with --init-from; G keeps its distillation meanwhile) [0]."),
])
@fail_cleanly
def eg3d_cmd(data: Path, out: Path, preset_name: str, resume: Path | None, fid: int, neural_res: str | None,
         neural_res_final: int | None, plane_channels: int | None, plane_resolution: str | None,
         density_reg: float | None, density_reg_p_dist: float | None,
         gpc_prob: float | None, blur_fade: float | None, policy: str | None, discriminator: str | None,
         init_2d: str | None, init_from: str | None, distill: Path | None, distill_weight: float | None,
         distill_perceptual: float | None, distill_depth_weight: float | None, distill_spread_weight: float | None,
         adversarial: bool, d_warmup: float | None, **overrides: Any) -> None:
    """Train an EG3D generator on an aligned-face dataset with cameras (single process or torchrun).

    \b
    Example:
      portrait3d train eg3d --data DATA --out runs/eg3d --config cpu-proj --init-2d default-2d --threads 1
    Distilled from default-2d's samples (how the shipped default-3d was trained):
      portrait3d train teacher-set --network default-2d --out TEACHER --count 10000 --turn 20
      portrait3d train eg3d --data DATA --out RUN --config cpu-proj --init-2d default-2d --distill TEACHER \
          --distill-spread-weight 5 --distill-depth-weight 30 --no-adversarial --threads 1
    """
    cfg = e3d.preset(preset_name)
    force = overrides.pop("force")
    apply_cli_options(cfg, **overrides)
    if neural_res is not None:
        cfg.G.neural_rendering_resolution = int(neural_res)
    if plane_channels is not None:
        cfg.G.plane_channels = plane_channels
    if plane_resolution is not None:
        cfg.G.plane_resolution = int(plane_resolution)
    rendering = {"density_reg": density_reg, "density_reg_p_dist": density_reg_p_dist, "gpc_reg_prob": gpc_prob}
    cfg.G.rendering = dataclasses.replace(cfg.G.rendering, **{k: v for k, v in rendering.items() if v is not None})
    for name, v in (("augment", policy), ("neural_rendering_resolution_final", neural_res_final),
                    ("blur_fade_kimg", blur_fade), ("discriminator", discriminator),
                    ("distill", None if distill is None else str(distill)), ("distill_weight", distill_weight),
                    ("distill_perceptual", distill_perceptual), ("distill_depth_weight", distill_depth_weight),
                    ("distill_spread_weight", distill_spread_weight), ("d_warmup_kimg", d_warmup)):
        if v is not None:
            setattr(cfg, name, v)
    cfg.adversarial = adversarial

    def make_fid_hook(dev: torch.device) -> MetricsFn:
        from portrait3d.face.dataset import AlignedFaceDataset

        cams = e3d.dataset_cameras(AlignedFaceDataset(data, mirror=cfg.run.mirror))
        return sg2.fid_hook(data, fid, dev, cameras=cams)

    train = functools.partial(e3d.train_eg3d, init_2d=init_2d, init_from=init_from)
    run_cli(train, cfg, data, out, resume, fid, make_fid_hook, force=force)


# ----------------------------------------------------------------------------- method networks

@train.command("teacher-set")
@click.option("--network", type=str, default="default-2d", show_default=True,
              help="2D StyleGAN2 checkpoint or built-in name whose samples teach.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write.")
@click.option("--count", type=click.IntRange(1), default=10000, show_default=True,
              help="Samples to keep (only those in which MediaPipe finds a face).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the latents.")
@click.option("--truncation", type=FiniteFloat(0, 1), default=1.0, show_default=True, help="Truncation psi.")
@click.option("--turn", type=FiniteFloat(0, 60), default=20.0, show_default=True,
              help="Also render each latent turned by -TURN and +TURN nominal degrees along the generator's own yaw "
                   "direction, with measured cameras (0: no turned views).")
@click.option("--add-views", is_flag=True, help="OUT already holds a set without turned views: add them.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads [torch default].")
@fail_cleanly
def teacher_set_cmd(network: str, out: Path, count: int, seed: int, truncation: float, turn: float, add_views: bool,
                    threads: int | None) -> None:
    """Sample a 2D generator into a teacher set for `portrait3d train eg3d --distill`: images, latents, the
    cameras the face pipeline measures on them and MediaPipe's face mesh, and turned views of each latent
    (measured on one core beside a training run: 10,000 samples in 14 min, their two turned views in 28 min).

    \b
    Example:
      portrait3d train teacher-set --network default-2d --out ~/.cache/portrait3d/teacher-2d --count 10000
    """
    from portrait3d.checkpoints import load_network
    from portrait3d.training.teacher import add_teacher_views, build_teacher_set

    if threads is not None:
        torch.set_num_threads(threads)
    if add_views and turn <= 0:
        raise UsageError("--add-views needs --turn > 0")
    G = load_network(network)
    if not hasattr(G, "synthesis") or getattr(G, "c_dim", 0) != 0 or not hasattr(G, "mapping"):
        raise UsageError(f"{network}: a teacher set needs an unconditional 2D StyleGAN2 generator")
    if not add_views:
        summary = build_teacher_set(G, out, count, seed=seed, truncation_psi=truncation, network_name=network)
        click.echo(f"{out}: {summary['count']} faces from {summary['sampled']} samples "
                   f"(face rate {summary['face_rate']:.3f})")
    if turn > 0:
        views = add_teacher_views(G, out, (-turn, turn))
        change = ", ".join(f"{c:+.1f}" for c in views["measured_yaw_change_median"])
        click.echo(f"{out}: turned views measured {change} degrees (median); {views['views_without_face']} without "
                   f"a face kept the sample in their place")


@train.command("face-rig")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Built aligned dataset (images.npy, labels.json) of real photos, e.g. UTKFace's training split.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for face_model.safetensors, face_model.json, preview.png and MODEL_CARD.md.")
@click.option("--count", type=click.IntRange(50), default=3000, show_default=True,
              help="Photos to fit (evenly spaced; those without a face are skipped).")
@click.option("--identity", type=click.IntRange(1, 200), default=40, show_default=True,
              help="Identity components.")
@click.option("--albedo", type=click.IntRange(1, 200), default=40, show_default=True, help="Albedo components.")
@click.option("--force", is_flag=True, help="Overwrite existing files in OUT.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads [torch default].")
@fail_cleanly
def face_rig_cmd(data: Path, out: Path, count: int, identity: int, albedo: int, force: bool,
                 threads: int | None) -> None:
    """Build PIE's face rig (a linear 3D face model with albedo, SH light and pose) from MediaPipe meshes of real
    photos: no training, a few minutes on one core for 3,000 photos.

    \b
    Example:
      portrait3d train face-rig --data ~/.cache/portrait3d/utkface128 --out src/portrait3d/models/face-rig
    """
    import shlex

    from portrait3d.methods.pie.build import build_from_dataset
    from portrait3d.methods.pie.face_model import FaceModelConfig

    if threads is not None:
        torch.set_num_threads(threads)
    if not (data / "images.npy").is_file():
        raise UsageError(f"{data} holds no images.npy (build it with `portrait3d dataset build`)")
    cfg = FaceModelConfig(identity_components=identity, albedo_components=albedo)
    try:
        command = "portrait3d train face-rig " + shlex.join(
            ["--data", str(data), "--out", str(out), "--count", str(count), "--identity", str(identity),
             "--albedo", str(albedo)])
        rep = build_from_dataset(data, out, count, cfg, command=command, overwrite=force, progress=True)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{data}: {e}") from None
    ev = rep["explained_variance"]
    click.echo(f"{out}: rig from {rep['faces']} faces; expression {ev['expression']:.1%}, identity "
               f"{ev['identity']:.1%} of the shape variance; albedo components keep {ev['albedo']:.1%}")


def _module_run_options(snap: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--snap``, ``--resume``, ``--threads`` and ``--progress`` of the one-network trainers (PIE's estimator and
    RigNets, the W_tri encoder)."""
    opts = [
        click.option("--snap", type=FiniteFloat(min=0, min_open=True), default=snap, show_default=True,
                     help="Snapshot (and sample-grid) interval in kimg."),
        click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Snapshot folder (or run folder: newest snapshot) to continue from, bit-exactly."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads [torch default]."),
        click.option("--progress/--no-progress", default=True, show_default=True),
        click.option("--force", is_flag=True, help="Start over in an OUT that already holds a run (its snapshots, "
                                                    "samples and log are deleted)."),
    ]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return wrap


@train.command("pie-estimator")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Built aligned dataset of real photos (images.npy), e.g. UTKFace's training split.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--rig", type=str, default="face-rig", show_default=True, help="Face model file or the shipped rig.")
@click.option("--count", type=click.IntRange(2), default=10000, show_default=True,
              help="Training photos (their MediaPipe meshes and rig fits are computed once, ~15 photos/s).")
@click.option("--kimg", type=FiniteFloat(min=0, min_open=True), default=200.0, show_default=True,
              help="Training length in thousands of images.")
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--width", type=click.IntRange(1), default=32, show_default=True, help="ResNet width (first stage).")
@click.option("--param-weight", type=FiniteFloat(0), default=0.1, show_default=True,
              help="Weight of the loss towards the closed-form rig fits (0: self-supervised only).")
@click.option("--photometric-weight", type=FiniteFloat(0), default=1.0, show_default=True)
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="Backbone in bf16 autocast (AMX).")
@click.option("--holdout", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Built dataset of held-out photos: landmark and photometric error at the end (eval.json).")
@_module_run_options(snap=4.0)
@fail_cleanly
def pie_estimator_cmd(data: Path, out: Path, rig: str, count: int, kimg: float, batch: int, lr: float, width: int,
                      param_weight: float, photometric_weight: float, bf16: bool, snap: float, resume: Path | None,
                      holdout: Path | None, threads: int | None, progress: bool, force: bool) -> None:
    """Train PIE's parameter estimator theta(I) (a MoFA-style CNN into the face rig) on real photos.

    \b
    Example:
      portrait3d train pie-estimator --data ~/.cache/portrait3d/utkface128 --out runs/pie-est \\
          --holdout ~/.cache/portrait3d/utkface128-holdout --threads 1
    """
    from portrait3d.methods.pie.estimator import EstimatorConfig, LossWeights, ParamEstimator
    from portrait3d.methods.pie.face_model import FaceModel
    from portrait3d.methods.pie.train import EstimatorTrainConfig, evaluate_estimator, train_estimator

    if threads is not None:
        torch.set_num_threads(threads)
    if not (data / "images.npy").is_file():
        raise UsageError(f"{data} holds no images.npy (build it with `portrait3d dataset build`)")
    claim_run_folder(out, resume, force, exports=("estimator.safetensors",))
    cfg = EstimatorTrainConfig(rig=rig, count=count, batch=batch, total_kimg=kimg, lr=lr, bf16=bf16,
                               snapshot_kimg=snap, sample_kimg=snap / 2,
                               net=EstimatorConfig(width=width),
                               weights=LossWeights(parameters=param_weight, photometric=photometric_weight))
    path = train_estimator(data, out, cfg, resume=resume, progress=progress)
    click.echo(f"exported {path}")
    if holdout is not None:
        ev = evaluate_estimator(ParamEstimator.load(path), FaceModel.load(rig), holdout, progress=progress)
        (out / "eval.json").write_text(json.dumps(ev, indent=1))
        click.echo(f"held-out: landmark error {ev['landmark_px']:.2f} px (closed-form fit "
                   f"{ev['landmark_px_closed_form_fit']:.2f} px), photometric {ev['photometric_0_255']:.1f} / 255 "
                   f"on {int(ev['faces'])} faces")


@train.command("rignet")
@click.option("--network", type=str, default="default-2d", show_default=True,
              help="2D StyleGAN2 generator (checkpoint or built-in name) whose W+ space RigNet edits.")
@click.option("--estimator", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Trained PIE parameter estimator (portrait3d train pie-estimator).")
@click.option("--rig", type=str, default="face-rig", show_default=True, help="Face model file or the shipped rig.")
@click.option("--mode", type=click.Choice(["pose", "expression", "light"]), default="pose", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--kimg", type=FiniteFloat(min=0, min_open=True), default=16.0, show_default=True,
              help="Training length in thousands of source latents.")
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-4, show_default=True)
@_module_run_options(snap=2.0)
@fail_cleanly
def rignet_cmd(network: str, estimator: Path, rig: str, mode: str, out: Path, kimg: float, batch: int, lr: float,
               snap: float, resume: Path | None, threads: int | None, progress: bool, force: bool) -> None:
    """Train a StyleRig RigNet for one mode of the face rig on a generator's samples (self-supervised through
    the parameter estimator and the rig renderer).

    \b
    Example:
      portrait3d train rignet --estimator runs/pie-est/estimator.safetensors --mode pose --out runs/rignet-pose
    """
    from portrait3d.methods.pie.train import RigNetTrainConfig, train_rignet

    claim_run_folder(out, resume, force, exports=(f"rignet-{mode}.safetensors",))
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = RigNetTrainConfig(network=network, estimator=str(estimator), rig=rig, mode=mode, batch=batch,
                            total_kimg=kimg, lr=lr, snapshot_kimg=snap)
    click.echo(f"exported {train_rignet(cfg, out, resume=resume, progress=progress)}")


@train.command("wtri")
@click.option("--network", type=str, default="default-3d", show_default=True,
              help="EG3D generator (checkpoint or built-in name) the encoder inverts into.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Built aligned dataset with cameras (portrait3d dataset build).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--space", type=click.Choice(["wtri", "wplus"]), default="wtri", show_default=True,
              help="W_tri codes (the paper) or plain W+ rows (the ReStyle baseline of its tables).")
@click.option("--kimg", type=FiniteFloat(min=0, min_open=True), default=20.0, show_default=True,
              help="Training length in thousands of images (photos and pseudo pairs).")
@click.option("--batch", type=click.IntRange(1), default=4, show_default=True)
@click.option("--pseudo", type=click.IntRange(0), default=1, show_default=True,
              help="Generator pseudo pairs (image with its known code) per batch.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--cyc", type=FiniteFloat(min=0), default=0.1, show_default=True,
              help="lambda_cyc of the multi-view cycle loss (eq. 3; 0: off).")
@click.option("--cyc-every", type=click.IntRange(1), default=1, show_default=True,
              help="Evaluate the cycle loss every k-th step at k times its weight (lazy, as StyleGAN2's R1; the "
                   "cycle re-encodes a render, about half a step's cost).")
@click.option("--iterations", type=click.IntRange(1, 20), default=5, show_default=True,
              help="ReStyle refinement steps.")
@click.option("--warmup-kimg", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="First thousands of images: pseudo pairs with the latent term only, no backward through the "
                   "generator (about 4x cheaper per image on a CPU).")
@click.option("--truncation", type=FiniteFloat(0, 1), default=0.7, show_default=True,
              help="Truncation psi of the pseudo pairs' latents.")
@click.option("--bootstrap", type=str, default="", show_default="none: start at the average code",
              help="Start the iterations from this one-pass latent encoder's code (ReStyle's encoder "
                   "bootstrapping): a file of `portrait3d train encoder`, or a built-in network for its shipped "
                   "encoder (e.g. default-3d). Give it again with --resume.")
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start a new run from this exported W_tri encoder's weights with a fresh optimiser (e.g. the "
                   "shipped models/wtri/default-3d.safetensors, to train it further); same architecture and space.")
@click.option("--device", type=str, default="cpu", show_default=True,
              help="Where to train: cpu, cuda, cuda:N or auto.")
@click.option("--max-minutes", type=FiniteFloat(0), default=0.0, show_default="0: no limit",
              help="Stop after this many minutes with a snapshot and the export (resume continues it).")
@_module_run_options(snap=1.0)
@fail_cleanly
def wtri_cmd(network: str, data: Path, out: Path, space: str, kimg: float, batch: int, pseudo: int, lr: float,
             cyc: float, cyc_every: int, iterations: int, warmup_kimg: float, truncation: float, bootstrap: str,
             init: Path | None, device: str, max_minutes: float, snap: float, resume: Path | None,
             threads: int | None, progress: bool, force: bool) -> None:
    """Train the W_tri encoder (Oh & Jo) of an EG3D generator on aligned photos with their cameras, plus
    generator pseudo pairs: eqs. 1-4 (L2, EfficientNet-Lite0 perceptual, dlib identity, feature similarity,
    code regularisation, multi-view cycle). Writes OUT/encoder.safetensors, snapshots, samples/ and log.jsonl.

    \b
    Example:
      portrait3d train wtri --data ~/.cache/portrait3d/utkface128 --out runs/wtri
    """
    from portrait3d.checkpoints import load_network
    from portrait3d.interfaces.encode3d import start_encoder
    from portrait3d.methods.wtri.losses import WTriLossConfig
    from portrait3d.methods.wtri.train import EXPORT_NAME, WTriTrainConfig, train_wtri

    claim_run_folder(out, resume, force, exports=(EXPORT_NAME,))
    if threads is not None:
        torch.set_num_threads(threads)
    if bootstrap and Path(bootstrap).expanduser().is_file():  # the encoder file records it: absolute, not cwd-bound
        bootstrap = str(Path(bootstrap).expanduser().resolve())
    cfg = WTriTrainConfig(network=network, data=str(data), space=space, batch=batch, pseudo=pseudo,
                          total_kimg=kimg, lr=lr, iterations=iterations, losses=WTriLossConfig(cyc=cyc),
                          warmup_kimg=warmup_kimg, truncation=truncation, snapshot_kimg=snap, sample_kimg=snap,
                          bootstrap=bootstrap, cyc_every=cyc_every,
                          init=str(init.expanduser().resolve()) if init is not None else "")
    cfg.validate()
    from portrait3d.utils.compute import resolve_device

    dev = resolve_device(device)
    G = load_network(network)
    start = start_encoder(bootstrap, G, dev) if bootstrap else None
    path = train_wtri(cfg, out, resume=resume, progress=progress, G=G, start=start, device=dev,
                      max_minutes=max_minutes)
    click.echo(f"exported {path}")


@train.command("lift")
@click.option("--network", type=str, default=None, show_default="default-2d, or the resumed run's",
              help="2D StyleGAN2 checkpoint or built-in name.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--kimg", type=FiniteFloat(min=0, min_open=True), default=None, show_default="400",
              help="Training length in thousands of sampled latents.")
@click.option("--batch", type=click.IntRange(1), default=None, show_default="8", help="Latents per step.")
@click.option("--size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None, show_default="64",
              help="Resolution of depth, albedo and renders (the 2D images are resized to it).")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=None, show_default="1e-4",
              help="Adam learning rate.")
@click.option("--decoder-channels", type=click.IntRange(8, 1024), default=None, show_default="256",
              help="Widest layer of the D_S / D_T decoders (128 halves their cost and size; a new run only).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Snapshot folder (or run folder: newest snapshot) to continue from, bit-exactly.")
@click.option("--mesh-depth", type=FiniteFloat(0), default=None, show_default="0 (off, as the paper)",
              help="Weight of our face-mesh relief prior: the canonical depth follows MediaPipe's mesh of the "
                   "canonical image, up to a shift (not in the paper).")
@click.option("--mesh-depth-scale", type=FiniteFloat(min=0, min_open=True), default=None, show_default="1",
              help="How far to trust the mesh's depth scale (> 1: a deeper relief).")
@click.option("--view-pose", type=FiniteFloat(0), default=None, show_default="0 (off, as the paper)",
              help="Weight of our view supervision: D_V follows the head pose the face pipeline measures on G2D(w) "
                   "(not in the paper).")
@click.option("--ablate", type=click.Choice(sorted(lifting.ABLATIONS)), multiple=True,
              help="Switch a loss off (repeatable): flip (eq. 3), perturb (eqs. 4-7), identity (eq. 8), "
                   "albedo (rank, eq. 9).")
@click.option("--seed", type=int, default=None, show_default="0", help="Random seed.")
@click.option("--snap", type=FiniteFloat(0), default=None, show_default="40",
              help="Snapshot interval in kimg (0: only at the end).")
@click.option("--sample-every", type=FiniteFloat(0), default=None, show_default="4",
              help="Sample-grid interval in kimg (0: only at the end).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, show_default="auto",
              help="Device (auto: CUDA when available).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads [torch default].")
@click.option("--progress/--no-progress", default=True, help="Progress bar with the loss terms.")
@click.option("--force", is_flag=True, help="Start over in an OUT that already holds a run.")
@fail_cleanly
def lift_cmd(network: str | None, out: Path, kimg: float | None, batch: int | None, size: str | None, lr: float | None,
         decoder_channels: int | None, resume: Path | None, mesh_depth: float | None,
         mesh_depth_scale: float | None, view_pose: float | None, ablate: tuple[str, ...],
         seed: int | None, snap: float | None,
         sample_every: float | None, device: str | None, threads: int | None, progress: bool, force: bool) -> None:
    """Train the LiftedGAN lifting networks (D_V, D_L, M, D_S, D_T) of a frozen 2D StyleGAN2.

    Writes OUT/lifted.safetensors (for `portrait3d lift --lifted`), resumable snapshots, sample grids
    and log.jsonl.

    \b
    Examples:
      portrait3d train lift --network default-2d --out runs/lift --decoder-channels 128
      portrait3d train lift --out runs/lift --resume runs/lift
    """
    from portrait3d.checkpoints import load_network

    if resume is not None:
        _, meta = lifting.read_lift_snapshot(resume)
        try:
            cfg = lifting.LiftTrainConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{resume}: unreadable configuration ({str(e).splitlines()[0][:100]})") from None
        if size is not None and int(size) != cfg.lift.image_size:
            raise UsageError(f"the resumed run lifts at {cfg.lift.image_size} px; --size cannot change it")
        if decoder_channels is not None and decoder_channels != cfg.lift.decoder_channel_max:
            raise UsageError(f"the resumed run's decoders are {cfg.lift.decoder_channel_max} channels wide; "
                             "--decoder-channels cannot change it")
        cfg.network = network or cfg.network
    else:
        cfg = lifting.LiftTrainConfig(network=network or "default-2d")
    G = load_network(cfg.network)
    if not hasattr(G, "synthesis") or getattr(G, "c_dim", 0) != 0 or not hasattr(G, "mapping"):
        raise UsageError(f"{cfg.network}: LiftedGAN needs an unconditional 2D StyleGAN2 generator")
    if resume is None:
        cfg.lift = lifting.LiftConfig(w_dim=int(G.w_dim), image_size=int(size or 64))
        if decoder_channels is not None:
            cfg.lift.decoder_channel_max = decoder_channels
            cfg.lift.decoder_channel_min = min(cfg.lift.decoder_channel_min, decoder_channels)
    for name, v in (("total_kimg", kimg), ("batch", batch), ("lr", lr), ("seed", seed), ("snapshot_kimg", snap),
                    ("sample_kimg", sample_every), ("device", device), ("threads", threads)):
        if v is not None:
            setattr(cfg, name, v)
    if mesh_depth is not None:
        cfg.weights = dataclasses.replace(cfg.weights, mesh_depth=mesh_depth)
    if view_pose is not None:
        cfg.weights = dataclasses.replace(cfg.weights, view_pose=view_pose)
    if mesh_depth_scale is not None:
        cfg.losses = dataclasses.replace(cfg.losses, mesh_depth_scale=mesh_depth_scale)
    if ablate:
        cfg.ablate = tuple(dict.fromkeys(ablate))
    path = lifting.train_lifting(G, cfg, out, resume=resume, progress=progress, force=force)
    click.echo(f"exported {path}")


def _common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--network", type=str, default="default-3d", help="EG3D generator checkpoint or built-in name."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder."),
        click.option("--kimg", type=FiniteFloat(), default=200.0, help="Training length in thousands of pseudo pairs."),
        click.option("--batch", type=int, default=None, help="Batch size [8 encoder, 16 pose]."),
        click.option("--lr", type=FiniteFloat(), default=1e-4, help="Adam learning rate."),
        click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Snapshot folder (or run folder: newest snapshot) to continue from."),
        click.option("--input-size", type=int, default=128, help="Network input resolution (power of two)."),
        click.option("--depth", type=click.Choice(["18", "34"]), default="34", help="ResNet depth."),
        click.option("--width", type=int, default=64, help="ResNet width (channels of the first stage)."),
        click.option("--yaw", "yaw_max", type=FiniteFloat(), default=30.0, help="Pseudo pairs: yaw in [-YAW, YAW] degrees."),
        click.option("--pitch", "pitch_max", type=FiniteFloat(), default=20.0, help="Pseudo pairs: pitch in [-PITCH, PITCH]."),
        click.option("--pose-dist", type=click.Choice(["uniform", "gaussian"]), default="uniform",
                     help="Pseudo-pair pose distribution (gaussian: clipped, range = +-2 std)."),
        click.option("--psi", type=FiniteFloat(), default=0.7, help="Pseudo pairs: truncation psi."),
        click.option("--seed", type=int, default=0, help="Seed of the network initialisation and of the pseudo pairs."),
        click.option("--snap", type=FiniteFloat(), default=10.0, help="Snapshot interval in kimg (0: only at the end)."),
        click.option("--sample-every", type=FiniteFloat(), default=2.0, help="Sample-grid interval in kimg (0: none)."),
        click.option("--ema", "ema_kimg", type=FiniteFloat(), default=1.0,
                     help="EMA half-life in kimg (0: export the last weights)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="Device."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="bf16",
                     help="Arithmetic of the pseudo-pair renders and the training step: fp32, or bf16 autocast "
                          "(AMX on CPU) with fp32 weights and losses."),
        click.option("--threads", type=int, default=None, help="CPU threads [torch default]."),
        click.option("--pairs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Train on this pair cache (portrait3d train pseudo-pairs) instead of rendering every "
                          "batch; its pose, psi and offset settings replace --yaw, --pitch, --pose-dist and --psi."),
        click.option("--augment", type=FiniteFloat(0), default=0.0, show_default=True,
                     help="Strength of the photometric jitter of the network's input (brightness, contrast, "
                          "saturation, blur / sharpen, noise; 1: the documented ranges; 0: off), for real photos "
                          "unlike the renders."),
        click.option("--progress/--no-progress", default=True, help="Progress bar."),
        click.option("--force", is_flag=True, help="Start over in an OUT that already holds a run (its snapshots, "
                                                    "samples and log are deleted)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _apply_common(cfg: Any, kw: dict[str, Any], kind: str) -> None:
    claim_run_folder(kw["out"], kw["resume"], kw["force"], exports=(inv.EXPORT_NAMES[kind],))
    if kw["batch"] is not None:
        cfg.batch = kw["batch"]
    cfg.total_kimg, cfg.lr, cfg.seed = kw["kimg"], kw["lr"], kw["seed"]
    cfg.snapshot_kimg, cfg.sample_kimg, cfg.ema_kimg, cfg.device = kw["snap"], kw["sample_every"], kw["ema_kimg"], \
        kw["device"]
    cfg.precision = kw["precision"]
    cfg.pairs = str(kw["pairs"]) if kw["pairs"] is not None else ""
    cfg.augment = kw["augment"]
    cfg.pseudo = dataclasses.replace(cfg.pseudo, yaw_range=(-kw["yaw_max"], kw["yaw_max"]),
                                     pitch_range=(-kw["pitch_max"], kw["pitch_max"]), distribution=kw["pose_dist"],
                                     truncation_psi=kw["psi"], seed=kw["seed"])


def _load_generator(name: str, device: str) -> nn.Module:
    from portrait3d.checkpoints.load import load_network
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator

    G = load_network(name, device=inv.resolve_device(device))
    if not isinstance(G, TriPlaneGenerator):
        raise UsageError(f"{name} is not an EG3D (3D) generator")
    return G


@train.command("pseudo-pairs")
@click.option("--network", type=str, default="default-3d", show_default=True,
              help="EG3D generator checkpoint or built-in name to render.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Cache folder (rerun the same command to resume; a larger --count extends it).")
@click.option("--count", type=click.IntRange(1), default=12000, show_default=True, help="Pairs to render.")
@click.option("--yaw", "yaw_max", type=FiniteFloat(0, 89), default=35.0, show_default=True,
              help="Yaw in [-YAW, YAW] degrees.")
@click.option("--pitch", "pitch_max", type=FiniteFloat(0, 89), default=20.0, show_default=True,
              help="Pitch in [-PITCH, PITCH] degrees.")
@click.option("--pose-dist", type=click.Choice(["uniform", "gaussian"]), default="uniform", show_default=True,
              help="Pose distribution (gaussian: clipped, range = +-2 std).")
@click.option("--psi", type=FiniteFloat(0, 1), default=0.6, show_default=True, help="Lowest truncation psi.")
@click.option("--psi-max", type=FiniteFloat(0, 1), default=1.0, show_default=True,
              help="Highest truncation psi: each pair's psi is uniform in [PSI, PSI_MAX].")
@click.option("--translation-std", type=FiniteFloat(0), default=0.02, show_default=True,
              help="Camera-position offset std (world units; the shipped pose estimator's training value).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latents and cameras.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="bf16", show_default=True,
              help="Arithmetic of the renders (bf16: autocast, AMX on CPU).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads [torch default].")
@fail_cleanly
def pseudo_pairs_cmd(network: str, out: Path, count: int, yaw_max: float, pitch_max: float, pose_dist: str,
                     psi: float, psi_max: float, translation_std: float, seed: int, precision: str,
                     threads: int | None) -> None:
    """Render pseudo pairs (image, latent, camera) of an EG3D generator once, for `train encoder --pairs` and
    `train pose --pairs`: on a CPU the renders cost about 20x the encoder's own training step, so a run that
    reads a cache trains many times faster than one rendering every batch. About 0.4 s a pair at 128 px on one
    core; 50 KB a pair on disk.

    \b
    Example:
      portrait3d train pseudo-pairs --network default-3d --out ~/.cache/portrait3d/pairs-3d --count 12000
    """
    from portrait3d.methods.inversion3d.pair_cache import build_pair_cache
    from portrait3d.methods.inversion3d.pseudo import PseudoPairConfig
    from portrait3d.training.fast import FastPath

    if threads is not None:
        torch.set_num_threads(threads)
    if psi_max < psi:
        raise UsageError(f"--psi-max ({psi_max}) must be >= --psi ({psi})")
    G = _load_generator(network, "cpu").eval().requires_grad_(False)
    cfg = PseudoPairConfig(yaw_range=(-yaw_max, yaw_max), pitch_range=(-pitch_max, pitch_max),
                           distribution=pose_dist, translation_std=translation_std, truncation_psi=psi,
                           truncation_psi_max=psi_max if psi_max > psi else None, seed=seed)
    fast = FastPath(precision)

    def report(done: int, total: int, sec: float) -> None:
        click.echo(f"{done}/{total} pairs, {sec / 60:.1f} min", err=True)

    build_pair_cache(G, out, count, cfg, network=network, autocast=lambda: fast.autocast(torch.device("cpu")),
                     report=report)
    click.echo(f"{out}: {count} pairs")


@train.command("encoder")
@_common_options
@click.option("--discriminator", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="EG3D training snapshot (or run folder) whose D gives the adversarial term.")
@click.option("--lambda-l2", type=FiniteFloat(0), default=1.0, show_default=True, help="Pixel-MSE weight (0: off).")
@click.option("--lambda-perceptual", type=FiniteFloat(), default=0.8, help="Perceptual-loss weight (0: off).")
@click.option("--lambda-adv", type=FiniteFloat(), default=0.1, help="Adversarial weight (with --discriminator).")
@click.option("--lambda-reg", type=FiniteFloat(), default=2e-4, help="||delta w||^2 weight.")
@click.option("--lambda-latent", type=FiniteFloat(), default=0.0, help="Latent loss ||E(x) - w||^2 weight.")
@click.option("--eval-n", type=click.IntRange(0), default=64, show_default=True,
              help="Fresh pseudo pairs for the final latent / PSNR report (0: none).")
@fail_cleanly
def encoder_cmd(discriminator: Path | None, lambda_l2: float, lambda_perceptual: float, lambda_adv: float,
                lambda_reg: float, lambda_latent: float, eval_n: int, **kw: Any) -> None:
    """Train the latent encoder E (e4e-style, into W) and export encoder.safetensors.

    With --lambda-l2 0 --lambda-perceptual 0 and no --discriminator, only the latent loss trains E and the
    generator is never run backwards (several times faster per pair; ours, not the paper's recipe).

    \b
    Example:
      portrait3d train encoder --network default-3d --out runs/enc --kimg 200
    """
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    arch = inv.EncoderConfig(input_size=kw["input_size"], depth=int(kw["depth"]), width=kw["width"])
    cfg = inv.EncoderTrainConfig(encoder=arch, lambda_l2=lambda_l2, lambda_perceptual=lambda_perceptual,
                                 lambda_adv=lambda_adv, lambda_reg=lambda_reg, lambda_latent=lambda_latent)
    _apply_common(cfg, kw, "encoder")
    G = _load_generator(kw["network"], cfg.device)
    D = inv.load_eg3d_discriminator(discriminator) if discriminator is not None else None
    path = inv.train_encoder(G, cfg, kw["out"], resume=kw["resume"], progress=kw["progress"], D=D)
    click.echo(f"exported {path}")
    if eval_n > 0:
        from portrait3d.methods.inversion3d.networks import load_module

        E = load_module(path, device=next(G.parameters()).device)
        pseudo = inv.with_cache_settings(cfg).pseudo
        err = inv.encoder_error(E, G.eval(), eval_n, pseudo)
        click.echo(f"on {eval_n} fresh pseudo pairs: latent error {err['latent']:.3f} (w_avg: "
                   f"{err['latent_avg']:.3f}), PSNR of G(E(x)) {err['psnr']:.2f} dB (w_avg: {err['psnr_avg']:.2f} dB)")


@train.command("pose")
@_common_options
@click.option("--roll/--no-roll", default=False, help="Predict roll (6D rotation) and draw pseudo pairs with roll.")
@click.option("--roll-max", type=FiniteFloat(), default=15.0, help="With --roll: roll in [-ROLL_MAX, ROLL_MAX] degrees.")
@click.option("--translation-std", type=FiniteFloat(), default=0.02, help="Pseudo-pair camera offset std (world units).")
@click.option("--lambda-translation", type=FiniteFloat(), default=10.0, help="Camera-offset loss weight.")
@click.option("--lambda-reproj", type=FiniteFloat(), default=0.0, help="Re-rendering loss ||G(w, P(x)) - x||^2 weight.")
@click.option("--eval-n", type=int, default=64, help="Fresh pseudo pairs for the final pose-error report (0: none).")
@fail_cleanly
def pose_cmd(roll: bool, roll_max: float, translation_std: float, lambda_translation: float, lambda_reproj: float,
             eval_n: int, **kw: Any) -> None:
    """Train the pose estimator P and export pose.safetensors.

    \b
    Example:
      portrait3d train pose --network default-3d --out runs/pose --kimg 200
    """
    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    cfg = inv.PoseTrainConfig(pose=inv.PoseConfig(input_size=kw["input_size"], depth=int(kw["depth"]), width=kw["width"],
                                              roll=roll),
                          lambda_translation=lambda_translation, lambda_reproj=lambda_reproj)
    _apply_common(cfg, kw, "pose")
    cfg.pseudo = dataclasses.replace(cfg.pseudo, translation_std=translation_std,
                                     roll_range=(-roll_max, roll_max) if roll else (0.0, 0.0))
    G = _load_generator(kw["network"], cfg.device)
    path = inv.train_pose(G, cfg, kw["out"], resume=kw["resume"], progress=kw["progress"])
    err = inv.pose_error_deg(load_pose_for_eval(path, G), G, eval_n, cfg.pseudo) if eval_n > 0 else None
    click.echo(f"exported {path}")
    if err is not None:
        click.echo(f"pose error on {eval_n} fresh pseudo pairs (degrees; translation in world units): "
                   + json.dumps({k: round(v, 4) for k, v in err.items()}))


def load_pose_for_eval(path: Path, G: nn.Module) -> inv.PoseEstimator:
    """Load an exported pose estimator onto ``G``'s device (used by the CLI's final evaluation)."""
    from portrait3d.methods.inversion3d.networks import load_module

    P = load_module(path, device=next(G.parameters()).device)
    if not isinstance(P, inv.PoseEstimator):
        raise UsageError(f"{path} is not a pose estimator")
    return P


# ----------------------------------------------------------------------------- device transfer

@train.command("pack-snapshot")
@click.argument("snapshot", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly
def _pack_snapshot(snapshot: Path, out: Path) -> None:
    """Write a StyleGAN2 or EG3D SNAPSHOT's weights in float16 and its counters into OUT (for a device round trip).

    \b
    Example:
      portrait3d train pack-snapshot runs/sg2/snapshot-00003750 .device/snapshot
    """
    for p in transfer.pack_snapshot(snapshot, out):
        click.echo(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)")


@train.command("unpack-snapshot")
@click.argument("packed", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly
def _unpack_snapshot(packed: Path, run_dir: Path) -> None:
    """Turn a folder written by pack-snapshot back into a resumable snapshot inside RUN_DIR.

    \b
    Example:
      portrait3d train unpack-snapshot returned/snapshot runs/sg2
    """
    click.echo(str(transfer.unpack_snapshot(packed, run_dir)))


@train.command("pack-teacher")
@click.argument("teacher", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n", type=click.IntRange(1), default=500, show_default=True,
              help="Latents to keep (evenly spaced), each with all its views (~21 KB each with two turned views).")
@fail_cleanly
def _pack_teacher(teacher: Path, out: Path, n: int) -> None:
    """Pack N latents of a teacher set (views as JPEGs, meshes in float16) into one .npz for a device call.

    \b
    Example:
      portrait3d train pack-teacher ~/.cache/portrait3d/teacher-2d .device/teacher.npz --n 500
    """
    info = transfer.pack_teacher(teacher, out, n)
    click.echo(f"{out}: {info['latents']} latents x {info['views']} views ({out.stat().st_size / 2**20:.1f} MiB)")


@train.command("unpack-teacher")
@click.argument("packed", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly
def _unpack_teacher(packed: Path, out: Path) -> None:
    """Write a file made by pack-teacher back as a teacher-set folder (for `train eg3d --distill`)."""
    click.echo(f"{out}: {transfer.unpack_teacher(packed, out)} latents")

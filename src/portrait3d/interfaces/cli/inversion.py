"""3D GAN inversion (Ko et al.): invert3d and render."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import (
    check_batch_files,
    compute_options,
    echo_notes,
    run_batch_command,
    wants_batch,
    workers_option,
)
from portrait3d.utils.batch import BatchItem, ItemTask, WorkerInfo, pick_device
from portrait3d.utils.compute import setup_compute


def _photo_3d_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--face-index``, ``--align``, ``--orbit-frames``, ``--mesh-resolution``: shared by invert3d and encode3d."""
    for o in reversed([
        click.option("--face-index", type=click.IntRange(0), default=None,
                     help="Which face when the photo has several (0 = largest) [required then]."),
        click.option("--align", type=click.Choice(["auto", "default", "eg3d", "ffhq"]), default="auto",
                     help="Crop the generator was trained on (auto: 'default' for built-in models, else 'eg3d')."),
        click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of orbit.mp4."),
        click.option("--mesh-resolution", type=click.IntRange(16, 512), default=128,
                     help="Marching-cubes grid side of mesh.ply."),
    ]):
        fn = o(fn)
    return fn


@main.command()
@click.argument("photo", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--network", type=str, default="default-3d", help="EG3D checkpoint or built-in name.")
@click.option("--algorithm", type=click.Choice(["1", "2", "3"]), default="1",
              help="Inversion algorithm of Ko et al. (see portrait3d.methods.inversion3d.optimize).")
@click.option("--steps", type=click.IntRange(0, 100000), default=None,
              help="Latent / camera optimisation steps [default: the configuration's].")
@click.option("--pti/--no-pti", default=False, help="Pivotal tuning of the generator after the inversion.")
@click.option("--pti-steps", type=click.IntRange(1, 100000), default=None,
              help="Pivotal-tuning steps [default: the configuration's].")
@click.option("--pti-novel-identity", type=FiniteFloat(0), default=None, show_default="1 (PTI_NOVEL_IDENTITY)",
              help="Weight of PTI's novel-view identity term (ours: the tuned generator's views at yaw -40, -20, "
                   "20, 40 must keep the photo's dlib descriptor); 0 tunes as PTI was published.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Latent encoder (portrait3d LatentEncoder file) for the initial latent [default: the built-in "
                   "network's shipped encoder, else w_avg].")
@click.option("--pose", "pose_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pose estimator (portrait3d PoseEstimator file) for the initial camera "
                   "[default: the built-in network's shipped estimator, else the face pipeline's head pose].")
@click.option("--learned-init/--no-learned-init", default=True, show_default=True,
              help="Without --encoder / --pose, start from the built-in network's shipped encoder and pose "
                   "estimator (models/<network>/encoder.safetensors, pose.safetensors); --no-learned-init starts "
                   "from w_avg and the face pipeline's camera.")
@_photo_3d_options
@click.option("--fast/--exact", default=True, show_default=True,
              help="Optimise with bf16 renders and 12+12 samples per ray (the results are rendered in full), or "
                   "render every step as the model was trained.")
@click.option("--seed", type=int, default=None, help="Optimiser seed [default: the configuration's].")
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT (batch mode: redo every photo).")
@workers_option
@compute_options
@fail_cleanly
def invert3d(photo: Path, out: Path, network: str, algorithm: str, steps: int | None, pti: bool,
             pti_steps: int | None, pti_novel_identity: float | None, encoder_path: Path | None,
             pose_path: Path | None, learned_init: bool,
             face_index: int | None, align: str, orbit_frames: int, mesh_resolution: int, fast: bool,
             seed: int | None, device: str, force: bool, workers: int, threads: int | None) -> None:
    """Invert the face in PHOTO into a 3D (EG3D) generator, optimising latent and camera (Ko et al.).

    Writes input_aligned.png, reconstruction.png, view_yaw-30.png, view_yaw+30.png, depth.png, mesh.ply,
    orbit.mp4, latent.npy, result.json (and generator.safetensors with --pti) to OUT; `portrait3d render OUT`
    re-renders them from other angles.

    CPU time with the built-in 128 px default-3d: the 200 default steps (134 latent, 66 camera) take about 40-45 s on
    an idle 2-core CPU, then views, orbit, mesh and identity about 7 s (README "A photo in 3D"); --steps scales the
    optimisation; --pti (350 steps, with the novel-view identity term) adds about 5 to 6 minutes on one core
    (about 3 without it, --pti-novel-identity 0).
    A progress bar shows the steps.

    \b
    PHOTO may be a folder or a glob (batch mode, resumable; OUT/<key>/ per photo, OUT/manifest.json):
      portrait3d invert3d 'photos/*.jpg' --out results --workers 2
      torchrun --nproc_per_node 4 -m portrait3d.interfaces.cli invert3d 'photos/*.jpg' --out results --device cuda
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.invert3d import run_invert3d
    from portrait3d.methods.inversion3d.pipeline import builtin_init_paths

    if learned_init:
        shipped_encoder, shipped_pose = builtin_init_paths(network)
        encoder_path, pose_path = encoder_path or shipped_encoder, pose_path or shipped_pose
    if wants_batch([photo]):
        check_batch_files(network, encoder=encoder_path, pose=pose_path)
        kwargs = dict(network=network, algorithm=int(algorithm), steps=steps, pti=pti, pti_steps=pti_steps,
                      pti_novel_identity=pti_novel_identity,
                      encoder_path=encoder_path, pose_path=pose_path, face_index=face_index, align=align,
                      orbit_frames=orbit_frames, mesh_resolution=mesh_resolution, seed=seed, fast=fast)
        run_batch_command([photo], out, Invert3DTask(kwargs, device), desc="inverting",
                          config={"command": "invert3d", **kwargs}, workers=workers, force=force)
        return
    rec = run_invert3d(photo, out, network=network, algorithm=int(algorithm), steps=steps, pti=pti,
                       pti_steps=pti_steps, encoder_path=encoder_path, pose_path=pose_path, face_index=face_index,
                       align=align, force=force, orbit_frames=orbit_frames, mesh_resolution=mesh_resolution, seed=seed,
                       device=device, fast=fast, pti_novel_identity=pti_novel_identity)
    cam = rec["camera"]
    click.echo(f"PSNR {rec['psnr_db'] if rec['psnr_db'] is not None else float('inf'):.2f} dB, camera yaw "
               f"{cam['yaw_deg']:+.1f} pitch {cam['pitch_deg']:+.1f} roll {cam['roll_deg']:+.1f} deg, "
               f"identity (dlib cosine) {json.dumps(rec['identity_cosine_dlib'])}")
    echo_notes(rec.get("notes", []), "warning")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--yaw", "yaws", type=FiniteFloat(-90, 90), multiple=True, help="Head yaw in degrees; repeatable.")
@click.option("--pitch", type=FiniteFloat(-89, 89), default=None,
              help="Head pitch in degrees [default: the optimised pitch].")
@click.option("--orbit", is_flag=True, help="Also write render_orbit.mp4 (EG3D's orbit).")
@click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of render_orbit.mp4.")
@click.option("--force", is_flag=True, help="Overwrite existing renders.")
@compute_options
@fail_cleanly
def render(folder: Path, yaws: tuple[float, ...], pitch: float | None, orbit: bool, orbit_frames: int, device: str,
           force: bool, threads: int | None) -> None:
    """Re-render a FOLDER written by `portrait3d invert3d` from new angles.

    Writes FOLDER/render_yaw{+-}NN_pitch{+-}NN.png per --yaw (yaw 0 with only --pitch) and, with --orbit,
    FOLDER/render_orbit.mp4.

    \b
    Examples:
      portrait3d render inv/ --yaw -45 --yaw 45 --pitch 10
      portrait3d render inv/ --orbit --orbit-frames 96
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.invert3d import run_render

    for p in run_render(folder, yaws, pitch, orbit, force, orbit_frames=orbit_frames, device=device):
        click.echo(f"wrote {p}")


@main.command()
@click.argument("photo", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--network", type=str, default="default-3d", help="EG3D checkpoint or built-in name.")
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="models/wtri/<network>.safetensors when shipped",
              help="W_tri encoder (portrait3d train wtri) for --network.")
@click.option("--refine", is_flag=True,
              help="Hand the code to the Ko et al. optimiser (latent and camera) as its starting point.")
@click.option("--refine-steps", type=click.IntRange(0, 100000), default=None,
              help="Optimiser steps with --refine [default: the configuration's].")
@click.option("--pti/--no-pti", default=False, help="With --refine: pivotal tuning after the optimiser.")
@_photo_3d_options
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT (batch mode: redo every photo).")
@workers_option
@compute_options
@fail_cleanly
def encode3d(photo: Path, out: Path, network: str, encoder_path: Path | None, refine: bool,
             refine_steps: int | None, pti: bool, face_index: int | None, align: str, orbit_frames: int,
             mesh_resolution: int, force: bool, workers: int, device: str, threads: int | None) -> None:
    """Put the face in PHOTO into a 3D (EG3D) generator with the W_tri encoder (Oh & Jo): one encoder pass of
    a few iterations instead of an optimisation, at the face pipeline's camera.

    Writes the files of invert3d (input_aligned.png, reconstruction.png, view_yaw-30.png, view_yaw+30.png,
    depth.png, mesh.ply, orbit.mp4, result.json) and code.npz (the W_tri code; with --refine, latent.npy) to OUT,
    and prints the time of each stage.

    \b
    PHOTO may be a folder or a glob (batch mode, resumable; OUT/<key>/ per photo, OUT/manifest.json):
      portrait3d encode3d 'photos/*.jpg' --out results --workers 2
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.encode3d import run_encode3d

    kwargs = dict(network=network, encoder_path=encoder_path, refine=refine, refine_steps=refine_steps, pti=pti,
                  face_index=face_index, align=align, orbit_frames=orbit_frames, mesh_resolution=mesh_resolution)
    if wants_batch([photo]):
        check_batch_files(network, encoder=encoder_path)
        run_batch_command([photo], out, Encode3DTask(kwargs, device), desc="encoding",
                          config={"command": "encode3d", **kwargs}, workers=workers, force=force)
        return
    rec = run_encode3d(photo, out, force=force, device=device, **kwargs)
    click.echo("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in rec["timings_s"].items()))
    click.echo(f"PSNR {rec['psnr_db'] if rec['psnr_db'] is not None else float('inf'):.2f} dB, "
               f"identity (dlib cosine) {json.dumps(rec['identity_cosine_dlib'])}")
    echo_notes(rec.get("notes", []), "warning")
    click.echo(f"wrote {out}")


@dataclass
class _PhotoTask(ItemTask):
    """A batch of a one-photo command: one photo -> OUT/<key>/ holding what the command writes to OUT."""

    kwargs: dict[str, Any]  # the command's options, the same for every photo
    device: str
    _device: str = field(default="cpu", init=False, repr=False)

    def setup(self, worker: WorkerInfo) -> None:
        self._device = pick_device(self.device, worker)  # 'cuda' -> this rank's / worker's GPU


class Encode3DTask(_PhotoTask):
    """Batch ``encode3d``."""

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.interfaces.encode3d import run_encode3d

        rec = run_encode3d(item.path, out_dir, force=False, device=self._device, progress=False, **self.kwargs)
        return {"psnr_db": rec.get("psnr_db"), "identity_cosine_dlib": rec.get("identity_cosine_dlib"),
                "encode_seconds": rec["timings_s"].get("encode")}


class Invert3DTask(_PhotoTask):
    """Batch ``invert3d``."""

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.interfaces.invert3d import run_invert3d

        rec = run_invert3d(item.path, out_dir, force=False, device=self._device, **self.kwargs)
        cam = rec.get("camera") or {}
        return {"psnr_db": rec.get("psnr_db"), "identity_cosine_dlib": rec.get("identity_cosine_dlib"),
                **{k: cam.get(k) for k in ("yaw_deg", "pitch_deg", "roll_deg")}}

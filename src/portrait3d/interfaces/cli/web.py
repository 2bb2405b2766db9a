"""The browser editor: web."""

from __future__ import annotations

from pathlib import Path

import click

from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import compute_options
from portrait3d.utils.compute import setup_compute


@main.command()
@click.option("--host", type=str, default="127.0.0.1",
              help="Interface to listen on. 127.0.0.1 serves this computer only; 0.0.0.0 would expose the "
                   "editor (and the CPU) to the whole network, without a password.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, help="TCP port.")
@click.option("--network-3d", type=str, default="default-3d", help="EG3D checkpoint or built-in name (3D inversion).")
@click.option("--network-2d", type=str, default="default-2d",
              help="2D StyleGAN2 checkpoint or built-in name (NRSfM edits, LiftedGAN).")
@click.option("--nrsfm", "nrsfm_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              show_default="models/<network-2d>/nrsfm-w.safetensors when shipped",
              help="NRSfM editor written by `portrait3d nrsfm build`; enables the NRSfM method.")
@click.option("--lifted", "lifted_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              show_default="models/<network-2d>/lifted.safetensors when shipped",
              help="Lifting model written by `python -m portrait3d.methods.lifting.train`; enables LiftedGAN.")
@click.option("--pie-models", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the shipped PIE estimator and RigNets",
              help="Folder with PIE's estimator.safetensors and rignet-<mode>.safetensors for --network-2d.")
@click.option("--pie-steps", type=(click.IntRange(0, 100000), click.IntRange(0, 100000)), default=(150, 100),
              help="PIE embedding steps per photo: in W, then in W+.")
@click.option("--steps", type=click.IntRange(0, 100000), default=40,
              help="3D inversion steps per photo (few: the editor is interactive; portrait3d invert3d uses 200); "
                   "with a W_tri encoder, the steps of the Refine button.")
@click.option("--learned-init/--no-learned-init", default=True, show_default=True,
              help="Start each 3D inversion from the encoder / pose estimator shipped beside a built-in --network-3d "
                   "(as portrait3d invert3d); off: w_avg and the face pipeline's camera.")
@click.option("--wtri-encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              show_default="models/wtri/<network-3d>.safetensors when shipped and --learned-init",
              help="W_tri encoder (portrait3d train wtri) for --network-3d: a photo is encoded in one pass (about "
                   "0.5 s); the Refine button then runs --steps optimiser steps from its code.")
@click.option("--pti/--no-pti", default=False, help="Pivotal tuning of the generator after each 3D inversion.")
@click.option("--project-steps", type=click.IntRange(1, 100000), default=100,
              help="2D projector steps per photo (NRSfM, LiftedGAN).")
@click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of the orbit video.")
@click.option("--mesh-resolution", type=click.IntRange(16, 512), default=96,
              help="Marching-cubes grid side of the mesh.")
@click.option("--max-upload-mb", type=FiniteFloat(0.1, 200), default=10.0, help="Largest photo accepted, in MB.")
@click.option("--max-megapixels", type=FiniteFloat(0.1, 64), default=25.0,
              help="Largest photo accepted, in megapixels (checked before decoding).")
@compute_options
@fail_cleanly
def web(host: str, port: int, network_3d: str, network_2d: str, nrsfm_path: Path | None, lifted_path: Path | None,
        pie_models: Path | None, pie_steps: tuple[int, int], steps: int, learned_init: bool,
        wtri_encoder: Path | None, pti: bool,
        project_steps: int, orbit_frames: int, mesh_resolution: int, max_upload_mb: float, max_megapixels: float,
        threads: int | None, device: str) -> None:
    """Start the browser portrait editor on http://HOST:PORT (offline; Ctrl-C stops it).

    Upload a photo (JPEG, PNG or WebP) or pick a seed, choose a method, and move the sliders: the image
    follows live. Methods: 3D inversion (EG3D; yaw / pitch), and, given their model files, NRSfM edits
    (--nrsfm; yaw / pitch / expression), LiftedGAN (--lifted; yaw / pitch / light) and PIE (yaw / pitch, and
    expression and light where their RigNets are installed). Buttons download
    the image, an orbit video and the mesh.

    \b
    Example:
        portrait3d web --port 7860        # then open http://127.0.0.1:7860

    On one CPU core with the built-in 128 px models: a seed shows in about 1 s, a photo is in 3D after the W_tri
    encoder's pass (about 1 s) and Refine takes about 30 s at --steps 40 (PIE's embedding about 70 s at
    --pie-steps 150 100), each slider move renders
    in about 0.15 s (PIE about 0.1 s), the orbit video (48 frames)
    about 7 s and the mesh a few seconds.
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.web.app import WebConfig, launch
    from portrait3d.interfaces.web.methods import MethodSettings
    from portrait3d.interfaces.web.upload import UploadLimits

    methods = MethodSettings(network_3d=network_3d, network_2d=network_2d, nrsfm_path=nrsfm_path,
                             lifted_path=lifted_path, pie_models=pie_models, pie_steps_w=pie_steps[0],
                             pie_steps_wplus=pie_steps[1], invert_steps=steps, learned_init=learned_init,
                             wtri_encoder=wtri_encoder, pti=pti,
                             project_steps=project_steps, orbit_frames=orbit_frames, mesh_resolution=mesh_resolution,
                             device=device)
    limits = UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_megapixels * 1e6))
    launch(WebConfig(host=host, port=port, methods=methods, limits=limits))  # threads: set by setup_compute

"""The main job: `portrait3d demo`."""

from __future__ import annotations

from pathlib import Path

import click

from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import compute_options
from portrait3d.utils.compute import resolve_device


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("portrait3d_demo"),
              help="Output folder.")
@click.option("--network-2d", type=str, default="default-2d", help="2D StyleGAN2 checkpoint or built-in name.")
@click.option("--network-3d", type=str, default="default-3d", help="3D EG3D checkpoint or built-in name.")
@click.option("--samples", type=click.IntRange(1, 64), default=8, help="Number of faces per generator.")
@click.option("--orbit-faces", type=click.IntRange(1, 16), default=3, help="Faces side by side in orbit.mp4.")
@click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of orbit.mp4.")
@click.option("--fps", type=click.IntRange(1, 120), default=24, help="Frame rate of orbit.mp4.")
@click.option("--seed", type=int, default=0, help="Random seed.")
@click.option("--truncation", type=FiniteFloat(0, 1), default=0.7, help="Truncation psi.")
@click.option("--force", is_flag=True, help="Overwrite existing demo outputs in OUT.")
@compute_options
@fail_cleanly
def demo(out: Path, network_2d: str, network_3d: str, samples: int, orbit_faces: int, orbit_frames: int, fps: int,
         seed: int, truncation: float, device: str, threads: int | None, force: bool) -> None:
    """Sample faces, rotate them in 3D, show depth and an orbit video (CPU: well under 2 minutes).

    Writes samples_2d.png, samples_3d.png, views_3d.png, depth_3d.png, orbit.mp4 and README.txt to OUT, and
    lifted_2d.png (LiftedGAN rotations and relighting of the 2D faces) when the 2D model ships a lifted model.

    \b
    Examples:
      portrait3d demo --out portrait3d_demo --force
      portrait3d demo --network-3d eg3d_ffhq.safetensors --samples 4 --device cuda
    """
    device = resolve_device(device)  # run_demo sets (and afterwards restores) the threads itself
    from portrait3d.interfaces.demo import run_demo

    run_demo(out, network_2d, network_3d, samples, seed, truncation, force, orbit_faces=orbit_faces,
             orbit_frames=orbit_frames, fps=fps, device=device, threads=threads)

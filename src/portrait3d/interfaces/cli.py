"""The ``portrait3d`` command line (click). Every command exits 2 with a one-line error on bad input."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.checkpoints.safe_pickle import CheckpointError
from portrait3d.face.errors import FaceError


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``error: ...`` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, FaceError, FileExistsError, FileNotFoundError, IsADirectoryError,
                PermissionError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="portrait3d")
def main() -> None:
    """3D-aware portrait synthesis, GAN inversion and editing."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@_fail_cleanly
def convert(src: Path, dst: Path, force: bool) -> None:
    """Convert a checkpoint (NVIDIA .pkl, rosinality .pt, ours) to portrait3d's .safetensors format."""
    from portrait3d.checkpoints import load_network, save_network

    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass --force to overwrite)")
    net = load_network(src)
    save_network(net, dst, overwrite=force)
    click.echo(f"wrote {dst} ({type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters)")


@main.command()
@click.argument("network", type=str)
@_fail_cleanly
def info(network: str) -> None:
    """Print the architecture and configuration of a checkpoint."""
    from portrait3d.checkpoints import load_network

    net = load_network(network)
    cfg = net.config.to_dict()
    click.echo(json.dumps({"class": type(net).__name__, "num_ws": net.num_ws,
                           "parameters": sum(p.numel() for p in net.parameters()), "config": cfg}, indent=1))


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
@click.option("--truncation", type=click.FloatRange(0, 1), default=0.7, help="Truncation psi.")
@click.option("--device", type=str, default="cpu", help="torch device ('cpu', 'cuda', ...).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads [default: the cores not busy with other processes].")
@click.option("--force", is_flag=True, help="Overwrite existing demo outputs in OUT.")
@_fail_cleanly
def demo(out: Path, network_2d: str, network_3d: str, samples: int, orbit_faces: int, orbit_frames: int, fps: int,
         seed: int, truncation: float, device: str, threads: int | None, force: bool) -> None:
    """Sample faces, rotate them in 3D, show depth and an orbit video (CPU: well under 2 minutes).

    Writes samples_2d.png, samples_3d.png, views_3d.png, depth_3d.png, orbit.mp4 and README.txt to OUT.
    """
    from portrait3d.interfaces.demo import run_demo

    run_demo(out, network_2d, network_3d, samples, seed, truncation, force, orbit_faces=orbit_faces,
             orbit_frames=orbit_frames, fps=fps, device=device, threads=threads)


@main.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--style", type=click.Choice(["ffhq", "eg3d", "default"]), default="default",
              help="Crop recipe: FFHQ (StyleGAN/e4e/PTI), EG3D in-the-wild, or portrait3d's default models.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--size", type=click.IntRange(32, 4096), default=None,
              help="Aligned image side in pixels [default: 1024 ffhq, 512 eg3d, 128 default].")
@click.option("--face-index", type=click.IntRange(0), default=None,
              help="Which face when a photo has several (0 = largest) [default: the largest].")
@click.option("--detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog"]), default="mediapipe")
@click.option("--landmarks", type=click.Choice(["dlib", "mediapipe"]), default="dlib")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@_fail_cleanly
def align(photos: tuple[Path, ...], style: str, out: Path, size: int | None, face_index: int | None, detector: str,
          landmarks: str, force: bool) -> None:
    """Align PHOTOS for a generator and estimate their EG3D cameras.

    Writes OUT/<name>.png for each photo and OUT/cameras.json laid out like EG3D's dataset.json
    ({"labels": [[file, [25 floats]], ...]}), plus OUT/poses.json with yaw/pitch/roll in degrees.
    Every photo is processed before anything is written, so a bad photo leaves OUT untouched.
    """
    from tqdm import tqdm

    from portrait3d.checkpoints.native import atomic_write
    from portrait3d.face.io import save_image
    from portrait3d.face.pipeline import FacePipeline

    for p in photos:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such photo")
    names = [p.stem + ".png" for p in photos]
    if len(set(names)) != len(names):
        raise ValueError("two input photos share a file name; their outputs would collide")
    targets = [out / n for n in names] + [out / "cameras.json", out / "poses.json"]
    if not force:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t} already exists (pass --force to overwrite)")
    results = []
    with FacePipeline(style=style, output_size=size, detector=detector, landmarks=landmarks) as pipe:
        for photo in tqdm(photos, desc="aligning", unit="photo", disable=len(photos) < 2):
            try:
                results.append(pipe(photo, face_index=face_index))
            except (FaceError, ValueError) as e:
                raise type(e)(f"{photo}: {e}") from None
    labels, poses = [], {}
    for name, r in zip(names, results):
        save_image(out / name, r.aligned.image, overwrite=force)
        labels.append([name, [round(float(v), 8) for v in r.camera.tolist()]])
        poses[name] = {"yaw_deg": r.pose.yaw_deg, "pitch_deg": r.pose.pitch_deg, "roll_deg": r.pose.roll_deg,
                       "faces_found": r.num_faces, "reprojection_error_px": r.pose.reprojection_error}
    write_json = lambda path, obj: atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)),
                                                overwrite=force)  # noqa: E731
    write_json(out / "cameras.json", {"labels": labels})
    write_json(out / "poses.json", poses)
    click.echo(f"wrote {len(results)} aligned image(s), cameras.json and poses.json to {out}")


@main.command()
@click.argument("photo_a", type=click.Path(path_type=Path))
@click.argument("photo_b", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["port", "dlib"]), default="port",
              help="portrait3d's differentiable PyTorch port of dlib's network, or dlib itself.")
@click.option("--face-index-a", type=click.IntRange(0), default=None, help="Face in PHOTO_A (0 = largest).")
@click.option("--face-index-b", type=click.IntRange(0), default=None, help="Face in PHOTO_B (0 = largest).")
@_fail_cleanly
def identity(photo_a: Path, photo_b: Path, backend: str, face_index_a: int | None,
             face_index_b: int | None) -> None:
    """Say whether two photos show the same person (dlib's 128-D descriptor, distance threshold 0.6)."""
    from portrait3d.face.pipeline import compare_photos

    r = compare_photos(photo_a, photo_b, backend=backend, face_index_a=face_index_a, face_index_b=face_index_b)
    verdict = "same person" if r["same_person"] else "different people"
    click.echo(f"cosine similarity {r['cosine']:.4f}  distance {r['distance']:.4f}  "
               f"(threshold {r['threshold']}): {verdict}")


if __name__ == "__main__":
    main()

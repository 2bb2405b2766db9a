"""Photo commands that need no generator: align and identity."""

from __future__ import annotations

import json
from pathlib import Path

import click

from portrait3d.face.errors import FaceError
from portrait3d.interfaces.cli.base import fail_cleanly, main


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
@fail_cleanly
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
@fail_cleanly
def identity(photo_a: Path, photo_b: Path, backend: str, face_index_a: int | None,
             face_index_b: int | None) -> None:
    """Say whether two photos show the same person (dlib's 128-D descriptor, distance threshold 0.6)."""
    from portrait3d.face.pipeline import compare_photos

    r = compare_photos(photo_a, photo_b, backend=backend, face_index_a=face_index_a, face_index_b=face_index_b)
    verdict = "same person" if r["same_person"] else "different people"
    click.echo(f"cosine similarity {r['cosine']:.4f}  distance {r['distance']:.4f}  "
               f"(threshold {r['threshold']}): {verdict}")

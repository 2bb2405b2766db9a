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

    Writes samples_2d.png, samples_3d.png, views_3d.png, depth_3d.png, orbit.mp4 and README.txt to OUT, and
    lifted_2d.png (LiftedGAN rotations and relighting of the 2D faces) when the 2D model ships a lifted model.
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



# ----------------------------------------------------------------------------- NRSfM editing
@main.group()
def nrsfm() -> None:
    """Rank-one NRSfM editing (Haas et al.): build an editor for a generator."""


@nrsfm.command("build")
@click.option("--network", type=str, default="default-2d", help="StyleGAN2 checkpoint or built-in name.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Editor file to write (.safetensors); a _report.json and _basis.png go beside it.")
@click.option("--space", type=click.Choice(["z", "w", "w+"]), default="w", help="Latent space of the edits.")
@click.option("--samples", type=click.IntRange(50), default=10000, help="Generated faces to landmark.")
@click.option("--basis", type=click.IntRange(0, 64), default=8, help="Number of non-rigid basis shapes K.")
@click.option("--landmarks", "backend", type=click.Choice(["dlib", "mediapipe"]), default="dlib",
              help="Landmark backend (68 iBUG points or the 468-point mesh).")
@click.option("--detector", type=click.Choice(["template", "mediapipe", "dlib", "dlib-hog"]), default="mediapipe",
              help="Face box: a detector, or 'template' (the aligned generator's fixed face box).")
@click.option("--seed", type=int, default=0, help="Seed of the latent stream.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=1.0, help="Truncation psi of sampled latents.")
@click.option("--factorize-samples", type=click.IntRange(50), default=4000, help="Faces used by the factorisation.")
@click.option("--epochs", type=click.IntRange(1), default=60, help="Regressor training epochs.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("~/.cache/portrait3d/nrsfm").expanduser(), help="Landmark cache folder.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@_fail_cleanly
def nrsfm_build(network: str, out: Path, space: str, samples: int, basis: int, backend: str, detector: str, seed: int,
                truncation: float, factorize_samples: int, epochs: int, cache_dir: Path, force: bool) -> None:
    """Landmark N generated faces, factorise them (rank-one NRSfM) and train the regressor φ."""
    from portrait3d.interfaces.nrsfm import run_build

    report = run_build(network, out, space, samples, basis, backend, detector, seed, truncation, factorize_samples,
                       epochs, force, cache_dir)
    click.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    click.echo(f"wrote {out}")


def _edit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--network", type=str, default="default-2d", help="StyleGAN2 checkpoint or built-in name."),
        click.option("--nrsfm", "editor_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="NRSfM editor file [the network's shipped editor]."),
        click.option("--mode", type=click.Choice(["linear", "gradient"]), default="gradient",
                     help="Eq. 14 (Jacobian pseudo-inverse) or eq. 15 (gradient with identity term)."),
        click.option("--steps", type=click.IntRange(1, 10000), default=50, help="Gradient-edit steps."),
        click.option("--lambda-id", type=click.FloatRange(0), default=0.01, help="Identity weight λ_ID of eq. 15."),
        click.option("--detector", type=click.Choice(["template", "mediapipe", "dlib", "dlib-hog"]),
                     default="template", help="Face box on generated images."),
        click.option("--project-steps", type=click.IntRange(1, 100000), default=300,
                     help="Projector steps when editing a photo."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."),
        click.option("--force", is_flag=True, help="Overwrite existing outputs."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("source", type=str)
@click.option("--method", type=click.Choice(["nrsfm"]), default="nrsfm", help="Editing method.")
@click.option("--yaw", type=float, default=0.0, help="Change of head yaw, degrees (+ = head turns to its left).")
@click.option("--pitch", type=float, default=0.0, help="Change of head pitch, degrees (+ = chin up).")
@click.option("--roll", type=float, default=0.0, help="Change of head roll, degrees.")
@click.option("--expr", multiple=True, metavar="K=VALUE",
              help="Change of shape component K (1-based) in standard deviations; repeatable.")
@click.option("--face-index", type=click.IntRange(0), default=None, help="Face in a photo (0 = largest).")
@_edit_options
@_fail_cleanly
def edit(source: str, method: str, yaw: float, pitch: float, roll: float, expr: tuple[str, ...],
         face_index: int | None, network: str, editor_path: Path | None, mode: str, steps: int, lambda_id: float,
         detector: str, project_steps: int, out: Path, force: bool) -> None:
    """Edit head pose and expression of SOURCE (a seed, or a photo that is inverted first)."""
    from portrait3d.interfaces.nrsfm import run_edit
    from portrait3d.methods.nrsfm.edit import EditSpec, parse_expr

    spec = EditSpec(yaw=yaw, pitch=pitch, roll=roll, expr=parse_expr(expr))
    if spec.is_identity():
        raise ValueError("nothing to edit: give --yaw, --pitch, --roll or --expr")
    rec = run_edit(source, network, editor_path, spec, mode, steps, lambda_id, out, force, detector, project_steps,
                   face_index)
    _echo_edit_summary(rec, out)


def _echo_edit_summary(rec: dict, out: Path) -> None:
    """The headline figures of an edit / transfer record, then where it was written."""
    click.echo(json.dumps({k: rec[k] for k in ("identity_similarity_dlib", "head_pose_change_deg", "edit_seconds")
                           if k in rec}))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("source", type=str)
@click.argument("target", type=str)
@click.option("--part", type=click.Choice(["pose", "expression", "all"]), default="pose",
              help="What TARGET takes from SOURCE.")
@_edit_options
@_fail_cleanly
def transfer(source: str, target: str, part: str, network: str, editor_path: Path | None, mode: str, steps: int,
             lambda_id: float, detector: str, project_steps: int, out: Path, force: bool) -> None:
    """Give TARGET the pose and/or expression of SOURCE (each a seed or a photo)."""
    from portrait3d.interfaces.nrsfm import run_transfer

    rec = run_transfer(source, target, network, editor_path, part, mode, steps, lambda_id, out, force, detector,
                       project_steps)
    _echo_edit_summary(rec, out)


# ----------------------------------------------------------------------------- 3D GAN inversion
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
@click.option("--encoder", "encoder_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Latent encoder (portrait3d LatentEncoder file) for the initial latent [default: w_avg].")
@click.option("--pose", "pose_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pose estimator (portrait3d PoseEstimator file) for the initial camera "
                   "[default: the face pipeline's head pose].")
@click.option("--face-index", type=click.IntRange(0), default=None,
              help="Which face when the photo has several (0 = largest) [required then].")
@click.option("--align", type=click.Choice(["auto", "default", "eg3d", "ffhq"]), default="auto",
              help="Crop the generator was trained on (auto: 'default' for built-in models, else 'eg3d').")
@click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of orbit.mp4.")
@click.option("--mesh-resolution", type=click.IntRange(16, 512), default=128,
              help="Marching-cubes grid side of mesh.ply.")
@click.option("--seed", type=int, default=None, help="Optimiser seed [default: the configuration's].")
@click.option("--device", type=str, default="cpu", help="torch device ('cpu', 'cuda', ...).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT.")
@_fail_cleanly
def invert3d(photo: Path, out: Path, network: str, algorithm: str, steps: int | None, pti: bool,
             pti_steps: int | None, encoder_path: Path | None, pose_path: Path | None, face_index: int | None,
             align: str, orbit_frames: int, mesh_resolution: int, seed: int | None, device: str, force: bool) -> None:
    """Invert the face in PHOTO into a 3D (EG3D) generator, optimising latent and camera (Ko et al.).

    Writes input_aligned.png, reconstruction.png, view_yaw-30.png, view_yaw+30.png, depth.png, mesh.ply,
    orbit.mp4, latent.npy, result.json (and generator.safetensors with --pti) to OUT; `portrait3d render OUT`
    re-renders them from other angles.
    """
    from portrait3d.interfaces.invert3d import run_invert3d

    rec = run_invert3d(photo, out, network=network, algorithm=int(algorithm), steps=steps, pti=pti,
                       pti_steps=pti_steps, encoder_path=encoder_path, pose_path=pose_path, face_index=face_index,
                       align=align, force=force, orbit_frames=orbit_frames, mesh_resolution=mesh_resolution, seed=seed,
                       device=device)
    cam = rec["camera"]
    click.echo(f"PSNR {rec['psnr_db'] if rec['psnr_db'] is not None else float('inf'):.2f} dB, camera yaw "
               f"{cam['yaw_deg']:+.1f} pitch {cam['pitch_deg']:+.1f} roll {cam['roll_deg']:+.1f} deg, "
               f"identity (dlib cosine) {json.dumps(rec['identity_cosine_dlib'])}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--yaw", "yaws", type=float, multiple=True, help="Head yaw in degrees; repeatable.")
@click.option("--pitch", type=click.FloatRange(-89, 89), default=None,
              help="Head pitch in degrees [default: the optimised pitch].")
@click.option("--orbit", is_flag=True, help="Also write render_orbit.mp4 (EG3D's orbit).")
@click.option("--orbit-frames", type=click.IntRange(2, 600), default=48, help="Frames of render_orbit.mp4.")
@click.option("--device", type=str, default="cpu", help="torch device ('cpu', 'cuda', ...).")
@click.option("--force", is_flag=True, help="Overwrite existing renders.")
@_fail_cleanly
def render(folder: Path, yaws: tuple[float, ...], pitch: float | None, orbit: bool, orbit_frames: int, device: str,
           force: bool) -> None:
    """Re-render a FOLDER written by `portrait3d invert3d` from new angles.

    Writes FOLDER/render_yaw{+-}NN_pitch{+-}NN.png per --yaw (yaw 0 with only --pitch) and, with --orbit,
    FOLDER/render_orbit.mp4.
    """
    from portrait3d.interfaces.invert3d import run_render

    for p in run_render(folder, yaws, pitch, orbit, force, orbit_frames=orbit_frames, device=device):
        click.echo(f"wrote {p}")


# ----------------------------------------------------------------------------- LiftedGAN
@main.command()
@click.argument("source", type=str)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--network", type=str, default="default-2d",
              help="2D StyleGAN2 checkpoint or built-in name the lifted model was trained on.")
@click.option("--lifted", "lifted_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="models/<network>/lifted.safetensors when shipped",
              help="Lifting model written by `python -m portrait3d.methods.lifting.train`.")
@click.option("--yaw", "yaws", type=float, multiple=True, show_default="-60 -30 0 30 60",
              help="Yaw of a view in rotated.png, degrees within [-90, 90]; repeatable.")
@click.option("--light", type=str, default=None, metavar="X,Y",
              help="Extra light direction for relit.png, X and Y in [-1, 1] as D_L predicts them "
                   "(X > 0 lights from the image's left, Y > 0 from the top).")
@click.option("--face-index", type=click.IntRange(0), default=None,
              help="Which face when the photo has several (0 = largest) [required then].")
@click.option("--project-steps", type=click.IntRange(1, 100000), default=300, help="Projector steps for a photo.")
@click.option("--device", type=str, default="cpu", help="torch device ('cpu', 'cuda', ...).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT.")
@_fail_cleanly
def lift(source: str, out: Path, network: str, lifted_path: Path | None, yaws: tuple[float, ...], light: str | None,
         face_index: int | None, project_steps: int, device: str, force: bool) -> None:
    """Lift SOURCE (a seed, a .npy latent or a photo) to 3D with LiftedGAN: rotate, relight, export a mesh.

    Writes image.png, rotated.png, relit.png, depth.png, normal.png, albedo.png, shading.png, mesh.obj,
    latent.npy and result.json (and aligned.png, projection.png for a photo) to OUT.
    """
    from portrait3d.interfaces.lift import run_lift

    rec = run_lift(source, out, network, lifted_path, yaws, light, force, face_index, project_steps, device=device)
    v, li = rec["view"], rec["light"]
    click.echo(f"view yaw {v['yaw_deg']:+.1f} pitch {v['pitch_deg']:+.1f} roll {v['roll_deg']:+.1f} deg, light "
               f"ambient {li['ambient']:.2f} diffuse {li['diffuse']:.2f} direction ({li['dx']:+.2f}, {li['dy']:+.2f})")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()

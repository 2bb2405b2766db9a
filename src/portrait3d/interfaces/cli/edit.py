"""Rank-one NRSfM editing (Haas et al.): nrsfm build, edit and transfer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.errors import UsageError
from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import (
    check_batch_files,
    compute_options,
    echo_notes,
    run_batch_command,
    wants_batch,
    workers_option,
)
from portrait3d.utils.batch import BatchItem, ItemTask
from portrait3d.utils.compute import setup_compute


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
@click.option("--sample-detector", "detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog", "template"]),
              default="mediapipe", help="Face box on the generated samples: a detector, or 'template' (the aligned "
                                        "generator's fixed box; fastest, frontal samples only).")
@click.option("--seed", type=int, default=0, help="Seed of the latent stream.")
@click.option("--truncation", type=FiniteFloat(0, 1), default=1.0, help="Truncation psi of sampled latents.")
@click.option("--factorize-samples", type=click.IntRange(50), default=4000, help="Faces used by the factorisation.")
@click.option("--epochs", type=click.IntRange(1), default=60, help="Regressor training epochs.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("~/.cache/portrait3d/nrsfm").expanduser(), help="Landmark cache folder.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@compute_options
@fail_cleanly
def nrsfm_build(network: str, out: Path, space: str, samples: int, basis: int, backend: str, detector: str, seed: int,
                truncation: float, factorize_samples: int, epochs: int, cache_dir: Path, force: bool, device: str,
                threads: int | None) -> None:
    """Landmark N generated faces, factorise them (rank-one NRSfM) and train the regressor φ.

    CPU time on one core: landmarking takes about 0.1 s per face (so about 20 minutes for the default 10,000,
    cached in --cache for the next build), then the factorisation and the regressor a few minutes; progress bars
    show each stage.

    \b
    Example:
      portrait3d nrsfm build --network default-2d --out editor.safetensors --samples 10000
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.nrsfm import run_build

    report = run_build(network, out, space, samples, basis, backend, detector, seed, truncation, factorize_samples,
                       epochs, force, cache_dir, device=device)
    click.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    click.echo(f"wrote {out}")


def _edit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--network", type=str, default="default-2d", help="StyleGAN2 checkpoint or built-in name."),
        click.option("--nrsfm", "editor_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="NRSfM editor file [the network's shipped editor]."),
        click.option("--mode", type=click.Choice(["linear", "gradient"]), default="gradient",
                     help="Eq. 14 (Jacobian pseudo-inverse) or eq. 15 (gradient with identity term)."),
        click.option("--metric", type=click.Choice(["prior", "euclidean"]), default="prior",
                     help="Latent metric of the edit step: prior (the smallest step in the latents' own covariance, "
                          "holding only what is asked) or euclidean (eqs. 14-15 as printed, everything else held)."),
        click.option("--steps", type=click.IntRange(1, 10000), default=50, help="Gradient-edit steps."),
        click.option("--lambda-id", type=FiniteFloat(0), default=None,
                     help="Identity weight λ_ID of eq. 15 [0.01 (the paper's) to the original render for a seed; 1 "
                          "to the photo for a photo]."),
        click.option("--sample-detector", "detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog", "template"]),
                     default="mediapipe", help="Face box on the generated images (before and after the edit): a "
                                               "detector, or 'template' (the aligned generator's fixed box)."),
        click.option("--project-steps", type=click.IntRange(1, 100000), default=300,
                     help="Projector steps when editing a photo."),
        click.option("--fast/--exact", default=True,
                     help="A photo's projection in bf16 with the perceptual loss at the generator's size (about 1.5x "
                          "faster on a CPU), or in float32 at 224 px."),
        click.option("--pti-steps", type=click.IntRange(0, 100000), default=None,
                     show_default="0 (PhotoEditConfig.pti_steps)",
                     help="Pivotal tuning steps after a photo's projection (Roich et al.; 0: off): the edit then "
                          "renders with the generator tuned to the photo."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."),
        click.option("--force", is_flag=True, help="Overwrite existing outputs."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("source", type=str)
@click.option("--method", type=click.Choice(["nrsfm"]), default="nrsfm", help="Editing method.")
@click.option("--yaw", type=FiniteFloat(-90, 90), default=None,
              help="Head yaw to reach, degrees (+ = the head turns to its left) [default: unchanged].")
@click.option("--pitch", type=FiniteFloat(-89, 89), default=None,
              help="Head pitch to reach, degrees (+ = chin up) [default: unchanged].")
@click.option("--roll", type=FiniteFloat(-90, 90), default=None,
              help="Head roll to reach, degrees (+ = the face turns clockwise in the image) [default: unchanged].")
@click.option("--relative", is_flag=True,
              help="Read --yaw/--pitch/--roll as changes of the face's own angles (the paper's protocol; "
                   "|change| <= 60 / 40 / 45 degrees).")
@click.option("--expr", multiple=True, metavar="K=VALUE",
              help="Change of shape component K (1-based) in standard deviations; repeatable.")
@click.option("--face-index", type=click.IntRange(0), default=None, help="Face in a photo (0 = largest).")
@click.option("--feedback", type=click.IntRange(0, 5), default=1,
              help="Further edits whose asked angles are corrected by what eq. 11, fitted to the edited face's "
                   "landmarks, says was missed (phi misreads the pose of projected photos); the nearest is kept.")
@_edit_options
@workers_option
@compute_options
@fail_cleanly
def edit(source: str, method: str, yaw: float | None, pitch: float | None, roll: float | None, relative: bool,
         expr: tuple[str, ...],
         face_index: int | None, feedback: int, network: str, editor_path: Path | None, mode: str, metric: str,
         steps: int, lambda_id: float | None,
         detector: str, project_steps: int, fast: bool, pti_steps: int | None, out: Path, force: bool, workers: int,
         device: str, threads: int | None) -> None:
    """Edit head pose and expression of SOURCE (a seed, or a photo that is inverted first).

    CPU time on one core at 128 px: a linear edit of a seed takes about a second, a gradient edit (50 steps) tens of
    seconds; a photo is first projected into W (--project-steps: about a minute at 300 steps with default-2d).

    \b
    SOURCE may be a folder or a glob of photos (batch mode, resumable; OUT/<key>/ per photo, OUT/manifest.json):
      portrait3d edit 'photos/*.jpg' --yaw 20 --out edits --workers 2
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.nrsfm import run_edit
    from portrait3d.methods.nrsfm.edit import EditSpec, parse_expr

    spec = EditSpec(yaw=yaw, pitch=pitch, roll=roll, expr=parse_expr(expr), absolute=not relative)
    if spec.is_identity():
        raise UsageError("nothing to edit: give --yaw, --pitch, --roll or --expr")
    if wants_batch([source], seeds=True):
        check_batch_files(network, nrsfm=editor_path)
        task = EditTask(yaw=yaw, pitch=pitch, roll=roll, relative=relative, expr=tuple(expr), face_index=face_index,
                        network=network,
                        editor_path=editor_path, mode=mode, metric=metric, steps=steps, lambda_id=lambda_id,
                        feedback=feedback, detector=detector,
                        project_steps=project_steps, device=device, fast=fast, pti_steps=pti_steps)
        run_batch_command([source], out, task, desc="editing", config={"command": "edit", **task.__dict__},
                          workers=workers, force=force)
        return
    rec = run_edit(source, network, editor_path, spec, mode, steps, lambda_id, out, force, detector, project_steps,
                   face_index, device=device, metric=metric, feedback=feedback, fast=fast, pti_steps=pti_steps)
    _echo_edit_summary(rec, out)


@dataclass
class EditTask(ItemTask):
    """Batch ``edit``: one photo -> OUT/<key>/ holding what the single-photo command writes to OUT."""

    yaw: float | None
    pitch: float | None
    roll: float | None
    relative: bool
    expr: tuple[str, ...]
    face_index: int | None
    network: str
    editor_path: Path | None
    mode: str
    metric: str
    steps: int
    lambda_id: float | None
    detector: str
    project_steps: int
    device: str = "cpu"
    feedback: int = 1
    fast: bool = True
    pti_steps: int | None = None

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.interfaces.nrsfm import run_edit
        from portrait3d.methods.nrsfm.edit import EditSpec, parse_expr

        spec = EditSpec(yaw=self.yaw, pitch=self.pitch, roll=self.roll, expr=parse_expr(self.expr),
                        absolute=not self.relative)
        rec = run_edit(str(item.path), self.network, self.editor_path, spec, self.mode, self.steps, self.lambda_id,
                       out_dir, False, self.detector, self.project_steps, self.face_index, device=self.device,
                       metric=self.metric, feedback=self.feedback, fast=self.fast, pti_steps=self.pti_steps)
        return {k: rec[k] for k in ("identity_similarity_dlib", "head_pose_change_deg", "edit_seconds") if k in rec}


def _echo_edit_summary(rec: dict, out: Path) -> None:
    """What was asked, what was achieved (head pose measured by the face pipeline), warnings, where it went."""
    asked = rec.get("edit", {})
    angles = {k: asked.get(k) for k in ("yaw", "pitch", "roll") if asked.get(k) is not None}
    if angles:
        kind = asked.get("angles", "change")
        click.echo(f"asked ({kind}): " + ", ".join(f"{k} {v:+.1f} deg" for k, v in angles.items()))
    before, after = rec.get("head_pose_before_deg"), rec.get("head_pose_after_deg")
    if before is not None and after is not None:
        click.echo("achieved (face pipeline): " + ", ".join(
            f"{k} {b:+.1f} -> {a:+.1f} deg" for k, b, a in zip(("yaw", "pitch", "roll"), before, after)))
    click.echo(json.dumps({k: rec[k] for k in ("identity_similarity_dlib", "head_pose_change_deg", "edit_seconds")
                           if k in rec}))
    echo_notes(rec.get("notes", []) + rec.get("warnings", []), "warning")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("source", type=str)
@click.argument("target", type=str)
@click.option("--part", type=click.Choice(["pose", "expression", "all"]), default="pose",
              help="What TARGET takes from SOURCE.")
@_edit_options
@compute_options
@fail_cleanly
def transfer(source: str, target: str, part: str, network: str, editor_path: Path | None, mode: str, metric: str,
             steps: int, lambda_id: float | None, detector: str, project_steps: int, fast: bool,
             pti_steps: int | None, out: Path, force: bool, device: str, threads: int | None) -> None:
    """Give TARGET the pose and/or expression of SOURCE (each a seed or a photo).

    \b
    Examples:
      portrait3d transfer 7 42 --part pose --nrsfm editor.safetensors --out transfer/
      portrait3d transfer photo_a.jpg photo_b.jpg --part expression --nrsfm editor.safetensors --out t/
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.nrsfm import run_transfer

    rec = run_transfer(source, target, network, editor_path, part, mode, steps, lambda_id, out, force, detector,
                       project_steps, device=device, metric=metric, fast=fast, pti_steps=pti_steps)
    _echo_edit_summary(rec, out)

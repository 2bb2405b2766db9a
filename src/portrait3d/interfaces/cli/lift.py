"""LiftedGAN: lift."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from portrait3d.utils.batch import IMAGE_SUFFIXES, BatchItem, ItemTask, WorkerInfo, pick_device
from portrait3d.utils.compute import setup_compute


@main.command()
@click.argument("source", type=str)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--network", type=str, default="default-2d",
              help="2D StyleGAN2 checkpoint or built-in name the lifted model was trained on.")
@click.option("--lifted", "lifted_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="models/<network>/lifted.safetensors when shipped",
              help="Lifting model written by `portrait3d train lift`.")
@click.option("--yaw", "yaws", type=FiniteFloat(-90, 90), multiple=True, show_default="-60 -30 0 30 60",
              help="Yaw of a view in rotated.png, degrees within [-90, 90]; repeatable.")
@click.option("--light", type=str, default=None, metavar="X,Y",
              help="Extra light direction for relit.png, X and Y in [-1, 1] as D_L predicts them "
                   "(X > 0 lights from the image's left, Y > 0 from the top).")
@click.option("--face-index", type=click.IntRange(0), default=None,
              help="Which face when the photo has several (0 = largest) [required then].")
@click.option("--project-steps", type=click.IntRange(1, 100000), default=300, help="Projector steps for a photo.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT (batch mode: redo every input).")
@workers_option
@compute_options
@fail_cleanly
def lift(source: str, out: Path, network: str, lifted_path: Path | None, yaws: tuple[float, ...], light: str | None,
         face_index: int | None, project_steps: int, device: str, force: bool, workers: int,
         threads: int | None) -> None:
    """Lift SOURCE (a seed, a .npy latent or a photo) to 3D with LiftedGAN: rotate, relight, export a mesh.

    Writes image.png, rotated.png, relit.png, depth.png, normal.png, albedo.png, shading.png, mesh.obj,
    latent.npy and result.json (and aligned.png, projection.png for a photo) to OUT.

    CPU time on one core: a seed or latent takes seconds; a photo is first projected into W
    (--project-steps, 300 by default: about a minute with default-2d, measured 7 s for 30 steps, with a progress bar).

    \b
    SOURCE may be a folder or a glob of photos and .npy latents (batch mode, resumable; OUT/<key>/ each):
      portrait3d lift 'latents/*.npy' --lifted runs/lift/lifted.safetensors --out lifted --workers 2
    """
    device = setup_compute(device, threads)
    from portrait3d.interfaces.lift import run_lift

    if wants_batch([source], seeds=True):
        check_batch_files(network, lifted=lifted_path)
        task = LiftTask(network=network, lifted_path=lifted_path, yaws=tuple(yaws), light=light,
                        face_index=face_index, project_steps=project_steps, device=device)
        config = {"command": "lift", **{k: v for k, v in task.__dict__.items() if not k.startswith("_")}}
        config.pop("device")  # the same results on any device: resuming on another one is fine
        run_batch_command([source], out, task, desc="lifting", config=config, workers=workers, force=force,
                          suffixes=IMAGE_SUFFIXES | {".npy"})
        return
    rec = run_lift(source, out, network, lifted_path, yaws, light, force, face_index, project_steps, device=device)
    v, li = rec["view"], rec["light"]
    click.echo(f"view yaw {v['yaw_deg']:+.1f} pitch {v['pitch_deg']:+.1f} roll {v['roll_deg']:+.1f} deg, light "
               f"ambient {li['ambient']:.2f} diffuse {li['diffuse']:.2f} direction ({li['dx']:+.2f}, {li['dy']:+.2f})")
    echo_notes(rec.get("notes", []))
    click.echo(f"wrote {out}")


@dataclass
class LiftTask(ItemTask):
    """Batch ``lift``: one photo or .npy latent -> OUT/<key>/ holding what the single-input command writes."""

    network: str
    lifted_path: Path | None
    yaws: tuple[float, ...]
    light: str | None
    face_index: int | None
    project_steps: int
    device: str
    _device: str = field(default="cpu", init=False, repr=False)

    def setup(self, worker: WorkerInfo) -> None:
        self._device = pick_device(self.device, worker)  # 'cuda' -> this rank's / worker's GPU

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.interfaces.lift import run_lift

        rec = run_lift(str(item.path), out_dir, self.network, self.lifted_path, self.yaws, self.light, False,
                       self.face_index, self.project_steps, device=self._device)
        return {"view": rec.get("view"), "light": rec.get("light")}

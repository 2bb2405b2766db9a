"""PIE (Tewari et al. 2020): ``portrait3d pie PHOTO`` and ``portrait3d pie edit DIR``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.errors import UsageError
from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import (
    check_batch_files,
    run_batch_command,
    threads_option,
    wants_batch,
    workers_option,
)
from portrait3d.utils.batch import BatchItem, ItemTask, WorkerInfo
from portrait3d.utils.compute import setup_compute


class _PhotoOrCommand(click.Group):
    """``pie edit DIR`` runs the ``edit`` subcommand; ``pie PHOTO ...`` runs ``photo`` (any other first word)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["photo", *args]
        return super().resolve_command(ctx, args)


def _parse_expr(values: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        name, sep, num = v.partition("=")
        try:
            out[name.strip()] = float(num)
        except ValueError:
            raise UsageError(f"--expr takes NAME=VALUE (e.g. smile=1.5), not {v!r}") from None
        if not sep or not name.strip():
            raise UsageError(f"--expr takes NAME=VALUE (e.g. smile=1.5), not {v!r}")
    return out


def _parse_light(value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        x, y, z = (float(p) for p in value.split(","))
    except ValueError:
        raise UsageError(f"--light takes a direction x,y,z (x right, y up, z toward the viewer), not {value!r}") \
            from None
    return x, y, z


def _edit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--yaw", type=FiniteFloat(), default=None, help="Target head yaw in degrees (> 0: the head "
                     "turns to its left, the face pipeline's convention)."),
        click.option("--pitch", type=FiniteFloat(), default=None, help="Target head pitch in degrees (> 0: chin up)."),
        click.option("--expr", multiple=True, help="Expression coefficient NAME=VALUE in standard deviations "
                     "(repeatable; names: the face rig's, e.g. mouth_open, smile)."),
        click.option("--light", type=str, default=None, help="Light direction x,y,z (x right, y up, z toward "
                     "the viewer)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@main.group(cls=_PhotoOrCommand)
def pie() -> None:
    """PIE: embed a portrait (hierarchical W -> W+ with rig, identity and recognition energies) and edit its head
    pose, expression and light through the face rig's RigNets.

    \b
    Examples:
      portrait3d pie photo.jpg --yaw 20 --out out/pie
      portrait3d pie edit out/pie --yaw -10 --expr smile=1.5
    """


@pie.command("photo")
@click.argument("photo", type=str)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@_edit_options
@click.option("--network", type=str, default="default-2d", show_default=True,
              help="2D StyleGAN2 checkpoint or built-in name the RigNets were trained for.")
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with estimator.safetensors and rignet-<mode>.safetensors [the shipped ones].")
@click.option("--steps-w", type=click.IntRange(0), default=None, help="Steps in W [150].")
@click.option("--steps-wplus", type=click.IntRange(0), default=None, help="Steps in W+ [100].")
@click.option("--face-index", type=click.IntRange(0), default=None, help="Which face when the photo has several.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs in OUT.")
@workers_option
@threads_option
@fail_cleanly
def pie_photo(photo: str, out: Path, yaw: float | None, pitch: float | None, expr: tuple[str, ...],
              light: str | None, network: str, models: Path | None, steps_w: int | None, steps_wplus: int | None,
              face_index: int | None, force: bool, workers: int, threads: int | None) -> None:
    """Embed the face in PHOTO with PIE and apply the asked edit; writes input_aligned.png, reconstruction.png,
    edited.png, grid.png, embedding.npz and result.json to OUT.

    \b
    PHOTO may be a folder or a glob of photos (batch mode, resumable; OUT/<key>/ per photo, OUT/manifest.json):
      portrait3d pie 'photos/*.jpg' --yaw 20 --out pie_batch --workers 2
    """
    from portrait3d.interfaces.pie import EditSpec, run_pie

    setup_compute("cpu", threads)
    spec = EditSpec(yaw, pitch, _parse_expr(expr), _parse_light(light))
    if wants_batch([photo]):
        check_batch_files(network)
        task = PieTask(yaw=yaw, pitch=pitch, expr=expr, light=light, network=network, models=models,
                       steps_w=steps_w, steps_wplus=steps_wplus, face_index=face_index)
        run_batch_command([photo], out, task, desc="PIE", workers=workers, force=force,
                          config={"command": "pie", **{k: v for k, v in task.__dict__.items() if k[0] != "_"},
                                  "models": None if models is None else str(models)})
        return
    res = run_pie(Path(photo), out, spec, network=network, models=models, steps_w=steps_w, steps_wplus=steps_wplus,
                  face_index=face_index, force=force)
    click.echo(json.dumps({k: res[k] for k in ("seconds", "measured") if k in res}, indent=1))
    click.echo(f"wrote {out}")


@dataclass
class PieTask(ItemTask):
    """Batch ``pie``: one photo -> OUT/<key>/ holding what the single-photo command writes to OUT. Each worker
    loads the generator, estimator, RigNets and the identity network once."""

    yaw: float | None
    pitch: float | None
    expr: tuple[str, ...]
    light: str | None
    network: str
    models: Path | None
    steps_w: int | None
    steps_wplus: int | None
    face_index: int | None
    _emb: Any = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_emb": None}  # workers load their own models

    def setup(self, worker: WorkerInfo) -> None:
        from portrait3d.interfaces.pie import load_embedder

        self._emb = load_embedder(self.network, self.models)

    def run(self, item: BatchItem, out_dir: Path) -> dict[str, Any]:
        from portrait3d.interfaces.pie import EditSpec, run_pie

        spec = EditSpec(self.yaw, self.pitch, _parse_expr(self.expr), _parse_light(self.light))
        res = run_pie(item.path, out_dir, spec, network=self.network, models=self.models, steps_w=self.steps_w,
                      steps_wplus=self.steps_wplus, face_index=self.face_index, progress=False, embedder=self._emb)
        m = res["measured"]
        last = "edited" if "edited" in m else "reconstruction"
        return {"identity_distance": m[last].get("identity_distance"), "yaw_deg": m[last].get("yaw_deg"),
                "embed_seconds": res["seconds"]["embed"]}


@pie.command("edit")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_edit_options
@threads_option
@fail_cleanly
def pie_edit(folder: Path, yaw: float | None, pitch: float | None, expr: tuple[str, ...], light: str | None,
             threads: int | None) -> None:
    """Edit an existing PIE embedding in FOLDER again (no re-embedding); rewrites edited.png, grid.png, edit.json."""
    from portrait3d.interfaces.pie import EditSpec, run_pie_edit

    setup_compute("cpu", threads)
    res = run_pie_edit(folder, EditSpec(yaw, pitch, _parse_expr(expr), _parse_light(light)))
    click.echo(json.dumps({"edit_seconds": res["edit_seconds"], "measured": res["measured"]}, indent=1))

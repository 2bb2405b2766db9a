"""PIE (Tewari et al. 2020): ``portrait3d pie PHOTO`` and ``portrait3d pie edit DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.errors import UsageError
from portrait3d.interfaces.cli.base import FiniteFloat, fail_cleanly, main
from portrait3d.interfaces.cli.options import threads_option
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
@click.argument("photo", type=click.Path(path_type=Path))
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
@threads_option
@fail_cleanly
def pie_photo(photo: Path, out: Path, yaw: float | None, pitch: float | None, expr: tuple[str, ...],
              light: str | None, network: str, models: Path | None, steps_w: int | None, steps_wplus: int | None,
              face_index: int | None, force: bool, threads: int | None) -> None:
    """Embed the face in PHOTO with PIE and apply the asked edit; writes input_aligned.png, reconstruction.png,
    edited.png, grid.png, embedding.npz and result.json to OUT."""
    from portrait3d.interfaces.pie import EditSpec, run_pie

    setup_compute("cpu", threads)
    spec = EditSpec(yaw, pitch, _parse_expr(expr), _parse_light(light))
    res = run_pie(photo, out, spec, network=network, models=models, steps_w=steps_w, steps_wplus=steps_wplus,
                  face_index=face_index, force=force)
    click.echo(json.dumps({k: res[k] for k in ("seconds", "measured") if k in res}, indent=1))
    click.echo(f"wrote {out}")


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

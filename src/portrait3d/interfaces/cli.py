"""The ``portrait3d`` command line (click). Every command exits 2 with a one-line error on bad input."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from portrait3d.checkpoints.safe_pickle import CheckpointError


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``error: ...`` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError,
                ValueError) as e:
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
@click.option("--samples", type=click.IntRange(1, 64), default=8, help="Number of faces.")
@click.option("--seed", type=int, default=0, help="Random seed.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=0.7, help="Truncation psi.")
@click.option("--force", is_flag=True, help="Write into OUT even if it already holds files.")
@_fail_cleanly
def demo(out: Path, network_2d: str, network_3d: str, samples: int, seed: int, truncation: float,
         force: bool) -> None:
    """Sample faces, rotate them in 3D and show depth, on the built-in models (CPU friendly)."""
    from portrait3d.interfaces.demo import run_demo

    run_demo(out, network_2d, network_3d, samples, seed, truncation, force)


if __name__ == "__main__":
    main()

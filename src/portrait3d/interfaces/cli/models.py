"""Checkpoint commands: convert and info."""

from __future__ import annotations

import json
from pathlib import Path

import click

from portrait3d.interfaces.cli.base import fail_cleanly, main


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@fail_cleanly
def convert(src: Path, dst: Path, force: bool) -> None:
    """Convert a checkpoint (NVIDIA .pkl, rosinality .pt, ours) to portrait3d's .safetensors format.

    \b
    Examples:
      portrait3d convert ffhq512-128.pkl eg3d_ffhq.safetensors     # NVIDIA EG3D / StyleGAN2 pickle
      portrait3d convert stylegan2-ffhq-config-f.pt ffhq.safetensors  # rosinality checkpoint
    """
    from portrait3d.checkpoints import load_network, save_network

    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass --force to overwrite)")
    net = load_network(src)
    save_network(net, dst, overwrite=force)
    click.echo(f"wrote {dst} ({type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters)")


@main.command()
@click.argument("network", type=str)
@fail_cleanly
def info(network: str) -> None:
    """Print the architecture and configuration of a checkpoint.

    \b
    Examples:
      portrait3d info default-2d
      portrait3d info eg3d_ffhq.safetensors
    """
    from portrait3d.checkpoints import load_network

    net = load_network(network)
    cfg = net.config.to_dict()
    click.echo(json.dumps({"class": type(net).__name__, "num_ws": net.num_ws,
                           "parameters": sum(p.numel() for p in net.parameters()), "config": cfg}, indent=1))

"""Issue 13's geometry acceptance for an EG3D generator, measured by the face pipeline.

    python bench/eval_geometry3d.py default-3d --n 200 --json geometry.json

Prints detection at yaw -30 / 0 / +30, the slope of measured against commanded yaw, the fraction of latents that
keep their identity at +-30 degrees, the fraction of depth maps with the nose nearer than the cheeks, and the
parallax of the turned views against the 3D mean face's (see :mod:`portrait3d.metrics.geometry3d`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from portrait3d.checkpoints import load_network
from portrait3d.metrics.geometry3d import geometry_checks
from portrait3d.utils.io import write_json


@click.command(context_settings={"show_default": True})
@click.argument("network", type=str)
@click.option("--n", type=click.IntRange(1), default=200, help="Latents.")
@click.option("--seed", type=int, default=0)
@click.option("--truncation", type=click.FloatRange(0, 1), default=0.7)
@click.option("--threads", type=click.IntRange(1), default=1)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(network: str, n: int, seed: int, truncation: float, threads: int, json_path: Path | None) -> None:
    torch.set_num_threads(threads)
    G = load_network(network).eval().requires_grad_(False)
    rep = geometry_checks(G, n=n, seed=seed, truncation_psi=truncation, progress=True).to_dict()
    click.echo(json.dumps(rep, indent=1))
    if json_path is not None:
        write_json(json_path, {"network": network, "seed": seed, "truncation": truncation, **rep}, overwrite=True)


if __name__ == "__main__":
    main()

"""Seconds per photo of the W_tri encoder (Oh & Jo) against optimisation + PTI (issue 16's speed acceptance).

On one aligned photo and its face-pipeline camera, in one run:

* **encoder**: the W_tri encoder's ReStyle iterations (``--iterations``, 5 by default) at the generator's resolution,
  in bf16 autocast as ``portrait3d encode3d`` runs it. With ``--encoder`` a trained file; without, an encoder of the
  same architecture with random weights (the time does not depend on the weights);
* **optimiser + PTI**: Ko et al.'s Algorithm 1 (``invert3d``'s defaults: 400 steps, fast renders) and pivotal
  tuning (350 steps), the optimisation route the encoder replaces.

Prints the median of ``--repeats`` encoder runs, the optimiser's time and their ratio (issue 16 asks <= 0.5 s per
photo at 2 threads and a ratio >= 100).

    PYTHONPATH=src python bench/bench_wtri_speed.py --threads 2
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits" / "deepface" / "img1.jpg"


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-3d")
@click.option("--photo", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=PHOTO)
@click.option("--encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A trained W_tri encoder [random weights of the default architecture].")
@click.option("--iterations", type=click.IntRange(1, 20), default=5)
@click.option("--repeats", type=click.IntRange(1), default=5)
@click.option("--steps", type=click.IntRange(1), default=400, help="Algorithm 1 steps.")
@click.option("--pti-steps", type=click.IntRange(0), default=350)
@click.option("--threads", type=click.IntRange(1), default=2)
def main(network: str, photo: Path, encoder: Path | None, iterations: int, repeats: int, steps: int,
         pti_steps: int, threads: int) -> None:
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.interfaces.encode3d import load_wtri_encoder
    from portrait3d.methods.inversion3d.optimize import invert
    from portrait3d.methods.inversion3d.pipeline import (
        face_landmarks68,
        load_generator,
        make_inversion_config,
        to_tensor,
    )
    from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig

    torch.set_num_threads(threads)
    dev = torch.device("cpu")
    G, _ = load_generator(network, dev)
    enc = (load_wtri_encoder(Path(encoder), G, network) if encoder is not None else
           WTriEncoder(WTriEncoderConfig.for_generator(G, iterations=iterations)).eval())
    with FacePipeline(style="default", output_size=int(G.img_resolution)) as pipe:
        face = pipe(load_image(photo))
    target = to_tensor(face.aligned.image, dev)
    camera = face.camera.reshape(1, 25).float()

    def encode() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            enc.invert(G, target, camera, iterations=iterations, keep_images=False, deterministic=True)

    encode()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encode()
        times.append(time.perf_counter() - t)
    t_enc = statistics.median(times)
    cfg = make_inversion_config(1, steps, pti_steps > 0, pti_steps or None, None, fast=True)
    t = time.perf_counter()
    invert(G, target, None, camera, cfg, landmarks=face_landmarks68(face), progress=False)
    t_opt = time.perf_counter() - t
    weights = str(encoder) if encoder is not None else "random weights, default architecture"
    click.echo(f"{network}, {photo.name}, {threads} thread(s), encoder: {weights}")
    click.echo("| route | s / photo |")
    click.echo("|---|---|")
    click.echo(f"| W_tri encoder, {iterations} iterations (bf16, median of {repeats}) | {t_enc:.3f} |")
    click.echo(f"| Algorithm 1 ({steps} steps) + PTI ({pti_steps} steps) | {t_opt:.1f} |")
    click.echo(f"ratio (this run): optimiser + PTI / encoder = {t_opt / t_enc:.0f}x")


if __name__ == "__main__":
    main()

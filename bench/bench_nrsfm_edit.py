"""Seconds per NRSfM edit on CPU: linear (eq. 14) vs gradient (eq. 15, 50 steps, identity term).

    python bench/bench_nrsfm_edit.py --network default-2d --nrsfm EDITOR.safetensors
    python bench/bench_nrsfm_edit.py                       # builds a small editor first (timing only)

Times one latent at a time (the CLI's case), after a warm-up, median of --repeats; prints the
gradient/linear ratio measured in this run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import torch


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-2d")
@click.option("--nrsfm", "editor_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--space", type=click.Choice(["z", "w", "w+"]), default="w")
@click.option("--steps", type=int, default=50)
@click.option("--repeats", type=int, default=5)
@click.option("--threads", type=int, default=2)
def main(network: str, editor_path: Path | None, space: str, steps: int, repeats: int, threads: int) -> None:
    from portrait3d.checkpoints import load_network
    from portrait3d.losses.identity import IdentityLoss
    from portrait3d.methods.nrsfm.data import ImageLandmarker, LandmarkDataConfig, sample_latents, synthesize
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.methods.nrsfm.editor import BuildConfig, NRSfMEditor, build_editor
    from portrait3d.methods.nrsfm.regressor import RegressorConfig
    from portrait3d.utils.visualize import to_uint8

    torch.set_num_threads(threads)
    G = load_network(network).eval().requires_grad_(False)
    if editor_path is None:
        cfg = BuildConfig(data=LandmarkDataConfig(num_samples=300, space=space, detector="template"), num_basis=8,
                          regressor=RegressorConfig(epochs=5))
        editor, _ = build_editor(G, cfg, progress=False)
    else:
        editor = NRSfMEditor.load(editor_path)
    times: dict[str, list[float]] = {"linear": [], "gradient": []}
    with ImageLandmarker("dlib", "template") as lmk:
        for r in range(repeats + 1):
            w = sample_latents(G, 1, editor.space, seed=r).reshape(1, -1)
            q = editor.target(w, EditSpec(yaw=20.0))
            for mode in ("linear", "gradient"):
                t0 = time.perf_counter()
                id_loss = None
                if mode == "gradient":
                    with torch.no_grad():
                        img = synthesize(G, w, editor.space)
                    lm, _ = lmk(to_uint8(img))
                    id_loss = IdentityLoss(img, lm * G.img_resolution - 0.5)
                editor.edit(G, w, q, mode, steps=steps, identity_loss=id_loss)
                if r:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
    lin, grad = statistics.median(times["linear"]), statistics.median(times["gradient"])
    print(f"network {network} ({G.img_resolution} px), space {editor.space}, threads {threads}")
    print(f"linear (eq. 14):            {lin:.3f} s per edit")
    print(f"gradient (eq. 15, {steps} steps): {grad:.3f} s per edit")
    print(f"gradient / linear: {grad / lin:.1f}x")


if __name__ == "__main__":
    main()

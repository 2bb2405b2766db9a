"""Ship PIE's parameter estimator: float16 weights, held-out evaluation, a fit grid and a model card.

    PYTHONPATH=src python bench/make_pie_card.py ~/.cache/portrait3d/runs/pie-est \
        --holdout ~/.cache/portrait3d/utkface128-holdout --out src/portrait3d/models/pie --force

Writes ``estimator.safetensors`` (float16), ``estimator_fit.png`` (held-out photos | rig render over them) and
``MODEL_CARD.md`` into ``--out``. The landmark error is the mean distance of all 468 projected rig vertices to
MediaPipe's mesh of the photo; the photometric error is the mean absolute colour difference (0-255) on the rendered
face; both beside the closed-form fit of the rig to each photo's mesh (what the estimator was partly trained
towards).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints.native import atomic_write  # noqa: E402
from portrait3d.methods.pie.estimator import ParamEstimator  # noqa: E402
from portrait3d.methods.pie.face_model import FaceModel  # noqa: E402
from portrait3d.methods.pie.train import _grid, evaluate_estimator, fit_targets  # noqa: E402
from portrait3d.utils.visualize import from_uint8  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--holdout", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--n", type=click.IntRange(10), default=300, help="Held-out photos to evaluate.")
@click.option("--hardware", type=str, default="1 core of a 2-core Xeon CPU with AMX-BF16 (bf16 backbone)")
@click.option("--force", is_flag=True)
def main(run: Path, holdout: Path, out: Path, n: int, hardware: str, force: bool) -> None:
    torch.set_num_threads(1)
    cfg = json.loads((run / "config.json").read_text())["config"]
    est = ParamEstimator.load(run / "estimator.safetensors")
    rig = FaceModel.load(cfg["rig"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.startswith('{"step"')]
    seen = int(log[-1]["kimg"] * 1000) if log else 0
    train_s = sum(r.get("sec", 0.0) for r in log)
    data = fit_targets(holdout, n, rig, progress=True)  # meshes and fits once, for both precisions
    ev = evaluate_estimator(est, rig, holdout, data=data)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("estimator.safetensors", "estimator_fit.png", "MODEL_CARD.md"):
        if (out / name).exists() and not force:
            raise click.ClickException(f"{out / name} exists (pass --force)")
    est.save(out / "estimator.safetensors", overwrite=True, meta={"images_seen": seen, "rig": cfg["rig"]}, half=True)
    ev16 = evaluate_estimator(ParamEstimator.load(out / "estimator.safetensors"), rig, holdout, data=data)

    images = np.load(holdout / "images.npy", mmap_mode="r")
    pick = np.linspace(0, len(images) - 1, 8).round().astype(int)
    batch = {"image": from_uint8(np.stack([np.asarray(images[i]) for i in pick]))}
    _grid(out / "estimator_fit.png", rig, ParamEstimator.load(out / "estimator.safetensors"), batch)
    command = "PYTHONPATH=src python bench/make_pie_card.py " + shlex.join(sys.argv[1:])
    card = f"""# Model card: PIE parameter estimator (`estimator.safetensors`)

theta(I): a MoFA-style CNN (ResNet, {est.config.layers} blocks, width {est.config.width}, GroupNorm; input
{est.config.input_size} px) from an aligned portrait to the parameters of the shipped face rig (`models/face-rig`):
{est.config.identity} identity, {est.config.expression} expression and {est.config.albedo} albedo coefficients, 27 SH
light coefficients, head pose and translation. PIE's energies use it on generated images, so it is differentiable.

## Training

- Data: {cfg['count']:,} UTKFace training photos (aligned 128 px; the held-out split is never used), each with
  MediaPipe's 468-point mesh and the closed-form fit of the rig to it (`portrait3d.methods.pie.estimator.rig_targets`).
- Losses: landmarks (all 468 projected vertices against the mesh), photometric on the rendered face, the statistical
  regulariser, and a weight-{cfg['weights']['parameters']} pull towards the closed-form fit
  (`portrait3d.methods.pie.estimator`).
- {seen:,} images seen, batch {cfg['batch']}, Adam lr {cfg['lr']}; {train_s / 60:.0f} min of training steps on {hardware}.
- Command: `portrait3d train pie-estimator --data DATA --out RUN --count {cfg['count']} --kimg {cfg['total_kimg']:g}
  --holdout HOLDOUT --threads 1`.
- Weights stored in float16.

## Held-out evaluation

{int(ev16['faces'])} held-out UTKFace photos with a MediaPipe face (of {int(ev16['photos'])}), float16 weights:

| | estimator | closed-form fit to the photo's mesh |
|---|---|---|
| landmark error (px at 128 px, mean over 468 points) | {ev16['landmark_px']:.2f} | {ev16['landmark_px_closed_form_fit']:.2f} |
| photometric error (0-255, mean absolute on the rendered face) | {ev16['photometric_0_255']:.1f} | |
| yaw difference to the fit (deg) | {ev16['yaw_vs_fit_deg']:.2f} | |

(float32 weights: landmark {ev['landmark_px']:.2f} px, photometric {ev['photometric_0_255']:.1f}.)
Measured with

    {command}

![fit](estimator_fit.png)

`estimator_fit.png`: held-out photos and the rig rendered from the estimator's parameters over them.

## Limitations

- The rig covers the face only (no hair, ears, teeth); its renders are for losses and overlays.
- Trained on UTKFace's aligned crops: other crops need the same alignment (`FacePipeline(style='default')`).
- UTKFace is for **non-commercial research use only**; this model inherits that restriction.

Generated {time.strftime('%Y-%m-%d')}.
"""
    atomic_write(out / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card), overwrite=True)
    print(json.dumps({"fp32": ev, "fp16": ev16}, indent=1))


if __name__ == "__main__":
    main()

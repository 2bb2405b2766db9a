"""Ship a trained RigNet: float16 weights beside the PIE estimator and a card with its evaluation (pose:
bench/eval_pie.py on held-out photos; expression and light: bench/eval_rignet.py on generator samples).

    PYTHONPATH=src python bench/make_rignet_card.py ~/.cache/portrait3d/runs/rignet-pose \
        --eval bench_out/pie --out src/portrait3d/models/pie --force

Writes ``rignet-<mode>.safetensors`` (float16), ``MODEL_CARD_rignet-<mode>.md`` and ``rignet-<mode>_edits.png``
(the evaluation grid) into ``--out``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.methods.pie.rignet import RigNet  # noqa: E402
from portrait3d.utils.io import write_text  # noqa: E402


def _copy_grid(src: Path, dst: Path, max_rows: int = 8) -> None:
    """The evaluation grid, cut to its first ``max_rows`` rows (128 px each at the built-in models' size) so the
    shipped picture stays small."""
    from PIL import Image

    with Image.open(src) as im:
        row = im.width // max(1, round(im.width / 128))  # square tiles: a row is one tile high
        if im.height > max_rows * row:
            im = im.crop((0, 0, im.width, max_rows * row))
        im.save(dst)


def _pose_evaluation(eval_dir: Path) -> tuple[str, Path, str]:
    ev = json.loads((eval_dir / "eval_pie.json").read_text())
    table = (eval_dir / "eval_pie.md").read_text().strip()
    text = f"""## Evaluation on held-out photos

{ev['n']} held-out UTKFace photos, PIE embeddings of {ev['steps'][0]} W + {ev['steps'][1]} W+ steps (the CLI default
is 150 + 100), yaw edits of -{ev['delta']:g} and +{ev['delta']:g} degrees relative to the reconstruction (one feedback
step), measured by the face pipeline (MediaPipe, dlib 68 points, PnP); identity: dlib distance of the edit to the
photo (< 0.6: the same person):

{table}

Measured with `PYTHONPATH=src python bench/eval_pie.py --holdout HOLDOUT --models MODELS --n {ev['n']}
--steps-w {ev['steps'][0]} --steps-wplus {ev['steps'][1]}`.
"""
    grid = (f"per row a held-out photo, its PIE reconstruction, and the edits to -{ev['delta']:g} and "
            f"+{ev['delta']:g} degrees.")
    return text, eval_dir / "grid_full.png", grid


def _sample_evaluation(eval_dir: Path, mode: str) -> tuple[str, Path, str]:
    ev = json.loads((eval_dir / "eval_rignet.json").read_text())
    table = (eval_dir / "eval_rignet.md").read_text().strip()
    what = (f"each expression coefficient set to -{ev['value']:g} and +{ev['value']:g} standard deviations"
            if mode == "expression" else "a directional light from the left, the right, above and below")
    text = f"""## Evaluation on generator samples

{ev['n']} samples of the generator (seeds apart from training), edited with {what} (one feedback step, as
`portrait3d pie edit`). *Reached*: the share of the asked parameter change that the estimator measures on the
edit (the network RigNet was trained through: optimistic). The independent check uses MediaPipe's mesh (not used
in training). Identity: dlib distance of the edit to the unedited sample (< 0.6: the same person).

{table}

Measured with `PYTHONPATH=src python bench/eval_rignet.py --models MODELS --mode {mode} --n {ev['n']}`.
"""
    reached = [v["reached"] for v in ev["summary"].values()]
    if reached and max(reached) < 0.5:
        text += (f"\nThe edits are weak: the estimator finds {min(reached):.0%}-{max(reached):.0%} of the asked "
                 "change on the edited images (training targets are other samples' parameters, mostly within one "
                 "standard deviation; StyleRig trains far longer).\n")
    return text, eval_dir / "grid.png", "per row a sample, then its edits in the order of the table."


@click.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--eval", "eval_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Output folder of bench/eval_pie.py (pose) or bench/eval_rignet.py (expression, light) run with "
                   "this RigNet.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--hardware", type=str, default="1 core of a 2-core Xeon CPU with AMX-BF16 (bf16 generator passes)")
@click.option("--force", is_flag=True)
def main(run: Path, eval_dir: Path, out: Path, hardware: str, force: bool) -> None:
    cfg = json.loads((run / "config.json").read_text())["config"]
    mode = cfg["mode"]
    net = RigNet.load(run / f"rignet-{mode}.safetensors")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.startswith('{"step"')]
    seen = int(log[-1]["kimg"] * 1000) if log else 0
    minutes = sum(r.get("sec", 0.0) for r in log) / 60
    if mode == "pose":
        evaluation, grid, grid_text = _pose_evaluation(eval_dir)
    else:
        evaluation, grid, grid_text = _sample_evaluation(eval_dir, mode)
    targets = (f"; {cfg['uniform_pose_share']:.0%} of the targets have yaw and pitch drawn uniformly within "
               f"+-{cfg['uniform_pose_deg']:g} degrees, the others are another sample's" if mode == "pose"
               else f"; the targets are another sample's {mode} parameters")
    names = [f"rignet-{mode}.safetensors", f"MODEL_CARD_rignet-{mode}.md", f"rignet-{mode}_edits.png"]
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise click.ClickException(f"{out / clash[0]} exists (pass --force)")
    out.mkdir(parents=True, exist_ok=True)
    net.save(out / names[0], overwrite=True, half=True, meta={"images_seen": seen, "network": cfg["network"]})
    _copy_grid(grid, out / names[2])
    card = f"""# Model card: PIE RigNet for {mode} (`{names[0]}`)

StyleRig's RigNet (Tewari et al. 2020) for the `{mode}` parameters of the shipped face rig, editing the W+ space of
`{cfg['network']}`: per layer a linear encoder to 32 dimensions, concatenated with the target parameters, and a
linear decoder to an offset of w (`portrait3d.methods.pie.rignet`).

## Training

- Self-supervised on {seen:,} latents of `{cfg['network']}` (truncation {cfg['truncation']}), through the shipped
  parameter estimator and the rig renderer: reconstruction, edit and consistency losses (weights
  {cfg['rec_weight']} / {cfg['edit_weight']} / {cfg['consist_weight']}){targets}.
- Adam, lr {cfg['lr']}, batch {cfg['batch']}; {minutes:.0f} min of training steps on {hardware}.
- Command: `portrait3d train rignet --estimator src/portrait3d/models/pie/estimator.safetensors --mode {mode}
  --out RUN --kimg {cfg['total_kimg']:g} --batch {cfg['batch']} --lr {cfg['lr']:g}`.
- Weights stored in float16.

{evaluation}
This card by `PYTHONPATH=src python bench/make_rignet_card.py {shlex.join(sys.argv[1:])}`.

![edits]({names[2]})

`{names[2]}`: {grid_text}

## Limitations

- A few minutes of CPU training: StyleRig trains for days. See the table for how much of an edit arrives and how
  often identity is kept; the edited faces inherit `{cfg['network']}`'s blur and demographic gaps (its card).
- UTKFace-derived (the rig and the estimator): **non-commercial research use only**.

Generated {time.strftime('%Y-%m-%d')}.
"""
    write_text(out / names[1], card, overwrite=True)
    print(f"wrote {', '.join(names)} to {out}")


if __name__ == "__main__":
    main()

"""Seconds per image of 3D GAN inversion (Ko et al., WACV 2023): initialisation vs. Algorithm 1 vs. Algorithm 1 + PTI.

One real photo is aligned once (:class:`~portrait3d.face.pipeline.FacePipeline`, ``--align auto`` as
``portrait3d invert3d``; not timed in the rows), then each of these is timed ``--repeats`` times
(median and min printed) after one short untimed warm-up run that loads the perceptual / identity
networks:

* **init**: the encoder-only initialisation ``E(x)`` (``--encoder``; plus ``P.camera(x)`` with
  ``--pose``) -- the feed-forward result Ko et al. compare against; without ``--encoder`` the
  "w_avg init" instead: :func:`~portrait3d.methods.projector.projector.compute_w_stats` with the
  optimiser's sample count, which is what the optimiser computes when no encoder is given (plus
  ``P.camera(x)`` with ``--pose``; the face pipeline's camera is part of the alignment);
* **Alg. 1**: ``E(x)`` / ``P(x)`` where given + :func:`~portrait3d.methods.inversion3d.optimize.invert`
  (Algorithm 1, ``--steps``, no PTI; without an encoder ``invert`` computes ``w_avg`` itself, in its
  ``setup`` phase, so the init is counted once);
* **Alg. 1 + PTI**: the same with pivotal tuning (``--pti-steps``);
* **Alg. 1, exact renders**: Algorithm 1 with every optimisation render as the model was trained (fp32, its own
  samples per ray); the rows above use ``invert3d``'s default fast renders (bf16, 12+12 samples per ray).

Per-phase medians of ``invert``'s own timings (setup, latent, camera, pti, render) are printed too.

The ratios printed are measured within this run (same machine, same load): they travel better
than the absolute seconds. On CPU set ``--threads`` to the free cores (default 1: the machine this
was written on was shared with a training job).

Run from the repository root::

    PYTHONPATH=src python bench/bench_inversion3d.py --steps 5 --pti-steps 2 --repeats 2
    PYTHONPATH=src python bench/bench_inversion3d.py --network eg3d.pkl --encoder E.safetensors \\
        --pose P.safetensors --json inversion3d_times.json
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import click
import torch

from portrait3d.methods.inversion3d.pipeline import (
    face_landmarks68,
    initialise,
    load_networks,
    make_inversion_config,
    resolve_align,
    to_tensor,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UTK = REPO.parent / "shared" / "data" / "utkface"
DEFAULT_HOLDOUT = Path("~/.cache/portrait3d/utkface128/holdout.txt").expanduser()
HOLDOUT_EVERY = 20


def default_photo() -> Path:
    """The first held-out UTKFace photo (``holdout.txt``, else ``photos[19]`` of the sorted listing)."""
    if DEFAULT_HOLDOUT.is_file():
        for ln in DEFAULT_HOLDOUT.read_text().splitlines():
            if ln.strip():
                return DEFAULT_UTK / ln.strip()
    photos = sorted(p for p in DEFAULT_UTK.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return photos[HOLDOUT_EVERY - 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())`` (CUDA synchronised)."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--network", default="default-3d", help="EG3D checkpoint path or built-in name.")
@click.option("--photo", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              show_default="first held-out UTKFace photo", help="Photo to invert.")
@click.option("--align", type=click.Choice(["auto", "default", "eg3d", "ffhq"]), default="auto",
              help="Crop style: auto = 'default' for built-in networks, 'eg3d' otherwise.")
@click.option("--encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LatentEncoder file (default: time the w_avg initialisation instead).")
@click.option("--pose", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PoseEstimator file (default: the face pipeline's camera, computed with the alignment).")
@click.option("--steps", type=click.IntRange(min=1), default=None, show_default="InversionConfig default (300)",
              help="Algorithm 1 steps.")
@click.option("--pti-steps", type=click.IntRange(min=1), default=None, show_default="PTIConfig default (350)",
              help="Pivotal-tuning steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, help="Timed runs of each (median reported).")
@click.option("--warmup/--no-warmup", default=True, help="One short untimed run first (loads the loss networks).")
@click.option("--seed", type=int, default=0, help="Optimiser seed.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch.set_num_threads.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--progress/--no-progress", default=True, help="Progress bar over the timed runs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the timings as JSON.")
def main(network: str, photo: Path | None, align: str, encoder: Path | None, pose: Path | None, steps: int | None,
         pti_steps: int | None, repeats: int, warmup: bool, seed: int, threads: int, device: str, progress: bool,
         json_path: Path | None) -> None:
    """Time encoder / w_avg initialisation, Algorithm 1, and Algorithm 1 + PTI on one photo."""
    from tqdm import tqdm

    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.inversion3d.optimize import InversionConfig, invert
    from portrait3d.methods.projector.projector import compute_w_stats

    torch.set_num_threads(threads)
    dev = torch.device(device)
    G, enc, P = load_networks(network, encoder, pose, dev)
    align = resolve_align(align, network)
    photo = photo or default_photo()

    t0 = time.perf_counter()
    with FacePipeline(style=align, output_size=int(G.img_resolution)) as pipe:
        face = pipe(load_image(photo))
    t_align = time.perf_counter() - t0
    lm = face_landmarks68(face)
    target = to_tensor(face.aligned.image, dev)

    def make_cfg(pti: bool, n_steps: int | None = steps, n_pti: int | None = pti_steps,
                 fast: bool = True) -> InversionConfig:
        return make_inversion_config(1, n_steps, pti, n_pti, seed, fast=fast)

    cfg_plain, cfg_pti, cfg_exact = make_cfg(False), make_cfg(True), make_cfg(False, fast=False)

    def prepare() -> tuple[torch.Tensor | None, torch.Tensor]:
        """Initial ``(ws or None, camera)`` as handed to ``invert`` (which computes w_avg itself for None)."""
        ws0, cam, _ = initialise(G, target, face.camera, enc, P)
        return ws0, cam

    @torch.no_grad()
    def init_row() -> None:
        """The timed initialisation row: E(x) [+ P(x)], or w_avg [+ P(x)] as ``invert`` computes it."""
        ws0, cam = prepare()
        if ws0 is None:
            compute_w_stats(G, cfg_plain.w_avg_samples, cfg_plain.w_avg_seed, c=cam)

    def run(cfg: InversionConfig) -> dict[str, float]:
        ws0, cam0 = prepare()
        res = invert(G, target, ws0, cam0, cfg, landmarks=lm, progress=False)
        return res.timings

    init_name = ("encoder E(x)" if enc is not None else "w_avg init") + (" + P(x)" if P is not None else "")
    names = (init_name, f"Alg. 1 ({cfg_plain.steps} steps)",
             f"Alg. 1 ({cfg_pti.steps} steps) + PTI ({cfg_pti.pti_config.steps} steps)",
             f"Alg. 1 ({cfg_exact.steps} steps), exact renders")
    loss_desc = ""
    if warmup:
        warm = make_cfg(True, 2, 1)
        ws0, cam0 = prepare()
        loss_desc = invert(G, target, ws0, cam0, warm, landmarks=lm, progress=False).loss_description

    times: dict[str, list[float]] = {n: [] for n in names}
    breakdown: dict[str, list[dict[str, float]]] = {n: [] for n in names[1:]}
    bar = tqdm(total=4 * repeats, desc="timing", unit="run", disable=not progress)
    for _ in range(repeats):  # interleaved, so slow drifts in the machine's load hit all three alike
        t, _ = timed(init_row, dev)
        times[names[0]].append(t)
        bar.update(1)
        for name, cfg in ((names[1], cfg_plain), (names[2], cfg_pti), (names[3], cfg_exact)):
            t, tim = timed(lambda: run(cfg), dev)
            times[name].append(t)
            breakdown[name].append(tim)
            bar.update(1)
    bar.close()

    med = {n: statistics.median(v) for n, v in times.items()}
    rows = []
    for i, n in enumerate(names):
        per_step = None
        if i in (1, 3):
            per_step = med[n] / cfg_plain.steps
        elif i == 2:
            per_step = med[n] / (cfg_pti.steps + cfg_pti.pti_config.steps)
        rows.append({"method": n, "median_s": med[n], "min_s": min(times[n]), "runs_s": times[n],
                     "per_step_s": per_step, "x_init": med[n] / med[names[0]] if med[names[0]] > 0 else math.inf})
    phase_medians = {n: {k: statistics.median(b[k] for b in bs) for k in bs[0]} for n, bs in breakdown.items()}

    click.echo("")
    click.echo(f"network {network} ({G.img_resolution} px), photo {photo.name} (alignment '{align}', "
               f"{t_align:.2f} s, not counted), {threads} thread(s), device {device}, {repeats} repeat(s)"
               f"{', after a warm-up run' if warmup else ''}")
    if loss_desc:
        click.echo(f"image loss: {loss_desc}")
    click.echo("")
    click.echo("| method | s / image (median) | min | s / step | x init |")
    click.echo("|---|---|---|---|---|")
    for r in rows:
        ps = "-" if r["per_step_s"] is None else f"{r['per_step_s']:.3f}"
        click.echo(f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {ps} | {r['x_init']:.1f} |")
    a1, a1p = med[names[1]], med[names[2]]
    click.echo("")
    click.echo(f"ratios (this run): Alg. 1 / init = {a1 / med[names[0]]:.1f}x; Alg. 1 + PTI / Alg. 1 = "
               f"{a1p / a1:.2f}x; Alg. 1 + PTI / init = {a1p / med[names[0]]:.1f}x; exact / fast renders = "
               f"{med[names[3]] / a1:.2f}x")
    for n, ph in phase_medians.items():
        click.echo(f"{n} phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items() if v > 0))
    if json_path is not None:
        payload = {"config": {"network": network, "photo": str(photo), "align": align,
                              "encoder": None if encoder is None else str(encoder),
                              "pose": None if pose is None else str(pose), "steps": cfg_plain.steps,
                              "pti_steps": cfg_pti.pti_config.steps, "repeats": repeats, "warmup": warmup,
                              "seed": seed, "threads": threads, "device": device},
                   "align_seconds": t_align, "image_loss": loss_desc, "rows": rows, "phase_medians_s": phase_medians,
                   "ratios": {"alg1_over_init": a1 / med[names[0]], "pti_over_alg1": a1p / a1,
                              "pti_over_init": a1p / med[names[0]]},
                   "environment": {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                                   "python": platform.python_version()}}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()

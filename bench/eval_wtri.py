"""The W_tri encoder's tables (Oh & Jo, Tables 1 and 2) on our models: encoders against the optimiser + PTI.

Rows: each ``--encoder NAME=PATH`` (e.g. the ReStyle W+ baseline, W_tri, W_tri + L_cyc; ``portrait3d train wtri``),
and the Ko et al. optimiser followed by PTI (``--optimise N`` photos: it is slow), measured twice: its pivot in the
untuned generator (``optimiser (no PTI)``: how far the generator's latent space alone reaches, the bound an encoder
into it works under; its seconds leave PTI out) and after PTI. For each held-out UTKFace photo
(``holdout.txt`` of the training set, else every 20th photo; never trained on), aligned as ``encode3d`` aligns
it, at the face pipeline's camera:

* PSNR (dB) and the perceptual distance (EfficientNet-Lite0 features, portrait3d's offline LPIPS substitute) of
  the reconstruction against the aligned photo;
* identity: dlib's descriptor of the reconstruction and of the views at head yaw -30 / +30 degrees against the
  photo's, as cosine similarity and as the share kept (Euclidean distance < 0.6, dlib's same-person threshold;
  a view without a detected face counts as lost);
* seconds per image: the encoder's iterations (or optimiser + PTI), at ``--threads``; alignment, rendering and
  metrics are not counted. The last line gives optimiser + PTI seconds over each encoder's, on the same photos.

    PYTHONPATH=src python bench/eval_wtri.py --encoder wtri=runs/wtri/encoder.safetensors \\
        --encoder wplus=runs/wtri-wplus/encoder.safetensors --n 50 --optimise 5 --threads 2 --out bench_out/wtri
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_inversion3d import DEFAULT_HOLDOUT, DEFAULT_UTK, utk_holdout  # noqa: E402

from portrait3d.utils.io import save_image, write_json, write_text  # noqa: E402

DLIB_SAME = 0.6


class Identity:
    """dlib descriptors of rendered images against one aligned photo: ``(cosine, distance)`` or None (no face)."""

    def __init__(self, pipe: Any, photo: np.ndarray, landmarks: np.ndarray) -> None:
        from portrait3d.face.identity import dlib_descriptor

        self.pipe = pipe
        self.ref = dlib_descriptor(photo, landmarks)

    def __call__(self, image: np.ndarray) -> tuple[float, float] | None:
        from portrait3d.face.identity import cosine_similarity, dlib_descriptor

        lm = self.pipe.find_landmarks68(image)
        if lm is None:
            return None
        d = dlib_descriptor(image, lm)
        return float(cosine_similarity(self.ref, d)), float(np.linalg.norm(self.ref - d))


def _measure(G: Any, latent: Any, camera: torch.Tensor, aligned: np.ndarray, ident: Identity,
             perceptual: Any) -> tuple[dict[str, Any], np.ndarray]:
    from portrait3d.methods.inversion3d.pipeline import NOVEL_YAWS, render_views, to_tensor, view_camera
    from portrait3d.metrics.psnr import psnr

    cams = torch.cat([camera.reshape(1, 25).cpu()] + [view_camera(camera, y) for y in NOVEL_YAWS])
    imgs, _ = render_views(G, latent, cams)
    with torch.no_grad():
        lp = float(perceptual(to_tensor(imgs[0]), to_tensor(aligned))[0])
    rec: dict[str, Any] = {"psnr": psnr(imgs[0], aligned), "perceptual": lp}
    for name, img in zip(["rec", *(f"{y:+.0f}" for y in NOVEL_YAWS)], imgs):
        m = ident(img)
        rec[f"id_cos_{name}"] = None if m is None else m[0]
        rec[f"kept_{name}"] = m is not None and m[1] < DLIB_SAME
    return rec, np.concatenate([aligned, *imgs], 1)


def _mean(v: list) -> float:
    v = [float(a) for a in v if a is not None and math.isfinite(float(a))]
    return statistics.fmean(v) if v else math.nan


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-3d")
@click.option("--encoder", "encoders", multiple=True, required=True, help="NAME=PATH of an encoder (repeatable).")
@click.option("--n", type=click.IntRange(1), default=50, help="Held-out photos for the encoders.")
@click.option("--optimise", type=click.IntRange(0), default=5, help="Of those, photos for optimiser + PTI.")
@click.option("--steps", type=click.IntRange(1), default=None, show_default="invert3d's default",
              help="Optimiser steps.")
@click.option("--pti-steps", type=click.IntRange(1), default=350, help="PTI steps.")
@click.option("--learned-start/--mean-start", default=True,
              help="Start the optimiser as invert3d does (the network's shipped encoder E and pose estimator P), "
                   "or from w_avg at the face pipeline's camera.")
@click.option("--threads", type=click.IntRange(1), default=2)
@click.option("--utk", type=click.Path(path_type=Path), default=DEFAULT_UTK)
@click.option("--holdout", type=click.Path(path_type=Path), default=DEFAULT_HOLDOUT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(network: str, encoders: tuple[str, ...], n: int, optimise: int, steps: int | None, pti_steps: int,
         learned_start: bool, threads: int, utk: Path, holdout: Path, out: Path) -> None:
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.interfaces.encode3d import encode_photo, load_wtri_encoder
    from portrait3d.losses.perceptual import PerceptualLoss
    from portrait3d.methods.inversion3d.optimize import invert
    from portrait3d.methods.inversion3d.pipeline import (
        builtin_init_paths,
        face_landmarks68,
        initialise,
        load_generator,
        load_init_modules,
        make_inversion_config,
        resolve_align,
        to_tensor,
    )

    torch.set_num_threads(threads)
    G, _ = load_generator(network, "cpu")
    named = {}
    for spec in encoders:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise click.BadParameter(f"{spec!r}: want NAME=PATH of an encoder file", param_hint="--encoder")
        named[name] = load_wtri_encoder(Path(path), G, network)  # with its start encoder, if bootstrapped
    perceptual = PerceptualLoss(resize=None).eval().requires_grad_(False)
    start_enc, start_pose = load_init_modules(G, *builtin_init_paths(network), "cpu") if learned_start else (None, None)
    photos, split = utk_holdout(utk, holdout)
    photos = photos[:: max(1, len(photos) // n)][:n]
    rows: dict[str, list[dict]] = {k: [] for k in [*named, "optimiser (no PTI)", "optimiser + PTI"]}
    grids: dict[str, list[np.ndarray]] = {k: [] for k in rows}
    out.mkdir(parents=True, exist_ok=True)
    with FacePipeline(style=resolve_align("auto", network), output_size=int(G.img_resolution)) as pipe:
        for i, path in enumerate(photos):
            try:
                face = pipe(load_image(path))
            except Exception as e:  # noqa: BLE001 - a photo without a usable face is skipped and counted
                print(f"[{i + 1}/{len(photos)}] {path.name}: skipped ({e})")
                continue
            aligned, lm = face.aligned.image, face_landmarks68(face)
            x, cam = to_tensor(aligned), face.camera.reshape(1, 25).float()
            ident = Identity(pipe, aligned, lm)
            for name, enc in named.items():
                t = time.perf_counter()
                code = encode_photo(enc, G, x, cam)  # as encode3d runs it: bf16, codes only
                sec = time.perf_counter() - t
                rec, grid = _measure(G, code, cam, aligned, ident, perceptual)
                rows[name].append({"photo": path.name, "seconds": sec, **rec})
                grids[name].append(grid)
            if i < optimise:
                t = time.perf_counter()
                ws0, cam0, _ = initialise(G, x, cam, start_enc, start_pose)  # as invert3d --pti starts
                res = invert(G, x, ws0, cam0, make_inversion_config(1, steps, True, pti_steps, 0, fast=True),
                             landmarks=lm, progress=False)
                sec = time.perf_counter() - t
                # the pivot in the untuned generator: what the latent space alone reaches, the encoders' bound
                rec, grid = _measure(G, res.ws.detach(), res.camera.detach(), aligned, ident, perceptual)
                rows["optimiser (no PTI)"].append({"photo": path.name, "seconds": sec - res.timings["pti"], **rec})
                grids["optimiser (no PTI)"].append(grid)
                rec, grid = _measure(res.G.eval(), res.ws.detach(), res.camera.detach(), aligned, ident, perceptual)
                rows["optimiser + PTI"].append({"photo": path.name, "seconds": sec, **rec})
                grids["optimiser + PTI"].append(grid)
            print(f"[{i + 1}/{len(photos)}] {path.name}: " + ", ".join(
                f"{k} PSNR {r[-1]['psnr']:.2f}" for k, r in rows.items() if r and r[-1]["photo"] == path.name),
                flush=True)
    lines = [f"{network}, {len(photos)} held-out photos ({split}); {threads} thread(s); perceptual: "
             f"EfficientNet-Lite0 features (the offline LPIPS substitute); identity: dlib descriptors, kept = "
             f"distance < {DLIB_SAME}", "",
             "| method | photos | PSNR | perceptual | ID cos rec | ID cos -30 | ID cos +30 | kept rec | kept -30 | "
             "kept +30 | s / image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, r in rows.items():
        if not r:
            continue
        s = {"photos": len(r), "psnr": _mean([x["psnr"] for x in r]), "perceptual": _mean([x["perceptual"] for x in r]),
             **{f"id_cos_{v}": _mean([x[f"id_cos_{v}"] for x in r]) for v in ("rec", "-30", "+30")},
             **{f"kept_{v}": float(np.mean([x[f"kept_{v}"] for x in r])) for v in ("rec", "-30", "+30")},
             "seconds": _mean([x["seconds"] for x in r])}
        summary[name] = s
        lines.append(f"| {name} | {s['photos']} | {s['psnr']:.2f} | {s['perceptual']:.3f} | {s['id_cos_rec']:.3f} | "
                     f"{s['id_cos_-30']:.3f} | {s['id_cos_+30']:.3f} | {s['kept_rec']:.0%} | {s['kept_-30']:.0%} | "
                     f"{s['kept_+30']:.0%} | {s['seconds']:.2f} |")
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("+", " plus ")).strip("-")
        save_image(out / f"grid_{slug}.png",
                   np.concatenate(grids[name][:12], 0), overwrite=True)
    opt = rows["optimiser + PTI"]
    if opt:
        shared = {x["photo"] for x in opt}
        for name in named:
            enc_s = _mean([x["seconds"] for x in rows[name] if x["photo"] in shared])
            lines.append(f"\noptimiser + PTI / {name}: {_mean([x['seconds'] for x in opt]) / enc_s:.0f}x the time "
                         f"(same {len(opt)} photos, one run)")
    table = "\n".join(lines)
    print(table)
    write_text(out / "eval_wtri.md", table + "\n", overwrite=True)
    write_json(out / "eval_wtri.json", {"summary": summary, "rows": rows}, overwrite=True)


if __name__ == "__main__":
    main()

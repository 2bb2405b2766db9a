"""3D GAN inversion with pose optimisation (Ko et al., WACV 2023): the evaluation table on real photos.

For every photo of two held-out sets -- ``--n-utk`` UTKFace photos of the held-out split
(``holdout.txt`` of the ``utkface128`` dataset, else every 20th photo of the sorted folder listing,
the rule that built it) and ``--n-portraits`` single-face photos of ``deepface/*.jpg`` (photos with
several faces are skipped and counted) -- and for every algorithm (1: Ko et al.'s alternating
latent / camera optimisation with the warping loss; 2: camera fixed; 3: joint gradient descent)
without and with pivotal tuning (PTI), the script

1. aligns the photo with :class:`~portrait3d.face.pipeline.FacePipeline` (``--align auto``:
   ``default`` crops for the built-in networks, EG3D's in-the-wild crop otherwise, as
   ``portrait3d invert3d`` does) at the generator's resolution;
2. initialises the latent with the encoder (``--encoder``) or ``w_avg`` (the optimiser's default)
   and the camera with the pose estimator (``--pose``) or the face pipeline's PnP camera;
3. inverts (:func:`~portrait3d.methods.inversion3d.optimize.invert`, ``--steps``); the PTI row tunes
   the generator around the pivot of the no-PTI row (:func:`~portrait3d.methods.inversion3d.pti.pivotal_tuning`,
   ``--pti-steps``): exactly what ``invert(pti=True)`` does after the same (deterministic)
   latent / camera optimisation, without running that optimisation twice; its seconds are the
   no-PTI seconds plus the tuning;
4. measures, with every image rendered as ``portrait3d invert3d`` renders it (constant noise,
   deterministic ray sampling; :func:`~portrait3d.methods.inversion3d.pipeline.render_views`):

   * PSNR (dB) and MS-SSIM (:func:`portrait3d.metrics.ssim.ms_ssim`, ``[-1, 1]`` images, data range 2;
     at 128 px only 4 of its 5 scales fit the 11-px window, the weights are renormalised) of the
     reconstruction against the aligned input;
   * identity: cosine similarity of dlib's 128-D face descriptors (``face_recognition_model_v1``) of
     the reconstruction and of the novel views at head yaw -30 / +30 degrees (optimised pitch, roll,
     distance, intrinsics: :func:`~portrait3d.methods.inversion3d.pipeline.view_camera`) against the aligned
     input. Rendered images need their own landmarks: BlazeFace (:class:`~portrait3d.face.detect.FaceDetector`)
     + dlib's 68 points (:class:`~portrait3d.face.landmarks.LandmarkDetector`); where no face is found
     the value is missing (NaN), means are over the found faces and the counts are printed;
   * identity kept: the share of photos whose reconstruction and both novel views are found and lie within
     dlib's same-person distance (Euclidean, < 0.6) of the input: issue 17's criterion;
   * pose error: the angle (degrees) between the viewing directions of the optimised camera's
     (yaw, pitch) and of the face pipeline's estimate. Both are read as the angles of an EG3D camera
     label (the position angles that :class:`~portrait3d.methods.inversion3d.camera_params.CameraParams`
     optimises, ``camera_state``; for the pipeline, :func:`pose_angles_from_camera` of its label), so
     Algorithm 2 started from the pipeline's camera scores exactly 0;
   * seconds per image: initialisation (encoder / pose estimator) + inversion [+ PTI]; alignment,
     rendering and metrics are not counted.

Printed: one markdown row per (algorithm, PTI, dataset), the image loss's description (which
perceptual network it used) and the identity measure; ``--json`` also writes per-photo records.

Run from the repository root (smoke test on the built-in network, which renders colour blobs
rather than faces, so identity values are mostly missing)::

    PYTHONPATH=src python bench/eval_inversion3d.py --n-utk 2 --n-portraits 2 --steps 5 --pti-steps 2
    PYTHONPATH=src python bench/eval_inversion3d.py --network eg3d.pkl --encoder E.safetensors \\
        --pose P.safetensors --json inversion3d_eval.json

Timings are machine-dependent (CPU model, threads, load); compare them within one run.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch
from torch import nn

from portrait3d.face.identity import SAME_PERSON_THRESHOLD
from portrait3d.methods.inversion3d.pipeline import (
    NOVEL_YAWS,
    IdentityMeter,
    face_landmarks68,
    initialise,
    load_networks,
    make_inversion_config,
    render_views,
    resolve_align,
    to_tensor,
    view_camera,
)
from portrait3d.metrics.psnr import psnr
from portrait3d.metrics.ssim import ms_ssim, ms_ssim_scales
from portrait3d.networks.eg3d.camera import pose_angles_from_camera
from portrait3d.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UTK = REPO.parent / "shared" / "data" / "utkface"
DEFAULT_HOLDOUT = Path("~/.cache/portrait3d/utkface128/holdout.txt").expanduser()
DEFAULT_PORTRAITS = REPO.parent / "shared" / "data" / "portraits" / "deepface"
HOLDOUT_EVERY = 20  # portrait3d.face.dataset build --holdout 20: photos[19::20] of the sorted listing
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------- data
def utk_holdout(utk_dir: Path, holdout_list: Path) -> tuple[list[Path], str]:
    """Held-out UTKFace photos, in list order, and where the split came from.

    ``holdout_list`` (one file name a line) when it exists, else every 20th photo of the sorted
    listing of ``utk_dir`` (``photos[19::20]``, the rule of ``dataset build --holdout 20``).
    """
    if holdout_list.is_file():
        names = [ln.strip() for ln in holdout_list.read_text().splitlines() if ln.strip()]
        return [utk_dir / n for n in names], str(holdout_list)
    photos = sorted(p for p in utk_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return photos[HOLDOUT_EVERY - 1::HOLDOUT_EVERY], f"every {HOLDOUT_EVERY}th photo of the sorted listing of {utk_dir}"


def portrait_photos(folder: Path) -> list[Path]:
    """``folder/*.jpg`` sorted by name."""
    return sorted(folder.glob("*.jpg"))


# ----------------------------------------------------------------------------- measures
def view_direction(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Unit direction from the origin to a camera at (yaw, pitch) (EG3D convention, ``[3]``)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return np.array([-math.cos(p) * math.sin(y), -math.sin(p), math.cos(p) * math.cos(y)])


def angle_between_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Angle in degrees between the viewing directions of two (yaw, pitch) pairs."""
    c = float(np.clip(view_direction(*a) @ view_direction(*b), -1.0, 1.0))
    return math.degrees(math.acos(c))


def camera_yaw_pitch(camera: torch.Tensor, state: dict[str, float] | None = None) -> tuple[float, float]:
    """(yaw, pitch) in degrees of an optimised camera: its ``CameraParams`` state when there is one
    (Algorithms 1 and 3: the untranslated position angles), else those of its label (Algorithm 2)."""
    if state and "yaw" in state:
        return float(state["yaw"]), float(state["pitch"])
    yaw, pitch, _, _ = pose_angles_from_camera(camera.reshape(-1)[:25].detach().float().cpu())
    return float(yaw), float(pitch)


def image_metrics(G: nn.Module, ws: torch.Tensor, camera: torch.Tensor, aligned: np.ndarray,
                  meter: IdentityMeter) -> dict[str, Any]:
    """Render reconstruction + novel views and measure them against the aligned input."""
    cams = torch.cat([camera.detach().reshape(1, 25).cpu()] + [view_camera(camera, y) for y in NOVEL_YAWS])
    imgs, _ = render_views(G, ws.detach(), cams)
    recon = imgs[0]
    with torch.no_grad():
        mss = float(ms_ssim(to_tensor(recon), to_tensor(aligned), data_range=2.0)[0])
    ids = [meter.measure(im) for im in imgs]
    views = {f"{y:+g}": ids[1 + i] for i, y in enumerate(NOVEL_YAWS)}
    # the criterion: reconstruction and every novel view found and within dlib's same-person distance
    kept = all(v is not None and v["distance"] < SAME_PERSON_THRESHOLD for v in ids)
    return {"psnr_db": psnr(recon, aligned), "ms_ssim": mss,
            "identity_reconstruction": None if ids[0] is None else ids[0]["cosine"],
            "identity_views": {k: None if v is None else v["cosine"] for k, v in views.items()},
            "distance_reconstruction": None if ids[0] is None else ids[0]["distance"],
            "distance_views": {k: None if v is None else v["distance"] for k, v in views.items()},
            "identity_kept": kept}


# ----------------------------------------------------------------------------- helpers
def _mean(values: Sequence[float | None]) -> tuple[float, int]:
    """``(mean of the non-missing values, how many)``; NaN when none."""
    v = [float(a) for a in values if a is not None and math.isfinite(float(a))]
    return (statistics.fmean(v) if v else math.nan), len(v)


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- one photo
def evaluate_photo(G: nn.Module, face: Any, pipe: Any, algorithms: Sequence[int], steps: int | None,
                   pti_steps: int, seed: int, enc: nn.Module | None, P: nn.Module | None,
                   device: torch.device, loss_descriptions: set[str], fast: bool = True,
                   perceptual_size: int | None = None, overrides: dict[str, Any] | None = None,
                   pti_variants: Sequence[dict[str, float]] = ({},)) -> list[dict[str, Any]]:
    """All (algorithm, PTI) records for one aligned face (``fast``: invert3d's default bf16 renders with fewer
    samples per ray and the perceptual loss at the image size while optimising; ``perceptual_size``: the perceptual
    loss's input size instead; ``overrides``: other :class:`InversionConfig` fields; ``pti_variants``: one PTI run
    from the same pivot per entry, each a dict of :class:`PTIConfig` fields, e.g. ``{"symmetry_weight": 1}``)."""
    from portrait3d.methods.inversion3d.optimize import invert
    from portrait3d.methods.inversion3d.pti import pivotal_tuning

    aligned = face.aligned.image
    lm = face_landmarks68(face)
    target = to_tensor(aligned, device)
    meter = IdentityMeter(pipe, aligned, lm)
    ref_yp = camera_yaw_pitch(face.camera)

    t0 = time.perf_counter()
    init_ws, init_cam, _ = initialise(G, target, face.camera, enc, P)
    t_init = time.perf_counter() - t0

    records = []
    for alg in algorithms:
        cfg = make_inversion_config(int(alg), steps, False, None, seed, fast=fast)  # as invert3d
        if perceptual_size is not None:
            cfg.perceptual_kwargs = {**cfg.perceptual_kwargs, "resize": int(perceptual_size)}
        cfg = dataclasses.replace(cfg, **(overrides or {}))
        cfg.validate()
        t0 = time.perf_counter()
        res = invert(G, target, init_ws, init_cam, cfg, landmarks=lm, progress=False)
        t_inv = time.perf_counter() - t0
        loss_descriptions.add(res.loss_description)
        yp = camera_yaw_pitch(res.camera, res.camera_state)
        base = {"algorithm": int(alg), "camera_yaw_pitch": yp, "pipeline_yaw_pitch": ref_yp,
                "pose_error_deg": angle_between_deg(yp, ref_yp),
                "initial_yaw_pitch": camera_yaw_pitch(init_cam)}
        records.append({**base, "pti": False, "seconds": t_init + t_inv,
                        **image_metrics(G, res.ws, res.camera, aligned, meter)})
        for variant in (pti_variants if pti_steps > 0 else ()):
            pcfg = dataclasses.replace(cfg.pti_config, steps=int(pti_steps), **variant)
            t0 = time.perf_counter()
            G_t, _ = pivotal_tuning(G, res.ws, res.camera, target, pcfg, progress=False, landmarks=lm)
            t_pti = time.perf_counter() - t0
            records.append({**base, "pti": True, "pti_variant": dict(variant), "seconds": t_init + t_inv + t_pti,
                            **image_metrics(G_t.eval(), res.ws, res.camera, aligned, meter)})
            del G_t
    return records


PTI_VARIANT_NAMES = {"symmetry_weight": "mirror", "novel_view_identity_weight": "novel-view identity"}
"""How :func:`pti_label` names the :class:`PTIConfig` fields the bench varies."""


def pti_label(pti: bool, variant: dict[str, float] | None) -> str:
    """How a row / result names its PTI: ``no``, ``yes``, or ``yes, mirror W`` / ``yes, novel-view identity W``
    (the non-zero :class:`PTIConfig` fields of ``variant``)."""
    if not pti:
        return "no"
    parts = [f"{PTI_VARIANT_NAMES.get(k, k)} {v:g}" for k, v in (variant or {}).items() if v]
    return ", ".join(["yes"] + parts)


def pti_variants(symmetry: Sequence[float], novel_identity: Sequence[float], plain: bool = True
                 ) -> list[dict[str, float]]:
    """Plain PTI (``plain``), then one PTI run per ``--pti-symmetry`` weight and one per ``--pti-novel-identity``
    weight (a zero weight is plain PTI; each variant runs once)."""
    out: list[dict[str, float]] = [{}] if plain else []
    for key, weights in (("symmetry_weight", symmetry), ("novel_view_identity_weight", novel_identity)):
        for w in weights:
            v = {key: float(w)} if w else {}
            if v not in out:
                out.append(v)
    return out


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means (over photos; identity over found faces, with counts) of one (algorithm, PTI, dataset)."""
    psnr_m, _ = _mean([r["psnr_db"] for r in records])
    ms_m, _ = _mean([r["ms_ssim"] for r in records])
    id_m, id_n = _mean([r["identity_reconstruction"] for r in records])
    nv_m, nv_n = _mean([v for r in records for v in r["identity_views"].values()])
    pose_m, _ = _mean([r["pose_error_deg"] for r in records])
    sec_m, _ = _mean([r["seconds"] for r in records])
    return {"n": len(records), "psnr_db": psnr_m, "ms_ssim": ms_m, "identity_reconstruction": id_m,
            "identity_reconstruction_found": id_n, "identity_views": nv_m, "identity_views_found": nv_n,
            "identity_views_total": sum(len(r["identity_views"]) for r in records),
            "identity_kept_share": sum(bool(r["identity_kept"]) for r in records) / max(1, len(records)),
            "pose_error_deg": pose_m, "seconds_per_image": sec_m}


# ----------------------------------------------------------------------------- CLI
@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--network", default="default-3d", help="EG3D checkpoint path or built-in name.")
@click.option("--align", type=click.Choice(["auto", "default", "eg3d", "ffhq"]), default="auto",
              help="Crop style: auto = 'default' for built-in networks, 'eg3d' otherwise.")
@click.option("--n-utk", type=click.IntRange(min=0), default=10, help="Held-out UTKFace photos to evaluate.")
@click.option("--n-portraits", type=click.IntRange(min=0), default=10, help="deepface portraits to evaluate.")
@click.option("--skip-utk", type=click.IntRange(min=0), default=0,
              help="Start after this many held-out UTKFace photos (to split one evaluation over processes).")
@click.option("--utk-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_UTK)
@click.option("--holdout-list", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_HOLDOUT,
              help="Held-out file names (else every 20th photo of the sorted --utk-dir listing).")
@click.option("--portraits-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_PORTRAITS)
@click.option("--encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LatentEncoder file for the initial latent (default: w_avg).")
@click.option("--pose", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PoseEstimator file for the initial camera (default: the face pipeline's PnP camera).")
@click.option("--algorithms", "-a", type=click.Choice(["1", "2", "3"]), multiple=True, default=("1", "2", "3"),
              help="Algorithms to run (repeat the option).")
@click.option("--steps", type=click.IntRange(min=0), default=None, show_default="invert3d's default",
              help="Optimisation steps per inversion.")
@click.option("--pti-steps", type=click.IntRange(min=0), default=350, help="Pivotal-tuning steps (0: no PTI rows).")
@click.option("--seed", type=int, default=0, help="Optimiser seed (latent noise).")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch.set_num_threads.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
@click.option("--fast/--exact", default=True, help="Optimisation renders as invert3d's default (bf16, fewer samples "
                                                   "per ray), or every step in full.")
@click.option("--perceptual-size", type=click.IntRange(min=16), default=None,
              show_default="invert3d's: the image size up to 224 with --fast, else 224",
              help="Input size of the optimisation's perceptual loss.")
@click.option("--latent-per-round", type=click.IntRange(min=1), default=None,
              show_default="InversionConfig default (2)",
              help="Algorithm 1: latent steps per camera step (latent_steps_per_round).")
@click.option("--camera-identity/--no-camera-identity", default=True,
              help="The identity term inside Algorithm 1's camera steps (camera_identity).")
@click.option("--plain-pti/--no-plain-pti", default=True,
              help="The plain PTI row (off: only the --pti-symmetry / --pti-novel-identity variants).")
@click.option("--pti-symmetry", type=click.FloatRange(min=0), multiple=True, default=(), show_default=True,
              help="Weight of PTI's mirrored pseudo view (PTIConfig.symmetry_weight); repeat for one PTI row each, "
                   "all from the same pivot.")
@click.option("--pti-novel-identity", type=click.FloatRange(min=0), multiple=True, default=(),
              help="Weight of PTI's novel-view identity term (PTIConfig.novel_view_identity_weight: dlib identity of "
                   "views at PTIConfig.novel_view_yaws to the photo -- the network identity is measured with); "
                   "repeat for one PTI row each, from the same pivot.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the summary rows and per-photo records as JSON.")
def main(network: str, align: str, n_utk: int, n_portraits: int, skip_utk: int, utk_dir: Path, holdout_list: Path,
         portraits_dir: Path, encoder: Path | None, pose: Path | None, algorithms: tuple[str, ...],
         steps: int | None, pti_steps: int, seed: int, threads: int, device: str, progress: bool, fast: bool,
         perceptual_size: int | None, latent_per_round: int | None, camera_identity: bool,
         plain_pti: bool, pti_symmetry: tuple[float, ...], pti_novel_identity: tuple[float, ...],
         json_path: Path | None) -> None:
    """Evaluate Algorithms 1-3 with / without PTI on held-out UTKFace photos and deepface portraits."""
    from tqdm import tqdm

    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline

    torch.set_num_threads(threads)
    dev = torch.device(device)
    G, enc, P = load_networks(network, encoder, pose, dev)
    align = resolve_align(align, network)
    res_px = int(G.img_resolution)
    algs = sorted({int(a) for a in algorithms})
    overrides: dict[str, Any] = {} if camera_identity else {"camera_identity": False}
    if latent_per_round is not None:
        overrides["latent_steps_per_round"] = latent_per_round
    variants = pti_variants(pti_symmetry, pti_novel_identity, plain_pti)

    datasets: list[tuple[str, list[Path], int, bool, str]] = []
    if n_utk > 0:
        photos, source = utk_holdout(utk_dir, holdout_list)
        datasets.append(("utkface-holdout", photos[skip_utk:], n_utk, False, source))
    if n_portraits > 0:
        datasets.append(("deepface", portrait_photos(portraits_dir), n_portraits, True, str(portraits_dir)))

    records: list[dict[str, Any]] = []
    counts: dict[str, dict[str, Any]] = {}
    loss_descriptions: set[str] = set()
    t_start = time.perf_counter()
    with FacePipeline(style=align, output_size=res_px) as pipe:
        for name, photos, n_want, skip_multi, source in datasets:
            c = {"source": source, "tried": 0, "evaluated": 0, "no_face": [], "several_faces": [],
                 "several_faces_used_largest": 0}
            counts[name] = c
            bar = tqdm(total=n_want, desc=name, unit="photo", disable=not progress)
            for photo in photos:
                if c["evaluated"] >= n_want:
                    break
                c["tried"] += 1
                try:
                    face = pipe(load_image(photo))
                except (FaceError, ValueError) as e:  # unreadable photo, no face, failed alignment
                    c["no_face"].append(f"{photo.name}: {e}")
                    continue
                if face.num_faces > 1:
                    if skip_multi:
                        c["several_faces"].append(photo.name)
                        continue
                    c["several_faces_used_largest"] += 1
                bar.set_postfix_str(photo.name[:24])
                for r in evaluate_photo(G, face, pipe, algs, steps, pti_steps, seed, enc, P, dev, loss_descriptions,
                                        fast, perceptual_size, overrides, variants):
                    records.append({"dataset": name, "photo": photo.name, "faces_found": face.num_faces, **r})
                    if not progress:  # one line per result, so a long run shows where it is
                        click.echo(f"{photo.name}: Alg. {r['algorithm']}, PTI "
                                   f"{pti_label(r['pti'], r.get('pti_variant'))}: PSNR "
                                   f"{r['psnr_db']:.2f}, kept {bool(r['identity_kept'])}, {r['seconds']:.0f} s",
                                   err=True)
                c["evaluated"] += 1
                bar.update(1)
            bar.close()

    rows = []
    for name, *_ in datasets:
        for alg in algs:
            for pti, var in [(False, None)] + ([(True, v) for v in variants] if pti_steps > 0 else []):
                sel = [r for r in records if r["dataset"] == name and r["algorithm"] == alg and r["pti"] == pti
                       and r.get("pti_variant") == var]
                if sel:
                    rows.append({"algorithm": alg, "pti": pti, "pti_variant": var, "dataset": name,
                                 **summarise(sel)})

    n_scales = ms_ssim_scales(res_px)
    default_steps = make_inversion_config(1, None, False, None, None).steps
    steps_used = steps if steps is not None else f"{default_steps} (default)"
    click.echo("")
    click.echo(f"network {network} ({res_px} px), alignment '{align}', latent init: "
               f"{'encoder ' + str(encoder) if encoder else 'w_avg'}, camera init: "
               f"{'pose estimator ' + str(pose) if pose else 'face pipeline (PnP)'}; steps {steps_used}, "
               f"PTI steps {pti_steps}, seed {seed}, {threads} thread(s), device {device}; config changes {overrides}")
    for desc in sorted(loss_descriptions):
        click.echo(f"image loss: {desc}")
    click.echo("identity: cosine of dlib face_recognition_model_v1 descriptors (128-D), aligned input vs "
               "rendering; rendered faces found with BlazeFace + dlib 68-point landmarks (count = found / images)")
    click.echo(f"MS-SSIM: {n_scales} scale(s) at {res_px} px with the 11-px window "
               f"({'weights renormalised' if n_scales < 5 else 'standard 5 scales'}); pose error: angle between "
               "the optimised and the face pipeline's camera directions")
    for name, c in counts.items():
        click.echo(f"{name}: {c['evaluated']} evaluated of {c['tried']} tried ({c['source']}); no face: "
                   f"{len(c['no_face'])}; several faces skipped: {len(c['several_faces'])}; several faces, "
                   f"largest used: {c['several_faces_used_largest']}")
    click.echo("")
    click.echo("| Alg. | PTI | dataset | n | PSNR (dB) | MS-SSIM | ID recon (found) | ID yaw +-30 (found) "
               "| kept (dist < 0.6, all three) | pose err (deg) | s / image |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['algorithm']} | {pti_label(r['pti'], r['pti_variant'])} | {r['dataset']} | {r['n']} | "
                   f"{_fmt(r['psnr_db'], 2)} | {_fmt(r['ms_ssim'])} | "
                   f"{_fmt(r['identity_reconstruction'])} ({r['identity_reconstruction_found']}/{r['n']}) | "
                   f"{_fmt(r['identity_views'])} ({r['identity_views_found']}/{r['identity_views_total']}) | "
                   f"{100 * r['identity_kept_share']:.0f}% | "
                   f"{_fmt(r['pose_error_deg'], 2)} | {_fmt(r['seconds_per_image'], 1)} |")
    total = time.perf_counter() - t_start
    click.echo(f"\nwall time {total:.1f} s")
    if json_path is not None:
        payload = {"config": {"network": network, "align": align, "resolution": res_px, "encoder": encoder,
                              "pose": pose, "algorithms": algs, "steps": steps, "pti_steps": pti_steps,
                              "pti_variants": variants,
                              "perceptual_size": perceptual_size, "seed": seed, "threads": threads, "device": device,
                              "ms_ssim_scales": n_scales, "config_changes": overrides,
                              "novel_yaws": list(NOVEL_YAWS)},
                   "image_loss": sorted(loss_descriptions),
                   "identity": ("dlib face_recognition_model_v1 cosine and Euclidean distance; BlazeFace + dlib 68 "
                                "landmarks on renders"),
                   "datasets": counts, "rows": rows, "records": records, "wall_time_s": total,
                   "environment": {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                                   "python": platform.python_version()}}
        click.echo(f"wrote {write_json(json_path, payload, overwrite=True)}")


if __name__ == "__main__":
    main()

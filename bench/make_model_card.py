"""Evaluate a trained generator and write its model card.

Given a generator checkpoint in portrait3d's ``.safetensors`` format, the aligned dataset it was
trained on and its training state, computes

* FID: ``--n-gen`` generated images (default 10,000, no truncation) against the Inception
  statistics of every image of the training set (cached as ``<data>/fid_stats_n<N>.npz``), with
  the TF Inception-v3 of :mod:`portrait3d.metrics.fid`; for EG3D, camera labels are drawn from
  the training set's labels (conditioning and rendering), as EG3D's own metrics do;
* the BlazeFace detection rate of ``--n-detect`` samples (EG3D: at yaw -30, 0 and +30 degrees), with
  the rate on as many real training images as a reference;

* with ``--n-face``: the face metrics of :mod:`portrait3d.metrics.face_stats` (FD-dlib, KID-dlib,
  detection, pose spread, identity diversity) of that many samples against ``--n-face-real`` training
  faces; with ``--holdout`` (a built dataset of the held-out photos) the same numbers and FID for
  held-out real faces against the training faces, the real-vs-real baseline;

and writes next to the model: ``MODEL_CARD.md``, ``samples.png`` and, for EG3D, ``depth.png``
(views and depth of four faces from yaw -30 to +30) and ``orbit.mp4``.

The training state is a JSON file (``--state``; keys ``images_seen`` (or ``kimg`` / ``cur_nimg``),
``wall_time_s`` (or ``elapsed_s`` / ``total_time_s``), ``hardware``); ``--images-seen``,
``--wall-time-h`` and ``--hardware`` override it.

    PYTHONPATH=src python bench/make_model_card.py runs/eg3d/G_ema.safetensors \\
        --data ~/.cache/portrait3d/utkface128 --state runs/eg3d/state.json --device cuda
    PYTHONPATH=src python bench/make_model_card.py G.safetensors --data DATA --n-gen 500 --n-detect 100 \\
        --n-real 2000 --hardware "2-core CPU"            # quick look (FID biased upward at small n)

On a 2-core CPU the Inception network takes about 0.5 s per image: FID10k needs ~1.5 h, the real
statistics of 21k images ~3 h once (then cached). Use a GPU for the full numbers.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints.load import load_network  # noqa: E402
from portrait3d.face.io import save_image  # noqa: E402
from portrait3d.metrics import fid as fidm  # noqa: E402
from portrait3d.metrics.detection_rate import EVAL_YAWS, detection_rate, eval_cameras, generator_detection_rates  # noqa: E402
from portrait3d.networks.eg3d.triplane import TriPlaneGenerator  # noqa: E402
from portrait3d.utils.visualize import make_grid, to_uint8  # noqa: E402

UTKFACE_PHOTOS = 22313


def _first(d: dict, *keys: str):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def read_state(path: Path | None, images_seen: int | None, wall_time_h: float | None,
               hardware: str | None) -> dict:
    """Training facts from the state JSON, overridden by the command-line options."""
    state: dict = {}
    if path is not None:
        state = json.loads(Path(path).read_text())
    seen = _first(state, "images_seen", "cur_nimg", "nimg")
    if seen is None and state.get("kimg") is not None:
        seen = float(state["kimg"]) * 1000
    secs = _first(state, "wall_time_s", "elapsed_s", "total_time_s", "seconds")
    hw = _first(state, "hardware", "device")
    if images_seen is not None:
        seen = images_seen
    if wall_time_h is not None:
        secs = wall_time_h * 3600
    if hardware is not None:
        hw = hardware
    return {"images_seen": None if seen is None else int(seen), "wall_time_s": None if secs is None else float(secs),
            "hardware": hw}


def _is_cpu(hardware: str | None) -> bool:
    if not hardware:
        return False
    h = hardware.lower()
    return "cpu" in h and not any(k in h for k in ("cuda", "gpu", "nvidia", "h100", "h200", "a100", "v100", "rtx"))


def _dataset_facts(root: Path) -> dict:
    labels = json.loads((root / "labels.json").read_text())
    summary = labels.get("summary", {})
    holdout = root / "holdout.txt"
    held = [ln for ln in holdout.read_text().splitlines() if ln.strip()] if holdout.is_file() else []
    return {"aligned": len(labels["labels"]), "summary": summary, "holdout": len(held),
            "cameras": torch.tensor([c for _, c in labels["labels"]], dtype=torch.float32)}


@torch.no_grad()
def _visuals(G, out_dir: Path, device: torch.device, seed: int, truncation: float, force: bool) -> list[str]:
    """samples.png (+ depth.png, orbit.mp4 for EG3D). Returns the written file names."""
    from portrait3d.networks.eg3d.camera import camera_from_angles
    from portrait3d.utils.video import orbit_cameras, write_mp4
    from portrait3d.utils.visualize import colour_depth

    gen = torch.Generator().manual_seed(seed)
    n = 32
    z = torch.randn(n, G.z_dim, generator=gen).to(device)
    written = ["samples.png"]
    if isinstance(G, TriPlaneGenerator):
        c = camera_from_angles([0.0] * n, [0.0] * n).to(device)
        ws = G.mapping(z, c, truncation_psi=truncation)
        imgs = np.concatenate([to_uint8(G.synthesis(ws[i:i + 8], c[i:i + 8], noise_mode="const")["image"])
                               for i in range(0, n, 8)])
        save_image(out_dir / "samples.png", make_grid(imgs, cols=8), overwrite=force)
        yaws = (-30.0, -15.0, 0.0, 15.0, 30.0)
        k = 4
        rows = []
        for j, yaw in enumerate(yaws):
            o = G.synthesis(ws[:k], camera_from_angles([yaw] * k, [0.0] * k).to(device), noise_mode="const",
                            cache_backbone=(j == 0), use_cached_backbone=(j > 0))
            rows.append((to_uint8(o["image"]), colour_depth(o["image_depth"], o["image"].shape[-1])))
        # per face: a row of views, then a row of depths
        tiles = []
        for f in range(k):
            tiles += [r[0][f] for r in rows] + [r[1][f] for r in rows]
        save_image(out_dir / "depth.png", make_grid(np.stack(tiles), cols=len(yaws)), overwrite=force)
        cams = orbit_cameras(48).to(device)
        frames = []
        for i in range(len(cams)):
            o = G.synthesis(ws[:3], cams[i:i + 1].expand(3, 25), noise_mode="const", cache_backbone=(i == 0),
                            use_cached_backbone=(i > 0))
            frames.append(make_grid(to_uint8(o["image"]), cols=3))
        G._last_planes = None
        write_mp4(np.stack(frames), out_dir / "orbit.mp4", overwrite=force)
        written += ["depth.png", "orbit.mp4"]
    else:
        imgs = np.concatenate([to_uint8(G(z[i:i + 8], torch.zeros(len(z[i:i + 8]), G.c_dim, device=device),
                                          truncation_psi=truncation, noise_mode="const")) for i in range(0, n, 8)])
        save_image(out_dir / "samples.png", make_grid(imgs, cols=8), overwrite=force)
    return written


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "not recorded"
    return f"{s / 3600:.2f} h ({s:,.0f} s)"


FACE_ROWS = (("fd_dlib", "FD-dlib (Fréchet distance, dlib 128-D descriptors)", "{:.4f}"),
             ("kid_dlib", "KID-dlib (x 10^3)", "{:.3f}", 1000.0),
             ("detection", "face detection rate (BlazeFace, on 256 px upscales)", "{:.3f}"),
             ("yaw_std", "yaw std (deg)", "{:.1f}"),
             ("yaw_std_ratio", "yaw-std ratio (over the training faces')", "{:.2f}"),
             ("pitch_std_ratio", "pitch-std ratio", "{:.2f}"),
             ("identity_diversity_ratio", "identity-diversity ratio (mean pairwise descriptor distance)", "{:.2f}"))


def _face_table(ev: dict) -> str:
    face = ev.get("face")
    if not face:
        return ""
    gen, base = face["generated"], face.get("baseline")
    head = "| metric | generated | held-out real (baseline) |\n|---|---|---|" if base else "| metric | generated |\n|---|---|"
    lines = [head]
    for row in FACE_ROWS:
        key, label, fmt = row[:3]
        scale = row[3] if len(row) > 3 else 1.0
        cells = [fmt.format(gen[key] * scale)] + ([fmt.format(base[key] * scale)] if base else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fid_base = ""
    if ev.get("fid_holdout") is not None:
        fid_base = (f"\n\nFID beside its baseline, at equal n = {ev['fid_holdout']['n']:,}: generated "
                    f"**{ev['fid_holdout']['generated']:.2f}**, held-out real photos **{ev['fid_holdout']['real']:.2f}** "
                    "(each against the same training statistics).")
    ratio = ""
    if base and base.get("fd_dlib"):
        ratio = f"\n\nFD-dlib is **{gen['fd_dlib'] / base['fd_dlib']:.2f}x** its real-vs-real baseline."
    cov = face.get("coverage")
    cov_text = ""
    if cov:
        from portrait3d.metrics.demographics import AGE_BINS, UTKFACE_ETHNICITIES

        ages = [f"{a}-{b - 1}" if b < 200 else f"{a}+" for a, b in zip(AGE_BINS[:-1], AGE_BINS[1:])]
        rows = [f"| age {a} | {r:.2f} | {t:.2f} |" for a, r, t in zip(ages, cov["real"]["age"], cov["test"]["age"])]
        rows += [f"| {g} | {r:.2f} | {t:.2f} |" for g, r, t in zip(("male", "female"), cov["real"]["gender"],
                                                                   cov["test"]["gender"])]
        rows += [f"| {e} | {r:.2f} | {t:.2f} |" for e, r, t in zip(UTKFACE_ETHNICITIES, cov["real"]["ethnicity"],
                                                                  cov["test"]["ethnicity"])]
        tv = ", ".join(f"{k} {v:.2f}" for k, v in cov["tv"].items())
        acc = ", ".join(f"{k} {v:.2f}" for k, v in cov["probe"].items())
        cov_text = f"""

**Demographic coverage** (`portrait3d.metrics.demographics`): shares predicted by ridge probes on the same dlib
descriptors, fitted to the UTKFace labels of {cov['n'][0]:,} training photos (probe accuracy on a held-out quarter:
{acc}); real and generated faces go through the same probes. Total-variation distance to the real shares: {tv}.

| group | real (training) | generated |
|---|---|---|
{chr(10).join(rows)}"""
    return f"""
**Face metrics** ({face['n']:,} samples, truncation psi 1, constant noise, against {face['n_ref']:,}
training faces; {int(gen['n_faces']):,} samples had a measurable face{'' if not base else f", held-out: {int(base['n_faces']):,} of {face['n_holdout']:,}"}). No ImageNet network is involved:
descriptors and landmarks come from dlib, detection from MediaPipe, pose from PnP on dlib's 68 points.

{chr(10).join(lines)}{ratio}{fid_base}{cov_text}
"""


def render_card(model: Path, G, facts: dict, state: dict, ev: dict, files: list[str]) -> str:
    arch = "EG3D tri-plane generator (3D-aware)" if isinstance(G, TriPlaneGenerator) else "StyleGAN2 generator (2D)"
    params = sum(p.numel() for p in G.parameters())
    summ = facts["summary"]
    cfg = json.dumps(G.config.to_dict(), indent=1)
    seen = state["images_seen"]
    cpu_note = ""
    if _is_cpu(state["hardware"]):
        cpu_note = ("\n> **Trained on CPU.** This model saw "
                    f"{'an unrecorded number of' if seen is None else f'{seen:,}'} images; published StyleGAN2 / "
                    "EG3D face models see 10-25 million on several GPUs. Expect blurry, low-diversity faces "
                    "and unstable 3D geometry: this is a small proof-of-pipeline model, not a quality model.\n")
    is3d = isinstance(G, TriPlaneGenerator)
    det = ev["detection"]
    if is3d:
        det_rows = "\n".join(f"| generated, yaw {y:+.0f} deg | {r:.3f} |" for y, r in zip(EVAL_YAWS, det["generated"]))
    else:
        det_rows = f"| generated | {det['generated'][0]:.3f} |"
    fid_cams = ("camera labels drawn uniformly from the training set's labels (conditioning = rendering camera)"
                if is3d else "unconditional")
    sample_lines = ["- `samples.png`: 32 samples (truncation psi "
                    f"{ev['vis_truncation']}, seed {ev['vis_seed']}" + (", frontal camera)" if is3d else ")")]
    if is3d:
        sample_lines += ["- `depth.png`: 4 faces; for each a row of views at yaw -30, -15, 0, +15, +30 degrees and "
                         "below it their rendered depth (inferno colour map, near = bright)",
                         "- `orbit.mp4`: 3 faces on EG3D's elliptical orbit (yaw +-35, pitch +-10 degrees), 48 frames, "
                         "24 fps"]
    no_holdout = "" if facts["holdout"] else " (no holdout.txt found: no held-out split recorded)"
    skipped = f", {summ['failed']:,} photos skipped (no usable face)" if "failed" in summ else ""
    small_n = "" if ev["n_gen"] >= 10000 else (
        f"*Only {ev['n_gen']:,} generated images: FID is biased upward at small n; compare only numbers "
        "computed with the same n.*")
    geometry = ("3D geometry comes from a single-view GAN prior: side views beyond about 30 degrees, ears, hair "
                "and the back of the head are poorly constrained; depth maps are relative, not metric."
                if is3d else "A 2D model: no control over head pose.")
    notes = f"\n{ev['notes'].strip()}\n" if ev.get("notes") else ""
    narrow = ("The metrics are narrow: FID uses one ImageNet Inception network and the training images; the face\n"
              "  metrics use dlib's descriptor and landmarks and one face detector. None measures memorisation or\n"
              "  fairness." if ev.get("face") else
              "The metrics are narrow: FID uses one ImageNet Inception network and the training images; the detection\n"
              "  rate uses one face detector. Neither measures identity diversity, memorisation or fairness.")
    return f"""# Model card: `{model.name}`
{notes}
Generated by `bench/make_model_card.py` on {datetime.date.today().isoformat()} with

    {ev['command']}

## Model

- Architecture: {arch}, {G.img_resolution} x {G.img_resolution} px, {params:,} parameters.
- File: `{model.name}` (portrait3d `.safetensors`: weights plus the JSON configuration below; load with
  `portrait3d.load_network`).
- Intended use: research on 3D-aware face synthesis, GAN inversion and editing. Not for identifying,
  impersonating or deceiving anyone.

## Data

- **UTKFace**: {UTKFACE_PHOTOS:,} real face photos (200 x 200 px crops, ages 0-116, labelled gender and
  ethnicity). Licence: **non-commercial research use only**; this model inherits that restriction.
- Re-aligned with portrait3d's `default` recipe (`FacePipeline(style='default')`: face detection, dlib
  68-point landmarks, least-squares similarity of 5 points to a template measured on UTKFace, mirrored
  border) at {summ.get('resolution', G.img_resolution)} px:
  {facts['aligned']:,} faces aligned{skipped};
  each face carries an EG3D camera label from the estimated head pose.
- Held-out split: {facts['holdout']:,} photos (listed in the dataset folder's `holdout.txt`; the builder's
  `--holdout N` leaves out every N-th photo by file name) were never seen in training{no_holdout}.
  A further set of UTKFace photos is held out of the shared copy altogether.

## Configuration

```json
{cfg}
```

## Training

| | |
|---|---|
| Images seen | {'not recorded' if seen is None else f'{seen:,} ({seen / 1000:,.1f} kimg)'} |
| Wall time | {_fmt_time(state['wall_time_s'])} |
| Hardware | {state['hardware'] or 'not recorded'} |
{cpu_note}
## Evaluation

Evaluated on {ev['device']} in {ev['eval_time_s'] / 60:.1f} min.

**FID** = {ev['fid']:.2f}: {ev['n_gen']:,} generated images (truncation psi 1, {fid_cams}) against
{ev['n_real']:,} training images (no mirroring).
Feature extractor: {fidm.INCEPTION_NAME} (SHA-1 `{fidm.INCEPTION_SHA1}`).
{small_n}
FID here measures fit to the *training* distribution at 128 px; it is not comparable with FIDs of other
datasets, resolutions or Inception ports (e.g. clean-fid).

**Face detection rate** (MediaPipe BlazeFace, both bundled models, confidence >= 0.5, no fallback),
{det['n']:,} images per row:

| Images | Rate |
|---|---|
| real training faces (reference) | {det['real']:.3f} |
{det_rows}
{_face_table(ev)}
## Samples

{chr(10).join(sample_lines)}

## Limitations

- Resolution {G.img_resolution} px and a small training budget: faces are far below the quality of published
  StyleGAN2 / EG3D models.
- UTKFace is unbalanced (ages, ethnicities, photo sources) and its crops are tight (little hair or
  background); the generator reproduces those biases and that framing.
- {geometry}
- {narrow} No LPIPS is reported (no ImageNet AlexNet/VGG is available offline).
- Synthetic faces can be misused to deceive; label generated images as synthetic.
"""


@click.command(context_settings={"show_default": True})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Built aligned dataset (images.npy, labels.json) the model was trained on.")
@click.option("--state", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training-state JSON (images_seen / kimg, wall_time_s, hardware).")
@click.option("--images-seen", type=int, default=None, help="Override: real images shown to the discriminator.")
@click.option("--wall-time-h", type=float, default=None, help="Override: training wall time in hours.")
@click.option("--hardware", type=str, default=None, help="Override: e.g. '1x NVIDIA H100' or '2-core CPU'.")
@click.option("--n-gen", type=click.IntRange(2), default=10000, help="Generated images for FID.")
@click.option("--n-real", type=click.IntRange(2), default=None, help="Real images for FID [default: all].")
@click.option("--n-detect", type=click.IntRange(1), default=1000, help="Images per detection-rate row.")
@click.option("--batch", type=click.IntRange(1), default=32)
@click.option("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--seed", type=int, default=0, help="Seed of the evaluation latents and the samples.")
@click.option("--n-face", type=click.IntRange(0), default=0, help="Samples for the face metrics (0 = none).")
@click.option("--n-face-real", type=click.IntRange(2), default=2000, help="Training faces of the face-metric reference.")
@click.option("--holdout", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Built dataset of the held-out photos: real-vs-real baselines of the face metrics and FID.")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Markdown put at the top of the card (what the numbers mean for a user).")
@click.option("--force", is_flag=True, help="Overwrite an existing model card and pictures.")
def main(model: Path, data_root: Path, state: Path | None, images_seen: int | None, wall_time_h: float | None,
         hardware: str | None, n_gen: int, n_real: int | None, n_detect: int, batch: int, device: str, seed: int,
         n_face: int, n_face_real: int, holdout: Path | None, notes: Path | None, force: bool) -> None:
    """Compute FID and detection rates of MODEL and write MODEL_CARD.md (+ pictures) next to it."""
    t0 = time.perf_counter()
    out_dir = model.resolve().parent
    targets = ["MODEL_CARD.md", "samples.png"]
    dev = torch.device(device)
    G = load_network(model, device=dev)
    if isinstance(G, TriPlaneGenerator):
        targets += ["depth.png", "orbit.mp4"]
    clash = [t for t in targets if (out_dir / t).exists()]
    if clash and not force:
        raise click.ClickException(f"{', '.join(clash)} already exist in {out_dir} (pass --force)")
    facts = _dataset_facts(data_root)
    train = read_state(state, images_seen, wall_time_h, hardware)

    real = fidm.dataset_stats(data_root, limit=n_real, device=dev, batch_size=batch)
    cams = facts["cameras"][: real.n] if isinstance(G, TriPlaneGenerator) else None
    # The generated features are kept: their first k rows give FID at the held-out set's size too.
    gen_feats = fidm.InceptionFeatures(dev, batch).from_batches(
        fidm.generated_batches(fidm.generator_sample_fn(G, truncation_psi=1.0, seed=seed, cameras=cams, device=dev),
                                n_gen, batch), total=n_gen, desc=f"generated features ({n_gen})")
    fid = fidm.fid_from_features(gen_feats, real)
    print(f"FID {fid:.2f} ({n_gen} generated vs {real.n} real)")

    from portrait3d.face.dataset import AlignedFaceDataset

    ds = AlignedFaceDataset(data_root, mirror=False)
    idx = np.random.default_rng(seed).choice(ds.count, min(n_detect, ds.count), replace=False)
    real_rate = detection_rate(np.asarray(ds.images[np.sort(idx)]))
    cameras = eval_cameras() if isinstance(G, TriPlaneGenerator) else None
    gen_rates = generator_detection_rates(G, cameras, n=n_detect, batch=batch, seed=seed + 1, device=dev)
    print(f"detection rate: real {real_rate:.3f}, generated {', '.join(f'{r:.3f}' for r in gen_rates)}")

    face = fid_holdout = None
    if n_face:
        from portrait3d.metrics.face_stats import compare, dataset_face_stats, generator_face_stats

        ref = dataset_face_stats(data_root, n_face_real, progress=True)
        # EG3D: cameras drawn from the training labels, as for FID (so the pose spread is the model's to show)
        gen_faces = generator_face_stats(G, n_face, seed=seed, device=dev, progress=True, cameras=cams)
        face = {"n": n_face, "n_ref": n_face_real, "generated": compare(gen_faces, ref)}
        try:
            from portrait3d.metrics.demographics import coverage, dataset_attributes

            face["coverage"] = coverage(gen_faces.descriptors, dataset_attributes(data_root, 1000, progress=True))
        except ValueError as e:  # file names without UTKFace labels: no coverage table
            print(f"no demographic coverage: {e}")
        if holdout is not None:
            ho = dataset_face_stats(holdout, None, progress=True)
            face["baseline"] = compare(ho, ref)
            face["n_holdout"] = ho.n
        print("face metrics:", json.dumps(face))
    if holdout is not None:
        held = fidm.dataset_stats(holdout, device=dev, batch_size=batch)  # cached beside the held-out set
        k = min(held.n, n_gen)
        fid_holdout = {"n": k, "generated": fidm.fid_from_features(gen_feats[:k], real),
                       "real": fidm.fid_from_features(held, real) if held.n == k else
                       fidm.fid_from_features(fidm.dataset_stats(holdout, limit=k, device=dev, batch_size=batch), real)}
        print("FID at equal n:", json.dumps(fid_holdout))

    files = _visuals(G, out_dir, dev, seed, truncation=0.7, force=force)
    where = (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
             if dev.type == "cpu" else torch.cuda.get_device_name(dev))
    ev = {"fid": fid, "n_gen": n_gen, "n_real": real.n, "device": where,
          "detection": {"n": n_detect, "real": real_rate, "generated": gen_rates},
          "vis_seed": seed, "vis_truncation": 0.7, "eval_time_s": time.perf_counter() - t0,
          "face": face, "fid_holdout": fid_holdout, "notes": notes.read_text() if notes else None,
          "command": "PYTHONPATH=src python bench/make_model_card.py " + shlex.join(sys.argv[1:])}

    card = render_card(model, G, facts, train, ev, files)

    from portrait3d.checkpoints.native import atomic_write

    atomic_write(out_dir / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card), overwrite=force)
    metrics = {k: v for k, v in ev.items() if k != "notes"}
    atomic_write(out_dir / "model_card_metrics.json", lambda tmp: Path(tmp).write_text(
        json.dumps(metrics, indent=1, default=float)), overwrite=True)
    print(f"wrote {', '.join(['MODEL_CARD.md', 'model_card_metrics.json'] + files)} to {out_dir} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()

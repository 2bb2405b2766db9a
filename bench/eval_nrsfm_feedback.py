"""NRSfM +20 degree yaw edits of generated latents as ``portrait3d edit SEED --yaw 20 --relative`` runs them, with and
without the landmark feedback step (``--feedback``), judged by two pose estimates.

The latents are issue 17's (``pose_edit_check``'s: ``sample_latents(G, n, 'w', seed=2_000_003)``). Each goes
through :func:`~portrait3d.methods.nrsfm.pipeline.edit_and_measure` (the command's path: MediaPipe box, dlib
landmarks, eq. 15 gradient edit started from the linear one, prior metric). Pass: yaw change within +-5 degrees of
the asked and dlib cosine >= 0.85 to the original render. The yaw change is measured twice:

* ``pnp68``: PnP on dlib's 68 points (the face pipeline's estimate, the one the edit reports);
* ``mesh468``: PnP on MediaPipe's 468-point mesh (:func:`portrait3d.face.pose.estimate_head_pose_mesh`), whose
  landmarks the feedback never sees (the feedback fits eq. 11 to dlib's 68 points).

    PYTHONPATH=src python bench/eval_nrsfm_feedback.py --n 50 --feedback 0 --feedback 1 --json OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@click.command(context_settings={"show_default": True})
@click.option("--network", default="default-2d")
@click.option("--nrsfm", "editor_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="NRSfM editor [the network's shipped one].")
@click.option("--n", type=int, default=50, help="Latents.")
@click.option("--seed", type=int, default=2_000_003)
@click.option("--yaw", type=float, default=20.0, help="Asked yaw change (degrees).")
@click.option("--mode", type=click.Choice(["linear", "gradient"]), default="gradient", help="`edit`'s default.")
@click.option("--feedback", "feedbacks", type=int, multiple=True, default=[0, 1], help="Values to compare.")
@click.option("--threads", type=int, default=1)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Before | after for each --feedback, the first 12 latents.")
def main(network: str, editor_path: Path | None, n: int, seed: int, yaw: float, mode: str, feedbacks: tuple[int, ...],
         threads: int, json_out: Path | None, grid: Path | None) -> None:
    import tqdm

    from portrait3d.checkpoints import load_network
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.pose import estimate_head_pose_mesh
    from portrait3d.methods.nrsfm.data import sample_latents
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.methods.nrsfm.pipeline import edit_and_measure, resolve_editor

    torch.set_num_threads(threads)
    G = load_network(network).eval().requires_grad_(False)
    editor = resolve_editor(network, editor_path)
    latents = sample_latents(G, n, editor.space, seed=seed).reshape(n, -1)
    spec = EditSpec(yaw=yaw)
    fa = FaceAnalyzer("mediapipe")

    def mesh_yaw(img: np.ndarray) -> float | None:
        found = fa.landmarks_and_mesh(img)
        if found is None:
            return None
        return estimate_head_pose_mesh(found[1], (img.shape[1], img.shape[0])).yaw_deg

    results, tiles = {}, {}
    try:
        for fb in feedbacks:
            rows, t0 = [], time.perf_counter()
            for i in tqdm.trange(n, desc=f"feedback {fb}", unit="latent"):
                w = latents[i:i + 1]
                rep = edit_and_measure(G, editor, w, editor.target(w, spec), mode, 50, 0.01, "mediapipe",
                                       feedback=fb, spec=spec)
                ch = rep.head_pose_change_deg
                m0, m1 = mesh_yaw(rep.original), mesh_yaw(rep.edited)
                rows.append({"pnp68": None if ch is None else ch[0],
                             "mesh468": None if m0 is None or m1 is None else m1 - m0,
                             "pitch_drift": None if ch is None else abs(ch[1]),
                             "cosine": rep.identity_similarity_dlib})
                if i < 12:
                    tiles.setdefault(fb, []).append(np.stack([rep.original, rep.edited]))
            summary = {"seconds_per_latent": (time.perf_counter() - t0) / n}
            for key in ("pnp68", "mesh468"):
                ok = [r[key] is not None and abs(r[key] - yaw) <= 5 and (r["cosine"] or 0) >= 0.85 for r in rows]
                vals = [r[key] for r in rows if r[key] is not None]
                summary[f"pass_{key}"] = float(np.mean(ok))
                summary[f"median_change_{key}"] = float(np.median(vals)) if vals else None
            summary["pitch_drift_median"] = float(np.median([r["pitch_drift"] for r in rows
                                                             if r["pitch_drift"] is not None]))
            summary["cosine_median"] = float(np.median([r["cosine"] for r in rows if r["cosine"] is not None]))
            results[fb] = {"summary": summary, "rows": rows}
            click.echo(f"feedback {fb}: " + json.dumps({k: round(v, 3) for k, v in summary.items()}))
    finally:
        fa.close()
    if json_out is not None:
        json_out.write_text(json.dumps({"n": n, "seed": seed, "yaw": yaw, "mode": mode, "network": network,
                                        "editor": str(editor_path or "shipped"),
                                        "results": {str(k): v for k, v in results.items()}}, indent=1))
    if grid is not None:
        from portrait3d.face.io import save_image
        from portrait3d.utils.visualize import make_grid

        cols = [np.concatenate(tiles[fb]) for fb in feedbacks]  # per latent: before, after
        save_image(grid, make_grid(np.concatenate(cols), 8), overwrite=True)


if __name__ == "__main__":
    main()

"""NRSfM photo edits as a user runs them: ``portrait3d edit photo.jpg --yaw 20 --relative`` on held-out photos.

For each held-out UTKFace photo (evenly spaced over the dataset's ``holdout.txt``), the whole command runs (face
alignment, projection into W, the NRSfM edit, the face pipeline's measurements) and this script then measures, with
the face pipeline (MediaPipe detection, dlib landmarks, PnP; dlib descriptors):

* the yaw change ``yaw(edited) - yaw(original)`` against the asked ``--yaw`` (pass: within +-5 degrees), where
  ``original`` is the projected latent rendered as the edit is (constant noise maps);
* the identity distance of the edited face to the photo and to the original, and of the projection (with its
  optimised noise maps) to the photo (< 0.6: the same person);
* the wall time of the command (alignment + projection + edit + measurements).

Writes ``OUT/results.json``, ``OUT/table.md`` and ``OUT/grid.png`` (photo | original | edited, one row per photo).

    PYTHONPATH=src python bench/eval_photo_edits.py --photos ../shared/data/utkface \\
        --holdout ~/.cache/portrait3d/utkface128/holdout.txt --nrsfm EDITOR --n 20 --out bench_out/photo_edits
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch


@click.command(context_settings={"show_default": True})
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of the original photos.")
@click.option("--holdout", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="File names of held-out photos, one per line.")
@click.option("--nrsfm", "editor_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="NRSfM editor [the network's shipped one].")
@click.option("--network", default="default-2d")
@click.option("--n", type=int, default=20, help="Photos, evenly spaced over the held-out list.")
@click.option("--yaw", type=float, default=20.0, help="Asked yaw change (degrees).")
@click.option("--mode", type=click.Choice(["linear", "gradient"]), default="gradient", help="The edit's default.")
@click.option("--feedback", type=click.IntRange(0, 5), default=1, help="`edit --feedback` (its default).")
@click.option("--lambda-id", type=float, default=None, help="`edit --lambda-id` [its default: 1, to the photo].")
@click.option("--metric", type=click.Choice(["prior", "euclidean"]), default="prior")
@click.option("--project-steps", type=int, default=300)
@click.option("--fast/--exact", default=True, help="`edit --fast/--exact` (its default: fast).")
@click.option("--pti-steps", type=int, default=None, help="`edit --pti-steps` [its default].")
@click.option("--threads", type=int, default=1)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(photos: Path, holdout: Path, editor_path: Path | None, network: str, n: int, yaw: float, mode: str,
         feedback: int, lambda_id: float | None, metric: str, project_steps: int, fast: bool, pti_steps: int | None,
         threads: int,
         out: Path) -> None:
    from PIL import Image

    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.io import save_image
    from portrait3d.interfaces.nrsfm import run_edit
    from portrait3d.interfaces.pie import measure_pose_identity
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.utils.visualize import make_grid

    torch.set_num_threads(threads)
    names = [s for s in holdout.read_text().split() if s]
    picks = [names[int(i)] for i in np.linspace(0, len(names) - 1, n)] if n < len(names) else names
    out.mkdir(parents=True, exist_ok=True)
    rows, grid = [], []
    fa = FaceAnalyzer("mediapipe")
    try:
        for k, name in enumerate(picks):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                try:
                    rec = run_edit(str(photos / name), network, editor_path, EditSpec(yaw=yaw, absolute=False), mode,
                                   50, lambda_id, Path(tmp), False, "mediapipe", project_steps, None, metric=metric,
                                   feedback=feedback, fast=fast, pti_steps=pti_steps)
                except Exception as e:  # a photo the command refuses counts as a failure, with its reason
                    rows.append({"photo": name, "error": f"{type(e).__name__}: {e}"})
                    click.echo(f"[{k + 1}/{len(picks)}] {name}: {rows[-1]['error']}")
                    continue
                seconds = time.perf_counter() - t0
                ims = {key: np.asarray(Image.open(Path(tmp) / f"{key}.png").convert("RGB"))
                       for key in ("aligned", "projection", "original", "edited")}
            size = ims["projection"].shape[0]
            photo = np.asarray(Image.fromarray(ims["aligned"]).resize((size, size), Image.BICUBIC))
            m = measure_pose_identity({"photo": photo, "original": ims["original"], "edited": ims["edited"],
                                       "projection": ims["projection"]}, analyzer=fa)
            m_orig = measure_pose_identity({"original": ims["original"], "edited": ims["edited"]}, analyzer=fa)
            row = {"photo": name, "seconds": seconds, "tool_yaw_change": (rec.get("head_pose_change_deg") or [None])[0],
                   "pti_steps": rec.get("pti_steps")}
            if m["original"].get("face") and m["edited"].get("face"):
                row["yaw_original"], row["yaw_edited"] = m["original"]["yaw_deg"], m["edited"]["yaw_deg"]
                row["yaw_change"] = row["yaw_edited"] - row["yaw_original"]
                row["pitch_change"] = m["edited"]["pitch_deg"] - m["original"]["pitch_deg"]
            row["identity_photo_edited"] = m["edited"].get("identity_distance")
            row["identity_photo_projection"] = m["projection"].get("identity_distance")
            row["identity_original_edited"] = m_orig["edited"].get("identity_distance")
            d, idp = row.get("yaw_change"), row["identity_photo_edited"]
            row["turned"] = d is not None and abs(d - yaw) <= 5.0
            row["kept_photo"] = idp is not None and idp < 0.6
            rows.append(row)
            grid.append(np.stack([photo, ims["original"], ims["edited"]]))
            click.echo(f"[{k + 1}/{len(picks)}] {name}: yaw change {d if d is None else round(d, 1)}, identity to "
                       f"photo {idp if idp is None else round(idp, 3)}, {seconds:.1f} s")
    finally:
        fa.close()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    done = [r for r in rows if "error" not in r]
    changes = [r["yaw_change"] for r in done if r.get("yaw_change") is not None]
    summary = {
        "photos": len(rows), "edited": len(done), "asked_yaw_change": yaw, "mode": mode, "metric": metric,
        "feedback": feedback, "lambda_id": lambda_id,
        "turned_within_5deg": sum(r["turned"] for r in done) / max(1, len(rows)),
        "median_yaw_change": float(np.median(changes)) if changes else None,
        "identity_kept_photo": sum(r["kept_photo"] for r in done) / max(1, len(rows)),
        "turned_and_kept": sum(r["turned"] and r["kept_photo"] for r in done) / max(1, len(rows)),
        "identity_photo_edited_mean": mean("identity_photo_edited"),
        "identity_photo_projection_mean": mean("identity_photo_projection"),
        "identity_original_edited_mean": mean("identity_original_edited"),
        "seconds_mean": mean("seconds"), "seconds_max": max((r["seconds"] for r in done), default=None),
        "threads": threads, "project_steps": project_steps, "fast": fast,
        "pti_steps": rows[0].get("pti_steps") if rows else None, "network": network,
        "editor": str(editor_path) if editor_path else "shipped",
    }
    (out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
    table = ["| photos | Δyaw within ±5° of asked | median Δyaw | identity to photo < 0.6 | both | id. photo→edit | "
             "id. photo→projection | id. original→edit | s / photo (mean, max) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {summary['photos']} | {summary['turned_within_5deg']:.0%} | {fmt(summary['median_yaw_change'], '{:.1f}')}"
             f" | {summary['identity_kept_photo']:.0%} | {summary['turned_and_kept']:.0%} | "
             f"{fmt(summary['identity_photo_edited_mean'], '{:.3f}')} | "
             f"{fmt(summary['identity_photo_projection_mean'], '{:.3f}')} | "
             f"{fmt(summary['identity_original_edited_mean'], '{:.3f}')} | {fmt(summary['seconds_mean'], '{:.1f}')},"
             f" {fmt(summary['seconds_max'], '{:.1f}')} |"]
    (out / "table.md").write_text("\n".join(table) + "\n")
    if grid:
        save_image(out / "grid.png", make_grid(np.concatenate(grid), 6), overwrite=True)
    click.echo("\n".join(table))


if __name__ == "__main__":
    main()

"""Face metrics of every snapshot of a StyleGAN2 or EG3D run, to choose the one to ship.

For each ``snapshot-*/G_ema.safetensors`` of RUN (skipping those already in the output JSON), measures
on ``--n`` samples (seeded latents, constant noise, no truncation; EG3D: cameras drawn from the training labels,
as the model card) against ``--n-real`` training faces: FD-dlib, KID-dlib, BlazeFace detection rate, yaw/pitch
spread ratios and identity-diversity ratio (:mod:`portrait3d.metrics.face_stats`), the sharpness of the samples
(variance of the Laplacian, :mod:`portrait3d.metrics.sharpness`; the training faces' is printed once), optionally
FID at ``--fid-n`` samples and, for EG3D, issue 13's geometry checks on ``--geometry`` latents. With ``--holdout``
(a built dataset of the held-out photos) it also prints the real-vs-real baseline once. Writes
``RUN/snapshot_metrics.json`` and ``RUN/snapshot_metrics.png`` (each metric against kimg).

    PYTHONPATH=src python bench/eval_snapshots.py RUN --data ~/.cache/portrait3d/utkface128 \\
        --holdout ~/.cache/portrait3d/utkface128-holdout --n 300
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints.load import load_network  # noqa: E402
from portrait3d.metrics.face_stats import compare, dataset_face_stats, measure_faces  # noqa: E402
from portrait3d.metrics.fid import generated_batches, generator_sample_fn  # noqa: E402
from portrait3d.metrics.sharpness import mean_laplacian_variance  # noqa: E402
from portrait3d.networks.eg3d.triplane import TriPlaneGenerator  # noqa: E402

PLOTTED = ("fd_dlib", "detection", "yaw_std_ratio", "identity_diversity_ratio", "sharpness", "fid",
           "identity_kept", "yaw_slope")


def _plot(rows: list[dict], baseline: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = sorted((r["kimg"], r[k]) for r in rows if k in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        if baseline and k in baseline:
            ax.axhline(baseline[k], color="grey", ls="--", label="real vs real")
            ax.legend(fontsize=7)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("kimg")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


@click.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The built training set (reference faces).")
@click.option("--holdout", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A built set of held-out photos: the real-vs-real baseline.")
@click.option("--n", type=click.IntRange(10), default=300, help="Samples per snapshot.")
@click.option("--n-real", type=click.IntRange(10), default=2000, help="Training faces of the reference.")
@click.option("--fid-n", type=click.IntRange(0), default=0, help="FID samples per snapshot (0 = no FID).")
@click.option("--fid-real", type=click.IntRange(100), default=2000, show_default=True,
              help="Training faces of FID's reference statistics (cached beside the data; the model card's 2,000).")
@click.option("--geometry", type=click.IntRange(0), default=0,
              help="EG3D: issue 13's geometry checks on this many latents per snapshot (0 = none).")
@click.option("--every", type=click.IntRange(1), default=1, help="Only every k-th snapshot.")
@click.option("--threads", type=click.IntRange(1), default=1)
def main(runs: tuple[Path, ...], data: Path, holdout: Path | None, n: int, n_real: int, fid_n: int, fid_real: int,
         geometry: int, every: int, threads: int) -> None:
    import numpy as np

    from portrait3d.face.dataset import AlignedFaceDataset

    torch.set_num_threads(threads)
    ds = AlignedFaceDataset(data, mirror=False)
    cameras = ds.cameras  # the training labels: EG3D samples are rendered from them
    print(f"sharpness of {min(n, len(ds))} training faces:",
          round(mean_laplacian_variance(ds.images[i] for i in range(min(n, len(ds)))), 5))
    ref = dataset_face_stats(data, n_real, progress=True)
    baseline = None
    if holdout is not None:
        baseline = compare(dataset_face_stats(holdout, None, progress=True), ref)
        print("real vs real (held-out vs training):", json.dumps({k: round(v, 4) for k, v in baseline.items()}))
    for run in runs:
        out = run / "snapshot_metrics.json"
        rows = json.loads(out.read_text())["rows"] if out.is_file() else []
        done = {r["snapshot"] for r in rows}
        snaps = sorted(p for p in run.glob("snapshot-*") if (p / "G_ema.safetensors").is_file())[::-1][::every][::-1]
        for snap in snaps:
            if snap.name in done:
                continue
            t0 = time.time()
            G = load_network(snap / "G_ema.safetensors").eval()
            state = json.loads((snap / "state.json").read_text())
            cams = cameras if isinstance(G, TriPlaneGenerator) else None
            images = np.concatenate(list(generated_batches(generator_sample_fn(G, seed=0, cameras=cams), n, 16)))
            m = compare(measure_faces(images), ref)
            row = {"snapshot": snap.name, "kimg": state["kimg"], "resolution": G.img_resolution, "n": n, **m,
                   "sharpness": mean_laplacian_variance(images)}
            if fid_n:
                from portrait3d.metrics.fid import compute_fid

                row["fid"] = compute_fid(generator_sample_fn(G, seed=0, cameras=cams), data, n_gen=fid_n,
                                         progress=False, real_limit=fid_real)
                row["fid_n"], row["fid_real"] = fid_n, fid_real
            if geometry and isinstance(G, TriPlaneGenerator):
                from portrait3d.metrics.geometry3d import geometry_checks

                geo = geometry_checks(G, n=geometry, seed=0)
                row.update(identity_kept=geo.identity_kept, yaw_slope=geo.yaw_slope, nose_nearer=geo.nose_nearer,
                           detection_turned=min(geo.detection.values()), geometry_n=geometry)
            row["eval_s"] = round(time.time() - t0, 1)
            rows.append(row)
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(shown), flush=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"baseline": baseline, "n_real": n_real, "rows": rows}, indent=1))
            tmp.replace(out)
            _plot(rows, baseline, run / "snapshot_metrics.png")


if __name__ == "__main__":
    main()

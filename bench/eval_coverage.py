"""Demographic coverage of generators: predicted age, gender and ethnicity shares of their samples against the
real training faces (:mod:`portrait3d.metrics.demographics`), with a bar plot.

Explains a large FD-dlib: a generator that drops babies, the elderly or a minority ethnicity makes plausible
faces whose identities still sit in a narrow part of descriptor space.

    PYTHONPATH=src python bench/eval_coverage.py default-2d --data ~/.cache/portrait3d/utkface128 \
        --n 1000 --plot coverage.png --json coverage.json

MODELS are built-in names, checkpoint files or run snapshots (their ``G_ema.safetensors``). EG3D models are
sampled with cameras drawn from the training labels, as FID and the model card do.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints import load_network  # noqa: E402
from portrait3d.checkpoints.native import atomic_write  # noqa: E402
from portrait3d.metrics.demographics import AGE_BINS, UTKFACE_ETHNICITIES, coverage, dataset_attributes  # noqa: E402
from portrait3d.metrics.face_stats import generator_face_stats  # noqa: E402
from portrait3d.networks.eg3d.triplane import TriPlaneGenerator  # noqa: E402

AGE_LABELS = [f"{a}-{b - 1}" if b < 200 else f"{a}+" for a, b in zip(AGE_BINS[:-1], AGE_BINS[1:])]


def _resolve(model: str) -> str:
    p = Path(model)
    return str(p / "G_ema.safetensors") if p.is_dir() else model


def _label(model: str) -> str:
    """Short legend names: a run snapshot as ``run/snapshot``, a file by its folder and name."""
    p = Path(model)
    return "/".join(p.parts[-2:]) if len(p.parts) > 1 else model


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = (("age", "age (years, predicted)", AGE_LABELS), ("gender", "gender", ["male", "female"]),
              ("ethnicity", "ethnicity (UTKFace classes)", list(UTKFACE_ETHNICITIES)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [6, 2, 5]})
    names = ["real (training)"] + [_label(m) for m in results]
    width = 0.8 / len(names)
    for ax, (key, title, labels) in zip(axes, groups):
        x = np.arange(len(labels))
        first = next(iter(results.values()))
        for k, name in enumerate(names):
            shares = first["real"][key] if k == 0 else list(results.values())[k - 1]["test"][key]
            ax.bar(x + (k - (len(names) - 1) / 2) * width, shares, width, label=name)
        ax.set_xticks(x, labels, fontsize=8)
        tv = ", ".join(f"{r['tv'][key]:.2f}" for r in results.values())
        ax.set_title(f"{title}\nTV to real: {tv}", fontsize=9)
        ax.set_ylabel("share")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix.lstrip(".") or "png"),
                 overwrite=True)
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.argument("models", nargs=-1, required=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Built UTKFace dataset the models trained on (file names carry the labels).")
@click.option("--n", type=click.IntRange(20), default=1000, help="Samples per model.")
@click.option("--n-real", type=click.IntRange(20), default=1000, help="Labelled real faces for the probes.")
@click.option("--seed", type=int, default=0)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bar plot of the shares (PNG).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(models: tuple[str, ...], data: Path, n: int, n_real: int, seed: int, plot_path: Path | None,
         json_path: Path | None) -> None:
    """Predicted age / gender / ethnicity shares of each model's samples against the real faces."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    real = dataset_attributes(data, n_real, progress=True)
    cams = None
    results: dict[str, dict] = {}
    for model in models:
        t0 = time.perf_counter()
        G = load_network(_resolve(model))
        if isinstance(G, TriPlaneGenerator) and cams is None:
            from portrait3d.face.dataset import AlignedFaceDataset
            from portrait3d.training.eg3d import dataset_cameras

            cams = dataset_cameras(AlignedFaceDataset(data, mirror=False))
        stats = generator_face_stats(G, n, seed=seed, progress=True,
                                     cameras=cams if isinstance(G, TriPlaneGenerator) else None)
        res = coverage(stats.descriptors, real)
        res["seconds"] = time.perf_counter() - t0
        results[model] = res
        tv = ", ".join(f"{k} {v:.2f}" for k, v in res["tv"].items())
        print(f"{model}: TV to real {tv}; age mean/std real {res['age_mean'][0]:.1f}/{res['age_std'][0]:.1f} "
              f"generated {res['age_mean'][1]:.1f}/{res['age_std'][1]:.1f}")
        print("  ethnicity shares real " + " ".join(f"{s:.2f}" for s in res["real"]["ethnicity"]) + " | generated "
              + " ".join(f"{s:.2f}" for s in res["test"]["ethnicity"]) + f"  ({', '.join(UTKFACE_ETHNICITIES)})")
        print("  age shares real " + " ".join(f"{s:.2f}" for s in res["real"]["age"]) + " | generated "
              + " ".join(f"{s:.2f}" for s in res["test"]["age"]) + f"  ({', '.join(AGE_LABELS)})")
    probe = next(iter(results.values()))["probe"]
    print("probe accuracy on held-out real faces: " + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
    if plot_path is not None:
        plot(results, plot_path)
        print(f"wrote {plot_path}")
    if json_path is not None:
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)), overwrite=True)


if __name__ == "__main__":
    main()

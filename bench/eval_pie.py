"""PIE's Table 1 / Fig. 7 on our models: embedding quality and yaw edits of held-out photos, with the ablations.

For each held-out aligned photo (evenly spaced over ``--holdout``) and each variant:

* **full**: the hierarchical W -> W+ embedding with E_syn, E_id, E_edit, E_inv and E_recog (eq. 6);
* **no E_recog**: lambda_recog = 0;
* **no modification terms**: E_id, E_edit, E_inv off (lambda = 0);
* **W+ only**: no W stage (all steps in W+);
* **Image2StyleGAN**: E_syn alone in W+ (the baseline);

it measures PSNR and SSIM of the reconstruction against the photo, then applies yaw edits of +20 and -20 degrees
(relative to the reconstruction's rig yaw, one feedback step) and measures with the face pipeline (MediaPipe
detection, dlib landmarks, PnP): the edit error ``|(yaw(edit) - yaw(reconstruction)) - delta|`` and the dlib
identity distance of the edit to the photo (< 0.6: the same person). Writes a JSON and a markdown table and a grid
(photo | reconstruction | -20 | +20, per variant) for looking at.

    PYTHONPATH=src python bench/eval_pie.py --holdout ~/.cache/portrait3d/utkface128-holdout --n 20 \
        --models src/portrait3d/models/pie --out bench_out/pie
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.interfaces.pie import _u8, load_embedder, measure_pose_identity  # noqa: E402
from portrait3d.methods.pie.embed import PieConfig  # noqa: E402
from portrait3d.metrics.psnr import psnr  # noqa: E402
from portrait3d.metrics.ssim import ssim  # noqa: E402
from portrait3d.utils.io import save_image, write_json, write_text  # noqa: E402
from portrait3d.utils.visualize import from_uint8  # noqa: E402

VARIANTS = {
    "full": {},
    "no E_recog": {"recog_weight": 0.0},
    "no modification terms": {"id_weight": 0.0, "edit_weight": 0.0, "inv_weight": 0.0},
    "W+ only": {"hierarchical": False},
    "Image2StyleGAN (E_syn in W+)": {"hierarchical": False, "recog_weight": 0.0, "id_weight": 0.0,
                                     "edit_weight": 0.0, "inv_weight": 0.0},
}


def _slug(variant: str) -> str:
    """A file-name part per variant: 'full', 'no_e_recog', 'no_modification_terms', 'wplus_only', ..."""
    return "".join(c if c.isalnum() else "_" for c in variant.lower().replace("+", "plus").split(" (")[0]).strip("_")


def _config(base: PieConfig, change: dict) -> PieConfig:
    cfg = PieConfig.from_dict(base.to_dict())
    for k, v in change.items():
        if k == "hierarchical":
            cfg.steps_wplus, cfg.steps_w = cfg.steps_w + cfg.steps_wplus, 0
        else:
            setattr(cfg, k, v)
    return cfg


@click.command(context_settings={"show_default": True})
@click.option("--holdout", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--network", type=str, default="default-2d")
@click.option("--n", type=click.IntRange(1), default=20, help="Held-out photos.")
@click.option("--steps-w", type=click.IntRange(0), default=150)
@click.option("--steps-wplus", type=click.IntRange(0), default=100)
@click.option("--lr-w", type=float, default=None, help="The W stage's step size (default: PieConfig's).")
@click.option("--lr-wplus", type=float, default=None, help="The W+ stage's step size (default: PieConfig's).")
@click.option("--delta", type=float, default=20.0, help="Yaw edit in degrees (applied as +delta and -delta).")
@click.option("--variants", multiple=True, type=click.Choice(sorted(VARIANTS)), default=sorted(VARIANTS))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(holdout: Path, models: Path, network: str, n: int, steps_w: int, steps_wplus: int, lr_w: float | None,
         lr_wplus: float | None, delta: float,
         variants: tuple[str, ...], out: Path) -> None:
    from portrait3d.face.analyzer import FaceAnalyzer

    torch.set_num_threads(1)
    emb = load_embedder(network, models)
    if "pose" not in emb.rignets:
        raise click.ClickException(f"{models} holds no pose RigNet")
    images = np.load(holdout / "images.npy", mmap_mode="r")
    pick = np.linspace(0, len(images) - 1, n).round().astype(int)
    base = PieConfig(steps_w=steps_w, steps_wplus=steps_wplus, modes=["pose"])
    if lr_w is not None:
        base.lr_w = lr_w
    if lr_wplus is not None:
        base.lr = lr_wplus
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    grids: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    out.mkdir(parents=True, exist_ok=True)
    with FaceAnalyzer("mediapipe") as fa:
        for i, idx in enumerate(pick):
            photo = np.array(images[idx])  # a writable copy of the memory-mapped row
            x = from_uint8(photo)
            with torch.no_grad():
                five = emb._five_points(emb.theta(x), x.shape[-1])[0]
            for v in variants:
                t0 = time.perf_counter()
                res = emb.embed(x, _config(base, VARIANTS[v]), landmarks5=five)
                sec = time.perf_counter() - t0
                with torch.no_grad():
                    rec = emb.render(res.ws)
                shown = {"photo": photo, "reconstruction": _u8(rec)}
                for sign in (-1.0, 1.0):
                    target = res.params.angles.clone()
                    target[:, 0] += sign * delta
                    ws, _ = emb.edit(res.ws, {"pose": res.params.replace(angles=target)})
                    with torch.no_grad():
                        shown[f"{sign * delta:+.0f}"] = _u8(emb.render(ws))
                m = measure_pose_identity(shown, analyzer=fa)
                row = {"photo": int(idx), "seconds": sec, "psnr": psnr(shown["reconstruction"], photo),
                       "ssim": float(ssim(rec, x)[0]),
                       "identity_reconstruction": m["reconstruction"].get("identity_distance")}
                yaw_rec = m["reconstruction"].get("yaw_deg")
                for sign in (-1.0, 1.0):
                    key = f"{sign * delta:+.0f}"
                    yaw_e = m[key].get("yaw_deg")
                    row[f"edit_error_{key}"] = (None if yaw_e is None or yaw_rec is None
                                                else abs((yaw_e - yaw_rec) - sign * delta))
                    row[f"identity_{key}"] = m[key].get("identity_distance")
                rows[v].append(row)
                grids[v].append(np.concatenate(list(shown.values()), 1))
                print(f"[{i + 1}/{n}] {v}: PSNR {row['psnr']:.2f}, edit errors "
                      f"{row[f'edit_error_{-delta:+.0f}']}, {row[f'edit_error_{delta:+.0f}']}, {sec:.0f} s", flush=True)

    def stat(vals: list, fn) -> float | None:
        vals = [v for v in vals if v is not None]
        return float(fn(vals)) if vals else None

    summary = {}
    for v in variants:
        r = rows[v]
        errs = [row[f"edit_error_{s:+.0f}"] for row in r for s in (-delta, delta)]
        ids = [row[f"identity_{s:+.0f}"] for row in r for s in (-delta, delta)]
        summary[v] = {"psnr": stat([row["psnr"] for row in r], np.mean),
                      "ssim": stat([row["ssim"] for row in r], np.mean),
                      "edit_error_median_deg": stat(errs, np.median),
                      "edits_measured": sum(e is not None for e in errs), "edits": len(errs),
                      "identity_distance_mean": stat(ids, np.mean),
                      "identity_kept": stat([d < 0.6 for d in ids if d is not None], np.mean),
                      "seconds_per_photo": stat([row["seconds"] for row in r], np.mean)}
        save_image(out / f"grid_{_slug(v)}.png", np.concatenate(grids[v], 0), overwrite=True)
    lines = ["| variant | PSNR | SSIM | median yaw-edit error (deg) | identity distance | kept (< 0.6) | s / photo |",
             "|---|---|---|---|---|---|---|"]
    fmt = (lambda x, f: "n/a" if x is None else f.format(x))
    for v, s in summary.items():
        lines.append(f"| {v} | {fmt(s['psnr'], '{:.2f}')} | {fmt(s['ssim'], '{:.3f}')} | "
                     f"{fmt(s['edit_error_median_deg'], '{:.1f}')} ({s['edits_measured']}/{s['edits']} measured) | "
                     f"{fmt(s['identity_distance_mean'], '{:.3f}')} | {fmt(s['identity_kept'], '{:.0%}')} | "
                     f"{fmt(s['seconds_per_photo'], '{:.0f}')} |")
    table = "\n".join(lines)
    print(table)
    write_json(out / "eval_pie.json", {"summary": summary, "rows": rows, "delta": delta, "n": n,
                                      "steps": [steps_w, steps_wplus]}, overwrite=True)
    write_text(out / "eval_pie.md", table + "\n", overwrite=True)


if __name__ == "__main__":
    main()

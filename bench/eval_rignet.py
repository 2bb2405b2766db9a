"""A RigNet's edits on generator samples, for its model card (expression and light; pose has eval_pie.py).

For ``--n`` latents of the generator (truncation 0.7, seeds independent of training) and each target:

* **expression**: each named expression coefficient of the rig set to ``-VALUE`` and ``+VALUE`` (standard
  deviations; the others kept);
* **light**: a directional term from the left, the right, above and below (``EditSpec`` of ``portrait3d pie``),

the edit runs as ``portrait3d pie edit`` runs it (one RigNet pass and one feedback step) and is measured:

* **reached**: the estimator's parameters of the edited image against the target, as the share of the asked change
  that arrived (1 = all of it; measured by the network RigNet was trained through, so an optimistic number);
* **independent checks** with MediaPipe's mesh (not used in training): for ``mouth_open`` the lip gap, for
  ``smile`` / ``corners_up`` the mouth width, for ``eyes_open`` the eyelid gap, for ``brows_up`` the brow height,
  each over the face width, at ``-VALUE`` and ``+VALUE``; for light, the mean brightness of the face's image-right
  half minus its left half (from the right: > 0);
* **identity**: the dlib distance of the edit to the unedited sample (< 0.6: the same person).

    PYTHONPATH=src python bench/eval_rignet.py --models src/portrait3d/models/pie --mode expression --n 24 \\
        --out bench_out/rignet-expression
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.interfaces.pie import EditSpec, load_embedder  # noqa: E402
from portrait3d.methods.pie.rignet import mode_params  # noqa: E402
from portrait3d.utils.io import save_image, write_json, write_text  # noqa: E402
from portrait3d.utils.visualize import to_uint8  # noqa: E402

# MediaPipe mesh indices: inner lips (13 upper, 14 lower), mouth corners (61, 291), eyelids (159/145 right eye,
# 386/374 left eye), brows (105 right, 334 left) and the eye centres' row (33, 263 outer corners), face width (234, 454)
LIPS, CORNERS, LIDS, BROWS, EYES, WIDTH = (13, 14), (61, 291), ((159, 145), (386, 374)), (105, 334), (33, 263), \
    (234, 454)
SEED_OFFSET = 7_000_000  # sample seeds far from the RigNet training stream


def mesh_measures(mesh: np.ndarray) -> dict[str, float]:
    w = float(np.linalg.norm(mesh[WIDTH[0], :2] - mesh[WIDTH[1], :2]))
    lid = np.mean([np.linalg.norm(mesh[a, :2] - mesh[b, :2]) for a, b in LIDS])
    eye_y = mesh[list(EYES), 1].mean()
    return {"mouth_open": float(np.linalg.norm(mesh[LIPS[0], :2] - mesh[LIPS[1], :2])) / w,
            "mouth_width": float(np.linalg.norm(mesh[CORNERS[0], :2] - mesh[CORNERS[1], :2])) / w,
            "eyes_open": float(lid) / w, "brows_up": float(eye_y - mesh[list(BROWS), 1].mean()) / w}


def _side_balance(img: np.ndarray, mesh: np.ndarray) -> float:
    """Mean brightness (0-255) of the face's image-right half minus its left half, inside the mesh's box."""
    grey = img.astype(np.float64).mean(2)
    h, w = grey.shape
    x0, x1 = (int(np.clip(round(v), 0, w)) for v in (mesh[:, 0].min(), mesh[:, 0].max()))
    y0, y1 = (int(np.clip(round(v), 0, h)) for v in (mesh[:, 1].min(), mesh[:, 1].max()))
    mid = int(np.clip(round(float(np.median(mesh[:, 0]))), x0 + 1, max(x0 + 1, x1 - 1)))
    box = grey[y0:y1]
    return float(box[:, mid:x1].mean() - box[:, x0:mid].mean())


CHECK = {"mouth_open": "mouth_open", "smile": "mouth_width", "corners_up": "mouth_width", "eyes_open": "eyes_open",
         "brows_up": "brows_up"}
LIGHTS = {"left": (-1.0, 0.0, 0.6), "right": (1.0, 0.0, 0.6), "above": (0.0, 1.0, 0.6), "below": (0.0, -1.0, 0.6)}


@click.command(context_settings={"show_default": True})
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--network", default="default-2d")
@click.option("--mode", type=click.Choice(["expression", "light"]), required=True)
@click.option("--n", type=click.IntRange(1), default=24)
@click.option("--value", type=float, default=2.0, help="Expression targets: -VALUE and +VALUE std. dev.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(models: Path, network: str, mode: str, n: int, value: float, out: Path) -> None:
    from portrait3d.face.analyzer import FaceAnalyzer

    torch.set_num_threads(1)
    emb = load_embedder(network, models, recog=False)
    if mode not in emb.rignets:
        raise click.ClickException(f"{models} holds no {mode} RigNet")
    names = list(emb.rig.config.expression_names)
    G = emb.G
    if mode == "expression":
        targets = {f"{k} {s:+g}": EditSpec(expression={k: s}) for k in names for s in (-value, value)}
    else:
        targets = {f"from {k}": EditSpec(light=d) for k, d in LIGHTS.items()}
    rows: dict[str, list[dict]] = {t: [] for t in targets}
    grid = []
    with FaceAnalyzer("mediapipe") as fa:
        for i in range(n):
            z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(SEED_OFFSET + i))
            with torch.no_grad():
                ws = G.mapping(z, None, truncation_psi=0.7)
                base_img = emb.render(ws)
                params = emb.theta(base_img)
            base = to_uint8(base_img)[0]
            found = fa.landmarks_and_mesh(base)
            if found is None:
                continue
            ref = fa.descriptor(base, found[0])
            row_imgs = [base]
            for name, spec in targets.items():
                want = spec.targets(params, names)[mode]
                edited_ws, _ = emb.edit(ws, {mode: want})
                with torch.no_grad():
                    img_t = emb.render(edited_ws)
                    got = mode_params(emb.theta(img_t), mode)
                img = to_uint8(img_t)[0]
                row_imgs.append(img)
                asked = mode_params(want, mode) - mode_params(params, mode)
                arrived = got - mode_params(params, mode)
                share = float((arrived * asked).sum() / asked.square().sum().clamp_min(1e-9))
                rec: dict = {"reached": share}
                m = fa.landmarks_and_mesh(img)
                if m is not None:
                    rec["identity_distance"] = float(np.linalg.norm(fa.descriptor(img, m[0]) - ref))
                    if mode == "expression":
                        key = CHECK.get(name.split()[0])
                        if key is not None:
                            rec["check"] = mesh_measures(m[1])[key] - mesh_measures(found[1])[key]
                    else:
                        rec["check"] = _side_balance(img, m[1]) - _side_balance(base, found[1])
                rows[name].append(rec)
            if len(grid) < 6:
                grid.append(np.concatenate(row_imgs, 1))
            print(f"[{i + 1}/{n}]", flush=True)
    check_what = ("change of the MediaPipe measure (share of face width)" if mode == "expression"
                  else "change of right-half minus left-half face brightness (0-255)")
    lines = [f"| target | edits | reached (estimator) | {check_what} | identity kept (< 0.6) |", "|---|---|---|---|---|"]
    summary = {}
    for name, r in rows.items():
        reached = np.mean([x["reached"] for x in r]) if r else float("nan")
        checks = [x["check"] for x in r if "check" in x]
        ids = [x["identity_distance"] for x in r if "identity_distance" in x]
        kept = np.mean([d < 0.6 for d in ids]) if ids else float("nan")
        summary[name] = {"edits": len(r), "reached": float(reached),
                         "check": float(np.mean(checks)) if checks else None, "identity_kept": float(kept)}
        lines.append(f"| {name} | {len(r)} | {reached:.2f} | "
                     f"{'n/a' if not checks else f'{np.mean(checks):+.3f}'} | {kept:.0%} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval_rignet.md", table + "\n", overwrite=True)
    write_json(out / "eval_rignet.json", {"mode": mode, "n": n, "value": value, "targets": list(targets),
                                         "summary": summary, "rows": rows}, overwrite=True)
    save_image(out / "grid.png", np.concatenate(grid, 0), overwrite=True)


if __name__ == "__main__":
    main()

"""``portrait3d nrsfm build``, ``portrait3d edit --method nrsfm`` and ``portrait3d transfer``.

Outputs of an edit (one folder, nothing overwritten unless ``--force``):

* ``original.png`` / ``edited.png``: the face before and after (generator resolution);
* ``grid.png``: before | after, each drawn with its detected landmarks (green) and the rank-one
  model's landmarks for the parameters asked for (red: ``R(φ(w))`` before, ``R(q*)`` after), as
  the paper's Fig. 4;
* ``result.json``: target and achieved parameters (φ of the edited latent, and eq. 11's fit to
  the edited image's landmarks), head pose measured by the face pipeline before and after, dlib
  identity similarity, timings;
* ``latent.npy``: the edited latent (and ``original_latent.npy``); for a photo also ``aligned.png``
  (the crop that was inverted) and ``projection.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.checkpoints.load import BUILTIN_NETWORKS
from portrait3d.face.io import save_image
from portrait3d.utils.visualize import draw_points, make_grid, to_uint8
from portrait3d.errors import UsageError

__all__ = ["builtin_editor_path", "resolve_editor", "run_build", "run_edit", "run_transfer"]

EDIT_OUTPUTS = ("original.png", "edited.png", "grid.png", "result.json", "latent.npy", "original_latent.npy")


def builtin_editor_path(network: str, space: str = "w") -> Path | None:
    """Where a built-in network's shipped NRSfM editor lives (``None`` for other networks)."""
    if network not in BUILTIN_NETWORKS:
        return None
    base = Path(__file__).resolve().parent.parent / BUILTIN_NETWORKS[network]
    return base.parent / f"nrsfm-{space.replace('+', 'plus')}.safetensors"


def resolve_editor(network: str, editor_path: Path | None):
    from portrait3d.methods.nrsfm.editor import NRSfMEditor

    path = editor_path or builtin_editor_path(network)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"no NRSfM editor for network {network!r}: build one with "
                                f"`portrait3d nrsfm build --network {network} --out EDITOR.safetensors` "
                                f"and pass --nrsfm EDITOR.safetensors")
    return NRSfMEditor.load(path)



def _check_outputs(out: Path, names: tuple[str, ...], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise FileExistsError(f"{out / clash[0]} already exists (pass --force to overwrite)")


def _write_json(path: Path, obj: Any, overwrite: bool) -> None:
    from portrait3d.checkpoints.native import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)), overwrite=overwrite)


def _write_npy(path: Path, arr: np.ndarray, overwrite: bool) -> None:
    from portrait3d.checkpoints.native import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write, overwrite=overwrite)


# ----------------------------------------------------------------------------- build
def run_build(network: str, out: Path, space: str, samples: int, basis: int, backend: str, detector: str,
              seed: int, truncation: float, factorize_samples: int, epochs: int, force: bool,
              cache_dir: Path | None, device: str = "cpu") -> dict[str, Any]:
    """Build and save an editor for ``network``; writes ``out`` and ``<out stem>_report.json`` + ``_basis.png``."""
    from portrait3d.checkpoints import load_network
    from portrait3d.methods.nrsfm.data import LandmarkDataConfig
    from portrait3d.methods.nrsfm.editor import BuildConfig, build_editor
    from portrait3d.methods.nrsfm.regressor import RegressorConfig

    report_path = out.with_name(out.stem + "_report.json")
    basis_path = out.with_name(out.stem + "_basis.png")
    for p in (out, report_path, basis_path):
        if p.exists() and not force:
            raise FileExistsError(f"{p} already exists (pass --force to overwrite)")
    G = load_network(network).eval().requires_grad_(False).to(device)
    if not hasattr(G, "synthesis") or getattr(G, "c_dim", 0) != 0:
        raise UsageError("NRSfM editing needs an unconditional 2D StyleGAN2 generator")
    cfg = BuildConfig(data=LandmarkDataConfig(num_samples=samples, space=space, backend=backend, detector=detector,
                                              truncation_psi=truncation, seed=seed),
                      num_basis=basis, factorize_samples=factorize_samples,
                      regressor=RegressorConfig(epochs=epochs))
    cfg.data.validate()
    t0 = time.time()
    editor, report = build_editor(G, cfg, cache_dir=cache_dir)
    report["network"] = network
    report["build_seconds"] = time.time() - t0
    editor.meta["network"] = network
    editor.save(out, overwrite=force)
    _write_json(report_path, report, overwrite=force)
    save_image(basis_path, basis_figure(editor), overwrite=force)
    return report


def basis_figure(editor, size: int = 160) -> np.ndarray:
    """Mean shape and each basis shape at ±2σ, frontal (θ = 0), drawn as points: one row per component."""
    model = editor.model
    lay = model.layout
    rows = []
    q = torch.zeros(1, lay.size)
    q[:, lay.k] = 0.8 / max(float(model.B0[:2].abs().max()) * 2, 1e-6)
    q[:, lay.t] = 0.5
    white = np.full((size, size, 3), 255, np.uint8)
    with torch.no_grad():
        for k in range(-1, model.num_basis):
            tiles = []
            for s in (-2.0, 0.0, 2.0):
                qq = q.clone()
                if k >= 0:
                    qq[0, lay.alpha.start + k] = s * float(editor.alpha_std[k])
                pts = model.project(qq)[0].numpy()
                tiles.append(draw_points(white, pts, (200, 0, 0) if s else (0, 0, 0), radius=2))
            rows.append(np.stack(tiles))
    return make_grid(np.concatenate(rows), cols=3)


# ----------------------------------------------------------------------------- edit
def _latent_from_seed(G, editor, seed: int) -> torch.Tensor:
    from portrait3d.methods.nrsfm.data import sample_latents

    return sample_latents(G, 1, editor.space, seed=seed).reshape(1, -1)


def _latent_from_photo(G, editor, photo: Path, project_steps: int, face_index: int | None,
                       out: Path, force: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.projector import ProjectorConfig, project

    if editor.space == "z":
        raise UsageError("photos can be edited only with a W or W+ editor (Z has no projector)")
    with FacePipeline(style="default", output_size=int(G.img_resolution)) as pipe:
        face = pipe(photo, face_index=face_index)
    if face.num_faces > 1 and face_index is None:
        raise UsageError(f"{face.num_faces} faces found in {photo}: choose one with --face-index (0 = largest)")
    aligned = face.aligned.image
    save_image(out / "aligned.png", aligned, overwrite=force)
    target = torch.as_tensor(aligned).permute(2, 0, 1)[None].float() / 127.5 - 1
    cfg = ProjectorConfig(space=editor.space, steps=project_steps)
    res = project(G, target, cfg, landmarks=face.aligned.landmarks, progress=True)
    ws = res.ws
    latent = ws[:, 0] if editor.space == "w" else ws.reshape(1, -1)
    save_image(out / "projection.png", to_uint8(res.image)[0], overwrite=force)
    return latent.detach(), {"photo": str(photo), "num_faces": face.num_faces,
                             "photo_pose_deg": list(face.pose.angles), "projection_steps": project_steps}


def _edit_core(G, editor, latent: torch.Tensor, q_target: torch.Tensor, mode: str, steps: int, lambda_id: float,
               detector: str) -> dict[str, Any]:
    """Edit one latent and measure it; returns images, landmarks and the result record."""
    from portrait3d.methods.nrsfm.data import ImageLandmarker, synthesize
    from portrait3d.methods.nrsfm.editor import fitted_params
    from portrait3d.methods.nrsfm.evaluate import head_pose_deg, to_pixels, identity_similarity, make_identity_loss

    res = int(G.img_resolution)
    backend = "dlib" if editor.model.scheme == "ibug68" else "mediapipe"
    with torch.no_grad():
        img0 = to_uint8(synthesize(G, latent, editor.space))
    with ImageLandmarker(backend, detector) as lmk, ImageLandmarker("dlib", detector) as idl:
        lm0, ok0 = lmk(img0)
        id0, idok0 = (lm0, ok0) if backend == "dlib" else idl(img0)
        id_loss = None
        if mode == "gradient" and lambda_id > 0:
            if not idok0[0]:
                raise UsageError("no face found in the original image: cannot build the identity term of eq. 15")
            id_loss = make_identity_loss(torch.as_tensor(img0).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                         to_pixels(id0, res))
        t0 = time.time()
        w1, hist = editor.edit(G, latent, q_target, mode, steps=steps, lambda_id=lambda_id, identity_loss=id_loss,
                               progress=mode == "gradient")
        seconds = time.time() - t0
        with torch.no_grad():
            img1 = to_uint8(synthesize(G, w1, editor.space))
        lm1, ok1 = lmk(img1)
        id1, idok1 = (lm1, ok1) if backend == "dlib" else idl(img1)
    lay = editor.layout
    with torch.no_grad():
        q0, q1 = editor.params(latent)[0], editor.params(w1)[0]
    rec: dict[str, Any] = {
        "mode": mode, "edit_seconds": seconds, "parameter_names": lay.names(),
        "target": q_target[0].tolist(), "phi_before": q0.tolist(), "phi_after": q1.tolist(),
        "faces_found": {"before": bool(ok0[0]), "after": bool(ok1[0])},
    }
    if hist:
        rec["loss_history_last"] = hist[-1]
    if ok0[0]:
        rec["fit_before"] = fitted_params(editor, lm0)[0].tolist()
    if ok1[0]:
        rec["fit_after"] = fitted_params(editor, lm1)[0].tolist()
    if idok0[0] and idok1[0]:
        rec["identity_similarity_dlib"] = identity_similarity(img0[0], img1[0], id0[0], id1[0])
        p0, p1 = head_pose_deg(id0[0], res), head_pose_deg(id1[0], res)
        if p0 and p1:
            rec["head_pose_before_deg"], rec["head_pose_after_deg"] = list(p0), list(p1)
            rec["head_pose_change_deg"] = [b - a for a, b in zip(p0, p1)]
    with torch.no_grad():
        pred0 = editor.model.project(q0[None])[0].numpy()
        pred1 = editor.model.project(q_target)[0].numpy()
    panels = [draw_points(draw_points(img0[0], pred0, (230, 30, 30)), lm0[0], (30, 200, 30)),
              draw_points(draw_points(img1[0], pred1, (230, 30, 30)), lm1[0], (30, 200, 30))]
    return {"record": rec, "img0": img0[0], "img1": img1[0], "panels": panels,
            "grid": make_grid(np.stack(panels), cols=2), "latent1": w1}


def _save_edit(out: Path, core: dict[str, Any], latent0: torch.Tensor, extra: dict[str, Any], force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "original.png", core["img0"], overwrite=force)
    save_image(out / "edited.png", core["img1"], overwrite=force)
    save_image(out / "grid.png", core["grid"], overwrite=force)
    _write_npy(out / "original_latent.npy", latent0.cpu().numpy(), force)
    _write_npy(out / "latent.npy", core["latent1"].cpu().numpy(), force)
    _write_json(out / "result.json", {**extra, **core["record"]}, force)


def _source(G, editor, source: str, project_steps: int, face_index: int | None, out: Path,
            force: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """A seed (an integer) or a photo path -> a latent of the editor's space."""
    if source.lstrip("-").isdigit():
        seed = int(source)
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        return _latent_from_seed(G, editor, seed), {"seed": seed}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source} is neither a seed (integer) nor an existing photo")
    out.mkdir(parents=True, exist_ok=True)
    return _latent_from_photo(G, editor, path, project_steps, face_index, out, force)


def run_edit(source: str, network: str, editor_path: Path | None, spec, mode: str, steps: int, lambda_id: float,
             out: Path, force: bool, detector: str = "template", project_steps: int = 300,
             face_index: int | None = None) -> dict[str, Any]:
    """``portrait3d edit``: see the module docstring for what lands in ``out``."""
    from portrait3d.checkpoints import load_network

    editor = resolve_editor(network, editor_path)
    spec.validate(editor.model.num_basis)
    _check_outputs(out, EDIT_OUTPUTS + ("aligned.png", "projection.png"), force)
    G = load_network(network).eval().requires_grad_(False)
    latent0, extra = _source(G, editor, source, project_steps, face_index, out, force)
    q_target = editor.target(latent0, spec)
    core = _edit_core(G, editor, latent0, q_target, mode, steps, lambda_id, detector)
    extra = {"network": network, "space": editor.space, "edit": {"yaw": spec.yaw, "pitch": spec.pitch,
                                                                  "roll": spec.roll, "expr": spec.expr}, **extra}
    _save_edit(out, core, latent0, extra, force)
    return {**extra, **core["record"]}


def run_transfer(source: str, target: str, network: str, editor_path: Path | None, part: str, mode: str, steps: int,
                 lambda_id: float, out: Path, force: bool, detector: str = "template",
                 project_steps: int = 300) -> dict[str, Any]:
    """``portrait3d transfer SOURCE TARGET``: TARGET's face with SOURCE's pose and/or expression (Sec. 4.4)."""
    from portrait3d.checkpoints import load_network
    from portrait3d.methods.nrsfm.data import synthesize
    from portrait3d.methods.nrsfm.edit import transfer_target

    editor = resolve_editor(network, editor_path)
    _check_outputs(out, EDIT_OUTPUTS + ("source.png",), force)
    G = load_network(network).eval().requires_grad_(False)
    w_src, src_info = _source(G, editor, source, project_steps, None, out / "source_inversion", force)
    w_tgt, tgt_info = _source(G, editor, target, project_steps, None, out / "target_inversion", force)
    with torch.no_grad():
        q = transfer_target(editor.params(w_tgt), editor.params(w_src), editor.layout, part)
        src_img = to_uint8(synthesize(G, w_src, editor.space))[0]
    core = _edit_core(G, editor, w_tgt, q, mode, steps, lambda_id, detector)
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "source.png", src_img, overwrite=force)
    extra = {"network": network, "space": editor.space, "part": part, "source": src_info, "target": tgt_info}
    core["grid"] = make_grid(np.stack([src_img, *core["panels"]]), cols=3)
    _save_edit(out, core, w_tgt, extra, force)
    return {**extra, **core["record"]}

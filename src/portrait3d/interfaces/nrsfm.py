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

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.face.io import save_image
from portrait3d.methods.nrsfm.pipeline import (
    EditReport,
    PhotoEditConfig,
    PhotoLatent,
    basis_figure,
    edit_and_measure,
    latent_from_seed,
    project_photo,
    resolve_editor,
)
from portrait3d.utils.io import check_outputs, write_json, write_npy
from portrait3d.utils.visualize import make_grid, to_uint8

__all__ = ["run_build", "run_edit", "run_transfer", "source_latent"]

EDIT_OUTPUTS = ("original.png", "edited.png", "grid.png", "result.json", "latent.npy", "original_latent.npy")
DEFAULT_LAMBDA_ID = 0.01  # eq. 15's lambda_ID for a seed: the paper's



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
    write_json(report_path, report, overwrite=force)
    save_image(basis_path, basis_figure(editor), overwrite=force)
    return report


# ----------------------------------------------------------------------------- edit
def source_latent(G: Any, editor: Any, source: str, project_steps: int, face_index: int | None, out: Path,
                  force: bool, fast: bool = True, pti_steps: int | None = None
                  ) -> tuple[torch.Tensor, dict[str, Any], PhotoLatent | None]:
    """A seed (an integer) or a photo path -> a latent of the editor's space, what to record of it, and the photo's
    projection (None for a seed); a photo's crop and projection are written to ``out`` (``aligned.png``,
    ``projection.png``); ``fast``: :attr:`PhotoEditConfig.fast`."""
    if source.lstrip("-").isdigit():
        seed = int(source)
        if seed < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        return latent_from_seed(G, editor, seed), {"seed": seed}, None
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source} is neither a seed (integer) nor an existing photo")
    cfg = PhotoEditConfig(fast=fast) if pti_steps is None else PhotoEditConfig(fast=fast, pti_steps=pti_steps)
    pl = project_photo(G, editor, path, project_steps, face_index, name=str(path), cfg=cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "aligned.png", pl.aligned, overwrite=force)
    save_image(out / "projection.png", pl.projection, overwrite=force)
    return pl.latent, {**pl.info, "projection": {"identity_weight": cfg.identity_weight,
                                                 "latent_prior_weight": cfg.latent_prior_weight,
                                                 "pti_steps": cfg.pti_steps}}, pl


def _save_edit(out: Path, rep: EditReport, grid: np.ndarray, extra: dict[str, Any], force: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "original.png", rep.original, overwrite=force)
    save_image(out / "edited.png", rep.edited, overwrite=force)
    save_image(out / "grid.png", grid, overwrite=force)
    write_npy(out / "original_latent.npy", rep.latent_before.cpu().numpy(), overwrite=force)
    write_npy(out / "latent.npy", rep.latent_after.detach().cpu().numpy(), overwrite=force)
    record = {**extra, **rep.record()}
    write_json(out / "result.json", record, overwrite=force)
    return record


def run_edit(source: str, network: str, editor_path: Path | None, spec: Any, mode: str, steps: int,
             lambda_id: float | None, out: Path, force: bool, detector: str = "template", project_steps: int = 300,
             face_index: int | None = None, device: str = "cpu", metric: str = "prior",
             feedback: int = 1, fast: bool = True, pti_steps: int | None = None) -> dict[str, Any]:
    """``portrait3d edit``: see the module docstring for what lands in ``out`` (``fast``: a photo's projection on
    the fast path, :attr:`PhotoEditConfig.fast`; ``pti_steps``: pivotal tuning after it, None for
    :attr:`PhotoEditConfig.pti_steps`, the edit then rendering with the tuned generator). ``feedback``: re-edits
    whose asked angles are corrected by what the edited face's landmarks measure (:func:`edit_and_measure`).
    ``lambda_id`` None: the paper's 0.01 to the original render for a seed, :class:`PhotoEditConfig`'s to the photo
    for a photo."""
    from portrait3d.checkpoints import load_network

    editor = resolve_editor(network, editor_path)
    spec.validate(editor.model.num_basis)
    check_outputs(out, EDIT_OUTPUTS + ("aligned.png", "projection.png"), force)
    G = load_network(network, device=device).eval().requires_grad_(False)
    editor.phi.to(device)
    latent0, extra, photo = source_latent(G, editor, source, project_steps, face_index, out, force, fast, pti_steps)
    if photo is not None and photo.generator is not None:
        G = photo.generator  # pivotal tuning: the edit renders with the generator tuned to the photo
    if lambda_id is None:
        lambda_id = DEFAULT_LAMBDA_ID if photo is None else PhotoEditConfig().lambda_id
    reference = None if photo is None else (photo.aligned, photo.landmarks)
    q_target = editor.target(latent0, spec)
    rep = edit_and_measure(G, editor, latent0, q_target, mode, steps, lambda_id, detector, metric, feedback=feedback,
                           spec=spec, identity_reference=reference)
    rep.check_pose(spec)
    extra = {"network": network, "space": editor.space, "metric": metric, "feedback": feedback, "lambda_id": lambda_id,
             "identity_reference": ("none (linear edit)" if mode != "gradient" or lambda_id == 0
                                    else "original render" if photo is None else "photo"),
             "edit": {"yaw": spec.yaw, "pitch": spec.pitch, "roll": spec.roll, "expr": spec.expr,
                      "angles": "absolute" if spec.absolute else "change"}, **extra}
    return _save_edit(out, rep, rep.grid, extra, force)


def run_transfer(source: str, target: str, network: str, editor_path: Path | None, part: str, mode: str, steps: int,
                 lambda_id: float | None, out: Path, force: bool, detector: str = "template",
                 project_steps: int = 300, device: str = "cpu", metric: str = "prior",
                 fast: bool = True, pti_steps: int | None = None) -> dict[str, Any]:
    """``portrait3d transfer SOURCE TARGET``: TARGET's face with SOURCE's pose and/or expression (Sec. 4.4)."""
    from portrait3d.checkpoints import load_network
    from portrait3d.methods.nrsfm.data import synthesize
    from portrait3d.methods.nrsfm.edit import transfer_target

    editor = resolve_editor(network, editor_path)
    check_outputs(out, EDIT_OUTPUTS + ("source.png",), force)
    G = load_network(network, device=device).eval().requires_grad_(False)
    editor.phi.to(device)
    lambda_id = DEFAULT_LAMBDA_ID if lambda_id is None else lambda_id
    # The source gives only its parameters: pivotal tuning (if any) is spent on the target, whose face is edited.
    w_src, src_info, _ = source_latent(G, editor, source, project_steps, None, out / "source_inversion", force, fast,
                                       pti_steps=0)
    w_tgt, tgt_info, tgt_photo = source_latent(G, editor, target, project_steps, None, out / "target_inversion",
                                               force, fast, pti_steps)
    with torch.no_grad():
        q = transfer_target(editor.params(w_tgt), editor.params(w_src), editor.layout, part)
        src_img = to_uint8(synthesize(G, w_src, editor.space))[0]
    G_target = tgt_photo.generator if tgt_photo is not None and tgt_photo.generator is not None else G
    rep = edit_and_measure(G_target, editor, w_tgt, q, mode, steps, lambda_id, detector, metric)
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "source.png", src_img, overwrite=force)
    extra = {"network": network, "space": editor.space, "metric": metric, "part": part, "source": src_info,
             "target": tgt_info}
    return _save_edit(out, rep, make_grid(np.stack([src_img, *rep.panels]), cols=3), extra, force)

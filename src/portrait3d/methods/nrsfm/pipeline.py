"""NRSfM editing of one latent, end to end (Haas et al.): set the rank-one model's parameters (eq. 14 / 15), render,
and measure what was achieved — landmarks, eq. 11's fit, head pose by the face pipeline, dlib identity.

Returns typed reports; writing files is the caller's (``portrait3d edit`` / ``transfer`` in
:mod:`portrait3d.interfaces.nrsfm`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from portrait3d.checkpoints.load import builtin_network_path
from portrait3d.errors import UsageError
from portrait3d.methods.projector.photo import PhotoLatent
from portrait3d.utils.visualize import draw_points, make_grid, to_uint8

__all__ = ["EditReport", "PhotoEditConfig", "PhotoLatent", "builtin_editor_path",
           "resolve_editor", "basis_figure", "latent_from_seed", "project_photo", "edit_and_measure",
           "POSE_TOLERANCE_DEG"]

POSE_TOLERANCE_DEG = 5.0
"""An edit whose measured head-pose change misses the asked change by more than this is reported as short."""


def builtin_editor_path(network: str, space: str = "w") -> Path | None:
    """Where a built-in network's shipped NRSfM editor lives (``None`` for other networks)."""
    generator = builtin_network_path(network)
    return None if generator is None else generator.parent / f"nrsfm-{space.replace('+', 'plus')}.safetensors"


def resolve_editor(network: str, editor_path: Path | None) -> Any:
    """The NRSfM editor at ``editor_path``, else the one shipped beside a built-in ``network``."""
    from portrait3d.methods.nrsfm.editor import NRSfMEditor

    path = editor_path or builtin_editor_path(network)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"no NRSfM editor for network {network!r}: build one with "
                                f"`portrait3d nrsfm build --network {network} --out EDITOR.safetensors` "
                                f"and pass --nrsfm EDITOR.safetensors")
    return NRSfMEditor.load(path)


def basis_figure(editor: Any, size: int = 160) -> np.ndarray:
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


def latent_from_seed(G: nn.Module, editor: Any, seed: int) -> torch.Tensor:
    """The latent (in the editor's space, ``[1, D]``) of generator seed ``seed``."""
    from portrait3d.methods.nrsfm.data import sample_latents

    dev = next(G.parameters()).device
    return sample_latents(G, 1, editor.space, seed=seed, device=dev).reshape(1, -1)


@dataclass(frozen=True)
class PhotoEditConfig:
    """How ``portrait3d edit`` treats a photo (ours, not the paper's; measured on held-out UTKFace photos with
    ``default-2d``, README "Editing pose and expression").

    The projector's defaults leave a latent 2x farther from ``w_avg`` than the generator's samples, where φ was never
    fitted and the generator breaks up under an edit, and keep the person in about half the photos. Here the latent
    prior holds the projection near the samples, a stronger identity term keeps the person, and eq. 15's identity
    term compares the edit with the photo rather than with its projection.
    """

    identity_weight: float = 1.0       # the projector's dlib identity term (ProjectorConfig: 0.1)
    latent_prior_weight: float = 0.02  # the projector's Mahalanobis prior on w (ProjectorConfig: 0)
    lambda_id: float = 1.0             # eq. 15's lambda_ID, to the photo (seeds: the paper's 0.01, to the render)
    fast: bool = True                  # the projection in bf16, perceptual loss at the generator's size (projector
                                       # .photo.project_photo's fast path; README "Photos, and the feedback edit")
    pti_steps: int = 0                 # pivotal tuning after the projection (projector.pti); the edit then renders
                                       # with the tuned generator


def project_photo(G: nn.Module, editor: Any, image: np.ndarray | Path, project_steps: int,
                  face_index: int | None, name: str = "photo",
                  cfg: PhotoEditConfig = PhotoEditConfig()) -> PhotoLatent:
    """Align ``image`` and project it into the editor's space (:func:`portrait3d.methods.projector.project_photo`)
    with ``cfg``'s identity and latent-prior weights."""
    from portrait3d.methods.projector import project_photo as _project

    if editor.space == "z":
        raise UsageError("photos can be edited only with a W or W+ editor (Z has no projector)")
    return _project(G, editor.space, image, project_steps, face_index, name=name,
                    latent_prior_weight=cfg.latent_prior_weight, identity_weight=cfg.identity_weight, fast=cfg.fast,
                    pti_steps=cfg.pti_steps)


@dataclass
class EditReport:
    """One edit: images, latents, and asked-for vs achieved parameters (:meth:`record` for ``result.json``)."""

    mode: str
    seconds: float
    parameter_names: list[str]
    target: list[float]                       # q* asked for
    phi_before: list[float]                   # phi(w) before / after the edit
    phi_after: list[float]
    faces_found: dict[str, bool]
    original: np.ndarray                      # uint8 [R, R, 3]
    edited: np.ndarray
    panels: list[np.ndarray]                  # before | after with landmarks (green detected, red model)
    latent_before: torch.Tensor
    latent_after: torch.Tensor
    fit_before: list[float] | None = None     # eq. 11 fitted to the detected landmarks
    fit_after: list[float] | None = None
    identity_similarity_dlib: float | None = None
    head_pose_before_deg: list[float] | None = None
    head_pose_after_deg: list[float] | None = None
    loss_history_last: dict[str, float] | None = None
    feedback: list[dict[str, Any]] | None = None  # each edit of the feedback loop: target angles, miss, kept
    warnings: list[str] = field(default_factory=list)

    @property
    def head_pose_change_deg(self) -> list[float] | None:
        if self.head_pose_before_deg is None or self.head_pose_after_deg is None:
            return None
        return [b - a for a, b in zip(self.head_pose_before_deg, self.head_pose_after_deg)]

    @property
    def grid(self) -> np.ndarray:
        return make_grid(np.stack(self.panels), cols=len(self.panels))

    def check_pose(self, spec: Any, tolerance_deg: float = POSE_TOLERANCE_DEG) -> None:
        """Warn for each angle of ``spec`` (an :class:`~portrait3d.methods.nrsfm.edit.EditSpec`) that the face
        pipeline measures more than ``tolerance_deg`` away from what was asked (absolute angle, or change)."""
        before, after = self.head_pose_before_deg, self.head_pose_after_deg
        for i, name in enumerate(("yaw", "pitch", "roll")):
            asked = getattr(spec, name)
            if asked is None or (not spec.absolute and asked == 0):
                continue
            what = "" if spec.absolute else " change"
            if before is None or after is None:
                self.warnings.append(f"{name}: asked {asked:+.1f} deg{what}, not measurable (no face found)")
                continue
            got = after[i] if spec.absolute else after[i] - before[i]
            if abs(got - asked) > tolerance_deg:
                self.warnings.append(f"{name}: asked {asked:+.1f} deg{what}, achieved {got:+.1f} deg (measured by the "
                                     f"face pipeline; tolerance {tolerance_deg:g} deg)")

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "mode": self.mode, "edit_seconds": self.seconds, "parameter_names": self.parameter_names,
            "target": self.target, "phi_before": self.phi_before, "phi_after": self.phi_after,
            "faces_found": self.faces_found,
        }
        for k in ("loss_history_last", "fit_before", "fit_after", "identity_similarity_dlib",
                  "head_pose_before_deg", "head_pose_after_deg"):
            if getattr(self, k) is not None:
                rec[k] = getattr(self, k)
        if self.feedback is not None:
            rec["feedback_edits"] = self.feedback
        if self.head_pose_change_deg is not None:
            rec["head_pose_change_deg"] = self.head_pose_change_deg
        rec["warnings"] = list(self.warnings)
        return rec


def edit_and_measure(G: nn.Module, editor: Any, latent: torch.Tensor, q_target: torch.Tensor, mode: str, steps: int,
                     lambda_id: float, detector: str, metric: str = "prior", feedback: int = 0,
                     spec: Any = None, identity_reference: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> EditReport:
    """Edit ``latent`` towards the rank-one parameters ``q_target`` (eq. 14 ``'linear'`` or eq. 15 ``'gradient'``
    with identity weight ``lambda_id``, in the latent ``metric`` of :meth:`NRSfMEditor.edit`) and measure the
    result on the rendered images.

    ``feedback`` (ours, after PIE's feedback step ``theta_new = theta + (theta - theta_est)``): up to that many
    further edits from ``latent``, each with the asked angles of the previous target moved by what the previous edit
    missed, as eq. 11 fitted to the edited image's detected landmarks measures it. The asked angles are those of
    ``spec`` (an :class:`~portrait3d.methods.nrsfm.edit.EditSpec`; absolute, or changes of the original's); without
    ``spec`` there is no feedback. The edit the landmarks put nearest the asked angles is kept. Why: φ was fitted
    where sampled latents lie; a projected photo's latent lies far outside them (default-2d: Mahalanobis norm 80-100
    against 16), where φ misreads the head pose and the edit falls short, while the landmarks of the rendered face
    do not depend on φ.

    ``identity_reference``: the face eq. 15's ``L_ID`` (``1 - cos`` of dlib descriptors) compares with, as
    ``(uint8 image [R, R, 3], its 68 landmarks in pixels [68, 2])``; default the original render.
    """
    from portrait3d.methods.nrsfm.data import ImageLandmarker, synthesize
    from portrait3d.methods.nrsfm.editor import fitted_params
    from portrait3d.methods.nrsfm.evaluate import head_pose_deg, identity_similarity, make_identity_loss, to_pixels

    res = int(G.img_resolution)
    backend = "dlib" if editor.model.scheme == "ibug68" else "mediapipe"
    theta = editor.layout.theta.start
    index = {name: i for i, name in enumerate(editor.layout.names())}  # parameter name -> position in q
    asked = spec.angles() if spec is not None else {}
    with torch.no_grad():
        img0 = to_uint8(synthesize(G, latent, editor.space))
    with ImageLandmarker(backend, detector) as lmk, ImageLandmarker("dlib", detector) as idl:
        lm0, ok0 = lmk(img0)
        id0, idok0 = (lm0, ok0) if backend == "dlib" else idl(img0)
        fit0 = fitted_params(editor, lm0)[0] if ok0[0] else None
        id_loss = None
        if mode == "gradient" and lambda_id > 0:
            if identity_reference is None:
                if not idok0[0]:
                    raise UsageError("no face found in the original image: cannot build the identity term of eq. 15")
                identity_reference = (img0[0], to_pixels(id0[0], res))
            ref, ref_lm = identity_reference
            id_loss = make_identity_loss(torch.as_tensor(ref).permute(2, 0, 1)[None].float().to(latent.device) / 127.5
                                         - 1, np.asarray(ref_lm, np.float64)[None])

        def attempt(q: torch.Tensor) -> dict[str, Any]:
            t0 = time.time()
            w1, hist = editor.edit(G, latent, q, mode, steps=steps, lambda_id=lambda_id, identity_loss=id_loss,
                                   metric=metric, progress=mode == "gradient")
            seconds = time.time() - t0
            with torch.no_grad():
                img1 = to_uint8(synthesize(G, w1, editor.space))
            lm1, ok1 = lmk(img1)
            id1, idok1 = (lm1, ok1) if backend == "dlib" else idl(img1)
            a = {"q": q, "w": w1, "hist": hist, "seconds": seconds, "img": img1, "lm": lm1, "ok": bool(ok1[0]),
                 "id": id1, "idok": bool(idok1[0]), "fit": fitted_params(editor, lm1)[0] if ok1[0] else None}
            a["miss"] = None  # asked minus measured, per asked angle name (degrees)
            if asked and fit0 is not None and a["fit"] is not None:
                a["miss"] = {name: v - float(a["fit"][index[name]] - (0.0 if spec.absolute else fit0[index[name]]))
                             for name, v in asked.items()}
            return a

        tries = [attempt(q_target)]
        for _ in range(feedback):
            last = tries[-1]
            if last["miss"] is None:
                break
            q = last["q"].clone()
            for name, m in last["miss"].items():
                q[:, index[name]] += m
            tries.append(attempt(q))
    scored = [a for a in tries if a["miss"] is not None]
    best = min(scored, key=lambda a: max(abs(m) for m in a["miss"].values())) if scored else tries[0]
    w1, img1, lm1 = best["w"], best["img"], best["lm"]
    with torch.no_grad():
        q0, q1 = editor.params(latent)[0], editor.params(w1)[0]
        pred0 = editor.model.project(q0[None].cpu())[0].numpy()  # the rank-one model lives on the CPU
        pred1 = editor.model.project(q_target.cpu())[0].numpy()
    panels = [draw_points(draw_points(img0[0], pred0, (230, 30, 30)), lm0[0], (30, 200, 30)),
              draw_points(draw_points(img1[0], pred1, (230, 30, 30)), lm1[0], (30, 200, 30))]
    rep = EditReport(mode=mode, seconds=sum(a["seconds"] for a in tries), parameter_names=editor.layout.names(),
                     target=q_target[0].tolist(), phi_before=q0.tolist(), phi_after=q1.tolist(),
                     faces_found={"before": bool(ok0[0]), "after": best["ok"]}, original=img0[0], edited=img1[0],
                     panels=panels, latent_before=latent, latent_after=w1,
                     loss_history_last=best["hist"][-1] if best["hist"] else None)
    if feedback > 0:
        rep.feedback = [{"target_angles_deg": a["q"][0, theta:theta + 3].tolist(),
                         "miss_deg": a["miss"], "kept": a is best} for a in tries]
    if fit0 is not None:
        rep.fit_before = fit0.tolist()
    if best["fit"] is not None:
        rep.fit_after = best["fit"].tolist()
    if idok0[0] and best["idok"]:
        id1 = best["id"]
        rep.identity_similarity_dlib = identity_similarity(img0[0], img1[0], id0[0], id1[0])
        p0, p1 = head_pose_deg(id0[0], res), head_pose_deg(id1[0], res)
        if p0 and p1:
            rep.head_pose_before_deg, rep.head_pose_after_deg = list(p0), list(p1)
    return rep

"""Evaluation of an NRSfM editor: Table 1's columns and the pose / expression edit checks.

Table 1 (per latent space), over held-out latents ``w`` (a seed stream disjoint from the build's):

* ``L_R``: how well the rank-one model explains landmarks: RMS point error of eq. 11's fit
  ``R(q_fit(w))`` against the detected landmarks ``L(w)``;
* ``L_L(w)``: RMS point error of ``R(φ(w))`` against ``L(w)`` (regressor + model);
* ``L_φ``: eq. 12's loss, ``mean ||S⁻¹(φ(w) − q_fit(w))||²`` per parameter;
* ``L_L(w_edit)``: after an edit to a random target ``q*``, RMS error of ``R(q*)`` against the
  landmarks detected on ``G(w_edit)``: did the image go where we asked;
* ``L_ID``: ``1 − cos`` of dlib face descriptors of ``G(w)`` and ``G(w_edit)``.

Point errors are in pixels of the generator's resolution. Random targets change yaw by
``U(−yaw, yaw)``, pitch by ``U(−pitch, pitch)`` degrees and one random α_k by ``N(0, alpha_sigma)``
standard deviations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from portrait3d.methods.nrsfm.data import ImageLandmarker, head_pose_deg, sample_latents, synthesize, to_pixels
from portrait3d.methods.nrsfm.edit import EditSpec
from portrait3d.methods.nrsfm.editor import NRSfMEditor

__all__ = ["EvalConfig", "evaluate_table1", "mouth_component", "identity_similarity", "pose_edit_check",
           "expression_edit_check", "point_rmse", "to_pixels", "head_pose_deg", "make_identity_loss"]


@dataclass
class EvalConfig:
    num_latents: int = 1000
    seed: int = 1_000_003          # disjoint from build seeds (0, 1, ...)
    yaw: float = 20.0
    pitch: float = 10.0
    alpha_sigma: float = 1.0
    modes: tuple[str, ...] = ("linear", "gradient")
    grad_steps: int = 50
    grad_lr: float = 0.01
    lambda_id: float = 0.01
    batch: int = 8
    metric: str = "prior"          # NRSfMEditor.edit's metric: 'prior' (ours) or 'euclidean' (eq. 14 as printed)
    # NRSfMEditor.edit's hold policy (edit.HOLD_POLICIES) and gradient start; None: the metric's own
    hold: str | None = None
    linear_start: bool | None = None


def point_rmse(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-sample RMS Euclidean point distance of ``[N, L, 2]`` arrays (NaN rows give NaN)."""
    a = np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64)
    b = np.asarray(torch.as_tensor(b).detach().cpu(), dtype=np.float64)
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


class _Faces:
    """Synthesis + landmarks (+ dlib identity landmarks) for one generator and editor."""

    def __init__(self, G: torch.nn.Module, editor: NRSfMEditor, detector: str) -> None:
        self.G, self.editor = G, editor
        backend = "dlib" if editor.model.scheme == "ibug68" else "mediapipe"
        self.lm = ImageLandmarker(backend, detector)
        self.id_lm = self.lm if backend == "dlib" else ImageLandmarker("dlib", detector)

    def close(self) -> None:
        self.lm.close()
        if self.id_lm is not self.lm:
            self.id_lm.close()

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> np.ndarray:
        from portrait3d.utils.visualize import to_uint8

        return to_uint8(synthesize(self.G, latents, self.editor.space))

    def landmarks(self, imgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.lm(imgs)

    def id_landmarks(self, imgs: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (lm, np.isfinite(lm).all((1, 2))) if self.id_lm is self.lm else self.id_lm(imgs)


def identity_similarity(img_a: np.ndarray, img_b: np.ndarray, lm_a: np.ndarray, lm_b: np.ndarray) -> float:
    """dlib descriptor cosine of two uint8 faces given their 68 landmarks (normalised ``[0, 1]``)."""
    from portrait3d.face.identity import cosine_similarity, dlib_descriptor

    res = img_a.shape[0]
    da = dlib_descriptor(img_a, to_pixels(lm_a, res))
    db = dlib_descriptor(img_b, to_pixels(lm_b, res))
    return float(cosine_similarity(da, db))


def make_identity_loss(images: torch.Tensor, landmarks68_px: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """``L_ID`` of eq. 15: ``1 − cos`` to ``images`` through the differentiable identity network."""
    from portrait3d.losses.identity import IdentityLoss

    return IdentityLoss(images, landmarks68_px)


def _random_targets(editor: NRSfMEditor, q0: torch.Tensor, cfg: EvalConfig, gen: torch.Generator) -> torch.Tensor:
    lay = editor.layout
    n = len(q0)
    q = q0.detach().clone()
    q[:, lay.theta.start] += (torch.rand(n, generator=gen) * 2 - 1) * cfg.yaw
    q[:, lay.theta.start + 1] += (torch.rand(n, generator=gen) * 2 - 1) * cfg.pitch
    if editor.model.num_basis:
        k = torch.randint(editor.model.num_basis, (n,), generator=gen)
        q[torch.arange(n), lay.alpha.start + k] += torch.randn(n, generator=gen) * cfg.alpha_sigma * editor.alpha_std[k]
    return q


def evaluate_table1(G: torch.nn.Module, editor: NRSfMEditor, cfg: EvalConfig | None = None,
                    detector: str = "mediapipe", progress: bool = True) -> dict[str, Any]:
    """Table 1 for ``editor`` on ``cfg.num_latents`` held-out latents (means over faces found)."""
    from tqdm import tqdm

    from portrait3d.methods.nrsfm.fit import fit_params

    cfg = cfg or EvalConfig()
    res = int(G.img_resolution)
    faces = _Faces(G, editor, detector)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    latents = sample_latents(G, cfg.num_latents, editor.space, seed=cfg.seed)
    rows: dict[str, list[float]] = {k: [] for k in ("L_R", "L_L(w)", "L_phi")}
    for m in cfg.modes:
        rows[f"L_L(w_edit) {m}"], rows[f"L_ID {m}"], rows[f"q_err {m}"] = [], [], []
    found = 0
    try:
        with tqdm(total=cfg.num_latents, desc=f"Table 1 ({editor.space})", unit="latent", disable=not progress) as bar:
            for s in range(0, cfg.num_latents, cfg.batch):
                w = latents[s:s + cfg.batch]
                bar.update(len(w))
                imgs0 = faces.images(w)
                lm0, ok0 = faces.landmarks(imgs0)
                if not ok0.any():
                    continue
                w, imgs0, lm0 = w[ok0], imgs0[ok0], lm0[ok0]
                found += len(w)
                lm0_t = torch.as_tensor(lm0, dtype=torch.float32)
                q_fit = fit_params(editor.model, lm0_t)
                with torch.no_grad():
                    q_phi = editor.params(w)
                    rows["L_R"] += list(point_rmse(editor.model.project(q_fit), lm0) * res)
                    rows["L_L(w)"] += list(point_rmse(editor.model.project(q_phi), lm0) * res)
                    rows["L_phi"] += list((((q_phi - q_fit) / editor.phi.q_std) ** 2).mean(1).numpy())
                q_star = _random_targets(editor, q_phi, cfg, gen)
                id_lm0, id_ok0 = faces.id_landmarks(imgs0, lm0)
                for m in cfg.modes:
                    id_loss = None
                    if m == "gradient" and cfg.lambda_id > 0:
                        ref = torch.as_tensor(imgs0).permute(0, 3, 1, 2).float() / 127.5 - 1
                        id_loss = make_identity_loss(ref, to_pixels(id_lm0, res))
                    w1, _ = editor.edit(G, w, q_star, m, steps=cfg.grad_steps, lr=cfg.grad_lr,
                                        lambda_id=cfg.lambda_id, identity_loss=id_loss, metric=cfg.metric,
                                        hold=cfg.hold, linear_start=cfg.linear_start)
                    imgs1 = faces.images(w1)
                    lm1, ok1 = faces.landmarks(imgs1)
                    with torch.no_grad():
                        rows[f"q_err {m}"] += list((((editor.params(w1) - q_star) / editor.phi.q_std) ** 2)
                                                   .mean(1).numpy())
                        err = point_rmse(editor.model.project(q_star), lm1) * res
                    rows[f"L_L(w_edit) {m}"] += [e for e, ok in zip(err, ok1) if ok]
                    id_lm1, id_ok1 = faces.id_landmarks(imgs1, lm1)
                    for i in range(len(w)):
                        if id_ok0[i] and id_ok1[i]:
                            rows[f"L_ID {m}"].append(1 - identity_similarity(imgs0[i], imgs1[i], id_lm0[i], id_lm1[i]))
    finally:
        faces.close()
    out: dict[str, Any] = {"space": editor.space, "latents": cfg.num_latents, "faces_found": found,
                           "resolution": res, "config": cfg.__dict__.copy()}
    for k, v in rows.items():
        out[k] = float(np.mean(v)) if v else float("nan")
        out[f"{k} n"] = len(v)
    return out


def mouth_component(editor: NRSfMEditor) -> int:
    """1-based index of the basis shape that moves the mouth most relative to the rest of the face."""
    from portrait3d.methods.nrsfm.model import get_scheme

    mouth = list(get_scheme(editor.model.scheme).mouth)
    B = editor.model.B.detach() * editor.alpha_std[:, None, None]   # per-sigma displacement [K, 3, L]
    e = B.square().sum(1)                                            # [K, L]
    ratio = e[:, mouth].mean(1) / e.mean(1).clamp_min(1e-12)
    return int(torch.argmax(ratio)) + 1


def _edit_batches(G, editor, spec: EditSpec, n: int, seed: int, mode: str, detector: str, batch: int,
                  grad_steps: int, lambda_id: float, progress: bool, desc: str, edit_kwargs: dict | None = None):
    """Yield ``(imgs0, lm0, imgs1, lm1)`` per batch of latents that had a face before the edit."""
    from tqdm import tqdm

    res = int(G.img_resolution)
    faces = _Faces(G, editor, detector)
    latents = sample_latents(G, n, editor.space, seed=seed)
    try:
        for s in tqdm(range(0, n, batch), desc=desc, unit="batch", disable=not progress):
            w = latents[s:s + batch]
            imgs0 = faces.images(w)
            lm0, ok0 = faces.landmarks(imgs0)
            if not ok0.any():
                continue
            w, imgs0, lm0 = w[ok0], imgs0[ok0], lm0[ok0]
            id_lm0, _ = faces.id_landmarks(imgs0, lm0)
            id_loss = None
            if mode == "gradient" and lambda_id > 0:
                ref = torch.as_tensor(imgs0).permute(0, 3, 1, 2).float() / 127.5 - 1
                id_loss = make_identity_loss(ref, to_pixels(id_lm0, res))
            w1, _ = editor.edit(G, w, editor.target(w, spec), mode, steps=grad_steps, lambda_id=lambda_id,
                                identity_loss=id_loss, **(edit_kwargs or {}))
            imgs1 = faces.images(w1)
            lm1, _ = faces.landmarks(imgs1)
            id_lm1, _ = faces.id_landmarks(imgs1, lm1)
            yield imgs0, lm0, id_lm0, imgs1, lm1, id_lm1
    finally:
        faces.close()


def pose_edit_check(G, editor: NRSfMEditor, yaw: float = 20.0, n: int = 100, seed: int = 2_000_003,
                    mode: str = "linear", tolerance: float = 5.0, min_identity: float = 0.85,
                    detector: str = "mediapipe", batch: int = 8, grad_steps: int = 50, lambda_id: float = 0.01,
                    progress: bool = True, edit_kwargs: dict | None = None) -> dict[str, Any]:
    """Yaw edit of ``yaw`` degrees on ``n`` latents, measured by the face pipeline's pose estimator.

    A latent passes when the measured yaw change is within ``tolerance`` of ``yaw`` and the dlib
    cosine of before/after is ``>= min_identity``; latents without a face before or after fail.
    ``edit_kwargs`` go to :meth:`NRSfMEditor.edit` (e.g. ``metric``, ``hold``). Also reported: the
    median absolute pitch drift.
    """
    res = int(G.img_resolution)
    dyaw, dpitch, sims, passed, total = [], [], [], 0, 0
    batches = _edit_batches(G, editor, EditSpec(yaw=yaw), n, seed, mode, detector, batch, grad_steps, lambda_id,
                            progress, f"yaw {yaw:+g} ({mode})", edit_kwargs)
    for imgs0, lm0, id0, imgs1, lm1, id1 in batches:
        for i in range(len(imgs0)):
            total += 1
            p0, p1 = head_pose_deg(lm0[i], res), head_pose_deg(lm1[i], res) if np.isfinite(lm1[i]).all() else None
            if p0 is None or p1 is None or not (np.isfinite(id0[i]).all() and np.isfinite(id1[i]).all()):
                continue
            d = p1[0] - p0[0]
            sim = identity_similarity(imgs0[i], imgs1[i], id0[i], id1[i])
            dyaw.append(d)
            dpitch.append(abs(p1[1] - p0[1]))
            sims.append(sim)
            passed += int(abs(d - yaw) <= tolerance and sim >= min_identity)
    return {"target_yaw": yaw, "mode": mode, "latents": n, "with_face": total, "measured": len(dyaw),
            "pass_rate": passed / n, "yaw_change_mean": float(np.mean(dyaw)) if dyaw else float("nan"),
            "yaw_change_median": float(np.median(dyaw)) if dyaw else float("nan"),
            "pitch_drift_median": float(np.median(dpitch)) if dpitch else float("nan"),
            "identity_mean": float(np.mean(sims)) if sims else float("nan")}


def expression_edit_check(G, editor: NRSfMEditor, sigmas: float = 2.0, n: int = 50, seed: int = 3_000_003,
                          component: int | None = None, mode: str = "linear", detector: str = "mediapipe",
                          batch: int = 8, progress: bool = True, edit_kwargs: dict | None = None) -> dict[str, Any]:
    """Edit the mouth component by ``sigmas``: mouth landmark motion vs the rest, and head-pose drift."""
    from portrait3d.methods.nrsfm.model import get_scheme

    k = component or mouth_component(editor)
    res = int(G.img_resolution)
    mouth = np.array(get_scheme(editor.model.scheme).mouth)
    rest = np.setdiff1d(np.arange(editor.model.num_points), mouth)
    mouth_px, rest_px, drift = [], [], []
    for imgs0, lm0, _, imgs1, lm1, _ in _edit_batches(G, editor, EditSpec(expr={k: sigmas}), n, seed, mode, detector,
                                                      batch, 50, 0.01, progress, f"expression {k} ({mode})",
                                                      edit_kwargs):
        for i in range(len(imgs0)):
            if not np.isfinite(lm1[i]).all():
                continue
            d = np.linalg.norm(lm1[i] - lm0[i], axis=-1) * res
            mouth_px.append(d[mouth].mean())
            rest_px.append(d[rest].mean())
            if editor.model.scheme == "ibug68":
                p0, p1 = head_pose_deg(lm0[i], res), head_pose_deg(lm1[i], res)
                if p0 is not None and p1 is not None:
                    drift.append(max(abs(a - b) for a, b in zip(p0, p1)))
    return {"component": k, "sigmas": sigmas, "mode": mode, "measured": len(mouth_px),
            "mouth_motion_px": float(np.mean(mouth_px)) if mouth_px else float("nan"),
            "other_motion_px": float(np.mean(rest_px)) if rest_px else float("nan"),
            "pose_drift_deg_median": float(np.median(drift)) if drift else float("nan"),
            "pose_within_3deg": float(np.mean(np.array(drift) <= 3.0)) if drift else float("nan")}

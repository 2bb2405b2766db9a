"""An NRSfM editor for one generator: rank-one model + regressor φ, built, saved and applied.

:func:`build_editor` runs the whole method on a generator (Sec. 4.1-4.2):

1. landmark data (:mod:`.data`): ``N`` latents of one space and their images' landmarks;
2. non-rigid factorisation of the landmarks (eqs. 3-10, :mod:`.factorize`), on at most
   ``factorize_samples`` of them (the SVDs are ``2N x L``);
3. the parameters ``q`` of every sample by eq. 11 (:func:`.fit.fit_params`);
4. the regressor φ on ``(latent, q)`` pairs (eq. 12, :mod:`.regressor`).

:class:`NRSfMEditor` holds the result and is saved as one safetensors file (tensors ``model.*``,
``phi.*``, ``alpha_std``) with a JSON config in its metadata; loading executes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.checkpoints.native import atomic_write
from portrait3d.errors import UsageError
from portrait3d.methods.nrsfm.data import (
    LandmarkDataConfig,
    LandmarkSet,
    build_landmark_set,
    head_pose_deg,
    latents_to_ws,
)
from portrait3d.methods.nrsfm.edit import (
    EditSpec,
    constrained_rows,
    edit_target,
    gradient_edit,
    linear_edit,
    prior_factor,
)
from portrait3d.methods.nrsfm.regressor import ParamRegressor, RegressorConfig, train_regressor

__all__ = ["EDITOR_FORMAT", "BuildConfig", "NRSfMEditor", "build_editor"]

EDITOR_FORMAT = "portrait3d-nrsfm"
MIN_CALIBRATION_CORR = 0.8
"""Least correlation of NRSfM's and the PnP yaw for :func:`depth_scale_to_pose` to calibrate (default-2d: 0.987)."""


@dataclass
class BuildConfig:
    """Everything :func:`build_editor` needs besides the generator."""

    data: LandmarkDataConfig = field(default_factory=LandmarkDataConfig)
    num_basis: int = 8
    factorize_samples: int = 4000
    factorize_steps: int = 2000
    # Joint refinement after eqs. 3-10 lowers the landmark error a little but, on real faces, lets
    # the basis trade depth relief for pose (500 UTKFace photos, K=3: NRSfM yaw vs PnP yaw median
    # |diff| 8.3 deg with 100 rounds, 2.5 deg without; RMSE 2.8 vs 3.0 px at 200 px), and edits are
    # judged by the pose estimator: so the paper's plain pipeline is the default.
    refine_iters: int = 0
    # Give the mean shape the relief of the measured 3D mean face (ibug68), so NRSfM's angles are in the units
    # of the face pipeline's pose estimates (:func:`~portrait3d.methods.nrsfm.factorize.depth_scale_to_reference`).
    # On default-2d's samples the factorised face was 1.26x too shallow and its yaw 1.5x the PnP yaw.
    depth_prior: bool = True
    # Then refine that factor until the fitted yaw agrees in slope with the face pipeline's PnP yaw of the same
    # landmarks (the pose estimate edits are judged by): the mean-face prior alone left NRSfM's yaw 1.17x the PnP
    # yaw on default-2d (slope 0.853 over 500 samples), and +20 deg edits measured 16.6 deg.
    pose_calibration: bool = True
    calibration_samples: int = 1000
    fit_steps: int = 200
    regressor: RegressorConfig = field(default_factory=RegressorConfig)


class NRSfMEditor:
    """Rank-one model + φ for latents of ``space`` of one generator.

    Attributes:
        model: :class:`~portrait3d.methods.nrsfm.model.RankOneModel`.
        phi: :class:`~portrait3d.methods.nrsfm.regressor.ParamRegressor`.
        space: ``'z'``, ``'w'`` or ``'w+'``.
        alpha_std: ``[K]`` standard deviation of each fitted α_k over the data (the unit of ``--expr``).
        latent_factor: ``[D, r]`` factor of the latents' covariance (:func:`.edit.prior_factor`), the metric of
            linear edits; ``None`` (editors built before it existed): Euclidean, eq. 14 as printed.
        meta: provenance and build figures (network fingerprint, landmark backend, errors).
    """

    def __init__(self, model: Any, phi: ParamRegressor, space: str, alpha_std: torch.Tensor,
                 meta: dict[str, Any] | None = None, latent_factor: torch.Tensor | None = None) -> None:
        self.model, self.phi, self.space = model, phi.eval(), space
        self.alpha_std = torch.as_tensor(alpha_std, dtype=torch.float32)
        self.latent_factor = None if latent_factor is None else torch.as_tensor(latent_factor, dtype=torch.float32)
        if self.latent_factor is not None and (self.latent_factor.ndim != 2
                                               or self.latent_factor.shape[0] != phi.in_dim):
            raise UsageError(f"latent factor {tuple(self.latent_factor.shape)} does not match the regressor's "
                             f"input size {phi.in_dim}")
        self.meta = dict(meta or {})

    @property
    def layout(self):
        return self.model.layout

    # ------------------------------------------------------------------ parameters and edits
    def params(self, latents: torch.Tensor) -> torch.Tensor:
        """``φ(latents)``, ``[N, P]`` (latents flattened to ``[N, D]``)."""
        return self.phi(latents.reshape(len(latents), -1))

    def target(self, latents: torch.Tensor, spec: EditSpec) -> torch.Tensor:
        with torch.no_grad():
            return edit_target(self.params(latents), spec, self.layout, self.alpha_std)

    def edit(self, G: torch.nn.Module, latents: torch.Tensor, q_target: torch.Tensor, mode: str = "linear", *,
             steps: int = 50, lr: float = 0.01, lambda_id: float = 0.01, identity_loss=None,
             perceptual_loss=None, lambda_p: float = 0.0, iterations: int = 1, metric: str = "prior",
             hold: str | None = None, linear_start: bool | None = None,
             progress: bool = False) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Latents reaching ``q_target``: eq. 14 (``mode='linear'``) or eq. 15 (``'gradient'``).

        ``metric='prior'`` (ours): steps in the latents' covariance (when the editor has it), holding the
        parameters of ``hold`` (default ``'auto'``, :data:`.edit.HOLD_POLICIES`), gradient edits started from the
        linear edit (``linear_start``, default on; measured on default-2d, 24 latents, +20 deg yaw: 67% pass
        against 33% from ``latents`` and 50% for the linear edit alone). ``metric='euclidean'``: the paper's
        eqs. 14-15, by default holding every parameter and starting from ``latents``.
        """
        flat = latents.reshape(len(latents), -1)
        if metric not in ("prior", "euclidean"):
            raise UsageError(f"unknown edit metric {metric!r} (choose prior or euclidean)")
        paper = metric == "euclidean"
        hold = hold if hold is not None else ("all" if paper else "auto")
        linear_start = (not paper) if linear_start is None else linear_start
        factor = None if paper else self.latent_factor
        with torch.no_grad():
            rows = constrained_rows(self.phi(flat), q_target, self.layout, hold)
        if mode == "linear":
            out, hist = linear_edit(self.phi, flat, q_target, iterations=iterations, metric=factor, rows=rows), []
        elif mode == "gradient":
            def render(w: torch.Tensor) -> torch.Tensor:
                return G.synthesis(latents_to_ws(G, w, self.space), noise_mode="const", force_fp32=True)

            init = linear_edit(self.phi, flat, q_target, metric=factor, rows=rows) if linear_start else None
            out, hist = gradient_edit(self.phi, flat, q_target, steps=steps, lr=lr, render=render, init=init,
                                      identity_loss=identity_loss, lambda_id=lambda_id,
                                      perceptual_loss=perceptual_loss, lambda_p=lambda_p, metric=factor,
                                      rows=rows, progress=progress)
        else:
            raise UsageError(f"unknown edit mode {mode!r} (choose linear or gradient)")
        return out.reshape(latents.shape), hist

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, half: bool = False) -> Path:
        """Write the editor; ``half`` stores φ's weights and the latent factor in float16 (shipped editors), the
        rank-one model and the normalisations in float32 (loading casts everything back to float32)."""
        from safetensors.torch import save_file

        def store(v: torch.Tensor) -> torch.Tensor:
            return (v.half() if half else v).detach().cpu().contiguous()

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_tensors().items()}
        tensors.update({f"phi.{k}": store(v) if k.startswith("net.") else v.detach().cpu().contiguous()
                        for k, v in self.phi.state_dict().items()})
        tensors["alpha_std"] = self.alpha_std.cpu().contiguous()
        if self.latent_factor is not None:
            tensors["latent_factor"] = store(self.latent_factor)
        meta = {"format": EDITOR_FORMAT, "format_version": "1", "space": self.space,
                "scheme": self.model.scheme, "phi": json.dumps(self.phi.config()), "meta": json.dumps(self.meta)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NRSfMEditor":
        from safetensors import SafetensorError, safe_open

        from portrait3d.methods.nrsfm.model import RankOneModel

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no NRSfM editor file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{path} is not a readable safetensors file ({e})") from None
        if meta.get("format") != EDITOR_FORMAT:
            raise UsageError(f"{path} is not a portrait3d NRSfM editor (format {meta.get('format')!r})")
        try:
            model = RankOneModel.from_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                                              scheme=meta["scheme"])
            phi = ParamRegressor(**json.loads(meta["phi"]))
            phi.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("phi.")}, strict=True)
            alpha_std = tensors["alpha_std"]
            if alpha_std.shape != (model.num_basis,) or phi.out_dim != model.layout.size:
                raise UsageError("model, regressor and alpha_std disagree in size")
            return cls(model, phi, meta["space"], alpha_std, json.loads(meta.get("meta", "{}")),
                       latent_factor=tensors.get("latent_factor"))
        except (KeyError, RuntimeError, ValueError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: corrupt NRSfM editor ({str(e).splitlines()[0]})") from None


def build_editor(G: torch.nn.Module, cfg: BuildConfig, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool = True, landmarks: LandmarkSet | None = None) -> tuple[NRSfMEditor, dict[str, Any]]:
    """The whole method on ``G`` (steps 1-4 of the module docstring); returns the editor and a report."""
    from portrait3d.methods.nrsfm.factorize import depth_scale_to_reference, factorize, scale_depth
    from portrait3d.methods.nrsfm.fit import fit_params, reprojection_error

    data = landmarks if landmarks is not None else build_landmark_set(G, cfg.data, cache_dir, progress)
    good = data.only_valid()
    if len(good) < max(50, 2 * (cfg.num_basis + 6)):
        raise UsageError(f"only {len(good)} of {len(data)} generated faces had landmarks: too few to factorise "
                         f"(detection rate {data.detection_rate:.2f}; try --detector template)")
    lm = torch.as_tensor(good.landmarks, dtype=torch.float32)
    n_fac = min(len(good), cfg.factorize_samples)
    fac = factorize(lm[:n_fac], num_basis=cfg.num_basis, scheme=good.scheme, steps=cfg.factorize_steps,
                    refine_iters=cfg.refine_iters, progress=progress)
    model = fac.model
    depth_factor, calibration = 1.0, None
    if cfg.depth_prior and model.scheme == "ibug68":
        depth_factor = depth_scale_to_reference(model)
        model = scale_depth(model, depth_factor)
        if cfg.pose_calibration:
            sub = good.landmarks[:cfg.calibration_samples]
            factor, calibration = depth_scale_to_pose(model, sub, pnp_yaw(sub, good.resolution))
            model = scale_depth(model, factor)
            depth_factor *= factor
    q = fit_params(model, lm, steps=cfg.fit_steps, progress=progress)
    fit_rmse = reprojection_error(model, q, lm)
    phi, hist = train_regressor(good.latents, q.detach().cpu().numpy(), cfg.regressor, progress=progress)
    alpha_std = q[:, model.layout.alpha].std(0).clamp_min(1e-8) if model.num_basis else torch.zeros(0)
    latent_factor = prior_factor(good.latents) if good.space != "z" else None  # z's prior is N(0, I): Euclidean
    res = good.resolution
    report = {
        "samples": len(data), "with_landmarks": len(good), "detection_rate": data.detection_rate,
        "factorized_samples": n_fac, "num_basis": cfg.num_basis, "scheme": good.scheme, "space": good.space,
        "factorization_rmse_px": float(fac.reprojection_rmse) * res,
        "rigid_rmse_px": float(fac.rigid_rmse) * res,
        "depth_prior_factor": depth_factor,
        "pose_calibration": calibration,
        "fit_rmse_px_median": float(fit_rmse.median()) * res,
        "regressor_val_loss": hist["val"][-1] if hist["val"] else None,
        "regressor_best_val_loss": min(hist["val"]) if hist["val"] else None,
        "yaw_range_deg": [float(q[:, model.layout.theta.start].min()), float(q[:, model.layout.theta.start].max())],
        "config": {"data": asdict(cfg.data), "num_basis": cfg.num_basis, "factorize_samples": cfg.factorize_samples,
                   "factorize_steps": cfg.factorize_steps, "refine_iters": cfg.refine_iters,
                   "depth_prior": cfg.depth_prior, "pose_calibration": cfg.pose_calibration,
                   "calibration_samples": cfg.calibration_samples,
                   "fit_steps": cfg.fit_steps,
                   "regressor": asdict(cfg.regressor)},
    }
    editor = NRSfMEditor(model, phi, good.space, alpha_std, meta={"build": report, "resolution": res},
                         latent_factor=latent_factor)
    return editor, report


def pnp_yaw(landmarks: np.ndarray, resolution: int) -> np.ndarray:
    """The face pipeline's PnP yaw (degrees, NaN where PnP fails) of normalised 68 landmarks ``[N, 68, 2]``: the
    :func:`.data.head_pose_deg` that edits are judged by."""
    poses = (head_pose_deg(np.asarray(lm, np.float64), resolution) for lm in landmarks)
    return np.array([np.nan if p is None else p[0] for p in poses], dtype=np.float64)


def depth_scale_to_pose(model: Any, landmarks: np.ndarray, yaw_ref: np.ndarray, rounds: int = 3,
                        fit_steps: int = 100) -> tuple[float, dict[str, Any]]:
    """The depth factor (:func:`.factorize.scale_depth`) that makes eq. 11's fitted yaw agree in slope with
    ``yaw_ref`` (degrees, one per landmark set; NaN ignored).

    The bas-relief ambiguity trades depth for angle: for small angles the image displacement is about
    ``depth x angle``, so the factor is updated ``f <- f / b`` with ``b`` the least-squares slope of
    ``yaw_ref`` on the fitted yaw, ``rounds`` times (the relation is only first order).

    Skipped (factor 1, with the reason under ``"skipped"``) when fewer than 20 sets have a PnP pose, when the two
    yaws correlate below :data:`MIN_CALIBRATION_CORR` (nothing to calibrate against), or when no factor within
    ``[0.5, 2]`` brings the slope within 0.1 of 1.

    Returns:
        ``(factor, {"slope_before", "slope_after", "samples", "correlation"[, "skipped"]})``.
    """
    from portrait3d.methods.nrsfm.factorize import scale_depth
    from portrait3d.methods.nrsfm.fit import fit_params

    ok = np.isfinite(yaw_ref)
    if ok.sum() < 20:
        return 1.0, {"skipped": f"only {int(ok.sum())} landmark sets have a PnP pose", "samples": int(ok.sum())}
    lm = torch.as_tensor(np.asarray(landmarks)[ok], dtype=torch.float32)
    ref = torch.as_tensor(yaw_ref[ok], dtype=torch.float64)
    factor, slopes, corr = 1.0, [], float("nan")
    for r in range(rounds + 1):
        q = fit_params(scale_depth(model, factor), lm, steps=fit_steps)
        yaw = q[:, model.layout.theta.start].to(torch.float64)
        yc, rc = yaw - yaw.mean(), ref - ref.mean()
        slopes.append(float((yc * rc).sum() / yc.square().sum().clamp_min(1e-12)))
        if r == 0:
            corr = float((yc * rc).sum() / (yc.norm() * rc.norm()).clamp_min(1e-12))
            if not corr >= MIN_CALIBRATION_CORR:
                return 1.0, {"skipped": f"NRSfM and PnP yaw correlate at {corr:.2f} only", "samples": int(ok.sum()),
                             "slope_before": slopes[0], "correlation": corr}
        if r < rounds:
            factor = float(np.clip(factor / slopes[-1], 0.5, 2.0))
    info = {"slope_before": slopes[0], "slope_after": slopes[-1], "samples": int(ok.sum()), "correlation": corr}
    if abs(slopes[-1] - 1) > 0.1:  # did not converge: keep the mean-face relief
        return 1.0, {**info, "skipped": "no depth factor in [0.5, 2] matches the PnP yaw"}
    return factor, info


def fitted_params(editor: NRSfMEditor, landmarks: np.ndarray, steps: int = 200) -> torch.Tensor:
    """Eq. 11 on landmarks ``[N, L, 2]`` (normalised), ``q [N, P]``: what an image's landmarks say."""
    from portrait3d.methods.nrsfm.fit import fit_params

    return fit_params(editor.model, torch.as_tensor(landmarks, dtype=torch.float32), steps=steps)

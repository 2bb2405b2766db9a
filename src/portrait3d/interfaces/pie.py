"""``portrait3d pie``: embed a portrait with PIE and edit its head pose, expression and light through the rig.

Outputs of ``portrait3d pie PHOTO --out DIR``:

* ``input_aligned.png``: the photo's face in the generator's crop;
* ``reconstruction.png``: ``G(w)`` of the embedding;
* ``edited.png``: the edit (when one is asked);
* ``grid.png``: input | reconstruction | rig over the reconstruction | edit | rig over the edit;
* ``embedding.npz``: the W+ latent and the rig parameters of the reconstruction (no pickles);
* ``result.json``: settings, the target and the measured rig parameters of each edit, the head pose the face
  pipeline measures on input, reconstruction and edit, and the dlib identity distance of each to the input.

``portrait3d pie edit DIR --yaw 10`` edits an existing embedding again (RigNets and one generator pass, no new
optimisation: well under a second on a CPU) and rewrites ``edited.png``, ``grid.png`` and ``edit.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.utils.io import check_outputs, save_image, write_json
from portrait3d.utils.visualize import from_uint8, to_uint8

__all__ = ["PIE_MODELS", "EditSpec", "load_embedder", "measure_pose_identity", "embed_photo", "run_pie", "run_pie_edit"]

PIE_MODELS = Path(__file__).resolve().parents[1] / "models" / "pie"
OUTPUTS = ("input_aligned.png", "reconstruction.png", "edited.png", "grid.png", "embedding.npz", "result.json")


class EditSpec:
    """What the user asked: absolute head yaw / pitch (degrees, the face pipeline's convention), expression
    coefficients by name, and a light direction (x right, y up, z toward the viewer)."""

    def __init__(self, yaw: float | None = None, pitch: float | None = None,
                 expression: dict[str, float] | None = None, light: tuple[float, float, float] | None = None) -> None:
        for name, v in (("yaw", yaw), ("pitch", pitch)):
            if v is not None and not -60.0 <= v <= 60.0:
                raise UsageError(f"--{name} must be within -60..60 degrees (the rig and the generator cannot turn "
                                 f"further), not {v:g}")
        if light is not None and float(np.linalg.norm(light)) == 0:
            raise UsageError("--light needs a non-zero direction x,y,z")
        self.yaw, self.pitch, self.expression, self.light = yaw, pitch, dict(expression or {}), light

    @property
    def empty(self) -> bool:
        return self.yaw is None and self.pitch is None and not self.expression and self.light is None

    def to_dict(self) -> dict[str, Any]:
        return {"yaw": self.yaw, "pitch": self.pitch, "expression": self.expression, "light": self.light}

    def targets(self, current: Any, names: list[str]) -> dict[str, Any]:
        """Per mode, the current :class:`RigParams` with the asked parameters set."""
        out: dict[str, Any] = {}
        if self.yaw is not None or self.pitch is not None:
            a = current.angles.clone()
            if self.yaw is not None:
                a[:, 0] = self.yaw
            if self.pitch is not None:
                a[:, 1] = self.pitch
            out["pose"] = current.replace(angles=a)
        if self.expression:
            e = current.expression.clone()
            for k, v in self.expression.items():
                if k not in names:
                    raise UsageError(f"unknown expression {k!r} (the rig has: {', '.join(names)})")
                e[:, names.index(k)] = float(v)
            out["expression"] = current.replace(expression=e)
        if self.light is not None:
            lt = current.light.clone().reshape(-1, 3, 9)
            x, y, z = (float(c) for c in np.asarray(self.light, np.float64) / np.linalg.norm(self.light))
            k = 0.5 * lt[:, :, 0:1]  # a directional term half the ambient level
            # camera frame: x right, y down, z forward; basis terms 1..3 are -n_y, n_z, -n_x (face_model.sh_basis)
            lt[:, :, 1:4] = k * torch.tensor([y, -z, -x])
            out["light"] = current.replace(light=lt.reshape(-1, 27))
        return out


def load_embedder(network: str = "default-2d", models: Path | None = None, recog: bool = True) -> Any:
    """The generator, the rig, the estimator and the RigNets found in ``models`` (default: the shipped ones)."""
    from portrait3d.checkpoints import load_network
    from portrait3d.methods.pie.embed import PieEmbedder
    from portrait3d.methods.pie.estimator import ParamEstimator
    from portrait3d.methods.pie.face_model import FaceModel
    from portrait3d.methods.pie.rignet import MODES, RigNet

    folder = Path(models) if models is not None else PIE_MODELS
    est_path = folder / "estimator.safetensors"
    if not est_path.is_file():
        raise UsageError(f"no PIE estimator in {folder} (train one: portrait3d train pie-estimator)")
    rignets = {m: RigNet.load(folder / f"rignet-{m}.safetensors") for m in MODES
               if (folder / f"rignet-{m}.safetensors").is_file()}
    encoder = None
    if recog:
        from portrait3d.losses.identity import _default_encoder

        encoder = _default_encoder()
    from portrait3d.losses.perceptual import PerceptualLoss

    G = load_network(network)
    if getattr(G, "c_dim", 0) != 0 or not hasattr(G, "mapping"):
        raise UsageError(f"{network}: PIE edits a 2D StyleGAN2 generator")
    perceptual = PerceptualLoss(resize=None).eval().requires_grad_(False)
    return PieEmbedder(G, FaceModel.load("face-rig"), ParamEstimator.load(est_path), rignets,
                       perceptual=perceptual, identity_encoder=encoder)


def _check_modes(emb: Any, spec: EditSpec) -> None:
    """Refuse an edit whose RigNet is missing before any work is done."""
    asked = [m for m, on in (("pose", spec.yaw is not None or spec.pitch is not None),
                             ("expression", bool(spec.expression)), ("light", spec.light is not None)) if on]
    missing = [m for m in asked if m not in emb.rignets]
    if missing:
        raise UsageError(f"no RigNet for {', '.join(missing)} edits is installed (train one: portrait3d train rignet "
                         f"--mode {missing[0]}; installed: {', '.join(sorted(emb.rignets)) or 'none'})")


def _u8(img: torch.Tensor) -> np.ndarray:
    return to_uint8(img)[0]


def _overlay(emb: Any, img: torch.Tensor) -> np.ndarray:
    """The image with the rig of its estimated parameters blended half over the face."""
    with torch.no_grad():
        return _u8(emb.rig.overlay(emb.theta(img), img, alpha=0.5))


def measure_pose_identity(images: dict[str, np.ndarray], analyzer: Any = None) -> dict[str, Any]:
    """Head pose (face pipeline) of each image and its dlib identity distance to the first one (the input; None
    for every image when the input shows no face). ``analyzer``: a FaceAnalyzer to reuse."""
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.pose import estimate_head_pose

    out: dict[str, Any] = {}
    ref: np.ndarray | None = None
    fa = analyzer if analyzer is not None else FaceAnalyzer("mediapipe")
    try:
        for k, (name, img) in enumerate(images.items()):
            lm = fa.landmarks(img)
            if lm is None:
                out[name] = {"face": False}
                continue
            pose = estimate_head_pose(lm, (img.shape[1], img.shape[0]))
            desc = fa.descriptor(img, lm)
            if k == 0:
                ref = desc
            out[name] = {"face": True, "yaw_deg": pose.yaw_deg, "pitch_deg": pose.pitch_deg,
                         "identity_distance": None if ref is None else float(np.linalg.norm(desc - ref))}
    finally:
        if analyzer is None:
            fa.close()
    return out


def _edit_outputs(emb: Any, ws: torch.Tensor, spec: EditSpec, aligned: np.ndarray, recon: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with torch.no_grad():
        params = emb.theta(emb.render(ws))
    names = list(emb.rig.config.expression_names)
    t0 = time.perf_counter()
    edited_ws, report = emb.edit(ws, spec.targets(params, names))
    with torch.no_grad():
        edited = emb.render(edited_ws)
    seconds = time.perf_counter() - t0
    grid = np.concatenate([aligned, recon, _overlay(emb, from_uint8(recon)), _u8(edited), _overlay(emb, edited)],
                          axis=1)
    return _u8(edited), grid, {"edits": report, "edit_seconds": seconds}


def embed_photo(emb: Any, photo: Path | np.ndarray, cfg: Any, face_index: int | None = None,
                progress: Any = None) -> tuple[Any, Any, float, float]:
    """Align the face of ``photo`` (a path, or ``uint8 [H, W, 3]``) in the generator's crop and embed it with PIE.

    Returns ``(face, result, align_seconds, embed_seconds)``: the face pipeline's
    :class:`~portrait3d.face.pipeline.FaceResult` (``face.aligned.image`` is what was embedded) and the
    :class:`~portrait3d.methods.pie.embed.EmbedResult`. ``progress(step, energies)`` follows the optimisation.
    Raises FaceError (one line) when the photo shows no usable face."""
    from portrait3d.face.pipeline import FacePipeline

    t0 = time.perf_counter()
    with FacePipeline(style="default", output_size=int(emb.G.img_resolution)) as pipe:
        face = pipe(photo, face_index=face_index)
    target = from_uint8(face.aligned.image)
    with torch.no_grad():  # the identity chip of E_recog, placed by the estimated rig's five points
        five = emb._five_points(emb.theta(target), target.shape[-1])[0]
    t1 = time.perf_counter()
    res = emb.embed(target, cfg, landmarks5=five, progress=progress)
    return face, res, t1 - t0, time.perf_counter() - t1


def run_pie(photo: Path, out: Path, spec: EditSpec, network: str = "default-2d", models: Path | None = None,
            steps_w: int | None = None, steps_wplus: int | None = None, face_index: int | None = None,
            force: bool = False, progress: bool = True, embedder: Any = None) -> dict[str, Any]:
    """Align ``photo``, embed it with PIE, apply ``spec`` and write the outputs of the module docstring.
    ``embedder``: one already loaded by :func:`load_embedder` for ``network`` and ``models`` (a batch reuses it)."""
    from portrait3d.face.pipeline import several_faces_note
    from portrait3d.methods.pie.embed import PieConfig

    check_outputs(out, OUTPUTS, force)
    if not Path(photo).is_file():
        raise FileNotFoundError(f"no photo at {photo}")
    emb = embedder if embedder is not None else load_embedder(network, models)
    _check_modes(emb, spec)
    cfg = PieConfig(modes=sorted(emb.rignets))
    if steps_w is not None:
        cfg.steps_w = steps_w
    if steps_wplus is not None:
        cfg.steps_wplus = steps_wplus
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps_w + cfg.steps_wplus, desc="PIE embedding", unit="step")

    def tick(step: int, rec: dict[str, float]) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], syn=f"{rec['syn_pixel']:.4f}")

    try:
        face, res, t_align, t_embed = embed_photo(emb, photo, cfg, face_index, tick)
    finally:
        if bar is not None:
            bar.close()
    aligned = face.aligned.image
    with torch.no_grad():
        recon = _u8(emb.render(res.ws))
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "input_aligned.png", aligned, overwrite=force)
    save_image(out / "reconstruction.png", recon, overwrite=force)
    images = {"input": aligned, "reconstruction": recon}
    info: dict[str, Any] = {}
    if not spec.empty:
        edited, grid, info = _edit_outputs(emb, res.ws, spec, aligned, recon)
        save_image(out / "edited.png", edited, overwrite=force)
        images["edited"] = edited
    else:
        grid = np.concatenate([aligned, recon, _overlay(emb, from_uint8(recon))], axis=1)
    save_image(out / "grid.png", grid, overwrite=force)
    from portrait3d.utils.io import atomic_write

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, ws=res.ws.numpy(), params=res.params.vector().numpy())

    atomic_write(out / "embedding.npz", write_npz, overwrite=force)
    result = {"photo": str(photo), "network": network, "models": str(models or PIE_MODELS), "spec": spec.to_dict(),
              "config": cfg.to_dict(), "seconds": {"align": t_align, "embed": t_embed},
              "final_energies": res.history[-1] if res.history else {}, "measured": measure_pose_identity(images),
              "notes": several_faces_note(face, face_index, str(photo)), **info}
    write_json(out / "result.json", result, overwrite=force)
    return result


def run_pie_edit(folder: Path, spec: EditSpec, force: bool = True) -> dict[str, Any]:
    """Edit an embedding written by :func:`run_pie` again, without re-embedding."""
    from portrait3d.face.io import load_image

    if spec.empty:
        raise UsageError("nothing to edit: give --yaw, --pitch, --expr or --light")
    res_path = Path(folder) / "result.json"
    if not res_path.is_file() or not (Path(folder) / "embedding.npz").is_file():
        raise UsageError(f"{folder} holds no PIE embedding (run `portrait3d pie PHOTO --out {folder}` first)")
    prev = json.loads(res_path.read_text())
    emb = load_embedder(prev["network"], Path(prev["models"]), recog=False)
    _check_modes(emb, spec)
    with np.load(Path(folder) / "embedding.npz", allow_pickle=False) as d:
        ws = torch.from_numpy(d["ws"])
    if ws.shape[1:] != (emb.G.num_ws, emb.G.w_dim):
        raise UsageError(f"{folder}: the embedding does not fit {prev['network']}")
    aligned = load_image(Path(folder) / "input_aligned.png")
    recon = load_image(Path(folder) / "reconstruction.png")
    edited, grid, info = _edit_outputs(emb, ws, spec, aligned, recon)
    save_image(Path(folder) / "edited.png", edited, overwrite=True)
    save_image(Path(folder) / "grid.png", grid, overwrite=True)
    result = {"spec": spec.to_dict(), "measured": measure_pose_identity({"input": aligned, "edited": edited}), **info}
    write_json(Path(folder) / "edit.json", result, overwrite=True)
    return result

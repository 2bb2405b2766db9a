"""Method adapters of the web editor: one class per editing method behind one small interface.

The editor knows nothing about any method. It asks each :class:`MethodAdapter` in :data:`ADAPTERS`:

* :meth:`~MethodAdapter.available` -- can it run here (models installed / given), and if not, why;
* :meth:`~MethodAdapter.controls` -- the sliders it offers (:class:`Control`);
* :meth:`~MethodAdapter.embed` -- the slow step, run once per photo or seed: a seed is sampled, a photo is
  aligned and inverted; returns an :class:`Embedding` that caches everything rendering needs;
* :meth:`~MethodAdapter.render` -- the fast step, run on every slider move: an image from the embedding and
  the slider values;
* optionally :meth:`~MethodAdapter.orbit_frames` (the orbit video) and :meth:`~MethodAdapter.write_mesh`
  (a mesh file), announced by :attr:`~MethodAdapter.exports`.

Adding a method (PIE, a W_tri encoder, ...) is one new subclass appended to :data:`ADAPTERS`.

Adapters load their networks lazily, on first use, and keep them: starting the editor costs nothing, and a
method whose model is missing only says so (``available()``) instead of failing the whole editor. Nothing
here imports gradio: the adapters are plain Python, tested without a browser.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from portrait3d.errors import UsageError

__all__ = ["ADAPTERS", "Availability", "Control", "Embedding", "Inversion3DAdapter", "LiftedGANAdapter",
           "MethodAdapter", "MethodSettings", "NRSfMAdapter", "PIEAdapter", "Progress", "Source", "build_registry"]

Progress = Callable[[float, str], None]
"""``progress(fraction in [0, 1], description)``: how far the slow embedding is."""

Source = int | np.ndarray
"""What is embedded: a seed (``int >= 0``) or a photo (``uint8 [H, W, 3]`` RGB, already validated)."""


def _no_progress(fraction: float, desc: str) -> None:
    """The default :data:`Progress`: report nothing."""


@dataclass(frozen=True)
class Control:
    """One slider of a method.

    Attributes:
        key: name the adapter reads the value under (``"yaw"``, ``"expr1"``, ...).
        label: what the user reads; minimum / maximum / step: the slider's range;
        value: its default (an :class:`Embedding` may start elsewhere, see ``Embedding.values``);
        info: one line of help under the slider.
    """

    key: str
    label: str
    minimum: float
    maximum: float
    step: float = 1.0
    value: float = 0.0
    info: str = ""

    def clamp(self, v: float) -> float:
        """``v`` moved into ``[minimum, maximum]``."""
        return float(min(max(float(v), self.minimum), self.maximum))

    def snap(self, v: float) -> float:
        """``v`` clamped and rounded to the slider's step (what the slider can show)."""
        steps = round((self.clamp(v) - self.minimum) / self.step)
        return self.clamp(round(self.minimum + steps * self.step, 6))


@dataclass(frozen=True)
class Availability:
    """Whether a method can run here; ``reason`` says why not (one line, with what to do)."""

    ok: bool
    reason: str = ""


@dataclass
class Embedding:
    """The cached result of :meth:`MethodAdapter.embed` (held per browser session).

    Attributes:
        method: the adapter's ``key``.
        source: ``"seed 7"`` or ``"photo"``.
        data: the adapter's own cache (latents, cameras, a tuned generator ...).
        values: control values that reproduce the starting image (e.g. a photo's own head pose).
        aligned: the aligned crop of a photo, as the generator saw it.
        note: what the user should know about the embedding (faces found, fit quality), one line.
    """

    method: str
    source: str
    data: dict[str, Any]
    values: dict[str, float] = field(default_factory=dict)
    aligned: np.ndarray | None = None
    note: str = ""


@dataclass(frozen=True)
class MethodSettings:
    """Models and speed settings of the adapters (``portrait3d web`` options).

    Attributes:
        network_3d: EG3D checkpoint or built-in name (3D inversion).
        network_2d: StyleGAN2 checkpoint or built-in name (NRSfM, LiftedGAN).
        nrsfm_path: NRSfM editor file (default: the one shipped with ``network_2d``, if any).
        lifted_path: LiftedGAN model file (default: the one shipped with ``network_2d``, if any).
        pie_models: PIE's folder of estimator and RigNets for ``network_2d`` (default: the shipped ones).
        pie_steps_w, pie_steps_wplus: PIE's embedding steps per photo in W, then in W+.
        invert_steps: 3D inversion optimiser steps per photo (few: the editor is interactive).
        learned_init: start the 3D inversion from the latent encoder / pose estimator shipped beside a built-in
            ``network_3d`` (as ``portrait3d invert3d --learned-init``); else from ``w_avg`` and the face pipeline's
            camera.
        wtri_encoder: a W_tri encoder file (Oh & Jo, ``portrait3d train wtri``) for ``network_3d``: a photo is
            encoded in one pass (about half a second on CPU), and :meth:`Inversion3DAdapter.refine` (the editor's
            Refine button) runs ``invert_steps`` optimiser steps from that code. Default: the one shipped for a
            built-in ``network_3d`` when ``learned_init`` is on.
        pti: pivotal tuning after the 3D inversion; pti_steps: its steps (``None``: the configuration's).
        project_steps: 2D projector steps per photo (NRSfM, LiftedGAN).
        truncation: truncation psi for seeds.
        orbit_frames, fps: the orbit video; mesh_resolution: marching-cubes grid side of the 3D mesh.
        device: torch device.
    """

    network_3d: str = "default-3d"
    network_2d: str = "default-2d"
    nrsfm_path: Path | None = None
    lifted_path: Path | None = None
    pie_models: Path | None = None
    pie_steps_w: int = 150
    pie_steps_wplus: int = 100
    invert_steps: int = 40
    learned_init: bool = True
    wtri_encoder: Path | None = None
    pti: bool = False
    pti_steps: int | None = None
    project_steps: int = 100
    truncation: float = 0.7
    orbit_frames: int = 48
    fps: int = 24
    mesh_resolution: int = 96
    device: str = "cpu"

    def validate(self) -> None:
        """Raise :class:`UsageError` for settings no method can use."""
        if self.invert_steps < 0 or self.project_steps < 1:
            raise UsageError("inversion steps must be >= 0 and projector steps >= 1")
        if self.pie_steps_w < 0 or self.pie_steps_wplus < 0 or self.pie_steps_w + self.pie_steps_wplus < 1:
            raise UsageError("PIE needs >= 0 steps in W and in W+, and at least one step in all")
        if self.orbit_frames < 2 or self.fps < 1 or self.mesh_resolution < 16:
            raise UsageError("orbit frames must be >= 2, fps >= 1 and the mesh resolution >= 16")
        if not 0 <= self.truncation <= 1:
            raise UsageError(f"truncation must lie in [0, 1], got {self.truncation:g}")


# ----------------------------------------------------------------------------- shared steps
def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise UsageError(f"the seed must be an integer in [0, 2^32), got {seed!r}")
    return int(seed)


def _check_photo(photo: np.ndarray) -> np.ndarray:
    if not (isinstance(photo, np.ndarray) and photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3):
        raise UsageError("a photo must be an RGB uint8 array [H, W, 3]")
    return photo


def _align(photo: np.ndarray, style: str, size: int) -> tuple[Any, str]:
    """``(FaceResult, note)``: the largest face of ``photo`` aligned as ``style`` at ``size`` px.

    Raises:
        FaceError: no face (one line).
    """
    from portrait3d.face.pipeline import FacePipeline

    with FacePipeline(style=style, output_size=size) as pipe:
        face = pipe(photo)  # the largest face when there are several
    return face, _largest_face_note(face.num_faces)


def _largest_face_note(num_faces: int) -> str:
    return f"{num_faces} faces found: the largest was used. " if num_faces > 1 else ""


def _project_photo(G: nn.Module, photo: np.ndarray, space: str, steps: int, progress: Progress,
                   identity_weight: float = 0.1, latent_prior_weight: float = 0.0, fast: bool = False
                   ) -> tuple[torch.Tensor, np.ndarray, str]:
    """A photo -> ``(latent of a 2D StyleGAN2's space, aligned crop, note)`` through the projector (with these
    :class:`ProjectorConfig` weights), with the ``default`` crop (the one portrait3d's built-in generators are trained
    on), as ``portrait3d edit`` does.

    The latent is ``[1, w_dim]`` for ``"w"``, flat ``[1, num_ws * w_dim]`` for ``"w+"`` (the NRSfM layout); ``fast``:
    the projector's bf16 path (:func:`~portrait3d.methods.projector.photo.project_photo`).
    """
    from portrait3d.methods.projector.photo import project_photo

    if space == "z":
        raise UsageError("photos can be edited only with a W or W+ model (Z has no projector)")
    progress(0.0, "finding the face")

    def step(i: int, *_: Any) -> None:
        progress((i + 1) / steps, f"projecting into the 2D generator: step {i + 1}/{steps}")

    res = project_photo(G, space, photo, steps, None, progress=False, latent_prior_weight=latent_prior_weight,
                        identity_weight=identity_weight, callback=step, fast=fast)
    return res.latent, res.aligned, _largest_face_note(res.info["num_faces"])


# ----------------------------------------------------------------------------- the interface
class MethodAdapter(ABC):
    """One editing method as the web editor drives it (see the module docstring).

    Subclasses set :attr:`key` (stable id), :attr:`title` (menu entry), :attr:`summary` (one line) and
    :attr:`exports` (``"video"`` and / or ``"mesh"`` besides the always available image).
    """

    key: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    exports: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: MethodSettings) -> None:
        self.settings = settings
        self._load_lock = threading.Lock()  # two sessions must not load the same network twice

    @abstractmethod
    def available(self) -> Availability:
        """Whether the method can run; cheap after the first call (no network is built twice)."""

    @abstractmethod
    def controls(self) -> tuple[Control, ...]:
        """The sliders, in display order."""

    @abstractmethod
    def embed(self, source: Source, progress: Progress = _no_progress) -> Embedding:
        """The slow step: sample a seed or invert a photo.

        Raises:
            UsageError (FaceError, CheckpointError ...): the method is unavailable, no face, a bad seed.
        """

    @abstractmethod
    def render(self, state: Embedding, values: Mapping[str, float]) -> np.ndarray:
        """The fast step: ``uint8 [H, W, 3]`` for slider ``values`` (missing keys: the embedding's own)."""

    def orbit_frames(self, state: Embedding) -> np.ndarray:
        """``uint8 [T, H, W, 3]`` frames of a turning head (when ``"video" in exports``)."""
        raise UsageError(f"{self.title} makes no video")

    def write_mesh(self, state: Embedding, folder: Path) -> Path:
        """Write the head's mesh into ``folder`` and return its path (when ``"mesh" in exports``)."""
        raise UsageError(f"{self.title} makes no mesh")

    def can_refine(self, state: Embedding) -> bool:
        """Whether :meth:`refine` can improve this embedding (a fast first embedding awaiting optimisation)."""
        return False

    def refine(self, state: Embedding, progress: Progress = _no_progress) -> Embedding:
        """The optional slow step after a fast embedding: a better embedding of the same photo."""
        raise UsageError(f"{self.title}: nothing to refine")

    # helpers for subclasses
    def values(self, state: Embedding, values: Mapping[str, float]) -> dict[str, float]:
        """Every control's value: ``values``, else the embedding's, else the default; clamped to its range."""
        out = {}
        for c in self.controls():
            v = values.get(c.key, state.values.get(c.key, c.value))
            out[c.key] = c.clamp(v if v is not None and np.isfinite(v) else c.value)
        return out

    def _check_state(self, state: Embedding) -> None:
        if state.method != self.key:
            raise UsageError(f"this embedding was made by {state.method}, not {self.key}: embed the photo again")


# ----------------------------------------------------------------------------- 3D inversion (Ko et al.)
class Inversion3DAdapter(MethodAdapter):
    """EG3D: a seed's latent, or a photo inverted with pose optimisation (Ko et al., Algorithm 1), seen from
    any head yaw / pitch. Renders are :mod:`portrait3d.methods.inversion3d.pipeline`'s deterministic views,
    as ``portrait3d invert3d`` writes them."""

    key = "inversion3d"
    title = "3D inversion (Ko et al., EG3D)"
    summary = "Invert the photo into a 3D generator, then turn the head: any yaw and pitch."
    exports = frozenset({"video", "mesh"})
    YAW_RANGE = 45.0
    PITCH_RANGE = 30.0

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        self._G: nn.Module | None = None
        self._init: tuple[nn.Module | None, nn.Module | None] | None = None  # (encoder, pose estimator)
        self._wtri: list[nn.Module | None] = []                                # [] until looked for
        # render_views caches the tri-planes on the generator between the views of one call: one call at a time
        self._render_lock = threading.Lock()

    def _generator(self) -> nn.Module:
        from portrait3d.methods.inversion3d.pipeline import load_generator

        with self._load_lock:
            if self._G is None:
                self._G, _ = load_generator(self.settings.network_3d, self.settings.device)
            return self._G

    def _init_modules(self, G: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """The shipped ``(encoder, pose estimator)`` that start a photo's inversion (each ``None`` if absent)."""
        from portrait3d.methods.inversion3d.pipeline import builtin_init_paths, load_init_modules

        with self._load_lock:
            if self._init is None:
                paths = builtin_init_paths(self.settings.network_3d) if self.settings.learned_init else (None, None)
                self._init = load_init_modules(G, *paths, device=self.settings.device)
            return self._init

    def _wtri_encoder(self, G: nn.Module) -> nn.Module | None:
        """The W_tri encoder that encodes a photo before the optimiser (``None``: none given and none ships)."""
        from portrait3d.checkpoints.load import builtin_network_path
        from portrait3d.interfaces.encode3d import default_encoder_path, load_wtri_encoder

        with self._load_lock:
            if not self._wtri:
                s = self.settings
                path = s.wtri_encoder
                if path is None and s.learned_init and builtin_network_path(s.network_3d) is not None \
                        and default_encoder_path(s.network_3d).is_file():
                    path = default_encoder_path(s.network_3d)
                if path is not None and not Path(path).is_file():
                    raise UsageError(f"{path}: no such W_tri encoder file")
                self._wtri.append(None if path is None else load_wtri_encoder(Path(path), G, s.network_3d, s.device))
            return self._wtri[0]

    def available(self) -> Availability:
        from portrait3d.checkpoints.load import builtin_network_path

        net = self.settings.network_3d
        builtin = builtin_network_path(net)
        if builtin is not None:
            if not builtin.is_file():
                return Availability(False, f"built-in network {net} is not installed; pass --network-3d PATH")
        elif not Path(net).expanduser().is_file():
            return Availability(False, f"{net}: no such EG3D checkpoint")
        return Availability(True)

    def controls(self) -> tuple[Control, ...]:
        return (Control("yaw", "Yaw (degrees)", -self.YAW_RANGE, self.YAW_RANGE, 1.0, 0.0,
                        "Head yaw: positive turns the head to its left."),
                Control("pitch", "Pitch (degrees)", -self.PITCH_RANGE, self.PITCH_RANGE, 1.0, 0.0,
                        "Head pitch: positive tilts the head up."))

    def embed(self, source: Source, progress: Progress = _no_progress) -> Embedding:
        from portrait3d.networks.eg3d.camera import camera_from_angles

        if not (av := self.available()).ok:
            raise UsageError(av.reason)
        G = self._generator()
        dev = torch.device(self.settings.device)
        rk = getattr(G, "rendering_kwargs", {}) or {}
        radius = float(rk.get("avg_camera_radius", 2.7))
        if not isinstance(source, np.ndarray):
            seed = _check_seed(source)
            z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
            camera = camera_from_angles(0.0, 0.0, radius=radius)[None].to(dev)
            with torch.no_grad():  # conditioned on the frontal camera, as portrait3d demo samples
                ws = G.mapping(z, camera, truncation_psi=self.settings.truncation)
            return Embedding(self.key, f"seed {seed}", {"G": G, "ws": ws, "camera": camera},
                             values={"yaw": 0.0, "pitch": 0.0})
        return self._invert(G, _check_photo(source), progress)

    def _invert(self, G: nn.Module, photo: np.ndarray, progress: Progress) -> Embedding:
        from portrait3d.methods.inversion3d.optimize import invert
        from portrait3d.methods.inversion3d.pipeline import (
            face_landmarks68,
            initialise,
            make_inversion_config,
            resolve_align,
            to_tensor,
        )

        s = self.settings
        dev = torch.device(s.device)
        progress(0.0, "finding the face")
        face, note = _align(photo, resolve_align("auto", s.network_3d), int(G.img_resolution))
        aligned = face.aligned.image
        target = to_tensor(aligned, dev)
        cfg = make_inversion_config(1, s.invert_steps, s.pti, s.pti_steps, seed=None, fast=True)
        landmarks = face_landmarks68(face)
        wtri = self._wtri_encoder(G)
        latent_encoder, pose = self._init_modules(G)
        # with a W_tri encoder only the pose estimator's camera is wanted: its start encoder runs E itself
        init_ws, init_camera, how = initialise(G, target, face.camera, None if wtri else latent_encoder, pose)
        if wtri is not None:  # Oh & Jo: the photo in 3D in one encoder pass; the optimiser waits for refine()
            from portrait3d.interfaces.encode3d import encode_photo

            progress(0.0, "encoding with the W_tri encoder")
            t = time.perf_counter()
            code = encode_photo(wtri, G, target, init_camera)
            sec = time.perf_counter() - t
            camera = init_camera.reshape(1, 25).to(dev)
            pending = {"target": target, "landmarks": landmarks, "note": note,
                       "how": {**how, "latent": "W_tri encoder"}}
            refine = (f" Refine runs {cfg.steps} optimiser steps{' + PTI' if s.pti else ''} from this code."
                      if cfg.steps or s.pti else "")
            return self._photo_embedding(G, code, camera, aligned, pending,  # per-plane rows kept
                                         f"{note}start camera: {how['camera']}; encoded in one pass by the W_tri "
                                         f"encoder ({sec:.1f} s), reconstruction PSNR {{psnr:.1f}} dB.{refine}")
        steps = max(cfg.steps, 1)

        def step(i: int, *_: Any) -> None:
            progress((i + 1) / steps, f"inverting into the 3D generator: step {i + 1}/{cfg.steps}")

        progress(0.0, "inverting into the 3D generator")
        res = invert(G, target, init_ws, init_camera, cfg, landmarks=landmarks, progress=False, callback=step)
        G_out = res.G.eval().requires_grad_(False)  # the PTI-tuned copy, or G itself
        ws, camera = res.ws.detach().to(dev), res.camera.detach().reshape(1, 25).to(dev)
        return self._photo_embedding(G_out, ws, camera, aligned, None, self._optimised_note(note, how, cfg.steps))

    def _optimised_note(self, note: str, how: dict[str, str], steps: int) -> str:
        """The status of an optimised embedding (``{psnr}`` left for :meth:`_photo_embedding`)."""
        return (f"{note}start camera: {how['camera']}, latent: {how['latent']}; {steps} inversion steps"
                f"{' + PTI' if self.settings.pti else ''}, reconstruction PSNR {{psnr:.1f}} dB.")

    def _photo_embedding(self, G: nn.Module, ws: Any, camera: torch.Tensor, aligned: np.ndarray,
                         pending: dict[str, Any] | None, note: str) -> Embedding:
        """A photo's embedding seen from its own camera; ``note`` has a ``{psnr}`` field for the reconstruction's
        PSNR. ``pending``: what :meth:`refine` needs to optimise further (None: nothing left to refine)."""
        from portrait3d.methods.inversion3d.pipeline import render_views
        from portrait3d.metrics.psnr import psnr
        from portrait3d.networks.eg3d.camera import pose_angles_from_camera

        yaw, pitch, _, _ = pose_angles_from_camera(camera[0].cpu())
        with self._render_lock:
            recon = render_views(G, ws, camera)[0][0]
        yaw_c, pitch_c = self.controls()
        data = {"G": G, "ws": ws, "camera": camera, **({"pending": pending} if pending else {})}
        return Embedding(self.key, "photo", data,
                         values={"yaw": yaw_c.clamp(float(yaw)), "pitch": pitch_c.clamp(float(pitch))},
                         aligned=aligned, note=note.format(psnr=psnr(recon, aligned)))

    def can_refine(self, state: Embedding) -> bool:
        s = self.settings
        return state.method == self.key and "pending" in state.data and bool(s.invert_steps or s.pti)

    def refine(self, state: Embedding, progress: Progress = _no_progress) -> Embedding:
        """Ko et al.'s optimiser (and PTI with ``pti``) from the W_tri encoder's code and camera: ``invert_steps``
        steps, the code's three plane codes averaged into W+ rows as the optimiser's start."""
        from portrait3d.interfaces.encode3d import code_to_ws
        from portrait3d.methods.inversion3d.optimize import invert
        from portrait3d.methods.inversion3d.pipeline import make_inversion_config

        self._check_state(state)
        if not self.can_refine(state):
            raise UsageError("nothing to refine: this embedding is already optimised (or --steps is 0)")
        s, d = self.settings, state.data
        p = d["pending"]
        cfg = make_inversion_config(1, s.invert_steps, s.pti, s.pti_steps, seed=None, fast=True)
        steps = max(cfg.steps, 1)

        def step(i: int, *_: Any) -> None:
            progress((i + 1) / steps, f"refining: optimiser step {i + 1}/{cfg.steps}")

        progress(0.0, "refining the encoder's code")
        res = invert(d["G"], p["target"], code_to_ws(d["ws"]), d["camera"], cfg, landmarks=p["landmarks"],
                     progress=False, callback=step)
        return self._photo_embedding(res.G.eval().requires_grad_(False), res.ws.detach(),
                                     res.camera.detach().reshape(1, 25), state.aligned, None,
                                     self._optimised_note(p["note"], p["how"], cfg.steps))

    def render(self, state: Embedding, values: Mapping[str, float]) -> np.ndarray:
        from portrait3d.methods.inversion3d.pipeline import render_views, view_camera

        self._check_state(state)
        v = self.values(state, values)
        d = state.data
        cam = view_camera(d["camera"], v["yaw"], v["pitch"]).to(d["ws"].device)
        with self._render_lock:
            return render_views(d["G"], d["ws"], cam)[0][0]

    def orbit_frames(self, state: Embedding) -> np.ndarray:
        # EG3D's orbit at the embedding's camera distance and intrinsics, exactly as invert3d's orbit.mp4
        from portrait3d.methods.inversion3d.pipeline import orbit_cameras_at, render_views

        self._check_state(state)
        d = state.data
        with self._render_lock:
            return render_views(d["G"], d["ws"], orbit_cameras_at(d["camera"], self.settings.orbit_frames))[0]

    def write_mesh(self, state: Embedding, folder: Path) -> Path:
        from portrait3d.utils.mesh import extract_mesh, write_ply

        self._check_state(state)
        d = state.data
        with self._render_lock:
            mesh = extract_mesh(d["G"], d["ws"], resolution=self.settings.mesh_resolution)
        return write_ply(mesh, Path(folder) / "mesh.ply")


# ----------------------------------------------------------------------------- adapters with model files
class ModelFileAdapter(MethodAdapter):
    """An adapter whose models come from files that may be missing: they are loaded once, on first use, and a
    failure is remembered and reported as the reason the method is unavailable."""

    def __init__(self, settings: MethodSettings) -> None:
        super().__init__(settings)
        self._loaded: Any = None
        self._error: str | None = None

    @abstractmethod
    def _load(self) -> Any:
        """Load and check the models (raise ``UsageError`` / ``OSError`` with a one-line reason)."""

    def _models(self) -> Any:
        with self._load_lock:
            if self._loaded is None and self._error is None:
                try:
                    self._loaded = self._load()
                except (OSError, UsageError) as e:  # CheckpointError / FileNotFoundError: one-line messages
                    self._error = str(e)
            if self._error is not None:
                raise UsageError(self._error)
            return self._loaded

    def available(self) -> Availability:
        try:
            self._models()
        except UsageError as e:
            return Availability(False, str(e))
        return Availability(True)


# ----------------------------------------------------------------------------- NRSfM edits on 2D
class NRSfMAdapter(ModelFileAdapter):
    """A 2D StyleGAN2 latent edited through an NRSfM editor's regressor (eq. 14, the linear edit: fast enough
    to follow a slider): head yaw / pitch changes and shape (expression) components."""

    key = "nrsfm"
    title = "NRSfM edits on 2D (StyleGAN2)"
    summary = "Edit head pose and expression of a 2D generator's face through a rank-one NRSfM model."
    MAX_COMPONENTS = 4  # sliders for the first components only: the rest change little

    def _load(self) -> tuple[nn.Module, Any]:
        """``(G, editor)``."""
        from portrait3d.checkpoints import load_network
        from portrait3d.methods.nrsfm.pipeline import resolve_editor

        editor = resolve_editor(self.settings.network_2d, self.settings.nrsfm_path)
        G = load_network(self.settings.network_2d, device=self.settings.device)
        if not hasattr(G, "synthesis") or getattr(G, "c_dim", 0) != 0:
            raise UsageError(f"{self.settings.network_2d}: NRSfM edits need an unconditional 2D StyleGAN2 generator")
        return G.eval().requires_grad_(False), editor

    def controls(self) -> tuple[Control, ...]:
        from portrait3d.methods.nrsfm.edit import ALPHA_LIMIT, ANGLE_LIMITS

        if self._loaded is None:
            self.available()  # the expression sliders depend on the editor: load it (or learn why not)
        out = [Control("yaw", "Yaw change (degrees)", -ANGLE_LIMITS["yaw"], ANGLE_LIMITS["yaw"], 1.0, 0.0,
                       "Head yaw relative to the face's own."),
               Control("pitch", "Pitch change (degrees)", -ANGLE_LIMITS["pitch"], ANGLE_LIMITS["pitch"], 1.0, 0.0,
                       "Head pitch relative to the face's own.")]
        if self._loaded is not None:
            k_max = min(int(self._loaded[1].model.num_basis), self.MAX_COMPONENTS)
            out += [Control(f"expr{k}", f"Expression component {k} (std. dev.)", -ALPHA_LIMIT, ALPHA_LIMIT, 0.1,
                            0.0, f"Shape coefficient α_{k} of the NRSfM model, in standard deviations.")
                    for k in range(1, k_max + 1)]
        return tuple(out)

    def embed(self, source: Source, progress: Progress = _no_progress) -> Embedding:
        from portrait3d.methods.nrsfm.data import sample_latents

        G, editor = self._models()
        if not isinstance(source, np.ndarray):
            seed = _check_seed(source)
            latent = sample_latents(G, 1, editor.space, seed=seed).reshape(1, -1)
            return Embedding(self.key, f"seed {seed}", {"latent": latent})
        from portrait3d.methods.nrsfm.pipeline import PhotoEditConfig

        cfg = PhotoEditConfig()  # as `portrait3d edit` projects a photo
        latent, aligned, note = _project_photo(G, _check_photo(source), editor.space, self.settings.project_steps,
                                               progress, cfg.identity_weight, cfg.latent_prior_weight, cfg.fast)
        return Embedding(self.key, "photo", {"latent": latent}, aligned=aligned,
                         note=f"{note}{self.settings.project_steps} projector steps.")

    def render(self, state: Embedding, values: Mapping[str, float]) -> np.ndarray:
        from portrait3d.methods.nrsfm.data import synthesize
        from portrait3d.methods.nrsfm.edit import EditSpec
        from portrait3d.utils.visualize import to_uint8

        self._check_state(state)
        G, editor = self._models()
        v = self.values(state, values)
        spec = EditSpec(yaw=v["yaw"], pitch=v["pitch"],
                        expr={int(k[4:]): x for k, x in v.items() if k.startswith("expr") and x})
        latent = state.data["latent"]
        if not spec.is_identity():
            spec.validate(int(editor.model.num_basis))
            latent, _ = editor.edit(G, latent, editor.target(latent, spec), "linear")  # needs autograd (J = dφ/dw)
        with torch.no_grad():
            return to_uint8(synthesize(G, latent.detach(), editor.space))[0]


# ----------------------------------------------------------------------------- LiftedGAN
class LiftedGANAdapter(ModelFileAdapter):
    """LiftedGAN (Shi et al.): a 2D StyleGAN2 face lifted to depth + albedo + light, rendered from another view
    and under another light direction (:mod:`portrait3d.interfaces.lift`'s renders)."""

    key = "lifted"
    title = "LiftedGAN (2D generator lifted to 3D)"
    summary = "Rotate and relight a 2D generator's face through a learned depth, albedo and light."
    exports = frozenset({"video", "mesh"})
    YAW_RANGE = 60.0
    PITCH_RANGE = 30.0
    ORBIT_YAW = 45.0

    def _load(self) -> tuple[nn.Module, nn.Module]:
        """``(G, lifted model)``, the lifted model checked against the 2D generator it was trained on."""
        from portrait3d.checkpoints import load_network
        from portrait3d.methods.lifting.networks import LiftedGenerator
        from portrait3d.methods.lifting.pipeline import check_generator, lifted_generator_ref, resolve_lifted

        s = self.settings
        path = resolve_lifted(s.network_2d, s.lifted_path)
        check_generator(path, lifted_generator_ref(path), s.network_2d)
        G = load_network(s.network_2d, device=s.device)
        if not hasattr(G, "mapping") or getattr(G, "c_dim", 0) != 0:
            raise UsageError(f"{s.network_2d}: LiftedGAN lifts an unconditional 2D StyleGAN2 generator")
        return G, LiftedGenerator.load(path, g2d=G, device=s.device)

    def controls(self) -> tuple[Control, ...]:
        return (Control("yaw", "Yaw (degrees)", -self.YAW_RANGE, self.YAW_RANGE, 1.0, 0.0,
                        "From the frontal view; positive moves the nose towards the image's left."),
                Control("pitch", "Pitch (degrees)", -self.PITCH_RANGE, self.PITCH_RANGE, 1.0, 0.0,
                        "From the frontal view."),
                Control("light_x", "Light direction x", -1.0, 1.0, 0.05, 0.0, "Positive lights from the image's left."),
                Control("light_y", "Light direction y", -1.0, 1.0, 0.05, 0.0, "Positive lights from the top."))

    def embed(self, source: Source, progress: Progress = _no_progress) -> Embedding:
        from portrait3d.methods.lifting.losses import sample_w
        from portrait3d.methods.lifting.pipeline import TRUNCATION

        G, model = self._models()
        aligned, note, name = None, "", "photo"
        if not isinstance(source, np.ndarray):
            seed = _check_seed(source)
            with torch.no_grad():  # as portrait3d lift: the training distribution's truncation
                latent = sample_w(G, 1, TRUNCATION, torch.Generator().manual_seed(seed))
            name = f"seed {seed}"
        else:
            latent, aligned, note = _project_photo(G, _check_photo(source), "w", self.settings.project_steps,
                                                   progress)
            note += f"{self.settings.project_steps} projector steps."
        with torch.no_grad():
            lifted = model(latent)
        dx, dy = (float(x) for x in lifted.light[0, 2:4])
        return Embedding(self.key, name, {"latent": latent, "lifted": lifted},
                         values={"yaw": 0.0, "pitch": 0.0, "light_x": dx, "light_y": dy}, aligned=aligned, note=note)

    @torch.no_grad()
    def _views(self, state: Embedding, yaws: list[float], pitch: float, light: tuple[float, float]) -> np.ndarray:
        from portrait3d.methods.lifting.losses import LiftLossConfig
        from portrait3d.methods.lifting.train import relight, yaw_view
        from portrait3d.utils.visualize import to_uint8

        _, model = self._models()
        lo = state.data["lifted"]
        dev = lo.view.device
        lit = relight(lo.light, *light)
        frames = []
        for yaw in yaws:
            # Head yaw / pitch (+ = head to its left / chin up) are r_y = -yaw, r_x = -pitch in the renderer's view.
            view = yaw_view(-yaw, 1, LiftLossConfig().perturb_tx_per_sin_yaw, dev)  # as portrait3d lift's views
            view[:, 0] = torch.deg2rad(torch.tensor(-pitch, dtype=view.dtype))
            frames.append(to_uint8(model.render_view(lo, view=view, light=lit).image.clamp(-1, 1))[0])
        return np.stack(frames)

    def render(self, state: Embedding, values: Mapping[str, float]) -> np.ndarray:
        self._check_state(state)
        v = self.values(state, values)
        return self._views(state, [v["yaw"]], v["pitch"], (v["light_x"], v["light_y"]))[0]

    def orbit_frames(self, state: Embedding) -> np.ndarray:
        self._check_state(state)
        n = self.settings.orbit_frames
        yaws = [self.ORBIT_YAW * float(np.sin(2 * np.pi * i / n)) for i in range(n)]  # a closed loop
        v = state.values
        return self._views(state, yaws, 0.0, (v["light_x"], v["light_y"]))

    def write_mesh(self, state: Embedding, folder: Path) -> Path:
        from portrait3d.checkpoints.native import atomic_write
        from portrait3d.geometry.render import mesh_from_depth, save_obj

        self._check_state(state)
        _, model = self._models()
        lo = state.data["lifted"]
        verts, faces, colors = mesh_from_depth(lo.depth[0].cpu(), ((lo.albedo[0].cpu() + 1) / 2).clamp(0, 1),
                                               model.resolved_renderer_cfg())
        path = Path(folder) / "mesh.obj"
        return atomic_write(path, lambda tmp: save_obj(tmp, verts, faces, colors))


# ----------------------------------------------------------------------------- PIE
class PIEAdapter(ModelFileAdapter):
    """PIE (Tewari et al. 2020): a photo embedded hierarchically (W, then W+) with the rig energies, edited
    through the face rig's RigNets -- head yaw / pitch, the rig's expression coefficients and the light direction.
    Only the modes whose RigNet is installed get sliders. A slider left at the embedding's own value leaves its
    mode untouched; each edit is RigNets plus one generator pass (well under a second on a CPU)."""

    key = "pie"
    title = "PIE edits on 2D (StyleGAN2 + face rig)"
    summary = "Embed a portrait with PIE and edit head pose, expression and light through a 3D face rig."
    EXPR_LIMIT = 3.0  # expression coefficients, in standard deviations of the rig's training faces

    def _load(self) -> Any:
        from portrait3d.interfaces.pie import load_embedder

        emb = load_embedder(self.settings.network_2d, self.settings.pie_models)
        if not emb.rignets:
            raise UsageError(f"no RigNet in {self.settings.pie_models or 'the shipped PIE models'} "
                             "(train one: portrait3d train rignet)")
        return emb

    def controls(self) -> tuple[Control, ...]:
        if self._loaded is None:
            self.available()  # the sliders depend on the installed RigNets: load them (or learn why not)
        emb = self._loaded
        modes = set(emb.rignets) if emb is not None else {"pose"}
        out: list[Control] = []
        if "pose" in modes:
            out += [Control("yaw", "Head yaw (degrees)", -30.0, 30.0, 1.0, 0.0,
                            "Absolute yaw of the rig (+: the head turns to its left)."),
                    Control("pitch", "Head pitch (degrees)", -20.0, 20.0, 1.0, 0.0,
                            "Absolute pitch of the rig (+: chin up).")]
        if "expression" in modes and emb is not None:
            out += [Control(f"expr_{n}", n.replace("_", " ").capitalize() + " (std. dev.)", -self.EXPR_LIMIT,
                            self.EXPR_LIMIT, 0.1, 0.0, f"The rig's {n} coefficient.")
                    for n in emb.rig.config.expression_names]
        if "light" in modes:
            out += [Control("light_x", "Light from the right", -1.0, 1.0, 0.05, 0.0,
                            "Direction of a light half as strong as the ambient term; x = y = 0 keeps the "
                            "photo's own light."),
                    Control("light_y", "Light from above", -1.0, 1.0, 0.05, 0.0, "")]
        return tuple(out)

    def embed(self, source: Source, progress: Progress = _no_progress) -> Embedding:
        from portrait3d.interfaces.pie import embed_photo
        from portrait3d.methods.pie.embed import PieConfig

        emb = self._models()
        if not isinstance(source, np.ndarray):
            seed = _check_seed(source)
            g = torch.Generator().manual_seed(seed)
            z = torch.randn(1, emb.G.z_dim, generator=g)
            with torch.no_grad():
                ws = emb.G.mapping(z, None, truncation_psi=self.settings.truncation)
            return self._state(ws, f"seed {seed}", None, "")
        s = self.settings
        cfg = PieConfig(steps_w=s.pie_steps_w, steps_wplus=s.pie_steps_wplus, modes=sorted(emb.rignets))
        total = cfg.steps_w + cfg.steps_wplus
        progress(0.0, "finding the face")

        def step(i: int, rec: dict[str, float]) -> None:
            progress((i + 1) / total, f"PIE embedding ({rec['stage']}): step {i + 1}/{total}")

        face, res, _, _ = embed_photo(emb, _check_photo(source), cfg, progress=step)
        note = f"{face.num_faces} faces found: the largest was used. " if face.num_faces > 1 else ""
        return self._state(res.ws, "photo", face.aligned.image,
                           f"{note}{cfg.steps_w} + {cfg.steps_wplus} PIE steps (W, W+).")

    def _state(self, ws: torch.Tensor, source: str, aligned: np.ndarray | None, note: str) -> Embedding:
        emb = self._loaded
        with torch.no_grad():
            params = emb.theta(emb.render(ws))
        values = {"yaw": float(params.angles[0, 0]), "pitch": float(params.angles[0, 1])}
        values.update({f"expr_{n}": float(params.expression[0, k])
                       for k, n in enumerate(emb.rig.config.expression_names)})
        values.update({"light_x": 0.0, "light_y": 0.0})
        own = {c.key: c.snap(values[c.key]) for c in self.controls()}  # what the sliders can show
        return Embedding(self.key, source, {"ws": ws.detach(), "params": params}, values=own, aligned=aligned,
                         note=note)

    def render(self, state: Embedding, values: Mapping[str, float]) -> np.ndarray:
        from portrait3d.interfaces.pie import EditSpec
        from portrait3d.utils.visualize import to_uint8

        self._check_state(state)
        emb = self._models()
        v = self.values(state, values)
        changed = {k for k, x in v.items() if abs(x - state.values.get(k, 0.0)) > 1e-6}
        names = list(emb.rig.config.expression_names)
        pose = bool(changed & {"yaw", "pitch"})
        expr = {n: v[f"expr_{n}"] for n in names if f"expr_{n}" in v} if any(
            k.startswith("expr_") for k in changed) else {}
        light = None
        if changed & {"light_x", "light_y"} and (v["light_x"] or v["light_y"]):
            x, y = v["light_x"], v["light_y"]
            light = (x, y, float(np.sqrt(max(0.0, 1.0 - x * x - y * y))))  # a unit direction toward the viewer
        spec = EditSpec(yaw=v["yaw"] if pose else None, pitch=v["pitch"] if pose else None, expression=expr,
                        light=light)
        ws = state.data["ws"]
        if not spec.empty:
            ws, _ = emb.edit(ws, spec.targets(state.data["params"], names))
        with torch.no_grad():
            return to_uint8(emb.render(ws))[0]


# ----------------------------------------------------------------------------- registry
ADAPTERS: tuple[type[MethodAdapter], ...] = (Inversion3DAdapter, NRSfMAdapter, LiftedGANAdapter, PIEAdapter)
"""Every method the editor offers, in menu order. A new method is one class appended here."""


def build_registry(settings: MethodSettings, adapters: tuple[type[MethodAdapter], ...] = ADAPTERS
                   ) -> dict[str, MethodAdapter]:
    """``{key: adapter}`` for ``settings``, in menu order.

    Raises:
        ValueError: two adapters share a key (a programming error).
    """
    out: dict[str, MethodAdapter] = {}
    for cls in adapters:
        if cls.key in out:
            raise ValueError(f"two method adapters use the key {cls.key!r}")
        out[cls.key] = cls(settings)
    return out

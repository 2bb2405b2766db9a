"""LiftedGAN on one latent (Shi et al., CVPR 2021): find the lifting model for a 2D generator, render a lifted face
from other views and under other lights, and report D_V's view and D_L's light. Files are written by
``portrait3d lift`` (:mod:`portrait3d.interfaces.lift`).

View convention: LiftedGAN / Unsup3d's ``w = (r_x, r_y, r_z, t_x, t_y, t_z)`` (radians about the camera axes,
:func:`portrait3d.geometry.view_rotation`); yaw > 0 turns the nose towards the image's left.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["TRUNCATION", "builtin_lifted_path", "resolve_lifted", "lifted_generator_ref", "check_generator",
           "render_views", "load_latent_file", "view_light_record"]

TRUNCATION = 0.7
"""Truncation of latents drawn from a seed: the distribution the lifting networks were trained on."""


def builtin_lifted_path(network: str) -> Path | None:
    """Where a built-in network's shipped lifting model would live (None for other networks)."""
    from portrait3d.checkpoints.load import builtin_network_path

    generator = builtin_network_path(network)
    return None if generator is None else generator.parent / "lifted.safetensors"


def _train_hint(network: str) -> str:
    return (f"train one with `portrait3d train lift --network {network} --out RUN` "
            f"and pass --lifted RUN/lifted.safetensors")


def resolve_lifted(network: str, lifted_path: Path | None) -> Path:
    """The lifting model to use: ``lifted_path``, else the built-in one of ``network``."""
    if lifted_path is not None:
        p = Path(lifted_path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such lifted model; {_train_hint(network)}")
        return p
    p = builtin_lifted_path(network)
    if p is None or not p.is_file():
        raise FileNotFoundError(f"no lifted model for network {network!r}: {_train_hint(network)}")
    return p


def lifted_generator_ref(path: Path) -> str | None:
    """The 2D generator reference in a lifting file's metadata (None if absent or unreadable:
    :meth:`LiftedGenerator.load` reports unreadable files)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("generator") or None
    except (SafetensorError, OSError, ValueError):
        return None


def check_generator(lifted: Path, ref: str | None, network: str) -> bool:
    """Refuse a lifting model trained on another 2D generator; True when the match is verified."""
    from portrait3d.methods.lifting.train import generator_matches

    same = generator_matches(ref, network)
    if same is False:
        raise UsageError(f"{lifted.name} was trained on the 2D generator {ref!r}, not {network!r}: "
                         f"pass --network {ref}")
    return same is True


@torch.no_grad()
def render_views(model: Any, lifted: Any, yaws: Sequence[float],
                 light_dirs: Sequence[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frontal, rotated and relit renders of lifted faces (``lifted = model(w)``, ``N`` faces).

    The views are the canonical pose turned by each yaw with the training perturbation's
    translation (:func:`~portrait3d.methods.lifting.train.yaw_view`); relit views are frontal with
    the light direction replaced by each ``(dx, dy)`` (ambient and diffuse strengths kept).

    Returns:
        ``frontal [N, 3, S, S]``, ``rotated [N, len(yaws), 3, S, S]``, ``relit [N, len(light_dirs), 3, S, S]``,
        all in ``[-1, 1]``.
    """
    from portrait3d.methods.lifting.losses import LiftLossConfig
    from portrait3d.methods.lifting.train import relight, yaw_view

    n, dev, tx = lifted.view.shape[0], lifted.view.device, LiftLossConfig().perturb_tx_per_sin_yaw
    frontal_view = yaw_view(0.0, n, tx, dev)
    frontal = model.render_view(lifted, view=frontal_view).image
    rotated = torch.stack([model.render_view(lifted, view=yaw_view(y, n, tx, dev)).image for y in yaws], 1)
    relit = torch.stack([model.render_view(lifted, view=frontal_view, light=relight(lifted.light, dx, dy)).image
                         for dx, dy in light_dirs], 1)
    return frontal, rotated, relit


def load_latent_file(path: Path, w_dim: int, num_ws: int) -> torch.Tensor:
    """A ``.npy`` latent -> ``[1, w_dim]`` (W) or ``[1, num_ws, w_dim]`` (W+)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable .npy latent ({str(e).splitlines()[0][:80]})") from None
    if arr.dtype.kind not in "fiu":
        raise UsageError(f"{path}: latent must be numeric, not {arr.dtype}")
    shape = tuple(arr.shape)
    if shape[:1] == (1,) and len(shape) in (2, 3):
        arr, shape = arr[0], shape[1:]
    if shape not in ((w_dim,), (num_ws, w_dim)):
        raise UsageError(f"{path}: latent of shape {tuple(np.shape(arr))} does not fit the generator: "
                         f"expected [{w_dim}] (W) or [{num_ws}, {w_dim}] (W+)")
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32))[None]
    if not torch.isfinite(t).all():
        raise UsageError(f"{path}: latent contains NaN or infinite values")
    return t


def view_light_record(view: torch.Tensor, light: torch.Tensor) -> dict[str, Any]:
    """D_V's view of the first face as a head pose (degrees, the face pipeline's convention, as every command reports
    poses) with its translation, and D_L's light, for ``result.json``."""
    from portrait3d.methods.lifting.views import head_pose_from_view

    v, li = view[0].tolist(), light[0].tolist()
    yaw, pitch, roll = (float(a) for a in head_pose_from_view(view[0, :3].detach().cpu()))
    return {
        "view": {"yaw_deg": yaw, "pitch_deg": pitch, "roll_deg": roll, "tx": v[3], "ty": v[4], "tz": v[5]},
        "light": {"ambient": li[0], "diffuse": li[1], "dx": li[2], "dy": li[3],
                  # angle of the travel direction (dx, dy, 1) from the optical axis, per axis
                  "horizontal_deg": math.degrees(math.atan(li[2])), "vertical_deg": math.degrees(math.atan(li[3]))},
    }

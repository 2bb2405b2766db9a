"""``portrait3d lift``: a face in 3D with LiftedGAN (Shi et al., CVPR 2021) -- rotate, relight, export.

SOURCE is a seed (an integer: ``w = mapping(z)`` with truncation 0.7, the training distribution), a
``.npy`` latent (``[w_dim]`` W code or ``[num_ws, w_dim]`` W+ code, optionally with a leading batch
axis of 1), or a photo, which is aligned with the ``default`` crop (the one portrait3d's built-in
generators are trained on) and projected into W first. The lifting networks
(:class:`~portrait3d.methods.lifting.networks.LiftedGenerator`, trained by
``portrait3d train lift``) predict view, light, canonical depth and albedo.

Outputs in OUT (nothing is overwritten without ``--force``; every file is written atomically), all at
the lifting resolution ``S``:

* ``image.png``: frontal render (canonical view, predicted light);
* ``rotated.png``: one row of renders at the given head yaws (degrees from the frontal view, the convention of
  every command: positive turns the head to its left, the nose towards the image's right), predicted light;
* ``relit.png``: frontal renders lit from the left, top, right and bottom (``(dx, dy)`` =
  ``(1, 0), (0, 1), (-1, 0), (0, -1)``), then the ``--light`` one when given; ambient and diffuse
  strengths are the predicted ones;
* ``depth.png`` (colour-mapped canonical depth, near = bright), ``normal.png`` (normal-map colours),
  ``albedo.png``, ``shading.png`` (canonical shading under the predicted light, divided by its max);
* ``mesh.obj``: the canonical depth map as a grid mesh coloured by the albedo (``y`` up);
* ``latent.npy``: the latent that was lifted (``[1, w_dim]`` or ``[1, num_ws, w_dim]``);
* ``result.json``: view and light predicted by D_V / D_L (angles in degrees), the 2D generator and
  lifted-model references, the source (seed, latent file or photo) and timings;
* for a photo also ``aligned.png`` and ``projection.png`` (the crop that was inverted, ``G2D`` of its latent).

Light directions use D_L's parameterisation (Unsup3d's): the light travels along ``(dx, dy, 1)``, so
``dx > 0`` lights the face from the image's left and ``dy > 0`` from the top; ``--light X,Y`` takes
the same ``(dx, dy)`` that ``result.json`` reports.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.face.io import save_image
from portrait3d.methods.lifting.pipeline import (
    TRUNCATION,
    check_generator,
    lifted_generator_ref,
    load_latent_file,
    render_views,
    resolve_lifted,
    view_light_record,
)

__all__ = ["DEFAULT_YAWS", "LIFT_OUTPUTS", "RELIGHT_DIRECTIONS", "parse_light", "run_lift", "validate_yaws"]

DEFAULT_YAWS: tuple[float, ...] = (-60.0, -30.0, 0.0, 30.0, 60.0)
#: Relighting directions ``(dx, dy)`` of relit.png: light from the left, top, right, bottom.
RELIGHT_DIRECTIONS: tuple[tuple[float, float], ...] = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))
LIFT_OUTPUTS = ("image.png", "rotated.png", "relit.png", "depth.png", "normal.png", "albedo.png", "shading.png",
                "mesh.obj", "latent.npy", "result.json")


def parse_light(text: str | None) -> tuple[float, float] | None:
    """``"x,y"`` -> ``(dx, dy)``, both finite floats in ``[-1, 1]`` (None passes through)."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--light must be X,Y (two numbers in [-1, 1]), not {text!r}") from None
    if not all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in (x, y)):
        raise UsageError(f"--light components must lie in [-1, 1], got {text!r}")
    return x, y


def validate_yaws(yaws: Sequence[float] | None) -> tuple[float, ...]:
    """The yaws to render (default :data:`DEFAULT_YAWS`); each finite with ``|yaw| <= 90``."""
    if not yaws:
        return DEFAULT_YAWS
    out = tuple(float(y) for y in yaws)
    bad = [y for y in out if not (math.isfinite(y) and abs(y) <= 90.0)]
    if bad:
        raise UsageError(f"--yaw must be within [-90, 90] degrees, got {bad[0]:g}")
    return out


def _classify_source(source: str) -> tuple[str, Any]:
    """``("seed", int)``, ``("latent", Path)`` or ``("photo", Path)``; checked before anything is loaded."""
    if source.lstrip("-").isdigit():
        seed = int(source)
        if not 0 <= seed < 2**63:
            raise UsageError(f"seed must be in [0, 2^63), got {seed}")
        return "seed", seed
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source} is neither a seed (integer), a .npy latent nor an existing photo")
    return ("latent", path) if path.suffix.lower() == ".npy" else ("photo", path)


def run_lift(source: str, out: Path, network: str = "default-2d", lifted_path: Path | None = None,
             yaws: Sequence[float] | None = None, light: str | tuple[float, float] | None = None,
             force: bool = False, face_index: int | None = None, project_steps: int = 300,
             device: str = "cpu") -> dict[str, Any]:
    """``portrait3d lift``: see the module docstring for what lands in ``out``.

    Args:
        source: seed, ``.npy`` latent or photo path.
        out: output folder.
        network: the 2D generator (built-in name or checkpoint) the lifted model was trained on.
        lifted_path: the lifting model (default: ``models/<network>/lifted.safetensors`` when shipped).
        yaws: render yaws in degrees, ``|yaw| <= 90`` (default :data:`DEFAULT_YAWS`).
        light: ``"x,y"`` or ``(dx, dy)`` in ``[-1, 1]``: an extra relighting direction.
        force: overwrite existing outputs.
        face_index: which face of a photo with several (required then; 0 = largest).
        project_steps: projector steps for a photo.

    Returns:
        The ``result.json`` record.

    Raises:
        ValueError / FileNotFoundError / FileExistsError / CheckpointError / FaceError: one-line messages.
    """
    from portrait3d.checkpoints import load_network
    from portrait3d.geometry.render import mesh_from_depth, save_obj
    from portrait3d.methods.lifting.losses import sample_w
    from portrait3d.methods.lifting.networks import LiftedGenerator
    from portrait3d.methods.projector import project_photo
    from portrait3d.utils.io import atomic_write, check_outputs, write_json, write_npy
    from portrait3d.utils.visualize import colour_depth, make_grid, normal_to_uint8, shading_to_uint8, to_uint8

    def _image_uint8(x: torch.Tensor) -> np.ndarray:
        return to_uint8(x.clamp(-1, 1))

    t_start = time.perf_counter()
    yaws = validate_yaws(yaws)
    extra_light = parse_light(light if light is None or isinstance(light, str) else ",".join(map(str, light)))
    lifted = resolve_lifted(network, lifted_path)
    kind, value = _classify_source(source)
    names = LIFT_OUTPUTS + (("aligned.png", "projection.png") if kind == "photo" else ())
    check_outputs(out, names, force)
    verified = check_generator(lifted, lifted_generator_ref(lifted), network)

    t0 = time.perf_counter()
    G = load_network(network, device=device)
    if not hasattr(G, "synthesis") or not hasattr(G, "mapping") or getattr(G, "c_dim", 0) != 0:
        raise UsageError(f"{network}: LiftedGAN lifts an unconditional 2D StyleGAN2 generator")
    model = LiftedGenerator.load(lifted, g2d=G, device=device)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t0}

    record: dict[str, Any] = {"network": network, "lifted": str(lifted), "lifted_generator_ref": model.generator_ref,
                              "generator_ref_verified": verified, "image_size": model.cfg.image_size}
    if kind == "seed":
        latent = sample_w(G, 1, TRUNCATION, torch.Generator().manual_seed(value))
        record.update(seed=value, truncation=TRUNCATION)
    elif kind == "latent":
        latent = load_latent_file(value, model.cfg.w_dim, model.num_ws).to(device)
        record["latent_file"] = str(value)
    else:
        t0 = time.perf_counter()
        pl = project_photo(G, "w", value, project_steps, face_index, name=str(value))
        out.mkdir(parents=True, exist_ok=True)
        save_image(out / "aligned.png", pl.aligned, overwrite=force)
        save_image(out / "projection.png", pl.projection, overwrite=force)
        latent, info = pl.latent.to(device), pl.info
        timings["projection_s"] = time.perf_counter() - t0
        record.update(info)
        record["face_index"] = face_index

    t0 = time.perf_counter()
    dirs = list(RELIGHT_DIRECTIONS) + ([extra_light] if extra_light is not None else [])
    with torch.no_grad():
        lo = model(latent)
        timings["lift_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # LiftedGAN's renderer turns the nose to the image's left for positive r_y: a head yaw is r_y = -yaw
        image, rotated, relit = render_views(model, lo, [-y for y in yaws], dirs)
        rotated, relit = rotated[0], relit[0]
        timings["render_s"] = time.perf_counter() - t0
    rcfg = model.resolved_renderer_cfg()
    verts, faces, colors = mesh_from_depth(lo.depth[0].cpu(), ((lo.albedo[0].cpu() + 1) / 2).clamp(0, 1), rcfg)

    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "image.png", _image_uint8(image)[0], overwrite=force)
    save_image(out / "rotated.png", make_grid(_image_uint8(rotated), cols=len(yaws)), overwrite=force)
    save_image(out / "relit.png", make_grid(_image_uint8(relit), cols=len(dirs)), overwrite=force)
    save_image(out / "depth.png", colour_depth(lo.depth[:, None], int(lo.depth.shape[-1]))[0], overwrite=force)
    save_image(out / "normal.png", normal_to_uint8(lo.normal)[0], overwrite=force)
    save_image(out / "albedo.png", _image_uint8(lo.albedo)[0], overwrite=force)
    save_image(out / "shading.png", shading_to_uint8(lo.shading)[0], overwrite=force)
    atomic_write(out / "mesh.obj", lambda tmp: save_obj(tmp, verts, faces, colors), overwrite=force)
    write_npy(out / "latent.npy", latent.detach().cpu().numpy(), overwrite=force)
    timings["total_s"] = time.perf_counter() - t_start
    record.update(view_light_record(lo.view.cpu(), lo.light.cpu()))
    record.update(yaws_deg=list(yaws), relight_directions=[list(d) for d in dirs],
                  mesh={"vertices": int(verts.shape[0]), "faces": int(faces.shape[0])}, timings=timings)
    write_json(out / "result.json", record, overwrite=force)
    return record

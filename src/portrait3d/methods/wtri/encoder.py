"""The W_tri encoder (Oh & Jo, Sec. 3): a ReStyle-style iterative encoder into EG3D's W_tri space.

At step ``t`` the encoder sees the photo and the current reconstruction side by side (6 channels) and predicts a
residual of the code: ``w_{t+1} = w_t + E(x, G(w_t, c))``, starting from the generator's average code
(ReStyle, Alaluf et al. 2021). Two heads share one ResNet (pure PyTorch, :mod:`portrait3d.networks.resnet`):

* a backbone head (pooled ``C5`` with the means of ``C3`` and ``C4``, an MLP) for ``w_shared`` and the three
  plane codes ``w_xy, w_yz, w_xz`` (:class:`~portrait3d.networks.eg3d.triplane.WTri`);
* a pSp-style feature pyramid (lateral 1x1 convolutions, top-down upsampling and addition, Richardson et al. 2021)
  whose finest map is reduced to a vector by strided convolutions ("map2style") for ``w_sp``, the
  super-resolution code, which carries the fine detail.

``space='wplus'`` is the ReStyle baseline of the paper's tables: the same network predicting plain W+ rows.
The last layers start at zero, so an untrained encoder returns the average code.

Bootstrapping (ReStyle, Alaluf et al. 2021, Sec. 4.4 "encoder bootstrapping"): the iterations may start from another
encoder's code instead of the average, here a one-pass latent encoder into W (``config.bootstrap`` names it, the
caller attaches it with :meth:`WTriEncoder.set_start`). The refinement then starts where that encoder leaves off:
an untrained W_tri head returns exactly the start encoder's code, so a short CPU run is never worse than it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.networks.eg3d.triplane import WTri
from portrait3d.networks.resnet import ResNetBackbone

__all__ = ["WTRI_ENCODER_FORMAT", "WTriEncoder", "WTriEncoderConfig"]

WTRI_ENCODER_FORMAT = "portrait3d-wtri-encoder"
SPACES = ("wtri", "wplus")


@dataclass
class WTriEncoderConfig(ConfigMixin):
    w_dim: int = 256
    num_ws: int = 12              # the generator's W+ rows
    shared_rows: int = 11         # TriPlaneGenerator.wtri_shared_rows
    space: str = "wtri"           # 'wtri' (the paper) or 'wplus' (the ReStyle baseline)
    iterations: int = 5
    input_size: int = 128
    width: int = 32
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    head_channels: int = 256
    fpn_channels: int = 128
    bootstrap: str = ""           # the start encoder (a built-in network's shipped one, or a file); "": w_avg
    bootstrap_sha256: str = ""    # the start encoder's module_fingerprint at training ("": not recorded)

    @classmethod
    def for_generator(cls, G: Any, **kw: Any) -> "WTriEncoderConfig":
        return cls(w_dim=int(G.w_dim), num_ws=int(G.num_ws), shared_rows=int(G.wtri_shared_rows), **kw)

    def validate(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, not {self.space!r}")
        if self.input_size < 32 or self.input_size & (self.input_size - 1):
            raise ValueError(f"input_size must be a power of two >= 32, not {self.input_size}")
        if not 0 < self.shared_rows <= self.num_ws or self.iterations < 1:
            raise ValueError("need 0 < shared_rows <= num_ws and iterations >= 1")


class WTriEncoder(nn.Module):
    """The iterative encoder of the module docstring.

    Shapes: ``step(x [N, 3, H, W], y [N, 3, H, W], code) -> code`` (images in ``[-1, 1]``); codes are
    :class:`WTri` (``space='wplus'``: W_tri codes made from W+ rows, so both render through one path).
    """

    def __init__(self, config: WTriEncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        self.backbone = ResNetBackbone(in_channels=6, width=c.width, layers=c.layers, norm="group")
        c3, c4, c5 = self.backbone.out_channels[1:]
        if c.space == "wtri":
            main_out = (c.shared_rows + 9) * c.w_dim
        else:
            main_out = c.num_ws * c.w_dim
        self.mlp = nn.Sequential(nn.Linear(c5 + c3 + c4, c.head_channels), nn.LeakyReLU(0.2),
                                 nn.Linear(c.head_channels, main_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        if c.space == "wtri":  # the pSp pyramid head for w_sp (the W+ baseline has none)
            f = c.fpn_channels
            self.lateral = nn.ModuleList([nn.Conv2d(ch, f, 1) for ch in (c3, c4, c5)])
            convs: list[nn.Module] = []
            for _ in range(int(math.log2(c.input_size // 8))):  # C3 is input_size / 8 wide
                convs += [nn.Conv2d(f, f, 3, 2, 1), nn.LeakyReLU(0.2)]
            self.map2style = nn.Sequential(*convs)
            self.sr_head = nn.Linear(f, c.w_dim)
            nn.init.zeros_(self.sr_head.weight)
            nn.init.zeros_(self.sr_head.bias)

    def set_start(self, start: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Attach the start encoder named by ``config.bootstrap``: ``start(x [N, 3, H, W]) -> ws [N, num_ws,
        w_dim]``. A plain function, not a submodule: its weights stay in their own file, out of this one's."""
        self.__dict__["_start"] = start

    def start_code(self, G: Any, x: torch.Tensor) -> WTri:
        """Where the iterations start: the start encoder's code (bootstrapping), else the generator's average.

        Raises:
            RuntimeError: the config names a start encoder that was not attached (:meth:`set_start`).
        """
        start = self.__dict__.get("_start")
        if self.config.bootstrap and start is None:
            raise RuntimeError(f"this encoder starts from {self.config.bootstrap!r}'s codes: attach it with "
                               f"set_start before inverting")
        if start is not None:
            with torch.no_grad():
                ws = start(x).float()
            return G.wtri_from_ws(ws)
        w_avg = G.backbone.mapping.w_avg.detach()
        return G.wtri_from_ws(w_avg[None, None].expand(len(x), G.num_ws, -1))

    def step(self, x: torch.Tensor, y: torch.Tensor, code: WTri) -> WTri:
        """One refinement: ``code + E(x, y)`` (ReStyle's residual update)."""
        c = self.config
        inp = torch.cat([x, y], dim=1)
        if inp.shape[-1] != c.input_size:
            inp = F.interpolate(inp, size=(c.input_size, c.input_size), mode="bilinear", align_corners=False,
                                antialias=inp.shape[-1] > c.input_size)
        out = self.backbone(inp)
        _, c3, c4, c5 = out.features
        main = self.mlp(torch.cat([out.pooled, c3.mean((2, 3)), c4.mean((2, 3))], dim=1))
        n, w = len(x), c.w_dim
        if c.space == "wtri":
            p5 = self.lateral[2](c5)
            p4 = self.lateral[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
            p3 = self.lateral[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
            d_sr = self.sr_head(self.map2style(p3).flatten(1))
            d_shared = main[:, :c.shared_rows * w].reshape(n, c.shared_rows, w)
            d_planes = main[:, c.shared_rows * w:].reshape(n, 3, 3, w)
            return WTri(code.shared + d_shared, code.planes + d_planes, code.sr + d_sr)
        # plain W+ (the ReStyle baseline): one set of rows for every plane, the SR reading the last row as in EG3D
        ws = _ws_of(code, c) + main.reshape(n, c.num_ws, w)
        k = c.shared_rows - 1
        return WTri(ws[:, :k + 1], ws[:, k:k + 3][:, None].expand(-1, 3, -1, -1), ws[:, -1])

    def invert(self, G: Any, x: torch.Tensor, c: torch.Tensor, iterations: int | None = None,
               start: WTri | None = None, keep_images: bool = True,
               **render_kw: Any) -> tuple[list[WTri], list[torch.Tensor]]:
        """Run the iterations on photos ``x [N, 3, H, W]`` seen from cameras ``c [N, 25]``: the codes and the
        reconstructions after every step (``start``: the initial code, default :meth:`start_code`).

        ``keep_images=False`` (codes only, as the cycle loss wants them): the renders the encoder reads are made
        outside autograd (in training they are detached inputs anyway), the last one is skipped, and the list of
        images comes back empty."""
        code = self.start_code(G, x) if start is None else start
        kw = {"noise_mode": "const", **render_kw}

        def render(code: WTri) -> torch.Tensor:
            if keep_images:
                return G.synthesis_wtri(code, c, **kw)["image"]
            with torch.no_grad():
                return G.synthesis_wtri(code, c, **kw)["image"]

        y = render(code)
        codes, images = [], []
        n = iterations or self.config.iterations
        for t in range(n):
            code = self.step(x, y.detach() if self.training else y, code)
            codes.append(code)
            if keep_images or t < n - 1:
                y = render(code)
            if keep_images:
                images.append(y)
        return codes, images

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], overwrite: bool = False, half: bool = False) -> Path:
        from portrait3d.checkpoints.native import save_config_module

        return save_config_module(self, path, WTRI_ENCODER_FORMAT, overwrite, half)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "WTriEncoder":
        from portrait3d.checkpoints.native import load_config_module

        return load_config_module(path, cls, WTriEncoderConfig, WTRI_ENCODER_FORMAT, "W_tri encoder")


def _ws_of(code: WTri, c: WTriEncoderConfig) -> torch.Tensor:
    """The W+ rows of a code whose planes share their rows (what the 'wplus' space makes): the shared rows and
    the last block's conv1 and ToRGB rows (EG3D backbones: ``num_ws = shared_rows + 2``)."""
    ws = torch.cat([code.shared, code.planes[:, 0, 1:]], dim=1)
    if ws.shape[1] != c.num_ws:
        raise ValueError(f"a W+ code needs shared_rows + 2 = num_ws rows, not {ws.shape[1]} for {c.num_ws}")
    return ws

"""Fuzz targets of the reliability suite (issue 18), shared by ``bench/fuzz_loaders.py`` (long runs, atheris when
installed, else hypothesis) and ``test_fuzz_smoke.py`` (a few seconds each in CI).

A target takes bytes, writes them where a user's file would be and calls the loader. The invariant: the loader
returns, or raises one of portrait3d's error types (:class:`~portrait3d.errors.UsageError` and its subclasses, or
``OSError``); anything else is a crash, a call longer than :data:`HANG_SECONDS` a hang, and a file appearing at the
tripwire path means a checkpoint ran code. The seeds are small valid files of each kind, plus a pickle that would
create the tripwire if unpickled naively.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HANG_SECONDS = 10
TARGETS = ("safetensors", "pickle", "rosinality", "image", "config")


class Hang(Exception):
    """A target call ran past :data:`HANG_SECONDS`."""


class Tripwire:
    """Unpickling this would run ``touch PATH``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.path}",))


@dataclass
class Fuzzer:
    """Seeds and targets in a scratch folder ``root``; :meth:`run` checks the invariant for one input."""

    root: Path
    seeds: dict[str, list[bytes]] = field(default_factory=dict)

    @property
    def tripwire(self) -> Path:
        return self.root / "TRIPWIRE"

    def build_seeds(self, nvidia_pickle: Path | None = None) -> None:
        """Write the seeds; ``nvidia_pickle``: a published-format NVIDIA pickle to add to the pickle seeds (the
        parity fixture of ``../shared``, whose embedded source code is a tripwire)."""
        import torch
        from PIL import Image

        from portrait3d import save_network
        from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

        self.root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        G = Generator(StyleGAN2Config(z_dim=8, w_dim=8, img_resolution=8, mapping=MappingConfig(num_layers=1),
                                      synthesis=SynthesisConfig(channel_base=32, channel_max=8)))
        st = save_network(G, self.root / "seed.safetensors", overwrite=True).read_bytes()
        from portrait3d.checkpoints.rosinality import rosinality_state_from_generator

        buf = io.BytesIO()
        torch.save({"g_ema": rosinality_state_from_generator(G), "latent_avg": G.mapping.w_avg.clone()}, buf)
        evil = pickle.dumps({"G_ema": Tripwire(str(self.tripwire))})
        plain = pickle.dumps({"G_ema": None, "training_set_kwargs": {"resolution": 8}}, protocol=2)
        imgs = []
        for fmt in ("PNG", "JPEG", "GIF", "BMP"):
            b = io.BytesIO()
            arr = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(b, format=fmt)
            imgs.append(b.getvalue())
        header_len = struct.unpack("<Q", st[:8])[0]
        meta = json.loads(st[8:8 + header_len])["__metadata__"]
        pickles = [plain, evil] + ([Path(nvidia_pickle).read_bytes()] if nvidia_pickle is not None else [])
        self.seeds = {"safetensors": [st], "pickle": pickles, "rosinality": [buf.getvalue()],
                      "image": imgs, "config": [meta["config"].encode()]}

    # ------------------------------------------------------------------ the targets
    def _load_network(self, data: bytes, suffix: str) -> None:
        from portrait3d.checkpoints import load_network

        path = self.root / f"input{suffix}"
        path.write_bytes(data)
        load_network(path)

    def _image(self, data: bytes) -> None:
        from portrait3d.face.io import load_image

        path = self.root / "input.img"
        path.write_bytes(data)
        load_image(path)

    def _config(self, data: bytes) -> None:
        """The fuzzed bytes as the ``config`` JSON of an otherwise valid portrait3d safetensors file."""
        st = self.seeds["safetensors"][0]
        header_len = struct.unpack("<Q", st[:8])[0]
        header = json.loads(st[8:8 + header_len])
        header["__metadata__"]["config"] = data.decode("utf-8", errors="replace")
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        self._load_network(struct.pack("<Q", len(raw)) + raw + st[8 + header_len:], ".safetensors")

    def target(self, name: str) -> Callable[[bytes], None]:
        return {"safetensors": lambda d: self._load_network(d, ".safetensors"),
                "pickle": lambda d: self._load_network(d, ".pkl"),
                "rosinality": lambda d: self._load_network(d, ".pt"),
                "image": self._image, "config": self._config}[name]

    def run(self, name: str, data: bytes) -> None:
        """One input: raise AssertionError (crash, tripwire) or :class:`Hang` when the invariant breaks."""
        from portrait3d.errors import UsageError

        def alarm(signum: int, frame: object) -> None:
            raise Hang(f"{name}: more than {HANG_SECONDS} s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(HANG_SECONDS)
        try:
            self.target(name)(data)
        except (UsageError, OSError):
            pass
        except Hang:
            raise
        except Exception as e:  # noqa: BLE001 - the invariant under test
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        if self.tripwire.exists():
            raise AssertionError(f"{name}: a checkpoint ran code (the tripwire file appeared)")


def mutate(seed: bytes, flips: list[tuple[int, int]], cut: int | None, insert: tuple[int, bytes] | None) -> bytes:
    """``seed`` with bytes replaced at ``flips`` (position modulo the length, value), truncated to ``cut`` and with
    ``insert`` spliced in: the byte-level mutations a fuzzer starts from."""
    b = bytearray(seed)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    if insert is not None:
        pos, extra = insert
        pos = pos % (len(b) + 1)
        b[pos:pos] = extra
    if cut is not None:
        b = b[:cut % (len(b) + 1)]
    return bytes(b)

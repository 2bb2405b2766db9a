"""Pseudo pairs rendered once and kept on disk, for training E and P many epochs without re-rendering.

    portrait3d train pseudo-pairs --network default-3d --out ~/.cache/portrait3d/pairs-3d --count 12000

On a CPU the frozen generator's render costs about 20x the encoder's training step on the same batch (measured
with ``default-3d`` at 128 px in bf16: 6.6 s per 16 renders against 0.34 s per encoder step, one thread), so a
latent-regression run (E's latent term only, P's angle and offset terms) spends almost all its time rendering
pairs it could have reused. A cache renders ``count`` pairs once (:func:`build_pair_cache`) with the batches of
:class:`.pseudo.PseudoPairStream` (stream key :data:`CACHE_KEY`, so a cache never holds the pairs of an
uncached training stream or of :func:`.train.pose_error_deg`), and :class:`CachedPairStream` serves training
batches from it. The trade is the usual one of a fixed synthetic set: the encoder sees each pair many times, so
it can fit the set's particular latents; :mod:`.train` measures E and P on fresh pairs, never on cached ones.

Files in the cache folder:

* ``cache.json``: the :class:`.pseudo.PseudoPairConfig`, ``count``, ``shard_size``, ``batch``, the generator's
  name, resolution, ``num_ws``, ``w_dim`` and ``generator_sha256``
  (:func:`~portrait3d.checkpoints.fingerprint.module_fingerprint`: trainers refuse a cache of other weights, since
  its latents would not be the generator's);
* ``pairs-00000.safetensors`` ... : ``image uint8 [n, 3, R, R]`` (``round((x + 1) * 127.5)`` of the render
  in ``[-1, 1]``), ``w float32 [n, w_dim]`` (the mapping's output, the same for every layer),
  ``camera float32 [n, 25]``, ``angles float32 [n, 3]``, ``translation float32 [n, 3]``, ``z float32
  [n, z_dim]``, ``depth float16 [n, 1, r, r]``. Each shard is written atomically, so a killed build
  resumes at the first missing shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from portrait3d.checkpoints.fingerprint import module_fingerprint
from portrait3d.checkpoints.native import atomic_write
from portrait3d.errors import UsageError
from portrait3d.methods.inversion3d.pseudo import IndexedStream, PseudoPairConfig, PseudoPairStream
from portrait3d.training.randomness import derive_seed

__all__ = ["CACHE_KEY", "CachedPairStream", "PairCache", "build_pair_cache", "read_cache_meta"]

CACHE_KEY = 0xCAC4E     # PseudoPairStream key of cached pairs
_ORDER_KEY = 0x0D3E5    # seed key of CachedPairStream's per-epoch permutations
_FORMAT = "portrait3d-pseudo-pair-cache"
_SHARD = "pairs-{:05d}.safetensors"


def _shard_path(root: Path, index: int) -> Path:
    return root / _SHARD.format(index)


def build_pair_cache(G: nn.Module, out: str | os.PathLike[str], count: int, cfg: PseudoPairConfig,
                     network: str = "", shard_size: int = 512, batch: int = 16,
                     autocast: Callable[[], Any] | None = None,
                     report: Callable[[int, int, float], None] | None = None) -> Path:
    """Render ``count`` pseudo pairs of ``G`` into ``out`` (see the module docstring); resumable.

    Args:
        G: the EG3D generator (eval mode, frozen).
        out: the cache folder; one that holds a cache of other settings is refused.
        count: pairs in all; a finished cache may be extended by a later call with a larger count.
        cfg: the pairs' :class:`.pseudo.PseudoPairConfig`.
        network: the generator's name, recorded in ``cache.json``.
        shard_size: pairs per file (a multiple of ``batch``).
        batch: pairs per render call (batch ``k`` of the stream is always the same pairs).
        autocast: a context-manager factory the renders run under (e.g. bf16 autocast), or ``None``.
        report: ``report(done, count, seconds)`` after each shard (progress).

    Returns:
        ``out`` as a ``Path``.
    """
    if count < 1 or batch < 1 or shard_size < batch or shard_size % batch:
        raise UsageError(f"need count >= 1 and shard_size a multiple of batch, not {count} / {shard_size} / {batch}")
    cfg.validate()
    root = Path(out)
    meta = {"format": _FORMAT, "pseudo": cfg.to_dict(), "shard_size": shard_size, "batch": batch,
            "network": network, "resolution": int(G.img_resolution), "num_ws": int(G.num_ws),
            "w_dim": int(G.w_dim), "generator_sha256": module_fingerprint(G)}
    meta_path = root / "cache.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        same = {k: v for k, v in old.items() if k != "count"} == json.loads(json.dumps(meta))
        if not same:
            raise UsageError(f"{root} holds a pair cache of other settings (see its cache.json); use a new folder")
        count = max(count, int(old["count"]))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(meta_path, lambda p: Path(p).write_text(json.dumps({**meta, "count": count}, indent=1)),
                 overwrite=True)
    stream = PseudoPairStream(G, batch, cfg, key=CACHE_KEY)
    per_shard = shard_size // batch
    n_shards = -(-count // shard_size)
    t0 = time.perf_counter()
    for s in range(n_shards):
        n = min(shard_size, count - s * shard_size)
        path = _shard_path(root, s)
        if path.exists() and _shard_len(path) >= n:
            continue
        parts: list[dict[str, torch.Tensor]] = []
        for k in range(-(-n // batch)):
            with autocast() if autocast is not None else contextlib.nullcontext():
                b = stream.batch_at(s * per_shard + k)
            parts.append(_to_record(b))
        rec = {key: torch.cat([p[key] for p in parts])[:n].contiguous() for key in parts[0]}
        atomic_write(path, lambda p, rec=rec: save_file(rec, p, metadata={"format": _FORMAT}), overwrite=True)
        if report is not None:
            report(min(count, (s + 1) * shard_size), count, time.perf_counter() - t0)
    return root


def read_cache_meta(root: str | os.PathLike[str]) -> dict[str, Any]:
    """A pair cache's ``cache.json`` (:class:`~portrait3d.errors.UsageError` when ``root`` holds none)."""
    meta_path = Path(root) / "cache.json"
    if not meta_path.is_file():
        raise UsageError(f"{root} is not a pseudo-pair cache (no cache.json; build one with "
                         f"'portrait3d train pseudo-pairs')")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT:
        raise UsageError(f"{meta_path} is not a pseudo-pair cache's description")
    return meta


def _shard_len(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_slice("w").get_shape()[0])


def _to_record(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ws = b["ws"].float().cpu()
    if not torch.equal(ws, ws[:, :1].expand_as(ws)):
        raise UsageError("the pair cache stores one w per pair, but this generator's mapping gave per-layer codes")
    image = ((b["image"].float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return {"image": image, "w": ws[:, 0].contiguous(), "camera": b["camera"].float().cpu(),
            "angles": b["angles"].float().cpu(), "translation": b["translation"].float().cpu(),
            "z": b["z"].float().cpu(), "depth": b["depth"].cpu().to(torch.float16)}


class PairCache:
    """A loaded pair cache (every shard in memory: about 50 KB a pair at 128 px).

    Attributes: ``pseudo`` (:class:`.pseudo.PseudoPairConfig`), ``meta`` (``cache.json``), and the tensors of
    the module docstring concatenated over the shards (``image``, ``w``, ``camera``, ``angles``,
    ``translation``, ``z``, ``depth``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        r = Path(root)
        self.meta: dict[str, Any] = read_cache_meta(r)
        self.pseudo = PseudoPairConfig.from_dict(self.meta["pseudo"])
        count, size = int(self.meta["count"]), int(self.meta["shard_size"])
        shards = []
        for s in range(-(-count // size)):
            path = _shard_path(r, s)
            if not path.is_file():
                break
            shards.append(load_file(str(path)))
        if not shards:
            raise UsageError(f"{root} holds no rendered pairs yet")
        self.tensors = {k: torch.cat([sh[k] for sh in shards]) for k in shards[0]}
        self.num_ws = int(self.meta["num_ws"])

    def __len__(self) -> int:
        return int(self.tensors["w"].shape[0])

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pairs at ``rows`` in :func:`.pseudo.sample_pseudo_pairs`' layout (``image`` in ``[-1, 1]``,
        ``ws [n, num_ws, w_dim]``), on the CPU."""
        t = {k: v[rows] for k, v in self.tensors.items()}
        return {"ws": t["w"].unsqueeze(1).repeat(1, self.num_ws, 1), "z": t["z"], "camera": t["camera"],
                "angles": t["angles"], "translation": t["translation"],
                "image": t["image"].float() / 127.5 - 1, "depth": t["depth"].float()}


class CachedPairStream(IndexedStream):
    """Endless batches drawn from a :class:`PairCache` without replacement within each pass over it.

    Pair number ``p`` of the stream (batch ``p // batch``) is row ``perm_e[p mod N]`` of the cache, with
    ``perm_e`` a permutation seeded by ``(seed, e)`` for pass ``e = p // N``: a batch depends only on
    ``(seed, index)``, so a stream started at ``start`` (a resumed run) yields what an uninterrupted one would.
    """

    def __init__(self, cache: PairCache, batch: int, seed: int, start: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self.cache, self.batch, self.seed, self.index, self.device = cache, batch, seed, start, device
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER_KEY, epoch))
            self._perm = (epoch, torch.randperm(len(self.cache), generator=g))
        return self._perm[1]

    def batch_at(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.cache)
        rows = []
        for p in range(index * self.batch, (index + 1) * self.batch):
            rows.append(self._permutation(p // n)[p % n])
        out = self.cache.batch(torch.stack(rows))
        return {k: v.to(self.device) for k, v in out.items()}

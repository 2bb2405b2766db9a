"""Checkpoints: one folder per snapshot with ``state.safetensors`` (networks, flattened optimiser states, RNG states as
``uint8``) and ``state.json`` (configs, counters, optimiser hyper-parameters, metric history), written into a
temporary folder and renamed into place; :func:`load_training_state` restores bit-exactly (the next steps equal an
uninterrupted run). Loading never executes code (safetensors + JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from portrait3d.errors import UsageError
from portrait3d.training.optim import Counters, Networks

__all__ = ["claim_run_folder", "save_module_snapshot", "load_module_snapshot", "optimizer_tensors", "load_optimizer",
           "rng_tensors", "restore_rng", "write_snapshot_folder", "remove_stale_snapshot_temporaries",
           "save_training_state", "prune_snapshots", "find_snapshot", "read_snapshot", "state_with_prefix",
           "load_training_state", "init_generators"]

STATE_FORMAT = "portrait3d-train-state"
STATE_VERSION = 1



def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``opt``'s state as ``({prefix.state.<i>.<k>: tensor}, JSON metadata)`` (type, param groups, scalar states)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = _jsonable(v)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"type": type(opt).__name__, "param_groups": groups, "state_scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str,
                    meta: dict[str, Any]) -> None:
    """Restore ``opt`` in place from what :func:`optimizer_tensors` wrote under ``prefix``."""
    if meta["type"] != type(opt).__name__:
        raise UsageError(f"snapshot optimiser is {meta['type']}, not {type(opt).__name__}")
    state: dict[int, dict[str, Any]] = {}
    head = prefix + ".state."
    for key, v in tensors.items():
        if key.startswith(head):
            idx, name = key[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch (and initialised CUDA) RNG states: ``rng.torch``, ``rng.cuda.<i>``."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the global RNG states saved by :func:`rng_tensors` (those present in ``tensors``)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def remove_stale_snapshot_temporaries(run_dir: Path) -> None:
    """Delete the temporary (``.NAME.tmp-PID``) and replaced (``.NAME.old-PID``) snapshot folders in ``run_dir``
    whose writer no longer runs (killed mid-write), so a resumed run leaves a clean folder."""
    from portrait3d.checkpoints.native import writer_is_gone

    for p in run_dir.glob(".*"):
        name, sep, pid = p.name.rpartition("-")
        if p.is_dir() and sep and name.endswith((".tmp", ".old")) and writer_is_gone(pid):
            shutil.rmtree(p, ignore_errors=True)


def write_snapshot_folder(folder: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          extra_files: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a snapshot folder atomically (a temporary sibling renamed into place).

    ``tensors`` go to ``state.safetensors`` (detached, contiguous CPU copies), ``meta`` to ``state.json``;
    ``extra_files``: ``name -> write(path)`` for more files (an exported network), written last. An existing
    ``folder`` is replaced only once everything is written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_snapshot_temporaries(folder.parent)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_training_state(folder: str | os.PathLike[str], trainer: str, config: dict[str, Any], nets: Networks,
                        counters: Counters, extra_files: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a snapshot folder atomically (:func:`write_snapshot_folder`).

    ``state.safetensors``: ``G.*``, ``D.*``, ``G_ema.*`` state dicts, ``opt_G.state.<i>.<k>``,
    ``opt_D...`` optimiser tensors, ``extra.*`` trainer tensors, ``rng.*`` RNG states (``uint8``).
    ``state.json``: format, trainer, config, step, images seen, optimiser hyper-parameters,
    metric history. ``extra_files``: ``name -> write(path)`` for more files (the exported generator).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name in ("G", "D", "G_ema"):
        for k, v in getattr(nets, name).state_dict().items():
            tensors[f"{name}.{k}"] = v
    opt_meta = {}
    for name in ("opt_G", "opt_D"):
        t, m = optimizer_tensors(getattr(nets, name), name)
        tensors.update(t)
        opt_meta[name] = m
    tensors.update({f"extra.{k}": v for k, v in nets.extra.items()})
    tensors.update(rng_tensors())
    meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "trainer": trainer, "config": config,
            "step": counters.step, "images_seen": counters.images_seen, "kimg": counters.images_seen / 1000,
            "optimizers": opt_meta, "metrics": counters.metrics, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_snapshot_folder(folder, tensors, meta, extra_files)


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``snapshot-*`` folders of ``run_dir`` (``keep <= 0``: keep all)."""
    if keep > 0:
        for old in sorted(run_dir.glob("snapshot-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def claim_run_folder(out: str | os.PathLike[str], resume: str | os.PathLike[str] | None, force: bool,
                     exports: tuple[str, ...] = ()) -> None:
    """Refuse to start a run in a folder that already holds one, unless ``force`` (then clear it first).

    A folder holds a run when it has snapshots, a log, a config or one of the run's ``exports``. Resuming from a
    snapshot of ``out`` itself continues that run in place; resuming from another run into an occupied ``out``
    is refused like a fresh start. Raises :class:`FileExistsError` with a one-line message."""
    out = Path(out)
    if resume is not None and Path(resume).exists():
        p = Path(resume).resolve()
        if out.resolve() in (p, p.parent):
            return
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    old = [name for name in (*exports, "log.jsonl", "config.json") if (out / name).exists()]
    snaps = sorted(out.glob("snapshot-*"))
    if (old or snaps) and not force:
        what = out / (old[0] if old else snaps[0].name)
        raise FileExistsError(f"{what} already exists: pass --resume {out} to continue that run, "
                              f"or --force to start over")
    if force:
        for folder in snaps:
            shutil.rmtree(folder, ignore_errors=True)
        for name in old:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "samples", ignore_errors=True)


def find_snapshot(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a snapshot folder, else its newest ``snapshot-*`` sub-folder."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    snaps = sorted(q for q in p.glob("snapshot-*") if (q / "state.json").exists()) if p.is_dir() else []
    if not snaps:
        raise FileNotFoundError(f"no training snapshot in {p}")
    return snaps[-1]


def read_snapshot(path: str | os.PathLike[str], trainer: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON metadata and tensors of a ``trainer`` snapshot (``path``: a snapshot or run folder)."""
    from safetensors.torch import load_file

    folder = find_snapshot(path)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UsageError(f"{folder} is not a portrait3d training snapshot")
    if meta.get("trainer") != trainer:
        raise UsageError(f"{folder} is a {meta.get('trainer')} snapshot, not {trainer}")
    meta["folder"] = str(folder)
    return meta, load_file(str(folder / "state.safetensors"))


def state_with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix.`` in snapshot tensors (``'G'``, ``'D'``, ``'G_ema'``)."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def load_training_state(path: str | os.PathLike[str], nets: Networks, trainer: str,
                        check: Callable[[dict[str, Any]], None] | None = None) -> tuple[Counters, dict[str, Any]]:
    """Restore ``nets`` (in place) from a snapshot; returns the counters and the JSON metadata. ``check(meta)`` runs
    before any weight is loaded (a trainer's own test that the snapshot's config fits, with a clearer message than
    a list of mismatched tensors)."""
    from portrait3d.checkpoints.state import load_state_strict

    meta, tensors = read_snapshot(path, trainer)
    if check is not None:
        check(meta)
    for name in ("G", "D", "G_ema"):
        load_state_strict(getattr(nets, name), state_with_prefix(tensors, name), f"snapshot {name}")
    for name in ("opt_G", "opt_D"):
        load_optimizer(getattr(nets, name), tensors, name, meta["optimizers"][name])
    for k in list(nets.extra):
        v = tensors.get(f"extra.{k}")
        if v is not None:
            nets.extra[k].copy_(v)
    restore_rng(tensors)
    return Counters(int(meta["step"]), int(meta["images_seen"]), list(meta.get("metrics", []))), meta


def init_generators(nets: Networks, source: str | os.PathLike[str]) -> str:
    """Start a new run's G and G_ema from a trained generator (a checkpoint file or built-in name, e.g. the shipped
    ``default-2d``); the discriminator and optimisers stay fresh. This is how training continues when the run
    folder with its snapshots is gone: the shipped weights are all that is left.

    Raises UsageError when the generator is of another kind or its weights do not fit these networks.
    Returns a one-line description for the log."""
    from portrait3d.checkpoints.load import load_network

    src = load_network(source, device=torch.device("cpu"))
    if type(src) is not type(nets.G):
        raise UsageError(f"{source} is a {type(src).__name__}, not a {type(nets.G).__name__} like this run's")
    theirs = src.state_dict()
    ours = nets.G.state_dict()
    wrong = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape)
    extra = sorted(set(theirs) - set(ours))
    if wrong or extra:
        names = ", ".join((wrong + extra)[:3])
        raise UsageError(f"{source}: {len(wrong) + len(extra)} weights do not fit this run's generator (e.g. {names}); "
                         "give the config it was trained with")
    for name in ("G", "G_ema"):
        getattr(nets, name).load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()})
    return f"started G and G_ema from {source} ({len(ours)} tensors); fresh discriminator and optimisers"


def save_module_snapshot(folder: str | os.PathLike[str], trainer: str, config: dict[str, Any], net: torch.nn.Module,
                         opt: torch.optim.Optimizer, step: int, images_seen: int,
                         exports: dict[str, Callable[[Path], Any]], ema: torch.nn.Module | None = None,
                         rng: bool = True) -> Path:
    """Snapshot of a one-network trainer (a method's encoder, estimator or RigNet): ``net.*`` (and ``ema.*``)
    weights, the optimiser, the RNG states when ``rng`` (a loop that draws its batches from ``(seed, step)`` needs
    none), and the network's config, written atomically with the ``exports`` files."""
    tensors: dict[str, torch.Tensor] = {f"net.{k}": v for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = optimizer_tensors(opt, "opt")
    tensors.update(opt_tensors)
    if rng:
        tensors.update(rng_tensors())
    meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "trainer": trainer, "config": config,
            "network": net.config.to_dict(), "step": step, "images_seen": images_seen, "kimg": images_seen / 1000,
            "optimizers": {"opt": opt_meta}, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_snapshot_folder(folder, tensors, meta, exports)


def load_module_snapshot(path: str | os.PathLike[str], trainer: str, net: torch.nn.Module,
                         opt: torch.optim.Optimizer, ema: torch.nn.Module | None = None) -> tuple[int, int]:
    """Restore a :func:`save_module_snapshot` folder (or a run folder's newest) into ``net``, ``ema`` and ``opt``
    (and the RNG states when saved); returns ``(step, images_seen)``. A snapshot without EMA starts the EMA from
    the weights. One-line :class:`UsageError` for another trainer's snapshot or another network config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from portrait3d.checkpoints.state import load_state_strict

    folder = find_snapshot(path)
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UsageError(f"{folder}: unreadable snapshot ({str(e).splitlines()[0][:100]})") from None
    if meta.get("format") != STATE_FORMAT or meta.get("trainer") != trainer:
        raise UsageError(f"{folder} is not a {trainer} snapshot (trainer {meta.get('trainer')!r})")
    if meta.get("network") != net.config.to_dict():
        raise UsageError(f"{folder} was trained with a different {type(net).__name__} configuration")
    for prefix, module in (("net.", net), ("ema.", ema)):
        if module is None:
            continue
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd and prefix == "ema.":
            sd = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        load_state_strict(module, sd, f"snapshot {prefix[:-1]}")
    load_optimizer(opt, tensors, "opt", meta["optimizers"]["opt"])
    if any(k.startswith("rng.") for k in tensors):
        restore_rng(tensors)
    return int(meta["step"]), int(meta["images_seen"])

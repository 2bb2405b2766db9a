"""Loading a checkpoint never executes code from it."""

from __future__ import annotations

import builtins
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
from tests.conftest import parity_file

from portrait3d import CheckpointError, load_network
from portrait3d.checkpoints.safe_pickle import PersistentStub, UnsafeCheckpointError, safe_load_pickle


def _nvidia_style_pickle(module_src: str, class_name: str = "Generator", extra: object = None) -> bytes:
    """A pickle laid out like NVIDIA's persistence format, made with throw-away fake modules."""
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only referenced by name in the pickle
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Obj:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=module_src, class_name=class_name,
                        state={"_init_args": (), "_init_kwargs": {}, "_modules": {}})
            return (_reconstruct_persistent_obj, (meta,))

    sys.modules["torch_utils"] = types.ModuleType("torch_utils")
    sys.modules["torch_utils.persistence"] = mod
    try:
        return pickle.dumps({"G_ema": Obj(), "extra": extra}, protocol=3)
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]


def test_fixture_tripwire_source_is_never_executed(monkeypatch):
    """The fixture's embedded module_src raises if executed; we also watch exec/eval/compile for it."""
    path = parity_file("stylegan2_64.pkl")
    seen: list[str] = []
    real = {name: getattr(builtins, name) for name in ("exec", "eval", "compile")}

    def watch(name):
        def wrapper(source, *args, **kwargs):
            if isinstance(source, (str, bytes)) and b"never be executed" in (
                    source if isinstance(source, bytes) else source.encode()):
                seen.append(name)
            return real[name](source, *args, **kwargs)
        return wrapper

    for name in real:
        monkeypatch.setattr(builtins, name, watch(name))
    data = safe_load_pickle(path.read_bytes())
    G = load_network(path)
    for name in real:
        monkeypatch.setattr(builtins, name, real[name])
    stub = data["G_ema"]
    assert isinstance(stub, PersistentStub) and stub.module_src_len > 0
    assert G.num_ws == 10
    assert seen == []


def test_embedded_source_with_side_effect_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('x')\nclass Generator: pass\n"
    ckpt = tmp_path / "evil.pkl"
    ckpt.write_bytes(_nvidia_style_pickle(src))
    with pytest.raises(CheckpointError):
        load_network(ckpt)  # no constructor args: refused, and ...
    assert not marker.exists()  # ... the embedded source never ran


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unknown_global_is_refused_before_running(tmp_path):
    ckpt = tmp_path / "evil.pkl"
    ckpt.write_bytes(pickle.dumps({"G_ema": _System()}, protocol=3))
    with pytest.raises(UnsafeCheckpointError, match=r"'posix.system'|'os.system'|not on portrait3d's allow-list"):
        load_network(ckpt)


@pytest.mark.parametrize("payload", [
    (eval, ("1+1",)),
    (getattr, ("abc", "upper")),
    (Path.unlink, (Path("/nonexistent"),)),
])
def test_other_hostile_globals_are_refused(tmp_path, payload):
    class Evil:
        def __reduce__(self):
            return payload

    ckpt = tmp_path / "evil.pkl"
    ckpt.write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=3))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_network(ckpt)
    assert "\n" not in str(info.value)


def test_unsupported_network_class_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "disc.pkl"
    ckpt.write_bytes(_nvidia_style_pickle("raise RuntimeError", class_name="Discriminator"))
    with pytest.raises(CheckpointError, match="network class 'Discriminator' is not supported"):
        load_network(ckpt)


def test_a_huge_declared_size_is_refused_before_allocating():
    """A protocol-5 BYTEARRAY8 declaring 8 GiB in a tiny file (found by the fuzzer): refused, nothing allocated."""
    import resource
    import struct

    from portrait3d.checkpoints.safe_pickle import CheckpointError, safe_load_pickle

    data = b"\x80\x05" + b"\x96" + struct.pack("<Q", 8 << 30) + b"abc" + b"."
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(hard, 6 << 30) if hard > 0 else 6 << 30, hard))
    try:
        with pytest.raises(CheckpointError, match="bytearray8, but only 4 remain"):  # the scan, not a MemoryError
            safe_load_pickle(data)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    with pytest.raises(CheckpointError, match="STOP"):
        safe_load_pickle(b"\x80\x04N")


def test_memo_indices_past_the_pickle_are_refused():
    """``LONG_BINPUT 1349612391`` in a 52-byte pickle made CPython zero a 10 GB memo (found by atheris)."""
    import struct

    from portrait3d.checkpoints.safe_pickle import CheckpointError, safe_load_pickle

    honest = pickle.dumps({"a": [1, 2], "b": [1, 2]}, protocol=2)
    assert safe_load_pickle(honest) == {"a": [1, 2], "b": [1, 2]}
    hostile = b"\x80\x02N" + b"r" + struct.pack("<I", 1349612391) + b"."
    with pytest.raises(CheckpointError, match="memo index 1349612391"):
        safe_load_pickle(hostile)


def test_nested_storages_cannot_declare_more_than_they_hold():
    """A legacy ``torch.save`` storage whose persistent id declares 8 GB in a few hundred bytes is refused before
    torch allocates it; a genuine one loads."""
    import io

    import torch

    from portrait3d.checkpoints.safe_pickle import CheckpointError, _load_storage_from_bytes

    buf = io.BytesIO()
    torch.save(torch.arange(10, dtype=torch.float32).storage(), buf, _use_new_zipfile_serialization=False)
    assert _load_storage_from_bytes(buf.getvalue()).size() == 10

    marker = object()

    class Declares(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2 * 10**9, None) if obj is marker else None

    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    Declares(f, protocol=2).dump(marker)
    pickle.dump(["0"], f, protocol=2)
    f.write((10).to_bytes(8, "little") + bytes(40))
    with pytest.raises(CheckpointError, match="declares 8000000000 bytes"):
        _load_storage_from_bytes(f.getvalue())

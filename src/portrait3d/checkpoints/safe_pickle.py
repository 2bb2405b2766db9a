"""Read NVIDIA network pickles without executing anything they contain.

NVIDIA's pickles (StyleGAN2-ADA, StyleGAN3, EG3D) store every network through
``torch_utils.persistence``: the pickle calls ``_reconstruct_persistent_obj(meta)``
where ``meta`` carries the *source code* of the defining module (``module_src``),
a class name and the object's ``__dict__``. The official loader ``exec``\\ s that
source. We never do: a restricted :class:`pickle.Unpickler` resolves only an
allow-list of globals, and persistent objects become inert :class:`PersistentStub`
records (class name + state) that :mod:`portrait3d.checkpoints.nvidia` maps onto
our own classes. Any other global — ``os.system``, ``builtins.eval``, an unknown
class — is refused with :class:`UnsafeCheckpointError` before anything runs.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "PersistentStub", "PlainStub", "safe_load_pickle"]


class CheckpointError(UsageError):
    """A checkpoint could not be read or does not describe a supported network."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for a global outside the allow-list (possible code execution)."""


class PersistentStub:
    """Inert stand-in for an object saved by ``torch_utils.persistence``.

    Attributes:
        class_name: the original class name, e.g. ``'SynthesisLayer'``.
        state: the pickled ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``,
            ``_init_args``, ``_init_kwargs`` and plain attributes).
        version: persistence format version.
        module_src_len: length of the embedded source, which is kept unexecuted.
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("unsupported persistent object record in the pickle")
        self.class_name = str(meta.get("class_name"))
        self.version = meta.get("version")
        src = meta.get("module_src")
        self.module_src_len = len(src) if isinstance(src, str) else 0
        state = meta.get("state")
        self.state: dict[str, Any] = state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"PersistentStub({self.class_name})"


class PlainStub:
    """Inert stand-in for an instance of an allow-listed plain class (EG3D renderer, torch.nn containers)."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; some objects pickle (dict, slots) tuples.
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0] or state[1]
        self.state = state if isinstance(state, dict) else {}

    @property
    def class_name(self) -> str:
        return self.qualified_name.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"PlainStub({self.qualified_name})"


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dict (training options stored in pickles)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


# Plain classes whose instances may appear in supported pickles. They become
# PlainStub subclasses that only record state: nothing of theirs is imported.
_PLAIN_CLASSES = frozenset({
    "training.volumetric_rendering.renderer.ImportanceRenderer",
    "training.volumetric_rendering.ray_marcher.MipRayMarcher2",
    "training.volumetric_rendering.ray_sampler.RaySampler",
    "training.triplane.OSGDecoder",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.activation.Softplus",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.LeakyReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.linear.Identity",
})

_STUB_CLASSES: dict[str, type[PlainStub]] = {}


def _plain_stub_class(qualified_name: str) -> type[PlainStub]:
    cls = _STUB_CLASSES.get(qualified_name)
    if cls is None:
        cls = type("PlainStub_" + qualified_name.replace(".", "_"), (PlainStub,), {"qualified_name": qualified_name})
        _STUB_CLASSES[qualified_name] = cls
    return cls


_ELEMENT_SIZES = {"DoubleStorage": 8, "LongStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
                  "FloatStorage": 4, "IntStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "ShortStorage": 2}


class _StorageSizeScan(pickle.Unpickler):
    """Reads a legacy ``torch.save`` stream's pickles without building a storage: only the declared sizes."""

    declared = 0

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return name
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise CheckpointError(f"malformed tensor storage in the pickle (it names {module}.{name})")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel[, view_metadata]): torch allocates numel elements up front
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
            size = _ELEMENT_SIZES.get(pid[1], 1) if isinstance(pid[1], str) else 1
            self.declared += max(pid[4], 0) * size
        return None


def _check_storage_sizes(b: bytes) -> None:
    """A nested storage cannot declare more bytes than it holds: torch's legacy loader allocates every storage at
    its declared size before reading it (and only then finds the data short), so a few kilobytes could ask the
    allocator for gigabytes. Zip-format storages read their sizes from the records themselves."""
    if b[:2] == b"PK":
        return
    _check_opcodes(b, count=4)  # the scan below unpickles the legacy stream's four pickles
    f = io.BytesIO(b)
    scan = _StorageSizeScan(f)
    try:
        for _ in range(4):  # magic number, protocol version, system info, the object
            scan.load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch would refuse it too; say so in our words
        raise CheckpointError(f"unreadable tensor storage in the pickle ({type(e).__name__})") from None
    if scan.declared > len(b):
        raise CheckpointError(f"corrupt tensor storage in the pickle: it declares {scan.declared} bytes and holds "
                              f"{len(b)}")


def _load_storage_from_bytes(b: bytes) -> Any:
    """Tensor storages are pickled as nested ``torch.save`` bytes: read them with torch's own
    weights-only unpickler, which allows no code either, after checking their declared sizes."""
    if not isinstance(b, (bytes, bytearray)):
        raise CheckpointError("malformed tensor storage in the pickle")
    _check_storage_sizes(bytes(b))
    try:
        return torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt or hostile storage
        raise CheckpointError(f"unreadable tensor storage in the pickle ({type(e).__name__})") from None


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise CheckpointError("malformed tensor in the pickle")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), requires_grad,
                                           collections.OrderedDict())


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any = None, *rest: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in the pickle")
    return torch.nn.Parameter(data, bool(requires_grad))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("refusing a numpy object scalar in the pickle")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dt = np.dtype(name, bool(align), bool(copy))
    if dt.hasobject:
        raise UnsafeCheckpointError("refusing a numpy object dtype in the pickle")
    return dt


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError("refusing a numpy array subclass in the pickle")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocol-0/1 pickles of plain objects; only our inert stubs may come through here.
    if isinstance(cls, type) and issubclass(cls, (PlainStub, _EasyDict)) and base is object and state is None:
        return cls.__new__(cls)
    raise UnsafeCheckpointError("refusing copyreg reconstruction of a non-allow-listed class")


_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentStub,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("builtins", "object"): object,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        if qualified in _PLAIN_CLASSES:
            return _plain_stub_class(qualified)
        raise UnsafeCheckpointError(
            f"checkpoint references '{qualified}', which is not on portrait3d's allow-list; refusing to load it "
            "(loading never executes code from a checkpoint)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("pickle uses persistent ids; this is not a network pickle portrait3d can read")


def _check_opcodes(data: bytes, count: int = 1) -> None:
    """Walk the opcodes of the first ``count`` pickles of ``data`` without building anything
    (``pickletools.genops``): an unknown opcode, or one that declares more bytes than the file holds, is refused
    before the unpickler runs. (CPython's unpickler allocates a protocol-5 ``BYTEARRAY8`` at its declared size
    before reading it: a 25 kB file could ask for gigabytes; the fuzzer of tests/reliability found it.)"""
    import pickletools

    f = io.BytesIO(data)
    for _ in range(count):
        try:
            for n, (op, arg, _) in enumerate(pickletools.genops(f)):
                # memo slots are numbered as they are filled, so no honest pickle puts past its own length; CPython
                # sizes the memo to the index given (LONG_BINPUT 1349612391 made it zero 10 GB: atheris's OOM)
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= n):
                    raise CheckpointError(f"not a readable pickle (memo index {arg} at opcode {n})")
                if op.name == "STOP":
                    break
            else:
                raise CheckpointError("not a readable pickle (no STOP opcode)")
        except (ValueError, EOFError, UnicodeDecodeError) as e:
            raise CheckpointError(f"not a readable pickle ({str(e)[:120]})") from None


def safe_load_pickle(f: BinaryIO | bytes) -> Any:
    """Unpickle ``f`` with the restricted allow-list; return the (stub-filled) object tree.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list is referenced.
        CheckpointError: the data is not a readable pickle.
    """
    if not isinstance(f, (bytes, bytearray)):
        f = f.read()
    _check_opcodes(bytes(f))
    f = io.BytesIO(f)
    try:
        return _RestrictedUnpickler(f).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError, UnicodeDecodeError, RuntimeError) as e:
        raise CheckpointError(f"not a readable pickle ({type(e).__name__}: {str(e)[:120]})") from None

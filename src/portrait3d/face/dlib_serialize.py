"""Reader for dlib's binary serialization of DNN models (``*.dat`` written by ``dlib::serialize``).

Only data is decoded -- no pickle, no code execution. The reader understands the pieces used by
dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) and the common
layers around them:

* **integers** -- dlib's variable-length format: one control byte (bit 7 = sign, low 4 bits =
  number of payload bytes) followed by that many little-endian magnitude bytes;
* **floats/doubles** -- a ``float_details`` pair: integer mantissa then integer exponent
  (value = mantissa * 2**exponent; exponents 32000/32001/32002 encode +inf/-inf/NaN);
* **bool** -- one ASCII byte ``'0'`` / ``'1'``;
* **strings** -- integer length, then the bytes;
* **tensors** -- ``resizable_tensor`` version 2: ``n, k, nr, nc`` then raw little-endian float32
  (version 1: the same header then one dlib float per value); ``alias_tensor``: version 1 and its
  four dimensions.

A network ``add_loss_layer<LOSS, add_layer<L_n, ... add_layer<L_1, INPUT>>>`` is written as::

    version(1) LOSS-details
    version(2) version(2) ... version(1 = tag/skip layer) ...   <- one per layer, top to bottom
    version(2|3) INPUT-details L_1-details trailer_1            <- innermost add_layer
    L_2-details trailer_2 ... L_n-details trailer_n             <- unwinding, bottom to top

Tag and skip layers only write a version number (their ids are *not* stored), so the graph
topology must come from the known network definition; :func:`read_dlib_network` returns the
layers in forward order plus the token sequence (``'layer'`` / ``'tag_or_skip'``) so a caller can
validate it against its own definition.

Every structural problem (truncation, unknown record, bad version, inconsistent sizes, trailing
bytes) raises :class:`ValueError` with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portrait3d.errors import UsageError

__all__ = ["DlibLayer", "DlibNetwork", "DlibReader", "read_dlib_network"]

_FLOAT_SPECIAL = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
_MAX_TENSOR_ELEMENTS = 1 << 31  # sanity bound: a corrupt header must not trigger a huge allocation


@dataclass
class DlibLayer:
    """One layer record. ``kind`` is the normalised type (``'con'``, ``'affine'``, ``'relu'``, ...);
    ``version`` the literal record name in the file (``'con_4'``, ``'max_pool_2'``, ...)."""

    kind: str
    version: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """A parsed network: ``layers`` in forward order (input first, excluding the input layer)."""

    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]
    tokens: list[str]  # forward order: 'layer' for each entry of `layers`, 'tag_or_skip' between

    def kinds(self) -> list[str]:
        """Forward-order sequence of layer kinds with ``'tag'`` markers for tag/skip layers."""
        out, it = [], iter(self.layers)
        for t in self.tokens:
            out.append(next(it).kind if t == "layer" else "tag")
        return out


class DlibReader:
    """Cursor over a bytes buffer decoding dlib's primitive serialization formats."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.data = memoryview(data)
        self.pos = 0
        self.name = name

    # -- errors ------------------------------------------------------------------------------
    def error(self, msg: str) -> ValueError:
        return ValueError(f"corrupt dlib model file {self.name}: {msg} (at byte {self.pos} of {len(self.data)})")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"truncated while reading {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    # -- primitives --------------------------------------------------------------------------
    def read_int(self, what: str = "integer", *, signed: bool = True, max_bytes: int = 8) -> int:
        ctrl = self._take(1, what)[0]
        size = ctrl & 0x0F
        if ctrl & 0x70:
            raise self.error(f"invalid integer control byte 0x{ctrl:02x} for {what}")
        if size > max_bytes:
            raise self.error(f"{what} needs {size} bytes (more than {max_bytes})")
        neg = bool(ctrl & 0x80)
        if neg and not signed:
            raise self.error(f"negative value for unsigned {what}")
        value = int.from_bytes(self._take(size, what), "little") if size else 0
        return -value if neg else value

    def read_uint(self, what: str = "unsigned integer") -> int:
        return self.read_int(what, signed=False)

    def read_float(self, what: str = "float") -> float:
        mantissa = self.read_int(f"{what} mantissa", max_bytes=8)
        exponent = self.read_int(f"{what} exponent", max_bytes=2)
        if exponent in _FLOAT_SPECIAL:
            return _FLOAT_SPECIAL[exponent]
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise self.error(f"{what} out of range (mantissa {mantissa}, exponent {exponent})") from None

    def read_bool(self, what: str = "bool") -> bool:
        b = self._take(1, what)[0]
        if b == 0x31:
            return True
        if b == 0x30:
            return False
        raise self.error(f"invalid bool byte 0x{b:02x} for {what}")

    def read_str(self, what: str = "string", max_len: int = 1 << 16) -> str:
        n = self.read_uint(f"{what} length")
        if n > max_len:
            raise self.error(f"{what} length {n} is implausible")
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not ASCII") from None

    def peek_str(self, max_len: int = 64) -> str | None:
        """The string at the cursor if one plausibly starts here (cursor unchanged), else None."""
        save = self.pos
        try:
            s = self.read_str(max_len=max_len)
            return s if s and s.isprintable() else None
        except ValueError:
            return None
        finally:
            self.pos = save

    def expect_version(self, expected: int | tuple[int, ...], what: str) -> int:
        v = self.read_int(f"{what} version")
        ok = v in expected if isinstance(expected, tuple) else v == expected
        if not ok:
            raise self.error(f"unexpected {what} version {v} (expected {expected})")
        return v

    def read_tensor(self, what: str = "tensor") -> np.ndarray:
        """A ``resizable_tensor`` as a float32 array of shape ``(n, k, nr, nc)``."""
        version = self.expect_version((1, 2), what)
        dims = [self.read_int(f"{what} dimension") for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.error(f"negative {what} dimension {dims}")
        count = int(np.prod(dims, dtype=np.int64))
        if count > _MAX_TENSOR_ELEMENTS:
            raise self.error(f"{what} of {count} elements is implausible")
        if version == 2:
            raw = self._take(4 * count, f"{what} data")
            arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            arr = np.array([self.read_float(f"{what} value") for _ in range(count)], dtype=np.float32)
        return arr.reshape(dims)

    def read_alias_tensor(self, what: str = "alias_tensor") -> tuple[int, int, int, int]:
        self.expect_version(1, what)
        dims = tuple(self.read_int(f"{what} dimension") for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.error(f"negative {what} dimension {dims}")
        return dims  # type: ignore[return-value]

    # -- layers ------------------------------------------------------------------------------
    def read_layer_details(self) -> DlibLayer:
        start = self.pos
        name = self.read_str("layer name", max_len=64)
        reader = _LAYER_READERS.get(name)
        if reader is None:
            self.pos = start
            raise self.error(f"unsupported layer record {name!r}")
        kind, params = reader(self)
        return DlibLayer(kind=kind, version=name, params=params)

    def read_input_layer(self) -> DlibLayer:
        name = self.read_str("input layer name", max_len=64)
        if name == "input_rgb_image_sized":
            avg = [self.read_float("input mean") for _ in range(3)]
            nr, nc = self.read_uint("input rows"), self.read_uint("input cols")
            return DlibLayer("input_rgb_image_sized", name, {"avg_rgb": avg, "nr": nr, "nc": nc})
        if name == "input_rgb_image":
            avg = [self.read_float("input mean") for _ in range(3)]
            return DlibLayer("input_rgb_image", name, {"avg_rgb": avg})
        raise self.error(f"unsupported input layer {name!r}")

    def read_loss_layer(self) -> DlibLayer:
        name = self.read_str("loss layer name", max_len=64)
        if name == "loss_metric_2":
            margin = self.read_float("loss margin")
            dist = self.read_float("loss distance threshold")
            return DlibLayer("loss_metric", name, {"margin": margin, "dist_thresh": dist})
        if name == "loss_metric_":
            return DlibLayer("loss_metric", name, {"margin": 0.04, "dist_thresh": 0.6})
        raise self.error(f"unsupported loss layer {name!r}")


# -- per-layer payload decoders ----------------------------------------------------------------

def _lr_mults(r: DlibReader, n: int) -> list[float]:
    return [r.read_float("learning-rate/weight-decay multiplier") for _ in range(n)]


def _split_params(r: DlibReader, params: np.ndarray, parts: list[tuple[int, ...]], what: str) -> list[np.ndarray]:
    flat = params.reshape(-1)
    sizes = [int(np.prod(p, dtype=np.int64)) for p in parts]
    if sum(sizes) != flat.size:
        raise r.error(f"{what}: parameter tensor has {flat.size} values, aliases need {sum(sizes)}")
    out, off = [], 0
    for p, s in zip(parts, sizes):
        out.append(flat[off:off + s].reshape(p).copy())
        off += s
    return out


def _read_con(r: DlibReader, version: str) -> tuple[str, dict]:
    params = r.read_tensor("con params")
    num_filters, nr, nc = r.read_int("num_filters"), r.read_int("nr"), r.read_int("nc")
    sy, sx = r.read_int("stride_y"), r.read_int("stride_x")
    py, px = r.read_int("padding_y"), r.read_int("padding_x")
    fdims = r.read_alias_tensor("con filters")
    bdims = r.read_alias_tensor("con biases")
    _lr_mults(r, 4)
    use_bias = r.read_bool("con use_bias") if version == "con_5" else True
    if min(num_filters, nr, nc, sy, sx) <= 0 or min(py, px) < 0:
        raise r.error(f"invalid con geometry {num_filters}x{nr}x{nc} stride {sy},{sx} pad {py},{px}")
    if fdims[0] != num_filters or fdims[2:] != (nr, nc):
        raise r.error(f"con filter alias {fdims} does not match {num_filters}x{nr}x{nc}")
    parts = [fdims] + ([bdims] if use_bias and params.size != int(np.prod(fdims)) else [])
    arrays = _split_params(r, params, parts, "con")
    weight = arrays[0]
    bias = arrays[1].reshape(-1) if len(arrays) > 1 else np.zeros(num_filters, np.float32)
    if bias.size != num_filters:
        raise r.error(f"con bias has {bias.size} values for {num_filters} filters")
    return "con", {"weight": weight, "bias": bias, "stride": (sy, sx), "padding": (py, px)}


def _read_affine(r: DlibReader, version: str) -> tuple[str, dict]:
    params = r.read_tensor("affine params")
    gdims = r.read_alias_tensor("affine gamma")
    bdims = r.read_alias_tensor("affine beta")
    mode = r.read_int("affine mode")
    if mode not in (0, 1):
        raise r.error(f"invalid affine mode {mode}")
    gamma, beta = _split_params(r, params, [gdims, bdims], "affine")
    return "affine", {"gamma": gamma, "beta": beta, "mode": "conv" if mode == 0 else "fc"}


def _read_pool(kind: str):
    def reader(r: DlibReader, version: str) -> tuple[str, dict]:
        nr, nc = r.read_int("pool nr"), r.read_int("pool nc")
        sy, sx = r.read_int("pool stride_y"), r.read_int("pool stride_x")
        py, px = r.read_int("pool padding_y"), r.read_int("pool padding_x")
        if min(nr, nc, py, px) < 0 or min(sy, sx) <= 0:
            raise r.error(f"invalid {kind} geometry {nr}x{nc} stride {sy},{sx} pad {py},{px}")
        return kind, {"size": (nr, nc), "stride": (sy, sx), "padding": (py, px)}
    return reader


def _read_fc(r: DlibReader, version: str) -> tuple[str, dict]:
    num_outputs, num_inputs = r.read_uint("fc num_outputs"), r.read_uint("fc num_inputs")
    params = r.read_tensor("fc params")
    wdims = r.read_alias_tensor("fc weights")
    bdims = r.read_alias_tensor("fc biases")
    bias_mode = r.read_int("fc bias mode")
    _lr_mults(r, 4)
    if bias_mode not in (0, 1):
        raise r.error(f"invalid fc bias mode {bias_mode}")
    if wdims[:2] != (num_inputs, num_outputs):
        raise r.error(f"fc weight alias {wdims} does not match {num_inputs}x{num_outputs}")
    parts = [wdims] + ([bdims] if bias_mode == 0 else [])
    arrays = _split_params(r, params, parts, "fc")
    weight = arrays[0].reshape(num_inputs, num_outputs)  # dlib: output = input @ weight
    bias = arrays[1].reshape(-1) if bias_mode == 0 else None
    return "fc", {"weight": weight, "bias": bias}


def _no_payload(kind: str):
    return lambda r, version: (kind, {})


_LAYER_READERS = {
    "con_4": _read_con,
    "con_5": _read_con,
    "affine_": _read_affine,
    "relu_": _no_payload("relu"),
    "add_prev_": _no_payload("add_prev"),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
}
_LAYER_READERS = {k: (lambda f, k=k: (lambda r: f(r, k)))(v) for k, v in _LAYER_READERS.items()}


def _read_add_layer_trailer(r: DlibReader, input_version: int | None) -> None:
    """Training-state fields written after each layer's details (validated, then discarded)."""
    for what in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
        r.read_bool(what)
    r.read_tensor("x_grad")
    r.read_tensor("cached_output")
    r.read_tensor("params_grad" if input_version is None else "grad_final")
    if input_version == 3:
        r.read_uint("sample_expansion_factor")


def read_dlib_network(source: str | Path | bytes, name: str | None = None) -> DlibNetwork:
    """Parse a serialized ``add_loss_layer`` network (e.g. dlib's face-recognition ResNet).

    ``source`` is a path or the file's bytes. Raises :class:`ValueError` (one line) if the file is
    truncated, corrupt or uses records this reader does not know.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read dlib model file {path}: {e.strerror or e}") from None
        name = name or str(path)
    r = DlibReader(data, name)
    if not data:
        raise r.error("file is empty")

    r.expect_version(1, "add_loss_layer")
    loss = r.read_loss_layer()

    # Version prefix: one int per wrapper, outermost first, until the add_layer over the input.
    top_down: list[str] = []
    input_version = None
    while True:
        if len(top_down) > 100_000:
            raise r.error("network nesting is implausibly deep")
        v = r.read_int("layer version")
        nxt = r.peek_str()
        if v in (2, 3) and nxt is not None and nxt.startswith("input"):
            input_version = v
            top_down.append("layer")
            break
        if v == 2:
            top_down.append("layer")
        elif v == 1:
            top_down.append("tag_or_skip")
        else:
            raise r.error(f"unexpected layer version {v}")

    inp = r.read_input_layer()
    n_layers = top_down.count("layer")
    layers: list[DlibLayer] = []
    for i in range(n_layers):
        layers.append(r.read_layer_details())
        _read_add_layer_trailer(r, input_version if i == 0 else None)
    if r.remaining:
        raise r.error(f"{r.remaining} unexpected trailing bytes")
    return DlibNetwork(loss=loss, input=inp, layers=layers, tokens=list(reversed(top_down)))

"""The catalogue of bad inputs (issue 18): files, faces, checkpoints, values and outputs across the commands.

Each bad input must end with exit code 2, exactly one ``error: ...`` line on stderr and no traceback; loading a
checkpoint never runs code from it (a tripwire file must not appear). Odd but valid photos (an animated GIF,
16-bit grey, CMYK, EXIF-rotated, a path with spaces and non-ASCII letters) must work.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_dataset, run_cli, shared_path
from tests.reliability.fuzz_targets import Tripwire

pytestmark = pytest.mark.usefixtures("one_thread")

FACE = "data/portraits/deepface/img1.jpg"
OTHER = "data/portraits/deepface/img2.jpg"


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of bad files (names as in the catalogue)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import portrait3d
    from portrait3d.checkpoints.load import BUILTIN_NETWORKS

    d = tmp_path_factory.mktemp("bad")
    face = shared_path(FACE).read_bytes()
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello, not an image\n")
    (d / "truncated.jpg").write_bytes(face[: len(face) // 3])
    Image.new("RGB", (1, 1)).save(d / "one.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(d / "noise.png")
    (d / "bomb.png").write_bytes(_png_header(60000, 60000))
    (d / "folder").mkdir()
    (d / "afile").write_text("x")
    (d / "garbage.safetensors").write_bytes(rng.integers(0, 255, 1000, dtype=np.uint8).tobytes())
    src = Path(portrait3d.__file__).parent / BUILTIN_NETWORKS["default-2d"]
    raw = src.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def variant(name: str, **change) -> None:
        m = dict(meta)
        m.update({k: v for k, v in change.items() if k != "config"})
        if "config" in change:
            c = json.loads(m["config"])
            c.update(change["config"])
            m["config"] = json.dumps(c)
        save_file(tensors, str(d / name), metadata=m)

    variant("neg_zdim.safetensors", config={"z_dim": -5})
    variant("huge_res.safetensors", config={"img_resolution": 1 << 20})
    variant("str_wdim.safetensors", config={"w_dim": "abc"})
    variant("bad_arch.safetensors", architecture="os.system")
    m = dict(meta)
    m["config"] = "{not json"
    save_file(tensors, str(d / "bad_json.safetensors"), metadata=m)
    fewer = dict(tensors)
    fewer.pop(next(iter(fewer)))
    save_file(fewer, str(d / "missing_tensor.safetensors"), metadata=meta)
    (d / "evil.pkl").write_bytes(pickle.dumps({"G_ema": Tripwire(str(d / "TRIPWIRE"))}))
    (d / "truncated.pkl").write_bytes(pickle.dumps({"a": 1})[:5])
    buf = io.BytesIO()
    np.save(buf, np.zeros((0,), np.float32))
    (d / "empty.npy").write_bytes(buf.getvalue())
    make_dataset(d / "faces", 8, 32)
    (d / "run" / "snapshot-00000004").mkdir(parents=True)
    (d / "run" / "log.jsonl").write_text("{}\n")
    return d


F, O = "@face", "@other"  # replaced by the shared photos
CATALOGUE = [
    # files
    ("align", "missing.jpg", "--out", "@out"), "no such photo",
    ("align", "@bad/empty.jpg", "--out", "@out"), "not an image file",
    ("align", "@bad/text.jpg", "--out", "@out"), "not an image file",
    ("align", "@bad/truncated.jpg", "--out", "@out"), "corrupt or truncated",
    ("align", "@bad/one.png", "--out", "@out"), "image too small",
    ("align", "@bad/tiny.png", "--out", "@out"), "image too small",
    ("align", "@bad/bomb.png", "--out", "@out"), "image too large",
    ("identity", "@bad/folder/../missing.jpg", F), "no such file",
    ("identity", F, "@bad/folder"), "is a folder",
    ("invert3d", "@bad/text.jpg", "--out", "@out"), "not an image file",
    ("pie", "@bad/truncated.jpg", "--out", "@out"), "corrupt or truncated",
    ("encode3d", "@bad/one.png", "--out", "@out", "--encoder", "@bad/garbage.safetensors"), "image too small",
    # faces
    ("align", "@bad/noise.png", "--out", "@out"), "no face found",
    ("identity", "@bad/noise.png", F), "no face",
    ("align", F, "--out", "@out", "--face-index", "3"), "face index 3 is out of range",
    # checkpoints
    ("info", "@bad/garbage.safetensors"), "not a checkpoint portrait3d can read",
    ("info", "@bad/truncated.safetensors"), "corrupt safetensors file",
    ("info", "@bad/neg_zdim.safetensors"), "z_dim must be an integer from 0 to",
    ("info", "@bad/huge_res.safetensors"), "img_resolution must be a power of two",
    ("info", "@bad/str_wdim.safetensors"), "w_dim must be an integer from 1 to",
    ("info", "@bad/bad_json.safetensors"), "unreadable config",
    ("info", "@bad/bad_arch.safetensors"), "unknown architecture",
    ("info", "@bad/missing_tensor.safetensors"), "do not match its architecture",
    ("info", "@bad/evil.pkl"), "not on portrait3d's allow-list",
    ("info", "@bad/truncated.pkl"), "not a readable pickle",
    ("info", "@bad/folder"), "is a directory",
    ("info", "@bad/nothing.pkl"), "no such checkpoint",
    ("demo", "--network-2d", "@bad/neg_zdim.safetensors", "--out", "@out"), "z_dim must be an integer from 0 to",
    ("pie", F, "--out", "@out", "--models", "@bad/folder"), "no PIE estimator",
    # values
    ("render", "@bad/folder", "--yaw", "nan"), "not a finite number",
    ("render", "@bad/folder", "--yaw", "inf"), "not in the range",
    ("render", "@bad/folder", "--yaw", "1e9"), "not in the range",
    ("invert3d", F, "--out", "@out", "--steps", "-1"), "not in the range",
    ("invert3d", F, "--out", "@out", "--orbit-frames", "0"), "not in the range",
    ("demo", "--truncation", "2", "--out", "@out"), "not in the range",
    ("align", F, "--out", "@out", "--workers", "0"), "not in the range",
    ("align", F, "--out", "@out", "--threads", "0"), "not in the range",
    ("edit", "1", "--yaw", "5", "--lambda-id", "nan", "--out", "@out"), "not a finite number",
    ("pie", F, "--out", "@out", "--yaw", "90"), "-60..60",
    ("pie", F, "--out", "@out", "--expr", "smile"), "NAME=VALUE",
    ("pie", F, "--out", "@out", "--light", "0,0,0"), "non-zero direction",
    ("pie", F, "--out", "@out", "--light", "up"), "direction x,y,z",
    ("demo", "--device", "banana", "--out", "@out"), "--device must be",
    ("web", "--port", "0"), "not in the range",
    ("train", "wtri", "--data", "@bad/folder", "--out", "@out", "--kimg", "-1"), "not in the range",
    ("train", "wtri", "--data", "@bad/faces", "--out", "@out", "--bootstrap", "no-such-encoder"), "start encoder",
    # resources
    ("train", "stylegan2", "--data", "@bad/faces", "--out", "@out", "--config", "tiny", "--batch", str(2**28)),
    "needs about",
    ("dataset", "build", "@bad/folder", "@out", "--resolution", "100000"), "not in the range",
    # outputs
    ("align", F, "--out", "@bad/afile/sub"), "not a directory",
    ("demo", "--out", "@bad/afile"), "is a file",
    ("dataset", "build", "@bad/folder", "@bad/faces"), "already exists (pass --force",
    ("train", "wtri", "--data", "@bad/faces", "--out", "@bad/run"), "already exists: pass --resume",
    ("pie", "edit", "@bad/folder", "--yaw", "3"), "holds no PIE embedding",
    ("encode3d", F, "--out", "@out", "--network", "default-2d"), "no W_tri encoder ships",
    ("encode3d", F, "--out", "@out", "--encoder", "@bad/garbage.safetensors", "--pti"), "needs --refine",
]
CASES = list(zip(CATALOGUE[0::2], CATALOGUE[1::2]))


def _args(args: tuple[str, ...], bad: Path, out: Path) -> list[str]:
    subst = {F: str(shared_path(FACE)), O: str(shared_path(OTHER)), "@out": str(out)}
    return [subst.get(a, a.replace("@bad", str(bad))) for a in args]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40
    assert {a[0] for a, _ in CASES} >= {"align", "identity", "invert3d", "encode3d", "pie", "info", "demo", "render",
                                       "edit", "web", "train", "dataset"}


@pytest.mark.parametrize("args, message", CASES, ids=[f"{i:02d}-{a[0]}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_gives_one_error_line_and_exit_2(bad, tmp_path, args, message):
    res = run_cli(*_args(args, bad, tmp_path / "out"))
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith(("W0000", "I0000"))]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert res.exit_code == 2, res.output
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output
    assert not (bad / "TRIPWIRE").exists()  # no checkpoint code ran
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


@pytest.mark.parametrize("make", ["animated_gif", "grey16_png", "cmyk_jpg", "exif_rotated_jpg", "unicode_path"])
def test_odd_but_valid_photos_work(tmp_path, make):
    im = Image.open(shared_path(FACE)).convert("RGB")
    folder = tmp_path / ("dir with spaces ü" if make == "unicode_path" else "in")
    folder.mkdir()
    if make == "animated_gif":
        path = folder / "a.gif"
        im.save(path, save_all=True, append_images=[im.transpose(Image.FLIP_LEFT_RIGHT)], duration=100)
    elif make == "grey16_png":
        path = folder / "g.png"
        Image.fromarray((np.asarray(im)[..., 0].astype(np.uint16) * 257)).save(path)
    elif make == "cmyk_jpg":
        path = folder / "c.jpg"
        im.convert("CMYK").save(path)
    elif make == "exif_rotated_jpg":
        path = folder / "r.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored turned
        im.transpose(Image.ROTATE_90).save(path, exif=exif)
    else:
        path = folder / "fäce 1.jpg"
        shutil.copy(shared_path(FACE), path)
    res = run_cli("align", path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "portrait3d.interfaces.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_closed_stdout_is_an_error_not_a_silent_success():
    """With its standard output closed, ``identity`` could print its answer nowhere: exit 2, not 0."""
    cmd = " ".join(f"'{c}'" for c in _command("identity", str(shared_path(FACE)), str(shared_path(OTHER))))
    res = subprocess.run(cmd + " >&-", shell=True, env=ENV, stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 2 and "standard output is closed" in res.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_full_disk_on_stdout_is_one_error_line():
    with open("/dev/full", "w") as full:
        res = subprocess.run(_command("identity", str(shared_path(FACE)), str(shared_path(OTHER))), env=ENV,
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 2 and "error: " in res.stderr and "Traceback" not in res.stderr

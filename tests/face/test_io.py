"""portrait3d.face.io: robust image loading and atomic saving."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from portrait3d.face.errors import FaceError, ImageReadError, ImageSizeError
from portrait3d.face.io import load_image, save_image


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height, with a tiny (bogus) IDAT: costs ~60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="folder"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a JPEG\n" * 10)
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(p)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError):
        load_image(empty)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.98])
def test_truncated_jpeg_is_refused(tmp_path: Path, keep: float, progressive: bool) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(120, 160)).save(buf, "JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(p)


def test_truncated_jpeg_refused_even_if_pillow_told_to_accept(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(120, 160)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[:-200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError):
        load_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_too_small(tmp_path: Path) -> None:
    p = tmp_path / "tiny.png"
    Image.fromarray(_noise(16, 16)).save(p)
    with pytest.raises(ImageSizeError, match="too small"):
        load_image(p)
    p2 = tmp_path / "thin.png"
    Image.fromarray(_noise(20, 400)).save(p2)
    with pytest.raises(ImageSizeError):
        load_image(p2)
    assert load_image(p2, min_side=16).shape == (20, 400, 3)


def test_huge_header_refused_without_decoding(tmp_path: Path) -> None:
    # The file holds a header and no pixel data, so a decode attempt would fail differently: the
    # "too large" error shows the size check ran on the header alone.
    p = tmp_path / "huge.png"
    _png_header_only(p, 12000, 12000)
    assert p.stat().st_size < 200
    with pytest.raises(ImageSizeError, match="too large"):
        load_image(p)
    # Under Pillow's own bomb limit but over ours (64 MP): our check, with the size in the message.
    p2 = tmp_path / "big.png"
    _png_header_only(p2, 9000, 8000)
    with pytest.raises(ImageSizeError, match="9000x8000"):
        load_image(p2)


def test_decompression_bomb_warning_becomes_our_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(_noise(100, 100)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: warning zone (1x..2x)
    with pytest.raises(ImageSizeError):
        load_image(p)


def test_max_pixels_option(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(_noise(100, 100)).save(p)
    with pytest.raises(ImageSizeError):
        load_image(p, max_pixels=5000)


def test_grayscale_and_palette(tmp_path: Path) -> None:
    grey = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    p = tmp_path / "g.png"
    Image.fromarray(grey, "L").save(p)
    out = load_image(p)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    pal = tmp_path / "p.gif"
    Image.fromarray(_noise(64, 64)).convert("P").save(pal)
    assert load_image(pal).shape == (64, 64, 3)
    # 1-bit
    b = tmp_path / "b.png"
    Image.fromarray(grey > 128).save(b)
    assert set(np.unique(load_image(b))) <= {0, 255}


def test_rgba_la_and_transparent_palette_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 0      # transparent -> white
    rgba[:, 10:20, 3] = 255  # opaque -> (200, 0, 0)
    rgba[:, 20:, 3] = 128    # half
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = load_image(p)
    assert np.all(out[:, :10] == 255)
    assert np.all(out[:, 10:20] == [200, 0, 0])
    half = 128 / 255
    assert np.allclose(out[:, 25], [200 * half + 255 * (1 - half), 255 * (1 - half), 255 * (1 - half)], atol=1)

    la = np.zeros((40, 40, 2), np.uint8)
    la[..., 0] = 50
    la[:, :20, 1] = 0
    la[:, 20:, 1] = 255
    p2 = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p2)
    out2 = load_image(p2)
    assert np.all(out2[:, :20] == 255) and np.all(out2[:, 20:] == 50)

    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.paste(1, (20, 0, 40, 40))
    p3 = tmp_path / "t.png"
    pal.save(p3, transparency=0)
    out3 = load_image(p3)
    assert np.all(out3[:, :20] == 255) and np.all(out3[:, 20:] == [40, 50, 60])


def test_16_bit(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(ramp).save(p)
    out = load_image(p)
    assert out.shape == (48, 48, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.allclose(out[..., 0], ramp / 257.0, atol=1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (48, 48), (0, 255, 255, 0))  # pure red in CMYK
    p = tmp_path / "c.jpg"
    cmyk.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.shape == (48, 48, 3)
    r, g, b = out[24, 24].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = np.full((40, 60, 3), 255, np.uint8)  # H=40, W=60 as stored
    stored[:10, :10] = [255, 0, 0]  # red marker at the stored top-left
    im = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    im.save(p, quality=95, exif=exif)
    out = load_image(p)
    assert out.shape == (60, 40, 3)  # displayed: W=40, H=60
    # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
    assert out[:8, -8:, 0].mean() > 200 and out[:8, -8:, 1].mean() < 80
    assert out[:8, :8].mean() > 240


def test_errors_are_one_line_face_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(FaceError) as info:
        load_image(p)
    assert "\n" not in str(info.value)


def test_save_image_roundtrip_and_overwrite(tmp_path: Path) -> None:
    a = _noise(40, 50)
    p = save_image(tmp_path / "sub" / "a.png", a)
    loaded = load_image(p)
    assert np.array_equal(loaded, a) and loaded.flags.writeable
    with pytest.raises(FileExistsError):
        save_image(p, a)
    save_image(p, a[::-1].copy(), overwrite=True)
    assert np.array_equal(load_image(p), a[::-1])
    j = save_image(tmp_path / "a.jpg", a, quality=90)
    assert load_image(j).shape == a.shape
    assert not list(tmp_path.glob("**/*.tmp"))
    with pytest.raises(ValueError):
        save_image(tmp_path / "a.unknownext", a)
    with pytest.raises(ValueError):
        save_image(tmp_path / "f.png", a.astype(np.float32))

"""``portrait3d convert``: success, and a one-line error with exit code 2 for every bad input."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch
from tests.conftest import assert_clean_failure, parity_file, run_cli

from portrait3d import load_network, save_network


def test_convert_pickle_then_refuse_to_clobber(tmp_path):
    src = parity_file("stylegan2_64.pkl")
    dst = tmp_path / "g.safetensors"
    result = run_cli("convert", str(src), str(dst))
    assert result.exit_code == 0, result.output
    assert load_network(dst).num_ws == 10
    before = dst.read_bytes()
    assert_clean_failure(run_cli("convert", str(src), str(dst)))
    assert dst.read_bytes() == before
    assert run_cli("convert", str(src), str(dst), "--force").exit_code == 0


def _bad_files(tmp_path, tiny_stylegan2):
    good = parity_file("stylegan2_64.pkl").read_bytes()
    files = {
        "empty.pkl": b"",
        "truncated.pkl": good[: len(good) // 2],
        "corrupt.pkl": good[:1000] + bytes(range(256)) * 4 + good[2024:],
        "text.pkl": b"this is not a network\n" * 10,
        "image.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        "list.pkl": pickle.dumps([1, 2, 3], protocol=3),
        "no_gema.pkl": pickle.dumps({"G": None, "D": None}, protocol=3),
        "zip_not_torch.pt": _zip_bytes(),
        "torch_not_generator.pt": _torch_bytes({"weights": torch.zeros(3)}),
    }
    # Wrong architecture: a portrait3d file whose weights do not fit its config.
    path = save_network(tiny_stylegan2, tmp_path / "ok.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["synthesis.b4.const"] = torch.zeros(3, 4, 4)
    save_file(state, str(tmp_path / "wrong_arch.safetensors"), metadata=meta)
    files["wrong_arch.safetensors"] = (tmp_path / "wrong_arch.safetensors").read_bytes()
    files["corrupt.safetensors"] = path.read_bytes()[:200]
    return files


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "hi")
    return buf.getvalue()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


BAD = ["empty.pkl", "truncated.pkl", "corrupt.pkl", "text.pkl", "image.png", "list.pkl", "no_gema.pkl",
       "zip_not_torch.pt", "torch_not_generator.pt", "wrong_arch.safetensors", "corrupt.safetensors"]


@pytest.mark.parametrize("name", BAD)
def test_bad_checkpoints_fail_cleanly(tmp_path, tiny_stylegan2, name):
    data = _bad_files(tmp_path, tiny_stylegan2)[name]
    src = tmp_path / name
    src.write_bytes(data)
    dst = tmp_path / "out.safetensors"
    assert_clean_failure(run_cli("convert", str(src), str(dst)))
    assert not dst.exists()


def test_missing_and_directory_inputs(tmp_path):
    assert_clean_failure(run_cli("convert", str(tmp_path / "nope.pkl"), str(tmp_path / "o.safetensors")))
    assert_clean_failure(run_cli("convert", str(tmp_path), str(tmp_path / "o.safetensors")))

"""Our safetensors format: round trips, conversion of NVIDIA pickles, atomic no-clobber writes."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import parity_file

from portrait3d import CheckpointError, load_network, save_network


def test_stylegan2_round_trip(tiny_stylegan2, tmp_path):
    path = save_network(tiny_stylegan2, tmp_path / "g.safetensors")
    G = load_network(path)
    z = torch.randn(2, 32)
    for psi in (1.0, 0.5):
        a = tiny_stylegan2(z, None, truncation_psi=psi, noise_mode="const")
        b = G(z, None, truncation_psi=psi, noise_mode="const")
        assert torch.equal(a, b)
    assert G.config == tiny_stylegan2.config


def test_eg3d_round_trip(tiny_eg3d, tmp_path):
    path = save_network(tiny_eg3d, tmp_path / "g3.safetensors")
    G = load_network(path)
    z = torch.randn(1, 32)
    from portrait3d import camera_from_angles

    c = camera_from_angles([10.0], [5.0])
    a = tiny_eg3d(z, c, noise_mode="const", deterministic=True)
    b = G(z, c, noise_mode="const", deterministic=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_no_clobber_unless_asked(tiny_stylegan2, tmp_path):
    path = save_network(tiny_stylegan2, tmp_path / "g.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_network(tiny_stylegan2, path)
    assert path.read_bytes() == before
    save_network(tiny_stylegan2, path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["stylegan2_64.pkl", "eg3d_128.pkl"])
def test_convert_nvidia_pickle_identical_outputs(name, tmp_path):
    src = parity_file(name)
    G0 = load_network(src)
    G1 = load_network(save_network(G0, tmp_path / "net.safetensors"))
    torch.manual_seed(0)
    z = torch.randn(1, G0.z_dim)
    if name.startswith("eg3d"):
        from portrait3d import camera_from_angles

        c = camera_from_angles([20.0], [-5.0])
        a, b = (G(z, c, noise_mode="const", deterministic=True) for G in (G0, G1))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(G0.renderer.plane_axes, G1.renderer.plane_axes)
    else:
        c = torch.zeros(1, 0)
        assert torch.equal(G0(z, c, noise_mode="const"), G1(z, c, noise_mode="const"))


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a portrait3d network"):
        load_network(path)


def test_half_precision_storage(tiny_stylegan2, tmp_path):
    full = save_network(tiny_stylegan2, tmp_path / "g32.safetensors")
    half = save_network(tiny_stylegan2, tmp_path / "g16.safetensors", storage_dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    G = load_network(half)
    assert all(p.dtype == torch.float32 for p in G.parameters())
    z = torch.randn(2, G.z_dim)
    a = tiny_stylegan2.eval()(z, None, noise_mode="const")
    b = G(z, None, noise_mode="const")
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


@pytest.mark.parametrize("net, key, value", [
    ("tiny_stylegan2", "z_dim", -4),
    ("tiny_stylegan2", "img_resolution", 100),
    ("tiny_eg3d", "plane_channels", 0),
    ("tiny_eg3d", "w_dim", "512"),
])
def test_a_tampered_config_is_a_checkpoint_error_not_a_crash(net, key, value, tmp_path, request):
    """A config that parses but describes no network (a negative width, a resolution that is not a power of
    two, a string) fails with one CheckpointError line before any tensor is built."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_network(request.getfixturevalue(net), tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config[key] = value
    meta["config"] = json.dumps(config)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=key):
        load_network(bad)


def test_written_checkpoints_get_ordinary_permissions(tmp_path, tiny_stylegan2):
    """safetensors writes its files 0600; ours are published with the umask's ordinary permissions (0644)."""
    import os
    import stat

    from portrait3d.checkpoints.native import save_network

    old = os.umask(0o022)
    try:
        path = save_network(tiny_stylegan2, tmp_path / "g.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

"""W_tri encoder: shapes, the average code at start, one refinement step changes each part, the W+ baseline keeps
planes tied, gradients, files."""

from __future__ import annotations

import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig
from portrait3d.networks.eg3d.camera import camera_from_angles
from tests.conftest import make_tiny_eg3d

TINY = dict(width=8, layers=(1, 1, 1, 1), head_channels=32, fpn_channels=16, input_size=64, iterations=2)


def _setup(space: str = "wtri"):
    G = make_tiny_eg3d().eval().requires_grad_(False)
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, space=space, **TINY))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = camera_from_angles([0.0, 10.0], [0.0, 0.0]).reshape(2, 25)
    return G, enc, x, c


def test_untrained_encoder_returns_the_average_code():
    G, enc, x, c = _setup()
    codes, images = enc.invert(G, x, c)
    assert len(codes) == 2 and images[-1].shape == (2, 3, 128, 128)
    avg = G.wtri_from_ws(G.backbone.mapping.w_avg[None, None].expand(2, G.num_ws, -1))
    torch.testing.assert_close(codes[-1].shared, avg.shared)
    torch.testing.assert_close(codes[-1].sr, avg.sr)


@pytest.mark.parametrize("space", ["wtri", "wplus"])
def test_a_step_moves_the_code_and_gradients_flow(space):
    G, enc, x, c = _setup(space)
    with torch.no_grad():
        enc.mlp[-1].weight.normal_(0, 0.01)
        if space == "wtri":
            enc.sr_head.weight.normal_(0, 0.01)
    codes, images = enc.invert(G, x, c)
    code = codes[-1]
    if space == "wtri":
        assert not torch.allclose(code.planes[:, 0], code.planes[:, 1])  # per-plane codes
    else:
        assert torch.equal(code.planes[:, 0], code.planes[:, 1])          # W+: one code for every plane
        assert torch.equal(code.sr, code.planes[:, 0, 2])                 # and the SR reads the last row
    images[-1].square().mean().backward()
    assert enc.backbone.conv1.weight.grad is not None and enc.backbone.conv1.weight.grad.abs().sum() > 0


def test_config_checks_and_files(tmp_path):
    with pytest.raises(ValueError):
        WTriEncoder(WTriEncoderConfig(space="z"))
    G, enc, x, c = _setup()
    with torch.no_grad():
        enc.mlp[-1].weight.normal_(0, 0.01)
    back = WTriEncoder.load(enc.save(tmp_path / "e.safetensors"))
    y = G.synthesis_wtri(G.wtri_from_ws(G.mapping(torch.randn(2, G.z_dim), c)), c, noise_mode="const")["image"]
    a, b = enc.eval().step(x, y, G.wtri_from_ws(G.mapping(torch.zeros(2, G.z_dim), c))), \
        back.step(x, y, G.wtri_from_ws(G.mapping(torch.zeros(2, G.z_dim), c)))
    torch.testing.assert_close(a.planes, b.planes)
    with pytest.raises(UsageError):
        WTriEncoder.load(tmp_path / "nothing.safetensors")


def test_losses_finite_and_falling_on_a_tiny_generator():
    from portrait3d.methods.wtri.losses import WTriLossConfig, code_distance, wtri_losses

    G, enc, _, c = _setup()
    with torch.no_grad():  # photos the generator can make: the encoder has a code to find
        x = G.synthesis(G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(5)), c) * 1.0, c,
                        noise_mode="const")["image"]
    novel = camera_from_angles([25.0, -25.0], [0.0, 0.0]).reshape(2, 25)
    w = WTriLossConfig(perceptual=0.0, identity=0.0, similarity=0.0)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    enc.train()
    first = None
    for _ in range(6):
        terms = wtri_losses(enc, G, x, c, novel, w)
        assert all(torch.isfinite(v) for v in terms.values())
        first = first if first is not None else float(terms["rec"].detach())
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert float(terms["rec"].detach()) < first
    code = G.wtri_from_ws(G.mapping(torch.zeros(2, G.z_dim), c))
    assert code_distance(code, code).abs().max() == 0


def test_bootstrapped_encoder_starts_at_the_start_encoders_code():
    """ReStyle's bootstrapping: an untrained (zero-head) encoder returns the start encoder's code exactly, every
    iteration; a config naming a start encoder that was not attached is refused, not silently run from w_avg."""
    G = make_tiny_eg3d().eval().requires_grad_(False)
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, bootstrap="E.safetensors", **TINY))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = camera_from_angles([0.0, 10.0], [0.0, 0.0]).reshape(2, 25)
    with pytest.raises(RuntimeError, match="set_start"):
        enc.invert(G, x, c)
    ws = G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(1)), c)
    seen = []

    def start(images: torch.Tensor) -> torch.Tensor:
        seen.append(images)
        return ws

    enc.set_start(start)
    codes, _ = enc.invert(G, x, c)
    want = G.wtri_from_ws(ws)
    assert seen[0] is x
    for code in codes:
        torch.testing.assert_close(code.shared, want.shared)
        torch.testing.assert_close(code.planes, want.planes)
        torch.testing.assert_close(code.sr, want.sr)
    assert "_start" not in dict(enc.named_modules()) and not any("start" in k for k in enc.state_dict())


def test_codes_only_inversion_gives_the_same_codes_without_a_graph_through_the_feedback_renders():
    """``keep_images=False`` (the cycle's re-encoding): same codes, no images, and the renders the encoder reads
    carry no autograd graph, while a code still reaches the encoder's weights."""
    G, enc, x, c = _setup()
    with torch.no_grad():
        enc.mlp[-1].weight.normal_(0, 0.01)
    enc.train()
    codes, images = enc.invert(G, x, c, deterministic=True)  # mid-bin ray samples: the renders repeat
    light, none = enc.invert(G, x, c, keep_images=False, deterministic=True)
    assert none == [] and len(light) == len(codes)
    for a, b in zip(codes, light):
        torch.testing.assert_close(a.planes, b.planes)
        torch.testing.assert_close(a.sr, b.sr)
    light[-1].planes.square().mean().backward()
    assert enc.mlp[-1].weight.grad is not None and enc.mlp[-1].weight.grad.abs().sum() > 0

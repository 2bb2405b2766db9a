"""rosinality StyleGAN2 checkpoints: numerical equivalence with an independent reference forward pass,
round trips through a saved ``.pt``, safe reading and clear errors."""

from __future__ import annotations

import argparse
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from portrait3d.checkpoints.rosinality import (
    W_AVG_SAMPLES,
    W_AVG_SEED,
    generator_from_rosinality,
    generator_from_rosinality_file_object,
    is_rosinality_state,
    read_rosinality_file,
    rosinality_state_from_generator,
)
from portrait3d.checkpoints.safe_pickle import CheckpointError, UnsafeCheckpointError
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

SIZE = 32
STYLE_DIM = 32
N_MLP = 2
LR_MLP = 0.01
CHANNELS = {4: 32, 8: 32, 16: 16, 32: 8}  # = min(256 // res, 32)


# ---------------------------------------------------------------------------------------------
# Independent reference: rosinality's model.py forward pass (fused modconv path, CPU ops), pure torch.
# ---------------------------------------------------------------------------------------------

def ref_make_kernel(k):
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def ref_upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """rosinality's ``upfirdn2d_native`` (same pad on x and y), on NCHW tensors."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    out = x.reshape(n * c, h, 1, w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(n * c, 1, h * up, w * up)
    out = F.pad(out, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, :, max(-p0, 0): out.shape[2] - max(-p1, 0), max(-p0, 0): out.shape[3] - max(-p1, 0)]
    out = F.conv2d(out, torch.flip(kernel, [0, 1]).view(1, 1, kh, kw))
    out = out.reshape(n, c, out.shape[2], out.shape[3])
    return out[:, :, ::down, ::down]


def ref_equal_linear(x, weight, bias, lr_mul=1.0, fused_lrelu=False):
    scale = (1 / math.sqrt(weight.shape[1])) * lr_mul
    if fused_lrelu:
        out = F.linear(x, weight * scale)
        return F.leaky_relu(out + (bias * lr_mul).view(1, -1), negative_slope=0.2) * 2 ** 0.5
    return F.linear(x, weight * scale, bias=bias * lr_mul)


def ref_modulated_conv(state, p, x, style, demodulate=True, upsample=False):
    weight_p = state[f"{p}.weight"]
    _, out_ch, in_ch, k, _ = weight_p.shape
    batch, _, h, w = x.shape
    scale = 1 / math.sqrt(in_ch * k ** 2)
    s = ref_equal_linear(style, state[f"{p}.modulation.weight"], state[f"{p}.modulation.bias"])
    weight = scale * weight_p * s.view(batch, 1, in_ch, 1, 1)
    if demodulate:
        demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * demod.view(batch, out_ch, 1, 1, 1)
    if upsample:
        weight = weight.transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        out = F.conv_transpose2d(x.reshape(1, batch * in_ch, h, w), weight, padding=0, stride=2, groups=batch)
        out = out.view(batch, out_ch, out.shape[2], out.shape[3])
        blur_len = state[f"{p}.blur.kernel"].shape[0]
        pp = (blur_len - 2) - (k - 1)
        return ref_upfirdn2d(out, state[f"{p}.blur.kernel"], pad=((pp + 1) // 2 + 1, pp // 2 + 1))
    weight = weight.view(batch * out_ch, in_ch, k, k)
    out = F.conv2d(x.reshape(1, batch * in_ch, h, w), weight, padding=k // 2, groups=batch)
    return out.view(batch, out_ch, h, w)


def ref_styled_conv(state, p, x, style, noise, upsample=False):
    out = ref_modulated_conv(state, f"{p}.conv", x, style, upsample=upsample)
    out = out + state[f"{p}.noise.weight"] * noise
    return F.leaky_relu(out + state[f"{p}.activate.bias"].view(1, -1, 1, 1), negative_slope=0.2) * 2 ** 0.5


def ref_to_rgb(state, p, x, style, skip=None):
    out = ref_modulated_conv(state, f"{p}.conv", x, style, demodulate=False) + state[f"{p}.bias"]
    if skip is not None:
        kernel = state[f"{p}.upsample.kernel"]
        pp = kernel.shape[0] - 2
        out = out + ref_upfirdn2d(skip, kernel, up=2, pad=((pp + 1) // 2 + 1, pp // 2))
    return out


def ref_mapping(state, z, n_mlp=N_MLP, lr_mlp=LR_MLP):
    x = z * torch.rsqrt(torch.mean(z ** 2, dim=1, keepdim=True) + 1e-8)
    for i in range(1, n_mlp + 1):
        x = ref_equal_linear(x, state[f"style.{i}.weight"], state[f"style.{i}.bias"], lr_mul=lr_mlp, fused_lrelu=True)
    return x


def ref_generator(state, z, truncation=1.0, truncation_latent=None, n_mlp=N_MLP, lr_mlp=LR_MLP):
    """rosinality ``Generator.forward([z], truncation=..., truncation_latent=..., randomize_noise=False)``."""
    w = ref_mapping(state, z, n_mlp, lr_mlp)
    if truncation < 1:
        w = truncation_latent + truncation * (w - truncation_latent)
    n_rgbs = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
    log_size = n_rgbs + 2
    num_layers = (log_size - 2) * 2 + 1
    latent = w.unsqueeze(1).repeat(1, log_size * 2 - 2, 1)
    noise = [state[f"noises.noise_{i}"] for i in range(num_layers)]
    out = state["input.input"].repeat(z.shape[0], 1, 1, 1)
    out = ref_styled_conv(state, "conv1", out, latent[:, 0], noise[0])
    skip = ref_to_rgb(state, "to_rgb1", out, latent[:, 1])
    i = 1
    for k in range(n_rgbs):
        out = ref_styled_conv(state, f"convs.{2 * k}", out, latent[:, i], noise[2 * k + 1], upsample=True)
        out = ref_styled_conv(state, f"convs.{2 * k + 1}", out, latent[:, i + 1], noise[2 * k + 2])
        skip = ref_to_rgb(state, f"to_rgbs.{k}", out, latent[:, i + 2], skip)
        i += 2
    return skip


def make_ros_state(size=SIZE, style_dim=STYLE_DIM, n_mlp=N_MLP, channels=CHANNELS, lr_mlp=LR_MLP, seed=0):
    """A random state dict with exactly the keys/shapes of rosinality's ``Generator.state_dict()``."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    st: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        st[f"style.{i}.weight"] = rn(style_dim, style_dim) / lr_mlp
        st[f"style.{i}.bias"] = rn(style_dim, std=10.0)  # effective bias = 0.1 * N(0, 1)
    st["input.input"] = rn(1, channels[4], 4, 4)
    blur = ref_make_kernel([1, 3, 3, 1]) * 4

    def styled(p, cin, cout, up):
        st[f"{p}.conv.weight"] = rn(1, cout, cin, 3, 3)
        if up:
            st[f"{p}.conv.blur.kernel"] = blur.clone()
        st[f"{p}.conv.modulation.weight"] = rn(cin, style_dim)
        st[f"{p}.conv.modulation.bias"] = rn(cin, std=0.2, mean=1.0)
        st[f"{p}.noise.weight"] = rn(1, std=0.3)
        st[f"{p}.activate.bias"] = rn(cout, std=0.2)

    def rgb(p, cin, up):
        st[f"{p}.bias"] = rn(1, 3, 1, 1, std=0.2)
        if up:
            st[f"{p}.upsample.kernel"] = blur.clone()
        st[f"{p}.conv.weight"] = rn(1, 3, cin, 1, 1)
        st[f"{p}.conv.modulation.weight"] = rn(cin, style_dim)
        st[f"{p}.conv.modulation.bias"] = rn(cin, std=0.2, mean=1.0)

    styled("conv1", channels[4], channels[4], False)
    rgb("to_rgb1", channels[4], False)
    log_size = int(math.log2(size))
    cin = channels[4]
    for k, i in enumerate(range(3, log_size + 1)):
        cout = channels[2 ** i]
        styled(f"convs.{2 * k}", cin, cout, True)
        styled(f"convs.{2 * k + 1}", cout, cout, False)
        cin = cout
    cin = channels[4]
    for k, i in enumerate(range(3, log_size + 1)):
        rgb(f"to_rgbs.{k}", channels[2 ** i], True)
    for layer_idx in range((log_size - 2) * 2 + 1):
        res = (layer_idx + 5) // 2
        st[f"noises.noise_{layer_idx}"] = rn(1, 1, 2 ** res, 2 ** res)
    return st


def make_ours(seed=1, lr_multiplier=0.01):
    torch.manual_seed(seed)
    cfg = StyleGAN2Config(
        z_dim=STYLE_DIM, c_dim=0, w_dim=STYLE_DIM, img_resolution=SIZE, img_channels=3,
        mapping=MappingConfig(num_layers=N_MLP, lr_multiplier=lr_multiplier),
        synthesis=SynthesisConfig(channel_base=256, channel_max=32, num_fp16_res=0, conv_clamp=None),
    )
    G = Generator(cfg)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength") or (name.endswith("bias") and "affine" not in name):
                p.copy_(torch.randn_like(p) * 0.2)
        G.mapping.w_avg.copy_(torch.randn(STYLE_DIM) * 0.3)
    return G.eval()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [1.0, 0.7])
@pytest.mark.parametrize("fused_modconv", [True, False])
def test_matches_reference_forward(psi, fused_modconv):
    state = make_ros_state()
    latent_avg = ref_mapping(state, torch.randn(256, STYLE_DIM, generator=torch.Generator().manual_seed(5))).mean(0)
    G = generator_from_rosinality(state, latent_avg=latent_avg)
    assert G.img_resolution == SIZE and G.mapping.num_layers == N_MLP and G.w_dim == STYLE_DIM
    assert {res: getattr(G.synthesis, f"b{res}").conv1.out_channels for res in CHANNELS} == CHANNELS
    z = torch.randn(3, STYLE_DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = ref_generator(state, z, truncation=psi, truncation_latent=latent_avg)
        ours = G(z, None, truncation_psi=psi, noise_mode="const", fused_modconv=fused_modconv)
    assert ours.shape == ref.shape == (3, 3, SIZE, SIZE)
    assert ref.abs().max() > 0.1  # a meaningful image, not all zeros
    assert (ours - ref).abs().max().item() < 1e-4


def test_whole_checkpoint_dict_and_w_avg_without_latent_avg():
    state = make_ros_state(seed=3)
    G = generator_from_rosinality({"g_ema": state, "g": state, "args": {"size": SIZE}})
    z = torch.randn(W_AVG_SAMPLES, STYLE_DIM, generator=torch.Generator().manual_seed(W_AVG_SEED))
    expected = ref_mapping(state, z).double().mean(0).float()
    assert (G.mapping.w_avg - expected).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in G.parameters()) and not G.training


def test_upsample_conv_is_not_flipped():
    """Asymmetric kernels in the upsampling conv: a flipped mapping would not match the reference."""
    state = make_ros_state(seed=4)
    state["convs.0.conv.weight"][..., 0, :] += 3.0  # make the kernel strongly top/bottom asymmetric
    G = generator_from_rosinality(state)
    z = torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_generator(state, z)
        assert (G(z, None, noise_mode="const") - ref).abs().max().item() < 1e-4
        G.synthesis.b8.conv0.weight.copy_(G.synthesis.b8.conv0.weight.flip([2, 3]))
        assert (G(z, None, noise_mode="const") - ref).abs().max().item() > 1e-2


def test_round_trip_through_saved_file(tmp_path):
    G = make_ours()
    state = rosinality_state_from_generator(G)
    ref_keys = make_ros_state()
    assert list(state) == list(ref_keys)
    assert all(state[k].shape == ref_keys[k].shape for k in state)
    path = tmp_path / "g.pt"
    args = argparse.Namespace(size=SIZE, latent=STYLE_DIM, n_mlp=N_MLP, channel_multiplier=2, path="lmdb", wandb=False)
    torch.save({"g_ema": state, "latent_avg": G.mapping.w_avg.clone(), "args": args, "ada_aug_p": 0.25}, path)

    ckpt = read_rosinality_file(path)
    assert is_rosinality_state(ckpt) and ckpt["args"]["n_mlp"] == N_MLP and ckpt["ada_aug_p"] == 0.25
    G2 = generator_from_rosinality(ckpt)
    own, back = G.state_dict(), G2.state_dict()
    assert set(own) == set(back) and all(torch.equal(own[k], back[k]) for k in own)
    z = torch.randn(4, STYLE_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for psi in (1.0, 0.7):
            a = G(z, None, truncation_psi=psi, noise_mode="const")
            b = G2(z, None, truncation_psi=psi, noise_mode="const")
            assert (a - b).abs().max().item() < 1e-5
        # and rosinality's own math on the exported state gives the same image
        ref = ref_generator(state, z, truncation=0.7, truncation_latent=G.mapping.w_avg)
        assert (G(z, None, truncation_psi=0.7, noise_mode="const") - ref).abs().max().item() < 1e-4

    G3 = generator_from_rosinality_file_object(io.BytesIO(path.read_bytes()))
    assert all(torch.equal(G3.state_dict()[k], own[k]) for k in own)


def test_export_rescales_mapping_for_other_lr_multiplier():
    G = make_ours(lr_multiplier=0.05)
    state = rosinality_state_from_generator(G)  # for a rosinality model with lr_mlp=0.01
    z = torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ref_mapping(state, z, lr_mlp=0.01) - G.mapping(z, None)[:, 0]).abs().max().item() < 1e-5
        G2 = generator_from_rosinality(state, latent_avg=G.mapping.w_avg, lr_mlp=0.01)
        assert (G2(z, None, noise_mode="const") - G(z, None, noise_mode="const")).abs().max().item() < 1e-5


def test_is_rosinality_state():
    state = make_ros_state()
    assert is_rosinality_state(state)
    assert is_rosinality_state({"g_ema": state, "d": {}})
    assert is_rosinality_state({f"module.{k}": v for k, v in state.items()})
    assert not is_rosinality_state({"G_ema": object()})
    assert not is_rosinality_state({"mapping.fc0.weight": torch.zeros(1)})
    assert not is_rosinality_state([1, 2])


def test_missing_key_error():
    state = make_ros_state()
    del state["convs.1.noise.weight"]
    with pytest.raises(CheckpointError, match=r"missing convs\.1\.noise\.weight"):
        generator_from_rosinality(state)
    state = make_ros_state()
    del state["noises.noise_3"]
    with pytest.raises(CheckpointError, match="noises.noise_3"):
        generator_from_rosinality(state)


def test_unexpected_key_error():
    state = make_ros_state()
    state["convs.0.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected convs\.0\.extra"):
        generator_from_rosinality(state)


def test_wrong_shape_error():
    state = make_ros_state()
    state["convs.2.conv.modulation.weight"] = torch.zeros(5, STYLE_DIM)
    with pytest.raises(CheckpointError, match=r"'convs\.2\.conv\.modulation\.weight' has shape \[5, 32\]"):
        generator_from_rosinality(state)
    state = make_ros_state()
    state["noises.noise_4"] = torch.zeros(1, 1, 8, 8)  # layer 4 runs at 16x16
    with pytest.raises(CheckpointError, match=r"noise_4.*expected \[1, 1, 16, 16\]"):
        generator_from_rosinality(state)
    with pytest.raises(CheckpointError, match="latent_avg"):
        generator_from_rosinality(make_ros_state(), latent_avg=torch.zeros(7))


def test_bad_values_errors():
    state = make_ros_state()
    state["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    with pytest.raises(CheckpointError, match="blur kernel"):
        generator_from_rosinality(state)
    state = make_ros_state()
    state["conv1.noise.weight"] = "x"
    with pytest.raises(CheckpointError, match="not a tensor"):
        generator_from_rosinality(state)


def test_inexpressible_channel_layout():
    # 8 px: 16 channels forces channel_base in [128, 135]; 16 px: 16 channels forces [256, 271].
    state = make_ros_state(channels={4: 32, 8: 16, 16: 16, 32: 8})
    with pytest.raises(CheckpointError, match="channel layout .* cannot be expressed"):
        generator_from_rosinality(state)


def test_rosinality_config_f_layout():
    """channel_multiplier=2 (config-f) at 128 px: 512 up to 64 px, 256 at 128 px -> channel_base 32768."""
    from portrait3d.checkpoints.rosinality import _channel_layout

    assert _channel_layout({4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64,
                            1024: 32}) == (32768, 512)
    assert _channel_layout({4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128}) == (16384, 512)  # cm=1
    with pytest.raises(CheckpointError):
        _channel_layout({4: 512, 8: 512, 16: 512, 32: 512, 64: 1024})  # cm=4


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_read_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": make_ros_state(), "args": _Evil(str(target))}, path)
    with pytest.raises(UnsafeCheckpointError, match="os"):
        read_rosinality_file(path)
    with pytest.raises(CheckpointError):
        generator_from_rosinality_file_object(path.read_bytes())
    assert not target.exists()


def test_read_errors(tmp_path):
    with pytest.raises(CheckpointError, match="unreadable"):
        read_rosinality_file(b"not a checkpoint at all")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_rosinality_file(path)
    path = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a rosinality"):
        generator_from_rosinality_file_object(path)

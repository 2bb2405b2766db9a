"""The training memory guard: the per-image estimate scales with the batch, leaves no trace, and a batch that cannot
fit is refused before training starts with one line and exit 2."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from tests.conftest import make_dataset
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.training.memory import activation_bytes, available_bytes, check_batch_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))


def test_estimate_scales_with_the_batch_and_leaves_out_parameters():
    net = _net()
    one = activation_bytes(lambda: net(torch.randn(1, 3, 16, 16, requires_grad=True)), [net])
    four = activation_bytes(lambda: net(torch.randn(4, 3, 16, 16, requires_grad=True)), [net])
    assert one > 0 and abs(four - 4 * one) < 0.01 * four  # batch norm also keeps a few per-channel vectors
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert one < 6 * 8 * 16 * 16 * 4 + weights  # a few [8, 16, 16] maps, not the weights on top


def test_probe_leaves_buffers_and_random_streams_as_they_were():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    activation_bytes(lambda: net(torch.randn(2, 3, 8, 8, requires_grad=True) * 5 + torch.rand(1)), [net])
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_check_refuses_only_what_cannot_fit():
    check_batch_memory(10 * 2**20, 16, "cpu", what="a batch", hint="h", available=2**30)
    with pytest.raises(UsageError, match=r"a batch of 64 needs about 2\.5 GiB .* 1\.0 GiB are free: lower it"):
        check_batch_memory(80 * 2**20, 64, "cpu", what="a batch of 64", hint="lower it", available=2**30)


def test_available_memory_is_known_on_linux():
    avail = available_bytes("cpu")
    assert avail is None or avail > 0


def test_cli_refuses_a_huge_batch_before_training(tmp_path):
    from portrait3d.interfaces.cli import main

    data = make_dataset(tmp_path / "data", 8, 32)
    res = CliRunner().invoke(main, ["train", "stylegan2", "--data", str(data), "--out", str(tmp_path / "run"),
                                    "--config", "tiny", "--batch", str(2**28), "--threads", "1"])
    assert res.exit_code == 2, res.output
    assert "needs about" in res.output and "--batch-gpu" in res.output and "Traceback" not in res.output
    assert not list((tmp_path / "run").glob("snapshot-*"))

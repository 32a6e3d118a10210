"""The dropout family of WideResNet: train/eval behaviour, keep rates (binomial tolerances stated), stochastic
depth and DropBlock against torchvision's ops, DropBlock's schedule through the Trainer on real digits."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torchvision.ops

from datamodules import DigitsSSL
from lightning_modules import Supervised
from lightning_modules.classification.networks import build_network
from lightning_modules.classification.networks.regularization import DropConnectLinear, ScheduledDropBlock
from tests.ssl_helpers import SMALL_NET, make_trainer

OPTIONS = {"dropout": 0.3, "spatial_dropout": 0.3, "stochastic_depth": 0.5, "drop_block": 0.2, "drop_connect": 0.3}


def _within(observed: float, expected: float, draws: int, sigmas: float = 5.0) -> None:
    """A binomial rate within ``sigmas`` standard errors (5 sigma: a false failure about once in 3.5 million)."""
    tolerance = sigmas * math.sqrt(expected * (1 - expected) / draws)
    assert abs(observed - expected) <= tolerance, f"rate {observed:.4f}, expected {expected:.4f} +- {tolerance:.4f}"


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_regularizer_is_random_in_training_and_off_in_evaluation(option):
    torch.manual_seed(0)
    plain = build_network("wrn10_1", 10, 1)
    regularized = build_network("wrn10_1", 10, 1, **{option: OPTIONS[option]})
    assert regularized.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    regularized.load_state_dict(plain.state_dict())
    x = torch.randn(16, 1, 8, 8)
    plain.eval(), regularized.eval()
    torch.testing.assert_close(regularized(x), plain(x))
    regularized.train()
    assert not torch.equal(regularized(x), regularized(x))  # BatchNorm alone is deterministic: the draws differ
    plain.train()
    torch.testing.assert_close(plain(x), plain(x))


def test_spatial_dropout_zeroes_whole_channels_at_its_rate():
    net = build_network("wrn10_1", 10, 1, spatial_dropout=0.3).train()
    seen = []
    net.groups[0][0].conv2.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    torch.manual_seed(1)
    net(torch.randn(256, 1, 8, 8))
    channels = seen[0].flatten(2)
    dropped = (channels == 0).all(dim=2)
    _within(dropped.float().mean().item(), 0.3, dropped.numel())
    kept = channels[~dropped]  # LeakyReLU outputs are never exactly 0 over a whole map: kept maps are whole
    assert (kept != 0).any(dim=1).all()


def test_stochastic_depth_decays_linearly_and_matches_torchvision():
    net = build_network("wrn16_1", 10, 1, stochastic_depth=0.5).train()
    blocks = [block for group in net.groups for block in group]
    assert [block.depth_drop for block in blocks] == pytest.approx([0.5 * l / 6 for l in range(1, 7)])

    block, x = blocks[-1], torch.randn(4000, 64, 2, 2)
    torch.manual_seed(2)
    out = block(x)
    torch.manual_seed(2)  # the same draw through torchvision's op on the branch written out here
    branch = block.conv2(block.act(block.bn2(block.conv1(block.act(block.bn1(x))))))
    expected = torchvision.ops.stochastic_depth(branch, 0.5, "row", True) + x
    torch.testing.assert_close(out, expected)
    dropped = torch.isclose(out, x).flatten(1).all(dim=1)
    _within(dropped.float().mean().item(), 0.5, len(x))
    block.eval()
    torch.testing.assert_close(block(x), block.conv2(block.act(block.bn2(block.conv1(block.act(block.bn1(x)))))) + x)


def test_drop_block_matches_torchvision_and_drops_its_expected_share():
    drop = ScheduledDropBlock(0.2, block_size=3).train()
    drop.training_progress = 0.5  # halfway through the ramp: rate 0.1
    x = torch.rand(64, 32, 16, 16) + 0.5
    torch.manual_seed(3)
    ours = drop(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, torchvision.ops.DropBlock2d(0.1, 3)(x))

    # Ghiasi et al. Eq. 1: seeds with gamma = p H W / (b^2 (H - b + 1)(W - b + 1)) at valid centres; a unit is
    # dropped when any of the k seeds whose block covers it fires, with probability 1 - (1 - gamma)^k.
    size, b, p = 16, 3, 0.1
    gamma = p * size * size / (b * b * (size - b + 1) ** 2)
    cover = [min(i, b - 1, size - 1 - i, size - b) + 1 for i in range(size)]  # valid centres covering row i
    expected = sum(1 - (1 - gamma) ** (ki * kj) for ki in cover for kj in cover) / size**2
    observed = (ours == 0).float().mean().item()
    assert abs(observed - expected) < 0.01, (observed, expected)  # correlated blocks: a loose, stated 0.01
    drop.eval()
    torch.testing.assert_close(drop(x), x)


def test_drop_block_fits_small_maps_and_refuses_even_sizes():
    drop = ScheduledDropBlock(0.3, block_size=7).train()
    assert drop(torch.ones(2, 4, 2, 2)).shape == (2, 4, 2, 2)  # shrinks to 1 on 2 x 2 maps
    with pytest.raises(ValueError, match="drop_block_size=4 must be an odd size"):
        build_network("wrn10_1", 10, 1, drop_block=0.1, drop_block_size=4)
    with pytest.raises(ValueError, match=r"stochastic_depth=1.0 is outside \[0, 1\)"):
        build_network("wrn10_1", 10, 1, stochastic_depth=1.0)


def test_drop_connect_keeps_each_weight_per_sample_at_its_rate():
    layer = DropConnectLinear(1, 2000, p=0.3).train()
    with torch.no_grad():
        layer.weight.fill_(1.0), layer.bias.zero_()
    torch.manual_seed(4)
    out = layer(torch.ones(50, 1))  # each output is its own weight's mask / (1 - p)
    kept = out != 0
    _within(kept.float().mean().item(), 0.7, kept.numel())
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert not torch.equal(kept[0], kept[1])  # one mask per sample
    layer.eval()
    torch.testing.assert_close(layer(torch.ones(3, 1)), torch.ones(3, 2000))


class _Progress(L.Callback):
    def __init__(self) -> None:
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(pl_module.net.groups[2][0].drop_block.training_progress)


def test_drop_block_rate_ramps_linearly_over_training_steps():
    model = Supervised(**{**SMALL_NET, "network_kwargs": {"bn_momentum": 0.1, "drop_block": 0.1}})
    progress = _Progress()
    make_trainer(max_steps=4, callbacks=[progress]).fit(model, DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=4))
    assert progress.values == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert model.net.groups[0][0].drop_block is None  # the first group has none (the paper's last groups only)

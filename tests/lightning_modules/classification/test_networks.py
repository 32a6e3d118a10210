"""Wide ResNet structure and the network registry (CPU, random weights, no downloads)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import lightning_modules.classification.networks as networks
from lightning_modules.classification.networks import WideResNet, available_networks, build_network, register_network


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn28_2_parameter_count_matches_literature():
    # FixMatch / MixMatch / TorchSSL report 1.47 M for WRN-28-2 on CIFAR-10; this is the exact figure.
    assert n_params(WideResNet(num_classes=10, depth=28, widen_factor=2)) == 1_467_610


def test_wrn28_8_parameter_count_matches_literature():
    # The literature's "23.4 M" for WRN-28-8 on CIFAR-100 rounds this exact count (23,401,012).
    # With 10 classes the head is 90 * 513 parameters smaller: 23,354,842.
    assert n_params(WideResNet(num_classes=100, depth=28, widen_factor=8)) == 23_401_012


@pytest.mark.parametrize(
    ("in_channels", "size", "num_classes"),
    [(3, 32, 10), (1, 8, 10)],  # CIFAR-like and scikit-learn digits
)
def test_wideresnet_output_shapes(in_channels, size, num_classes):
    net = WideResNet(num_classes, depth=28, widen_factor=2, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        assert net(x).shape == (2, num_classes)
        assert net.forward_features(x).shape == (2, net.num_features)
    assert net.num_features == 128


def test_wideresnet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = WideResNet(num_classes=10, depth=28, widen_factor=2).train()
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for: {missing}"


def test_wideresnet_uses_ssl_batchnorm_momentum():
    net = WideResNet(num_classes=10, depth=10, widen_factor=1)
    momenta = {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.001}


@pytest.mark.parametrize("depth", [12, 27, 4])
def test_bad_depth_is_rejected(depth):
    with pytest.raises(ValueError, match=rf"6n\+4.*depth={depth}"):
        WideResNet(num_classes=10, depth=depth)
    with pytest.raises(ValueError, match=rf"depth={depth}"):
        build_network(f"wrn{depth}_2", num_classes=10)


@pytest.mark.parametrize("name", available_networks())
def test_every_registered_network_builds_and_runs(name):
    net = build_network(name, num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_registry_lists_the_wide_resnets():
    assert {"wrn28_2", "wrn28_8"} <= set(available_networks())


def test_wrn_pattern_builds_any_depth_and_width_and_passes_kwargs():
    net = build_network("wrn10_1", num_classes=7, in_channels=1, dropout=0.3)
    assert isinstance(net, WideResNet)
    assert net.num_features == 64
    assert net.groups[0][0].dropout == 0.3
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
@pytest.mark.parametrize("in_channels", [3, 1])
def test_torchvision_by_name(name, in_channels):
    net = build_network(name, num_classes=10, in_channels=in_channels).eval()
    assert isinstance(net, nn.Module)
    if in_channels == 1:  # grey input is repeated to the 3 channels the stem expects
        assert isinstance(net, networks.RepeatChannels)
    with torch.no_grad():
        assert net(torch.randn(2, in_channels, 32, 32)).shape == (2, 10)


def test_torchvision_rejects_unsupported_channel_count():
    with pytest.raises(ValueError, match="in_channels=2"):
        build_network("resnet18", num_classes=10, in_channels=2)


@pytest.mark.parametrize("name", ["no_such_net", "torchvision:no_such_net", "wrn28"])
def test_unknown_name_lists_valid_forms(name):
    with pytest.raises(ValueError) as info:
        build_network(name, num_classes=10)
    message = str(info.value)
    for expected in (repr(name), "wrn28_2", "wrn28_8", "wrn{depth}_{k}", "torchvision:<name>", "timm:<name>"):
        assert expected in message


def test_timm_by_name():
    net = build_network("timm:resnet18", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_register_network_decorator(monkeypatch):
    monkeypatch.setattr(networks, "_REGISTRY", dict(networks._REGISTRY))  # undone after the test

    @register_network("tiny_mlp")
    def _tiny(num_classes: int, in_channels: int = 3, hidden: int = 8) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    assert "tiny_mlp" in available_networks()
    net = build_network("tiny_mlp", num_classes=4, hidden=5)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_network("tiny_mlp")(_tiny)

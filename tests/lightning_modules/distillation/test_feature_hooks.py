"""Feature hooks on the real Wide ResNet: shapes, gradient, sub-batches, errors and removal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.distillation.feature_hooks import FeatureHooks
from lightning_modules.classification.networks import build_network

PATHS = ["groups.0", "groups.2", "fc:input"]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_network("wrn10_1", num_classes=10)


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_shapes_and_penultimate_features_under_no_grad(net, images):
    net.eval()
    with FeatureHooks(net, PATHS) as hooks, torch.no_grad():
        net(images)
        features = hooks.pop()
        expected_penultimate = net.forward_features(images)
    assert list(features) == PATHS
    assert features["groups.0"].shape == (4, 16, 32, 32)
    assert features["groups.2"].shape == (4, 64, 8, 8)
    assert features["fc:input"].shape == (4, 64)
    assert torch.equal(features["fc:input"], expected_penultimate)
    assert not any(feature.requires_grad for feature in features.values())


def test_captured_student_features_carry_gradient(net, images):
    net.train()
    with FeatureHooks(net, PATHS) as hooks:
        net(images)
        features = hooks.pop()
    features["groups.2"].pow(2).mean().backward()
    assert net.stem.weight.grad is not None and net.stem.weight.grad.abs().sum() > 0
    assert net.fc.weight.grad is None  # downstream of the hooked module: untouched


def test_sub_batches_are_concatenated_in_call_order(net, images):
    net.eval()
    hooks = FeatureHooks(net, PATHS)
    with torch.no_grad():
        net(images)
        whole = hooks.pop()
        net(images[:1])
        net(images[1:])
        parts = hooks.pop()
    for path in PATHS:
        assert parts[path].shape == whole[path].shape
        assert torch.allclose(parts[path], whole[path], atol=1e-5)
    hooks.remove()


def test_unknown_path_lists_modules_and_syntax(net):
    with pytest.raises(ValueError, match="groups.7") as err:
        FeatureHooks(net, ["groups.0", "groups.7"])
    message = str(err.value)
    assert "'groups.0'" in message and "'stem'" in message and ":input" in message and "more)" in message
    with pytest.raises(ValueError, match="fc:output"):
        FeatureHooks(net, ["fc:output"])
    # The valid path before the bad one was not left hooked.
    assert not net.groups[0]._forward_hooks


def test_remove_stops_capturing(net, images):
    hooks = FeatureHooks(net, PATHS)
    hooks.remove()
    hooks.remove()  # idempotent
    assert not net.fc._forward_pre_hooks and not net.groups[2]._forward_hooks
    with torch.no_grad():
        net(images)
    with pytest.raises(RuntimeError, match="no features captured"):
        hooks.pop()


def test_inplace_modified_capture_is_detected_and_clone_avoids_it(net, images):
    # groups.1.0.bn1's output is overwritten by the block's inplace LeakyReLU.
    net.eval()
    with FeatureHooks(net, ["groups.1.0.bn1"]) as hooks, torch.no_grad():
        net(images)
        with pytest.raises(RuntimeError, match="modified in place"):
            hooks.pop()
    paths = ["groups.1.0.bn1", "groups.1.0.conv1:input"]
    with FeatureHooks(net, paths, clone=True) as hooks, torch.no_grad():
        net(images)
        features = hooks.pop()
    assert features["groups.1.0.bn1"].min() < 0  # the pre-activation values survived
    assert torch.allclose(F.leaky_relu(features["groups.1.0.bn1"], 0.1), features["groups.1.0.conv1:input"])


def test_works_under_inference_mode(net, images):
    net.eval()
    with FeatureHooks(net, ["groups.2"]) as hooks, torch.inference_mode():
        net(images)
        assert hooks.pop()["groups.2"].shape == (4, 64, 8, 8)

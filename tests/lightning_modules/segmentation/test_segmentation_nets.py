"""UNet 3+, RefineNet, Light-Weight RefineNet and the segmentation factory (CPU, random weights, no downloads).

Like timm's and smp's suites, the shared behaviour is one test parametrized over every network.
"""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.segmentation.networks import (
    LightWeightRefineNet,
    RefineNet,
    UNet3Plus,
    build_segmentation_network,
)
from lightning_modules.segmentation.networks.unet3plus import ABSENT_LOGIT, UNet3PlusDecoder
from lightning_modules.segmentation.networks.unet3plus.model import suppress_absent

NETWORKS = ["unet3plus", "refinenet", "lw_refinenet"]
SMALL = {"encoder_name": "resnet18"}  # keeps every forward in this file cheap


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs_of(result: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return result if isinstance(result, list) else [result]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize(("in_channels", "classes"), [(3, 1), (1, 3)])
def test_eval_output_is_one_full_resolution_map(name, in_channels, classes):
    net = build_segmentation_network(name, in_channels=in_channels, classes=classes, **SMALL).eval()
    with torch.no_grad():
        for height, width in [(64, 64), (96, 64)]:
            out = net(torch.randn(2, in_channels, height, width))
            assert isinstance(out, torch.Tensor)
            assert out.shape == (2, classes, height, width)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NETWORKS)
def test_size_not_divisible_by_output_stride_is_a_clear_value_error(name):
    net = build_segmentation_network(name, **SMALL).eval()
    with pytest.raises(ValueError, match=r"divisible by 32.*got 70x64.*pad to 96x64.*sliding-window"):
        net(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize("name", NETWORKS)
def test_every_parameter_gets_gradient_down_to_the_first_encoder_conv(name):
    net = build_segmentation_network(name, classes=2, **SMALL).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 2, (2, 64, 64))
    # RefineNet's zero-initialised residual branches open one link of each 4-stage CRP chain per
    # step, so take a few SGD steps before asking every parameter for a gradient. With the default
    # BatchNorm, a stage whose scale has only just left zero passes a signal too faint for float32
    # at lr 1e-4; the training settings (lr 0.01, momentum 0.9) open every stage within 6 steps.
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(6):
        optimizer.zero_grad()
        # A real loss: the mean of the outputs would cancel behind BatchNorm and prove nothing.
        loss = sum(F.cross_entropy(out, target) for out in outputs_of(net(x)))
        loss.backward()
        optimizer.step()
    first_conv = next(m for m in net.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    without_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


@pytest.mark.parametrize(("encoder_depth", "num_outputs"), [(5, 5), (4, 4)])
def test_unet3plus_deep_supervision_gives_one_output_per_scale_in_training_only(encoder_depth, num_outputs):
    # depth 5: decoder stages at strides 2, 4, 8, 16 plus the deepest encoder map (stride 32).
    net = UNet3Plus(classes=3, encoder_depth=encoder_depth, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) == num_outputs
    assert all(out.shape == (2, 3, 64, 64) for out in outputs)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 3, 64, 64)


def test_unet3plus_without_deep_supervision_gives_one_tensor_in_both_modes():
    net = UNet3Plus(classes=2, deep_supervision=False, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    assert net.deep_supervision_heads is None
    assert net.train()(x).shape == (2, 2, 64, 64)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 2, 64, 64)


def force_presence(net: UNet3Plus, present: bool) -> None:
    """Make the CGM classifier's (absent, present) logits constant, whatever the image."""
    conv = net.classification_head[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-5.0, 5.0] if present else [5.0, -5.0]))


@pytest.mark.parametrize("classes", [1, 3])
def test_cgm_turns_masks_to_background_when_the_classifier_says_absent(classes):
    net = UNet3Plus(classes=classes, cgm=True, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    force_presence(net, present=False)
    with torch.no_grad():
        out = net(x)
    assert net.last_presence.shape == (2, 2)
    if classes == 1:
        assert (torch.sigmoid(out) == 0).all()
    else:
        probs = out.softmax(dim=1)
        assert (probs[:, 0] == 1).all() and (probs[:, 1:] == 0).all()

    force_presence(net, present=True)
    with torch.no_grad():
        gated = net(x)
        net.classification_head, cgm = None, net.classification_head
        ungated = net(x)  # the same network with the CGM switched off
    net.classification_head = cgm
    torch.testing.assert_close(gated, ungated, rtol=0, atol=0)


def test_cgm_does_not_gate_in_training_and_gates_per_image():
    net = UNet3Plus(classes=1, cgm=True, **SMALL).train()
    force_presence(net, present=False)
    outputs = net(torch.randn(2, 3, 64, 64))
    assert len(outputs) == 5 and all((out != ABSENT_LOGIT).any() for out in outputs)

    logits = torch.randn(3, 4, 8, 8)
    gated = suppress_absent(logits, absent=torch.tensor([False, True, False]))
    torch.testing.assert_close(gated[[0, 2]], logits[[0, 2]])
    assert (gated[1, 0] == 0).all() and (gated[1, 1:] == ABSENT_LOGIT).all()


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (UNet3Plus, {"encoder_name": "resnet34", "classes": 1}, 27_830_853),
        (RefineNet, {"encoder_name": "resnet101", "classes": 21, "decoder_use_norm": False}, 87_965_013),
        (LightWeightRefineNet, {"encoder_name": "resnet50", "classes": 21, "decoder_use_norm": False}, 25_981_269),
        (LightWeightRefineNet, {"encoder_name": "resnet101", "classes": 21, "decoder_use_norm": False}, 44_973_397),
    ],
)
def test_parameter_count_is_the_one_in_the_docstring(cls, kwargs, expected):
    count = n_params(cls(**kwargs))
    print(f"{cls.__name__}({kwargs}): {count:,} parameters")
    assert count == expected
    assert f"{count:,}" in cls.__doc__


def test_unet3plus_decoder_on_the_papers_encoder_matches_the_official_count():
    # The paper's VGG-style encoder: two conv3x3 (with bias) + BN + ReLU per scale, 64..1024 wide.
    widths, encoder, previous = [64, 128, 256, 512, 1024], 0, 3
    for width in widths:
        encoder += (previous * width * 9 + width) + (width * width * 9 + width) + 2 * 2 * width
        previous = width
    decoder = UNet3PlusDecoder(widths, levels=[0, 1, 2, 3, 4], channels=64)
    # The official code also gives every decoder conv a bias; one conv3x3 head, 320 -> 1 class.
    conv_biases = sum(m.out_channels for m in decoder.modules() if isinstance(m, nn.Conv2d))
    head = 320 * 9 + 1
    assert encoder + n_params(decoder) + conv_biases + head == 26_971_777  # official: 26.97 M
    assert "26,971,777" in UNet3Plus.__doc__


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("unet3plus", UNet3Plus),
        ("UNet3Plus", UNet3Plus),
        ("refinenet", RefineNet),
        ("lw_refinenet", LightWeightRefineNet),
        ("Unet", smp.Unet),
        ("unet", smp.Unet),
        ("DeepLabV3Plus", smp.DeepLabV3Plus),
    ],
)
def test_factory_builds_our_networks_and_smps_without_downloading(name, cls):
    # smp's own default is encoder_weights="imagenet"; offline, a download attempt would fail here.
    net = build_segmentation_network(name, classes=2, **SMALL)
    assert type(net) is cls
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_factory_rejects_an_unknown_name_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown segmentation network 'unet4'.*unet3plus.*lw_refinenet.*Unet"):
        build_segmentation_network("unet4")


@pytest.mark.parametrize("name", ["refinenet", "lw_refinenet"])
@pytest.mark.parametrize("use_norm", [False, "batchnorm"])
def test_refinenet_logits_start_at_a_trainable_scale(name, use_norm):
    # Without normalisation the cascaded residual sums once gave logits of std ~6e5 at initialisation.
    net = build_segmentation_network(name, classes=2, decoder_use_norm=use_norm, **SMALL)
    # Unnormalised: eval. BatchNorm: train, the batch statistics; in eval its fresh running
    # statistics (mean 0, var 1) normalise nothing, as in any BatchNorm net before training.
    net.train(use_norm is not False)
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 64))
    assert logits.std() < 100


def test_refinenet_blocks_start_as_the_identity_with_batchnorm_too():
    # With a norm layer the zero goes into its scale (zero gamma); the conv keeps its He weights.
    from lightning_modules.segmentation.networks.refinenet.blocks import ChainedResidualPooling, ResidualConvUnit

    net = RefineNet("resnet18", classes=2)  # default decoder_use_norm="batchnorm"
    rcus = [m for m in net.decoder.modules() if isinstance(m, ResidualConvUnit)]
    assert rcus and all(isinstance(r.conv2[1], nn.BatchNorm2d) for r in rcus)
    assert all((r.conv2[1].weight == 0).all() and r.conv2[0].weight.abs().sum() > 0 for r in rcus)
    x = torch.randn(2, 256, 8, 8)
    assert torch.equal(rcus[0].eval()(x), x)
    crp = next(m for m in net.decoder.modules() if isinstance(m, ChainedResidualPooling)).eval()
    assert torch.equal(crp(x), F.relu(x))


@pytest.mark.parametrize(
    ("use_norm", "message"),
    [("layernorm", r"last axis .* width.*batchnorm"), ("instancenorm", r"InstanceNorm2d without a learnable scale.*affine")],
)
def test_refinenet_rejects_a_decoder_norm_it_cannot_start_at_identity(use_norm, message):
    with pytest.raises(ValueError, match=message):
        LightWeightRefineNet("resnet18", decoder_use_norm=use_norm)


def test_refinenet_with_affine_instancenorm_builds_and_runs():
    net = LightWeightRefineNet("resnet18", classes=2, decoder_use_norm={"type": "instancenorm", "affine": True})
    assert any(isinstance(m, nn.InstanceNorm2d) for m in net.decoder.modules())
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("use_norm", ["batchnorm", False])
def test_lw_refinenet_blows_up_at_lr_0_01_only_without_the_decoder_norm(use_norm):
    # The measurement behind the default (docs/segmentation.md), shrunk to 6 SGD steps on one
    # batch: the papers' unnormalised decoder's loss leaves any sane range within a few steps.
    torch.manual_seed(0)
    net = LightWeightRefineNet("resnet18", classes=2, decoder_use_norm=use_norm).train()
    x = torch.randn(4, 3, 64, 64)
    target = (x[:, 0] > 0).long()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(net(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    blew_up = not all(math.isfinite(v) and v < 10 for v in losses)
    assert blew_up == (use_norm is False), losses

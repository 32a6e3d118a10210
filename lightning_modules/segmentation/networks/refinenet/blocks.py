"""RefineNet building blocks (Lin et al., 2017, Sec. 3.2), with the kernel size that Light-Weight
RefineNet (Nekrasov et al., 2018) shrinks to 1x1 as a parameter.

Both papers' decoders have no normalisation layers (the RCU is a ResNet unit with its BatchNorm
removed); ``use_norm`` (smp's ``decoder_use_norm`` values: False, True/"batchnorm", "instancenorm",
"layernorm", ...) puts smp's norm layer after every decoder convolution. Convolutions have no bias.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import get_norm_layer
from torch import nn

__all__ = ["ResidualConvUnit", "MultiResolutionFusion", "ChainedResidualPooling", "RefineNetBlock",
           "zero_residual_branches"]


def conv(in_channels: int, out_channels: int, kernel_size: int, use_norm: bool | str | dict = False) -> nn.Module:
    """A bias-free conv, followed by smp's norm layer for ``use_norm`` unless that is False."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    if use_norm is False or use_norm == "identity":
        return layer
    norm = get_norm_layer(use_norm, out_channels)
    if isinstance(norm, nn.LayerNorm):
        raise ValueError("decoder_use_norm='layernorm' would normalise the last axis of a conv map (its width), "
                         "not its channels; use 'batchnorm', {'type': 'instancenorm', 'affine': True} or False")
    if getattr(norm, "weight", None) is None:  # residual branches start at zero through this scale
        raise ValueError(f"decoder_use_norm={use_norm!r} gives {type(norm).__name__} without a learnable scale, "
                         "which the residual branches need to start at zero; use 'batchnorm', "
                         "{'type': 'instancenorm', 'affine': True} or False")
    return nn.Sequential(layer, norm)


class ResidualConvUnit(nn.Module):
    """RCU: ``x + conv3x3(relu(conv3x3(relu(x))))``."""

    def __init__(self, channels: int, use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels, 3, use_norm)
        self.conv2 = conv(channels, channels, 3, use_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x itself is the residual.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class MultiResolutionFusion(nn.Module):
    """A conv per input, every result upsampled to the first (finest) input's size, then summed."""

    def __init__(self, num_inputs: int, channels: int, kernel_size: int = 3, use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size, use_norm) for _ in range(num_inputs))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        fused = self.convs[0](inputs[0])
        for conv_, x in zip(self.convs[1:], inputs[1:]):
            # Convolve at the coarse resolution, then upsample: cheaper, and what both papers do.
            fused = fused + F.interpolate(conv_(x), size=size, mode="bilinear", align_corners=False)
        return fused


class ChainedResidualPooling(nn.Module):
    """CRP: ReLU, then ``stages`` x (maxpool 5x5 stride 1 -> conv), each result added to a running sum.

    The chain pools the previous stage's output, so stage k sees a ~4k+1 pixel context; the sum
    lets the network choose how much of each context to keep.
    """

    def __init__(self, channels: int, stages: int = 4, kernel_size: int = 3, use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size, use_norm) for _ in range(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = path = F.relu(x)
        for conv_ in self.convs:
            path = conv_(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            total = total + path
        return total


class RefineNetBlock(nn.Module):
    """One RefineNet block: 2 RCUs per input path, multi-resolution fusion, CRP, an output RCU.

    With a single input (RefineNet-4, the deepest) there is nothing to fuse and fusion is skipped,
    as in the paper. Inputs are ordered finest first.
    """

    def __init__(self, num_inputs: int, channels: int, crp_stages: int = 4, use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.adapt = nn.ModuleList(
            nn.Sequential(ResidualConvUnit(channels, use_norm), ResidualConvUnit(channels, use_norm))
            for _ in range(num_inputs)
        )
        self.fusion = MultiResolutionFusion(num_inputs, channels, use_norm=use_norm) if num_inputs > 1 else None
        self.crp = ChainedResidualPooling(channels, crp_stages, use_norm=use_norm)
        self.output_rcu = ResidualConvUnit(channels, use_norm)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        adapted = [adapt(x) for adapt, x in zip(self.adapt, inputs)]
        x = adapted[0] if self.fusion is None else self.fusion(adapted)
        return self.output_rcu(self.crp(x))


def zero_residual_branches(module: nn.Module) -> None:
    """Zero the last conv of every RCU and the convs of every CRP chain, so each block starts as the identity.

    Without normalisation, the cascaded residual sums of a randomly initialised decoder multiply
    the activations: with He initialisation a RefineNet on a random ResNet-18 gave logits of
    standard deviation about 6e5 (LW-RefineNet 1e4) and did not train. Zero-initialised residual
    branches (as in Fixup, or the zero-gamma trick of ResNet training) keep the start near the
    identity; the branches grow from there with the first gradient steps.

    With a norm layer after each conv, its scale is zeroed instead (the zero-gamma trick: a zero
    conv before a norm layer would divide its gradient by sqrt(eps)). A CRP chain then opens one
    stage per optimizer step (stage k pools stage k-1's output).
    """
    for sub in module.modules():
        if isinstance(sub, ResidualConvUnit):
            _zero_output(sub.conv2)
        elif isinstance(sub, ChainedResidualPooling):
            for conv_ in sub.convs:
                _zero_output(conv_)


def _zero_output(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        nn.init.zeros_(layer.weight)
        return
    nn.init.zeros_(layer[1].weight)  # conv() gives only norms with a scale

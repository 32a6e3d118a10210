"""RefineNet building blocks (Lin et al., 2017, Sec. 3.2), with the kernel size that Light-Weight
RefineNet (Nekrasov et al., 2018) shrinks to 1x1 as a parameter.

No normalisation layers: both papers' decoders have none (the RCU is a ResNet unit with its
BatchNorm removed). Convolutions have no bias; that is a choice, worth ~0.1 % of the parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResidualConvUnit", "MultiResolutionFusion", "ChainedResidualPooling", "RefineNetBlock",
           "zero_residual_branches"]


def conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)


class ResidualConvUnit(nn.Module):
    """RCU: ``x + conv3x3(relu(conv3x3(relu(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels, 3)
        self.conv2 = conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x itself is the residual.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class MultiResolutionFusion(nn.Module):
    """A conv per input, every result upsampled to the first (finest) input's size, then summed."""

    def __init__(self, num_inputs: int, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size) for _ in range(num_inputs))

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

    def __init__(self, channels: int, stages: int = 4, kernel_size: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size) for _ in range(stages))

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

    def __init__(self, num_inputs: int, channels: int, crp_stages: int = 4) -> None:
        super().__init__()
        self.adapt = nn.ModuleList(
            nn.Sequential(ResidualConvUnit(channels), ResidualConvUnit(channels)) for _ in range(num_inputs)
        )
        self.fusion = MultiResolutionFusion(num_inputs, channels) if num_inputs > 1 else None
        self.crp = ChainedResidualPooling(channels, crp_stages)
        self.output_rcu = ResidualConvUnit(channels)

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
    """
    for sub in module.modules():
        if isinstance(sub, ResidualConvUnit):
            nn.init.zeros_(sub.conv2.weight)
        elif isinstance(sub, ChainedResidualPooling):
            for conv_ in sub.convs:
                nn.init.zeros_(conv_.weight)

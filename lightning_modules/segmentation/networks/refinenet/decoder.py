"""RefineNet and Light-Weight RefineNet decoders over four encoder maps at strides 4, 8, 16, 32.

Like smp's decoders, each takes the encoder's whole ``out_channels`` / feature list and picks what
it uses: the last four maps (smp's maps 2..5 of a depth-5 encoder). Both refine from the deepest
map to the shallowest: each step fuses the result so far with the next shallower encoder map.
They differ inside a step (see each class).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import ChainedResidualPooling, MultiResolutionFusion, RefineNetBlock, ResidualConvUnit, conv

__all__ = ["RefineNetDecoder", "LightWeightRefineNetDecoder"]

NUM_MAPS = 4  # strides 4, 8, 16, 32


class RefineNetDecoder(nn.Module):
    """Four cascaded RefineNet blocks (RefineNet-4 .. RefineNet-1), then 2 RCUs (Lin et al., 2017).

    Each encoder map is first adapted to ``channels`` by a conv3x3. The paper uses 512 channels
    for the deepest path and 256 elsewhere; here one width serves all paths.
    """

    def __init__(self, encoder_channels: Sequence[int], channels: int = 256, crp_stages: int = 4,
                 use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.adapt = nn.ModuleList(conv(c, channels, 3, use_norm) for c in encoder_channels[-NUM_MAPS:])
        # Deepest first: RefineNet-4 sees one map; every later block also sees the previous output.
        self.blocks = nn.ModuleList(
            RefineNetBlock(1 if i == 0 else 2, channels, crp_stages, use_norm) for i in range(NUM_MAPS)
        )
        self.final = nn.Sequential(ResidualConvUnit(channels, use_norm), ResidualConvUnit(channels, use_norm))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: the encoder's maps, shallow to deep; returns ``channels`` maps at stride 4."""
        maps = [adapt(f) for adapt, f in zip(self.adapt, features[-NUM_MAPS:])]
        x = self.blocks[0](maps[-1])
        for block, skip in zip(self.blocks[1:], reversed(maps[:-1])):
            x = block(skip, x)
        return self.final(x)


class LightWeightRefineNetDecoder(nn.Module):
    """Light-Weight RefineNet decoder (Nekrasov et al., 2018).

    RCUs removed; fusion and CRP use 1x1 convolutions. Each encoder map is reduced to ``channels``
    by a conv1x1 (the paper: 512 for the deepest, 256 elsewhere; here one width), the deepest goes
    through CRP, and each shallower step sums the conv1x1 of its map with the upsampled conv1x1
    of the previous CRP output, then applies its own CRP.
    """

    def __init__(self, encoder_channels: Sequence[int], channels: int = 256, crp_stages: int = 4,
                 use_norm: bool | str | dict = False) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(conv(c, channels, 1, use_norm) for c in encoder_channels[-NUM_MAPS:])
        self.crp = nn.ModuleList(
            ChainedResidualPooling(channels, crp_stages, kernel_size=1, use_norm=use_norm) for _ in range(NUM_MAPS)
        )
        self.fusion = nn.ModuleList(
            MultiResolutionFusion(2, channels, kernel_size=1, use_norm=use_norm) for _ in range(NUM_MAPS - 1)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: the encoder's maps, shallow to deep; returns ``channels`` maps at stride 4."""
        maps = [reduce(f) for reduce, f in zip(self.reduce, features[-NUM_MAPS:])]
        x = self.crp[0](maps[-1])
        for crp, fusion, skip in zip(self.crp[1:], self.fusion, reversed(maps[:-1])):
            x = crp(fusion([skip, x]))
        return x

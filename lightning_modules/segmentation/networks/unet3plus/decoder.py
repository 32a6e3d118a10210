"""UNet 3+ decoder: full-scale skip connections (Huang et al., 2020, Sec. 2.1).

Every decoder stage sees every scale: shallower encoder maps max-pooled down to its scale, the
encoder map of its own scale, and every deeper decoder map (the deepest one being the deepest
encoder map) bilinearly upsampled. Each of these sources gets its own conv3x3 + BN + ReLU to
``channels``; the concatenation (``num_scales * channels`` wide) is fused by one more conv3x3 + BN + ReLU.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import Conv2dReLU
from torch import nn

__all__ = ["UNet3PlusDecoder"]


class FullScaleStage(nn.Module):
    """The decoder stage at scale ``stage`` (0 = shallowest) of ``len(levels)`` scales.

    ``levels[j]`` is log2 of scale j's stride, so pooling from scale j to this one is by
    ``2 ** (levels[stage] - levels[j])``. Source order: shallower encoder maps, this scale's
    encoder map, then deeper maps from just below this stage down to the deepest.
    """

    def __init__(self, stage: int, levels: Sequence[int], source_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            nn.MaxPool2d(kernel_size=2 ** (levels[stage] - levels[j])) for j in range(stage)
        )
        self.branches = nn.ModuleList(Conv2dReLU(c, channels, kernel_size=3, padding=1) for c in source_channels)
        fused = len(source_channels) * channels
        self.fuse = Conv2dReLU(fused, fused, kernel_size=3, padding=1)

    def forward(self, encoder_maps: Sequence[torch.Tensor], deeper_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``encoder_maps``: scales 0..stage; ``deeper_maps``: decoded scales stage+1..deepest."""
        same_scale = encoder_maps[-1]
        size = same_scale.shape[-2:]
        sources = [pool(m) for pool, m in zip(self.pools, encoder_maps[:-1])]
        sources.append(same_scale)
        # The paper upsamples before its conv3x3 (not after), so the conv sees the finer grid.
        sources += [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in deeper_maps]
        return self.fuse(torch.cat([branch(s) for branch, s in zip(self.branches, sources)], dim=1))


class UNet3PlusDecoder(nn.Module):
    """Decodes ``len(encoder_channels)`` encoder maps (shallow to deep) with full-scale skips.

    ``forward`` returns one map per scale, shallow to deep: the decoder stages (each
    ``num_scales * channels`` wide) followed by the deepest encoder map itself, which plays the
    paper's ``X_De^5`` (UNet 3+ has no decoder stage at the deepest scale).
    """

    def __init__(self, encoder_channels: Sequence[int], levels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        num_scales = len(encoder_channels)
        if num_scales < 2 or len(levels) != num_scales:
            raise ValueError(f"need >= 2 scales with one level each; got {encoder_channels} and {levels}")
        self.out_channels = [num_scales * channels] * (num_scales - 1) + [encoder_channels[-1]]
        self.stages = nn.ModuleList(
            FullScaleStage(stage, levels, self._sources(encoder_channels, stage), channels)
            for stage in range(num_scales - 1)
        )

    def _sources(self, encoder_channels: Sequence[int], stage: int) -> list[int]:
        """Widths of a stage's sources: encoder scales 0..stage, then the deeper decoded maps."""
        return list(encoder_channels[: stage + 1]) + self.out_channels[stage + 1 :]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        decoded = [features[-1]]
        for stage in reversed(range(len(self.stages))):
            decoded.insert(0, self.stages[stage](features[: stage + 1], decoded))
        return decoded

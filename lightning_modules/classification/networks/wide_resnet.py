"""Wide ResNet (Zagoruyko & Komodakis, 2016) in the variant used by FixMatch, MixMatch and TorchSSL.

Differences from the original WRN that those codebases share: LeakyReLU(0.1) instead of ReLU,
BatchNorm momentum 0.001 (TensorFlow's decay 0.999 in PyTorch's convention), and the first block
of the first group activates its input before the residual split.

Regularizers (``network_kwargs``; :mod:`.regularization` says what each is and cites its paper): ``dropout``,
``spatial_dropout`` (between a block's convolutions), ``stochastic_depth`` (the last block's drop rate of its
residual branch, decaying linearly to the first), ``drop_block`` with ``drop_block_size`` (after each block of the
last two groups, ramped linearly over training), ``drop_connect`` (the classifier's weights). All default to 0.

Usage::

    >>> import torch
    >>> net = WideResNet(num_classes=10, depth=28, widen_factor=2)   # WRN-28-2, 1.47 M params
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> net.forward_features(torch.randn(2, 3, 32, 32)).shape       # pooled, before the head
    torch.Size([2, 128])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
import torchvision.ops

from .regularization import DropConnectLinear, ScheduledDropBlock, check_rate, depth_drop_rates, spatial_dropout

__all__ = ["WideResNet"]


class _PreActBlock(nn.Module):
    """BN-LReLU-conv3x3-BN-LReLU-(dropout, spatial dropout)-conv3x3, the branch (stochastic depth) plus an
    identity or 1x1-conv shortcut, then (DropBlock)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        dropout: float,
        bn_momentum: float,
        leaky_slope: float,
        activate_before_residual: bool = False,
        spatial_dropout: float = 0.0,
        depth_drop: float = 0.0,
        drop_block: ScheduledDropBlock | None = None,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        # A projection is needed only when the shape changes; otherwise the shortcut is free.
        needs_proj = in_ch != out_ch or stride != 1
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if needs_proj else None
        self.act = nn.LeakyReLU(leaky_slope, inplace=True)
        self.dropout, self.spatial_dropout, self.depth_drop = dropout, spatial_dropout, depth_drop
        self.drop_block = drop_block
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in-place LeakyReLU is safe: it only ever overwrites fresh BatchNorm outputs.
        pre = self.act(self.bn1(x))
        # The stem output has had no normalisation yet, so the very first block normalises it
        # for the shortcut too; every other block keeps the raw input on the shortcut path.
        # (TorchSSL's port skips bn1 altogether in the first block of groups 2 and 3, leaving
        # it without gradient; this follows the FixMatch reference, where the branch uses it.)
        residual = pre if self.activate_before_residual else x
        out = self.act(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(spatial_dropout(out, self.spatial_dropout, self.training))
        if self.depth_drop > 0:
            out = torchvision.ops.stochastic_depth(out, self.depth_drop, "row", self.training)
        out = out + (residual if self.shortcut is None else self.shortcut(residual))
        return out if self.drop_block is None else self.drop_block(out)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for small images (32x32 CIFAR, 8x8 digits, ...).

    ``forward(x)`` returns logits; ``forward_features(x)`` returns the pooled
    ``(N, num_features)`` features that feed the linear head ``fc``, ``forward_feature_maps(x)`` the maps before pooling.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
        bn_momentum: float = 0.001,
        leaky_slope: float = 0.1,
        spatial_dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        drop_block: float = 0.0,
        drop_block_size: int = 3,
        drop_connect: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got depth={depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        for name, rate in (("dropout", dropout), ("spatial_dropout", spatial_dropout),
                           ("stochastic_depth", stochastic_depth), ("drop_connect", drop_connect)):
            check_rate(name, rate)
        blocks_per_group = (depth - 4) // 6
        depth_drops = iter(depth_drop_rates(stochastic_depth, 3 * blocks_per_group))
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        block_args = dict(dropout=dropout, spatial_dropout=spatial_dropout, bn_momentum=bn_momentum,
                          leaky_slope=leaky_slope)

        self.stem = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        groups, in_ch = [], 16
        for g, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for b in range(blocks_per_group):
                first = b == 0
                blocks.append(
                    _PreActBlock(
                        in_ch,
                        width,
                        stride if first else 1,
                        activate_before_residual=(g == 0 and first),
                        depth_drop=next(depth_drops),
                        # parameter-free, so a block's checkpoint keys do not depend on it
                        drop_block=ScheduledDropBlock(drop_block, drop_block_size) if drop_block > 0 and g > 0 else None,
                        **block_args,
                    )
                )
                in_ch = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        # Blocks are pre-activation, so the last block's output still needs BN + activation.
        self.bn = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.act = nn.LeakyReLU(leaky_slope, inplace=True)
        self.num_features = in_ch
        self.fc = DropConnectLinear(in_ch, num_classes, drop_connect) if drop_connect > 0 else nn.Linear(in_ch, num_classes)
        self._init_weights(leaky_slope)

    def _init_weights(self, leaky_slope: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Passing the real slope gives the exact He gain for LeakyReLU (the reference
                # code uses a=0; with slope 0.1 the two differ by 0.5 %).
                nn.init.kaiming_normal_(m.weight, a=leaky_slope, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's ``(N, num_features, H/4, W/4)`` maps, after its BatchNorm and activation."""
        return self.act(self.bn(self.groups(self.stem(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling keeps the network resolution-agnostic (8x8 digits end at 2x2).
        return F.adaptive_avg_pool2d(self.forward_feature_maps(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

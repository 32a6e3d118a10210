"""The dropout family beside plain dropout: the pieces :class:`WideResNet` builds from its ``network_kwargs``.

* ``dropout`` (Srivastava et al. 2014): units between a block's two convolutions, ``F.dropout``.
* ``spatial_dropout`` (Tompson et al. 2015, "Efficient Object Localization Using Convolutional Networks"):
  whole feature maps at the same place, ``F.dropout2d``.
* ``stochastic_depth`` (Huang et al. 2016, "Deep Networks with Stochastic Depth"): each residual branch is
  dropped per sample; block ``l`` of ``L`` drops with ``p_l = (l / L) p_L`` (the paper's linear decay of the
  survival rate, ``p_L = 0.5`` in its CIFAR runs), by ``torchvision.ops.stochastic_depth(mode="row")``.
* ``drop_block`` (Ghiasi et al. 2018, "DropBlock: A regularization method for convolutional networks"):
  contiguous ``block_size`` squares of each feature map after every block of the last two groups (the paper
  puts it in ResNet-50's groups 3 and 4 of 4), by ``torchvision.ops.drop_block2d``; its drop rate ramps
  linearly from 0 to ``drop_block`` over training (the paper's scheduled keep_prob, 1 -> 0.9, block 7 on
  ImageNet); :class:`ScheduledDropBlock`.
* ``drop_connect`` (Wan et al. 2013, "Regularization of Neural Networks using DropConnect"): each weight of the
  linear classifier is dropped with its own mask per sample, as the paper's DropConnect layer before the
  softmax; :class:`DropConnectLinear`.

Every one is inverted: training rescales what is kept by 1 / keep rate, so evaluation uses the plain network
(torchvision's ops do so; Huang et al. scale at test instead, the same in expectation). For DropConnect this is
the "mean inference" that Wan et al. compare with their Gaussian moment-matching inference (their Sec. 3.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import drop_block2d

__all__ = ["DropConnectLinear", "ScheduledDropBlock", "check_rate", "depth_drop_rates", "spatial_dropout"]


def check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate} is outside [0, 1): it is a drop probability, e.g. {name}=0.1 (0 turns it off)")


def depth_drop_rates(final_rate: float, num_blocks: int) -> list[float]:
    """Huang et al.'s linear decay: block ``l = 1..L`` drops its residual branch with ``(l / L) final_rate``."""
    return [final_rate * (index + 1) / num_blocks for index in range(num_blocks)]


class ScheduledDropBlock(nn.Module):
    """DropBlock with the paper's linear schedule: drop rate ``drop_prob * training_progress``.

    ``training_progress`` (0 .. 1) is set before each training step by the training module
    (``lightning_modules.core.optimization.set_training_progress``); outside a Trainer it stays 1, the full rate.
    The block shrinks to the largest odd size that fits a small feature map (torchvision refuses an even size,
    and WRN's last group is 8 x 8 on CIFAR, 2 x 2 on 8 x 8 digits).
    """

    def __init__(self, drop_prob: float, block_size: int = 3) -> None:
        super().__init__()
        check_rate("drop_block", drop_prob)
        if block_size < 1 or block_size % 2 == 0:
            raise ValueError(f"drop_block_size={block_size} must be an odd size >= 1, e.g. 3 (7 in the paper on ImageNet)")
        self.drop_prob, self.block_size = drop_prob, block_size
        self.training_progress = 1.0

    @property
    def current_drop_prob(self) -> float:
        return self.drop_prob * self.training_progress

    def forward(self, x: Tensor) -> Tensor:
        block = min(self.block_size, x.shape[-2], x.shape[-1])
        block -= 1 - block % 2  # odd
        return drop_block2d(x, self.current_drop_prob, block, training=self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}, progress={self.training_progress:.3f}"


class DropConnectLinear(nn.Linear):
    """A linear layer whose weights are dropped with probability ``p``, one mask per sample, while training.

    ``y_i = ((M_i * W) x_i) / (1 - p) + b`` with ``M_i ~ Bernoulli(1 - p)`` of W's shape (the bias is kept, as
    Wan et al.'s Eq. 2 drops weights only); evaluation is the plain layer. The per-sample masks cost
    ``N x out x in`` numbers, small for a classifier head (512 x 10 x 128 for WRN-28-2 on CIFAR-10).
    """

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        check_rate("drop_connect", p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        keep = torch.empty(x.shape[0], *self.weight.shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        weights = keep * self.weight.to(x.dtype) / (1 - self.p)
        return torch.einsum("noi,ni->no", weights, x) + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def spatial_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Whole channels dropped per sample (``F.dropout2d``), rescaled by ``1 / (1 - p)``."""
    return F.dropout2d(x, p=p, training=training) if p > 0 else x

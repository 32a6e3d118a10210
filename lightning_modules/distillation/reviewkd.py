"""Knowledge review (ReviewKD; Chen, Liu, Zhao & Jia, CVPR 2021): attention-based fusion and the
hierarchical context loss. No Lightning.

Student features ``F_1 .. F_n`` (shallow to deep) are reviewed deep to shallow: an attention-based
fusion (ABF) module maps ``F_n`` to ``F'_n``; each shallower ``F_k`` is fused with the residual
features of level ``k + 1``, upsampled, by two attention maps ``a = sigmoid(conv1x1([x_k, y_{k+1}]))``,
``x = a_0 x_k + a_1 y_{k+1}``, and a 3x3 conv + BN gives ``F'_k`` in the teacher's ``(C, H, W)``.
The hierarchical context loss (HCL) compares every ``F'_k`` with the teacher's ``T_k`` on a pyramid:

    HCL(F', T) = sum_k [ MSE(F'_k, T_k) + sum_{l in (4, 2, 1), l < H_k} 2^-j(l) MSE(P_l F'_k, P_l T_k) ] / (1 + sum 2^-j(l)),

``P_l`` the adaptive average pool to ``l x l`` and ``j(l) = 1, 2, 3`` for the pooled levels that exist.
As the authors' code, dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``: ``ABF`` lines 20-56
(1x1 conv + BN to ``mid``; attention 1x1 conv to 2 channels + sigmoid on all but the deepest level;
nearest upsampling; 3x3 conv + BN; Kaiming-uniform ``a=1`` init), ``ReviewKD`` lines 58-86
(``mid = min(512, C_deepest)``), ``hcl`` lines 160-177. Their CIFAR-100 recipe (``CIFAR-100/train.py:48-60,
220-232``, ``script/reviewKD.sh``): CE 1 plus HCL weight 5 for ResNet32x4 -> ResNet8x4 and WRN-40-2 ->
WRN-16-2, warmed up as ``min(1, epoch / 20)`` of 240 epochs, no KL term. Levels: the student's three
stage outputs and its pooled feature against the teacher's pre-activation stage outputs and pooled
feature (``train.py:223``, ``t_features[1:]`` with ``preact=True``; ``reviewkd.py:92-96``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    return feature[:, :, None, None] if feature.ndim == 2 else feature  # a pooled (N, C) feature is 1 x 1


class AttentionFusion(nn.Module):
    """One ABF level: ``(x_k, y_{k+1}) -> (F'_k, y_k)`` (``reviewkd.py:20-56``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.output(x), x


class ReviewFusion(nn.Module):
    """All ABF levels for student features of ``student_shapes`` and teacher features of ``teacher_shapes``,
    both ``(C, H, W)`` lists ordered shallow to deep; ``forward`` takes the student's features in that order
    and returns the fused ones in the teacher's shapes, same order."""

    def __init__(self, student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(student_shapes) != len(teacher_shapes) or not student_shapes:
            raise ValueError(f"ReviewKD needs one teacher feature per student feature, got {len(student_shapes)} "
                             f"student and {len(teacher_shapes)} teacher features")
        student_shapes, teacher_shapes = ([tuple(s) + (1, 1)[:3 - len(s)] for s in shapes]  # pooled (C,): 1 x 1
                                          for shapes in (student_shapes, teacher_shapes))
        mid = min(512, student_shapes[-1][0])
        last = len(student_shapes) - 1
        self.out_sizes = [tuple(shape[1:]) for shape in teacher_shapes]
        self.levels = nn.ModuleList(AttentionFusion(s[0], mid, t[0], fuse=k < last)
                                    for k, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))

    def forward(self, student_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fused, residual = [], None
        for k in reversed(range(len(self.levels))):
            out, residual = self.levels[k](_as_map(student_features[k]), residual, self.out_sizes[k])
            fused.insert(0, out)
        return fused


def hierarchical_context_loss(student_features: Sequence[torch.Tensor],
                              teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """HCL (``reviewkd.py:160-177``), summed over levels; teacher features are detached, float32."""
    total = 0.0
    for fs, ft in zip(student_features, teacher_features, strict=True):
        fs, ft = _as_map(fs).float(), _as_map(ft).detach().float()
        if fs.shape != ft.shape:
            raise ValueError(f"HCL compares features of one shape, got {tuple(fs.shape)} and {tuple(ft.shape)}")
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total

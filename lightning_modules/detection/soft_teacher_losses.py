"""Soft Teacher's two pieces of arithmetic (Xu et al., ICCV 2021), as plain tensor functions.

Both follow the authors' ``ssod/models/soft_teacher.py`` (microsoft/SoftTeacher), in torchvision's
layout: class 0 is the background (mmdetection puts it last).

- :func:`background_weighted_cross_entropy`: the "soft teacher" classification loss of the R-CNN head on
  unlabeled images (``unsup_rcnn_cls_loss``, lines 206-243).
- :func:`jittered_boxes` and :func:`box_uncertainty`: box jittering and the spread of the teacher's
  refined boxes, which select the pseudo boxes for the regression loss (``aug_box``, lines 464-484;
  ``compute_uncertainty_with_aug``, lines 411-462; the selection at lines 270-276).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def background_weighted_cross_entropy(class_logits: torch.Tensor, labels: torch.Tensor,
                                      background_scores: torch.Tensor) -> torch.Tensor:
    """``L_cls = sum_i w_i CE(s_i, y_i) / max(sum_i w_i, 1)`` over the sampled proposals ``i`` of all images,
    with ``w_i = 1`` for a proposal assigned to a pseudo box (``y_i > 0``) and ``w_i = p_teacher(bg | i)``, the
    teacher's background probability on it, for one assigned to the background (``y_i = 0``).

    A background proposal the teacher also calls background counts fully; one on which it sees an object
    (a box the 0.9 threshold dropped) hardly counts. The normalization by the sum of weights, not the
    number of proposals, is the authors' (``soft_teacher.py`` line 243).

    Args:
        class_logits: (N, C) the student's R-CNN class logits, background in column 0.
        labels: (N,) int64 assigned classes, 0 = background.
        background_scores: (N,) the teacher's background probabilities (no gradient is taken through them).
    """
    weights = torch.where(labels > 0, torch.ones_like(background_scores), background_scores.detach())
    per_proposal = F.cross_entropy(class_logits, labels, reduction="none")
    return (weights * per_proposal).sum() / weights.sum().clamp(min=1.0)


def jittered_boxes(boxes: torch.Tensor, times: int = 10, scale: float = 0.06,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(times, n, 4): each xyxy box moved ``times`` times, every coordinate by ``N(0, 1) * scale * side``,
    ``side`` the box's width (x1, x2) or height (y1, y2), at least 1 pixel (the authors' ``aug_box``)."""
    sides = (boxes[:, 2:4] - boxes[:, :2]).clamp(min=1.0).repeat(1, 2)  # (n, 4): w, h, w, h
    offsets = torch.randn(times, len(boxes), 4, generator=generator, device=boxes.device, dtype=boxes.dtype)
    return boxes[None, :, :4] + offsets * scale * sides[None]


def box_uncertainty(refined: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n,): the mean over the 4 coordinates of the std across jitters of the teacher's refined box of each
    pseudo box's class, each divided by the mean refined box's width or height (at least 1 pixel).

    Args:
        refined: (times, n, C, 4) the teacher's box head outputs, decoded to xyxy, on the jittered boxes.
        labels: (n,) the pseudo boxes' classes (1..K).
    """
    times, n = refined.shape[:2]
    if times < 2:
        raise ValueError(f"box_uncertainty needs at least 2 jitters per box for a spread, got {times}")
    if n == 0:  # no box: no spread to measure (and std over an empty tensor warns)
        return refined.new_zeros(0)
    of_label = refined[:, torch.arange(n, device=refined.device), labels]  # (times, n, 4)
    spread, mean = of_label.std(dim=0), of_label.mean(dim=0)  # unbiased std, as torch's and the authors'
    sides = (mean[:, 2:4] - mean[:, :2]).clamp(min=1.0).repeat(1, 2)
    return (spread / sides).mean(dim=1)

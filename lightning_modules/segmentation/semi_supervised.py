"""Semi-supervised segmentation: the classification methods applied per pixel, not copied.

Each class combines :class:`Segmenter` (network, losses, metrics) with a semi-supervised method of
the shared base; the method's unlabeled loss already works on ``(N, C, H, W)`` logits, so a
pixel is treated like an image:

* ``SegFixMatch``: per-pixel pseudo-labels ``argmax q`` from the weak view, kept where
  ``max q >= tau``, supervise the strong view (photometric jitter on the same crop, so pixels
  stay aligned): ``L_u = mean_pixels 1[max q >= tau] CE(argmax q, p(strong))``.
* ``SegMeanTeacher``: the EMA teacher's per-pixel softmax on one weak view is the target of the
  student's softmax on another (MSE), weight ramped up with exp(-5 (1 - t)^2).

Both log ``mask_ratio`` / ``pseudo_label_acc`` over pixels (accuracy only where the unlabeled
image has a mask, target >= 0).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.segmentation.networks.unet3plus import main_output_only
from lightning_modules.segmentation.segmenter import Segmenter
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.mean_teacher import MeanTeacher


class SegFixMatch(Segmenter, FixMatch):
    """FixMatch for segmentation (per-pixel confidence masks). Arguments: :class:`Segmenter`'s and ``threshold``."""


class SegMeanTeacher(Segmenter, MeanTeacher):
    """Mean Teacher for segmentation (per-pixel consistency). Arguments: :class:`Segmenter`'s and the ramp-up's.

    Defaults: the membrane recipe (``configs/segmeanteacher_membrane.yaml``, docs/results/seg_membrane.md):
    weight 1 per pixel, ramped with ``exp(-5 (1 - t)^2)`` over 1,600 steps; the image recipe's weight
    50 over 2^20 steps is not meant for pixels.

    The teacher gives its main prediction only: in training mode (``teacher_train_mode``) UNet 3+
    would otherwise return its deep-supervision side outputs too, which no loss of the teacher uses.
    """

    def __init__(self, unlabeled_loss_weight: float = 1.0, rampup: str | None = "sigmoid", rampup_steps: int = 1600,
                 **kwargs: Any) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with main_output_only(self.teacher):
            return super().teacher_logits(images)

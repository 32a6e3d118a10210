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

from lightning_modules.fixmatch import FixMatch
from lightning_modules.mean_teacher import MeanTeacher
from lightning_modules.segmenter import Segmenter


class SegFixMatch(Segmenter, FixMatch):
    """FixMatch for segmentation (per-pixel confidence masks). Arguments: :class:`Segmenter`'s and ``threshold``."""


class SegMeanTeacher(Segmenter, MeanTeacher):
    """Mean Teacher for segmentation (per-pixel consistency). Arguments: :class:`Segmenter`'s and the ramp-up's."""

"""Semantic segmentation: the supervised :class:`Segmenter`, FixMatch and Mean Teacher per pixel
(:class:`SegFixMatch`, :class:`SegMeanTeacher`), cross pseudo supervision (:class:`CPS`), their losses,
dataset-level metrics and overlays, sliding-window inference, and the networks by name (:mod:`~lightning_modules.segmentation.networks`:
UNet 3+, RefineNet, Light-Weight RefineNet and smp's architectures)."""

from lightning_modules.segmentation.cps import CPS
from lightning_modules.segmentation.networks import build_segmentation_network
from lightning_modules.segmentation.segmenter import Segmenter
from lightning_modules.segmentation.semi_supervised import SegFixMatch, SegMeanTeacher
from lightning_modules.segmentation.sliding_window import sliding_window_inference

__all__ = ["Segmenter", "SegFixMatch", "SegMeanTeacher", "CPS", "build_segmentation_network", "sliding_window_inference"]

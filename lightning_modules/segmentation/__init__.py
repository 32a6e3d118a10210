"""Semantic segmentation: the supervised :class:`Segmenter`, FixMatch and Mean Teacher per pixel
(:class:`SegFixMatch`, :class:`SegMeanTeacher`), cross pseudo supervision (:class:`CPS`),
UniMatch (:class:`UniMatch`), their losses,
dataset-level metrics and overlays, sliding-window inference, and the networks by name (:mod:`~lightning_modules.segmentation.networks`:
UNet 3+, RefineNet, Light-Weight RefineNet and smp's architectures)."""

from lightning_modules.segmentation.cps import CPS
from lightning_modules.segmentation.networks import build_segmentation_network
from lightning_modules.segmentation.segmenter import Segmenter
from lightning_modules.segmentation.semi_supervised import SegFixMatch, SegMeanTeacher
from lightning_modules.segmentation.sliding_window import sliding_window_inference
from lightning_modules.segmentation.unimatch import UniMatch

__all__ = ["Segmenter", "SegFixMatch", "SegMeanTeacher", "CPS", "UniMatch", "build_segmentation_network", "sliding_window_inference"]

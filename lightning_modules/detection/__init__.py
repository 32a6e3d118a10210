"""Detection and instance segmentation on torchvision's detectors: supervised (:class:`Detector`) and
semi-supervised (:class:`UnbiasedTeacher`, :class:`SoftTeacher`), the networks by name (:mod:`~lightning_modules.detection.networks`)
and the logged pictures (:mod:`~lightning_modules.detection.overlays`)."""

from lightning_modules.detection.detector import Detector
from lightning_modules.detection.soft_teacher import SoftTeacher
from lightning_modules.detection.unbiased_teacher import UnbiasedTeacher

__all__ = ["Detector", "SoftTeacher", "UnbiasedTeacher"]

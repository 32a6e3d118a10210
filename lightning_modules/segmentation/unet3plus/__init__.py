from .decoder import UNet3PlusDecoder
from .model import ABSENT_LOGIT, UNet3Plus
from .tiled import cgm_sliding_window_inference, uses_cgm

__all__ = ["UNet3Plus", "UNet3PlusDecoder", "ABSENT_LOGIT", "cgm_sliding_window_inference", "uses_cgm"]

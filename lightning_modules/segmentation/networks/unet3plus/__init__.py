from .decoder import UNet3PlusDecoder
from .model import ABSENT_LOGIT, UNet3Plus, main_output_only
from .tiled import cgm_sliding_window_inference, uses_cgm

__all__ = ["UNet3Plus", "UNet3PlusDecoder", "ABSENT_LOGIT", "main_output_only", "cgm_sliding_window_inference", "uses_cgm"]

from .decoder import UNet3PlusDecoder
from .model import ABSENT_LOGIT, UNet3Plus

__all__ = ["UNet3Plus", "UNet3PlusDecoder", "ABSENT_LOGIT"]

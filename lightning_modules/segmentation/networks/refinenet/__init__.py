from .decoder import LightWeightRefineNetDecoder, RefineNetDecoder
from .model import LightWeightRefineNet, RefineNet

__all__ = ["RefineNet", "LightWeightRefineNet", "RefineNetDecoder", "LightWeightRefineNetDecoder"]

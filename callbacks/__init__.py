"""Callbacks and training machinery that any labelwise method can use."""

from callbacks.ema import EMAModel

__all__ = ["EMAModel"]

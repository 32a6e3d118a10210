"""What every network in this package shares: smp's encoder-decoder-head model, with a clearer size check.

The networks subclass smp's ``SegmentationModel`` so they behave like smp's own architectures
(``predict``, ``freeze_encoder``, ``save_pretrained``, the same initialisation of decoder and heads).
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.base import SegmentationModel

__all__ = ["EncoderDecoderModel"]


class EncoderDecoderModel(SegmentationModel):
    """``SegmentationModel`` whose input check raises ``ValueError`` and says how to fix the input.

    smp raises ``RuntimeError`` for a wrong shape; a wrong image size is a bad argument, and the
    message should name both remedies: pad/resize, or tile the image.
    """

    def check_input_shape(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        stride = self.encoder.output_stride
        if height % stride == 0 and width % stride == 0:
            return
        padded_h, padded_w = -(-height // stride) * stride, -(-width // stride) * stride
        raise ValueError(
            f"{type(self).__name__} needs input height and width divisible by {stride} (the encoder's "
            f"output stride, 2**encoder_depth); got {height}x{width}. Pad or resize the image to a multiple "
            f"of {stride} (e.g. pad to {padded_h}x{padded_w} and crop the prediction back), or use "
            f"sliding-window inference with tiles whose sides are multiples of {stride}."
        )

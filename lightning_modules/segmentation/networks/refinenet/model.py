"""RefineNet (Lin et al., 2017) and Light-Weight RefineNet (Nekrasov et al., 2018) on smp encoders."""

from __future__ import annotations

from typing import Any, Callable

from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from .._base import EncoderDecoderModel
from .blocks import zero_residual_branches
from .decoder import LightWeightRefineNetDecoder, RefineNetDecoder

__all__ = ["RefineNet", "LightWeightRefineNet"]

_DECODER_STRIDE = 4  # the decoders' output: the finest of encoder maps 2..5


class _RefineNetFamily(EncoderDecoderModel):
    """Encoder (depth 5) + a RefineNet-style decoder + conv3x3 head upsampled x4 to the input size.

    ``decoder_use_norm`` takes smp's values and, as in smp's decoders, defaults to BatchNorm after
    every decoder conv. ``False`` gives the papers' unnormalised decoder; from random weights it
    diverges at SGD lr 0.01 (LW-RefineNet on membrane: loss 3.76 -> NaN by step 5) and trains with
    lr 0.001 or gradient clipping (docs/segmentation.md has the measurements).
    """

    decoder_class: type[nn.Module]

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        features: int = 256,
        crp_stages: int = 4,
        decoder_use_norm: bool | str | dict = "batchnorm",
        activation: str | Callable | None = None,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights, **encoder_kwargs
        )
        self.decoder = self.decoder_class(self.encoder.out_channels, features, crp_stages, decoder_use_norm)
        self.segmentation_head = SegmentationHead(
            features, classes, kernel_size=3, activation=activation, upsampling=_DECODER_STRIDE
        )
        self.classification_head = None
        self.name = f"{type(self).__name__.lower()}-{encoder_name}"
        self.initialize()
        zero_residual_branches(self.decoder)  # after smp's He initialisation of the decoder


class RefineNet(_RefineNetFamily):
    """RefineNet: four cascaded RefineNet blocks from stride 32 to stride 4 (Lin et al., 2017).

    Usage::

        >>> import torch
        >>> net = RefineNet("resnet18", classes=21).eval()
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 21, 64, 64])

    Encoder maps at strides 4, 8, 16, 32 (smp's maps 2..5) are adapted to ``features`` channels
    by a conv3x3 each (the paper: 512 for the deepest path, 256 for the others). RefineNet-4
    refines the deepest; RefineNet-3..1 each fuse the previous output with the next shallower
    map. Block: 2 RCUs per input, multi-resolution fusion (conv3x3, upsample, sum), chained
    residual pooling (``crp_stages`` x maxpool 5x5 + conv3x3), an output RCU; then 2 RCUs and a
    conv3x3 head, bilinearly upsampled x4.

    Parameters, ``RefineNet("resnet101", classes=21, decoder_use_norm=False)`` (the paper's
    unnormalised decoder): 87,965,013 (encoder 42,500,160).
    """

    decoder_class = RefineNetDecoder


class LightWeightRefineNet(_RefineNetFamily):
    """Light-Weight RefineNet: RCUs removed, 1x1 convolutions in fusion and CRP (Nekrasov et al., 2018).

    Usage::

        >>> import torch
        >>> net = LightWeightRefineNet("resnet18", classes=21).eval()
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 21, 64, 64])

    Encoder maps at strides 4..32 are reduced to ``features`` channels by conv1x1; from the
    deepest up, each step sums (conv1x1 of its map) + (conv1x1 of the previous CRP output,
    upsampled) and applies CRP (``crp_stages`` x maxpool 5x5 + conv1x1); a conv3x3 head at
    stride 4 is bilinearly upsampled x4.

    Parameters (``classes=21``, PASCAL VOC, ``decoder_use_norm=False`` as in the paper):
    ``resnet50`` 25,981,269; ``resnet101`` 44,973,397.
    The paper's 27 M (LW-50) and 46 M (LW-101) come from its 512-wide deepest path; widening
    that path here would add 1,376,256 and give 27.36 M and 46.35 M.
    """

    decoder_class = LightWeightRefineNetDecoder

"""UNet 3+ (Huang et al., 2020, "UNet 3+: A Full-Scale Connected UNet for Medical Image Segmentation")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from segmentation_models_pytorch.base import SegmentationHead, initialization
from segmentation_models_pytorch.base.modules import Activation
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from .._base import EncoderDecoderModel
from .decoder import UNet3PlusDecoder

__all__ = ["UNet3Plus", "ABSENT_LOGIT", "main_output_only"]

#: Logit given to foreground channels of images the CGM calls absent: sigmoid/softmax make it 0,
#: and it stays finite in float16 and bfloat16.
ABSENT_LOGIT = -1.0e4


class UNet3Plus(EncoderDecoderModel):
    """UNet 3+ on any smp encoder: full-scale skips, deep supervision, optional CGM.

    Usage::

        >>> import torch
        >>> net = UNet3Plus("resnet18", classes=3).eval()
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
        >>> outputs = net.train()(torch.randn(2, 3, 64, 64))   # deep supervision
        >>> len(outputs), outputs[0].shape                       # main prediction first
        (5, torch.Size([2, 3, 64, 64]))

    Scales. ``get_encoder(depth=d)`` returns ``d + 1`` maps at strides ``1, 2, ..., 2**d``. As in
    smp's ``Unet``, map 0 is not used: for most encoders it is the input image itself. Maps 1..d
    are the UNet 3+ scales, minus any with 0 channels (``mit_b*`` and ``tu-convnext*`` have no
    stride-2 map), so a ResNet with ``encoder_depth=5`` gives the paper's five scales, at strides
    2..32 rather than the paper's 1..16: decoder stages at strides 2, 4, 8, 16, the deepest
    encoder map at 32, and the head upsamples its stride-2 prediction x2 to the input size.
    Each decoder stage is ``num_scales * decoder_channels`` wide (5 x 64 = 320, as in the paper).

    Outputs (``activation`` applied to each). ``eval()``, or ``deep_supervision=False``: one
    ``(N, classes, H, W)`` tensor from a conv3x3 on the shallowest stage. ``train()`` with
    ``deep_supervision=True``: a list of ``num_scales`` such tensors (5 for a depth-5 ResNet),
    one per decoder stage then the deepest encoder map, shallow to deep, each from its own
    conv3x3 and bilinearly upsampled to the input size; element 0 is the main prediction.
    ``side_outputs = False`` (:func:`main_output_only`) returns the main prediction alone in
    ``train()`` too, without running the side heads.

    Classification-guided module (``cgm=True``): dropout(0.5) + conv1x1 to 2 channels + global
    max pool on the deepest encoder map give ``last_presence``, the ``(N, 2)`` (absent, present)
    logits of the latest forward; ``sigmoid`` of it is the paper's probability, and it needs
    its own loss (the paper's BCE against image-level presence). In ``eval()`` an image whose
    argmax is "absent" gets certain-background masks: every foreground logit is set to
    ``ABSENT_LOGIT`` (all channels when ``classes == 1``; channels 1.. when ``classes > 1``,
    where channel 0 is taken to be background and set to 0), so sigmoid/softmax probabilities
    are exactly those of an empty mask. In ``train()`` masks are not gated: the argmax passes no
    gradient, and gating by an untrained classifier would only drop the segmentation loss of
    the images it wrongly calls absent. ``gate_absent = False`` leaves eval outputs ungated too,
    for a caller that gates later (sliding-window inference gates the stitched image:
    :func:`cgm_sliding_window_inference`).

    Parameters, ``UNet3Plus("resnet34", classes=1)`` (deep supervision, no CGM): 27,830,853
    (resnet34 encoder 21,284,672). Convolutions followed by BatchNorm have no bias. Check of the
    decoder: on the paper's VGG-style encoder (64..1024, five scales at strides 1..16), with one
    head and the official code's conv biases added, it totals 26,971,777, the official 26.97 M.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        decoder_channels: int = 64,
        deep_supervision: bool = True,
        cgm: bool = False,
        activation: str | Callable | None = None,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights, **encoder_kwargs
        )
        widths = self.encoder.out_channels
        self.levels = [k for k in range(1, len(widths)) if widths[k] > 0]
        encoder_channels = [widths[k] for k in self.levels]
        if len(encoder_channels) < 2:
            raise ValueError(
                f"UNet3Plus needs >= 2 encoder scales; {encoder_name!r} at depth {encoder_depth} has {widths}"
            )
        self.decoder = UNet3PlusDecoder(encoder_channels, self.levels, decoder_channels)

        def head(channels: int, level: int) -> SegmentationHead:
            return SegmentationHead(channels, classes, kernel_size=3, upsampling=2**level)

        out_channels = self.decoder.out_channels
        self.segmentation_head = head(out_channels[0], self.levels[0])
        self.deep_supervision_heads = (
            nn.ModuleList(head(c, level) for c, level in zip(out_channels[1:], self.levels[1:]))
            if deep_supervision
            else None
        )
        self.classification_head = (
            nn.Sequential(nn.Dropout(0.5), nn.Conv2d(encoder_channels[-1], 2, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
            if cgm
            else None
        )
        # Applied after the CGM gate, so a gated image reads as background whatever the activation.
        self.activation = Activation(activation)
        self.last_presence: torch.Tensor | None = None
        self.gate_absent = True
        self.side_outputs = True
        self.name = f"unet3plus-{encoder_name}"
        self.initialize()

    def initialize(self) -> None:
        super().initialize()
        if self.deep_supervision_heads is not None:
            initialization.initialize_head(self.deep_supervision_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input_shape(x)
        features = self.encoder(x)
        decoded = self.decoder([features[k] for k in self.levels])
        all_outputs = self.training and self.side_outputs and self.deep_supervision_heads is not None
        masks = [self.segmentation_head(decoded[0])]
        if all_outputs:
            masks += [head(d) for head, d in zip(self.deep_supervision_heads, decoded[1:])]
        if self.classification_head is not None:
            self.last_presence = self.classification_head(decoded[-1])
            if not self.training and self.gate_absent:
                absent = self.last_presence.argmax(dim=1) == 0
                masks = [suppress_absent(m, absent) for m in masks]
        masks = [self.activation(m) for m in masks]
        return masks if all_outputs else masks[0]


@contextmanager
def main_output_only(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` returning its main prediction alone, in training mode too (a UNet 3+'s side heads
    do not run); any other network is left as it is."""
    if not isinstance(net, UNet3Plus):
        yield net
        return
    previous, net.side_outputs = net.side_outputs, False
    try:
        yield net
    finally:
        net.side_outputs = previous


def suppress_absent(logits: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """Replace the ``(N, C, H, W)`` logits of images where ``absent`` (N,) is True by certain background."""
    background = torch.full_like(logits, ABSENT_LOGIT)
    if logits.shape[1] > 1:
        background[:, 0] = 0.0  # channel 0 is background: softmax gives it probability 1
    return torch.where(absent[:, None, None, None], background, logits)

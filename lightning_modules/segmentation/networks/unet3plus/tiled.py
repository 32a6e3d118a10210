"""Sliding-window inference for UNet 3+ with its classification-guided module (CGM).

Gating each tile and averaging the tiles would let an "absent" tile's ``ABSENT_LOGIT`` (-1e4)
outweigh any neighbour where they overlap, wiping the neighbour's foreground. Here the tiles'
ungated outputs are averaged, and the CGM's verdicts are stitched too: a pixel becomes certain
background only when every tile that covers it calls itself absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_modules.segmentation.sliding_window import sliding_window_inference

from .model import UNet3Plus, suppress_absent


def uses_cgm(net: torch.nn.Module) -> bool:
    """Whether ``net`` is a UNet 3+ whose CGM gates its eval outputs."""
    return isinstance(net, UNet3Plus) and net.classification_head is not None


@contextmanager
def ungated(net: UNet3Plus) -> Iterator[UNet3Plus]:
    """``net`` with its eval-mode CGM gate off (``last_presence`` is still computed)."""
    previous, net.gate_absent = net.gate_absent, False
    try:
        yield net
    finally:
        net.gate_absent = previous


def cgm_sliding_window_inference(net: UNet3Plus, images: Tensor, window: int | tuple[int, int] = 256,
                                 overlap: float = 0.25, num_classes: int | None = None) -> Tensor:
    """Outputs ``(N, C, H, W)`` of ``net`` (in eval mode) from tiles, gated after stitching.

    Each tile's ungated output and its "present" flag (CGM argmax, 0 or 1, as one more channel)
    are averaged by :func:`sliding_window_inference`; pixels whose averaged flag is 0 (no covering
    tile present) get the outputs of an empty mask. With one tile this is the network's own gate.
    """
    def tile_outputs(tile: Tensor) -> Tensor:
        with ungated(net):
            outputs = net(tile)
        present = (net.last_presence.argmax(dim=1) == 1).to(outputs.dtype)
        return torch.cat([outputs, present[:, None, None, None].expand(-1, 1, *outputs.shape[-2:])], dim=1)

    stitched = sliding_window_inference(tile_outputs, images, window=window, overlap=overlap,
                                        num_classes=None if num_classes is None else num_classes + 1)
    outputs, absent = stitched[:, :-1], stitched[:, -1:] == 0
    everywhere = torch.ones(len(outputs), dtype=torch.bool, device=outputs.device)
    empty = net.activation(suppress_absent(torch.zeros_like(outputs), everywhere))  # after the activation, as forward
    return torch.where(absent, empty, outputs)

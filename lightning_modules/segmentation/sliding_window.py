"""Whole-image logits from a model that sees fixed-size tiles (segmentation inference)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

def sliding_window_inference(model_fn: Callable[[Tensor], Tensor], image: Tensor, window: int | tuple[int, int] = 256,
                             overlap: float = 0.25, num_classes: int | None = None, weighting: str = "uniform",
                             sigma_scale: float = 0.125) -> Tensor:
    """Logits ``(N, C, H, W)`` for images ``(N, C_in, H, W)`` of any size, from tiles of ``window``.

    Tiles start every ``round(window * (1 - overlap))`` pixels, the last one flush with the border;
    an image smaller than the window is reflect-padded (replicate when too small to reflect) at the
    bottom/right and the padding is cropped off. Where tiles overlap, their logits are averaged with
    ``weighting``: ``"uniform"`` or ``"gaussian"`` (per-axis sigma ``sigma_scale * window``, centre
    weight 1, floor 1e-4), which favours tile centres whose context is complete. ``model_fn`` maps a
    tile batch ``(N, C_in, h, w)`` to logits ``(N, C, h, w)``; accumulation is float32. Wrap the call
    in ``torch.no_grad()`` for inference.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if weighting not in ("uniform", "gaussian"):
        raise ValueError(f"weighting must be 'uniform' or 'gaussian', got {weighting!r}")
    n, _, h, w = image.shape
    win_h, win_w = (window, window) if isinstance(window, int) else tuple(window)
    pad_h, pad_w = max(0, win_h - h), max(0, win_w - w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        image = F.pad(image if image.is_floating_point() else image.float(), (0, pad_w, 0, pad_h), mode=mode)
    height, width = image.shape[-2:]
    weight = torch.ones(1, 1, win_h, win_w, device=image.device)
    if weighting == "gaussian":
        axes = [torch.exp(-0.5 * ((torch.arange(s, device=image.device) - (s - 1) / 2) / (sigma_scale * s)) ** 2)
                for s in (win_h, win_w)]
        weight = (axes[0][:, None] * axes[1][None, :]).clamp_min(1e-4).view(1, 1, win_h, win_w)
    logits, total = None, torch.zeros(1, 1, height, width, device=image.device)
    for y in _tile_starts(height, win_h, overlap):
        for x in _tile_starts(width, win_w, overlap):
            out = model_fn(image[..., y:y + win_h, x:x + win_w])
            if out.shape[0] != n or tuple(out.shape[-2:]) != (win_h, win_w):
                raise ValueError(f"model_fn returned {tuple(out.shape)} for a tile of {n}x{win_h}x{win_w}: it must "
                                 f"return (N, C, h, w) logits of the tile's size")
            if num_classes is not None and out.shape[1] != num_classes:
                raise ValueError(f"model_fn returned {out.shape[1]} channels, expected num_classes={num_classes}")
            if logits is None:
                logits = torch.zeros(n, out.shape[1], height, width, device=image.device)
            logits[..., y:y + win_h, x:x + win_w] += out.float() * weight
            total[..., y:y + win_h, x:x + win_w] += weight
    return (logits / total)[..., :h, :w]


def _tile_starts(size: int, window: int, overlap: float) -> list[int]:
    stride = max(1, round(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else starts + [size - window]

"""The shared optimizer recipe's pieces: parameter groups that keep weight decay off biases and norm
weights, FixMatch's cosine learning-rate schedule, ``lr = lr0 * cos(7 pi k / 16 K)``, and the ramp-ups
of a loss weight (lambda_u from 0 to its value)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def decay_groups(modules: Iterable[nn.Module]) -> list[dict[str, Any]]:
    """The trainable parameters of ``modules`` in two groups: weights, which take the optimizer's weight
    decay, and biases and norm weights (1-d), which take none."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int = 0, fraction: float = 7 / 16) -> float:
    """Learning-rate factor: linear warm-up, then ``cos(pi * fraction * step / total)``."""
    if step < warmup:
        return (step + 1) / warmup
    return math.cos(math.pi * fraction * min(step, total) / total)


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                    fraction: float = 7 / 16) -> dict[str, Any]:
    """Lightning's scheduler entry for :func:`cosine_with_warmup` over ``total`` steps, stepped every step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: cosine_with_warmup(k, total, warmup, fraction))
    return {"scheduler": scheduler, "interval": "step"}


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(step: int, length: int) -> float:
    """``t = step / length`` clipped to [0, 1] (MixMatch, Pseudo-Label's alpha(t))."""
    if length <= 0:
        return 1.0
    return min(max(step / length, 0.0), 1.0)


RAMPUPS = {"sigmoid": sigmoid_rampup, "linear": linear_rampup}

"""Loss pieces shared by semi-supervised methods. Plain functions, no Lightning.

All of them take logits with classes on dimension 1, so ``(N, C)`` image logits and
``(N, C, H, W)`` per-pixel logits work alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confident_pseudo_labels(logits: torch.Tensor, threshold: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels ``argmax softmax(logits / T)`` and the mask ``max softmax >= threshold``.

    The logits are detached: pseudo-labels are targets, never a path for gradient.
    Returns ``(pseudo_labels, confidence_mask)``, the mask as a float tensor of 0/1.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    confidence, pseudo_labels = probs.max(dim=1)
    return pseudo_labels, (confidence >= threshold).to(probs.dtype)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i mask_i * CE(logits_i, targets_i)``: averaged over all samples, masked ones count as 0.

    Dividing by the batch size rather than by ``mask.sum()`` is FixMatch's convention: the loss
    grows with the fraction of confident predictions.
    """
    return (F.cross_entropy(logits, targets, reduction="none") * mask).mean()


def masked_accuracy(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Accuracy of ``predictions`` over the masked entries with a known target (``>= 0``); 0 if none."""
    weight = mask * (targets >= 0)
    return ((predictions == targets) * weight).sum() / weight.sum().clamp(min=1)

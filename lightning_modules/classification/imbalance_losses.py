"""Losses for class imbalance, hard examples and multi-label targets. No Lightning.

Single-label criteria take ``(logits (N, C), targets (N,) int64)``; multi-label ones (``multilabel = True``)
also accept float multi-hot targets ``(N, C)``. All compute in float32, so bf16 autocast is safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _per_class(name: str, values: Sequence[float], num_classes: int) -> Tensor:
    weights = torch.as_tensor(values, dtype=torch.float32).flatten()
    if weights.numel() != num_classes:
        raise ValueError(f"{name} has {weights.numel()} entries but num_classes={num_classes}; "
                         "give one value per class")
    return weights


def multi_hot(targets: Tensor, num_classes: int) -> Tensor:
    """Float ``(N, C)`` targets: int64 indices ``(N,)`` become one-hot, ``(N, C)`` targets pass through."""
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), softmax form.

    ``L = mean_i -alpha_{y_i} (1 - p_{i,y_i})^gamma log p_{i,y_i}``; without ``alpha`` every class weighs 1,
    and ``gamma = 0`` gives cross-entropy. Default ``gamma=2`` is the paper's.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma={gamma} must be >= 0 (0 is cross-entropy), e.g. gamma=2.0")
        self.num_classes, self.gamma = num_classes, gamma
        self.register_buffer("alpha", None if alpha is None else _per_class("alpha", alpha, num_classes))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_pt = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        if self.alpha is not None:
            loss = loss * self.alpha[targets]
        return loss.mean()


class TopKLoss(nn.Module):
    """Online hard example mining as a top-k loss (Shrivastava et al. 2016, "Training Region-based
    Object Detectors with Online Hard Example Mining").

    ``L = mean of the ceil(k N) largest per-sample CE values``; ``k = 1`` is cross-entropy. Default ``k=0.7``.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, k: float = 0.7) -> None:
        super().__init__()
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k={k} is outside (0, 1]; it is the kept fraction of the batch, e.g. k=0.7")
        self.num_classes, self.k = num_classes, k

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
        kept = max(1, math.ceil(self.k * per_sample.numel()))
        return per_sample.topk(kept).values.mean()


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy ``L = sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (as ``F.cross_entropy(weight=w)``).

    Give ``class_weights`` directly, or ``class_counts`` ``n_c`` to derive them: inverse frequency
    ``w_c ∝ 1 / n_c``, or with ``beta`` the effective number of samples (Cui et al. 2019, "Class-Balanced
    Loss Based on Effective Number of Samples") ``w_c ∝ (1 - beta) / (1 - beta^{n_c})``. Derived
    weights are normalized to mean 1, as Cui et al. do (they sum to C).
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, class_weights: Sequence[float] | None = None,
                 class_counts: Sequence[float] | None = None, beta: float | None = None) -> None:
        super().__init__()
        if (class_weights is None) == (class_counts is None):
            raise ValueError("give exactly one of class_weights (the weights) or class_counts (samples per class)")
        if class_weights is not None:
            if beta is not None:
                raise ValueError("beta only applies with class_counts; drop beta or pass class_counts instead")
            weights = _per_class("class_weights", class_weights, num_classes)
            if (weights < 0).any():
                raise ValueError("class_weights must be >= 0")
        else:
            counts = _per_class("class_counts", class_counts, num_classes).double()
            if (counts <= 0).any():
                raise ValueError("class_counts must all be > 0; drop empty classes or pass class_weights")
            if beta is None:
                weights = 1.0 / counts
            elif 0.0 <= beta < 1.0:
                weights = (1.0 - beta) / (1.0 - beta**counts)
            else:
                raise ValueError(f"beta={beta} is outside [0, 1); Cui et al. use e.g. beta=0.999")
            weights = (weights / weights.mean()).float()
        self.num_classes = num_classes
        self.register_buffer("class_weights", weights)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, weight=self.class_weights)


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy per class: ``L = mean_{i,c} -[pw_c y_ic log s_ic + (1 - y_ic) log(1 - s_ic)]``,
    ``s = sigmoid(z)``, ``pw`` the optional ``pos_weight`` (default 1)."""

    multilabel: bool = True

    def __init__(self, num_classes: int, pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        weights = None if pos_weight is None else _per_class("pos_weight", pos_weight, num_classes)
        self.register_buffer("pos_weight", weights)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), multi_hot(targets, self.num_classes),
                                                  pos_weight=self.pos_weight)


class SigmoidF1(nn.Module):
    """sigmoidF1 (Bénédict et al. 2021, "sigmoidF1: A Smooth F1 Score Surrogate Loss for Multilabel
    Classification"): a differentiable F-beta from soft counts.

    ``s = sigmoid(slope (z - eta))``, ``tp = sum s y``, ``fp = sum s (1 - y)``, ``fn = sum (1 - s) y``,
    ``F = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp + 1e-8)``, ``L = 1 - mean F``. Sums run over the
    batch per class and F is averaged over classes (``average="macro"``), or over all entries (``"micro"``).
    With saturated logits this is exactly 1 - F-beta at threshold 0.5 (a class with no positives and
    no predictions scores 0, like torchmetrics' default).
    """

    multilabel: bool = True

    def __init__(self, num_classes: int, beta: float = 1.0, eta: float = 0.0, slope: float = 1.0,
                 average: str = "macro") -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta={beta} must be > 0 (1 gives F1), e.g. beta=1.0")
        if slope <= 0:
            raise ValueError(f"slope={slope} must be > 0, e.g. slope=1.0")
        if average not in ("macro", "micro"):
            raise ValueError(f"average={average!r}: use 'macro' or 'micro'")
        self.num_classes, self.beta, self.eta, self.slope, self.average = num_classes, beta, eta, slope, average

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        s = torch.sigmoid(self.slope * (logits.float() - self.eta))
        y = multi_hot(targets, self.num_classes)
        dims = 0 if self.average == "macro" else (0, 1)
        tp, fp, fn = (s * y).sum(dims), (s * (1 - y)).sum(dims), ((1 - s) * y).sum(dims)
        b2 = self.beta**2
        f_beta = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + 1e-8)
        return 1.0 - f_beta.mean()

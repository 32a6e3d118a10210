"""Pseudo-Label (Lee, ICML 2013 Workshop on Challenges in Representation Learning, "Pseudo-Label:
The Simple and Efficient Semi-Supervised Learning Method for Deep Neural Networks")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import (RAMPUP_STEPS_40_PERCENT, confident_pseudo_labels, masked_accuracy,
                                          masked_cross_entropy)


class PseudoLabel(SemiSupervisedModule):
    """The model's own hard predictions on unlabeled images serve as their labels.

    Loss: ``L = L_s + alpha(t) * 1/(mu B) sum_b 1[max p_b >= tau] CE(argmax p_b, p(y | weak(u_b)))``
    with ``p_b = softmax(logits(weak(u_b)))`` taken from the same forward, no gradient through the
    target ``argmax p_b`` (the prediction itself keeps its gradient).

    ``alpha(t)``: Lee ramps it linearly from 0 at epoch T1 to alpha_f at epoch T2. Here the
    base's ``rampup="linear"`` ramps ``unlabeled_loss_weight`` from 0 at step 0 to its full value
    at ``rampup_steps`` (T1 = 0, T2 = ``rampup_steps``); a delayed start is not offered.
    The threshold ``tau`` is not in Lee's paper (``threshold=0`` keeps every pseudo-label, as he
    does); 0.95 is the modern benchmarks' (TorchSSL / USB) choice.

    Recipe behind the reference numbers (TorchSSL, CIFAR-10, WRN-28-2, 4000 labels, 15.08 % error),
    the defaults here: tau = 0.95, lambda_u = 1 (TorchSSL ``pseudolabel.py`` lines 297-298), linear
    ramp over the first 40 % of 2^20 steps (419,430; pass ``rampup_steps`` for shorter runs),
    mu = 1, B = 64, SGD lr 0.03 Nesterov momentum 0.9, weight decay 5e-4, cosine 7/16, EMA 0.999;
    weak = flip + crop.

    Args:
        threshold: confidence threshold tau.
        unlabeled_loss_weight, rampup, rampup_steps: alpha_f and its ramp, i.e. alpha(t) (defaults above).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak",)

    def __init__(self, threshold: float = 0.95, unlabeled_loss_weight: float = 1.0, rampup: str | None = "linear",
                 rampup_steps: int = RAMPUP_STEPS_40_PERCENT, **kwargs: Any) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = threshold

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pseudo_labels, confidence_mask = confident_pseudo_labels(logits["weak"], self.threshold)
        return {
            "unlabeled_loss": masked_cross_entropy(logits["weak"], pseudo_labels, confidence_mask),
            "mask_ratio": confidence_mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], confidence_mask),
        }

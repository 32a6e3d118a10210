"""FixMatch (Sohn et al., NeurIPS 2020, "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import confident_pseudo_labels, masked_accuracy, masked_cross_entropy


class FixMatch(SemiSupervisedModule):
    """Pseudo-labels from the weak view supervise the strong view where the model is confident.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b 1[max q_b >= tau] CE(argmax q_b, p(y | strong(u_b)))``
    with ``q_b = softmax(logits(weak(u_b)) / T)``, no gradient through ``q_b``.

    Paper recipe (CIFAR-10, WRN-28-2): tau = 0.95, lambda_u = 1, mu = 7 (``--data.uratio``),
    B = 64, SGD lr 0.03 Nesterov momentum 0.9, weight decay 5e-4 (1e-3 on CIFAR-100 with
    WRN-28-8), cosine 7/16 schedule over 2^20 steps, EMA 0.999 for evaluation; weak = flip +
    12.5 % translation, strong = RandAugment (2 ops, random magnitude) + Cutout.

    Args:
        threshold: confidence threshold tau.
        temperature: softmax temperature T of the pseudo-label distribution.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "strong")
    target_views = ("weak",)  # pseudo-labels only, detached: no_grad_target_views may forward it without gradient

    def __init__(self, threshold: float = 0.95, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold, self.temperature = threshold, temperature

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pseudo_labels, confidence_mask = confident_pseudo_labels(logits["weak"], self.threshold, self.temperature)
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, confidence_mask),
            "mask_ratio": confidence_mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], confidence_mask),
        }

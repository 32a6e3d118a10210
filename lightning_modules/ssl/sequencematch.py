"""SequenceMatch (Nguyen, WACV 2024, "SequenceMatch: Revisiting the design of weak-strong augmentations for
Semi-supervised learning"), as USB runs it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.ssl.flexmatch import FlexMatch
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy

KL_TARGETS = ("sharpened", "usb")


class SequenceMatch(FlexMatch):
    """FlexMatch with a medium view between the weak and the strong one, and KL terms along the sequence.

    With ``w, m, s`` the weak, medium and strong views of ``u_b``, ``q_b = softmax(logits(w))`` (no gradient),
    FlexMatch's mask ``M_b = 1[max q_b > T_{argmax q_b}]`` (its per-sample memory, :class:`FlexMatch`) and
    ``t(v) = softmax(logits(v) / T)`` the sharpened prediction of view ``v`` (no gradient):

        ``L = L_s + lambda_u 1/(mu B) sum_b M_b [CE(argmax q_b, p(y | s)) + KL(t(w) || p(y | m))
        + KL(t(m) || p(y | s)) + KL(t(w) || p(y | s))]``.

    The medium view bridges the gap between weak and strong: each view learns from the one just weaker than it,
    and the strong one also from the weak one.

    The default target is the sharpened prediction, ``t(v) = Sharpen(p(y | v), T)``; USB's code differs (as in
    ReFixMatch, by the same author: docs/ssl_references.md): it takes ``softmax(p(y | v) / T)`` of the
    *probabilities* (``semilearn/algorithms/sequencematch/sequencematch.py`` lines 108, 113, 118), which
    flattens instead of sharpening, so its KL terms pull the confident samples towards uniform predictions.
    ``kl_target="usb"`` keeps USB's computation. The student side is ``log softmax(logits)`` at T = 1 in both
    (USB lines 107, 112, 117).

    Against the authors' code (USB ``sequencematch.py`` lines 59-122: one forward over labeled, weak, medium
    and strong images (``use_cat``), FlexMatch's thresholding hook on the detached weak probabilities, hard
    labels, each KL summed over classes, weighted by the mask, averaged over the batch, and
    ``sup + lambda_u * (unsup + mw + sm + sw)``), pinned by ``tests/lightning_modules/ssl/test_crmatch_sequencematch.py``.
    The mask is our FlexMatch's (strict ``>``, the memory synchronized across ranks; see :class:`FlexMatch`).
    USB's ``train_step`` as published returns an undefined ``feat_dict`` (line 124), so it stops at its first
    step; the loss above is its lines 80-122. The medium view is one RandAugment op plus Cutout, USB's
    ``RandAugment(1, 5)`` (``datasets/cv_datasets/cifar.py`` lines 42-49), drawn by the DataModule.

    Paper recipe as USB runs it (CIFAR-10, WRN-28-2, ``config/classic_cv/sequencematch/*.yaml``): tau = 0.95,
    threshold warm-up, hard labels, T = 0.5, lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay
    5e-4, cosine 7/16 over 2^20 steps, EMA 0.999.

    State: FlexMatch's ``memory`` buffer (per unlabeled sample), proposed in the loss and committed once per
    optimizer step.

    Args:
        threshold: tau, the upper limit of FlexMatch's per-class thresholds.
        kl_temperature: T of the KL targets.
        kl_target: ``"sharpened"``, ``softmax(logits / T)``, or ``"usb"``, ``softmax(probabilities / T)``.
        threshold_warmup, num_unlabeled, **kwargs: :class:`FlexMatch` arguments.
    """

    unlabeled_views = ("weak", "medium", "strong")
    target_views = ("weak",)  # a detached target only (the medium view is a target and a prediction)

    def __init__(self, threshold: float = 0.95, kl_temperature: float = 0.5, kl_target: str = "sharpened",
                 threshold_warmup: bool = True, num_unlabeled: int | None = None, **kwargs: Any) -> None:
        if kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be positive, got {kl_temperature}")
        if kl_target not in KL_TARGETS:
            raise ValueError(f"kl_target must be 'sharpened' (softmax of the logits / T) or 'usb' (USB's softmax of "
                             f"the probabilities / T), got {kl_target!r}")
        super().__init__(threshold=threshold, threshold_warmup=threshold_warmup, num_unlabeled=num_unlabeled, **kwargs)
        self.kl_temperature, self.kl_target = kl_temperature, kl_target

    def sequence_kl(self, logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mean_b M_b KL(t(target) || softmax(logits))``, ``t`` the detached target of ``kl_target``."""
        scores = target_logits.detach().float()
        if self.kl_target == "usb":
            scores = torch.softmax(scores, dim=1)
        targets = torch.softmax(scores / self.kl_temperature, dim=1)
        kl = F.kl_div(torch.log_softmax(logits.float(), dim=1), targets, reduction="none").sum(dim=1)
        return (kl * mask).mean()

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flex = self.flexible_mask(logits["weak"], batch["index"])
        pseudo_labels, mask = flex["pseudo_labels"], flex["mask"]
        weak, medium, strong = logits["weak"], logits["medium"], logits["strong"]
        consistency = masked_cross_entropy(strong, pseudo_labels, mask)
        medium_weak = self.sequence_kl(medium, weak, mask)
        strong_medium = self.sequence_kl(strong, medium, mask)
        strong_weak = self.sequence_kl(strong, weak, mask)
        return {
            "unlabeled_loss": consistency + medium_weak + strong_medium + strong_weak,
            "consistency_loss": consistency.detach(),
            "kl_medium_weak": medium_weak.detach(),
            "kl_strong_medium": strong_medium.detach(),
            "kl_strong_weak": strong_weak.detach(),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
            "mean_threshold": flex["thresholds"].mean(),
        }

"""Unbiased Teacher (Liu et al., ICLR 2021, "Unbiased Teacher for Semi-Supervised Object Detection")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import box_iou

from lightning_modules.detection.detector import Detector

#: the student's loss terms kept on pseudo-labels: classification only (RPN objectness and RoI classes)
CLASSIFICATION_TERMS = ("loss_classifier", "loss_objectness")


class UnbiasedTeacher(Detector):
    """Confident teacher detections on the weak view train the student's classifiers on the strong view.

    Loss: ``L = L_s + lambda_u * (L_obj + L_cls)(student(strong(u)), P)``, with the pseudo-labels
    ``P = {(b, c) in teacher(weak(u)) : score >= delta}`` (boxes and classes after the teacher's
    NMS) and no gradient through ``P``. The box-regression terms of the unlabeled pass (RPN and
    RoI head) are dropped: a confidence score says nothing about how well a box is placed, so
    regressing towards pseudo boxes would teach their errors. Images without a pseudo box still
    count, as all background.

    The teacher is the base's evaluation EMA (``self.ema.module``), run in eval mode under
    ``no_grad``; the views share their geometry, so pseudo boxes apply to the strong view as they
    are. During ``burn_in_steps`` the student trains on labeled data only; when burn-in ends the
    teacher is reset to the student's weights (the paper copies the burned-in detector).

    Paper recipe (COCO-standard, Faster R-CNN ResNet-50 FPN from ImageNet weights), the defaults
    here: delta = 0.7, lambda_u = 4, EMA decay 0.9996, burn-in 2000 steps (the authors'
    ``configs/coco_supervision/faster_rcnn_R_50_FPN_sup1_run1.yaml`` lines 32-36: BBOX_THRESHOLD,
    BURN_UP_STEP, EMA_KEEP_RATE, UNSUP_LOSS_WEIGHT), 32 labeled + 32 unlabeled images,
    lr 0.01, 180k steps; weak = flip, strong = colour jitter, grayscale, blur and cutout. The
    paper's focal loss in the RoI classifier (its class-balance answer to pseudo-label bias) is
    not included: torchvision's cross-entropy is used.

    Args:
        score_threshold: delta, the teacher score a detection needs to become a pseudo-label.
        burn_in_steps: optimizer steps of supervised training before the unlabeled loss starts
            (0 uses it from the first step, when the teacher is still the random initialization).
        unlabeled_loss_weight: lambda_u.
        ema_decay: the teacher's EMA decay; it must not be ``None``.
        **kwargs: :class:`Detector` arguments.
    """

    unlabeled_views = ("weak", "strong")

    def __init__(self, score_threshold: float = 0.7, burn_in_steps: int = 2000, unlabeled_loss_weight: float = 4.0,
                 ema_decay: float | None = 0.9996, **kwargs: Any) -> None:
        if ema_decay is None:
            raise ValueError(f"{type(self).__name__} needs ema_decay (a decay in (0, 1), not null): its teacher is the EMA of the student")
        if burn_in_steps < 0:
            raise ValueError(f"burn_in_steps must be >= 0, got {burn_in_steps}")
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, ema_decay=ema_decay, **kwargs)

    @property
    def teacher(self) -> nn.Module:
        return self.ema.module

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if 0 < self.hparams.burn_in_steps == self.global_step:
            self.teacher.load_state_dict(self.net.state_dict())

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(batch)
        unlabeled = batch.get("unlabeled")
        if unlabeled is None or self.global_step < self.hparams.burn_in_steps:
            return losses
        return {**losses, **self.unlabeled_losses(unlabeled)}

    def unlabeled_losses(self, unlabeled: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"unlabeled_loss": ..., "unlabeled_<term>": ..., <pseudo-label stats>}`` of one unlabeled batch;
        the seam a teacher-student detector that trains otherwise on the same views overrides (SoftTeacher)."""
        with torch.no_grad():
            detections = self.teacher.eval()(unlabeled["weak"])
        targets = pseudo_labels(detections, self.hparams.score_threshold)
        unlabeled_terms = classification_terms(self.net(unlabeled["strong"], targets))
        losses = {"unlabeled_loss": sum(unlabeled_terms.values())}
        losses.update({f"unlabeled_{k}": v for k, v in unlabeled_terms.items()})
        losses.update(pseudo_label_stats(targets, unlabeled.get("target")))
        return losses


def pseudo_labels(detections: list[dict[str, torch.Tensor]], threshold: float) -> list[dict[str, torch.Tensor]]:
    """Targets from the detections scoring at least ``threshold``: boxes, labels, their scores,
    and masks (binarized at 0.5, uint8) when the detector predicts masks (Mask R-CNN needs them
    in its training targets even though their loss is not used)."""
    targets = []
    for item in detections:
        keep = item["scores"] >= threshold
        target = {"boxes": item["boxes"][keep].detach(), "labels": item["labels"][keep],
                  "scores": item["scores"][keep].detach()}
        if "masks" in item:
            target["masks"] = (item["masks"][keep][:, 0] >= 0.5).to(torch.uint8)
        targets.append(target)
    return targets


def classification_terms(loss_terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The RPN objectness and RoI classification losses; box regression (and mask) terms are dropped."""
    return {name: loss_terms[name] for name in CLASSIFICATION_TERMS}


def pseudo_label_stats(pseudo: list[dict[str, torch.Tensor]],
                       truth: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """``pseudo_boxes_per_image``, and ``pseudo_label_precision``: the fraction of pseudo boxes with a
    true box of the same label at IoU >= 0.5 (any such box; not a one-to-one matching). Precision is
    left out when there is no pseudo box or no annotation to compare with."""
    count = sum(len(p["boxes"]) for p in pseudo)
    device = pseudo[0]["boxes"].device if pseudo else None
    stats = {"pseudo_boxes_per_image": torch.tensor(count / max(len(pseudo), 1), device=device)}
    if truth is None or count == 0:
        return stats
    correct = sum(_matched(p, t).sum() for p, t in zip(pseudo, truth))
    stats["pseudo_label_precision"] = correct.float() / count
    return stats


def _matched(pseudo: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> torch.Tensor:
    if len(pseudo["boxes"]) == 0 or len(truth["boxes"]) == 0:
        return torch.zeros(len(pseudo["boxes"]), dtype=torch.bool, device=pseudo["boxes"].device)
    overlap = box_iou(pseudo["boxes"], truth["boxes"].to(pseudo["boxes"].device)) >= 0.5
    same_label = pseudo["labels"][:, None] == truth["labels"].to(pseudo["labels"].device)[None, :]
    return (overlap & same_label).any(dim=1)

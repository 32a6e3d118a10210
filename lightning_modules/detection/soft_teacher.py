"""Soft Teacher (Xu et al., ICCV 2021, "End-to-End Semi-Supervised Object Detection with Soft Teacher")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from lightning_modules.detection.soft_teacher_losses import (background_weighted_cross_entropy, box_uncertainty,
                                                              jittered_boxes)
from lightning_modules.detection.unbiased_teacher import UnbiasedTeacher, pseudo_label_stats, pseudo_labels

Targets = list[dict[str, torch.Tensor]]


class SoftTeacher(UnbiasedTeacher):
    """An EMA teacher on the weak views pseudo-labels the strong views; its background scores weight the
    student's R-CNN classification loss, and box jittering picks the pseudo boxes worth regressing to.

    Loss: ``L = L_s + lambda_u * (L_obj + L_rpn_box + L_cls^soft + L_box)`` on the unlabeled images, where

    - the teacher's detections (after its NMS) scoring above ``box_score_threshold`` (0.5) are candidates;
      those above ``score_threshold`` (0.9) are the pseudo boxes of the RPN (objectness and box) and of
      the R-CNN classifier;
    - ``L_cls^soft = sum_i w_i CE(s_i, y_i) / max(sum_i w_i, 1)`` over the student's sampled proposals,
      ``w_i = 1`` on foreground, ``w_i = p_teacher(bg | i)`` on background, the teacher's box head run on
      the same proposals in its own view (:func:`~.soft_teacher_losses.background_weighted_cross_entropy`);
    - ``L_box`` is torchvision's R-CNN smooth-L1 towards the candidates whose box uncertainty is below
      ``box_uncertainty_threshold`` (0.02): each candidate jittered ``jitter_times`` (10) times by
      ``N(0, (jitter_scale * side)^2)`` per coordinate (0.06), refined by the teacher's box head, and the
      std of the refined boxes of its class over the jitters, over its width/height, averaged over the
      4 coordinates (:func:`~.soft_teacher_losses.box_uncertainty`).

    The cls and box terms sample proposals separately from the same RPN output, as the authors' do
    (``ssod/models/soft_teacher.py``: ``unsup_rcnn_cls_loss`` lines 182-258 samples for the class
    pseudo boxes; ``unsup_rcnn_reg_loss`` lines 260-294 runs the RoI head again on the reliable ones).
    No gradient reaches the teacher: it runs under ``no_grad`` in eval mode.

    torchvision's ``RoIHeads`` returns only the mean losses, so the student's unlabeled pass is driven
    step by step through the model's public parts (transform, backbone, RPN, ``select_training_samples``,
    the box head, ``fastrcnn_loss``): the weighted loss needs the per-proposal cross-entropy and the
    sampled proposals, on which the teacher is run. The views share their geometry, but pseudo boxes and
    proposals are still mapped between the two resized frames (the authors' transform matrices).

    Paper recipe (COCO, Faster R-CNN ResNet-50 FPN, ImageNet weights; the authors'
    ``configs/soft_teacher/base.py`` lines 242-262), the defaults here: score thresholds 0.9 (RPN and
    classification, ``rpn_pseudo_threshold``, ``cls_pseudo_threshold``) over the initial 0.5
    (``pseudo_label_initial_score_thr``), uncertainty 0.02, 10 jitters at scale 0.06, lambda_u = 4,
    EMA momentum 0.999 ramped up as ``min(0.999, 1 - 1/(t+1))`` (``MeanTeacher`` hook, ``warm_up=0``:
    ``ema_warmup_power = 1``), no burn-in (end to end), SGD lr 0.01, 180k steps of 8 labeled + 32
    unlabeled images (``sample_ratio=[1, 4]``). Differences: the strong view here is photometric with
    cutout only (the authors' adds scale jitter and affine transforms, whose boxes they map by matrix);
    torchvision's smooth-L1 and cross-entropy losses rather than mmdetection's L1; Faster R-CNN only
    (Mask R-CNN's RoI heads demand target masks, which pseudo boxes do not have).

    Args:
        score_threshold: the teacher score above which a detection is a pseudo box of the RPN and the classifier.
        box_score_threshold: the score above which a detection is a candidate for the box-regression loss.
        box_uncertainty_threshold: the largest box uncertainty of a regression pseudo box.
        jitter_times, jitter_scale: jitters per candidate and their scale (a fraction of the box side).
        burn_in_steps: supervised steps before the unlabeled loss (0: end to end, the paper's).
        unlabeled_loss_weight: lambda_u.
        ema_decay: the teacher's EMA momentum.
        ema_warmup_power: its ramp ``min(decay, 1 - (1 + t) ** -power)``; ``None`` for a constant decay.
        **kwargs: :class:`~lightning_modules.detection.detector.Detector` arguments.
    """

    def __init__(self, score_threshold: float = 0.9, box_score_threshold: float = 0.5,
                 box_uncertainty_threshold: float = 0.02, jitter_times: int = 10, jitter_scale: float = 0.06,
                 burn_in_steps: int = 0, unlabeled_loss_weight: float = 4.0, ema_decay: float | None = 0.999,
                 ema_warmup_power: float | None = 1.0, **kwargs: Any) -> None:
        if jitter_times < 2:
            raise ValueError(f"jitter_times must be >= 2 (the uncertainty is a std over jitters), got {jitter_times}")
        if not 0.0 <= box_score_threshold <= score_threshold:
            raise ValueError(f"box_score_threshold ({box_score_threshold}) must lie in [0, score_threshold "
                             f"({score_threshold})]: the candidates of both losses come from the first")
        if kwargs.get("network", "fasterrcnn_resnet50_fpn").startswith("maskrcnn"):
            raise ValueError("SoftTeacher trains Faster R-CNN (the paper's detector): Mask R-CNN's RoI heads need "
                             "target masks, which pseudo boxes do not have; use a fasterrcnn_* network")
        super().__init__(score_threshold=score_threshold, burn_in_steps=burn_in_steps,
                         unlabeled_loss_weight=unlabeled_loss_weight, ema_decay=ema_decay, **kwargs)
        self.ema.warmup_power = ema_warmup_power

    def unlabeled_losses(self, unlabeled: dict[str, Any]) -> dict[str, torch.Tensor]:
        hp = self.hparams
        with torch.no_grad():
            teacher_view, detections = self.teacher_detections(unlabeled["weak"])
        rpn_targets = pseudo_labels(detections, hp.score_threshold)
        box_targets = [{"boxes": d["boxes"][reliable], "labels": d["labels"][reliable]}
                       for d in detections for reliable in [d["uncertainty"] < hp.box_uncertainty_threshold]]
        net = self.net
        images, _ = net.transform(unlabeled["strong"])
        sizes = [tuple(image.shape[-2:]) for image in unlabeled["strong"]]
        to_student = lambda targets: [dict(t, boxes=resize_boxes(t["boxes"], size, new_size))  # noqa: E731
                                      for t, size, new_size in zip(targets, sizes, images.image_sizes)]
        features = net.backbone(images.tensors)
        proposals, rpn_losses = net.rpn(images, features, to_student(rpn_targets))

        heads = net.roi_heads
        sampled, _, labels, _ = heads.select_training_samples(proposals, to_student(rpn_targets))
        class_logits, _ = box_outputs(heads, features, sampled, images.image_sizes)
        with torch.no_grad():  # the teacher's background probability on the same proposals, in its own frame
            in_teacher = [resize_boxes(b, s, t) for b, s, t in zip(sampled, images.image_sizes, teacher_view[0])]
            teacher_logits, _ = box_outputs(self.teacher.roi_heads, teacher_view[1], in_teacher, teacher_view[0])
            background = teacher_logits.softmax(dim=-1)[:, 0]
        loss_classifier = background_weighted_cross_entropy(class_logits, torch.cat(labels), background)

        sampled, _, labels, regression_targets = heads.select_training_samples(proposals, to_student(box_targets))
        class_logits, box_regression = box_outputs(heads, features, sampled, images.image_sizes)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

        terms = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        losses = {"unlabeled_loss": sum(terms.values()), **{f"unlabeled_{k}": v for k, v in terms.items()}}
        losses.update(pseudo_label_stats(rpn_targets, unlabeled.get("target")))
        count = sum(len(t["boxes"]) for t in box_targets)
        losses["reliable_boxes_per_image"] = torch.tensor(count / max(len(box_targets), 1), device=self.device)
        return losses

    def teacher_detections(self, images: list[torch.Tensor]) -> tuple[tuple[list, dict], Targets]:
        """The teacher's detections above ``box_score_threshold`` in input pixels, with ``scores``, ``labels``
        and ``uncertainty``; and its resized frame (image sizes, features) for the background scores."""
        teacher = self.teacher.eval()
        view, _ = teacher.transform(images)
        features = teacher.backbone(view.tensors)
        proposals, _ = teacher.rpn(view, features)
        heads = teacher.roi_heads
        class_logits, box_regression = box_outputs(heads, features, proposals, view.image_sizes)
        boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, view.image_sizes)
        keep = [image_scores > self.hparams.box_score_threshold for image_scores in scores]
        boxes, scores, labels = ([x[k] for x, k in zip(xs, keep)] for xs in (boxes, scores, labels))
        uncertainty = self.jitter_uncertainty(features, boxes, labels, view.image_sizes)
        detections = [{"boxes": resize_boxes(b, size, tuple(image.shape[-2:])), "labels": c, "scores": p,
                       "uncertainty": u}
                      for b, c, p, u, size, image in zip(boxes, labels, scores, uncertainty, view.image_sizes, images)]
        return (view.image_sizes, features), detections

    def jitter_uncertainty(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                           labels: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Box uncertainty of the teacher's boxes of each image (in its resized frame): one box-head pass
        over every image's jitters (the pooler reads the scales off the whole batch's sizes)."""
        times = self.hparams.jitter_times
        jittered = [jittered_boxes(b, times, self.hparams.jitter_scale).reshape(-1, 4) for b in boxes]
        heads = self.teacher.roi_heads
        _, box_regression = box_outputs(heads, features, jittered, sizes)
        classes = box_regression.shape[-1] // 4
        refined = heads.box_coder.decode(box_regression, jittered).split([len(j) for j in jittered])
        return [box_uncertainty(box_ops.clip_boxes_to_image(r, size).reshape(times, len(b), classes, 4), c)
                for r, b, c, size in zip(refined, boxes, labels, sizes)]


def box_outputs(heads: nn.Module, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (N, C) and box deltas (N, 4C) of torchvision's R-CNN box head on the given boxes."""
    return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, image_sizes)))

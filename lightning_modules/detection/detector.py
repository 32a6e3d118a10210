"""Object detection and instance segmentation (torchvision's R-CNN family): the training core given the detection task.

``Detector`` trains a torchvision Faster R-CNN or Mask R-CNN built by name, offline by default
(``weights=None``, ``weights_backbone=None``), with :class:`~lightning_modules.detection.task.DetectionTask`
(torchvision's own loss terms, mAP, detections). Everything that is not detection-specific (SGD and the
cosine schedule, the EMA copy used for evaluation, logging) is the task-neutral core's
(:class:`~lightning_modules.core.training_module.TrainingModule`); semi-supervised detectors
(:mod:`lightning_modules.detection.unbiased_teacher`) subclass it.

Batches are the contract's detection batches (:mod:`lightning_modules.core.batch`), as
:class:`datamodules.COCODetection` makes them: training ``{"labeled": {"image": [(3, H, W) floats in
[0, 1]], "target": [{"boxes" xyxy, "labels" (1..K, 0 = background), "masks" (Mask R-CNN), "image_id"}],
"index", "image_id"}, "unlabeled": {...}}``, evaluation ``{"image": [...], "target": [...], "index", "image_id"}``.

Metrics: torchmetrics' ``MeanAveragePrecision`` (COCO mAP@[.5:.95], box and, for Mask R-CNN,
mask) with the ``faster_coco_eval`` backend (pip package ``faster-coco-eval``), scored on as many
detections per image as the network keeps (``detections_per_img``; COCO's 100 is reported beside
when it keeps more), per class under the category's name when the DataModule names them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.core.task import accept_retired_arguments
from lightning_modules.core.training_module import TrainingModule
from lightning_modules.detection.metrics import detection_metric, map_summary, metric_inputs
from lightning_modules.detection.networks import build_detection_network, load_network_weights
from lightning_modules.detection.task import DetectionTask

#: arguments of the classification base that Detector had until 2026-12-02, at the values its checkpoints hold
RETIRED = {"criterion": "ce", "criterion_kwargs": None, "rdrop_weight": 0.0}
# the metric's helpers lived here until 2026-12-02 (now detection/metrics.py): still importable from here
__all__ = ["Detector", "detection_metric", "map_summary", "metric_inputs"]


class Detector(TrainingModule):
    """A torchvision Faster R-CNN / Mask R-CNN trained on labeled images.

    Loss: torchvision's sum ``L = L_cls + L_box + L_obj + L_rpn_box (+ L_mask)`` (RoI-head
    cross-entropy and smooth-L1, RPN binary cross-entropy and smooth-L1, per-pixel mask BCE;
    :mod:`lightning_modules.detection.task`).

    Args:
        network: one of :data:`lightning_modules.detection.networks.NETWORKS`.
        num_classes: classes including background (linked from the data by ``train.py``).
        weights, weights_backbone: torchvision weight names (``"DEFAULT"``, ``"COCO_V1"``, ...);
            ``None`` (default) trains from scratch offline.
        weights_path: a local state_dict (or a Lightning checkpoint) of the same network.
        anchor_sizes: one list of sizes per feature map (5 for ResNet-50 FPN, 3 for MobileNet).
        aspect_ratios: anchor aspect ratios, the same on every map.
        roi_pool: ``"align"`` (RoIAlign, default) or ``"pool"`` (Fast R-CNN's RoI max pooling) for the
            box head; Mask R-CNN's mask head keeps RoIAlign.
        min_size, max_size: the model's resize of the shorter / longer image side.
        rpn_kwargs: RPN settings (``pre_nms_top_n_train``, ``nms_thresh``, ``batch_size_per_image``, ...).
        roi_heads_kwargs: RoI-head settings (``score_thresh``, ``nms_thresh``, ``detections_per_img``, ...).
        network_kwargs: other builder arguments (e.g. ``trainable_backbone_layers``).
        map_backend: ``"faster_coco_eval"`` or ``"pycocotools"`` for the mAP metric.
        log_images: how many validation images to log with predicted (red) and true (green) boxes.
        lr, weight_decay, nesterov: SGD as in torchvision's detection reference recipe (lr 0.01 here
            for small batches, weight decay 1e-4, plain momentum).
        **kwargs: the core's other optimizer and EMA arguments.
    """

    trains_through_forward_views = False  # torchvision's model computes the losses: compile acts nowhere here

    def __init__(
        self,
        network: str = "fasterrcnn_resnet50_fpn",
        num_classes: int = 91,
        weights: str | None = None,
        weights_backbone: str | None = None,
        weights_path: str | None = None,
        anchor_sizes: list[list[int]] | None = None,
        aspect_ratios: list[float] | None = None,
        roi_pool: str = "align",
        min_size: int = 800,
        max_size: int = 1333,
        rpn_kwargs: dict[str, Any] | None = None,
        roi_heads_kwargs: dict[str, Any] | None = None,
        network_kwargs: dict[str, Any] | None = None,
        map_backend: str = "faster_coco_eval",
        log_images: int = 4,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        **kwargs: Any,
    ) -> None:
        accept_retired_arguments(kwargs, RETIRED, type(self).__name__)
        super().__init__(num_classes=num_classes, network=network, network_kwargs=network_kwargs, lr=lr,
                         weight_decay=weight_decay, nesterov=nesterov, **kwargs)

    def build_net(self) -> nn.Module:
        hp = self.hparams
        net = build_detection_network(
            hp.network, hp.num_classes, weights=hp.weights, weights_backbone=hp.weights_backbone,
            anchor_sizes=hp.anchor_sizes, aspect_ratios=hp.aspect_ratios, roi_pool=hp.roi_pool,
            rpn_kwargs=hp.rpn_kwargs, roi_heads_kwargs=hp.roi_heads_kwargs, min_size=hp.min_size,
            max_size=hp.max_size, **(hp.network_kwargs or {}))
        if hp.weights_path is not None:
            load_network_weights(net, hp.weights_path)
        return net

    def build_task(self) -> DetectionTask:
        limit = self.net.roi_heads.detections_per_img  # score every detection the network keeps
        return DetectionTask(self.with_masks, self.hparams.map_backend, limit, self.hparams.log_images)

    @property
    def with_masks(self) -> bool:
        return self.hparams.network.startswith("maskrcnn")

    @property
    def has_trained_weights(self) -> bool:
        """Built from trained weights (torchvision's ``weights`` or ``weights_path``): train.py then
        evaluates it without ``--ckpt_path``."""
        return self.hparams.weights is not None or self.hparams.weights_path is not None

    # --- training --------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"labeled_loss": sum, "loss_classifier": ..., "loss_box_reg": ..., ...}`` on the labeled images."""
        labeled = batch["labeled"]
        terms = self.net(labeled["image"], labeled["target"])
        return {"labeled_loss": self.labeled_loss(terms, labeled["target"]), **terms}

    def labeled_batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["labeled"]["image"])

    # --- evaluation: the task's (detection/task.py) ----------------------------------------
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections of the evaluation (EMA) network: boxes, labels, scores (and mask probabilities)."""
        return self.task.detect(self.eval_net, images)

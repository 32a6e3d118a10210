"""Object detection and instance segmentation (torchvision's R-CNN family) on the shared base.

``Detector`` trains a torchvision Faster R-CNN or Mask R-CNN built by name, offline by default
(``weights=None``, ``weights_backbone=None``). Everything that is not detection-specific (SGD
and the cosine schedule, the EMA copy used for evaluation, logging) is the classification
base's; semi-supervised detectors (:mod:`lightning_modules.detection.unbiased_teacher`) subclass it.

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

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from lightning_modules.core.class_keys import class_keys
from lightning_modules.detection.networks import build_detection_network, load_network_weights
from lightning_modules.detection.overlays import log_detections
from lightning_modules.core.semi_supervised import SemiSupervisedModule

MAP_SUMMARY = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
COCO_MAX_DETECTIONS = 100  # COCO's limit per image; crowded images (the membrane cells) hold more objects


def detection_metric(with_masks: bool, backend: str = "faster_coco_eval",
                     max_detections: int = COCO_MAX_DETECTIONS) -> MeanAveragePrecision:
    """COCO-style mAP with per-class AP, for boxes and (Mask R-CNN) masks, on up to ``max_detections``
    per image (give the network's ``detections_per_img``: a lower limit would score a detector that
    finds every object of a crowded image below 1). Above COCO's 100 the limits are (10, 100,
    ``max_detections``), and the extended summary keeps the precision table that AP at 100 is read from.
    """
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    beyond = max_detections > COCO_MAX_DETECTIONS
    thresholds = [10, COCO_MAX_DETECTIONS, max_detections] if beyond else [1, 10, COCO_MAX_DETECTIONS]
    return MeanAveragePrecision(iou_type=("bbox", "segm") if with_masks else "bbox", class_metrics=True,
                                backend=backend, max_detection_thresholds=thresholds, extended_summary=beyond)


def metric_inputs(detections: list[dict[str, torch.Tensor]], with_masks: bool) -> list[dict[str, torch.Tensor]]:
    """Predictions or targets as the metric wants them: masks boolean (N, H, W), probabilities cut at 0.5.

    Targets keep ``iscrowd`` and ``area`` when the data gives them, so crowd regions are matched as
    COCO does (never counted as missed objects) and object sizes follow the json's areas.
    """
    inputs = []
    for item in detections:
        entry = {k: item[k] for k in ("boxes", "labels", "scores", "iscrowd", "area") if k in item}
        if with_masks:
            masks = item["masks"][:, 0] if item["masks"].ndim == 4 else item["masks"]
            entry["masks"] = masks > 0.5 if masks.is_floating_point() else masks.bool()
        inputs.append(entry)
    return inputs


def map_summary(values: dict[str, torch.Tensor], with_masks: bool,
                max_detection_thresholds: Sequence[int] = (1, 10, COCO_MAX_DETECTIONS),
                label_keys: Sequence[str] | None = None) -> dict[str, torch.Tensor | float]:
    """``map``, ``map_50``, ..., ``mar_100``, ``ap_<class>`` (masks: ``segm_`` prefix).

    All are scored on the metric's last detection limit. Above COCO's 100, ``mar_<limit>`` and
    ``map_maxdets100`` (AP at 100 detections per image) come too, and ``map``, ``map_maxdets100``
    and per-class AP are read from the precision table as COCO's summary reads it: pycocotools'
    summary takes its overall AP at a fixed 100 whatever the limits. Per-class AP is
    ``ap_<label_keys[label]>`` (:func:`lightning_modules.core.class_keys.class_keys`), ``ap_class<label>``
    without names. -1 (no such objects) is dropped, except for ``map`` itself.
    """
    thresholds = list(max_detection_thresholds)
    recalls = tuple(f"mar_{t}" for t in thresholds if t >= COCO_MAX_DETECTIONS)
    summary: dict[str, torch.Tensor | float] = {}
    for iou_type, prefix in (("bbox", ""), ("segm", "segm_"))[: 2 if with_masks else 1]:
        source = f"{iou_type}_" if with_masks else ""
        for name in MAP_SUMMARY + recalls:
            if name == "map" or values[source + name] >= 0:
                summary[prefix + name] = values[source + name]
        per_class = values[source + "map_per_class"].reshape(-1).tolist()
        table = values.get(source + "precision")  # (IoU, recall, class, area, limit); area 0 is "all"
        if thresholds[-1] > COCO_MAX_DETECTIONS and table is not None:
            summary[prefix + "map"] = _coco_mean(table[:, :, :, 0, -1])
            summary[prefix + "map_maxdets100"] = _coco_mean(table[:, :, :, 0, thresholds.index(COCO_MAX_DETECTIONS)])
            per_class = [float(_coco_mean(table[:, :, k, 0, -1])) for k in range(table.shape[2])]
        for label, ap in zip(values["classes"].reshape(-1).tolist(), per_class):
            if ap >= 0:
                name = label_keys[label] if label_keys is not None and 0 <= label < len(label_keys) else f"class{label}"
                summary[f"{prefix}ap_{name}"] = ap
    return summary


def _coco_mean(precision: torch.Tensor) -> torch.Tensor:
    """COCO's summary of a precision table: the mean of its defined entries (-1 marks none), else -1."""
    defined = precision[precision > -1]
    return (defined.mean() if defined.numel() else torch.tensor(-1.0)).float()


class Detector(SemiSupervisedModule):
    """A torchvision Faster R-CNN / Mask R-CNN trained on labeled images.

    Loss: torchvision's sum ``L = L_cls + L_box + L_obj + L_rpn_box (+ L_mask)`` (RoI-head
    cross-entropy and smooth-L1, RPN binary cross-entropy and smooth-L1, per-pixel mask BCE).

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
        **kwargs: the base's other optimizer and EMA arguments.
    """

    task = "detection"  # its batches (lightning_modules/core/batch.py)
    uses_criterion = False  # torchvision's models compute their own losses
    supports_rdrop = False

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
        super().__init__(num_classes=num_classes, network=network, network_kwargs=network_kwargs, lr=lr,
                         weight_decay=weight_decay, nesterov=nesterov, **kwargs)
        limit = self.net.roi_heads.detections_per_img  # score every detection the network keeps
        self.val_map = detection_metric(self.with_masks, map_backend, limit)
        self.test_map = detection_metric(self.with_masks, map_backend, limit)

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

    @property
    def with_masks(self) -> bool:
        return self.hparams.network.startswith("maskrcnn")

    @property
    def has_trained_weights(self) -> bool:
        """Built from trained weights (torchvision's ``weights`` or ``weights_path``): train.py then
        evaluates it without ``--ckpt_path``."""
        return self.hparams.weights is not None or self.hparams.weights_path is not None

    def trainable_modules(self) -> list[nn.Module]:
        return [self.net]

    # --- training --------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"labeled_loss": sum, "loss_classifier": ..., "loss_box_reg": ..., ...}`` on the labeled images."""
        labeled = batch["labeled"]
        terms = self.net(labeled["image"], labeled["target"])
        return {"labeled_loss": sum(terms.values()), **terms}

    def labeled_batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["labeled"]["image"])

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections of the evaluation (EMA) network: boxes, labels, scores (and mask probabilities)."""
        net = self.eval_net
        training = net.training
        detections = net.eval()(images)
        net.train(training)
        return detections

    def _evaluate(self, batch: dict[str, Any], stage: str, metric: MeanAveragePrecision) -> None:
        detections = self.detect(batch["image"])
        metric.update(metric_inputs(detections, self.with_masks), metric_inputs(batch["target"], self.with_masks))
        if stage == "val" and self.hparams.log_images > 0 and not self._images_logged and self.logger is not None:
            log_detections(self.logger, batch["image"], detections, batch["target"], self.hparams.log_images,
                           key="val/detections", step=self.global_step)
            self._images_logged = True

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_map)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_map)

    def on_validation_epoch_start(self) -> None:
        self._images_logged = False

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        names = self.data_facts.class_names if self.data_facts is not None else None  # per-class AP by category
        summary = map_summary(metric.compute(), self.with_masks, metric.max_detection_thresholds,  # synchronized
                              class_keys(names) if names is not None else None)
        metric.reset()
        self.log(f"{stage}/map", summary.pop("map"), prog_bar=stage == "val")
        self.log_dict({f"{stage}/{k}": v for k, v in summary.items()})

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Per image: boxes (xyxy, input pixels), labels, scores, masks (boolean, Mask R-CNN), image_id."""
        detections = self.detect(batch["image"])
        if self.with_masks:
            for item in detections:
                item["masks"] = item["masks"][:, 0] > 0.5
        image_ids = batch.get("image_id") or [target.get("image_id") for target in batch.get("target") or []]
        for item, image_id in zip(detections, image_ids):
            if image_id is not None:
                item["image_id"] = torch.as_tensor(image_id)
        return detections

    _images_logged = False

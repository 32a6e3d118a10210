"""The detection task: boxes (and instance masks) per image, on torchvision's R-CNN family.

Labeled loss: the terms torchvision's model computes itself in training mode, summed,
``L = L_cls + L_box + L_obj + L_rpn_box (+ L_mask)`` (RoI-head cross-entropy and smooth-L1, RPN binary
cross-entropy and smooth-L1, per-pixel mask BCE). Evaluation: torchmetrics' ``MeanAveragePrecision`` (COCO
mAP@[.5:.95], box and, for Mask R-CNN, mask; :mod:`lightning_modules.detection.metrics`) logged once per epoch
as ``<stage>/map``, ``<stage>/map_50``, ..., ``<stage>/ap_<class>`` under the categories' names from the
module's ``data_facts``; the first validation images of each epoch are logged with their boxes. Prediction:
per image, boxes (xyxy, input pixels), labels, scores, boolean masks (Mask R-CNN) and ``image_id``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.core.class_keys import class_keys
from lightning_modules.core.step_state import StepState
from lightning_modules.core.task import Task
from lightning_modules.detection.metrics import detection_metric, map_summary, metric_inputs
from lightning_modules.detection.overlays import log_detections


class DetectionTask(Task):
    """Detection targets (``boxes``, ``labels``, ``masks``); the network computes its own loss terms.

    Args:
        with_masks: Mask R-CNN: masks are predicted and scored too.
        map_backend: ``"faster_coco_eval"`` or ``"pycocotools"``.
        max_detections: detections per image scored (the network's ``detections_per_img``).
        log_images: validation images logged with predicted (red) and true (green) boxes.
    """

    name = "detection"

    def __init__(self, with_masks: bool, map_backend: str = "faster_coco_eval", max_detections: int = 100,
                 log_images: int = 4) -> None:
        self.with_masks, self.log_images = with_masks, log_images
        self.metrics = {stage: detection_metric(with_masks, map_backend, max_detections) for stage in ("val", "test")}
        self.images_logged = False

    def modules(self) -> dict[str, nn.Module]:
        return {"val_map": self.metrics["val"], "test_map": self.metrics["test"]}

    def labeled_loss(self, outputs: dict[str, torch.Tensor], targets: Any, step_state: StepState) -> torch.Tensor:
        """``outputs`` are the loss terms torchvision's model returned for ``targets``: their sum."""
        return sum(outputs.values())

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, net: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections of ``net`` in eval mode: boxes, labels, scores (and mask probabilities)."""
        training = net.training
        detections = net.eval()(images)
        net.train(training)
        return detections

    def logged_names(self, stage: str) -> tuple[str, ...]:
        # map_summary drops the other values where they are undefined (-1): no objects of that size or class
        return (f"{stage}/map", f"{stage}/segm_map") if self.with_masks else (f"{stage}/map",)

    def evaluation_epoch_start(self, module: Any, stage: str) -> None:
        if stage == "val":
            self.images_logged = False

    def evaluate(self, module: Any, batch: dict[str, Any], stage: str) -> None:
        detections = self.detect(module.eval_net, batch["image"])
        self.metrics[stage].update(metric_inputs(detections, self.with_masks),
                                   metric_inputs(batch["target"], self.with_masks))
        if stage == "val" and self.log_images > 0 and not self.images_logged and module.logger is not None:
            log_detections(module.logger, batch["image"], detections, batch["target"], self.log_images,
                           key="val/detections", step=module.global_step)
            self.images_logged = True

    def evaluation_epoch_end(self, module: Any, stage: str) -> None:
        metric = self.metrics[stage]
        names = module.data_facts.class_names if module.data_facts is not None else None  # per-class AP by category
        summary = map_summary(metric.compute(), self.with_masks, metric.max_detection_thresholds,  # synchronized
                              class_keys(names) if names is not None else None)
        metric.reset()
        module.log(f"{stage}/map", summary.pop("map"), prog_bar=stage == "val")
        module.log_dict({f"{stage}/{k}": v for k, v in summary.items()})

    def predict(self, module: Any, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        detections = self.detect(module.eval_net, batch["image"])
        if self.with_masks:
            for item in detections:
                item["masks"] = item["masks"][:, 0] > 0.5
        image_ids = batch.get("image_id") or [target.get("image_id") for target in batch.get("target") or []]
        for item, image_id in zip(detections, image_ids):
            if image_id is not None:
                item["image_id"] = torch.as_tensor(image_id)
        return detections

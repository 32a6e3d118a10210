"""COCO-style mAP for detection: the metric (torchmetrics' ``MeanAveragePrecision``), its inputs, and its summary.

``detection_metric`` builds the metric (box and, for Mask R-CNN, mask AP, per class), ``metric_inputs`` turns
detections and targets into what it takes, ``map_summary`` names the computed values as they are logged
(``map``, ``map_50``, ..., ``ap_<class>``). Until 2026-12-02 these lived in ``detector.py``, which still
re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.detection import MeanAveragePrecision

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

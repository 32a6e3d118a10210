"""The segmentation task: a class per pixel.

Labeled loss: the weighted segmentation losses of :class:`~lightning_modules.segmentation.losses.SegmentationLoss`
(default CE + Dice), with deep supervision when the network returns side outputs (a list, main output first:
:func:`~lightning_modules.segmentation.losses.deep_supervision_loss`); UNet 3+'s presence loss is weighted by
``presence_loss_weight``. Evaluation: ``<stage>/loss`` per batch and, once per epoch, the dataset-level
metrics of :class:`~lightning_modules.segmentation.metrics.SegmentationMetrics` as ``<stage>/miou``,
``<stage>/fwiou``, ``<stage>/dice``, ... (synchronized across processes), by sliding windows when configured;
the first validation images of each epoch are logged as overlays. Prediction: per-pixel class probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.core.step_state import StepState
from lightning_modules.core.task import Task
from lightning_modules.segmentation.losses import SegmentationLoss, deep_supervision_loss
from lightning_modules.segmentation.metrics import SegmentationMetrics
from lightning_modules.segmentation.networks.unet3plus import cgm_sliding_window_inference, uses_cgm
from lightning_modules.segmentation.overlays import log_overlays
from lightning_modules.segmentation.sliding_window import sliding_window_inference


class SegmentationTask(Task):
    """Masks of class indices ``(N, H, W)``; arguments as :class:`lightning_modules.segmentation.Segmenter`'s."""

    name = "segmentation"

    def __init__(self, num_classes: int, loss_terms: dict[str, float] | None = None,
                 deep_supervision_weights: list[float] | None = None, presence_loss_weight: float = 0.1,
                 sliding_window: int | None = None, window_overlap: float = 0.25, log_images: int = 4) -> None:
        self.num_classes = num_classes
        self.seg_loss = SegmentationLoss(loss_terms)
        self.deep_supervision_weights = deep_supervision_weights
        self.loss_weights = {"presence_loss": presence_loss_weight}
        self.sliding_window, self.window_overlap, self.log_images = sliding_window, window_overlap, log_images
        self.metrics = {"val": SegmentationMetrics(num_classes), "test": SegmentationMetrics(num_classes)}
        self.images_logged_this_epoch = False

    def modules(self) -> dict[str, nn.Module]:
        return {"seg_loss": self.seg_loss, "val_metrics": self.metrics["val"], "test_metrics": self.metrics["test"]}

    def labeled_loss(self, outputs: torch.Tensor | list[torch.Tensor], targets: torch.Tensor,
                     step_state: StepState) -> torch.Tensor:
        if isinstance(outputs, list):
            return deep_supervision_loss(outputs, targets, self.seg_loss, self.deep_supervision_weights)
        return self.seg_loss(outputs, targets)

    # --- evaluation ------------------------------------------------------------------------
    def segment(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W) of ``net``, by windows if configured (UNet 3+'s CGM then gates the
        stitched image, not each window)."""
        if self.sliding_window is None:
            return net(images)
        tiled = cgm_sliding_window_inference if uses_cgm(net) else sliding_window_inference
        return tiled(net, images, window=self.sliding_window, overlap=self.window_overlap, num_classes=self.num_classes)

    def logged_names(self, stage: str) -> tuple[str, ...]:
        return tuple(f"{stage}/{name}" for name in ("loss", "miou", "fwiou", "dice", "pixel_acc", "recall"))

    def evaluation_epoch_start(self, module: Any, stage: str) -> None:
        if stage == "val":
            self.images_logged_this_epoch = False

    def evaluate(self, module: Any, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self.segment(module.eval_net, batch["image"])
        predictions = logits.argmax(dim=1)
        self.metrics[stage].update(predictions, batch["target"])
        module.log(f"{stage}/loss", self.seg_loss(logits, batch["target"]), batch_size=len(logits))
        if stage == "val" and self.log_images > 0 and not self.images_logged_this_epoch and module.logger is not None:
            log_overlays(module.logger, batch["image"], batch["target"], predictions, self.log_images,
                         key="val/overlays", step=module.global_step)
            self.images_logged_this_epoch = True

    def evaluation_epoch_end(self, module: Any, stage: str) -> None:
        metrics = self.metrics[stage]
        values = metrics.compute()  # synchronized across processes: the same numbers on every rank
        module.log(f"{stage}/miou", values.pop("miou"), prog_bar=stage == "val")
        module.log_dict({f"{stage}/{k}": v for k, v in values.items()})
        metrics.reset()

    def predict(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs = torch.softmax(self.segment(module.eval_net, batch["image"]).float(), dim=1)
        return {"index": batch["index"], "probs": probs, "prediction": probs.argmax(dim=1)}

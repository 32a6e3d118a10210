"""Dataset-level segmentation metrics from torchmetrics' pixel-wise multiclass metrics.

Every number comes from counts accumulated over all pixels of all images seen since the last
``reset()`` (one confusion matrix / one set of per-class TP, FP, FN for the whole evaluation set);
none is a mean of per-image scores (``torchmetrics.segmentation.MeanIoU`` and ``DiceScore`` with
its default ``aggregation_level="samplewise"`` average per image, which is a different number).
With ``M`` the K x K confusion matrix (rows = target class, columns = predicted class),
``TP_c = M[c, c]``, ``FP_c = sum_r M[r, c] - TP_c``, ``FN_c = sum_k M[c, k] - TP_c``:

- ``iou_class{c}`` = ``TP_c / (TP_c + FP_c + FN_c)``       (``MulticlassJaccardIndex(average=None)``)
- ``miou``  = mean of IoU_c over classes present in targets or predictions
                                                           (``MulticlassJaccardIndex(average="macro")``)
- ``fwiou`` = ``sum_c freq_c IoU_c``, ``freq_c`` = target pixels of class c / all pixels
                                                           (``MulticlassJaccardIndex(average="weighted")``)
- ``dice``  = mean over classes (present in targets or predictions) of ``2 TP_c / (2 TP_c + FP_c + FN_c)``,
  the dataset-level macro Dice, which is pixel-wise macro F1  (``MulticlassF1Score(average="macro")``)
- ``pixel_acc`` = ``sum_c TP_c / all pixels``             (``MulticlassAccuracy(average="micro")``)
- ``recall``    = mean of ``TP_c / (TP_c + FN_c)`` over classes present in targets or predictions
  (a class predicted but absent from the targets counts as 0)  (``MulticlassRecall(average="macro")``)
- binary tasks (``num_classes`` 1 or 2, as background 0 / foreground 1) also get ``fg_dice`` and
  ``fg_iou``: the foreground class's Dice and IoU.

Background is a class like any other in every average. Pixels whose target is ``ignore_index`` are
left out of everything.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex, MulticlassRecall,
)  # fmt: skip


class SegmentationMetrics(MetricCollection):
    """``update(preds, targets)`` with class-index maps ``(N, H, W)``; ``compute()`` gives a flat
    ``dict[str, Tensor]`` of scalars (see the module docstring for exact definitions).

    In a LightningModule: ``self.val_metrics = SegmentationMetrics(k)``, ``update`` in each step,
    then ``self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()})`` and
    ``reset()`` at epoch end (``log_dict(self.val_metrics)`` would try to log the per-class vector).
    States are summed across processes under DDP; ``compute_groups`` shares the count states.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, validate_args: bool = True) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = max(num_classes, 2)  # binary = background + foreground
        common = dict(num_classes=self.num_classes, ignore_index=ignore_index, validate_args=validate_args)
        metrics = {
            "dice": MulticlassF1Score(average="macro", **common),
            "iou": MulticlassJaccardIndex(average="none", **common),
            "miou": MulticlassJaccardIndex(average="macro", **common),
            "fwiou": MulticlassJaccardIndex(average="weighted", **common),
            "pixel_acc": MulticlassAccuracy(average="micro", **common),
            "recall": MulticlassRecall(average="macro", **common),
        }
        if self.num_classes == 2:
            metrics["class_dice"] = MulticlassF1Score(average="none", **common)
        super().__init__(metrics, compute_groups=True)

    def compute(self) -> dict[str, Tensor]:
        raw = super().compute()
        out = {name: raw[name] for name in ("dice", "miou", "fwiou", "pixel_acc", "recall")}
        out.update({f"iou_class{c}": value for c, value in enumerate(raw["iou"])})
        if self.num_classes == 2:
            out["fg_dice"], out["fg_iou"] = raw["class_dice"][1], raw["iou"][1]
        return out

"""The classification task: a labeled loss by name, R-Drop, accuracy or multi-label F1, class probabilities.

A module is given it by its ``build_task`` hook (:class:`lightning_modules.classification.semi_supervised.SemiSupervisedModule`
builds it from its ``criterion``, ``criterion_kwargs`` and ``rdrop_weight``). What it logs:

* single-label: ``<stage>/loss`` (cross-entropy of the evaluation network) and ``<stage>/acc`` (micro accuracy);
* multi-label criteria (``bce``, ``sigmoid_f1``): ``<stage>/loss`` (binary cross-entropy), ``<stage>/macro_f1``
  and ``<stage>/micro_f1``.

R-Drop (Liang et al., NeurIPS 2021, "R-Drop: Regularized Dropout for Neural Networks"): the labeled batch goes
through the network twice (two dropout masks), ``L = 1/2 (L_1 + L_2) + alpha * 1/2 (KL(P_1 || P_2) + KL(P_2 || P_1))``
with ``alpha = rdrop_weight``; 0 turns it off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score

from lightning_modules.classification.criteria import build_criterion
from lightning_modules.classification.label_regularization import symmetric_kl
from lightning_modules.core.step_state import StepState
from lightning_modules.core.task import Task


class ClassificationTask(Task):
    """Images with a class (or a multi-hot set of classes).

    Args:
        num_classes: classes of the data.
        criterion: the labeled loss by name (:func:`lightning_modules.classification.criteria.build_criterion`).
        criterion_kwargs: arguments of the criterion.
        rdrop_weight: alpha of R-Drop (module docstring); 0 turns it off.
        owner: the module's class name, for error messages.
    """

    name = "classification"

    def __init__(self, num_classes: int, criterion: str = "ce", criterion_kwargs: dict[str, Any] | None = None,
                 rdrop_weight: float = 0.0, owner: str = "the module") -> None:
        if rdrop_weight < 0:
            raise ValueError(rdrop_refusal(owner, rdrop_weight))
        self.num_classes = num_classes
        self.criterion = build_criterion(criterion, num_classes, **(criterion_kwargs or {}))
        self.labeled_passes = 2 if rdrop_weight > 0 else 1
        self.loss_weights = {"rdrop_loss": rdrop_weight} if rdrop_weight > 0 else {}
        metric = (lambda: MultilabelF1Score(num_classes, average="macro")) if self.multilabel else (
            lambda: MulticlassAccuracy(num_classes, average="micro"))
        self.metrics = {"val": metric(), "test": metric()}
        self.micro_f1 = {stage: MultilabelF1Score(num_classes, average="micro") for stage in ("val", "test")
                         } if self.multilabel else {}

    @property
    def multilabel(self) -> bool:
        """Sigmoid outputs and F1 metrics, set by a multi-label criterion (``bce``, ``sigmoid_f1``)."""
        return bool(getattr(self.criterion, "multilabel", False))

    def modules(self) -> dict[str, nn.Module]:
        pieces = {"criterion": self.criterion, "val_acc": self.metrics["val"], "test_acc": self.metrics["test"]}
        pieces.update({f"{stage}_micro_f1": metric for stage, metric in self.micro_f1.items()})
        return pieces

    def trainable_modules(self) -> list[nn.Module]:
        return [self.criterion]  # a learnable criterion (the knowledge refinery)

    # --- training --------------------------------------------------------------------------
    def labeled_loss(self, outputs: torch.Tensor, targets: torch.Tensor, step_state: StepState) -> torch.Tensor:
        step_state.observe(self.criterion, outputs, targets)  # a criterion's running state (online label smoothing)
        return self.criterion(outputs, targets)

    def pass_losses(self, labeled_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"rdrop_loss": symmetric_kl(*labeled_outputs)} if len(labeled_outputs) == 2 else {}

    def train_epoch_end(self) -> None:
        if hasattr(self.criterion, "epoch_end"):  # online label smoothing swaps in its epoch's soft labels
            self.criterion.epoch_end()

    # --- evaluation ------------------------------------------------------------------------
    def logged_names(self, stage: str) -> tuple[str, ...]:
        scores = ("macro_f1", "micro_f1") if self.multilabel else ("acc",)
        return tuple(f"{stage}/{name}" for name in ("loss", *scores))

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What evaluation and prediction score: the logits, or a criterion's test-time scores (DropMax)."""
        scores = getattr(self.criterion, "class_scores", None)
        return logits if scores is None else scores(logits)

    def evaluate(self, module: Any, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits, targets, metric = self.class_scores(module.eval_net(batch["image"])), batch["target"], self.metrics[stage]
        size = len(logits)
        if not self.multilabel:
            metric.update(logits.argmax(dim=1), targets)
            module.log(f"{stage}/loss", F.cross_entropy(logits, targets), batch_size=size)
            module.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=size)
            return
        if targets.ndim == 1:  # single-label data scored as multi-hot
            targets = F.one_hot(targets, self.num_classes)
        micro_f1 = self.micro_f1[stage]
        metric.update(logits, targets.long())
        micro_f1.update(logits, targets.long())
        module.log(f"{stage}/loss", F.binary_cross_entropy_with_logits(logits.float(), targets.float()), batch_size=size)
        module.log(f"{stage}/macro_f1", metric, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        module.log(f"{stage}/micro_f1", micro_f1, on_epoch=True, batch_size=size)

    def predict(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.class_scores(module.eval_net(batch["image"])).float()
        if self.multilabel:
            probs = torch.sigmoid(logits)
            return {"index": batch["index"], "probs": probs, "prediction": (probs > 0.5).long()}
        probs = torch.softmax(logits, dim=1)
        return {"index": batch["index"], "probs": probs, "prediction": probs.argmax(dim=1)}


def refuse_criterion(owner: str, criterion: str) -> None:
    """For a method whose labeled loss is its own (soft targets, TSA): only the default ``ce`` is accepted."""
    if criterion != "ce":
        raise ValueError(f"{owner} trains on its own soft targets and ignores criterion={criterion!r}: leave "
                         "criterion at 'ce' or pick a method that uses it")


def refuse_rdrop(owner: str, rdrop_weight: float) -> None:
    """For a method with its own forward (no second dropout pass of the labeled batch): only 0 is accepted."""
    if rdrop_weight != 0:
        raise ValueError(rdrop_refusal(owner, rdrop_weight))


def rdrop_refusal(owner: str, rdrop_weight: float) -> str:
    return (f"rdrop_weight={rdrop_weight} is not possible for {owner}: it must be >= 0, and R-Drop needs a "
            "method that trains through the base's forward")

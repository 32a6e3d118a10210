"""The task a training module is given: what its labeled loss, its evaluation and its prediction are.

The core (:class:`lightning_modules.core.training_module.TrainingModule`) knows how to train; it does not
know whether a sample is an image with a class, a mask or a set of boxes. That is the task's, built by the
module's ``build_task`` hook and kept as ``module.task``:

* ``classification/task.py``: ``ClassificationTask`` (a criterion by name, R-Drop, accuracy or multi-label F1,
  class probabilities);
* ``segmentation/task.py``: ``SegmentationTask`` (weighted segmentation losses with deep supervision,
  dataset-level mIoU, sliding windows, overlays);
* ``detection/task.py``: ``DetectionTask`` (torchvision's own loss terms summed, COCO mAP, detections).

A method says what makes it different (its unlabeled loss, its forward) and is given its task; nothing is
inherited and switched off. The task's ``nn.Module`` pieces (a criterion with learnable or running state,
metrics) are registered on the module under the names of :meth:`Task.modules`, so checkpoints keep the keys
those pieces always had (``criterion.*``) and Lightning finds the metrics it logs.

Adding a task: subclass :class:`Task`, give it ``name`` (a batch contract of
:mod:`lightning_modules.core.batch`), the labeled loss, ``evaluate`` / ``evaluation_epoch_end`` (logging the
names listed by ``logged_names``) and ``predict``, and return it from a module's ``build_task``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the module type is only named, never imported at run time (it imports this file)
    from lightning_modules.core.step_state import StepState
    from lightning_modules.core.training_module import TrainingModule


class Task:
    """The protocol every task follows; the defaults are a task with no extra loss terms or epoch work.

    Attributes:
        name: the batch contract the module reads (``classification``, ``segmentation``, ``detection``).
        labeled_passes: forwards of the labeled batch in the core's ``compute_losses`` (R-Drop: 2).
        loss_weights: weights of the task's own loss terms added to the total (``rdrop_loss``, ``presence_loss``).
    """

    name: str = ""
    labeled_passes: int = 1
    loss_weights: Mapping[str, float] = MappingProxyType({})  # read-only: a task sets its own

    def modules(self) -> dict[str, nn.Module]:
        """The pieces registered on the module under these names (checkpoint keys, logged metrics)."""
        return {}

    def trainable_modules(self) -> list[nn.Module]:
        """Pieces whose parameters the optimizer trains beside the network (a learnable criterion)."""
        return []

    def labeled_loss(self, outputs: Any, targets: Any, step_state: StepState) -> torch.Tensor:
        """The loss of the network's ``outputs`` on labeled ``targets``; running state goes through ``step_state``."""
        raise NotImplementedError(f"{type(self).__name__} defines no labeled_loss")

    def pass_losses(self, labeled_outputs: list[Any]) -> dict[str, torch.Tensor]:
        """Terms comparing the ``labeled_passes`` outputs of one labeled batch (R-Drop's symmetric KL)."""
        return {}

    def train_epoch_end(self) -> None:
        """Work at the end of a training epoch (online label smoothing swaps in its soft labels)."""

    def evaluation_epoch_start(self, module: TrainingModule, stage: str) -> None:
        """Called before the first batch of ``stage`` (``"val"`` or ``"test"``)."""

    def evaluate(self, module: TrainingModule, batch: Any, stage: str) -> None:
        """Score one evaluation batch with ``module.eval_net`` and log through ``module.log``."""
        raise NotImplementedError(f"{type(self).__name__} defines no evaluate")

    def evaluation_epoch_end(self, module: TrainingModule, stage: str) -> None:
        """Log what is computed once per epoch (dataset-level mIoU, mAP)."""

    def predict(self, module: TrainingModule, batch: Any) -> Any:
        """What ``predict`` returns for one batch (the prediction writer's formats: callbacks/prediction_formats.py)."""
        raise NotImplementedError(f"{type(self).__name__} defines no predict")

    def logged_names(self, stage: str) -> tuple[str, ...]:
        """The headline names ``evaluate`` and ``evaluation_epoch_end`` log for ``stage`` (always logged)."""
        return ()


def accept_retired_arguments(kwargs: dict[str, Any], retired: dict[str, Any], owner: str) -> None:
    """Drop from ``kwargs`` arguments ``owner`` no longer has, at the one value old checkpoints' hyper-parameters
    hold for them (LightningCLI passes those back on ``--ckpt_path``); refuse any other value, naming it."""
    for name, value in retired.items():
        if name in kwargs and kwargs.pop(name) != value:
            raise ValueError(f"{owner} has no {name} (its task defines its own loss): leave {name} out "
                             f"(only {name}={value!r}, from checkpoints written before 2026-12-02, is accepted)")

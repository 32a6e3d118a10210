"""Semantic segmentation: the training core given the segmentation task.

``Segmenter`` trains any network of :func:`lightning_modules.segmentation.networks.build_segmentation_network`
(UNet 3+, RefineNet, Light-Weight RefineNet, or any segmentation-models-pytorch architecture by
name) with :class:`~lightning_modules.segmentation.task.SegmentationTask`: a weighted sum of segmentation
losses, deep supervision when the network returns side outputs, the UNet 3+ classification-guided module's
presence loss, and dataset-level metrics. Everything else (SGD and the cosine schedule, the EMA copy used for
evaluation, ramp-ups, unlabeled views, logging) is the task-neutral core's
(:class:`~lightning_modules.core.training_module.TrainingModule`), so the semi-supervised methods apply to
pixels unchanged (:mod:`lightning_modules.segmentation.semi_supervised`).

Batches are the contract's segmentation batches (:mod:`lightning_modules.core.batch`), as
:class:`datamodules.SegmentationFolders` makes them: ``"image"`` (N, C, H, W) and a per-pixel
``"target"`` (N, H, W) of class indices. Binary masks are 2 classes (background,
foreground) with a softmax, so per-pixel pseudo-labels work as for images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.core.task import accept_retired_arguments
from lightning_modules.core.training_module import TrainingModule
from lightning_modules.segmentation.networks import build_segmentation_network
from lightning_modules.segmentation.task import SegmentationTask

#: arguments of the classification base that Segmenter had until 2026-12-02, at the values its checkpoints hold
RETIRED = {"criterion": "ce", "criterion_kwargs": None, "rdrop_weight": 0.0}


class Segmenter(TrainingModule):
    """A segmentation network trained and evaluated per pixel.

    Args:
        network: ``unet3plus``, ``refinenet``, ``lw_refinenet`` or an smp architecture (``Unet``,
            ``FPN``, ``DeepLabV3Plus``, ...).
        network_kwargs: constructor arguments, e.g. ``{"encoder_name": "resnet34"}``;
            ``encoder_weights`` stays ``None`` (offline) unless given.
        loss_terms: weighted losses by name (``ce``, ``dice``, ``iou``, ``focal``, ``ms_ssim``,
            ``hybrid`` = UNet 3+'s focal + MS-SSIM + IoU); default CE + Dice.
        deep_supervision_weights: weights of the side outputs when the network returns several
            in training (main output first); default equal.
        presence_loss_weight: weight of the cross-entropy of the classification-guided module's
            presence logits against "the mask has foreground" (UNet 3+ with ``cgm=True``).
        sliding_window: evaluate with overlapping windows of this size (large images); ``None``
            evaluates whole images in one pass.
        window_overlap: fraction of overlap between windows.
        log_images: how many validation images to log as input / truth / prediction overlays
            (W&B and TensorBoard loggers); 0 turns it off.
        num_classes, in_channels: default a binary mask of grayscale images (linked from the data by
            ``train.py``).
        **kwargs: the core's optimizer, EMA and ramp-up arguments.
    """

    def __init__(
        self,
        network: str = "unet3plus",
        network_kwargs: dict[str, Any] | None = None,
        loss_terms: dict[str, float] | None = None,
        deep_supervision_weights: list[float] | None = None,
        presence_loss_weight: float = 0.1,
        sliding_window: int | None = None,
        window_overlap: float = 0.25,
        log_images: int = 4,
        num_classes: int = 2,
        in_channels: int = 1,
        **kwargs: Any,
    ) -> None:
        accept_retired_arguments(kwargs, RETIRED, type(self).__name__)
        super().__init__(network=network, network_kwargs=network_kwargs, num_classes=num_classes,
                         in_channels=in_channels, **kwargs)

    def build_net(self) -> nn.Module:
        hp = self.hparams
        return build_segmentation_network(hp.network, in_channels=hp.in_channels, classes=hp.num_classes,
                                          **(hp.network_kwargs or {}))

    def build_task(self) -> SegmentationTask:
        hp = self.hparams
        return SegmentationTask(hp.num_classes, hp.loss_terms, hp.deep_supervision_weights, hp.presence_loss_weight,
                                hp.sliding_window, hp.window_overlap, hp.log_images)

    # --- training --------------------------------------------------------------------------
    def forward_views(self, images: list[torch.Tensor]) -> list[torch.Tensor | list[torch.Tensor]]:
        """Per view: every output (deep supervision) for the first view, the main output for the others.

        The CGM's presence logits of every view, in view order (the labeled images first), are kept
        for the presence loss (``_views_presence``).
        """
        per_view, self._views_presence = self.network_views(self.net, images)
        return per_view

    def network_views(self, net: nn.Module, images: list[torch.Tensor]
                      ) -> tuple[list[torch.Tensor | list[torch.Tensor]], torch.Tensor | None]:
        """``net``'s outputs per view (as :meth:`forward_views`) and its presence logits of every view, or None.

        One forward leaves every view's presence logits in ``last_presence``; with ``concat_forward=False``
        each forward replaces the last, so they are gathered per view.
        """
        if self.hparams.concat_forward:
            outputs = _as_list(net(torch.cat(images)))
            pieces = [output.split([len(x) for x in images]) for output in outputs]
            per_view = [[piece[i] for piece in pieces] for i in range(len(images))]
            presence = getattr(net, "last_presence", None)
        else:
            per_view, presences = [], []
            for x in images:
                per_view.append(_as_list(net(x)))
                presences.append(getattr(net, "last_presence", None))
            presence = torch.cat(presences) if presences[0] is not None else None
        return [view if i == 0 and len(view) > 1 else view[0] for i, view in enumerate(per_view)], presence

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self._views_presence = None  # set by this step's forward_views
        losses = super().compute_losses(batch)
        if self._views_presence is not None:
            losses["presence_loss"] = presence_loss(self._views_presence, batch["labeled"]["target"])
        return losses

    # --- evaluation: the task's (segmentation/task.py) -------------------------------------
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W) of the evaluation (EMA) network, by windows if configured."""
        return self.task.segment(self.eval_net, images)

    _views_presence: torch.Tensor | None = None


def presence_loss(presence: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the labeled images' presence logits (they lead the views) against "the mask has foreground"."""
    has_foreground = (targets > 0).flatten(1).any(dim=1).long()
    return F.cross_entropy(presence[: len(targets)].float(), has_foreground)


def _as_list(output: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]

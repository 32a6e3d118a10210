"""Cross pseudo supervision (Chen, Yuan, Zeng & Wang, CVPR 2021, "Semi-Supervised Semantic
Segmentation with Cross Pseudo Supervision")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.core.fast_path import channels_last_input
from lightning_modules.segmentation.segmenter import Segmenter, presence_loss


def cross_pseudo_supervision_loss(logits_first: torch.Tensor, logits_second: torch.Tensor) -> torch.Tensor:
    """``CE(p_1, argmax p_2) + CE(p_2, argmax p_1)``, each the mean over every pixel of ``(N, C, H, W)`` logits.

    Each network's hard pseudo-label is a constant target of the other (``argmax`` has no gradient), so the
    first term trains only the first network and the second only the second.
    """
    pseudo_first, pseudo_second = logits_first.detach().argmax(dim=1), logits_second.detach().argmax(dim=1)
    return F.cross_entropy(logits_first.float(), pseudo_second) + F.cross_entropy(logits_second.float(), pseudo_first)


class CPS(Segmenter):
    """Two differently initialized segmenters, each supervised by the other's per-pixel hard pseudo-labels.

    Loss: ``L = L_s(f_1(x_l), y) + L_s(f_2(x_l), y) + lambda * [CE(f_1(x), argmax f_2(x)) + CE(f_2(x), argmax f_1(x))]``
    with ``x`` every image of the step, labeled and unlabeled (``weak`` view: the geometric crop the labeled
    images get too), each CE the mean over their pixels and no gradient through either ``argmax``
    (authors' code, charlesCXK/TorchSemiSeg ``exp.voc/voc8.res50v3+.CPS/train.py`` lines 179-194 and 197-220,
    commit 5e0c29c). ``L_s`` is the task's labeled loss (``loss_terms``; the paper's is CE alone,
    ``loss_terms: {ce: 1.0}``).

    The first network is :attr:`net`, the second :attr:`second_net`, built by the same ``build_net`` one
    after the other, so their random weights differ; with ``encoder_weights: imagenet`` they share the
    pretrained encoder and differ in the decoder, as the authors' two branches share the ImageNet backbone and
    draw their heads apart (``train.py`` lines 81-89). One SGD trains both: the authors' two SGD optimizers
    with the same learning rate and schedule make the same update. Validation, test and predict use the first
    network (its EMA when ``ema_decay`` is set), as the authors' model does outside training
    (``network.py`` lines 18-21); the two are trained symmetrically, so neither is the better one by design.

    Paper recipe (PASCAL VOC, DeepLabv3+ ResNet-50/101): lambda = 1.5 (``config.py`` line 74), SGD lr 0.005
    (momentum 0.9, weight decay 1e-4) with poly decay, batch 8 labeled + 8 unlabeled, no EMA (``ema_decay:
    None``, the default here). CutMix (the paper's "CPS + CutMix") is not implemented.

    Logs ``labeled_loss_first`` / ``labeled_loss_second`` (their sum is ``labeled_loss``), ``unlabeled_loss``
    (the bracket), ``pseudo_label_agreement`` (pixels where the two argmaxes agree) and ``pseudo_label_acc``
    (the first network's argmax on the unlabeled pixels with a known target).

    Args:
        unlabeled_loss_weight: lambda, the weight of the cross pseudo supervision.
        ema_decay: the evaluation EMA of the first network; None evaluates its raw weights.
        **kwargs: :class:`Segmenter` arguments.
    """

    unlabeled_views = ("weak",)
    progress_bar_terms = ("pseudo_label_agreement",)

    def __init__(self, unlabeled_loss_weight: float = 1.5, ema_decay: float | None = None, **kwargs: Any) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, ema_decay=ema_decay, **kwargs)
        self.second_net = self.build_net()
        if self.fast_path.channels_last:  # the fast path set up the first network only
            self.second_net.to(memory_format=torch.channels_last)
            self.second_net.register_forward_pre_hook(channels_last_input)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.net, self.second_net, *self.task.trainable_modules()]

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        images = [labeled["image"]] + ([unlabeled[v] for v in self.unlabeled_views] if unlabeled is not None else [])
        losses: dict[str, torch.Tensor] = {}
        main_logits = []
        for name, net in (("first", self.net), ("second", self.second_net)):
            views, presence = self.network_views(net, images)
            losses[f"labeled_loss_{name}"] = self.labeled_loss(views[0], labeled["target"])
            if presence is not None:
                losses["presence_loss"] = losses.get("presence_loss", 0) + presence_loss(presence, labeled["target"])
            main_logits.append(torch.cat([v[0] if isinstance(v, list) else v for v in views]))
        losses["labeled_loss"] = losses["labeled_loss_first"] + losses["labeled_loss_second"]
        losses["unlabeled_loss"] = cross_pseudo_supervision_loss(*main_logits)
        pseudo_first, pseudo_second = (logits.detach().argmax(dim=1) for logits in main_logits)
        losses["pseudo_label_agreement"] = (pseudo_first == pseudo_second).float().mean()
        if unlabeled is not None:
            targets = unlabeled["target"]  # -1 where unknown; for this diagnostic only
            correct = (pseudo_first[len(labeled["target"]):] == targets) & (targets >= 0)
            losses["pseudo_label_acc"] = correct.sum() / (targets >= 0).sum().clamp(min=1)
        return losses

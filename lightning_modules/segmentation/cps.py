"""Cross pseudo supervision (Chen, Yuan, Zeng & Wang, CVPR 2021, "Semi-Supervised Semantic
Segmentation with Cross Pseudo Supervision")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.core.fast_path import channels_last_input
from lightning_modules.segmentation.segmenter import Segmenter, presence_loss


def cross_pseudo_supervision_loss(logits_first: torch.Tensor, logits_second: torch.Tensor,
                                  pseudo_first: torch.Tensor | None = None,
                                  pseudo_second: torch.Tensor | None = None) -> torch.Tensor:
    """``CE(p_1, y_2) + CE(p_2, y_1)``, each the mean over every pixel of ``(N, C, H, W)`` logits.

    ``y_k`` is network k's hard pseudo-label, by default ``argmax p_k`` (CutMix passes the argmax of its mixed
    predictions). Each is a constant target of the other network (no gradient), so the first term trains only
    the first network and the second only the second.
    """
    pseudo_first = logits_first.detach().argmax(dim=1) if pseudo_first is None else pseudo_first
    pseudo_second = logits_second.detach().argmax(dim=1) if pseudo_second is None else pseudo_second
    return F.cross_entropy(logits_first.float(), pseudo_second) + F.cross_entropy(logits_second.float(), pseudo_first)


def box_masks(draws: torch.Tensor, area_range: tuple[float, float], shape: tuple[int, int]) -> torch.Tensor:
    """CutMix masks ``(N, 1, H, W)``, 1 inside an odd number of ``B`` boxes, from uniforms ``draws`` ``(N, B, 4)``.

    Box ``b`` covers the fraction ``a / B`` of the image, ``a ~ U(area_range)``, with a random aspect ratio
    (height fraction ``a^u / sqrt(B)``), placed inside the image; overlaps cancel. This is the authors'
    ``BoxMaskGenerator`` as their CPS + CutMix runs it (TorchSemiSeg ``exp.voc/voc8.res50v3+.CPS+CutMix/mask_gen.py``
    lines 49-92: ``prop_by_area``, ``random_aspect_ratio``, ``within_bounds``, ``invert``), from the same draws.
    """
    draws = draws.double()
    area = area_range[0] + (area_range[1] - area_range[0]) * draws[..., 0]
    height = torch.exp(draws[..., 1] * area.log())
    fractions = torch.stack([height, area / height], dim=-1) * (1.0 / draws.shape[1]) ** 0.5
    extent = torch.tensor(shape, dtype=torch.float64)
    sizes = (fractions * extent).round()
    start = ((extent - sizes) * draws[..., 2:]).round()
    end = start + sizes
    rows, cols = (torch.arange(n, dtype=torch.float64) for n in shape)
    in_rows = (rows >= start[..., 0, None]) & (rows < end[..., 0, None])  # (N, B, H)
    in_cols = (cols >= start[..., 1, None]) & (cols < end[..., 1, None])  # (N, B, W)
    inside = in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)
    return (inside.sum(dim=1, keepdim=True) % 2).float()


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

    Authors' VOC recipe (DeepLabv3+ ResNet-50, ``exp.voc/voc8.res50v3+.CPS/config.py``): lambda = 1.5 (line 74),
    SGD lr 0.005, momentum 0.9, weight decay 1e-4, poly decay with power 0.9 (lines 91-100), batch 16 labeled +
    16 unlabeled (line 96), 34 epochs, no EMA (``ema_decay: None``, the default here).

    CPS + CutMix (``cutmix=True``): the cross supervision moves to unlabeled images with boxes of another image
    pasted in (:func:`box_masks`, 3 boxes of 25-50 % of the area in all); each network's pseudo-label is the
    argmax of its predictions on the two unmixed images, mixed by the same mask, and the labeled images get
    the supervised loss only (``CPS+CutMix/train.py`` lines 206-250; its VOC weight is 1.0, ``config.py`` line 73).

    Logs ``labeled_loss_first`` / ``labeled_loss_second`` (their sum is ``labeled_loss``), ``unlabeled_loss``
    (the bracket), ``pseudo_label_agreement`` (pixels where the two argmaxes agree) and ``pseudo_label_acc``
    (the first network's argmax on the unlabeled pixels with a known target).

    Args:
        unlabeled_loss_weight: lambda, the weight of the cross pseudo supervision.
        ema_decay: the evaluation EMA of the first network; None evaluates its raw weights.
        cutmix: CPS + CutMix instead of plain CPS.
        cutmix_min_area, cutmix_max_area: range of the mask's area fraction ``a`` (the authors'
            ``cutmix_mask_prop_range``).
        cutmix_boxes: boxes per mask.
        **kwargs: :class:`Segmenter` arguments.
    """

    unlabeled_views = ("weak",)
    progress_bar_terms = ("pseudo_label_agreement",)

    def __init__(self, unlabeled_loss_weight: float = 1.5, ema_decay: float | None = None, cutmix: bool = False,
                 cutmix_min_area: float = 0.25, cutmix_max_area: float = 0.5, cutmix_boxes: int = 3,
                 **kwargs: Any) -> None:
        if not 0.0 < cutmix_min_area <= cutmix_max_area <= 1.0 or cutmix_boxes < 1:
            raise ValueError(f"CPS needs 0 < cutmix_min_area <= cutmix_max_area <= 1 and cutmix_boxes >= 1, got "
                             f"{cutmix_min_area}, {cutmix_max_area} and {cutmix_boxes}")
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, ema_decay=ema_decay, **kwargs)
        self.second_net = self.build_net()
        if self.fast_path.channels_last:  # the fast path set up the first network only
            self.second_net.to(memory_format=torch.channels_last)
            self.second_net.register_forward_pre_hook(channels_last_input)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.net, self.second_net, *self.task.trainable_modules()]

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        unlabeled_images = [unlabeled[v] for v in self.unlabeled_views] if unlabeled is not None else []
        cutmix = self.hparams.cutmix and unlabeled is not None
        if cutmix:
            mixed, unlabeled_targets, pseudo_labels = self.cutmix(unlabeled["weak"], unlabeled["target"])
            unlabeled_images = [mixed]
        images = [labeled["image"], *unlabeled_images]
        losses: dict[str, torch.Tensor] = {}
        main_logits = []
        for name, net in (("first", self.net), ("second", self.second_net)):
            views, presence = self.network_views(net, images)
            losses[f"labeled_loss_{name}"] = self.labeled_loss(views[0], labeled["target"])
            if presence is not None:
                losses["presence_loss"] = losses.get("presence_loss", 0) + presence_loss(presence, labeled["target"])
            main_logits.append(torch.cat([_main(v) for v in (views[1:] if cutmix else views)]))
        losses["labeled_loss"] = losses["labeled_loss_first"] + losses["labeled_loss_second"]
        losses["unlabeled_loss"] = cross_pseudo_supervision_loss(*main_logits, *(pseudo_labels if cutmix else ()))
        pseudo_first, pseudo_second = pseudo_labels if cutmix else (x.detach().argmax(dim=1) for x in main_logits)
        losses["pseudo_label_agreement"] = (pseudo_first == pseudo_second).float().mean()
        if unlabeled is not None:
            targets = unlabeled_targets if cutmix else unlabeled["target"]  # -1 where unknown; diagnostic only
            correct = (pseudo_first[-len(targets):] == targets) & (targets >= 0)
            losses["pseudo_label_acc"] = correct.sum() / (targets >= 0).sum().clamp(min=1)
        return losses

    def cutmix(self, images: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Each image with boxes of the next one pasted in, its mixed true targets (diagnostic), and each network's
        pseudo-label of it: the argmax of its predictions on the two unmixed images, mixed by the same mask.

        As the authors' loop (TorchSemiSeg ``exp.voc/voc8.res50v3+.CPS+CutMix/train.py`` lines 207-229), the
        predictions on unmixed images run without gradient, in training mode. The partner image is the next in the
        batch (``roll``), where the authors draw a second unlabeled batch, so its predictions are a roll of the first.
        """
        hp = self.hparams
        draws = torch.rand(len(images), hp.cutmix_boxes, 4, dtype=torch.float64)  # global RNG: seeded per batch
        masks = box_masks(draws, (hp.cutmix_min_area, hp.cutmix_max_area), tuple(images.shape[-2:])).to(images)
        mix = lambda x: x * (1 - masks) + x.roll(1, dims=0) * masks  # noqa: E731
        with torch.no_grad():
            pseudo = tuple(mix(_main(self.network_views(net, [images])[0][0]).float()).argmax(dim=1)
                           for net in (self.net, self.second_net))
        pasted = masks[:, 0].bool()
        mixed_targets = torch.where(pasted, targets.roll(1, dims=0), targets)
        return mix(images), mixed_targets, pseudo  # type: ignore[return-value]


def _main(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The main output of a network that may return deep-supervision side outputs after it."""
    return output[0] if isinstance(output, list) else output

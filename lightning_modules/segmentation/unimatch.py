"""UniMatch (Yang, Qi, Feng, Zhang & Shi, CVPR 2023, "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation").

Cited lines are LiheYoung/UniMatch, commit 0324f3d: ``unimatch.py`` (the training loop), ``dataset/semi.py`` and
``dataset/transform.py`` (the views and CutMix boxes), ``model/semseg/deeplabv3plus.py`` (the perturbed forward).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.segmentation.feature_perturbation import check_feature_perturbation, perturbed_features
from lightning_modules.segmentation.networks.unet3plus import main_output_only
from lightning_modules.segmentation.segmenter import Segmenter, _as_list, presence_loss


def cutmix_box(height: int, width: int, probability: float = 0.5, area_range: tuple[float, float] = (0.02, 0.4),
               ratio_range: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """A CutMix mask ``(H, W)``: with ``probability``, 1 inside one box of ``a H W`` pixels, ``a ~ U(area_range)``,
    aspect ratio ``r ~ U(ratio_range)`` (width ``sqrt(a H W / r)``, height ``sqrt(a H W r)``, truncated), at a
    uniform corner; ``r`` and the corner are drawn again until the box fits (``dataset/transform.py`` lines 66-84,
    ``obtain_cutmix_box``, for ``H x W`` crops). Draws from torch's global generator."""
    mask = torch.zeros(height, width)
    if float(torch.rand((), dtype=torch.float64)) > probability:
        return mask
    low, high = area_range
    area = (low + (high - low) * float(torch.rand((), dtype=torch.float64))) * height * width
    while True:
        ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * float(torch.rand((), dtype=torch.float64))
        box_w, box_h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        x, y = int(torch.randint(0, width, ())), int(torch.randint(0, height, ()))
        if x + box_w <= width and y + box_h <= height:
            break
    mask[y:y + box_h, x:x + box_w] = 1
    return mask


def unimatch_losses(strong_logits: tuple[torch.Tensor, torch.Tensor], fp_logits: torch.Tensor,
                    weak_logits: torch.Tensor, partner_logits: torch.Tensor,
                    boxes: tuple[torch.Tensor, torch.Tensor], threshold: float = 0.95) -> dict[str, torch.Tensor]:
    """UniMatch's three unlabeled terms from ``(U, C, H, W)`` logits; ``boxes`` are ``(U, H, W)`` 0/1 masks.

    With ``q = softmax(weak)`` (no gradient), ``y = argmax q``, ``c = max q``, and ``y'``, ``c'`` the same of the
    partner images' predictions (those pasted into the strong views inside ``box_k``):

    ``L_sk = mean_pixels 1[c_k >= tau] CE(strong_k, y_k)``, ``y_k = box_k ? y' : y`` (likewise ``c_k``), k = 1, 2;
    ``L_fp = mean_pixels 1[c >= tau] CE(fp, y)``.

    The mean runs over every pixel (``unimatch.py`` lines 176-186 divide by the pixels outside the padding's
    ignore mask; these crops are reflect-padded, so there is none). Also gives ``mask_ratio`` (fraction of weak
    pixels with ``c >= tau``, line 201).
    """
    conf, pseudo = weak_logits.detach().float().softmax(dim=1).max(dim=1)
    partner_conf, partner_pseudo = partner_logits.detach().float().softmax(dim=1).max(dim=1)
    losses = {}
    for k, (logits, box) in enumerate(zip(strong_logits, boxes), start=1):
        pasted = box.bool()
        target, confidence = torch.where(pasted, partner_pseudo, pseudo), torch.where(pasted, partner_conf, conf)
        losses[f"loss_strong{k}"] = _masked_mean_ce(logits, target, confidence >= threshold)
    losses["loss_fp"] = _masked_mean_ce(fp_logits, pseudo, conf >= threshold)
    losses["mask_ratio"] = (conf >= threshold).float().mean()
    return losses


def _masked_mean_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits.float(), target, reduction="none") * mask).mean()


class UniMatch(Segmenter):
    """Weak-to-strong consistency with two strong views and a feature-perturbed stream of the weak view.

    Loss (``unimatch.py`` line 188): ``L = (L_s + lambda_u [w_s (L_s1 + L_s2) + w_fp L_fp]) / 2`` with
    ``w_s = (1 - w_fp) / 2`` and the terms of :func:`unimatch_losses`. The weak view's prediction (training mode,
    no gradient) is the pseudo-label of three streams: the two strong views (each with its own photometric draw
    from the DataModule and its own CutMix box, inside which the strong view of another unlabeled image is
    pasted, with that image's pseudo-label), and the decoder's output on the weak view's encoder features with
    whole channels dropped (:mod:`~lightning_modules.segmentation.feature_perturbation`).

    One step, as the authors' loop (lines 135-155): the partner images' pseudo-labels from an eval-mode forward
    without gradient (line 136-140); one forward of labeled and weak images with the perturbed copy in the same
    batch (line 151); one forward of both mixed strong views (line 155). The partner of image ``i`` is image
    ``i - 1`` of the same unlabeled batch (``roll``), where the authors draw a second unlabeled batch; its weak
    view's pseudo-label and its strong views are the ones pasted. Boxes: :func:`cutmix_box`, one per strong
    view and image, with probability 0.5 (``dataset/semi.py`` lines 55 and 61).

    Paper recipe (Pascal VOC, DeepLabv3+ ResNet-101, ``configs/pascal.yaml``): tau = 0.95, CE labeled loss
    (``loss_terms: {ce: 1.0}``), SGD lr 0.001 (decoder x10) momentum 0.9 weight decay 1e-4, poly decay, 80 epochs,
    batch 8 labeled + 8 unlabeled, crop 321, no EMA; 75.2 mIoU with 92 labels. Supported networks: those of
    :func:`~lightning_modules.segmentation.feature_perturbation.check_feature_perturbation` (smp's but DPT, UNet 3+,
    RefineNet, LW-RefineNet).

    Args:
        threshold: tau, the confidence a weak pixel needs to supervise.
        fp_loss_weight: w_fp, the feature-perturbed stream's share of the unlabeled loss (the strong views split
            the rest).
        fp_dropout: channel-dropout probability of the feature perturbation.
        cutmix_probability: chance that a strong view gets a CutMix box.
        **kwargs: :class:`Segmenter` arguments.
    """

    unlabeled_views = ("weak", "strong", "strong2")
    supports_concat_forward = False  # the authors' two forwards, not one over every view
    progress_bar_terms = ("mask_ratio",)

    def __init__(self, threshold: float = 0.95, fp_loss_weight: float = 0.5, fp_dropout: float = 0.5,
                 cutmix_probability: float = 0.5, concat_forward: bool = False, **kwargs: Any) -> None:
        for name, value in (("threshold", threshold), ("fp_loss_weight", fp_loss_weight),
                            ("cutmix_probability", cutmix_probability)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"UniMatch's {name} must lie in [0, 1], got {value}")
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"UniMatch's fp_dropout must lie in [0, 1), got {fp_dropout}")
        super().__init__(concat_forward=concat_forward, **kwargs)  # the arguments above: hparams (save_hyperparameters)
        check_feature_perturbation(self.net, type(self).__name__)

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:  # no views asked for: the supervised step
            return super().compute_losses(batch)
        hp, weak = self.hparams, unlabeled["weak"]
        boxes = self.draw_boxes(len(weak), *weak.shape[-2:]).to(weak.device)  # (2, U, H, W)
        partner_logits = self.partner_logits(weak)
        mixed = [torch.where(box[:, None].bool(), unlabeled[v].roll(1, dims=0), unlabeled[v])
                 for box, v in zip(boxes, ("strong", "strong2"))]
        num_labeled, num_weak = len(labeled["image"]), len(weak)
        with perturbed_features(self.net, hp.fp_dropout):
            outputs = _as_list(self.net(torch.cat([labeled["image"], weak])))
        presence = getattr(self.net, "last_presence", None)  # UNet 3+'s CGM: labeled images' rows first
        clean = [o[: num_labeled + num_weak] for o in outputs]
        labeled_outputs = [o[:num_labeled] for o in clean]
        weak_logits, fp_logits = clean[0][num_labeled:], outputs[0][-num_weak:]
        with main_output_only(self.net):
            strong_logits = self.net(torch.cat(mixed)).chunk(2)
        losses = unimatch_losses(strong_logits, fp_logits, weak_logits, partner_logits.roll(1, dims=0),
                                 (boxes[0], boxes[1]), hp.threshold)
        strong_weight = (1.0 - hp.fp_loss_weight) / 2
        losses["unlabeled_loss"] = (strong_weight * (losses["loss_strong1"] + losses["loss_strong2"])
                                    + hp.fp_loss_weight * losses["loss_fp"])
        losses["labeled_loss"] = self.labeled_loss(labeled_outputs if len(outputs) > 1 else labeled_outputs[0],
                                                   labeled["target"])
        if presence is not None:
            losses["presence_loss"] = presence_loss(presence, labeled["target"])
        pseudo, targets = weak_logits.detach().argmax(dim=1), unlabeled["target"]
        known = targets >= 0  # -1 where the image has no mask; diagnostic only
        losses["pseudo_label_acc"] = ((pseudo == targets) & known).sum() / known.sum().clamp(min=1)
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The authors' mean of the labeled and unlabeled losses (``unimatch.py`` line 188)."""
        return super().total_loss(losses) / 2

    def draw_boxes(self, num_images: int, height: int, width: int) -> torch.Tensor:
        """``(2, N, H, W)`` CutMix masks: per image, strong view 1's box then view 2's (``semi.py`` lines 55, 61)."""
        p = self.hparams.cutmix_probability
        boxes = [[cutmix_box(height, width, p) for _ in range(2)] for _ in range(num_images)]
        return torch.stack([torch.stack([pair[k] for pair in boxes]) for k in range(2)])

    @torch.no_grad()
    def partner_logits(self, weak: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits of the weak views, without gradient (``unimatch.py`` lines 135-140)."""
        was_training = self.net.training
        self.net.eval()
        try:
            return _as_list(self.net(weak))[0]
        finally:
            self.net.train(was_training)

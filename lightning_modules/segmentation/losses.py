"""Segmentation losses: plain functions and thin ``nn.Module`` wrappers, no Lightning.

Every loss takes logits ``(N, C, H, W)`` and int64 targets ``(N, H, W)``. ``C == 1`` is a binary
task (sigmoid; target 1 = foreground), ``C >= 2`` a multi-class one (softmax). Everything is
computed in float32, also under autocast. With p the probabilities and t the one-hot targets
(for binary, the foreground channel only), sums running over the batch and the pixels:

- Dice:  ``1 - mean_c (2 sum p t + s) / (sum p + sum t + s)``
- IoU:   ``1 - mean_c (sum p t + s) / (sum p + sum t - sum p t + s)`` (Rahman & Wang 2016)
- focal: ``mean_pixels -alpha_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017)
- MS-SSIM: ``1 - mean_{image, c} MS-SSIM(p_c, t_c)`` (Wang et al. 2003)
- hybrid: focal + MS-SSIM + IoU, the UNet 3+ loss (Huang et al. 2020).

Dice, IoU and binary focal equal smp's losses when every class has true pixels (tested); why they
stay ours (absent classes, per-image sums, softmax focal): docs/segmentation.md.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 4 or targets.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (N, C, H, W) and targets (N, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")


def probabilities_and_targets(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, t)``, both float32 ``(N, C, H, W)``: sigmoid and the foreground mask for ``C == 1``,
    softmax and one-hot targets otherwise."""
    _check(logits, targets)
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), targets.unsqueeze(1).float()
    return logits.softmax(dim=1), F.one_hot(targets, logits.shape[1]).permute(0, 3, 1, 2).float()


def _overlap(logits: Tensor, targets: Tensor, per_image: bool) -> tuple[Tensor, Tensor]:
    p, t = probabilities_and_targets(logits, targets)
    dims = (2, 3) if per_image else (0, 2, 3)
    return (p * t).sum(dims), (p + t).sum(dims)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, per_image: bool = False) -> Tensor:
    """1 - soft Dice, averaged over classes (binary: the foreground only). Sums run over the whole
    batch, or over each image and then averaged when ``per_image``."""
    intersection, total = _overlap(logits, targets, per_image)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


def iou_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0, per_image: bool = False) -> Tensor:
    """1 - soft IoU (soft Jaccard), averaged over classes; UNet 3+'s IoU term is ``per_image=True``."""
    intersection, total = _overlap(logits, targets, per_image)
    return 1 - ((intersection + smooth) / (total - intersection + smooth)).mean()


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None) -> Tensor:
    """Mean over pixels of ``-alpha_t (1 - p_t)^gamma log p_t``; ``gamma=0, alpha=None`` is (B)CE.

    ``alpha``: a float weighs foreground ``alpha`` and background ``1 - alpha`` (binary only, as in
    RetinaNet); a sequence gives one weight per class (two, background first, for binary).
    """
    _check(logits, targets)
    logits = logits.float()
    if logits.shape[1] == 1:
        x, t = logits[:, 0], targets.float()
        log_pt = t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)
        num_classes = 2
    else:
        log_pt = logits.log_softmax(dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
        num_classes = logits.shape[1]
    loss = -(1 - log_pt.exp()).clamp_min(0) ** gamma * log_pt
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            if logits.shape[1] != 1:
                raise ValueError(f"a float alpha is for binary logits (C == 1); give {num_classes} class weights")
            alpha = (1 - alpha, alpha)
        weights = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        if weights.numel() != num_classes:
            raise ValueError(f"alpha has {weights.numel()} class weights, the task has {num_classes} classes")
        loss = weights[targets] * loss
    return loss.mean()


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    g = torch.exp(-0.5 * ((torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2) / sigma) ** 2)
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter per channel, 'valid' borders (as in the reference MS-SSIM)."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ms_ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, data_range: float = 1.0, floor: float = 1e-6) -> Tensor:
    """MS-SSIM per image and channel, ``(N, C)``, for maps ``x, y`` in ``[0, data_range]``.

    Scale j (j = 0, 1, ...) halves the size by 2x2 average pooling; only scales whose smaller side
    stays ``>= window_size`` are used, at most ``len(weights)``, and the used weights are
    renormalized to sum to 1. An image smaller than the window gets one scale with the window
    shrunk to its size (largest odd). The contrast-structure terms ``cs_j`` and the last scale's
    SSIM can be negative (anti-correlated maps) and a negative number to a fractional power is NaN:
    they are clamped to ``floor`` (the relu convention, but with a positive floor so the gradient
    stays finite), so MS-SSIM lies in ``[~floor, 1]``.
    """
    x, y = x.float(), y.float()
    smaller = min(x.shape[-2:])
    if smaller < window_size:
        window_size, scales = max(1, smaller - (smaller + 1) % 2), 1
    else:
        scales = min(len(weights), 1 + int(math.floor(math.log2(smaller / window_size))))
    w = torch.tensor(weights[:scales], dtype=torch.float32, device=x.device)
    w = w / w.sum()
    g = _gaussian_window(window_size, sigma, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    result = torch.ones(x.shape[:2], device=x.device)
    for j in range(scales):
        if j:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        mx, my = _blur(x, g), _blur(y, g)
        vx, vy, cov = _blur(x * x, g) - mx**2, _blur(y * y, g) - my**2, _blur(x * y, g) - mx * my
        cs = (2 * cov + c2) / (vx + vy + c2)
        term = cs if j < scales - 1 else cs * (2 * mx * my + c1) / (mx**2 + my**2 + c1)
        result = result * term.mean(dim=(2, 3)).clamp_min(floor) ** w[j]
    return result


def ms_ssim_loss(logits: Tensor, targets: Tensor, window_size: int = 11, sigma: float = 1.5,
                 weights: Sequence[float] = MS_SSIM_WEIGHTS) -> Tensor:
    """1 - MS-SSIM between each class's probability map and its target mask (binary: foreground),
    averaged over images and classes; see :func:`ms_ssim`. Runs outside autocast (float32)."""
    with torch.autocast(logits.device.type, enabled=False):
        p, t = probabilities_and_targets(logits, targets)
        return 1 - ms_ssim(p, t, window_size, sigma, weights).mean()


def cross_entropy_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for ``C >= 2``, binary cross-entropy with logits for ``C == 1``; pixel mean."""
    _check(logits, targets)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), targets.float())
    return F.cross_entropy(logits.float(), targets)


def hybrid_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
                smooth: float = 1.0) -> Tensor:
    """UNet 3+'s hybrid loss: focal + MS-SSIM + per-image IoU, equal weights."""
    return (focal_loss(logits, targets, gamma, alpha) + ms_ssim_loss(logits, targets)
            + iou_loss(logits, targets, smooth, per_image=True))


class _LossModule(nn.Module):
    loss_fn: Callable[..., Tensor]

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return type(self).loss_fn(logits, targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


class CrossEntropyLoss(_LossModule):
    """:func:`cross_entropy_loss` (CE for C >= 2, BCE-with-logits for C == 1)."""

    loss_fn = cross_entropy_loss


class DiceLoss(_LossModule):
    """:func:`dice_loss`; options ``smooth``, ``per_image``."""

    loss_fn = dice_loss


class IoULoss(_LossModule):
    """:func:`iou_loss`; options ``smooth``, ``per_image``."""

    loss_fn = iou_loss


class FocalLoss(_LossModule):
    """:func:`focal_loss`; options ``gamma``, ``alpha``."""

    loss_fn = focal_loss


class MSSSIMLoss(_LossModule):
    """:func:`ms_ssim_loss`; options ``window_size``, ``sigma``, ``weights``."""

    loss_fn = ms_ssim_loss


class HybridLoss(_LossModule):
    """:func:`hybrid_loss` (UNet 3+: focal + MS-SSIM + IoU); options ``gamma``, ``alpha``, ``smooth``."""

    loss_fn = hybrid_loss


LOSSES: dict[str, type[_LossModule]] = {
    "ce": CrossEntropyLoss, "dice": DiceLoss, "iou": IoULoss, "focal": FocalLoss, "ms_ssim": MSSSIMLoss,
    "hybrid": HybridLoss,
}


class SegmentationLoss(nn.Module):
    """Weighted sum of named losses: ``SegmentationLoss({"ce": 1.0, "dice": 1.0})`` (default).

    Names: ``ce``, ``dice``, ``iou``, ``focal``, ``ms_ssim``, ``hybrid`` (each with its defaults).
    ``terms(logits, targets)`` gives the unweighted value of each, for logging.
    """

    def __init__(self, terms: dict[str, float] | None = None) -> None:
        super().__init__()
        terms = {"ce": 1.0, "dice": 1.0} if terms is None else dict(terms)
        unknown = sorted(set(terms) - set(LOSSES))
        if unknown or not terms:
            raise ValueError(f"unknown loss term(s) {unknown or '(none given)'}: choose from {sorted(LOSSES)}")
        self.weights = terms
        self.losses = nn.ModuleDict({name: LOSSES[name]() for name in terms})

    def terms(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {name: loss(logits, targets) for name, loss in self.losses.items()}

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return sum(self.weights[name] * value for name, value in self.terms(logits, targets).items())


def deep_supervision_loss(outputs: Sequence[Tensor], targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                          weights: Sequence[float] | None = None) -> Tensor:
    """``sum_i w_i loss_fn(outputs[i], targets) / sum_i w_i`` (equal weights by default).

    Side outputs of another size than the targets are resized to it (bilinear) first, as UNet 3+
    upsamples its side outputs before the loss.
    """
    if not outputs:
        raise ValueError("deep_supervision_loss needs at least one output")
    weights = [1.0] * len(outputs) if weights is None else list(weights)
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
    size = targets.shape[-2:]
    total = sum(w * loss_fn(o if o.shape[-2:] == size else F.interpolate(o, size=size, mode="bilinear",
                                                                           align_corners=False), targets)
                for w, o in zip(weights, outputs))
    return total / sum(weights)

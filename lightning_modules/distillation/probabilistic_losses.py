"""Distillation losses that match probability distributions of features: PKT and VID. No Lightning.

Same conventions as :mod:`~lightning_modules.distillation.losses`: student first, teacher second and
detached, computed in float32, unweighted. VID's regressor is an ``nn.Module`` the optimizer trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conditional_probabilities(emb: torch.Tensor, eps: float) -> torch.Tensor:
    """``P[i, j] = K(e_i, e_j) / sum_k K(e_i, e_k)`` with the cosine kernel ``K = (cos + 1) / 2``, ``(N, N)``."""
    unit = emb / (emb.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): ``mean_{i, j} P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``.

    Each sample's similarities to the batch, under the cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2``,
    normalised into a conditional distribution ``P_ij`` (row ``i`` sums to 1); the loss is the KL
    divergence of the teacher's from the student's, so only the feature geometry transfers and the
    widths may differ. As the authors' code (passalis/probabilistic_kt ``nn/pkt.py:88-113``, copied
    by RepDistiller ``distiller_zoo/PKT.py`` and torchdistill ``PKTLoss``): each row's norm gets
    ``+ eps``, the self-pair ``j = i`` stays in (the paper's Eq. 4 leaves it out), and the sum is
    averaged over all ``N^2`` entries, not per sample. RepDistiller's CIFAR-100 recipe is CE 1 plus
    PKT weight 30000 on the pooled penultimate features (``scripts/run_cifar_distill.sh:19``,
    ``helper/loops.py:153-156``). Inputs ``(N, ...)`` are flattened.
    """
    if len(student_emb) != len(teacher_emb) or len(student_emb) < 2:
        raise ValueError(f"pkt_loss needs the same N >= 2 samples for student and teacher, got "
                         f"{len(student_emb)} and {len(teacher_emb)}")
    p_student = _conditional_probabilities(student_emb.float().flatten(1), eps)
    p_teacher = _conditional_probabilities(teacher_emb.detach().float().flatten(1), eps)
    return (p_teacher * ((p_teacher + eps) / (p_student + eps)).log()).mean()


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    """``softplus^-1(v) = v + log(1 - exp(-v))``: exact, and finite for large ``v`` where ``log(expm1(v))`` overflows."""
    return value + torch.log(-torch.expm1(-value))


def vid_loss(mean: torch.Tensor, variance: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """VID's negative Gaussian log-likelihood (Ahn et al., CVPR 2019, Eq. 6, constant dropped), element mean.

    ``mean_{n, c, h, w} 1/2 ((mu_nchw - t_nchw)^2 / sigma_c^2 + log sigma_c^2)``: ``mean`` is the student's
    prediction ``mu(f_s)`` in the teacher's ``(N, C, H, W)`` shape, ``variance`` the ``(C,)`` per-channel
    ``sigma^2``, both learned (:class:`VIDRegressor`).
    """
    if mean.shape != teacher_feature.shape or variance.shape != teacher_feature.shape[1:2]:
        raise ValueError(f"vid_loss needs the mean in the teacher's shape {tuple(teacher_feature.shape)} and one "
                         f"variance per channel, got {tuple(mean.shape)} and {tuple(variance.shape)}")
    variance = variance.float().view(1, -1, *([1] * (mean.ndim - 2)))
    squared = (mean.float() - teacher_feature.detach().float()).pow(2)
    return (0.5 * (squared / variance + variance.log())).mean()


class VIDRegressor(nn.Module):
    """VID's variational model of a teacher feature given a student feature (Ahn et al., CVPR 2019).

    ``mu`` is three 1x1 convolutions (ReLU between, no bias), ``student_channels -> mid -> mid ->
    teacher_channels``, ``mid`` the teacher's width; ``sigma_c^2 = softplus(alpha_c) + eps`` starts at
    ``init_variance``. ``forward(f_s, f_t)`` average-pools the larger map to the smaller size and returns
    :func:`vid_loss`. As RepDistiller ``distiller_zoo/VID.py:9-54`` (from the authors' code; mid = the
    teacher's channels, ``train_student.py:219-223``), whose CIFAR-100 recipe is CE 1 + VID 1 on the
    outputs of every block group but the last feature (``feat[1:-1]``, ``helper/loops.py:166-170``;
    ``scripts/run_cifar_distill.sh:15``). Flat ``(N, D)`` features are treated as ``(N, D, 1, 1)``.

    ``init_variance=None`` starts ``sigma_c^2`` at the teacher feature's mean square per channel, set by
    :meth:`initialize_variance_` from the first training batch (the Gaussian's maximum-likelihood variance for a
    zero mean). RepDistiller's fixed 5 presumes unit-scale features; a pre-activation group output of a deep
    residual network can be far larger (a WRN-40-2 whose BatchNorm statistics are not yet estimated: mean
    squares 13, 930 and 15,500 over its three groups), and then ``(mu - t) / sigma^2`` drives the SGD step on
    the regressor past stability (``configs/vid_cifar10.yaml`` diverged at step 5). Scaled by the data, the
    first loss is about ``1/2 (1 + log sigma^2)`` per element whatever the feature's scale.
    """

    def __init__(self, student_channels: int, teacher_channels: int, mid_channels: int | None = None,
                 init_variance: float | None = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        mid = mid_channels or teacher_channels
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, teacher_channels, 1, bias=False),
        )
        if init_variance is not None and init_variance <= eps:
            raise ValueError(f"init_variance must be > eps = {eps} (or None: from the first teacher batch), got {init_variance}")
        # softplus(alpha) + eps = init_variance at the start
        start = _inverse_softplus(torch.full((teacher_channels,), (init_variance or 1.0) - eps))
        self.alpha = nn.Parameter(start)
        self.eps = eps
        # saved in checkpoints, so a resumed run does not initialise again
        self.register_buffer("variance_initialized", torch.tensor(init_variance is not None))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps

    @torch.no_grad()
    def initialize_variance_(self, teacher_feature: torch.Tensor) -> None:
        """``sigma_c^2 = mean_{n, h, w} t_nchw^2`` (averaged over the ranks under DDP); marks the head initialised."""
        if teacher_feature.ndim == 2:
            teacher_feature = teacher_feature[:, :, None, None]
        mean_square = teacher_feature.float().pow(2).mean(dim=(0, 2, 3))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean_square)
            mean_square /= torch.distributed.get_world_size()
        self.alpha.copy_(_inverse_softplus(mean_square.clamp_min(2 * self.eps) - self.eps))
        self.variance_initialized.fill_(True)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if not self.variance_initialized:
            raise RuntimeError("this VIDRegressor was built with init_variance=None: call initialize_variance_(teacher_feature) "
                               "once before the first loss (KDStudent does so on the first training batch)")
        if student_feature.ndim == 2:
            student_feature = student_feature[:, :, None, None]
        if teacher_feature.ndim == 2:
            teacher_feature = teacher_feature[:, :, None, None]
        size = (min(student_feature.shape[2], teacher_feature.shape[2]), min(student_feature.shape[3], teacher_feature.shape[3]))
        if student_feature.shape[2:] != size:
            student_feature = F.adaptive_avg_pool2d(student_feature, size)
        if teacher_feature.shape[2:] != size:
            teacher_feature = F.adaptive_avg_pool2d(teacher_feature.detach(), size)
        return vid_loss(self.mean(student_feature), self.variance(), teacher_feature)

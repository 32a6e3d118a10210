"""Distillation losses that match probability distributions of features: PKT. Plain functions, no Lightning.

Same conventions as :mod:`~lightning_modules.distillation.losses`: student first, teacher second and
detached, computed in float32, unweighted.
"""

from __future__ import annotations

import torch


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

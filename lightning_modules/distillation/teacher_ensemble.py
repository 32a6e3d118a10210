"""Several frozen teachers as one: their soft targets averaged or weighted per sample by confidence. No Lightning.

Multi-teacher distillation (the KD survey, Gou et al., IJCV 2021, section 5.3 on multi-teacher distillation;
"Efficient Knowledge Distillation from an Ensemble of Teachers", Fukuda et al., Interspeech 2017, for the average;
"Confidence-Aware Multi-Teacher Knowledge Distillation", Zhang, Chen & Wang, ICASSP 2022, for per-sample weights):

    q_i = sum_k w_ik softmax(z_ik / T),      sum_k w_ik = 1

with ``w_ik = 1 / K`` (``mean``), ``w_ik ~ max_c softmax(z_ik)_c`` (``max_prob``: each teacher's confidence in its
own prediction) or ``w_ik = softmax_k(-H(softmax(z_ik)))`` (``entropy``: the teacher with the sharper prediction
weighs more). CA-MKD itself weights by each teacher's cross-entropy against the label; the two label-free
confidences here also serve unlabeled images. The ensemble's "logits" are ``T log q_i``: softmax at ``T`` gives
back exactly ``q_i``, so every response loss (Hinton KD, DKD, DIST) distils the mixture unchanged.

Teacher ``k``'s modules are addressed ``"<k>.<path>"`` (``"1.groups.2"``), so feature pairs name their teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.distillation.teacher_loading import load_teacher

WEIGHTINGS = ("mean", "max_prob", "entropy")


def teacher_weights(teacher_logits: Sequence[torch.Tensor], weighting: str) -> torch.Tensor:
    """``(K, N)`` per-sample weights of ``K`` teachers' ``(N, C)`` logits, summing to 1 over the teachers."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"teacher_weighting={weighting!r} is not one of {WEIGHTINGS}")
    probs = torch.stack([z.detach().float().softmax(dim=1) for z in teacher_logits])  # (K, N, C)
    if weighting == "mean":
        return torch.full(probs.shape[:2], 1.0 / len(probs), device=probs.device)
    if weighting == "max_prob":
        confidence = probs.amax(dim=2)
        return confidence / confidence.sum(dim=0, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=2)
    return (-entropy).softmax(dim=0)


def ensemble_logits(teacher_logits: Sequence[torch.Tensor], temperature: float, weighting: str = "mean") -> torch.Tensor:
    """``T log sum_k w_k softmax(z_k / T)``: logits whose softmax at ``T`` is the weighted mixture, ``(N, C)``."""
    weights = teacher_weights(teacher_logits, weighting)
    log_probs = torch.stack([F.log_softmax(z.detach().float() / temperature, dim=1) for z in teacher_logits])
    return temperature * torch.logsumexp(log_probs + weights.clamp_min(1e-12).log().unsqueeze(2), dim=0)


class TeacherEnsemble(nn.ModuleList):
    """Frozen teachers whose forward returns :func:`ensemble_logits` at ``temperature``.

    Usage::

        teachers = TeacherEnsemble([load_teacher(a, 10, 3), load_teacher(b, 10, 3)], temperature=4.0, weighting="entropy")
        soft_logits = teachers(images)       # softmax(soft_logits / 4) = the per-sample weighted mixture
    """

    def __init__(self, teachers: Sequence[nn.Module], temperature: float, weighting: str = "mean") -> None:
        if len(teachers) < 2:
            raise ValueError(f"a TeacherEnsemble needs at least 2 teachers, got {len(teachers)}: pass one teacher alone")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"teacher_weighting={weighting!r} is not one of {WEIGHTINGS}")
        super().__init__(teachers)
        self.temperature, self.weighting = temperature, weighting
        self.eval()

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # frozen teachers: BatchNorm and dropout always in inference mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ensemble_logits([teacher(images) for teacher in self], self.temperature, self.weighting)


def load_teachers(paths: str | Sequence[str], num_classes: int, in_channels: int, network: str | None = None,
                  network_kwargs: dict[str, Any] | None = None, temperature: float = 4.0,
                  weighting: str = "mean") -> nn.Module:
    """One teacher (:func:`load_teacher`: a student's checkpoint keys stay ``teacher.*``), or a :class:`TeacherEnsemble`
    of several; ``network`` and ``network_kwargs`` apply to every plain ``state_dict`` file."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths or weighting not in WEIGHTINGS:
        raise ValueError(f"teacher must name at least one file (got {paths}) and teacher_weighting be one of "
                         f"{WEIGHTINGS} (got {weighting!r})")
    teachers = [load_teacher(p, num_classes, in_channels, network, network_kwargs) for p in paths]
    return teachers[0] if len(teachers) == 1 else TeacherEnsemble(teachers, temperature, weighting)

"""Contrastive representation distillation (CRD; Tian, Krishnan & Isola, ICLR 2020). No Lightning.

Student and teacher features are embedded by a linear map and L2-normalised, ``v = g(f) / ||g(f)||``
(feat_dim 128). Two memories of ``N x feat_dim`` (``N`` the dataset's ``index`` space) hold a
momentum average of every sample's student and teacher embedding. For anchor ``i`` of the batch and
``K`` negatives ``j`` drawn at random from the ``N`` samples, the teacher anchor is scored against the
student memory and the student anchor against the teacher memory,

    h_t(i, j) = exp(<m^s_j, v^t_i> / T) / Z_t,     h_s(i, j) = exp(<m^t_j, v^s_i> / T) / Z_s,

with ``j = i`` the positive, and each side gets the NCE loss of Eq. 18 (noise ``P_n = 1 / N``)

    L_NCE(h) = -1/B sum_i [ log(h_i0 / (h_i0 + K P_n + eps)) + sum_{k >= 1} log(K P_n / (h_ik + K P_n + eps)) ],

``L_CRD = L_NCE(h_s) + L_NCE(h_t)``. ``Z = N * mean(exp(scores / T))`` is estimated once, from the first
batch, and kept. After the step the memory rows of the batch move to ``normalize(m * old + (1 - m) v)``.
This follows the authors' code: HobbitLong/RepDistiller ``crd/criterion.py:8-102`` (embedding, loss,
``ContrastLoss`` lines 51-76) and ``crd/memory.py:6-79`` (memories initialised uniform in
``+-1 / sqrt(feat_dim / 3)``, lines 19-21; ``Z`` lines 49-57; update lines 63-77); torchdistill's
``CRDLoss`` is a refactor of it. Defaults are RepDistiller's CIFAR-100 recipe (``train_student.py:81-85``):
feat_dim 128, K = 16384, T = 0.07, momentum 0.5; CE 1, KD 0, CRD weight 0.8
(``scripts/run_cifar_distill.sh:29``), on the pooled penultimate features (``helper/loops.py:130-133``, ``train_student.py:191-198``).

Two differences, both for running state that is exact under DDP and on resume: the memories are read
before the step and written after it (RepDistiller writes inside ``forward``, after reading the rows it
scores, so one step computes the same loss); and each anchor's ``K`` negatives are drawn uniformly with
replacement from all ``N`` samples by a generator keyed by ``(seed, step, index)``, so they do not depend
on the rank, the batch or the global RNG. RepDistiller's ``ContrastMemory`` draws uniformly with
replacement as well when given no indices (``memory.py:35-37``); its CIFAR loader instead passes ``K``
indices drawn from the *other classes* without replacement (``dataset/cifar100.py:166-168``), which needs
every sample's label, which our DataModules do not publish. With 10 classes about 1 in 10 of our
negatives shares the anchor's class. Scores are ``v @ memory^T`` over all ``N`` rows, gathered at the drawn
indices: the same numbers as RepDistiller's gathered ``bmm``, without its ``B x (K + 1) x feat_dim`` copy
(``benchmarks/crd_cost.py``: at N 50,000, B 64, K 16384 on one CPU thread, 0.22 s against 4.2 s forward + backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CRDEmbed(nn.Module):
    """``v = W f + b`` L2-normalised, ``(N, ...) -> (N, feat_dim)`` (RepDistiller ``crd/criterion.py:79-90``)."""

    def __init__(self, in_features: int, feat_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.linear(features.flatten(1))
        return z / z.pow(2).sum(dim=1, keepdim=True).sqrt()


def nce_loss(probabilities: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Eq. 18) of ``(B, 1 + K)`` normalised scores, positive in column 0, noise ``1 / num_samples``."""
    k = probabilities.shape[1] - 1
    noise = k / num_samples
    positive, negative = probabilities[:, 0], probabilities[:, 1:]
    log_d1 = (positive / (positive + noise + eps)).log()
    log_d0 = (noise / (negative + noise + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / len(probabilities)


def draw_contrast_indices(index: torch.Tensor, num_samples: int, num_negatives: int, step: int,
                          seed: int = 0) -> torch.Tensor:
    """``(B, 1 + K)``: each anchor's own ``index`` then ``K`` indices uniform in ``[0, num_samples)``.

    Each anchor's draw comes from its own generator seeded by ``(seed, step, index)``: the same on any
    rank, in any batch, before and after a resume.
    """
    rows = []
    for i in index.tolist():
        generator = torch.Generator(device=index.device)
        generator.manual_seed((seed * 1_000_003 + step) * 1_000_003 + i)
        rows.append(torch.randint(num_samples, (num_negatives,), generator=generator, device=index.device))
    negatives = torch.stack(rows) if rows else index.new_zeros((0, num_negatives))
    return torch.cat([index[:, None], negatives], dim=1)


class CRDLoss(nn.Module):
    """CRD's embedding heads, memories and loss (see the module docstring). The optimizer trains both heads
    (RepDistiller's ``trainable_list`` holds ``embed_s`` and ``embed_t``, ``train_student.py:197-198``).

    State: buffers ``memory_student``, ``memory_teacher`` (``N x feat_dim``) and ``normalizer`` (``Z_s, Z_t``,
    -1 until set). :meth:`forward` reads them and returns the loss and its observation; :meth:`update_` writes.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_samples: int = 0, feat_dim: int = 128,
                 nce_k: int = 16384, temperature: float = 0.07, momentum: float = 0.5, eps: float = 1e-7,
                 seed: int = 0) -> None:
        super().__init__()
        if nce_k < 1 or temperature <= 0 or not 0 <= momentum < 1 or feat_dim < 1:
            raise ValueError(f"CRD needs nce_k >= 1, temperature > 0, 0 <= momentum < 1 and feat_dim >= 1, got "
                             f"nce_k={nce_k}, temperature={temperature}, momentum={momentum}, feat_dim={feat_dim}")
        self.embed_student = CRDEmbed(student_dim, feat_dim)
        self.embed_teacher = CRDEmbed(teacher_dim, feat_dim)
        self.feat_dim, self.nce_k, self.temperature, self.momentum, self.eps, self.seed = (
            feat_dim, nce_k, temperature, momentum, eps, seed)
        self.register_buffer("memory_student", torch.empty(0, feat_dim))
        self.register_buffer("memory_teacher", torch.empty(0, feat_dim))
        # float64: Z ~ N * mean(exp(s / T)) is large, and its mean over ranks must round as over one batch
        self.register_buffer("normalizer", torch.full((2,), -1.0, dtype=torch.float64))
        if num_samples:
            self.reset_memory(num_samples)

    @property
    def num_samples(self) -> int:
        return len(self.memory_student)

    @torch.no_grad()
    def reset_memory(self, num_samples: int) -> None:
        """Fresh memories of ``num_samples`` rows, uniform in ``+-1/sqrt(feat_dim/3)``, the same on every rank."""
        generator = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.memory_student.device
        for name in ("memory_student", "memory_teacher"):
            memory = torch.rand(num_samples, self.feat_dim, generator=generator).mul_(2 * bound).sub_(bound)
            setattr(self, name, memory.to(device))
        self.normalizer = torch.full((2,), -1.0, dtype=torch.float64, device=device)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor, index: torch.Tensor,
                step: int, mean=None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(L_CRD, observation)``; ``mean`` averages a scalar over ranks (the first step's ``Z``)."""
        if self.num_samples == 0:
            raise RuntimeError("CRD's memory is empty: give num_samples (the size of the data's index space) or "
                               "train with a DataModule that publishes data_facts()")
        if int(index.max()) >= self.num_samples or int(index.min()) < 0:
            raise ValueError(f"CRD got sample indices in [{int(index.min())}, {int(index.max())}] for a memory of "
                             f"{self.num_samples} rows: num_samples must cover the data's whole index space")
        v_student = self.embed_student(student_features.float())
        v_teacher = self.embed_teacher(teacher_features.detach().float())
        contrast = draw_contrast_indices(index, self.num_samples, self.nce_k, step, self.seed)
        # teacher anchors against the student memory, student anchors against the teacher memory
        scores_teacher = (v_teacher @ self.memory_student.T).gather(1, contrast).div(self.temperature).exp()
        scores_student = (v_student @ self.memory_teacher.T).gather(1, contrast).div(self.temperature).exp()
        normalizer = self.normalizer
        if bool(normalizer[0] < 0):
            observed = torch.stack([scores_student.detach().double().mean(), scores_teacher.detach().double().mean()])
            normalizer = (observed if mean is None else mean(observed)) * self.num_samples
        z_student, z_teacher = normalizer.float()
        loss = (nce_loss(scores_student / z_student, self.num_samples, self.eps)
                + nce_loss(scores_teacher / z_teacher, self.num_samples, self.eps))
        return loss, (index, v_student.detach(), v_teacher.detach(), normalizer[None].detach())

    @torch.no_grad()
    def update_(self, index: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor,
                normalizer: torch.Tensor) -> None:
        """Move the rows ``index`` towards the embeddings; an index seen twice keeps its last row. Set ``Z`` once."""
        if bool(self.normalizer[0] < 0):
            self.normalizer.copy_(normalizer[0])
        index, order = torch.sort(index.to(self.memory_student.device), stable=True)
        last = torch.ones_like(index, dtype=torch.bool)
        last[:-1] = index[1:] != index[:-1]
        index, order = index[last], order[last]
        for memory, v in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
            rows = memory[index] * self.momentum + v[order].to(memory.dtype) * (1 - self.momentum)
            memory[index] = F.normalize(rows, dim=1, eps=0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "memory_student")
        if saved is not None and saved.shape != self.memory_student.shape:  # sized by the checkpoint's data
            for name in ("memory_student", "memory_teacher"):
                setattr(self, name, torch.empty_like(saved, device=self.memory_student.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

"""SimMatch (Zheng et al., CVPR 2022, "SimMatch: Semi-supervised Learning with Similarity Matching"), as USB
runs it on CIFAR-like data."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.ssl.embedding_method import QueueAlignedMethod
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.memory_bank import LabeledBank, size_labeled_bank
from lightning_modules.ssl.threshold_state import gather_rows


class SimMatch(QueueAlignedMethod):
    """FixMatch whose soft pseudo-labels are mixed with labels propagated from a labeled memory bank, plus a
    similarity-matching loss over that bank.

    The bank holds an embedding ``k_j`` (L2-normalized) and class ``y_j`` of each of the ``K`` labeled
    samples. With ``p = DA(softmax(f(weak(u))))`` (aligned to uniform), ``z_w``, ``z_s`` the embeddings of
    the weak and strong views and ``T`` the temperature:

    * similarities: ``q_j = softmax_j(z_w . k_j / T)`` (teacher), ``s_j = softmax_j(z_s . k_j / T)`` (student);
    * unfolding: ``q^_j = q_j p_{y_j} / sum_l q_l p_{y_l}``;
    * aggregation: ``p^_c = alpha p_c + (1 - alpha) sum_{j: y_j = c} q_j``;
    * ``L = L_s + lambda_u 1/(mu B) sum_b 1[max p^_b >= tau] H(p^_b, p(y | strong(u_b)))
      + lambda_in 1/(mu B) sum_b H(q^_b, s_b)``, ``H`` the cross-entropy to soft targets.

    In the first ``bank_warmup_epochs`` (USB: epoch 0) ``L_in = 0`` and ``p^ = p``. After each optimizer step
    the labeled batch's embeddings move their rows: ``k_j <- normalize(0.7 k_j + 0.3 z(x_j))``, ``y_j <- y``.

    Against the authors' code: USB ``semilearn/algorithms/simmatch/simmatch.py`` lines 133-143 (the bank),
    186-221 (alignment, unfolding, aggregation, the two losses, the epoch-0 switch) and the queue-based
    alignment of ``hooks/dist_align.py`` lines 77-137 (``da_len`` batch means, uniform target), pinned over
    several steps by ``tests/lightning_modules/ssl/test_simmatch_comatch.py``. USB's ImageNet variant (an EMA
    teacher's labeled embeddings, rows replaced) is ``bank_momentum=0`` without the teacher: not built.
    Under DDP the bank takes every rank's labeled rows (USB gathers them too) and the alignment queue every
    rank's batch mean (USB gathers the probabilities).

    Recipe as USB runs it (CIFAR-10 40 labels, WRN-28-2, ``config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml``):
    T = 0.1, tau = 0.95, proj_size 128, K = the labeled set, alpha = 0.9, lambda_in = 1, lambda_u = 1,
    da_len 32, bank momentum 0.7, EPASS (3 heads), mu = 7, B = 64, SGD 0.03, cosine over 2^20 steps,
    EMA 0.999 (USB's CIFAR-10 error at 40 labels: 5.18 %).

    Args:
        temperature: T of both similarity distributions.
        threshold: tau, the confidence the aggregated pseudo-label must reach.
        smoothing_alpha: alpha, the weight of the class prediction against the propagated labels.
        bank_momentum: m of the labeled bank's rows (0: replace).
        num_labeled: the bank's size when the DataModule publishes no ``labeled_indices`` (bare loaders);
            the labeled batches' ``index`` must then be ``0 .. num_labeled - 1``.
        in_loss_weight: lambda_in.
        proj_size: the embedding width (128).
        **kwargs: :class:`QueueAlignedMethod` arguments.
    """

    unlabeled_views = ("weak", "strong")
    extra_loss = "in_loss"

    def __init__(self, temperature: float = 0.1, threshold: float = 0.95, smoothing_alpha: float = 0.9,
                 bank_momentum: float = 0.7, num_labeled: int | None = None, in_loss_weight: float = 1.0,
                 proj_size: int = 128, **kwargs: Any) -> None:
        super().__init__(proj_size=proj_size, **kwargs)
        self.extra_loss_weight = in_loss_weight
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if not 0.0 <= smoothing_alpha <= 1.0:
            raise ValueError(f"smoothing_alpha must lie in [0, 1] (1: no label propagation), got {smoothing_alpha}")
        self.temperature, self.threshold, self.smoothing_alpha = temperature, threshold, smoothing_alpha
        self.bank = LabeledBank(proj_size, bank_momentum, size=num_labeled or 0)

    def on_fit_start(self) -> None:
        size_labeled_bank(self.bank, self.data_facts, type(self).__name__)
        super().on_fit_start()

    def embedding_loss(self, logits: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor],
                       labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bank, bank_labels = self.bank.features, self.bank.labels
        probs = self.aligned_probs(logits["weak"])
        with torch.no_grad():
            teacher_orig = torch.softmax(embeddings["weak"].detach() @ bank.T / self.temperature, dim=1)
            teacher = teacher_orig * probs[:, bank_labels]  # unfolding: p of each bank row's class
            teacher = teacher / teacher.sum(dim=1, keepdim=True)
            propagated = torch.zeros_like(probs).index_add_(1, bank_labels, teacher_orig)  # aggregation
            smoothed = self.smoothing_alpha * probs + (1.0 - self.smoothing_alpha) * propagated
        student = torch.log_softmax(embeddings["strong"] @ bank.T / self.temperature, dim=1)
        in_loss = -(teacher * student).sum(dim=1).mean()
        if not self.bank_warmed_up():  # USB's epoch 0: no similarity loss, no propagated labels
            in_loss, smoothed = in_loss * 0.0, probs
        confidence, pseudo_labels = smoothed.max(dim=1)
        mask = (confidence >= self.threshold).to(probs.dtype)
        slots = self.bank.slots_of(labeled["index"])
        self.step_state.propose(self.bank.update_, *(gather_rows(self, t) for t in (
            slots, embeddings["labeled"].detach(), labeled["target"])))
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], smoothed, mask),
            "in_loss": in_loss,
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, unlabeled["target"], mask),
        }

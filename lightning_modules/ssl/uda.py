"""UDA (Xie et al., NeurIPS 2020, "Unsupervised Data Augmentation for Consistency Training")."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_criterion
from lightning_modules.ssl.losses import masked_accuracy

#: alpha(t) of Training Signal Annealing for training progress ``t`` in [0, 1]
TSA_SCHEDULES = {
    "linear": lambda t: t,
    "log": lambda t: 1.0 - math.exp(-5.0 * t),
    "exp": lambda t: math.exp(5.0 * (t - 1.0)),
}


def tsa_threshold(schedule: str, step: int, total_steps: int, num_classes: int) -> float:
    """``eta_t = alpha_t (1 - 1/K) + 1/K`` with ``alpha_t`` from ``schedule`` at ``t = step / total_steps``.

    ``t`` is clipped to [0, 1]; ``eta_t`` grows from ``1/K`` (chance) to 1.
    """
    if schedule not in TSA_SCHEDULES:
        raise ValueError(f"tsa must be one of {sorted(TSA_SCHEDULES)} or None, got {schedule!r}")
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return TSA_SCHEDULES[schedule](t) * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def tsa_mask(logits: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 for labeled examples whose correct-class probability is at most ``threshold``, else 0 (float, no gradient)."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    correct = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (correct <= threshold).to(probs.dtype)


class UDA(SemiSupervisedModule):
    """Consistency between a sharpened prediction on the weak view and the prediction on the strong view.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b 1[max p_b >= tau] KL(q_b || p(y | strong(u_b)))``
    with ``p_b = softmax(logits(weak(u_b)))``, ``q_b = softmax(logits(weak(u_b)) / T)`` and no
    gradient through ``p_b`` or ``q_b``. Masked samples count as 0 in the mean (FixMatch's convention).

    Training Signal Annealing (``tsa``): a labeled example's cross-entropy is dropped while its
    correct-class probability exceeds ``eta_t = alpha_t (1 - 1/K) + 1/K``, ``t`` = optimizer step /
    ``trainer.estimated_stepping_batches``, ``alpha_t`` = ``t`` (``"linear"``), ``1 - exp(-5 t)``
    (``"log"``) or ``exp(5 (t - 1))`` (``"exp"``). The labeled loss is then the mean over the
    examples kept (0 when none is), as in the paper's code.

    Against the authors' code (google-research/uda ``image/main.py`` lines 178-190, 261-290,
    352-385, pinned by ``tests/lightning_modules/ssl/test_ssl_references.py``): the same losses. USB
    (``algorithms/uda/uda.py`` lines 75-101) differs twice: it logs the cross-entropy to the soft
    targets, larger than the KL by their entropy (the same gradient), and its TSA masks by the
    largest probability over all classes and averages over every labeled row.

    Recipe (CIFAR-10, 4000 labels, WRN-28-2): T = 0.4, tau = 0.8, lambda_u = 1, mu = 7
    (``--data.uratio``), B = 64, and the FixMatch-family optimizer (SGD 0.03 Nesterov, weight
    decay 5e-4, cosine 7/16 over 2^20 steps, EMA 0.999); weak = flip + crop, strong = RandAugment
    + Cutout (the DataModule's views). TSA is off by default; the paper uses it mostly where
    labels are very few.

    Args:
        temperature: softmax temperature T of the target distribution (sharpening when < 1).
        threshold: confidence threshold tau on the untempered weak-view prediction.
        tsa: ``"linear"``, ``"log"``, ``"exp"`` or ``None`` (no annealing).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "strong")

    def __init__(self, temperature: float = 0.4, threshold: float = 0.8, tsa: str | None = None, **kwargs: Any) -> None:
        refuse_criterion(type(self).__name__, kwargs.get("criterion", "ce"))  # its labeled loss is the TSA-masked CE
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if tsa is not None and tsa not in TSA_SCHEDULES:
            raise ValueError(f"tsa must be one of {sorted(TSA_SCHEDULES)} or None, got {tsa!r}")
        self.temperature, self.threshold, self.tsa = temperature, threshold, tsa
        self._tsa_kept: torch.Tensor | None = None

    # --- labeled loss with Training Signal Annealing ---------------------------------------
    def total_steps(self) -> int:
        """Length of the TSA schedule: the trainer's optimizer steps (1 without a trainer)."""
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if trainer is None:
            return 1
        return max(1, int(trainer.estimated_stepping_batches))

    def tsa_threshold(self) -> float:
        return tsa_threshold(self.tsa, self.global_step, self.total_steps(), self.hparams.num_classes)

    def labeled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tsa is None:
            self._tsa_kept = None
            return F.cross_entropy(logits, targets)
        mask = tsa_mask(logits, targets, self.tsa_threshold())
        self._tsa_kept = mask.mean()
        return (F.cross_entropy(logits, targets, reduction="none") * mask).sum() / mask.sum().clamp(min=1)

    # --- consistency ------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weak = logits["weak"].detach().float()
        confidence, guess = torch.softmax(weak, dim=1).max(dim=1)
        mask = (confidence >= self.threshold).to(weak.dtype)
        target = torch.softmax(weak / self.temperature, dim=1)
        log_pred = torch.log_softmax(logits["strong"].float(), dim=1)
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_pred)).sum(dim=1)
        return {
            "unlabeled_loss": (kl * mask).mean(),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(guess, batch["target"], mask),
        }

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(batch)
        if self._tsa_kept is not None:
            losses["tsa_kept_ratio"] = self._tsa_kept
            losses["tsa_threshold"] = torch.tensor(self.tsa_threshold())
        return losses

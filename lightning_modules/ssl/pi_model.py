"""Pi-model (Laine & Aila, ICLR 2017, "Temporal Ensembling for Semi-Supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import RAMPUP_STEPS_40_PERCENT


def softmax_mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1/(N C) sum_n ||softmax(logits_n) - targets_n||^2``: the squared error of Laine & Aila
    and Tarvainen & Valpola, averaged over samples and classes. ``targets`` are probabilities."""
    return F.mse_loss(torch.softmax(logits.float(), dim=1), targets.float())


class PiModel(SemiSupervisedModule):
    """Two stochastic passes over two augmentations of the same image should agree.

    Loss: ``L = L_s + w(t) * 1/(mu B C) sum_b ||softmax(z_b) - sg(softmax(z~_b))||^2`` with
    ``z = logits(weak(u))``, ``z~ = logits(weak2(u))`` (independent augmentation draws, and
    independent dropout when the network has any), ``w(t) = lambda_u exp(-5 (1 - t)^2)``.

    ``sg`` (stop-gradient on the second branch) is the default, as in TorchSSL and USB whose
    numbers the reference table holds; Laine & Aila backpropagate through both branches, which
    ``detach_target=False`` restores.

    Recipe behind the reference numbers (TorchSSL, CIFAR-10, WRN-28-2, 4000 labels, 13.13 % error),
    the defaults here: lambda_u = 10 (TorchSSL ``pimodel.py`` line 297) ramped up over the first
    40 % of 2^20 steps (419,430; pass ``rampup_steps`` for shorter runs), mu = 1, B = 64, SGD lr 0.03
    Nesterov momentum 0.9, weight decay 5e-4, cosine 7/16, EMA 0.999. The ramp is the paper's
    ``exp(-5 (1 - t)^2)``; TorchSSL and USB ramp linearly (``rampup="linear"``). (The paper:
    w_max = 100 scaled by labeled/total, Gaussian ramp over 80 of 300 epochs, Adam.)

    Args:
        detach_target: no gradient through the ``weak2`` branch.
        unlabeled_loss_weight, rampup, rampup_steps: lambda_u and its ramp-up (defaults above).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "weak2")

    def __init__(self, detach_target: bool = True, unlabeled_loss_weight: float = 10.0, rampup: str | None = "sigmoid",
                 rampup_steps: int = RAMPUP_STEPS_40_PERCENT, **kwargs: Any) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)
        self.detach_target = detach_target

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = torch.softmax(logits["weak2"].float(), dim=1)
        if self.detach_target:
            target = target.detach()
        return {"unlabeled_loss": softmax_mse(logits["weak"], target)}

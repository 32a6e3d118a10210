"""Pi-model (Laine & Aila, ICLR 2017, "Temporal Ensembling for Semi-Supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.semi_supervised import SemiSupervisedModule


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

    Recipe behind the reference numbers (TorchSSL, CIFAR-10, WRN-28-2, 4000 labels, 13.13 % error):
    lambda_u = 10 ramped with the sigmoid-shaped ramp over the first 40 % of 2^20 steps, mu = 1,
    B = 64, SGD lr 0.03 Nesterov momentum 0.9, weight decay 5e-4, cosine 7/16, EMA 0.999. (The
    paper: w_max = 100 scaled by labeled/total, Gaussian ramp over 80 of 300 epochs, Adam.)

    Args:
        detach_target: no gradient through the ``weak2`` branch.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "weak2")

    def __init__(self, detach_target: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("rampup", "sigmoid")
        super().__init__(**kwargs)
        self.detach_target = detach_target

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = torch.softmax(logits["weak2"].float(), dim=1)
        if self.detach_target:
            target = target.detach()
        return {"unlabeled_loss": softmax_mse(logits["weak"], target)}

"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, "Mean teachers are better role models:
Weight-averaged consistency targets improve semi-supervised deep learning results")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.pi_model import softmax_mse
from lightning_modules.semi_supervised import SemiSupervisedModule


class MeanTeacher(SemiSupervisedModule):
    """The student's prediction should agree with that of its exponential moving average.

    Loss: ``L = L_s + w(t) * 1/(mu B C) sum_b ||softmax(f_theta(weak2(u_b))) - sg(softmax(f_theta'(weak(u_b))))||^2``
    with student weights ``theta``, teacher weights ``theta' <- d theta' + (1 - d) theta`` after
    every optimizer step and ``w(t) = lambda_u exp(-5 (1 - t)^2)``. The two views are
    independent augmentation draws.

    The teacher is the base's evaluation EMA (``self.ema.module``), not a second copy, so
    ``ema_decay`` must be set. It runs in eval mode: BatchNorm uses its running statistics
    (copied from the student by the EMA), and the teacher forward changes no state. (The
    official code runs the teacher in train mode, i.e. with batch statistics.) The student
    forward covers the labeled batch and the ``weak2`` view; the teacher forward, under
    ``no_grad``, the ``weak`` view. The consistency gradient therefore reaches the student
    through its own prediction (USB feeds the teacher's output in as the student's prediction,
    which leaves the unlabeled loss without gradient).

    Recipe behind the reference numbers (TorchSSL, CIFAR-10, WRN-28-2, 4000 labels, 8.10 % error):
    lambda_u = 50 ramped with the sigmoid-shaped ramp over the first 40 % of 2^20 steps,
    d = 0.999, mu = 1, B = 64, SGD lr 0.03 Nesterov momentum 0.9, weight decay 5e-4, cosine 7/16.

    Args:
        **kwargs: :class:`SemiSupervisedModule` arguments; ``ema_decay`` is the teacher's d.
    """

    unlabeled_views = ("weak", "weak2")
    supports_rdrop = False  # its own forward: student and teacher on two views

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rampup", "sigmoid")
        if kwargs.get("ema_decay", 0.999) is None:
            raise ValueError("MeanTeacher needs ema_decay: its teacher is the EMA of the student")
        super().__init__(**kwargs)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.ema.module

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:
            return super().compute_losses(batch)
        labeled_logits, student_logits = self.forward_views([labeled["image"], unlabeled["weak2"]])
        with torch.no_grad():
            teacher_logits = self.teacher(unlabeled["weak"])
        losses = {"labeled_loss": self.labeled_loss(labeled_logits, labeled["target"])}
        losses.update(self.unlabeled_loss({"weak": teacher_logits, "weak2": student_logits}, unlabeled))
        return losses

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``logits["weak2"]``: the student's (with gradient); ``logits["weak"]``: the teacher's."""
        teacher_probs = torch.softmax(logits["weak"].detach().float(), dim=1)
        return {"unlabeled_loss": softmax_mse(logits["weak2"], teacher_probs)}

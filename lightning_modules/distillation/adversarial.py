"""Adversarial distillation: a discriminator tells the teacher's outputs from the student's. No Lightning.

After the KD survey (Gou et al., IJCV 2021, section 4.2, adversarial distillation) and Xu, Hsu & Huang,
"Training Student Networks for Acceleration with Conditional Adversarial Networks" (BMVC 2018), whose
discriminator is a small fully connected network on the networks' outputs. With ``D(z)`` the discriminator's
logit of "this came from the teacher", ``BCE`` the binary cross-entropy on logits and ``x(z)`` what ``D`` reads:

    L_D   = BCE(D(x(z_t)), 1) + BCE(D(x(sg(z_s))), 0)    trains D only (the student's logits are detached)
    L_adv = BCE(D_sg(x(z_s)), 1)                         trains the student only (non-saturating GAN loss)

``D_sg`` is ``D`` with its parameters detached (``torch.func.functional_call``), so the student's term gives
the discriminator no gradient and ``L_D`` gives the student none: both terms can be added to one loss and
stepped by one optimizer (this repository's Lightning form: no manual optimization, no second optimizer,
so FGM, PGD, EMA and gradient accumulation work unchanged). The teacher's logits are detached targets.

The discriminator's own step size (issue 19). Stepped like the student (SGD, lr 0.05, Nesterov momentum 0.9)
on raw logits, ``D`` overshoots: on the KD table's CPU budget its mean verdict on the student's logits
flipped sign from step to step with a growing amplitude (-15 at step 20, -245 at step 32, -2,094 at step 38),
and the student's term, whose gradient grows with ``D``'s slope, then blew the student's weights up (NaN at
step 43; ``benchmarks/adversarial_probe.py``). By default ``x(z)`` is the class probabilities ``softmax(z)``
(``"softmax"``): a point of the simplex whatever the logits' scale, so ``D``'s input, and its weights'
gradients, cannot grow with the logits; ``"logits"`` keeps the raw logits. ``discriminator_parameter_groups``
gives ``D`` a learning rate of its own inside the one optimizer.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_modules.core.optimization import decay_groups

DISCRIMINATOR_INPUTS = ("softmax", "logits")


class LogitDiscriminator(nn.Sequential):
    """``C -> hidden -> hidden -> 1`` perceptron with LeakyReLU(0.2) on ``x(z)``: the logit of "teacher".

    ``inputs="softmax"`` reads the class probabilities ``softmax(z)``, ``"logits"`` reads ``z`` itself."""

    def __init__(self, num_classes: int, hidden: int = 256, inputs: str = "softmax") -> None:
        if inputs not in DISCRIMINATOR_INPUTS:
            raise ValueError(f"discriminator_input must be one of {list(DISCRIMINATOR_INPUTS)}, got {inputs!r}")
        super().__init__(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                         nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.inputs = inputs

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        return super().forward(x.softmax(dim=1) if self.inputs == "softmax" else x)


def build_discriminator(num_classes: int, weight: float, lr: float | None, inputs: str) -> LogitDiscriminator | None:
    """The discriminator of ``KDStudent(adversarial_weight=weight)`` (None when 0), its options checked."""
    if weight < 0:
        raise ValueError(f"adversarial_weight must be >= 0 (0 turns it off), got {weight}")
    if lr is not None and lr <= 0:
        raise ValueError(f"discriminator_lr must be > 0 (None: the student's lr), got {lr}")
    return LogitDiscriminator(num_classes, inputs=inputs) if weight > 0 else None


def discriminator_parameter_groups(modules: Iterable[nn.Module], discriminator: nn.Module | None,
                                   lr: float | None) -> list[dict[str, Any]]:
    """:func:`decay_groups` of ``modules`` with the discriminator's parameters in groups of their own at ``lr``
    (the optimizer's weight decay and momentum, and the schedule's factor, apply to them as to the rest)."""
    others = [m for m in modules if m is not discriminator]
    if discriminator is None:
        return decay_groups(others)
    own = decay_groups([discriminator])
    return decay_groups(others) + ([{**group, "lr": lr} for group in own] if lr is not None else own)


def discriminator_loss(discriminator: nn.Module, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``L_D``: teacher logits labelled 1, student logits 0, mean BCE over both; reaches only ``discriminator``."""
    real = discriminator(teacher_logits.detach().float()).squeeze(1)
    fake = discriminator(student_logits.detach().float()).squeeze(1)
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def adversarial_loss(discriminator: nn.Module, student_logits: torch.Tensor) -> torch.Tensor:
    """``L_adv``: the student's logits labelled "teacher" by a discriminator whose parameters are detached."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    fake = functional_call(discriminator, frozen, (student_logits.float(),)).squeeze(1)
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

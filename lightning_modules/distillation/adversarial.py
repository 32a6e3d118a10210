"""Adversarial distillation: a discriminator tells the teacher's logits from the student's. No Lightning.

After the KD survey (Gou et al., IJCV 2021, section 4.2, adversarial distillation) and Xu, Hsu & Huang,
"Training Student Networks for Acceleration with Conditional Adversarial Networks" (BMVC 2018), whose
discriminator is a small fully connected network on the logits. With ``D(z)`` the discriminator's logit of
"this came from the teacher" and ``BCE`` the binary cross-entropy on logits:

    L_D   = BCE(D(z_t), 1) + BCE(D(sg(z_s)), 0)        trains D only (the student's logits are detached)
    L_adv = BCE(D_sg(z_s), 1)                          trains the student only (non-saturating GAN loss)

``D_sg`` is ``D`` with its parameters detached (``torch.func.functional_call``), so the student's term gives
the discriminator no gradient and ``L_D`` gives the student none: both terms can be added to one loss and
stepped by one optimizer (this repository's Lightning form: no manual optimization, no second optimizer,
so FGM, PGD, EMA and gradient accumulation work unchanged). The teacher's logits are detached targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class LogitDiscriminator(nn.Sequential):
    """``C -> hidden -> hidden -> 1`` perceptron with LeakyReLU(0.2): the logit of "teacher"."""

    def __init__(self, num_classes: int, hidden: int = 256) -> None:
        super().__init__(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                         nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


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

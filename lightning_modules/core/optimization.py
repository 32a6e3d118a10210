"""The shared optimizer recipe: parameter groups that keep weight decay off biases and norm weights,
SGD, FixMatch's cosine learning-rate schedule, ``lr = lr0 * cos(7 pi k / 16 K)``, as pieces and as the
:class:`OptimizerRecipe` the base module mixes in, and the ramp-ups of a loss weight (lambda_u from 0
to its value)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def decay_groups(modules: Iterable[nn.Module]) -> list[dict[str, Any]]:
    """The trainable parameters of ``modules`` in two groups: weights, which take the optimizer's weight
    decay, and biases and norm weights (1-d), which take none."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int = 0, fraction: float = 7 / 16) -> float:
    """Learning-rate factor: linear warm-up, then ``cos(pi * fraction * step / total)``."""
    if step < warmup:
        return (step + 1) / warmup
    return math.cos(math.pi * fraction * min(step, total) / total)


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                    fraction: float = 7 / 16) -> dict[str, Any]:
    """Lightning's scheduler entry for :func:`cosine_with_warmup` over ``total`` steps, stepped every step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: cosine_with_warmup(k, total, warmup, fraction))
    return {"scheduler": scheduler, "interval": "step"}


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(step: int, length: int) -> float:
    """``t = step / length`` clipped to [0, 1] (MixMatch, Pseudo-Label's alpha(t))."""
    if length <= 0:
        return 1.0
    return min(max(step / length, 0.0), 1.0)


RAMPUPS = {"sigmoid": sigmoid_rampup, "linear": linear_rampup}


def scheduled_regularizers(module: nn.Module) -> list[nn.Module]:
    """The submodules with a ``training_progress`` attribute: scheduled regularizers (DropBlock's linear
    keep-rate ramp), found once so that a training step does not walk the whole network."""
    return [submodule for submodule in module.modules() if hasattr(submodule, "training_progress")]


def set_training_progress(regularizers: list[nn.Module], fraction: float) -> None:
    """Tell each of :func:`scheduled_regularizers` the fraction of training done, ``global_step / total
    steps`` in [0, 1]."""
    for submodule in regularizers:
        submodule.training_progress = fraction


class OptimizerRecipe:
    """A LightningModule's ``configure_optimizers`` in three overridable steps: SGD with Nesterov momentum
    over :func:`decay_groups` of ``self.trainable_modules()``, warmed up, then the 7/16-cosine per step.
    ``train.py --optimizer``/``--lr_scheduler`` reuse the steps (``callbacks.optimizer_options``). Reads
    the hyper-parameters ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``warmup_steps`` and
    ``cosine_fraction``; mix it in before ``LightningModule``."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weights (the optimizer's weight decay) and biases and norm weights (none), of ``trainable_modules``;
        ``train.py --optimizer`` builds the optimizer it is given on these too."""
        return decay_groups(self.trainable_modules())

    def build_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameter_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                               weight_decay=hp.weight_decay)

    def lr_schedule(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The method's schedule for ``optimizer``: warm-up, then the 7/16-cosine over the run's steps."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_schedule(optimizer, total, self.hparams.warmup_steps, self.hparams.cosine_fraction)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule(optimizer)}

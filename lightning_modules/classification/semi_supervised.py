"""The classification base: the training core given a :class:`ClassificationTask`.

Every semi-supervised classifier, the supervised baseline and the distillation students build on it. It is
the task-neutral core (:class:`lightning_modules.core.training_module.TrainingModule`: network, optimizer and
schedule, evaluation EMA, logging, running state) with a backbone by name and the classification task
(:mod:`lightning_modules.classification.task`: the labeled loss by name, R-Drop, accuracy or F1, predict).
A method whose labeled loss is its own says so itself (``refuse_criterion``, ``refuse_rdrop``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_modules.classification.networks import build_network
from lightning_modules.classification.task import ClassificationTask
from lightning_modules.core.task import Task
from lightning_modules.core.training_module import TrainingModule


class SemiSupervisedModule(TrainingModule):
    """Shared training, evaluation and optimization for semi-supervised classifiers.

    Args:
        network: a name for :func:`lightning_modules.classification.networks.build_network` (``wrn28_2``,
            ``wrn28_8``, ``resnet18``, ``timm:<name>``, ...).
        criterion: the labeled loss by name (``ce``, ``label_smoothing``, ``online_label_smoothing``, ``disturb_label``,
            ``tfkd_reg``, ``knowledge_refinery``, ``dropmax``, ``d2l``, ``focal``, ``ohem``, ``weighted_ce``; multi-label: ``bce``,
            ``sigmoid_f1``, which also switch evaluation to macro and micro F1).
        criterion_kwargs: arguments of the criterion (e.g. ``{"smoothing": 0.1}``).
        rdrop_weight: R-Drop (Liang et al., 2021): the labeled batch goes through the network
            twice (two dropout masks) and ``rdrop_weight * symmetric_kl`` of the two passes is
            added; 0 turns it off. Needs a network with dropout.
        The other arguments are the core's (:class:`TrainingModule`).
    """

    def __init__(
        self,
        network: str = "wrn28_2",
        criterion: str = "ce",
        criterion_kwargs: dict[str, Any] | None = None,
        rdrop_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(network=network, **kwargs)

    def build_net(self) -> nn.Module:
        hp = self.hparams
        return build_network(hp.network, num_classes=hp.num_classes, in_channels=hp.in_channels, **(hp.network_kwargs or {}))

    def build_task(self) -> Task:
        hp = self.hparams
        return ClassificationTask(hp.num_classes, hp.criterion, hp.criterion_kwargs, hp.rdrop_weight,
                                  owner=type(self).__name__)

    @property
    def multilabel(self) -> bool:
        """Sigmoid outputs and F1 metrics, set by a multi-label criterion (``bce``, ``sigmoid_f1``)."""
        return self.task.multilabel

"""The facts half of the model-data contract, and the model's side of the whole contract.

A method learns about its data in one way: the DataModule's public :class:`DataFacts`, handed to the
module once per stage in ``setup`` (after the DataModule's own ``setup``, before a checkpoint is
restored and before ``on_fit_start``) and kept as ``self.data_facts``. No method reads a DataModule
itself (``tests/test_layout.py`` holds this): ``num_classes`` and ``num_channels`` reach the
constructor through ``train.py``'s links, everything that needs the data loaded and split comes here.

A DataModule provides the facts by a public ``data_facts()`` method (``datamodules/facts.py`` builds it
for ours from ``labeled_class_counts()``, ``unlabeled_indices()`` and ``num_indices``). A DataModule
without one, or training on bare loaders (``trainer.fit(model, loader)``), leaves ``data_facts`` None,
and a method that needs a fact then says which argument gives it instead (FlexMatch's ``num_unlabeled``).

The batch half, what a batch holds per task and the views a method asks for, is
:mod:`lightning_modules.core.batch`; the mixin below checks the first training batch of each epoch against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_modules.core.batch import check_training_batch
from lightning_modules.core.task import Task


@dataclass(frozen=True, eq=False)  # no field-wise ==: tensors compare element-wise
class DataFacts:
    """What a method may know about its data.

    Attributes:
        num_classes: classes of the targets (detection: categories + the background).
        class_names: a name per class, or None where the data names none (segmentation folders).
        labeled_class_counts: int64 (num_classes,): labeled images per class (classification), labeled
            pixels per class (segmentation), labeled objects per class (detection, crowds left out).
        unlabeled_indices: int64, sorted: the ``index`` values the unlabeled stream draws from.
        num_indices: size of the index space: every batch's ``index`` lies in ``0 .. num_indices - 1``.
        labeled_indices: int64, sorted: the ``index`` values of the labeled split (SimMatch's labeled
            memory bank has a row for each).

    The last four come from the labeled/unlabeled split and are None outside ``fit`` (and ``validate``
    on held-out training images), when the DataModule has not split its data.
    """

    num_classes: int
    class_names: tuple[str, ...] | None = None
    labeled_class_counts: Tensor | None = None
    unlabeled_indices: Tensor | None = None
    num_indices: int | None = None
    labeled_indices: Tensor | None = None

    @property
    def num_unlabeled(self) -> int | None:
        """Images in the unlabeled stream (with the labeled ones when they are included there)."""
        return None if self.unlabeled_indices is None else len(self.unlabeled_indices)

    @property
    def labeled_marginal(self) -> Tensor | None:
        """The labeled class distribution, float32 (num_classes,) summing to 1 (uniform without labels)."""
        return None if self.labeled_class_counts is None else class_marginal(self.labeled_class_counts)


def class_marginal(counts: Tensor) -> Tensor:
    """``counts / counts.sum()`` as float32; uniform when every count is 0."""
    counts = counts.float()
    total = counts.sum()
    return counts / total if total > 0 else torch.full_like(counts, 1.0 / len(counts))


def facts_of(datamodule: Any) -> DataFacts | None:
    """The facts a DataModule publishes through its ``data_facts()``, or None (no DataModule, or one without it)."""
    publish = getattr(datamodule, "data_facts", None)
    if publish is None:
        return None
    facts = publish()
    if not isinstance(facts, DataFacts):
        raise TypeError(f"{type(datamodule).__name__}.data_facts() must return a "
                        f"lightning_modules.core.data_contract.DataFacts, got {type(facts).__name__}")
    return facts


class ModelDataContract:
    """Mixin of the base module (before ``LightningModule``): its side of the model-data contract.

    ``task.name`` names the batch contract the module reads (``classification``, ``segmentation``,
    ``detection``; the task is the module's, :mod:`lightning_modules.core.task`); ``unlabeled_views`` the
    views it asks the DataModule for. ``setup`` receives the
    DataModule's facts into ``data_facts``; the first training batch of each epoch is checked against
    the contract, so a DataModule that breaks it fails naming the entry instead of a ``KeyError`` deep
    inside a loss. A subclass overriding ``setup`` or ``on_train_batch_start`` calls ``super()``.
    """

    #: the module's task; its ``name`` is the batch contract the module reads (lightning_modules/core/batch.py)
    task: Task
    #: unlabeled views the DataModule must produce for this method
    unlabeled_views: tuple[str, ...] = ()
    #: labeled views besides ``image`` (the weak view), e.g. ``("strong",)`` for DeFixMatch
    labeled_views: tuple[str, ...] = ()
    #: the DataModule's facts, received in ``setup`` (None before, or without a DataModule that has them)
    data_facts: DataFacts | None = None

    def setup(self, stage: str) -> None:
        self.data_facts = facts_of(self.trainer.datamodule)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # shapes and keys only: no device synchronization
            check_training_batch(batch, self.task.name, self.unlabeled_views, self.labeled_views)

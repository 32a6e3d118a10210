"""The public facts every DataModule of ours gives a method (:class:`lightning_modules.core.data_contract.DataFacts`).

A method never reads a DataModule's attributes; the base module receives ``data_facts()`` once per stage
in its ``setup``. A DataModule provides, after ``setup("fit")`` (the split):

* ``labeled_class_counts()``: int64 ``(num_classes,)``, what "per class" means for its task;
* ``unlabeled_indices()``: the sorted ``index`` values its unlabeled stream draws from;
* ``num_indices``: the size of the index space of its batches' ``index``;
* ``labeled_indices()`` (optional): the sorted ``index`` values of its labeled split;

and, at any time, ``num_classes`` and (where it names them) ``class_names``. :class:`PublishesFacts`
builds the rest from these: ``num_unlabeled``, ``labeled_marginal()`` and ``data_facts()``.
"""

from __future__ import annotations

from torch import Tensor

from lightning_modules.core.data_contract import DataFacts, class_marginal


class PublishesFacts:
    """DataModule mixin: ``num_unlabeled``, ``labeled_marginal()`` and ``data_facts()`` (see the module)."""

    num_classes: int
    split: object | None

    def labeled_class_counts(self) -> Tensor:
        raise NotImplementedError

    def unlabeled_indices(self) -> Tensor:
        raise NotImplementedError

    @property
    def num_indices(self) -> int:
        raise NotImplementedError

    def require_split(self, fact: str) -> None:
        """Raise unless the data is split (``setup("fit")`` has run), naming the ``fact`` asked for."""
        if self.split is None:
            raise RuntimeError(f"{type(self).__name__}.{fact} needs the labeled/unlabeled split: call setup('fit') "
                               f"first (the Trainer does, before the model's setup)")

    @property
    def num_unlabeled(self) -> int:
        """Images in the unlabeled stream (the labeled ones too when they are included there)."""
        return len(self.unlabeled_indices())

    def labeled_marginal(self) -> Tensor:
        """The labeled class distribution, float32 ``(num_classes,)`` summing to 1."""
        return class_marginal(self.labeled_class_counts())

    def data_facts(self) -> DataFacts:
        """Everything a method may know about this data; the split's facts are None before ``setup("fit")``."""
        names = getattr(self, "class_names", None)
        names = tuple(str(name) for name in names) if names is not None else None
        if self.split is None:
            return DataFacts(self.num_classes, names)
        labeled = getattr(self, "labeled_indices", None)
        return DataFacts(self.num_classes, names, self.labeled_class_counts(), self.unlabeled_indices(),
                         self.num_indices, labeled() if labeled is not None else None)

"""Which labeled/unlabeled split a classification DataModule draws, and the training images it holds
out for validation: a stratified k-fold fold, or ``val_per_class`` labeled images per class; and
:class:`HeldOutParts`, the same for the segmentation and detection DataModules, whose split holds
test and validation images out by name (:mod:`datamodules.named_split`).

Validation on held-out training images instead of the test set is what makes a choice made on
``val/*`` (a greedy soup's ingredients, a checkpoint kept by ``ModelCheckpoint(monitor=...)``)
honest: the test set then plays no part in it. :class:`RecordsHeldOut` puts the held-out images
in every checkpoint, so the soup can check that no ingredient trained on its validation images
(``lightning_modules.fusion.soup.check_held_out``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.split import LabeledSplit, class_balanced_split, stratified_kfold
from lightning_modules.core.atomic import write_json_atomically


def check_held_out_arguments(num_folds: int | None, fold: int, val_per_class: int | None) -> None:
    if num_folds is not None and num_folds < 2:
        raise ValueError(f"num_folds must be at least 2 (or None for no cross-validation), got {num_folds}")
    if num_folds is not None and not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} for num_folds={num_folds}, got {fold}")
    if val_per_class is not None and (val_per_class < 1 or num_folds is not None):
        raise ValueError(f"val_labeled_per_class must be at least 1 and cannot be combined with num_folds (a fold "
                         f"is already held out), got {val_per_class} with num_folds={num_folds}")


def held_out_per_class(targets: torch.Tensor, per_class: int, num_classes: int, seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, val_indices)``: ``per_class`` images of every class drawn for validation
    (seeded), the rest for training; both sorted."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    counts = torch.bincount(targets, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] <= per_class]
    if short:
        raise ValueError(f"val_labeled_per_class={per_class} would hold out every image of class(es) {short} "
                         f"({[int(counts[c]) for c in short]} images): use at most {int(counts.min()) - 1}")
    held = class_balanced_split(targets, per_class * num_classes, num_classes, seed)
    return held.unlabeled, held.labeled


def draw_split(targets: torch.Tensor, num_labeled: int | None, num_classes: int, seed: int,
               num_folds: int | None = None, fold: int = 0, val_per_class: int | None = None) -> LabeledSplit:
    """The split of a training set with ``targets``: validation images first (a fold, or
    ``val_per_class`` per class, if asked), then ``num_labeled`` class-balanced labeled images from
    the rest (``None``: all of it), the remainder unlabeled. Indices are into the full training set."""
    def labeled_split(part: torch.Tensor) -> LabeledSplit:
        if num_labeled is None:
            return LabeledSplit(torch.arange(len(part)), torch.empty(0, dtype=torch.long), seed)
        return class_balanced_split(part, num_labeled, num_classes, seed)

    if num_folds is not None:
        train_idx, val_idx = stratified_kfold(targets, num_folds, fold, seed)
        held_out = {"num_folds": num_folds, "fold": fold}
    elif val_per_class is not None:
        train_idx, val_idx = held_out_per_class(targets, val_per_class, num_classes, seed)
        held_out = {"val_per_class": val_per_class}
    else:
        return labeled_split(targets)
    inner = labeled_split(targets[train_idx])
    # back to indices into the full training set (train_idx is sorted, so order is kept)
    return LabeledSplit(train_idx[inner.labeled], train_idx[inner.unlabeled], seed, val_idx, **held_out)


def check_loaded_split(split: LabeledSplit, path: str, num_folds: int | None, fold: int,
                       val_per_class: int | None) -> LabeledSplit:
    """``split`` (read from ``path``) if it holds the fold or validation images asked for, else a ValueError."""
    if num_folds is not None and (split.num_folds, split.fold) != (num_folds, fold):
        found = "no fold" if split.num_folds is None else f"fold {split.fold} of {split.num_folds}"
        raise ValueError(f"split_file {path} holds {found}, but num_folds={num_folds}, fold={fold} was asked for: "
                         f"drop num_folds/fold to use the file's split, or pass the matching file")
    if val_per_class is not None and split.val_per_class != val_per_class:
        found = "no validation images" if split.val_per_class is None else \
            f"{split.val_per_class} validation images per class"
        raise ValueError(f"split_file {path} holds {found}, but val_labeled_per_class={val_per_class} was asked "
                         f"for: drop val_labeled_per_class to use the file's split, or pass the matching file")
    return split


class RecordsHeldOut:
    """DataModule mixin: ``state_dict`` (saved in every checkpoint under the DataModule's class name)
    also holds ``"held_out"``, the validation images as ``held_out_ids()`` names them ([] if none)."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "held_out": list(self.held_out_ids())}


class HeldOutParts:
    """Mixin of the segmentation and detection DataModules (before
    :class:`~datamodules.labeled_unlabeled.LabeledUnlabeledDataModule`) for a split into the named parts of
    :mod:`datamodules.named_split`: positions of their items (``images``) held out for ``test`` and
    ``val``, the rest ``labeled`` and ``unlabeled``.

    The items are read once (``load()``); the split, whatever the stage, is drawn (``draw_split``) or read
    from ``split_file`` (``load_split``) and written as ``split_record()``. Validation runs on the ``val``
    images, else on the test images (``num_val`` 0). ``split_ids()`` names the items as ``split.json``
    does; ``split_part(name)`` reads one part of ``split`` (a dict of sorted positions unless overridden).
    """

    images: list
    split: Any
    num_val: int
    split_file: str | None

    def split_part(self, name: str) -> Tensor:
        return self.split[name]

    @property
    def validates_on_test_set(self) -> bool:
        """Whether validation reports on the test images (no ``num_val``, no validation in ``split_file``)."""
        return len(self.split_part("val")) == 0 if self.split is not None else self.num_val == 0 and not self.split_file

    def held_out_ids(self) -> list:
        """The validation images as ``split.json`` records them (``val``, by ``split_ids()``), after ``setup``."""
        return [self.split_ids()[i] for i in self.split_part("val").tolist()] if self.split is not None else []

    def read_data(self, stage: str) -> None:
        if not self.images:
            self.load()

    def write_split(self, path: Path) -> Path:
        return write_json_atomically(path, self.split_record(), indent=1)

    def held_out_part(self, part: str) -> Tensor:
        """The positions of ``part`` (``test``, ``val``); a ValueError if there are none to evaluate on."""
        indices = self.split_part(part)
        if len(indices) == 0:
            raise ValueError("num_test=0: there are no held-out images to evaluate on")
        return indices

    def val_dataloader(self) -> DataLoader | list:
        if len(self.split_part("val")):
            return self.eval_loader("val")
        return self.eval_loader("test") if len(self.split_part("test")) else []  # num_test=0: no validation

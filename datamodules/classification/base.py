"""The labeled/unlabeled DataModule base that every classification data set builds on.

Images stay in memory as uint8 tensors and the loaders yield uint8 batches; augmentation runs
after the batch reaches its device (``on_after_batch_transfer``), batched with per-sample random
parameters, so the same code runs on CPU and GPU and the loader is never the bottleneck.

A training batch is ``{"labeled": {"image", "target", "index"}, "unlabeled": {<view>: ..., "index"}}``.
The unlabeled views are the ones the LightningModule lists in its ``unlabeled_views`` attribute
(``("weak", "strong")`` for FixMatch, none for ``Supervised``); any name starting with ``weak`` or
``strong`` gets an independent draw of that augmentation, so ``("weak", "weak2")`` gives two.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datamodules import held_out, split
from datamodules.classification.views import AugmentedViews
from datamodules.data_root import DataRoot
from datamodules.in_memory import IndexedImages, keep_batch
from datamodules.image_files import load_classification_folder
from datamodules.labeled_unlabeled import LabeledUnlabeledDataModule
from datamodules.split import LabeledSplit

log = logging.getLogger(__name__)


class SSLDataModule(AugmentedViews, LabeledUnlabeledDataModule):
    """Base for labeled/unlabeled classification data.

    Subclasses set ``num_classes``, ``num_channels``, ``mean``, ``std`` and implement
    ``load_train`` and ``load_test`` (uint8 images ``(N, C, H, W)`` and int64 targets); those with
    extra unlabeled images (STL-10) override ``load_extra_unlabeled``.

    Args:
        root: where the data set lives (or is downloaded to).
        download: download the data set into ``root`` if it is not there.
        num_labeled: labeled images, drawn class-balanced (``num_labeled / num_classes`` per class);
            ``None`` labels the whole training set.
        batch_size: labeled images per step.
        uratio: unlabeled images per labeled image in a step (FixMatch's mu).
        steps_per_epoch: an epoch is this many steps, whatever the size of the labeled set.
        eval_batch_size: batch size for validation, test and predict.
        seed: seed of the labeled/unlabeled split.
        split_file: reuse a ``split.json`` saved by an earlier run instead of drawing a split.
        include_labeled_in_unlabeled: labeled images also appear, without labels, in the
            unlabeled stream (FixMatch's and USB's default).
        hflip: random horizontal flips in the weak view (``None``: the data set's default).
        pad_fraction: weak-view translation, as reflect-padding of this fraction of the size.
        randaugment_ops: RandAugment ops per image in the strong view.
        cutout_fraction: largest Cutout side in the strong view, as a fraction of the image.
        unlabeled_views: override the views the model asks for.
        num_workers: loader processes; 0 is right for in-memory data.
        num_folds, fold: stratified k-fold cross-validation (``None``: off): fold ``fold`` of the
            training set (:func:`datamodules.split.stratified_kfold`, seeded by ``seed``) is held out.
        val_labeled_per_class: hold out this many training images per class instead (``None``: off).

    Held-out images (a fold, or ``val_labeled_per_class``) are drawn first, then the labeled split
    from the rest; they are neither labeled nor unlabeled, ``val_dataloader`` returns them with
    their labels instead of the test set, and ``split.json`` records them as ``val`` (indices into
    the full training set), so ``split_file`` reproduces them (:mod:`datamodules.held_out`).
    Test always uses the test set; predict too unless ``predict_root`` names a folder of images
    (searched recursively, decoded like the training images and resized to their size).

    A method learns about the data from ``data_facts()`` (:mod:`datamodules.facts`): ``num_classes``,
    ``class_names``, and after ``setup("fit")`` the labeled images per class, the unlabeled indices and
    ``num_indices`` (the training set, then STL-10's extra unlabeled images).
    """

    num_classes: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_hflip: bool = True
    collate_fn = staticmethod(keep_batch)  # whole batches gathered by one indexing op (IndexedImages)

    def __init__(
        self,
        root: DataRoot = "data",
        download: bool = False,
        num_labeled: int | None = 4000,
        batch_size: int = 64,
        uratio: int = 7,
        steps_per_epoch: int = 1024,
        eval_batch_size: int = 256,
        seed: int = 0,
        split_file: str | None = None,
        include_labeled_in_unlabeled: bool = True,
        hflip: bool | None = None,
        pad_fraction: float = 0.125,
        randaugment_ops: int = 2,
        cutout_fraction: float = 0.5,
        unlabeled_views: list[str] | None = None,
        num_workers: int = 0,
        num_folds: int | None = None,
        fold: int = 0,
        val_labeled_per_class: int | None = None,
        predict_root: DataRoot | None = None,
    ) -> None:
        super().__init__(root, batch_size, uratio, steps_per_epoch, eval_batch_size, seed, split_file, unlabeled_views,
                         num_workers, predict_root, include_labeled_in_unlabeled)
        self.download = download
        self.num_labeled = num_labeled
        self.hflip = self.default_hflip if hflip is None else hflip
        self.pad_fraction, self.randaugment_ops, self.cutout_fraction = pad_fraction, randaugment_ops, cutout_fraction
        held_out.check_held_out_arguments(num_folds, fold, val_labeled_per_class)
        self.num_folds, self.fold, self.val_labeled_per_class = num_folds, fold, val_labeled_per_class
        self.split: LabeledSplit | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._extra: torch.Tensor | None = None

    # --- what a concrete data set provides -------------------------------------------------
    def load_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_extra_unlabeled(self) -> torch.Tensor | None:
        return None

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def training_image_size(self) -> tuple[int, int]:
        """(H, W) the model sees; images from ``predict_root`` are resized to it."""
        return tuple(self.load_test()[0].shape[-2:])

    @property
    def validates_on_test_set(self) -> bool:
        """Whether ``val_dataloader`` is the test set (no fold or held-out split): a model selected by
        validation is then selected on test data."""
        if self.split is not None:
            return self.split.val is None
        return self.num_folds is None and self.val_labeled_per_class is None and self.split_file is None

    def held_out_ids(self) -> list[int]:
        """The validation images as ``split.json`` records them (``val``), after ``setup``."""
        return [] if self.split is None or self.split.val is None else self.split.val.tolist()

    # --- set-up ----------------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        return type(self).__name__

    def load_predict_folder(self) -> IndexedImages:
        return load_classification_folder(self.predict_root, self.num_channels, self.training_image_size(),
                                          self.dataset_name)

    def needs_split(self, stage: str) -> bool:
        # validate needs the split too when validation runs on held-out training images
        holds_out = self.num_folds is not None or self.val_labeled_per_class is not None or self.split_file is not None
        return stage == "fit" or (stage == "validate" and holds_out)

    def read_data(self, stage: str) -> None:
        if self._train is None and self.needs_split(stage):
            self._train = self._checked("train", self.load_train())
            self._extra = self.load_extra_unlabeled()
        if self._test is None and stage in ("fit", "validate", "test", "predict"):
            self._test = self._checked("test", self.load_test())

    def _checked(self, split: str, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``data`` if its images and targets pair up and every target is a class id ``0..num_classes - 1``."""
        images, targets = data
        if len(images) != len(targets):
            raise ValueError(f"{self.dataset_name}: the {split} split has {len(images)} images but "
                             f"{len(targets)} targets")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            bad = targets[(targets < 0) | (targets >= self.num_classes)]
            raise ValueError(f"{self.dataset_name}: the {split} split has {bad.numel()} target(s) outside the class "
                             f"ids 0..{self.num_classes - 1} (e.g. {int(bad[0])}): num_classes={self.num_classes} is "
                             f"too small for this data, or its labels are wrong")
        return data

    def draw_split(self) -> LabeledSplit:
        return held_out.draw_split(self._train[1], self.num_labeled, self.num_classes, self.seed, self.num_folds,
                                   self.fold, self.val_labeled_per_class)

    def load_split(self, path: str) -> LabeledSplit:
        loaded = split.load_split(path, self._train[1], self.dataset_name)
        log.info("loaded the labeled/unlabeled split from %s", path)
        return held_out.check_loaded_split(loaded, path, self.num_folds, self.fold, self.val_labeled_per_class)

    def write_split(self, path: Path) -> Path:
        return split.save_split(path, self.split, self._train[1], self.dataset_name)

    # --- facts (datamodules.facts) -----------------------------------------------------------
    def labeled_class_counts(self) -> torch.Tensor:
        """Labeled images per class, int64 ``(num_classes,)``."""
        self.require_split("labeled_class_counts()")
        return torch.bincount(self._train[1][self.split.labeled], minlength=self.num_classes)

    def unlabeled_indices(self) -> torch.Tensor:
        """The unlabeled stream's indices: the unlabeled split (with the labeled images when they are included),
        then the extra unlabeled images, numbered after the training set."""
        return torch.cat([super().unlabeled_indices(), torch.arange(len(self._train[0]), self.num_indices)])

    @property
    def num_indices(self) -> int:
        self.require_split("num_indices")
        return len(self._train[0]) + (len(self._extra) if self._extra is not None else 0)

    def unlabeled_dataset(self, views: tuple[str, ...] = ()) -> IndexedImages:
        """Every unlabeled image, uint8; the views are made on the device (``AugmentedViews``)."""
        images, targets = self._train
        if self._extra is not None:  # extra images carry target -1 and indices after the training set
            images = torch.cat([images, self._extra])
            targets = torch.cat([targets, torch.full((len(self._extra),), -1, dtype=targets.dtype)])
        return IndexedImages(images, targets, self.unlabeled_indices())

    def labeled_dataset(self) -> IndexedImages:
        return IndexedImages(*self._train, self.split.labeled)

    def training_images(self) -> dict[str, IndexedImages]:
        """The whole labeled and unlabeled training images, uint8 with ``index`` and ``target``, for a method
        that embeds them all between steps (label propagation; ``lightning_modules/core/training_images.py``)."""
        self.require_split("training_images()")
        return {"labeled": self.labeled_dataset(), "unlabeled": self.unlabeled_dataset()}

    def empty_unlabeled_message(self, views: tuple[str, ...]) -> str:
        return f"{self.dataset_name}: the unlabeled set is empty; lower num_labeled or include labeled images"

    def eval_dataset(self, part: str) -> IndexedImages:
        # the held-out fold or validation images of the training set with their labels, else the test set
        return IndexedImages(*self._test) if part == "test" else IndexedImages(*self._train, self.split.val)

    def val_dataloader(self) -> DataLoader:
        # Like USB and TorchSSL, validation reports on the test set unless images are held out; nothing is
        # selected by it then.
        return self.eval_loader("val" if self.split is not None and self.split.val is not None else "test")

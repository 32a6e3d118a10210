"""The labeled/unlabeled DataModule base: the skeleton every task's DataModule shares, written once.

A task's DataModule (``classification/``, ``segmentation/``, ``detection/``) is a reader on this base:
it says how its images and targets are read (``read_data``), how its split is drawn, read back and
written (``draw_split``, ``load_split``, ``write_split``), which items each loader serves
(``labeled_dataset``, ``unlabeled_dataset``, ``eval_dataset``), how its items are collated
(``collate_fn``) and how a batch becomes floats on its device (``to_float``, and the views for
classification). The base holds the rest:

* the constructor's shared arguments and their checks;
* set-up: a ``predict_root`` folder, else the data read once, the split drawn or read from
  ``split_file`` once, and at ``setup("fit")`` written whole (temporary file + rename) to the run's
  ``split.json`` (:func:`datamodules.split.run_split_path`, rank 0 only);
* the training loader: Lightning's ``CombinedLoader`` of a ``"labeled"`` stream and, when the model asks
  for views (:func:`requested_views`), an ``"unlabeled"`` stream of ``uratio`` times the batch, each
  resumable exactly (:mod:`datamodules.resumable`);
* the validation, test and predict loaders; the facts a method reads (:mod:`datamodules.facts`);
* ``on_after_batch_transfer``: the batch contract of :mod:`lightning_modules.core.batch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.data_root import DataRoot
from datamodules.facts import PublishesFacts
from datamodules.held_out import RecordsHeldOut
from datamodules.image_files import PredictFolder
from datamodules.resumable import ResumableStreams
from datamodules.split import run_split_path
from lightning_modules.core.batch import check_view_names, is_view


def requested_views(datamodule: LightningDataModule, default: tuple[str, ...]) -> tuple[str, ...]:
    """The unlabeled views a DataModule makes: its own ``unlabeled_views`` if set, else those its
    trainer's LightningModule names, else ``default`` (a model that names none)."""
    if datamodule.unlabeled_views is not None:
        return check_view_names(datamodule.unlabeled_views)
    model = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    return check_view_names(getattr(model, "unlabeled_views", default))


def requested_labeled_views(datamodule: LightningDataModule) -> tuple[str, ...]:
    """The labeled views besides ``image`` that the trainer's LightningModule names (``labeled_views``)."""
    model = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    return check_view_names(getattr(model, "labeled_views", ()))


def check_positive(**values: int) -> None:
    """A ValueError naming the first of ``values`` below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


class LabeledUnlabeledDataModule(PublishesFacts, PredictFolder, RecordsHeldOut, ResumableStreams,
                                 LightningDataModule):
    """Base of every labeled/unlabeled DataModule (see the module docstring for what a task provides).

    Args (shared by every task):
        root: where the data set lives.
        batch_size: labeled items per step; uratio: unlabeled items per labeled item.
        steps_per_epoch: an epoch is this many steps, each stream sampling permutation after permutation.
        eval_batch_size: items per validation, test and predict batch.
        seed: seed of the split; split_file: reuse a ``split.json`` saved by an earlier run.
        unlabeled_views: override the views the model asks for.
        num_workers: loader processes (0 is right for in-memory data).
        predict_root: a folder of images to predict on instead of the test images.
        include_labeled_in_unlabeled: labeled items also feed the unlabeled stream.
    """

    #: views made when neither the DataModule nor the model names any
    default_views: tuple[str, ...] = ("weak", "strong")
    #: how a loader's items become a batch (``None``: torch's default collation)
    collate_fn: Callable | None = None

    def __init__(self, root: DataRoot, batch_size: int, uratio: int, steps_per_epoch: int, eval_batch_size: int,
                 seed: int, split_file: str | None, unlabeled_views: list[str] | None, num_workers: int,
                 predict_root: DataRoot | None, include_labeled_in_unlabeled: bool = False) -> None:
        super().__init__()
        check_positive(batch_size=batch_size, uratio=uratio, steps_per_epoch=steps_per_epoch,
                       eval_batch_size=eval_batch_size)
        self.root = Path(root).expanduser()
        self.batch_size, self.uratio = batch_size, uratio
        self.steps_per_epoch, self.eval_batch_size = steps_per_epoch, eval_batch_size
        self.seed, self.split_file = seed, split_file
        self.unlabeled_views = None if unlabeled_views is None else check_view_names(unlabeled_views)
        self.num_workers = num_workers
        self.include_labeled_in_unlabeled = include_labeled_in_unlabeled
        self.predict_root = predict_root
        self.predict_images: Dataset | None = None  # predict_root's images, at setup("predict")
        self.split: Any = None
        self.split_path: Path | None = None

    # --- what a task provides ------------------------------------------------------------------
    def read_data(self, stage: str) -> None:
        """Read (once) what ``stage`` needs of the data set."""
        raise NotImplementedError

    def needs_split(self, stage: str) -> bool:
        return True

    def draw_split(self) -> Any:
        raise NotImplementedError

    def load_split(self, path: str) -> Any:
        raise NotImplementedError

    def write_split(self, path: Path) -> Path:
        """Write ``split`` to ``path`` atomically; return the path written."""
        raise NotImplementedError

    def split_part(self, name: str) -> Tensor:
        """Sorted indices of one part of the split (``labeled``, ``unlabeled``, ...)."""
        return getattr(self.split, name)

    def labeled_dataset(self) -> Dataset:
        raise NotImplementedError

    def unlabeled_dataset(self, views: tuple[str, ...] = ()) -> Dataset:
        raise NotImplementedError

    def empty_unlabeled_message(self, views: tuple[str, ...]) -> str:
        return f"the model asks for unlabeled views {views} but the unlabeled set is empty: lower num_labeled"

    def eval_dataset(self, part: str) -> Dataset:
        raise NotImplementedError

    def to_float(self, images: Any) -> Any:
        """uint8 images on the device as the model's floats."""
        raise NotImplementedError

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.setup_predict_folder(stage):
            return
        self.read_data(stage)
        if self.split is None and self.needs_split(stage):
            self.split = self.load_split(self.split_file) if self.split_file else self.draw_split()
        if stage == "fit" and self.trainer is not None:
            path = run_split_path(self.trainer)  # every rank calls it (a broadcast); rank 0 writes
            if path is not None:
                self.split_path = self.write_split(path)

    # --- facts (datamodules.facts) ---------------------------------------------------------------
    def labeled_indices(self) -> Tensor:
        """The labeled split's indices, sorted."""
        self.require_split("labeled_indices()")
        return self.split_part("labeled")

    def unlabeled_indices(self) -> Tensor:
        """The unlabeled stream's indices: the unlabeled split, with the labeled items when they are included."""
        self.require_split("unlabeled_indices()")
        indices = self.split_part("unlabeled")
        if self.include_labeled_in_unlabeled:
            indices = torch.cat([self.split_part("labeled"), indices]).sort().values
        return indices

    # --- loaders ---------------------------------------------------------------------------------
    def requested_unlabeled_views(self) -> tuple[str, ...]:
        return requested_views(self, default=self.default_views)

    def _stream(self, dataset: Dataset, batch_size: int, stream: str) -> DataLoader:
        # Permutation after permutation, sharded across DDP ranks, resumable exactly (datamodules.resumable).
        return self.training_stream(dataset, batch_size, stream, collate_fn=self.collate_fn,
                                    num_workers=self.num_workers)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"labeled": self._stream(self.labeled_dataset(), self.batch_size, "labeled")}
        views = self.requested_unlabeled_views()
        if views:
            if len(self.unlabeled_indices()) == 0:
                raise ValueError(self.empty_unlabeled_message(views))
            loaders["unlabeled"] = self._stream(self.unlabeled_dataset(views), self.batch_size * self.uratio,
                                                "unlabeled")
        return CombinedLoader(loaders, mode="max_size_cycle")

    def eval_loader(self, part: str = "test") -> DataLoader:
        """Whole, unaugmented items of one part of the data (``test``, ``val``) in order."""
        return self.loader(self.eval_dataset(part))

    def loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_fn,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The images under ``predict_root``, else the test images."""
        if self.predict_images is None:
            return self.eval_loader("test")
        return self.loader(self.predict_images)

    # --- on the device ---------------------------------------------------------------------------
    def labeled_on_device(self, part: dict[str, Any]) -> dict[str, Any]:
        return dict(part, image=self.to_float(part["image"]))

    def unlabeled_on_device(self, part: dict[str, Any]) -> dict[str, Any]:
        return {k: self.to_float(v) if is_view(k) else v for k, v in part.items()}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "labeled" in batch:
            out = {"labeled": self.labeled_on_device(batch["labeled"])}
            if "unlabeled" in batch:
                out["unlabeled"] = self.unlabeled_on_device(batch["unlabeled"])
            return out
        return dict(batch, image=self.to_float(batch["image"]))

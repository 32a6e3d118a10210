"""The views a method asks for, made after the batch reaches its device.

A LightningModule lists the unlabeled views it needs in ``unlabeled_views`` (``("weak", "strong")`` for
FixMatch, none for ``Supervised``); a DataModule's own ``unlabeled_views`` overrides it. View names and
the batch they end up in are the contract of :mod:`lightning_modules.core.batch`. For the
classification DataModules, :class:`AugmentedViews` turns a uint8 batch into those views on its device:
the labeled images get the weak view, the unlabeled ones each view asked for (any name starting with
``weak`` or ``strong`` is an independent draw of that augmentation, ``plain`` none), then all are
normalized to float.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningDataModule

from datamodules.augment import normalize, strong_augment, weak_augment
from lightning_modules.core.batch import check_view_names


def requested_views(datamodule: LightningDataModule, default: tuple[str, ...]) -> tuple[str, ...]:
    """The unlabeled views a DataModule makes: its own ``unlabeled_views`` if set, else those its
    trainer's LightningModule names, else ``default`` (a model that names none)."""
    if datamodule.unlabeled_views is not None:
        return check_view_names(datamodule.unlabeled_views)
    model = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    return check_view_names(getattr(model, "unlabeled_views", default))


class AugmentedViews:
    """Mixin of :class:`~datamodules.base.SSLDataModule` (before ``LightningDataModule``): the
    ``on_after_batch_transfer`` hook that makes the views. Reads ``hflip``, ``pad_fraction``,
    ``randaugment_ops``, ``cutout_fraction``, ``mean`` and ``std`` from the DataModule."""

    def requested_unlabeled_views(self) -> tuple[str, ...]:
        return requested_views(self, default=("weak", "strong"))

    def weak(self, images: torch.Tensor) -> torch.Tensor:
        return weak_augment(images, hflip=self.hflip, pad_fraction=self.pad_fraction)

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        return strong_augment(images, hflip=self.hflip, pad_fraction=self.pad_fraction,
                              num_ops=self.randaugment_ops, cutout_fraction=self.cutout_fraction)

    def view(self, name: str, images: torch.Tensor) -> torch.Tensor:
        if name.startswith("weak"):
            return self.weak(images)
        if name.startswith("strong"):
            return self.strong(images)
        check_view_names([name])
        return images  # plain

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "labeled" in batch:
            labeled = dict(batch["labeled"], image=self.to_float(self.weak(batch["labeled"]["image"])))
            out = {"labeled": labeled}
            if "unlabeled" in batch:
                raw = batch["unlabeled"]
                out["unlabeled"] = {"index": raw["index"], "target": raw["target"]}
                for name in self.requested_unlabeled_views():
                    out["unlabeled"][name] = self.to_float(self.view(name, raw["image"]))
            return out
        return dict(batch, image=self.to_float(batch["image"]))

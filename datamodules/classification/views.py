"""The views a method asks for, made after the batch reaches its device.

A LightningModule lists the unlabeled views it needs in ``unlabeled_views`` (``("weak", "strong")`` for
FixMatch, none for ``Supervised``); a DataModule's own ``unlabeled_views`` overrides it. View names and
the batch they end up in are the contract of :mod:`lightning_modules.core.batch`. For the
classification DataModules, :class:`AugmentedViews` turns a uint8 batch into those views on its device:
the labeled images get the weak view (plus each view the module names in ``labeled_views``), the unlabeled ones each view asked for (any name starting with
``weak``, ``medium`` or ``strong`` is an independent draw of that augmentation, ``plain`` none), then all are
normalized to float. A name ending in ``_rot90``, ``_rot180`` or ``_rot270`` is the view before the suffix,
the same draw, rotated counter-clockwise by that angle (``torch.rot90`` over height and width, as USB's
``rotate_img`` in ``semilearn/algorithms/crmatch/crmatch.py`` lines 17-27): CRMatch's rotation task.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from datamodules.classification.augment import normalize, strong_augment, weak_augment
from datamodules.labeled_unlabeled import requested_labeled_views
from datamodules.labeled_unlabeled import requested_views  # noqa: F401  (defined here until the base took it)
from lightning_modules.core.batch import check_view_names

ROTATED = re.compile(r"^(?P<view>.+)_rot(?P<angle>90|180|270)$")


def rotated_view(name: str) -> tuple[str, int] | None:
    """``(view, quarter turns)`` for a rotated view's name (``"weak_rot90"`` -> ``("weak", 1)``), else None."""
    match = ROTATED.match(name)
    return None if match is None else (match["view"], int(match["angle"]) // 90)


class AugmentedViews:
    """Mixin of :class:`~datamodules.classification.base.SSLDataModule` (before its base): the labeled
    and unlabeled parts of a batch made into views on the device. Reads ``hflip``, ``pad_fraction``,
    ``randaugment_ops``, ``cutout_fraction``, ``mean`` and ``std`` from the DataModule."""

    def weak(self, images: torch.Tensor) -> torch.Tensor:
        return weak_augment(images, hflip=self.hflip, pad_fraction=self.pad_fraction)

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        return strong_augment(images, hflip=self.hflip, pad_fraction=self.pad_fraction,
                              num_ops=self.randaugment_ops, cutout_fraction=self.cutout_fraction)

    def medium(self, images: torch.Tensor) -> torch.Tensor:
        """Between weak and strong (SequenceMatch): one RandAugment op, then Cutout, as USB's RandAugment(1, 5)
        (``semilearn/datasets/cv_datasets/cifar.py`` lines 42-49); none where the strong view has none."""
        return strong_augment(images, hflip=self.hflip, pad_fraction=self.pad_fraction,
                              num_ops=min(1, self.randaugment_ops), cutout_fraction=self.cutout_fraction)

    def view(self, name: str, images: torch.Tensor) -> torch.Tensor:
        if name.startswith("weak"):
            return self.weak(images)
        if name.startswith("strong"):
            return self.strong(images)
        if name.startswith("medium"):
            return self.medium(images)
        check_view_names([name])
        return images  # plain

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def labeled_on_device(self, part: dict[str, Any]) -> dict[str, Any]:
        views = {name: self.to_float(self.view(name, part["image"])) for name in requested_labeled_views(self)}
        return dict(part, image=self.to_float(self.weak(part["image"])), **views)

    def unlabeled_on_device(self, part: dict[str, Any]) -> dict[str, Any]:
        names = self.requested_unlabeled_views()
        drawn: dict[str, torch.Tensor] = {}  # uint8 draws, so a rotated view rotates the very same draw

        def draw(name: str) -> torch.Tensor:
            if name not in drawn:
                rotated = rotated_view(name)
                drawn[name] = (self.view(name, part["image"]) if rotated is None else
                               torch.rot90(draw(rotated[0]), rotated[1], dims=(-2, -1)))
            return drawn[name]

        return {"index": part["index"], "target": part["target"], **{name: self.to_float(draw(name)) for name in names}}

"""Training augmentation and items of the COCO detection DataModule: joint image/boxes/masks geometry,
Unbiased Teacher's strong photometric view, and the per-image items of every loader."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.detection.coco_reading import CocoImage, target_of
from lightning_modules.core.batch import check_view_names


def detection_geometry(hflip: bool = True, min_size: int | None = None) -> v2.Transform:
    """Joint image/boxes/masks geometry: resize of the shorter side to ``min_size``, horizontal flip."""
    steps = ([v2.Resize(min_size)] if min_size else []) + ([v2.RandomHorizontalFlip()] if hflip else [])
    return v2.Compose(steps) if steps else v2.Identity()


class StrongPhotometric:
    """Unbiased Teacher's strong view, image only (uint8 in and out): colour jitter (p=0.8),
    grayscale (p=0.2), Gaussian blur sigma 0.1-2 (p=0.5), then three random-erasing cutouts of noise
    (p=0.7, 0.5, 0.3). Boxes are unchanged by all of them."""

    def __init__(self) -> None:
        self.colour = v2.Compose([
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=0.5),
        ])
        self.erase = v2.Compose([
            v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
            v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6.0), value="random"),
            v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8.0), value="random"),
        ])

    def __call__(self, image: Tensor) -> Tensor:
        erased = self.erase(v2.functional.to_dtype(self.colour(image), torch.float32, scale=True))
        return v2.functional.to_dtype(erased.clamp_(0, 1), torch.uint8, scale=True)


class DetectionItems(Dataset):
    """Images ``indices`` of ``records``: whole images with evaluation targets when ``geometry`` is
    None, else augmented training items, ``{"image", "target"}`` (labeled, no ``views``) or
    ``{<view>..., "target"}`` (unlabeled); every item also has ``"index"`` (its position in ``records``)
    and ``"image_id"``."""

    def __init__(self, images: list[Tensor], records: list[CocoImage], indices: Tensor, masks: bool,
                 geometry: v2.Transform | None = None, views: Sequence[str] = (),
                 photometric: StrongPhotometric | None = None) -> None:
        self.images, self.records, self.indices, self.masks = images, records, indices, masks
        self.geometry, self.views, self.photometric = geometry, check_view_names(views), photometric
        self.dropped_after_transform = 0  # per loader process

    def __len__(self) -> int:
        return len(self.indices)

    def _transformed(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = self.images[index], target_of(self.records[index], self.masks, crowd=False)
        inputs = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:])}
        if self.masks:
            inputs["masks"] = tv_tensors.Mask(target["masks"])
        out = self.geometry(inputs)
        boxes = out["boxes"].as_subclass(Tensor)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = dict(target, boxes=boxes[keep], labels=target["labels"][keep])
        if self.masks:
            target["masks"] = out["masks"].as_subclass(Tensor)[keep]
        if not keep.all():
            if not self.dropped_after_transform:
                warnings.warn(f"image {self.records[index].id}: {int((~keep).sum())} box(es) lost their width or "
                              f"height under resize/flip and were dropped (counted in dropped_after_transform; "
                              f"this warning is shown once)")
            self.dropped_after_transform += int((~keep).sum())
        return out["image"].as_subclass(Tensor), target

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        sample = {"index": torch.tensor(index), "image_id": self.records[index].id}
        if self.geometry is None:
            return {"image": self.images[index], "target": target_of(self.records[index], self.masks, crowd=True),
                    **sample}
        image, target = self._transformed(index)
        if not self.views:
            return {"image": image, "target": target, **sample}
        item: dict[str, Any] = {}
        for name in self.views:
            item[name] = self.photometric(image) if name.startswith("strong") else image
        return {**item, "target": target, **sample}


def collate_lists(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of one kind into a dict of lists (images of different sizes cannot be stacked); ``index``
    is stacked into an int64 tensor, as in every batch."""
    return {key: torch.stack([item[key] for item in items]) if key == "index" else [item[key] for item in items]
            for key in items[0]}

"""COCO-format detection and instance segmentation data for torchvision's detectors, labeled and
unlabeled (semi-supervised detection in the style of Unbiased Teacher), with a seeded split.

The json is read in ``__init__`` (``datamodules.coco_reading``: checks, label remapping, box
clipping, one warning counting dropped, crowd and clipped boxes), so ``num_classes`` (categories +
background) is known when the CLI links it into the model. ``setup`` decodes every image once with
``torchvision.io.decode_image`` (RGB) and keeps them in memory as uint8 (fine for coco128's 128
images; about 0.9 MB per 640x480 image). Masks are decoded per item, when ``masks=True``.

Batches are lists, as torchvision's detectors take them; images are float32 ``(3, H, W)`` in
[0, 1] after ``on_after_batch_transfer`` (uint8 in the loader), unnormalized (the detectors
normalize inside). A training batch::

    {"labeled":   {"images": [Tensor], "targets": [{"boxes": float32 (n, 4) xyxy, "labels": int64 (n,),
                                                    "masks": uint8 (n, H, W) (masks=True only),
                                                    "image_id": int64 ()}]},
     "unlabeled": {"weak": [Tensor], "strong": [Tensor], "targets": [dict], "image_id": [int]}}

``"unlabeled"`` holds the views the model lists in ``unlabeled_views`` and is absent when it lists
none (or has no such attribute: a plain detector). All views of one unlabeled image share one
geometric draw (resize, flip); ``strong*`` views add photometric changes only (colour jitter,
grayscale, blur, random erasing), so boxes predicted on the weak view hold on the strong one.
``"targets"`` there are the image's real annotations under that geometry, for diagnostics only.
Training targets leave crowd regions out (torchvision cannot train on them). Validation, test and
predict batches are whole, unaugmented test-split images, ``{"images": [...], "targets": [...]}``,
whose targets keep crowd regions with ``iscrowd`` (int64) and ``area`` as torchmetrics'
``MeanAveragePrecision`` reads them: drop ``iscrowd == 1`` rows before computing a loss on them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from datamodules.coco_reading import CocoImage, read_coco, target_of
from datamodules.base import requested_views
from datamodules.resumable import ResumableStreams
from datamodules.split import check_split_record, run_split_path, write_json_atomically

SPLIT_FORMAT = "labelwise-coco-split/1"


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
    None, else augmented training items, ``{"images", "targets"}`` (labeled, no ``views``) or
    ``{<view>..., "targets", "image_id"}`` (unlabeled)."""

    def __init__(self, images: list[Tensor], records: list[CocoImage], indices: Tensor, masks: bool,
                 geometry: v2.Transform | None = None, views: Sequence[str] = (),
                 photometric: StrongPhotometric | None = None) -> None:
        self.images, self.records, self.indices, self.masks = images, records, indices, masks
        self.geometry, self.views, self.photometric = geometry, tuple(views), photometric
        unknown = [name for name in self.views if not name.startswith(("weak", "strong", "plain"))]
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}: view names start with 'weak', 'strong' or 'plain'")
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
        if self.geometry is None:
            return {"images": self.images[index], "targets": target_of(self.records[index], self.masks, crowd=True)}
        image, target = self._transformed(index)
        if not self.views:
            return {"images": image, "targets": target}
        item: dict[str, Any] = {}
        for name in self.views:
            item[name] = self.photometric(image) if name.startswith("strong") else image
        return {**item, "targets": target, "image_id": self.records[index].id}


def collate_lists(items: list[dict[str, Any]]) -> dict[str, list]:
    """Items of one kind into a dict of lists (images of different sizes cannot be stacked)."""
    return {key: [item[key] for item in items] for key in items[0]}


class COCODetection(ResumableStreams, LightningDataModule):
    """Detection data from a COCO json and its image folder, split into test, labeled and unlabeled.

    One seeded permutation of the image ids gives ``num_test`` test images (validation reports on
    them too), then ``num_labeled`` labeled ones, the rest unlabeled. At ``setup("fit")`` the split
    (by image id) is written atomically to ``<log_dir>/split.json``; ``split_file`` reuses one.

    Args:
        root: folder holding ``annotation_file`` and ``image_dir``.
        masks: decode instance masks (polygons or RLE) into the targets, for Mask R-CNN.
        num_labeled: labeled images; ``None`` labels every non-test image.
        num_test: held-out images for validation, test and predict.
        batch_size, uratio: labeled images per step and unlabeled images per labeled one.
        steps_per_epoch: an epoch is this many steps; each stream samples without replacement,
            one permutation after another.
        eval_batch_size: whole images per validation/test/predict batch.
        min_size: resize training images (both streams) so their shorter side is this long;
            evaluation images keep their size (torchvision's detectors resize inside).
        hflip: random horizontal flips in training.
        unlabeled_views: override the views the model asks for.
    """

    num_channels = 3

    def __init__(self, root: str = "data/coco128", annotation_file: str = "annotations/instances_train2017.json",
                 image_dir: str = "train2017", masks: bool = False, num_labeled: int | None = None,
                 num_test: int = 16, seed: int = 0, split_file: str | None = None, batch_size: int = 2,
                 uratio: int = 1, steps_per_epoch: int = 100, eval_batch_size: int = 2, min_size: int | None = None,
                 hflip: bool = True, unlabeled_views: list[str] | None = None, num_workers: int = 0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("uratio", uratio), ("steps_per_epoch", steps_per_epoch),
                            ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.root = Path(root).expanduser()
        self.annotation_path = self.root / annotation_file
        self.coco = read_coco(self.annotation_path, self.root / image_dir)
        self.category_ids = [-1] + self.coco.category_ids  # label -> COCO id; -1: the background
        self.category_names = ["background"] + self.coco.category_names
        self.num_classes = len(self.category_ids)
        self.image_ids = [record.id for record in self.coco.images]
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.masks, self.num_labeled, self.num_test, self.seed = masks, num_labeled, num_test, seed
        self.split_file, self.batch_size, self.uratio = split_file, batch_size, uratio
        self.steps_per_epoch, self.eval_batch_size, self.num_workers = steps_per_epoch, eval_batch_size, num_workers
        self.unlabeled_views = unlabeled_views
        self.geometry, self.photometric = detection_geometry(hflip, min_size), StrongPhotometric()
        self.images: list[Tensor] = []
        self.split: dict[str, Tensor] | None = None  # positions in image_ids, sorted: labeled, unlabeled, test
        self.split_path: Path | None = None

    def label_to_category_id(self, labels: Tensor | Sequence[int]) -> Tensor:
        """COCO category ids (int64) of labels ``1..K`` (e.g. a detector's predicted ``labels``)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 1 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 1..{self.num_classes - 1} (0 is the background), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        return torch.tensor(self.category_ids, dtype=torch.long)[labels]

    def target(self, image_id: int, crowd: bool = True) -> dict[str, Tensor]:
        """The unaugmented target of one image (evaluation form with ``crowd``, else training form)."""
        if image_id not in self._position:
            raise KeyError(f"image id {image_id} is not in {self.annotation_path}")
        return target_of(self.coco.images[self._position[image_id]], self.masks, crowd)

    # --- set-up -------------------------------------------------------------------------------
    def load(self) -> None:
        images = []
        for record in self.coco.images:
            try:
                image = decode_image(str(record.path), mode=ImageReadMode.RGB)  # stored pixels, as COCO annotates them
            except RuntimeError as err:  # torchvision's decoders raise RuntimeError for truncated or foreign files
                reason = re.sub(r"^\w+, \S+:\d+, ", "", str(err).strip().splitlines()[0]).split(". ")[0]
                raise ValueError(f"COCODetection: cannot decode image {record.id} at {record.path} ({reason}): "
                                 f"replace the file, or remove the image and its annotations from "
                                 f"{self.annotation_path}") from err
            if tuple(image.shape[1:]) != (record.height, record.width):
                raise ValueError(f"{record.path} is {image.shape[1]}x{image.shape[2]} (HxW) but {self.annotation_path} "
                                 f"says {record.height}x{record.width}: the image and the json disagree")
            images.append(image)
        self.images = images

    def draw_split(self) -> dict[str, Tensor]:
        n = len(self.image_ids)
        if not 0 <= self.num_test < n:
            raise ValueError(f"num_test={self.num_test} must leave training images: the json lists {n} images")
        rest = n - self.num_test
        num_labeled = rest if self.num_labeled is None else self.num_labeled
        if not 1 <= num_labeled <= rest:
            raise ValueError(f"num_labeled={self.num_labeled} must be in 1..{rest} ({n} images, {self.num_test} test)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        parts = {"test": order[:self.num_test], "labeled": order[self.num_test:self.num_test + num_labeled],
                 "unlabeled": order[self.num_test + num_labeled:]}
        return {k: v.sort().values for k, v in parts.items()}

    def split_record(self) -> dict:
        record = {"format": SPLIT_FORMAT, "annotation_file": str(self.annotation_path), "seed": self.seed}
        return record | {k: [self.image_ids[i] for i in v.tolist()] for k, v in self.split.items()}

    def load_split(self, path: str | os.PathLike) -> dict[str, Tensor]:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"split_file {path} cannot be read as JSON ({err}): pass a run's split.json") from err
        check_split_record(path, record, SPLIT_FORMAT, "COCO detection",
                           "pass the split.json that a COCODetection run saved")
        parts = {k: [self._position.get(i) for i in record.get(k, [])] for k in ("labeled", "unlabeled", "test")}
        listed = [i for ids in parts.values() for i in ids]
        if None in listed or sorted(listed) != list(range(len(self.image_ids))):
            raise ValueError(f"split_file {path} does not partition the {len(self.image_ids)} image ids of "
                             f"{self.annotation_path}: it was made for another json")
        return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in parts.items()}

    def setup(self, stage: str) -> None:
        if not self.images:
            self.load()
        if self.split is None:
            self.split = self.load_split(self.split_file) if self.split_file else self.draw_split()
        if stage == "fit" and self.trainer is not None:
            path = run_split_path(self.trainer)
            if path is not None:
                self.split_path = write_json_atomically(path, self.split_record(), indent=1)

    # --- loaders ------------------------------------------------------------------------------
    def requested_unlabeled_views(self) -> tuple[str, ...]:
        return requested_views(self, default=())  # a plain detector asks for none

    def _stream(self, dataset: Dataset, batch_size: int, stream: str) -> DataLoader:
        # Permutation after permutation, sharded across DDP ranks, resumable exactly (datamodules.resumable).
        return self.training_stream(dataset, batch_size, stream, collate_fn=collate_lists, num_workers=self.num_workers)

    def train_dataloader(self) -> CombinedLoader:
        labeled = DetectionItems(self.images, self.coco.images, self.split["labeled"], self.masks, self.geometry)
        loaders = {"labeled": self._stream(labeled, self.batch_size, "labeled")}
        views = self.requested_unlabeled_views()
        if views:
            if len(self.split["unlabeled"]) == 0:
                raise ValueError(f"the model asks for unlabeled views {views} but the unlabeled set is empty: "
                                 f"set num_labeled below {len(self.split['labeled'])}")
            unlabeled = DetectionItems(self.images, self.coco.images, self.split["unlabeled"], self.masks,
                                       self.geometry, views, self.photometric)
            loaders["unlabeled"] = self._stream(unlabeled, self.batch_size * self.uratio, "unlabeled")
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _eval_loader(self) -> DataLoader:
        if len(self.split["test"]) == 0:
            raise ValueError("num_test=0: there are no held-out images to evaluate on")
        return DataLoader(DetectionItems(self.images, self.coco.images, self.split["test"], self.masks),
                          batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_lists,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader() if len(self.split["test"]) else []  # num_test=0: no validation

    test_dataloader = predict_dataloader = _eval_loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        def floats(part: dict[str, list]) -> dict[str, list]:
            return {k: v if k in ("targets", "image_id") else [x.float().div_(255) for x in v] for k, v in part.items()}

        if isinstance(batch, dict) and "labeled" in batch:
            return {name: floats(part) for name, part in batch.items()}
        return floats(batch)

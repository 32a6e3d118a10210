"""COCO-format detection and instance segmentation data for torchvision's detectors, labeled and
unlabeled (semi-supervised detection in the style of Unbiased Teacher), with a seeded split.

The json is read in ``__init__`` (``datamodules.detection.coco_reading``: checks, label remapping, box
clipping, one warning counting dropped, crowd and clipped boxes), so ``num_classes`` (categories +
background) is known when the CLI links it into the model. ``setup`` decodes every image once with
``torchvision.io.decode_image`` (RGB) and keeps them in memory as uint8 (fine for coco128's 128
images; about 0.9 MB per 640x480 image). Masks are decoded per item, when ``masks=True``.

Batches follow the contract of :mod:`lightning_modules.core.batch` with images and targets as lists,
as torchvision's detectors take them; images are float32 ``(3, H, W)`` in [0, 1] after
``on_after_batch_transfer`` (uint8 in the loader), unnormalized (the detectors normalize inside);
``index`` is an image's position in ``image_ids`` and ``image_id`` its COCO id. A training batch::

    {"labeled":   {"image": [Tensor], "target": [{"boxes": float32 (n, 4) xyxy, "labels": int64 (n,),
                                                  "masks": uint8 (n, H, W) (masks=True only),
                                                  "image_id": int64 ()}],
                   "index": int64 (B,), "image_id": [int]},
     "unlabeled": {"weak": [Tensor], "strong": [Tensor], "target": [dict], "index": int64 (U,), "image_id": [int]}}

``"unlabeled"`` holds the views the model lists in ``unlabeled_views`` and is absent when it lists
none (or has no such attribute: a plain detector). All views of one unlabeled image share one
geometric draw (resize, flip); ``strong*`` views add photometric changes only (colour jitter,
grayscale, blur, random erasing), so boxes predicted on the weak view hold on the strong one.
``"target"`` there holds the image's real annotations under that geometry, for diagnostics only.
Training targets leave crowd regions out (torchvision cannot train on them). Validation, test and
predict batches are whole, unaugmented validation- or test-split images, ``{"image": [...],
"target": [...], "index", "image_id": [int]}``, whose targets keep crowd regions with ``iscrowd`` (int64)
and ``area`` as torchmetrics' ``MeanAveragePrecision`` reads them: drop ``iscrowd == 1`` rows
before computing a loss on them. Predict batches of a ``predict_root`` folder have no targets,
``{"image", "index", "image_id", "file"}``, their ids numbering the sorted files from 1.
(Before 2026-12 these keys were ``images`` and ``targets``, and there was no ``index``.)
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from datamodules.data_root import DataRoot
from datamodules.detection.coco_reading import read_coco, target_of
from datamodules.detection.transforms import DetectionItems, StrongPhotometric, collate_lists, detection_geometry
from datamodules.held_out import HeldOutParts
from datamodules.image_files import FolderImages, load_whole_images
from datamodules.labeled_unlabeled import LabeledUnlabeledDataModule
from datamodules.named_split import draw_parts, read_parts, split_record

SPLIT_FORMAT = "labelwise-coco-split/1"


class COCODetection(HeldOutParts, LabeledUnlabeledDataModule):
    """Detection data from a COCO json and its image folder, split into test, labeled and unlabeled.

    One seeded permutation of the image ids gives ``num_test`` test images, then ``num_val``
    validation images (``0``: validation reports on the test images), then ``num_labeled`` labeled
    ones, the rest unlabeled (:mod:`datamodules.named_split`). At ``setup("fit")`` the split (by
    image id) is written atomically to ``<log_dir>/split.json``; ``split_file`` reuses one.
    Predict runs on the test images, or on every image under ``predict_root`` (no annotations). Its facts
    for a method (:mod:`datamodules.facts`) count labeled objects per class, and index images by ``image_ids``.

    Args:
        root: folder holding ``annotation_file`` and ``image_dir``.
        masks: decode instance masks (polygons or RLE) into the targets, for Mask R-CNN.
        num_labeled: labeled images; ``None`` labels every non-test image.
        num_test: held-out images for test and predict (and validation while ``num_val`` is 0).
        num_val: held-out images for validation only.
        predict_root: a folder of images to predict on instead of the test images.
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
    default_views = ()  # a plain detector asks for none
    collate_fn = staticmethod(collate_lists)  # images of many sizes: lists, not stacked tensors

    def __init__(self, root: DataRoot = "data/coco128", annotation_file: str = "annotations/instances_train2017.json",
                 image_dir: str = "train2017", masks: bool = False, num_labeled: int | None = None,
                 num_test: int = 16, seed: int = 0, split_file: str | None = None, batch_size: int = 2,
                 uratio: int = 1, steps_per_epoch: int = 100, eval_batch_size: int = 2, min_size: int | None = None,
                 hflip: bool = True, unlabeled_views: list[str] | None = None, num_workers: int = 0,
                 num_val: int = 0, predict_root: DataRoot | None = None) -> None:
        super().__init__(root, batch_size, uratio, steps_per_epoch, eval_batch_size, seed, split_file, unlabeled_views,
                         num_workers, predict_root)
        self.annotation_path = self.root / annotation_file
        self.image_dir = self.root / image_dir
        self.coco = read_coco(self.annotation_path, self.image_dir)
        self.category_ids = [-1] + self.coco.category_ids  # label -> COCO id; -1: the background
        self.class_names = ["background"] + self.coco.category_names  # label -> name, as classification's
        self.num_classes = len(self.category_ids)
        self.image_ids = [record.id for record in self.coco.images]
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.masks, self.num_labeled, self.num_test, self.num_val = masks, num_labeled, num_test, num_val
        self.geometry, self.photometric = detection_geometry(hflip, min_size), StrongPhotometric()
        self.images: list[Tensor] = []
        self.split: dict[str, Tensor] | None = None  # positions in image_ids, sorted: labeled, unlabeled, test, val

    @property
    def category_names(self) -> list[str]:
        """Deprecated: ``class_names``, the name every DataModule gives its labels (docs/detection.md used this one)."""
        warnings.warn("COCODetection.category_names is deprecated: use class_names", DeprecationWarning, stacklevel=2)
        return self.class_names

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
    def _decode(self, path: Path, name: str, remedy: str) -> Tensor:
        try:
            return decode_image(str(path), mode=ImageReadMode.RGB)  # stored pixels, as COCO annotates them
        except RuntimeError as err:  # torchvision's decoders raise RuntimeError for truncated or foreign files
            reason = re.sub(r"^\w+, \S+:\d+, ", "", str(err).strip().splitlines()[0]).split(". ")[0]
            raise ValueError(f"COCODetection: cannot decode image {name} ({reason}): replace the file, {remedy}") \
                from err

    def load(self) -> None:
        images = []
        for record in self.coco.images:
            image = self._decode(record.path, f"{record.id} at {record.path}", "or remove the image and its "
                                 f"annotations from {self.annotation_path}")
            if tuple(image.shape[1:]) != (record.height, record.width):
                raise ValueError(f"{record.path} is {image.shape[1]}x{image.shape[2]} (HxW) but {self.annotation_path} "
                                 f"says {record.height}x{record.width}: the image and the json disagree")
            images.append(image)
        self.images = images

    def draw_split(self) -> dict[str, Tensor]:
        parts = draw_parts(range(len(self.image_ids)), self.num_test, self.num_val, self.num_labeled, self.seed,
                           f"the json lists {len(self.image_ids)} images")
        return {k: v.sort().values for k, v in parts.items()}

    def split_record(self) -> dict:
        return split_record(SPLIT_FORMAT, self.seed, self.image_ids, self.split,
                            annotation_file=str(self.annotation_path))

    def load_split(self, path: str | os.PathLike) -> dict[str, Tensor]:
        return read_parts(path, SPLIT_FORMAT, "COCO detection", "pass the split.json that a COCODetection run saved",
                          self.image_ids, f"{len(self.image_ids)} image ids of {self.annotation_path}: it was made for "
                          f"another json")[0]

    def split_ids(self) -> list[int]:
        """The images by image id, as ``split.json`` names them."""
        return self.image_ids

    def predict_image_records(self) -> list[dict]:
        """COCO ``images`` entries (id, file_name, height, width) of what predict serves, after ``setup``."""
        if self.predict_images is not None:
            return [{"id": i + 1, "file_name": name, "height": int(image.shape[1]), "width": int(image.shape[2])}
                    for i, (image, name) in enumerate(zip(self.predict_images.images, self.predict_images.names))]
        return [{"id": r.id, "file_name": r.path.relative_to(self.image_dir).as_posix(), "height": r.height,
                 "width": r.width}
                for r in (self.coco.images[i] for i in self.split["test"].tolist())]

    def load_predict_folder(self) -> FolderImages:
        return load_whole_images(self.predict_root, lambda p: self._decode(p, str(p), "or remove it from predict_root"),
                                 "COCODetection", None, first_id=1)

    # --- facts (datamodules.facts) -----------------------------------------------------------
    def labeled_class_counts(self) -> Tensor:
        """Objects per class over the labeled images (crowds left out, as in training), int64 ``(num_classes,)``."""
        self.require_split("labeled_class_counts()")
        records = [self.coco.images[i] for i in self.split["labeled"].tolist()]
        labels = torch.cat([torch.zeros(0, dtype=torch.long)] + [r.labels[~r.iscrowd] for r in records])
        return torch.bincount(labels, minlength=self.num_classes)

    @property
    def num_indices(self) -> int:
        return len(self.image_ids)

    # --- loaders ------------------------------------------------------------------------------
    def labeled_dataset(self) -> DetectionItems:
        return DetectionItems(self.images, self.coco.images, self.split["labeled"], self.masks, self.geometry)

    def unlabeled_dataset(self, views: tuple[str, ...] = ()) -> DetectionItems:
        return DetectionItems(self.images, self.coco.images, self.unlabeled_indices(), self.masks, self.geometry,
                              views, self.photometric)

    def empty_unlabeled_message(self, views: tuple[str, ...]) -> str:
        return (f"the model asks for unlabeled views {views} but the unlabeled set is empty: "
                f"set num_labeled below {len(self.split['labeled'])}")

    def eval_dataset(self, part: str) -> DetectionItems:
        return DetectionItems(self.images, self.coco.images, self.held_out_part(part), self.masks)

    def to_float(self, images: list[Tensor]) -> list[Tensor]:
        return [x.float().div_(255) for x in images]

"""Reading COCO-format detection annotations, and decoding their masks.

``read_coco`` parses the json once and checks it: every annotation must name a listed image and a
listed category, every image file must exist. Category ids become contiguous labels ``1..K`` in
sorted id order (0 is the background, torchvision's convention). Boxes go from COCO's
``[x, y, width, height]`` to ``x1, y1, x2, y2`` clipped to the image; a box with no width or height
left after clipping is dropped (it would raise inside torchvision's detectors). Crowd regions
(``iscrowd=1``) are kept and flagged: ``target_of`` leaves them out of training targets and keeps
them, flagged, in evaluation targets. One warning per read counts what was dropped, clipped and
flagged.

``target_of(..., masks=True)`` decodes each image's masks at once (``datamodules.detection.coco_masks``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.detection.coco_masks import decode_masks


@dataclass
class CocoImage:
    """One image and its kept annotations (aligned lists; crowd regions flagged in ``iscrowd``)."""

    id: int
    path: Path
    height: int
    width: int
    boxes: Tensor  # float32 (n, 4) xyxy, clipped, positive width and height
    labels: Tensor  # int64 (n,), 1..K
    iscrowd: Tensor  # bool (n,)
    area: Tensor  # float32 (n,), the json's "area" (segmentation area in COCO); NaN where it gives none
    segmentations: list  # the json's "segmentation" per annotation (None where absent)
    annotation_ids: list


@dataclass
class CocoAnnotations:
    images: list[CocoImage]  # sorted by image id
    category_ids: list[int]  # sorted COCO category ids: label l is category_ids[l - 1]
    category_names: list[str]
    num_degenerate: int
    num_crowd: int
    num_clipped: int


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist: pass root and annotation_file "
                                f"so that root/annotation_file is the instances json")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"COCO annotation file {path} is empty: it may have been cut short; download it again")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise json.JSONDecodeError(f"COCO annotation file {path} is not valid JSON ({err.msg}); it may be "
                                   f"truncated: download it again", err.doc, err.pos) from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"COCO annotation file {path} lacks the key(s) {missing}: a detection json needs "
                         f"'images', 'annotations' and 'categories' (is it a captions or keypoints file?)")
    _check_fields(path, record)
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: the fields ``read_coco`` reads from each entry, and what each must be
FIELDS = {
    "images": {"id": "an integer", "file_name": "a string", "height": "a positive integer",
               "width": "a positive integer"},
    "annotations": {"image_id": "an integer", "category_id": "an integer", "bbox": "[x, y, width, height] numbers"},
    "categories": {"id": "an integer"},
}
_VALID = {
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a positive integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "a string": lambda v: isinstance(v, str) and v != "",
    "[x, y, width, height] numbers": lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
}


def _check_fields(path: Path, record: dict) -> None:
    """Every entry of images/annotations/categories is an object with the fields read, of the right type."""
    for key, fields in FIELDS.items():
        entries = record[key]
        if not isinstance(entries, list):
            raise ValueError(f"COCO annotation file {path}: '{key}' is {type(entries).__name__} {str(entries)[:60]}, "
                             f"not a list: COCO's '{key}' is a list of objects")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"COCO annotation file {path}: {key}[{i}] is {str(entry)[:60]}, not an object with "
                                 f"{sorted(fields)}")
            for field, kind in fields.items():
                if field not in entry or not _VALID[kind](entry[field]):
                    found = f"is {entry[field]!r}" if field in entry else "is missing"
                    raise ValueError(f"COCO annotation file {path}: {key}[{i}] (id {entry.get('id')}) field "
                                     f"'{field}' {found}: it must be {kind}; fix or remove the entry")
    if not record["images"]:
        raise ValueError(f"COCO annotation file {path} lists no images: there is nothing to train or test on")


def read_coco(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> CocoAnnotations:
    """Parse and check a COCO instances json whose ``file_name`` entries live in ``image_dir``."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    record = _load_json(path)
    category_ids = sorted(int(c["id"]) for c in record["categories"])
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"{path}: category ids repeat: each category needs its own id")
    label_of = {cid: label for label, cid in enumerate(category_ids, start=1)}
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in record["categories"]}
    info = {int(im["id"]): im for im in record["images"]}
    if len(info) != len(record["images"]):
        raise ValueError(f"{path}: image ids repeat: each entry of 'images' needs its own id")
    per_image: dict[int, list[dict]] = {i: [] for i in info}
    for ann in record["annotations"]:
        if ann.get("image_id") not in info:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image id {ann.get('image_id')}, which is "
                             f"not in 'images': the json is inconsistent; remove the annotation or add the image")
        if ann.get("category_id") not in label_of:
            raise ValueError(f"{path}: annotation {ann.get('id')} has category id {ann.get('category_id')}, which is "
                             f"not in 'categories' {category_ids}: remove the annotation or add the category")
        per_image[ann["image_id"]].append(ann)
    images, degenerate, crowd, clipped = [], 0, 0, 0
    for image_id in sorted(info):
        im = info[image_id]
        file = image_dir / im["file_name"]
        if not file.is_file():
            raise FileNotFoundError(f"{path}: image {image_id} is {file}, which does not exist: image_dir must be the "
                                    f"folder holding the json's file_name entries")
        h, w = int(im["height"]), int(im["width"])
        anns = per_image[image_id]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        raw = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        limits = torch.tensor([w, h, w, h], dtype=torch.float64)
        boxes = torch.minimum(raw.clamp(min=0), limits)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        degenerate += int((~keep).sum())
        clipped += int((keep & (boxes != raw).any(dim=1)).sum())
        kept = [a for a, k in zip(anns, keep.tolist()) if k]
        for a in kept:
            if "area" in a and not (_is_number(a["area"]) and a["area"] >= 0):
                raise ValueError(f"{path}: annotation {a.get('id')} has area {a['area']!r}: it must be a number >= 0 "
                                 f"(pixels); fix it, or remove the key to have it computed from the box or mask")
        iscrowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in kept], dtype=torch.bool)
        crowd += int(iscrowd.sum())
        images.append(CocoImage(
            image_id, file, h, w, boxes[keep].float(),
            torch.tensor([label_of[a["category_id"]] for a in kept], dtype=torch.int64), iscrowd,
            torch.tensor([float(a.get("area", "nan")) for a in kept], dtype=torch.float32),
            [a.get("segmentation") for a in kept], [a.get("id") for a in kept]))
    if degenerate or crowd:
        warnings.warn(f"{path}: {degenerate} of {len(record['annotations'])} annotations dropped for degenerate boxes "
                      f"(width or height <= 0 after clipping to the image); {crowd} crowd regions (iscrowd=1) left "
                      f"out of training targets (torchvision detectors cannot train on them; evaluation targets "
                      f"keep them with iscrowd=1); {clipped} boxes clipped to their image", stacklevel=3)
    return CocoAnnotations(images, category_ids, [names[c] for c in category_ids], degenerate, crowd, clipped)


def target_of(image: CocoImage, masks: bool = False, crowd: bool = False) -> dict[str, Tensor]:
    """torchvision's target dict for ``image``: ``boxes``, ``labels``, ``image_id`` (+ ``masks``).

    ``crowd=False`` (training) leaves crowd regions out; ``crowd=True`` (evaluation) keeps them and
    adds ``iscrowd`` (int64) and ``area`` for torchmetrics' ``MeanAveragePrecision`` (object sizes).
    An annotation without ``area`` gets its mask's pixel count with ``masks`` (COCO's area is the
    segmentation's), else its clipped box's width x height, as torchmetrics computes it.
    """
    keep = torch.ones_like(image.iscrowd) if crowd else ~image.iscrowd
    target = {"boxes": image.boxes[keep], "labels": image.labels[keep], "image_id": torch.tensor(image.id)}
    missing_area = image.area[keep].isnan()
    if crowd:
        target["iscrowd"] = image.iscrowd[keep].long()
        boxes = target["boxes"]
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target["area"] = torch.where(missing_area, box_area, image.area[keep])
    if masks:
        kept = [(s, ann_id) for s, ann_id, k in zip(image.segmentations, image.annotation_ids, keep.tolist()) if k]
        for segmentation, ann_id in kept:
            if segmentation is None:
                raise ValueError(f"annotation {ann_id} of image {image.id} has no segmentation: masks=True "
                                 f"needs one per object; use masks=False for boxes only")
        target["masks"] = torch.from_numpy(decode_masks([s for s, _ in kept], image.height, image.width))
        if crowd and missing_area.any():  # COCO's area of a masked object is its mask's
            target["area"] = torch.where(missing_area, target["masks"].flatten(1).sum(1).float(), target["area"])
    return target

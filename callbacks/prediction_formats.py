"""The files :class:`callbacks.PredictionWriter` writes, one format per task.

* classification: one CSV row per image: ``file`` (its path under ``predict_root``) or ``index``
  (its position in the test set), ``target`` (the true class, when the data has it), ``predicted``
  (the class name; multi-label: the names of every predicted class joined by ``;``) and
  ``prob_<class>`` per class.
* segmentation: one PNG per image with the class of every pixel, in the pixel values the data's
  masks use (``mask_pixel_values``: 0/255 for binary masks), so a written mask reads back as a
  mask; optionally an overlay PNG (the image in grey, each foreground class tinted).
* detection: COCO results, one entry per detection, ``{"image_id", "category_id", "bbox": [x, y,
  w, h], "score"}`` plus ``"segmentation"`` (compressed RLE) for Mask R-CNN; the list of images
  they refer to as a COCO ``images``/``categories`` json, so ``COCO(images).loadRes(results)``
  reads them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from faster_coco_eval.core import mask as coco_mask
from PIL import Image

from lightning_modules.core.atomic import atomic_path, write_text_atomically

TINT = 0.45  # weight of a class colour over the grey image in an overlay
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def task_of(prediction: Any) -> str | None:
    """``"classification"``, ``"segmentation"`` or ``"detection"`` from the shape of what predict_step
    returned, or ``None`` for anything else."""
    if isinstance(prediction, dict) and {"index", "probs", "prediction"} <= prediction.keys():
        return {2: "classification", 4: "segmentation"}.get(prediction["probs"].ndim)
    if isinstance(prediction, (list, tuple)) and all(isinstance(p, dict) and "boxes" in p for p in prediction):
        return "detection"
    return None


# --- classification ---------------------------------------------------------------------------
def classification_rows(prediction: dict, batch: dict, class_names: Sequence[str]) -> dict[tuple, dict]:
    """One row per image, keyed by ``("file", name)`` or ``("index", i)`` (what identifies it)."""
    probs, predicted = prediction["probs"].float().cpu(), prediction["prediction"].cpu()
    index, files, targets = prediction["index"].cpu(), batch.get("file"), batch.get("target")
    rows = {}
    for k in range(len(index)):
        key = ("file", files[k]) if files is not None else ("index", int(index[k]))
        row: dict[str, Any] = {key[0]: key[1]}
        if targets is not None and targets.ndim == 1 and int(targets[k]) >= 0:
            row["target"] = class_names[int(targets[k])]
        if predicted.ndim == 2:  # multi-label: every class predicted present
            row["predicted"] = ";".join(class_names[c] for c in torch.nonzero(predicted[k]).flatten().tolist())
        else:
            row["predicted"] = class_names[int(predicted[k])]
        row.update({f"prob_{name}": round(float(p), 6) for name, p in zip(class_names, probs[k])})
        rows[key] = row
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, text.getvalue())


# --- segmentation -----------------------------------------------------------------------------
def mask_image(classes: torch.Tensor, pixel_values: Sequence[int]) -> Image.Image:
    """A single-channel PNG-ready image of per-pixel class ids ``(H, W)`` mapped to ``pixel_values``."""
    values = torch.as_tensor(list(pixel_values), dtype=torch.int64)[classes.cpu().long()].numpy()
    return Image.fromarray(values.astype(np.uint8)) if values.max(initial=0) < 256 else \
        Image.fromarray(values.astype(np.uint16))


def overlay_image(image: torch.Tensor, classes: torch.Tensor) -> Image.Image:
    """The image ``(C, H, W)`` in grey (min-max scaled), each class > 0 tinted with its palette colour."""
    grey = image.float().cpu().mean(dim=0)
    grey = (grey - grey.min()) / (grey.max() - grey.min()).clamp_min(1e-6)
    rgb = grey[..., None].repeat(1, 1, 3)
    classes = classes.cpu().long()
    colours = torch.tensor((0, 0, 0), dtype=torch.float32).expand(*classes.shape, 3).clone()
    for c in classes.unique().tolist():
        if c > 0:
            colours[classes == c] = torch.tensor(PALETTE[(c - 1) % len(PALETTE)], dtype=torch.float32) / 255
    tinted = (classes > 0)[..., None]
    rgb = torch.where(tinted, (1 - TINT) * rgb + TINT * colours, rgb)
    return Image.fromarray((rgb * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def save_png(picture: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def png_name(name: str) -> str:
    """``a/b.jpg`` -> ``a/b.png``: a written file named after its source image."""
    return Path(name).with_suffix(".png").as_posix()


# --- detection --------------------------------------------------------------------------------
def coco_results(detection: dict, image_id: int, category_ids: torch.Tensor | None) -> list[dict]:
    """COCO results entries of one image's detections (boxes xyxy in image pixels)."""
    boxes = detection["boxes"].float().cpu()
    labels = detection["labels"].cpu().long()
    categories = category_ids[labels] if category_ids is not None else labels
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    entries = [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 3) for v in box],
                "score": round(float(s), 5)}
               for box, c, s in zip(xywh, categories, detection["scores"].float().cpu())]
    if "masks" in detection and len(entries):
        masks = detection["masks"].cpu()
        masks = masks[:, 0] if masks.ndim == 4 else masks  # torchvision's (N, 1, H, W) probabilities
        masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
        encoded = coco_mask.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for entry, rle in zip(entries, encoded):
            entry["segmentation"] = {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return entries

"""Reading a segmentation folder pair: images matched to their masks by file stem, and masks decoded
to class ids, with errors that name the file and the fix (:class:`~datamodules.SegmentationFolders`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from datamodules.image_files import files_by_stem, natural_key

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless only: a JPEG mask has invented class ids


def image_mask_pairs(root: Path, image_dir: str, mask_dir: str, unlabeled_without_mask: bool
                     ) -> tuple[list[str], dict[str, Path], list[tuple[Path, Path | None]]]:
    """``(stems in natural order, image file by stem, (image, mask or None) per stem)`` under ``root``."""
    image_root, mask_root = root / image_dir, root / mask_dir
    if not image_root.is_dir():
        raise FileNotFoundError(f"SegmentationFolders: {image_root} does not exist: root must hold "
                                f"{image_dir}/ and {mask_dir}/")
    images = files_by_stem(image_root, IMAGE_SUFFIXES, "SegmentationFolders")
    if not images:
        raise ValueError(f"SegmentationFolders: {image_root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = files_by_stem(mask_root, MASK_SUFFIXES, "SegmentationFolders") if mask_root.is_dir() else {}
    stems = sorted(images, key=natural_key)
    missing = [s for s in stems if s not in masks]
    if missing and not unlabeled_without_mask:
        raise ValueError(f"SegmentationFolders: image {images[missing[0]]} has no mask {mask_root}/{missing[0]}"
                         f"{{{','.join(MASK_SUFFIXES)}}} ({len(missing)} image(s) without masks); pass "
                         f"unlabeled_without_mask=True to use such images as unlabeled")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("SegmentationFolders: %d mask(s) without an image are ignored, e.g. %s", len(orphans),
                    masks[orphans[0]])
    return stems, images, [(images[s], masks.get(s)) for s in stems]


def decode_mask(path: Path, image_path: Path, image_size: tuple[int, int], mask_mode: str, threshold: int,
                num_classes: int) -> Tensor:
    """The mask at ``path`` as class ids (H, W): ``"binary"`` is pixel > ``threshold``, ``"index"`` the
    single-channel pixel values themselves; it must match its image's ``image_size``."""
    try:
        with Image.open(path) as pil:
            if mask_mode == "binary":
                array = np.asarray(pil.convert("L")) > threshold
            elif pil.mode in ("1", "L", "P", "I", "I;16"):
                array = np.asarray(pil)  # for "P" these are palette indices, i.e. the class ids
            else:
                raise ValueError(f"SegmentationFolders: index mask {path} has mode {pil.mode}: class-id masks "
                                 f"must be single-channel (PIL mode L, P, I or I;16)")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"SegmentationFolders: cannot decode mask {path} ({err}): replace or remove it") from err
    if array.shape != image_size:
        raise ValueError(f"SegmentationFolders: mask {path} is {array.shape[0]}x{array.shape[1]} (HxW) but its "
                         f"image {image_path} is {image_size[0]}x{image_size[1]}: masks must match their images")
    if mask_mode == "index" and array.size and int(array.max()) >= num_classes:
        raise ValueError(f"SegmentationFolders: mask {path} holds class id {int(array.max())}, but "
                         f"num_classes={num_classes} allows 0..{num_classes - 1}")
    dtype = np.uint8 if num_classes <= 256 else np.int32
    return torch.from_numpy(array.astype(dtype))

"""Image files: finding them in folders, decoding them with Pillow, and folders of new, unlabeled
images to predict on (``--data.predict_root DIR``) for every DataModule family.

A predict folder is searched recursively for image files (sorted by relative path); each image is named
in predict batches by its path relative to the folder (``"file"``), which is how the prediction
writer (``callbacks.PredictionWriter``) names its outputs. An empty folder, a missing one, or a
file that does not decode stops with a message naming the path and the fix: nothing is skipped.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.in_memory import IndexedImages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def natural_key(stem: str) -> list:
    """Sort key putting "2" before "10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", stem)]


def image_paths(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """The files in ``folder`` (or, ``recursive``, under it) with one of ``suffixes`` (any case), sorted
    by relative path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in found if p.is_file() and p.suffix.lower() in suffixes),
                  key=lambda p: p.relative_to(folder).as_posix())


def files_by_stem(folder: Path, suffixes: Sequence[str], owner: str) -> dict[str, Path]:
    """The files of ``folder`` (not recursive) with one of ``suffixes``, by stem; two files sharing a stem raise."""
    found: dict[str, Path] = {}
    for path in image_paths(folder, suffixes):
        if path.stem in found:
            raise ValueError(f"{owner}: {found[path.stem]} and {path} share the stem {path.stem!r}: "
                             f"keep one file per stem")
        found[path.stem] = path
    return found


def find_images(root: str | os.PathLike, owner: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted by relative path."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"{owner}: predict_root {root} {what}: pass the folder of images to predict")
    files = image_paths(root, suffixes, recursive=True)
    if not files:
        others = sorted(p.name for p in root.rglob("*") if p.is_file())
        found = f" (it holds {others[:3]}{' and more' if len(others) > 3 else ''})" if others else " (it is empty)"
        raise ValueError(f"{owner}: predict_root {root} holds no images with a suffix in {', '.join(suffixes)}"
                         f"{found}: put the images to predict there")
    stems: dict[str, Path] = {}
    for path in files:  # outputs are named by relative path without suffix: a.jpg and a.png would collide
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in stems:
            raise ValueError(f"{owner}: {stems[key]} and {path} differ only in their suffix, so their predictions "
                             f"would share a name: rename or remove one")
        stems[key] = path
    return files


def decode_rgb_or_grey(path: Path, channels: int, owner: str) -> Tensor:
    """uint8 ``(channels, H, W)`` decoded with Pillow (1 channel: grey, 3: RGB)."""
    try:
        with Image.open(path) as pil:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{owner}: cannot decode image {path} ({err}): replace or remove it") from err
    return torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1).contiguous()


def decode_all(files: Sequence[Any], decode: Callable[[Any], Any], threads: int = 4) -> list[Any]:
    with ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
        return list(pool.map(decode, files))


def resized(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image`` (uint8) at ``size`` (bilinear, antialiased), unchanged if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def relative_names(root: str | os.PathLike, files: Sequence[Path]) -> list[str]:
    root = Path(root).expanduser()
    return [p.relative_to(root).as_posix() for p in files]


class FolderImages(Dataset):
    """Whole images of any size, ``{"image": uint8 (C, H, W), "index": int64 (), "file": str}``, plus
    ``"image_id"`` (``first_id + index``) when ``first_id`` is given."""

    def __init__(self, images: Sequence[Tensor], names: Sequence[str], first_id: int | None = None) -> None:
        self.images, self.names, self.first_id = list(images), list(names), first_id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.images[i], "index": torch.tensor(i), "file": self.names[i]}
        return item if self.first_id is None else dict(item, image_id=self.first_id + i)


class PredictFolder:
    """DataModule mixin for ``predict_root``: at ``setup("predict")`` the images under it are loaded
    once, by the DataModule's ``load_predict_folder()``, into ``predict_images``, which predict then
    serves instead of the test images (``predict_images`` stays None without a ``predict_root``)."""

    predict_root: str | None
    predict_images: Dataset | None

    def load_predict_folder(self) -> Dataset:
        raise NotImplementedError

    def setup_predict_folder(self, stage: str) -> bool:
        """Whether ``stage`` predicts on ``predict_root`` (its images then loaded): the rest of set-up is not needed."""
        if stage != "predict" or self.predict_root is None:
            return False
        if self.predict_images is None:
            self.predict_images = self.load_predict_folder()
        return True


def load_classification_folder(root: str | os.PathLike, channels: int, size: tuple[int, int], owner: str,
                               threads: int = 4) -> IndexedImages:
    """The images under ``root`` decoded like the training images (grey or RGB) and resized to the
    training image ``size``, with target -1 (unknown)."""
    files = find_images(root, owner)
    images = decode_all(files, lambda p: resized(decode_rgb_or_grey(p, channels, owner), size), threads)
    targets = torch.full((len(images),), -1, dtype=torch.long)
    return IndexedImages(torch.stack(images), targets, names=relative_names(root, files))


def load_whole_images(root: str | os.PathLike, decode: Callable[[Path], Tensor], owner: str, batch_size: int | None,
                      suffixes: Sequence[str] = IMAGE_SUFFIXES, threads: int = 4,
                      first_id: int | None = None) -> FolderImages:
    """The images under ``root``, decoded by ``decode`` and kept at their own size; images of several
    sizes need ``batch_size`` 1 unless the batches are lists (``batch_size=None``)."""
    files = find_images(root, owner, suffixes)
    images = decode_all(files, decode, threads)
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1 and batch_size is not None and batch_size > 1:
        raise ValueError(f"{owner}: the images under {root} have several sizes {sizes[:3]}: pass "
                         f"--data.eval_batch_size 1 to predict them one at a time")
    return FolderImages(images, relative_names(root, files), first_id)

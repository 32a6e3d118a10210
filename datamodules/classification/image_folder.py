"""Any ``root/train/<class>/*`` + ``root/test/<class>/*`` tree of images as labeled/unlabeled data."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from datamodules.data_root import DataRoot
from datamodules.classification.base import SSLDataModule
from datamodules.image_files import IMAGE_SUFFIXES, decode_all, decode_rgb_or_grey, image_paths, resized


class ImageFolderSSL(SSLDataModule):
    """Images in class folders, decoded once into memory as uint8.

    Classes are the sorted folder names under ``root/train``; ``root/test`` must have the same
    folders. Every image must have one size unless ``image_size`` resizes them. Mean and standard
    deviation are measured on the training images. The CIFAR-10 tarballs in ``shared/data``
    unpack into such a tree.

    Args:
        grayscale: decode as one channel instead of RGB.
        image_size: resize every image to this square size (bilinear) when sizes differ.
        decode_threads: threads decoding files with Pillow (decoding releases the GIL).
        mean, std: per-channel normalization on the [0, 1] scale; ImageNet's by default (fixed,
            not measured, so a test-only run normalizes exactly as training did).
    """

    def __init__(self, root: DataRoot = "data", grayscale: bool = False, image_size: int | None = None,
                 decode_threads: int = 4, mean: list[float] | None = None, std: list[float] | None = None,
                 **kwargs) -> None:
        super().__init__(root=root, **kwargs)
        if self.download:
            raise ValueError("ImageFolderSSL cannot download: unpack the images under root/train/<class>/ and "
                             "root/test/<class>/ and leave download false")
        self.grayscale, self.image_size, self.decode_threads = grayscale, image_size, decode_threads
        self.num_channels = 1 if grayscale else 3
        self.classes = self._find_classes()
        self.num_classes = len(self.classes)
        default_mean, default_std = ((0.5,), (0.25,)) if grayscale else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"ImageFolderSSL: mean and std need {self.num_channels} values, got {self.mean} and {self.std}")

    def _find_classes(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(
                f"ImageFolderSSL: {train} does not exist: root must hold train/<class>/* and test/<class>/* "
                f"(ImageFolderSSL has no download; unpack the data set under root first)"
            )
        classes = sorted(d.name for d in train.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"ImageFolderSSL: {train} has no class folders: expected train/<class>/<image>")
        return classes

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def training_image_size(self) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size, self.image_size
        first = self._files("train")[0][0]
        try:
            with Image.open(first) as pil:  # reads the header only
                return pil.height, pil.width
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"ImageFolderSSL: cannot read {first} ({err}): replace or remove the file") from err

    def _files(self, split: str) -> tuple[list[Path], torch.Tensor]:
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageFolderSSL: {folder} does not exist: root needs both train/ and test/")
        extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in self.classes)
        if extra:
            raise ValueError(f"ImageFolderSSL: {folder} has class folders {extra} that train/ lacks")
        files, targets = [], []
        for label, name in enumerate(self.classes):
            members = image_paths(folder / name) if (folder / name).is_dir() else []
            if not members:
                raise ValueError(f"ImageFolderSSL: class folder {folder / name} holds no images "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder")
            files += members
            targets += [label] * len(members)
        return files, torch.tensor(targets, dtype=torch.long)

    def _decode(self, path: Path) -> torch.Tensor:
        image = decode_rgb_or_grey(path, self.num_channels, "ImageFolderSSL")
        return image if self.image_size is None else resized(image, (self.image_size, self.image_size))

    def _load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files, targets = self._files(split)
        images = decode_all(files, self._decode, self.decode_threads)
        sizes = {tuple(im.shape[1:]) for im in images}
        if len(sizes) > 1:
            raise ValueError(f"ImageFolderSSL: images under {self.root / split} have several sizes {sorted(sizes)[:4]}: "
                             f"pass --data.image_size N to resize them")
        return torch.stack(images), targets

    def load_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load_split("train")

    def load_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load_split("test")

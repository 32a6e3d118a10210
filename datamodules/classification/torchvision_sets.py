"""CIFAR-10, CIFAR-100, SVHN and STL-10 through torchvision, with torchvision's own download code."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from datamodules.classification.base import SSLDataModule


class TorchvisionSSL(SSLDataModule):
    """Shared loading for the torchvision data sets; subclasses name the class and its splits."""

    dataset_class: type
    folder_hint: str
    targets_attribute = "targets"  # SVHN and STL-10 call it "labels"
    channels_last_storage = True  # CIFAR stores (N, H, W, C); SVHN and STL-10 (N, C, H, W)
    image_side = 32
    names: tuple[str, ...] | None = None  # None: the class names torchvision reads with the data
    _read_names: list[str] | None = None  # those names, kept from the first read of the data

    @property
    def class_names(self) -> list[str]:
        # read at most once: the prediction writer asks for them every batch, and reading them
        # means opening a whole split (CIFAR-100's test set) through torchvision
        if self.names is not None:
            return list(self.names)
        if self._read_names is None:
            self._read_names = list(self._open("test").classes)
        return list(self._read_names)

    def training_image_size(self) -> tuple[int, int]:
        return self.image_side, self.image_side

    def prepare_data(self) -> None:
        if self.download:
            for split in self._splits():
                self._open(split, download=True)

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def _kwargs(self, split: str) -> dict:
        return {"train": split == "train"}

    def _open(self, split: str, download: bool = False):
        try:
            return self.dataset_class(str(self.root), download=download, **self._kwargs(split))
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{self.dataset_name}: no {split} data under root={str(self.root)!r} (expected {self.folder_hint}). "
                f"Pass --data.download true to download it there, or point --data.root at the folder that holds it."
            ) from err

    def _tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._open(split)
        if self.names is None and self._read_names is None:
            self._read_names = list(ds.classes)
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        if self.channels_last_storage:
            images = images.permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(np.asarray(getattr(ds, self.targets_attribute)), dtype=torch.long)

    def load_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensors("train")

    def load_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensors("test")


class CIFAR10SSL(TorchvisionSSL):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 colour images in 10 classes."""

    dataset_class = torchvision.datasets.CIFAR10
    folder_hint = "cifar-10-batches-py/"
    num_classes, num_channels = 10, 3
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR100SSL(TorchvisionSSL):
    """CIFAR-100: 50,000 train / 10,000 test 32x32 colour images in 100 classes."""

    dataset_class = torchvision.datasets.CIFAR100
    folder_hint = "cifar-100-python/"
    num_classes, num_channels = 100, 3
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

    def __init__(self, num_labeled: int | None = 10000, **kwargs) -> None:
        super().__init__(num_labeled=num_labeled, **kwargs)


class SVHNSSL(TorchvisionSSL):
    """SVHN: 73,257 train / 26,032 test digits; ``use_extra`` adds the 531,131 extra images as unlabeled.

    No flips (digits), as in FixMatch's SVHN recipe.
    """

    dataset_class = torchvision.datasets.SVHN
    folder_hint = "train_32x32.mat, test_32x32.mat"
    num_classes, num_channels = 10, 3
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    default_hflip = False
    targets_attribute, channels_last_storage = "labels", False
    names = tuple(str(d) for d in range(10))

    def __init__(self, num_labeled: int | None = 1000, use_extra: bool = False, **kwargs) -> None:
        super().__init__(num_labeled=num_labeled, **kwargs)
        self.use_extra = use_extra

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test", "extra") if self.use_extra else ("train", "test")

    def _kwargs(self, split: str) -> dict:
        return {"split": split}

    def load_extra_unlabeled(self) -> torch.Tensor | None:
        return torch.from_numpy(self._open("extra").data) if self.use_extra else None


class STL10SSL(TorchvisionSSL):
    """STL-10: 5,000 labeled train / 8,000 test 96x96 images, plus 100,000 unlabeled images."""

    dataset_class = torchvision.datasets.STL10
    folder_hint = "stl10_binary/"
    num_classes, num_channels = 10, 3
    mean, std = (0.4409, 0.4279, 0.3868), (0.2683, 0.2610, 0.2687)
    targets_attribute, channels_last_storage = "labels", False
    image_side = 96
    names = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

    def __init__(self, num_labeled: int | None = 1000, **kwargs) -> None:
        super().__init__(num_labeled=num_labeled, **kwargs)

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test", "unlabeled")

    def _kwargs(self, split: str) -> dict:
        return {"split": split}

    def load_extra_unlabeled(self) -> torch.Tensor:
        return torch.from_numpy(self._open("unlabeled").data)

"""scikit-learn's bundled handwritten digits: the embedded default, nothing to download."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.classification.base import SSLDataModule


class DigitsSSL(SSLDataModule):
    """1,797 8x8 grayscale digits (scikit-learn), split 75 / 25 % train/test, stratified.

    The images are upsampled to ``image_size`` (bilinear) so that crops, rotations and Cutout
    act at a scale comparable to CIFAR's; flips are off because they change digits' identity.
    Defaults: 5 labels per class, 32 labeled + 7 x 32 unlabeled images per step.

    ``predict_root`` images are read as grey, white digits on black (as scikit-learn's, scaled
    0..16 -> 0..255) and resized to ``image_size``.
    """

    num_classes = 10
    num_channels = 1
    mean = (0.2734,)
    std = (0.3732,)
    default_hflip = False

    def __init__(self, num_labeled: int | None = 50, batch_size: int = 32, steps_per_epoch: int = 100,
                 image_size: int = 8, test_fraction: float = 0.25, **kwargs) -> None:
        super().__init__(num_labeled=num_labeled, batch_size=batch_size, steps_per_epoch=steps_per_epoch, **kwargs)
        self.image_size, self.test_fraction = image_size, test_fraction
        self._parts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._parts is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            if self.image_size != 8:
                images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
            images = (images * 255).round().clamp(0, 255).to(torch.uint8)
            targets = torch.as_tensor(digits.target, dtype=torch.long)
            # A fixed test set, independent of the split seed, so runs with other seeds compare.
            train_idx, test_idx = train_test_split(torch.arange(len(targets)).numpy(), test_size=self.test_fraction,
                                                   stratify=targets.numpy(), random_state=0)
            train_idx, test_idx = torch.as_tensor(train_idx).sort().values, torch.as_tensor(test_idx).sort().values
            self._parts = {"train": (images[train_idx], targets[train_idx]), "test": (images[test_idx], targets[test_idx])}
        return self._parts

    def training_image_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def load_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load()["train"]

    def load_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load()["test"]

"""Joint image/mask augmentation for segmentation, and the datasets that apply it per sample.

Geometry (crop, flips, 90-degree rotations) is drawn once per image and applied to the image and
its mask together (torchvision v2 on ``tv_tensors.Image``/``Mask``), so masks are never
interpolated and pixel (i, j) of a crop is pixel (i, j) of its mask. Photometric changes touch the
image only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_modules.core.batch import check_view_names


class RandomRot90(v2.Transform):
    """Rotate by ``k * 90`` degrees, ``k`` uniform in 0..3 (0 or 2 for non-square inputs, which keeps
    their size); exact index permutation, so masks keep their class ids."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        k = int(torch.randint(4 if h == w else 2, ()))
        return {"k": k if h == w else 2 * k}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt.as_subclass(Tensor), params["k"], dims=(-2, -1)), like=inpt)


def geometric_transform(crop_size: int | None, flips: bool = True, rot90: bool = True) -> v2.Transform:
    """Joint image+mask geometry: random crop (reflect-padded when the image is smaller), flips, rot90."""
    steps: list[v2.Transform] = []
    if crop_size is not None:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, padding_mode="reflect"))
    if flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(RandomRot90())
    return v2.Compose(steps) if steps else v2.Identity()


def photometric_transform(num_channels: int, color_jitter: float = 0.5, blur_probability: float = 0.5,
                          noise_std: float = 0.03) -> v2.Transform:
    """The strong view's image-only changes (uint8 in, uint8 out): colour jitter (p=0.8), Gaussian
    blur with sigma in [0.1, 2] (``blur_probability``), Gaussian noise of ``noise_std`` on the [0, 1]
    scale (p=0.5). Saturation and hue jitter only for RGB."""
    rgb = num_channels == 3
    jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                            saturation=color_jitter if rgb else 0, hue=min(color_jitter / 2, 0.5) if rgb else 0)
    return v2.Compose([
        v2.RandomApply([jitter], p=0.8 if color_jitter > 0 else 0.0),
        v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=blur_probability),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=noise_std)], p=0.5 if noise_std > 0 else 0.0),
        v2.ToDtype(torch.uint8, scale=True),
    ])


class SegmentationCrops(Dataset):
    """Augmented training items of images ``indices``: labeled ``{"image", "target", "index"}`` when
    ``views`` is empty, else unlabeled ``{<view>..., "target", "index"}``.

    All views of one unlabeled image share one geometric draw; ``strong*`` views add an independent
    photometric draw each. Their ``"target"`` is the mask under that same geometry, or all ``-1``
    for an image without a mask (for diagnostics only: no method trains on it).
    """

    def __init__(self, images: list[Tensor], masks: list[Tensor | None], indices: Tensor, geometry: Callable,
                 photometric: Callable | None = None, views: Sequence[str] = ()) -> None:
        self.images, self.masks, self.indices = images, masks, indices
        self.geometry, self.photometric, self.views = geometry, photometric, check_view_names(views)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = int(self.indices[i])
        image, mask = tv_tensors.Image(self.images[index]), self.masks[index]
        if mask is None:
            image = self.geometry(image)
            target = torch.full(image.shape[-2:], -1, dtype=torch.long)
        else:
            image, target = self.geometry(image, tv_tensors.Mask(mask))
            target = target.as_subclass(Tensor).long()
        if not self.views:
            return {"image": image.as_subclass(Tensor), "target": target, "index": torch.tensor(index)}
        item = {}
        for name in self.views:
            view = self.photometric(image) if name.startswith("strong") else image
            item[name] = view.as_subclass(Tensor)
        return {**item, "target": target, "index": torch.tensor(index)}


class WholeImages(Dataset):
    """Un-augmented images with their masks, ``{"image", "target", "index"}``, for validation, test
    and predict."""

    def __init__(self, images: list[Tensor], masks: list[Tensor | None], indices: Tensor) -> None:
        self.images, self.masks, self.indices = images, masks, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        index = int(self.indices[i])
        return {"image": self.images[index], "target": self.masks[index].long(), "index": torch.tensor(index)}

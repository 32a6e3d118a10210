"""Image/mask folder pairs for semantic segmentation: labeled, unlabeled and held-out test images.

``root/<image_dir>/<stem>.{png,jpg,jpeg,tif,tiff}`` pairs with ``root/<mask_dir>/<stem>.{png,tif,tiff,bmp}``
by file stem. Images and masks are decoded once into memory (uint8); ``index`` in a batch is an
image's position in ``SegmentationFolders.stems`` (stems in natural order: 0, 1, 2, ..., 10).

Batches follow the contract of :mod:`lightning_modules.core.batch`. Training batch, after
``on_after_batch_transfer`` (B = ``batch_size``, U = ``batch_size * uratio``,
h = w = ``crop_size``)::

    {"labeled":   {"image": float32 (B, C, h, w) normalized, "target": int64 (B, h, w), "index": int64 (B,)},
     "unlabeled": {"weak": float32 (U, C, h, w), "strong": float32 (U, C, h, w),
                   "target": int64 (U, h, w), "index": int64 (U,)}}

``"target"`` holds per-pixel class ids, the key the classification base reads. ``"unlabeled"``
holds the views the model lists in ``unlabeled_views`` (as in ``SSLDataModule``) and is absent
when it lists none. All views of one unlabeled image share the same crop, flips and rotation, so
pixel (i, j) is the same point in every view and in its ``"target"``: the mask under that geometry,
or all -1 for an image without a mask (``unlabeled_without_mask``); methods use it only for
diagnostics such as pseudo-label accuracy over pixels with target >= 0. ``strong*`` views add an
independent photometric draw (colour jitter, blur, noise) to the image only, ``weak*`` and
``plain*`` views are the geometric crop alone. Labeled crops are the geometric (weak) augmentation
of image and mask. Validation and test batches are whole images of the validation or test split:
``{"image": float32 (B, C, H, W), "target": int64 (B, H, W), "index": int64 (B,)}``; predict
batches are whole images without targets, ``{"image", "index", "file": [str]}``.

Augmentation runs per sample in the loader (``datamodules.segmentation.transforms``); only
normalization runs after the transfer to the device. The model turns what it learned on crops into
whole-image logits (``lightning_modules.segmentation.sliding_window``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.classification.augment import normalize
from datamodules.data_root import DataRoot
from datamodules.held_out import HeldOutParts
from datamodules.image_files import FolderImages, decode_all, decode_rgb_or_grey, load_whole_images
from datamodules.labeled_unlabeled import LabeledUnlabeledDataModule
from datamodules.named_split import draw_parts, read_parts, split_record
from datamodules.segmentation.reading import IMAGE_SUFFIXES, decode_mask, image_mask_pairs
from datamodules.segmentation.transforms import (SegmentationCrops, WholeImages, geometric_transform,
                                                 photometric_transform)

SPLIT_FORMAT = "labelwise-segmentation-split/1"


@dataclass(frozen=True)
class SegmentationSplit:
    """Sorted, disjoint positions in ``SegmentationFolders.stems``."""

    labeled: Tensor
    unlabeled: Tensor
    test: Tensor
    seed: int
    val: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class SegmentationFolders(HeldOutParts, LabeledUnlabeledDataModule):
    """Segmentation data from ``root/<image_dir>`` + ``root/<mask_dir>``, with a seeded split.

    The split draws one seeded permutation of the images that have masks: the first ``num_test``
    form the test set, the next ``num_val`` the validation set (``0``: validation reports on the
    test set, as ``SSLDataModule`` does), the next ``num_labeled`` the labeled set, and the rest,
    plus images without masks when ``unlabeled_without_mask`` is set, the unlabeled set
    (:mod:`datamodules.named_split`). At ``setup("fit")`` the split is saved by stem to
    ``<log_dir>/split.json``; ``split_file`` reuses such a file. Predict runs on the test images,
    or on every image under ``predict_root`` (no masks needed; named by their path there). Its facts for a
    method (:mod:`datamodules.facts`) count labeled pixels per class, and index images by ``stems``.

    Args:
        root: folder holding ``image_dir`` and ``mask_dir``.
        mask_mode: ``"binary"`` (pixel > ``threshold`` is class 1, else 0) or ``"index"`` (pixel
            values are class ids ``0 .. num_classes - 1``; masks must be single-channel).
        num_classes: classes in ``"index"`` mode (``2`` in binary mode, which is the default).
        grayscale: decode images as one channel (``num_channels`` 1) instead of RGB (3).
        unlabeled_without_mask: images without a mask join the unlabeled set instead of raising.
        num_labeled: labeled training images; ``None`` labels every non-test image with a mask.
        num_test: held-out images for test (and validation while ``num_val`` is 0).
        num_val: held-out images for validation only.
        predict_root: a folder of images to predict on instead of the test images.
        crop_size: side of the random training crops (``None``: whole images, all of one size).
        flips, rot90: random horizontal+vertical flips and 90-degree rotations of the crops.
        color_jitter, blur_probability, noise_std: the strong view's photometric changes.
        batch_size, uratio: labeled crops per step and unlabeled crops per labeled crop.
        steps_per_epoch: an epoch is this many steps; each stream samples without replacement,
            one permutation after another.
        eval_batch_size: whole images per validation/test batch (1 allows images of mixed sizes).
        include_labeled_in_unlabeled: labeled images also feed the unlabeled stream.
        unlabeled_views: override the views the model asks for.
        mean, std: per-channel normalization on the [0, 1] scale (default 0.5/0.25 for grayscale,
            ImageNet's for RGB, as ``ImageFolderSSL``).
    """

    def __init__(self, root: DataRoot = "data/membrane", image_dir: str = "image", mask_dir: str = "label",
                 mask_mode: str = "binary", num_classes: int | None = None, threshold: int = 127,
                 grayscale: bool = True, unlabeled_without_mask: bool = False, num_labeled: int | None = None,
                 num_test: int = 5, seed: int = 0, split_file: str | None = None, crop_size: int | None = 256,
                 flips: bool = True, rot90: bool = True, color_jitter: float = 0.5, blur_probability: float = 0.5,
                 noise_std: float = 0.03, batch_size: int = 4, uratio: int = 1, steps_per_epoch: int = 100,
                 eval_batch_size: int = 1, include_labeled_in_unlabeled: bool = False,
                 unlabeled_views: list[str] | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None, num_workers: int = 0, decode_threads: int = 4, num_val: int = 0,
                 predict_root: DataRoot | None = None) -> None:
        if mask_mode not in ("binary", "index"):
            raise ValueError(f"mask_mode must be 'binary' or 'index', got {mask_mode!r}")
        if mask_mode == "binary" and num_classes not in (None, 2):
            raise ValueError(f"mask_mode='binary' has 2 classes, got num_classes={num_classes}: use mask_mode='index'")
        if mask_mode == "index" and (num_classes is None or num_classes < 2):
            raise ValueError(f"mask_mode='index' needs num_classes of at least 2, got {num_classes}")
        super().__init__(root, batch_size, uratio, steps_per_epoch, eval_batch_size, seed, split_file, unlabeled_views,
                         num_workers, predict_root, include_labeled_in_unlabeled)
        self.image_dir, self.mask_dir, self.mask_mode, self.threshold = image_dir, mask_dir, mask_mode, threshold
        self.num_classes = 2 if mask_mode == "binary" else num_classes
        self.num_channels = 1 if grayscale else 3
        self.unlabeled_without_mask = unlabeled_without_mask
        self.num_labeled, self.num_test, self.num_val = num_labeled, num_test, num_val
        self.decode_threads = decode_threads
        default_mean, default_std = ((0.5,), (0.25,)) if grayscale else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean and std need {self.num_channels} values, got {self.mean} and {self.std}")
        self.geometry = geometric_transform(crop_size, flips, rot90)
        self.photometric = photometric_transform(self.num_channels, color_jitter, blur_probability, noise_std)
        self.stems: list[str] = []
        self.image_names: list[str] = []  # file names in image_dir, one per stem
        self.images: list[Tensor] = []
        self.masks: list[Tensor | None] = []
        self.split: SegmentationSplit | None = None

    # --- reading the folders ----------------------------------------------------------------
    def _decode_image(self, path: Path) -> Tensor:
        return decode_rgb_or_grey(path, self.num_channels, "SegmentationFolders")

    def _read(self, pair: tuple[Path, Path | None]) -> tuple[Tensor, Tensor | None]:
        image_path, mask_path = pair
        image = self._decode_image(image_path)
        if mask_path is None:
            return image, None
        return image, decode_mask(mask_path, image_path, tuple(image.shape[1:]), self.mask_mode, self.threshold,
                                  self.num_classes)

    def load(self) -> None:
        """Find and decode every image/mask pair (once)."""
        stems, images, pairs = image_mask_pairs(self.root, self.image_dir, self.mask_dir, self.unlabeled_without_mask)
        decoded = decode_all(pairs, self._read, self.decode_threads)
        self.stems, self.image_names = stems, [images[s].name for s in stems]
        self.images = [image for image, _ in decoded]
        self.masks = [mask for _, mask in decoded]

    # --- the split ----------------------------------------------------------------------------
    def draw_split(self) -> SegmentationSplit:
        with_mask = [i for i, m in enumerate(self.masks) if m is not None]
        without = torch.tensor([i for i, m in enumerate(self.masks) if m is None], dtype=torch.long)
        parts = draw_parts(with_mask, self.num_test, self.num_val, self.num_labeled, self.seed,
                           f"{len(with_mask)} images have masks")
        parts["unlabeled"] = torch.cat([parts["unlabeled"], without])
        return SegmentationSplit(**{k: v.sort().values for k, v in parts.items()}, seed=self.seed)

    def split_record(self) -> dict:
        parts = {k: getattr(self.split, k) for k in ("labeled", "unlabeled", "test", "val")}
        return split_record(SPLIT_FORMAT, self.split.seed, self.stems, parts, root=str(self.root))

    def load_split(self, path: str | os.PathLike) -> SegmentationSplit:
        parts, record = read_parts(path, SPLIT_FORMAT, "segmentation", "pass the split.json that a SegmentationFolders "
                                   "run saved", self.stems, f"{len(self.stems)} images under {self.root}: it was made "
                                   f"for other files", required=("labeled", "unlabeled", "test", "seed"))
        if any(self.masks[i] is None for k in ("labeled", "test", "val") for i in parts[k].tolist()):
            raise ValueError(f"split_file {path} lists images without masks as labeled, test or validation images")
        return SegmentationSplit(**parts, seed=int(record["seed"]))

    def split_part(self, name: str) -> Tensor:
        return getattr(self.split, name)

    def split_ids(self) -> list[str]:
        """The images by stem, as ``split.json`` names them."""
        return self.stems

    def mask_pixel_values(self) -> list[int]:
        """The pixel value of each class in a mask file, so a written prediction reads back as a mask."""
        return [0, 255] if self.mask_mode == "binary" else list(range(self.num_classes))

    def load_predict_folder(self) -> FolderImages:
        return load_whole_images(self.predict_root, self._decode_image, "SegmentationFolders", self.eval_batch_size,
                                 IMAGE_SUFFIXES, self.decode_threads)

    # --- facts (datamodules.facts) -----------------------------------------------------------
    def labeled_class_counts(self) -> Tensor:
        """Labeled pixels per class, int64 ``(num_classes,)``."""
        self.require_split("labeled_class_counts()")
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        for i in self.split.labeled.tolist():
            counts += torch.bincount(self.masks[i].flatten().long(), minlength=self.num_classes)
        return counts

    @property
    def num_indices(self) -> int:
        return len(self.stems)

    # --- loaders ------------------------------------------------------------------------------
    def labeled_dataset(self) -> SegmentationCrops:
        return SegmentationCrops(self.images, self.masks, self.split.labeled, self.geometry)

    def unlabeled_dataset(self, views: tuple[str, ...] = ()) -> SegmentationCrops:
        return SegmentationCrops(self.images, self.masks, self.unlabeled_indices(), self.geometry, self.photometric,
                                 views)

    def empty_unlabeled_message(self, views: tuple[str, ...]) -> str:
        return (f"the model asks for unlabeled views {views} but the unlabeled set is empty: lower "
                f"num_labeled, add images with unlabeled_without_mask, or include labeled images")

    def eval_dataset(self, part: str) -> WholeImages:
        return WholeImages(self.images, self.masks, self.held_out_part(part))

    def predict_dataloader(self) -> DataLoader:
        """Whole images (``{"image", "index", "file"}``) under ``predict_root``, else the test images."""
        if self.predict_images is None:
            if len(self.split.test) == 0:
                raise ValueError("num_test=0: there are no test images to predict; pass predict_root")
            test = self.split.test.tolist()
            return self.loader(FolderImages([self.images[i] for i in test], [self.image_names[i] for i in test]))
        return super().predict_dataloader()

    def to_float(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)

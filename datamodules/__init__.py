"""DataModules: labeled/unlabeled splits of image data, one base (:mod:`datamodules.labeled_unlabeled`) with a
reader per task: ``classification/`` (batched augmentation after transfer), ``segmentation/`` (joint
image/mask augmentation in the loader) and ``detection/`` (COCO json and images)."""

import sys
from importlib import import_module

from datamodules.classification.base import SSLDataModule
from datamodules.classification.digits import DigitsSSL
from datamodules.classification.image_folder import ImageFolderSSL
from datamodules.classification.torchvision_sets import CIFAR10SSL, CIFAR100SSL, STL10SSL, SVHNSSL, TorchvisionSSL
from datamodules.detection.coco import COCODetection
from datamodules.in_memory import IndexedImages
from datamodules.labeled_unlabeled import LabeledUnlabeledDataModule
from datamodules.segmentation.folders import SegmentationFolders
from datamodules.split import LabeledSplit, class_balanced_split, load_split, save_split, stratified_kfold

__all__ = [
    "LabeledUnlabeledDataModule", "SSLDataModule", "IndexedImages", "TorchvisionSSL",
    "DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL", "COCODetection",
    "SegmentationFolders",
    "LabeledSplit", "class_balanced_split", "load_split", "save_split", "stratified_kfold",
]
# Concrete DataModules selectable by class name on the command line.
DATAMODULES = ["DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL",
               "SegmentationFolders", "COCODetection"]

#: Module paths of the flat layout (before 2026-12-02's task sub-packages) and their homes now. LightningCLI
#: saves a DataModule chosen by name (``--data CIFAR10SSL``) as the class path of its module
#: (``datamodules.torchvision_sets.CIFAR10SSL``) in a run's config.yaml and checkpoint; each old name is an
#: alias of its new module (the same object), so those files and old imports keep working.
MOVED_MODULES = {
    "base": "classification.base",
    "digits": "classification.digits",
    "torchvision_sets": "classification.torchvision_sets",
    "image_folder": "classification.image_folder",
    "augment": "classification.augment",
    "views": "classification.views",
    "segmentation_folders": "segmentation.folders",
    "segmentation_reading": "segmentation.reading",
    "segmentation_transforms": "segmentation.transforms",
    "coco_detection": "detection.coco",
    "coco_reading": "detection.coco_reading",
    "coco_masks": "detection.coco_masks",
    "detection_transforms": "detection.transforms",
}
for _old, _new in MOVED_MODULES.items():
    sys.modules[f"{__name__}.{_old}"] = globals()[_old] = import_module(f"{__name__}.{_new}")
del _old, _new

"""DataModules: labeled/unlabeled splits of image data for classification (batched augmentation after
transfer) and segmentation (joint image/mask augmentation in the loader)."""

from datamodules.base import IndexedImages, SSLDataModule
from datamodules.coco_detection import COCODetection
from datamodules.digits import DigitsSSL
from datamodules.image_folder import ImageFolderSSL
from datamodules.segmentation_folders import SegmentationFolders
from datamodules.split import LabeledSplit, class_balanced_split, load_split, save_split, stratified_kfold
from datamodules.torchvision_sets import CIFAR10SSL, CIFAR100SSL, STL10SSL, SVHNSSL, TorchvisionSSL

__all__ = [
    "SSLDataModule", "IndexedImages", "TorchvisionSSL",
    "DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL", "COCODetection",
    "SegmentationFolders",
    "LabeledSplit", "class_balanced_split", "load_split", "save_split", "stratified_kfold",
]
# Concrete DataModules selectable by class name on the command line.
DATAMODULES = ["DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL",
               "SegmentationFolders", "COCODetection"]

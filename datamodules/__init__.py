"""DataModules: labeled/unlabeled splits of image data, batched augmentation after transfer."""

from datamodules.base import IndexedImages, SSLDataModule
from datamodules.digits import DigitsSSL
from datamodules.image_folder import ImageFolderSSL
from datamodules.split import LabeledSplit, class_balanced_split, load_split, save_split, stratified_kfold
from datamodules.torchvision_sets import CIFAR10SSL, CIFAR100SSL, STL10SSL, SVHNSSL, TorchvisionSSL

__all__ = [
    "SSLDataModule", "IndexedImages", "TorchvisionSSL",
    "DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL",
    "LabeledSplit", "class_balanced_split", "load_split", "save_split", "stratified_kfold",
]
# Concrete DataModules selectable by class name on the command line.
DATAMODULES = ["DigitsSSL", "CIFAR10SSL", "CIFAR100SSL", "SVHNSSL", "STL10SSL", "ImageFolderSSL"]

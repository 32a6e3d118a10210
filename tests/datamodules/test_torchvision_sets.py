"""The torchvision data sets read through torchvision's own code: CIFAR-100's class names are read once.

CIFAR-100 is not in ``shared/data``, so the data here is a tiny CIFAR-100 folder written in the
format torchvision's ``CIFAR100`` reads (``cifar-100-python/{train,test,meta}``, pickled dicts with
``data``, ``fine_labels`` and ``fine_label_names``: torchvision/datasets/cifar.py, ``CIFAR10.__init__``
and ``_load_meta``). torchvision checks each file against the real data set's md5, so the test's
data set class is torchvision's ``CIFAR100`` with the checksums of these files; its reading code
is torchvision's, unchanged.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil

import numpy as np
import torch
import torchvision

from datamodules import CIFAR100SSL

NAMES = [f"class_{c:02d}" for c in range(100)]


def _tiny_cifar100(root, per_class: int = 1) -> type:
    """Write a CIFAR-100 folder of ``per_class`` random 32x32 images per class under ``root``; return the
    torchvision ``CIFAR100`` that accepts its files."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = [c for c in range(100) for _ in range(per_class)]
    entries = {split: {"data": rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8),
                       "fine_labels": labels} for split in ("train", "test")}
    entries["meta"] = {"fine_label_names": NAMES}
    md5 = {}
    for name, entry in entries.items():
        (folder / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return type("TinyCIFAR100", (torchvision.datasets.CIFAR100,), {
        "train_list": [["train", md5["train"]]], "test_list": [["test", md5["test"]]],
        "meta": {**torchvision.datasets.CIFAR100.meta, "md5": md5["meta"]}})


def test_cifar100_class_names_are_read_once(tmp_path):
    dataset = _tiny_cifar100(tmp_path)
    data_class = type("TinyCIFAR100SSL", (CIFAR100SSL,), {"dataset_class": dataset})

    predicting = data_class(root=str(tmp_path), num_labeled=None)
    predicting.setup("predict")  # reads the test set, and the names with it
    assert predicting._test[0].shape == (100, 3, 32, 32) and predicting._test[1].tolist() == list(range(100))
    asked_first = data_class(root=str(tmp_path), num_labeled=None)
    assert asked_first.class_names == NAMES  # nothing read yet: this reads them
    shutil.rmtree(tmp_path / "cifar-100-python")
    # the prediction writer asks every batch; with the data gone, a second read would raise
    for data in (predicting, asked_first):
        assert data.class_names == NAMES and data.class_names == NAMES
    asked_first.class_names.append("changed")  # a copy: the kept names stay as read
    assert asked_first.class_names == NAMES


def test_cifar100_reads_its_tiny_copy_like_the_real_one(tmp_path):
    """The stand-in is read by torchvision's own code: CIFAR100SSL's tensors are its pixels, (N, C, H, W)."""
    dataset = _tiny_cifar100(tmp_path)
    data = type("TinyCIFAR100SSL", (CIFAR100SSL,), {"dataset_class": dataset})(root=str(tmp_path), num_labeled=None)
    images, targets = data.load_train()
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    assert torch.equal(images, torch.from_numpy(raw["data"]).reshape(-1, 3, 32, 32))
    assert targets.tolist() == raw["fine_labels"]

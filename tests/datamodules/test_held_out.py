"""Held-out validation images for every DataModule family: drawn before the labeled images, kept out of
both training streams, served by val_dataloader with their labels, recorded in split.json and
reloaded from it; off by default (validation then reports on the test set, as before)."""

import json

import pytest
import torch
from lightning import Trainer

from datamodules import COCODetection, DigitsSSL, SegmentationFolders
from datamodules.split import class_balanced_split

pytestmark = pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning")


def _fit_setup(data, tmp_path):
    data.trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    data.setup("fit")
    return json.loads((tmp_path / "split.json").read_text())


def test_classification_holds_out_labeled_images_per_class(tmp_path):
    data = DigitsSSL(num_labeled=50, batch_size=16, val_labeled_per_class=5, seed=3)
    assert data.validates_on_test_set is False  # known before setup
    record = _fit_setup(data, tmp_path)
    images, targets = data._train
    split = data.split
    assert torch.bincount(targets[split.val], minlength=10).tolist() == [5] * 10
    assert torch.bincount(targets[split.labeled], minlength=10).tolist() == [5] * 10
    parts = [set(x.tolist()) for x in (split.labeled, split.unlabeled, split.val)]
    assert set.union(*parts) == set(range(len(targets))) and sum(map(len, parts)) == len(targets)
    assert not set(data.unlabeled_dataset().indices.tolist()) & parts[2]  # never seen unlabeled either
    batches = list(data.val_dataloader())
    assert torch.equal(torch.cat([b["index"] for b in batches]), split.val)
    assert torch.equal(torch.cat([b["target"] for b in batches]), targets[split.val])  # with their labels
    assert torch.equal(torch.cat([b["image"] for b in batches]), images[split.val])
    assert len(data.test_dataloader().dataset) == len(data._test[1])
    assert (record["val_labeled_per_class"], record["val"]) == (5, split.val.tolist())
    assert data.held_out_ids() == split.val.tolist() and not data.validates_on_test_set

    again = DigitsSSL(num_labeled=50, split_file=str(tmp_path / "split.json"))
    again.setup("validate")  # validate alone builds the split from the file
    assert again.split.val_per_class == 5 and not again.validates_on_test_set
    assert torch.equal(again.split.val, split.val) and torch.equal(again.split.labeled, split.labeled)
    with pytest.raises(ValueError, match="holds 5 validation images per class, but val_labeled_per_class=3"):
        DigitsSSL(split_file=str(tmp_path / "split.json"), val_labeled_per_class=3).setup("validate")


def test_classification_default_is_unchanged_and_validates_on_the_test_set(tmp_path):
    data = DigitsSSL(num_labeled=50)
    record = _fit_setup(data, tmp_path)
    assert data.split.val is None and data.validates_on_test_set and "val" not in record
    assert torch.equal(data.split.labeled, class_balanced_split(data._train[1], 50, 10, 0).labeled)
    assert len(data.val_dataloader().dataset) == len(data._test[1])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"val_labeled_per_class": 0}, "at least 1"),
    ({"val_labeled_per_class": 5, "num_folds": 5}, "cannot be combined with num_folds"),
    ({"val_labeled_per_class": 200}, r"would hold out every image of class\(es\)"),
])
def test_classification_bad_held_out_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsSSL(**kwargs).setup("fit")


@pytest.fixture(scope="module")
def membrane(shared_data):
    root = shared_data / "membrane"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} not found")
    return root


def test_segmentation_num_val(membrane, tmp_path):
    plain = SegmentationFolders(root=str(membrane), num_labeled=6, num_test=5)
    plain.load()
    plain.split = plain.draw_split()
    data = SegmentationFolders(root=str(membrane), num_labeled=6, num_test=5, num_val=3)
    record = _fit_setup(data, tmp_path)
    s = data.split
    assert [len(s.test), len(s.val), len(s.labeled), len(s.unlabeled)] == [5, 3, 6, 16]
    assert torch.equal(s.test, plain.split.test)  # the test images do not move
    parts = [set(x.tolist()) for x in (s.labeled, s.unlabeled, s.test, s.val)]
    assert set.union(*parts) == set(range(30)) and sum(map(len, parts)) == 30
    assert torch.equal(torch.stack([b["index"][0] for b in data.val_dataloader()]), s.val)
    assert torch.equal(torch.stack([b["index"][0] for b in data.test_dataloader()]), s.test)
    assert record["val"] == [data.stems[i] for i in s.val.tolist()] == data.held_out_ids()
    assert not data.validates_on_test_set and plain.validates_on_test_set
    again = SegmentationFolders(root=str(membrane), split_file=str(tmp_path / "split.json"))
    again.setup("validate")
    assert torch.equal(again.split.val, s.val) and torch.equal(again.split.labeled, s.labeled)
    # a split file written before validation images existed still loads, with none
    del record["val"]
    record["unlabeled"] += [data.stems[i] for i in s.val.tolist()]
    (tmp_path / "old.json").write_text(json.dumps(record))
    old = SegmentationFolders(root=str(membrane), split_file=str(tmp_path / "old.json"))
    old.setup("validate")
    assert len(old.split.val) == 0 and old.validates_on_test_set
    with pytest.raises(ValueError, match="num_val=25 must leave training images: 30 images have masks, 5 held out"):
        SegmentationFolders(root=str(membrane), num_val=25).setup("fit")


def test_detection_num_val(shared_data, tmp_path):
    root = shared_data / "coco128"
    if not (root / "annotations").is_dir():
        pytest.skip(f"{root} not found")
    plain = COCODetection(str(root), num_labeled=40).draw_split()
    data = COCODetection(str(root), num_labeled=40, num_val=8)
    data.split = data.draw_split()
    s = data.split
    assert [len(s[k]) for k in ("test", "val", "labeled", "unlabeled")] == [16, 8, 40, 64]
    assert torch.equal(s["test"], plain["test"])
    assert torch.equal(data.val_dataloader().dataset.indices, s["val"])
    assert torch.equal(data.test_dataloader().dataset.indices, s["test"])
    record = data.split_record()
    assert record["val"] == [data.image_ids[i] for i in s["val"].tolist()] == data.held_out_ids()
    (tmp_path / "split.json").write_text(json.dumps(record))
    again = COCODetection(str(root), split_file=str(tmp_path / "split.json"))
    assert all(torch.equal(again.load_split(tmp_path / "split.json")[k], s[k]) for k in s)
    assert not data.validates_on_test_set and COCODetection(str(root)).validates_on_test_set

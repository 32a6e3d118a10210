"""Stratified k-fold: disjoint, covering, stratified, seeded; the DataModule's fold and its split file."""

import json

import pytest
import torch
from lightning import Trainer
from sklearn.datasets import load_digits

from datamodules import DigitsSSL
from datamodules.split import LabeledSplit, class_balanced_split, load_split, save_split, stratified_kfold


@pytest.fixture(scope="module")
def targets() -> torch.Tensor:
    return torch.as_tensor(load_digits().target, dtype=torch.long)


@pytest.mark.parametrize("num_folds", [2, 3, 5, 10])
def test_folds_are_disjoint_cover_the_data_and_are_stratified(targets, num_folds):
    folds = []
    for fold in range(num_folds):
        train, val = stratified_kfold(targets, num_folds, fold, seed=0)
        assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
        assert sorted(train.tolist() + val.tolist()) == list(range(len(targets)))  # train + held-out = all
        folds.append(val)
    everything = torch.cat(folds)
    assert everything.numel() == len(targets) and torch.unique(everything).numel() == len(targets)  # disjoint, cover
    per_fold = torch.stack([torch.bincount(targets[f], minlength=10) for f in folds])  # (folds, classes)
    assert (per_fold.max(dim=0).values - per_fold.min(dim=0).values).max() <= 1  # per class, within one image
    sizes = torch.tensor([f.numel() for f in folds])
    assert sizes.max() - sizes.min() <= 1


def test_same_seed_same_folds_other_seed_other_folds(targets):
    a = stratified_kfold(targets, 5, 2, seed=7)
    b = stratified_kfold(targets, 5, 2, seed=7)
    c = stratified_kfold(targets, 5, 2, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    ("num_folds", "fold", "message"),
    [(1, 0, "num_folds must be an integer of at least 2"), (0, 0, "at least 2"),
     (5, 5, "fold must be in 0..4"), (5, -1, "fold must be in 0..4")],
)
def test_bad_arguments_are_clear_errors(targets, num_folds, fold, message):
    with pytest.raises(ValueError, match=message):
        stratified_kfold(targets, num_folds, fold, seed=0)


def test_class_smaller_than_the_folds_is_a_clear_error():
    small = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(ValueError, match=r"class 1 has 3: use at most 3 folds"):
        stratified_kfold(small, 4, 0, seed=0)


def test_split_file_records_and_reloads_the_fold(targets, tmp_path):
    train, val = stratified_kfold(targets, 4, 1, seed=0)
    inner = class_balanced_split(targets[train], 50, 10, seed=0)
    split = LabeledSplit(train[inner.labeled], train[inner.unlabeled], 0, val, 4, 1)
    path = save_split(tmp_path / "split.json", split, targets, "DigitsSSL")
    record = json.loads(path.read_text())
    assert (record["num_folds"], record["fold"], record["val"]) == (4, 1, val.tolist())
    again = load_split(path, targets, "DigitsSSL")
    assert (again.num_folds, again.fold) == (4, 1)
    assert torch.equal(again.val, val) and torch.equal(again.labeled, split.labeled)
    assert torch.equal(again.unlabeled, split.unlabeled)


def _fit_setup(data: DigitsSSL, tmp_path) -> Trainer:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    data.trainer = trainer
    data.setup("fit")
    return trainer


def test_datamodule_without_folds_is_unchanged(tmp_path):
    data = DigitsSSL(num_labeled=50, batch_size=16)
    _fit_setup(data, tmp_path)
    assert data.split.val is None
    assert data.split.labeled.numel() + data.split.unlabeled.numel() == len(data._train[1])
    assert len(data.val_dataloader().dataset) == len(data._test[1])  # validation on the test set
    assert "val" not in json.loads((tmp_path / "split.json").read_text())


def test_datamodule_draws_labels_from_the_fold_and_validates_on_the_held_out_fold(tmp_path):
    data = DigitsSSL(num_labeled=50, batch_size=16, num_folds=5, fold=3, seed=2)
    _fit_setup(data, tmp_path)
    images, targets = data._train
    train, val = stratified_kfold(targets, 5, 3, seed=2)
    split = data.split
    assert set(split.labeled.tolist()) <= set(train.tolist())  # labels only from the fold's training part
    assert torch.bincount(targets[split.labeled], minlength=10).tolist() == [5] * 10
    assert sorted(split.labeled.tolist() + split.unlabeled.tolist()) == train.tolist()  # held-out fold unused
    assert torch.equal(split.val, val)
    assert not set(data.unlabeled_dataset().indices.tolist()) & set(val.tolist())
    batches = list(data.val_dataloader())
    index = torch.cat([b["index"] for b in batches])
    assert torch.equal(index, val)  # the held-out fold, not the test set
    assert torch.equal(torch.cat([b["target"] for b in batches]), targets[val])  # with its labels
    assert torch.equal(torch.cat([b["image"] for b in batches]), images[val])
    assert len(data.test_dataloader().dataset) == len(data._test[1])  # test stays the test set

    # the split file records the fold, and reloading it gives back the same fold and labels
    record = json.loads((tmp_path / "split.json").read_text())
    assert (record["num_folds"], record["fold"], record["val"]) == (5, 3, val.tolist())
    again = DigitsSSL(num_labeled=50, batch_size=16, split_file=str(tmp_path / "split.json"))
    _fit_setup(again, tmp_path / "again")
    assert (again.split.num_folds, again.split.fold) == (5, 3)
    assert torch.equal(again.split.val, val) and torch.equal(again.split.labeled, split.labeled)
    assert torch.equal(torch.cat([b["index"] for b in again.val_dataloader()]), val)

    # asking for another fold than the file holds is a clear error
    other = DigitsSSL(num_labeled=50, split_file=str(tmp_path / "split.json"), num_folds=5, fold=1)
    with pytest.raises(ValueError, match="holds fold 3 of 5"):
        _fit_setup(other, tmp_path / "other")


def test_validate_stage_alone_builds_the_fold():
    data = DigitsSSL(num_labeled=50, num_folds=3, fold=0)
    data.setup("validate")
    _, val = stratified_kfold(data._train[1], 3, 0, seed=0)
    assert torch.equal(torch.cat([b["index"] for b in data.val_dataloader()]), val)


@pytest.mark.parametrize(("num_folds", "fold"), [(1, 0), (3, 3)])
def test_datamodule_rejects_bad_fold_arguments(num_folds, fold):
    with pytest.raises(ValueError, match="num_folds|fold"):
        DigitsSSL(num_folds=num_folds, fold=fold)

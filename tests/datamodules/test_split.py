"""The labeled/unlabeled split: exact per-class counts, disjoint, seeded, saved and reloaded."""

import json

import pytest
import torch
from sklearn.datasets import load_digits

from datamodules.split import class_balanced_split, load_split, save_split


@pytest.fixture(scope="module")
def targets() -> torch.Tensor:
    return torch.as_tensor(load_digits().target, dtype=torch.long)


@pytest.mark.parametrize("num_labeled", [10, 50, 250, 1000])
def test_exact_per_class_counts_and_disjoint(targets, num_labeled):
    split = class_balanced_split(targets, num_labeled, num_classes=10, seed=0)
    assert torch.bincount(targets[split.labeled], minlength=10).tolist() == [num_labeled // 10] * 10
    assert not set(split.labeled.tolist()) & set(split.unlabeled.tolist())
    assert sorted(split.labeled.tolist() + split.unlabeled.tolist()) == list(range(len(targets)))


def test_same_seed_same_split_other_seed_other_split(targets):
    a, b = class_balanced_split(targets, 50, 10, seed=3), class_balanced_split(targets, 50, 10, seed=3)
    c = class_balanced_split(targets, 50, 10, seed=4)
    assert torch.equal(a.labeled, b.labeled) and torch.equal(a.unlabeled, b.unlabeled)
    assert not torch.equal(a.labeled, c.labeled)


def test_saved_split_reloads_identically(targets, tmp_path):
    split = class_balanced_split(targets, 40, 10, seed=1)
    path = save_split(tmp_path / "run" / "split.json", split, targets, "DigitsSSL")
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left behind
    again = load_split(path, targets, "DigitsSSL")
    assert torch.equal(again.labeled, split.labeled) and torch.equal(again.unlabeled, split.unlabeled)
    assert again.seed == 1


def test_split_errors_name_the_problem(targets):
    with pytest.raises(ValueError, match="larger than the training set"):
        class_balanced_split(targets, 5000, 10, seed=0)
    with pytest.raises(ValueError, match="multiple of 10"):
        class_balanced_split(targets, 55, 10, seed=0)
    uneven = torch.tensor([0] * 10 + [1] * 2)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have only \[2\]"):
        class_balanced_split(uneven, 6, 2, seed=0)


def test_split_file_of_another_dataset_or_truncated_is_refused(targets, tmp_path):
    split = class_balanced_split(targets, 40, 10, seed=0)
    path = save_split(tmp_path / "split.json", split, targets, "DigitsSSL")
    with pytest.raises(ValueError, match="was made for DigitsSSL"):
        load_split(path, targets, "CIFAR10SSL")
    shuffled = targets.flip(0)
    with pytest.raises(ValueError, match="pass the split file of this dataset"):
        load_split(path, shuffled, "DigitsSSL")
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(path, targets, "DigitsSSL")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "missing.json", targets, "DigitsSSL")
    record = json.loads(save_split(tmp_path / "s2.json", split, targets, "DigitsSSL").read_text())
    record["labeled"] = record["labeled"][:-1]
    (tmp_path / "s2.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not partition"):
        load_split(tmp_path / "s2.json", targets, "DigitsSSL")

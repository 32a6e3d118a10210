"""Class-balanced labeled/unlabeled splits and stratified k-fold splits, saved as JSON so a run
can be reproduced exactly."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lightning_modules.core.atomic import write_json_atomically

SPLIT_FORMAT = "labelwise-split/1"


@dataclass(frozen=True)
class LabeledSplit:
    """Indices into a training set: ``labeled`` and ``unlabeled`` are disjoint and sorted.

    ``val`` holds the images held out for validation (sorted, disjoint from both), or ``None``:
    with k-fold cross-validation the held-out fold (``num_folds``/``fold`` say which), with
    ``val_labeled_per_class`` that many images per class (``val_per_class``).
    """

    labeled: torch.Tensor
    unlabeled: torch.Tensor
    seed: int
    val: torch.Tensor | None = None
    num_folds: int | None = None
    fold: int | None = None
    val_per_class: int | None = None


def stratified_kfold(targets: torch.Tensor, num_folds: int, fold: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into the training part and the held-out ``fold`` of ``num_folds``.

    Each class's indices are shuffled with ``seed`` and dealt into the folds round-robin (the
    dealing continues from class to class, so fold sizes also differ by at most one). The folds
    are therefore disjoint, cover the data, and hold each class's images in counts that differ by
    at most one. Returns ``(train_indices, val_indices)``, both sorted.
    """
    targets = torch.as_tensor(targets, dtype=torch.long).flatten()
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer of at least 2, got {num_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1} for num_folds={num_folds}, got {fold!r}")
    classes, counts = torch.unique(targets, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < num_folds]
    if short:
        raise ValueError(
            f"num_folds={num_folds} needs at least {num_folds} images of every class, but "
            + ", ".join(f"class {c} has {n}" for c, n in short)
            + f": use at most {int(counts.min())} folds"
        )
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty(targets.numel(), dtype=torch.long)
    dealt = 0
    for c in classes.tolist():
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        assignment[members] = (torch.arange(members.numel()) + dealt) % num_folds
        dealt += members.numel()
    held_out = assignment == fold
    return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()


def class_balanced_split(targets: torch.Tensor, num_labeled: int, num_classes: int, seed: int) -> LabeledSplit:
    """Draw exactly ``num_labeled / num_classes`` labeled images per class; the rest is unlabeled.

    Raises ``ValueError`` naming the problem when the counts cannot be met.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    total = targets.numel()
    if num_labeled <= 0:
        raise ValueError(f"num_labeled must be positive, got {num_labeled}")
    if num_labeled > total:
        raise ValueError(
            f"num_labeled={num_labeled} is larger than the training set ({total} images): "
            f"choose at most {total - total % num_classes}"
        )
    if num_labeled % num_classes:
        below = num_labeled - num_labeled % num_classes
        raise ValueError(
            f"num_labeled={num_labeled} cannot be split into equal per-class counts over {num_classes} "
            f"classes: use a multiple of {num_classes} such as {below or num_classes} or {below + num_classes}"
        )
    per_class = num_labeled // num_classes
    counts = torch.bincount(targets, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < per_class]
    if short:
        raise ValueError(
            f"num_labeled={num_labeled} needs {per_class} labeled images per class, but class(es) "
            f"{short} have only {[int(counts[c]) for c in short]}: lower num_labeled to at most "
            f"{int(counts.min()) * num_classes}"
        )
    generator = torch.Generator().manual_seed(seed)
    labeled = []
    for c in range(num_classes):
        members = torch.nonzero(targets == c).flatten()
        labeled.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    labeled_idx = torch.cat(labeled).sort().values
    is_labeled = torch.zeros(total, dtype=torch.bool)
    is_labeled[labeled_idx] = True
    return LabeledSplit(labeled_idx, torch.nonzero(~is_labeled).flatten(), seed)


def targets_fingerprint(targets: torch.Tensor) -> str:
    """A short hash of the training labels, so a split file cannot be applied to another dataset."""
    data = torch.as_tensor(targets, dtype=torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def run_split_path(trainer) -> Path | None:
    """Where a run saves its split (``split.json`` in its log directory); ``None`` on ranks other than 0.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must call this, or DDP set-up hangs.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir
    return Path(log_dir) / "split.json" if trainer.is_global_zero else None


def check_split_record(path: str | os.PathLike, record: object, split_format: str, kind: str, fix: str,
                       keys: Sequence[str] = ()) -> dict:
    """``record`` (a split file's parsed JSON) if it is a ``split_format`` split holding every key in
    ``keys``; else a ValueError naming the file, what it holds, and ``fix``."""
    if not isinstance(record, dict) or record.get("format") != split_format:
        found = f"format {record.get('format')!r}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ValueError(f"split_file {path} is not a {kind} split ({found}; expected format {split_format!r}): "
                         f"{fix}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"split_file {path} lacks {missing}: it was edited or cut short; pass a split.json as saved")
    return record


def save_split(path: str | os.PathLike, split: LabeledSplit, targets: torch.Tensor, dataset: str) -> Path:
    """Write the split as JSON atomically (temporary file + rename): never half-written."""
    record = {
        "format": SPLIT_FORMAT,
        "dataset": dataset,
        "num_train": int(torch.as_tensor(targets).numel()),
        "targets_sha1": targets_fingerprint(targets),
        "seed": split.seed,
        "num_labeled": int(split.labeled.numel()),
        "labeled": split.labeled.tolist(),
        "unlabeled": split.unlabeled.tolist(),
    }
    if split.val is not None:  # held-out images, so the file still partitions the training set
        held_out = {"num_folds": split.num_folds, "fold": split.fold} if split.num_folds is not None else \
            {"val_labeled_per_class": split.val_per_class}
        record.update(held_out, val=split.val.tolist())
    return write_json_atomically(path, record)


def load_split(path: str | os.PathLike, targets: torch.Tensor, dataset: str) -> LabeledSplit:
    """Read a split written by :func:`save_split` and check it belongs to this training set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split_file {path} does not exist: pass the split.json saved in a run's log dir")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"split_file {path} is not valid JSON ({err}): it may be truncated or not a split file") from err
    check_split_record(path, record, SPLIT_FORMAT, "labelwise",
                       "pass the split.json that a classification run saved in its log dir",
                       keys=("dataset", "num_train", "targets_sha1", "seed", "labeled", "unlabeled"))
    num_train = int(torch.as_tensor(targets).numel())
    if record["dataset"] != dataset or record["num_train"] != num_train or record["targets_sha1"] != targets_fingerprint(targets):
        raise ValueError(
            f"split_file {path} was made for {record['dataset']} with {record['num_train']} training images "
            f"(labels {record['targets_sha1']}), but this run uses {dataset} with {num_train} "
            f"(labels {targets_fingerprint(targets)}): pass the split file of this dataset"
        )
    labeled = torch.tensor(record["labeled"], dtype=torch.long)
    unlabeled = torch.tensor(record["unlabeled"], dtype=torch.long)
    val = torch.tensor(record["val"], dtype=torch.long) if record.get("val") is not None else None
    everything = torch.cat([labeled, unlabeled] + ([val] if val is not None else []))
    if everything.numel() != num_train or torch.unique(everything).numel() != num_train:
        parts = "labeled, unlabeled and held-out images" if val is not None else "labeled and unlabeled"
        raise ValueError(f"split_file {path} does not partition the {num_train} training images into {parts}")
    if val is not None and record.get("num_folds") is not None:
        return LabeledSplit(labeled, unlabeled, int(record["seed"]), val, int(record["num_folds"]), int(record["fold"]))
    if val is not None:
        return LabeledSplit(labeled, unlabeled, int(record["seed"]), val, val_per_class=record.get("val_labeled_per_class"))
    return LabeledSplit(labeled, unlabeled, int(record["seed"]))

"""The seeded test / validation / labeled / unlabeled split of the segmentation and detection
DataModules, saved by name (image stem or COCO image id) so ``split_file`` reproduces it.

One seeded permutation of the eligible images (those with masks, or every image of the json) gives,
in order, ``num_test`` test images, ``num_val`` validation images (held out of training, so a
choice made on ``val/*`` never looks at the test set), ``num_labeled`` labeled ones and the
rest unlabeled. With ``num_val = 0`` (the default) validation reports on the test set, and the
split is the one these DataModules drew before validation images existed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Hashable, Sequence

import torch
from torch import Tensor

from datamodules.split import check_split_record

PARTS = ("labeled", "unlabeled", "test", "val")


def draw_parts(eligible: Sequence[int], num_test: int, num_val: int, num_labeled: int | None, seed: int,
               what: str) -> dict[str, Tensor]:
    """Positions of each part (unsorted) from one seeded permutation of ``eligible``; ``what``
    describes the eligible images in errors (e.g. "30 images have masks")."""
    n = len(eligible)
    if not 0 <= num_test < n:
        raise ValueError(f"num_test={num_test} must leave training images: {what}")
    if not 0 <= num_val < n - num_test:
        raise ValueError(f"num_val={num_val} must leave training images: {what}, {num_test} held out for test")
    order = torch.tensor(list(eligible), dtype=torch.long)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    test, val, rest = order[:num_test], order[num_test:num_test + num_val], order[num_test + num_val:]
    num = len(rest) if num_labeled is None else num_labeled
    if not 1 <= num <= len(rest):
        raise ValueError(f"num_labeled={num_labeled} must be in 1..{len(rest)} ({what}, {num_test} held out for test"
                         f"{f', {num_val} for validation' if num_val else ''})")
    return {"test": test, "val": val, "labeled": rest[:num], "unlabeled": rest[num:]}


def split_record(split_format: str, seed: int, names: Sequence[Hashable], parts: dict[str, Tensor], **extra) -> dict:
    """The JSON record of ``parts`` (positions), each image by its name in ``names``."""
    return {"format": split_format, **extra, "seed": seed,
            **{k: [names[i] for i in parts[k].tolist()] for k in PARTS if k in parts}}


def read_parts(path: str | os.PathLike, split_format: str, kind: str, fix: str, names: Sequence[Hashable],
               what: str, required: Sequence[str] = ()) -> tuple[dict[str, Tensor], dict]:
    """Sorted positions of each part recorded in the split file ``path`` (``val`` may be absent: none),
    and the record; a ValueError unless the parts partition ``names`` (``what`` names them in errors)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"split_file {path} cannot be read as JSON ({err}): pass a run's split.json") from err
    check_split_record(path, record, split_format, kind, fix, keys=required)
    position = {name: i for i, name in enumerate(names)}
    parts = {k: [position.get(name) for name in record.get(k) or []] for k in PARTS}
    listed = [i for ids in parts.values() for i in ids]
    if None in listed or sorted(listed) != list(range(len(names))):
        raise ValueError(f"split_file {path} does not partition the {what}")
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in parts.items()}, record

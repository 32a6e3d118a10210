"""In-memory uint8 image tensors served a whole batch at a time (one indexing op per batch)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset


class IndexedImages(Dataset):
    """Rows ``indices`` of an in-memory uint8 image tensor; batches are gathered in one indexing op.

    With ``names`` (one per row), items and batches also carry each image's ``"file"`` name.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None,
                 names: Sequence[str] | None = None) -> None:
        self.images, self.targets, self.names = images, targets, names
        self.indices = torch.arange(len(images)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        item = {"image": self.images[index], "target": self.targets[index], "index": index}
        return item if self.names is None else dict(item, file=self.names[int(index)])

    def __getitems__(self, positions: Sequence[int]) -> dict[str, Any]:
        index = self.indices[torch.as_tensor(positions, dtype=torch.long)]
        batch = {"image": self.images[index], "target": self.targets[index], "index": index}
        return batch if self.names is None else dict(batch, file=[self.names[int(i)] for i in index])


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate function: ``IndexedImages.__getitems__`` already returns a whole batch."""
    return batch

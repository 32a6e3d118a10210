"""Feature memories of the similarity methods: CoMatch's queue, SimMatch's labeled bank, and the queue of
recent batch means their distribution alignment divides by. ``nn.Module``s with no Lightning in them.

Each holds its state in buffers (in the owner's ``state_dict``: a resumed run continues with the same
memory), is read by the loss as committed, and is written only by its ``update_``, which the owner
proposes through ``step_state`` and the base calls once per optimizer step (docs/design.md, "Running
state"). The owner passes rows gathered from every rank (``threshold_state.gather_rows``, rank 0's rows
first), so every rank writes the same rows in the same order and DDP's broadcast of buffers from rank 0
changes nothing. ``pushed``/``marginal`` give what a step's rows would make, without writing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.ssl.threshold_state import write_last_


class FeatureQueue(nn.Module):
    """A ring of the last ``size`` rows of (L2-normalized embedding, class probabilities), oldest overwritten.

    CoMatch's memory (USB ``semilearn/algorithms/comatch/comatch.py`` lines 121-126, 147-160): zeros at the start
    (SimMatchV2's: unit random embeddings, zero probabilities, ``random_features``), rows written at ``ptr``
    which then advances modulo ``size``. USB drops a step's rows that pass the end (its size is a multiple of the
    rows a step pushes, so it never does in its recipes); here they wrap to the start, as a ring does. ``count``
    is how many rows were ever pushed (``is_full``).
    """

    def __init__(self, size: int, feature_dim: int, num_classes: int, random_features: bool = False) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"the queue size must be positive, got {size}")
        features = torch.zeros(size, feature_dim)
        if random_features:  # SimMatchV2's start: unit random rows (a fixed seed: every rank draws the same)
            features = F.normalize(torch.randn(size, feature_dim, generator=torch.Generator().manual_seed(0)), dim=1)
        self.register_buffer("features", features)
        self.register_buffer("probs", torch.zeros(size, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return len(self.features)

    def is_full(self) -> torch.Tensor:
        """Whether every row holds a pushed sample (a bool tensor: no host synchronization)."""
        return self.count >= self.size

    def slots(self, num_rows: int) -> torch.Tensor:
        """Where the last ``min(num_rows, size)`` of ``num_rows`` pushed rows land (earlier ones are overwritten)."""
        kept = min(num_rows, self.size)
        return (self.ptr + (num_rows - kept) + torch.arange(kept, device=self.ptr.device)) % self.size

    @torch.no_grad()
    def update_(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        """Push the rows in order (the commit)."""
        num_rows = len(features)
        slots = self.slots(num_rows)
        self.features[slots] = features[num_rows - len(slots):].to(self.features.dtype)
        self.probs[slots] = probs[num_rows - len(slots):].to(self.probs.dtype)
        self.ptr.copy_((self.ptr + num_rows) % self.size)
        self.count.add_(num_rows)


class LabeledBank(nn.Module):
    """One L2-normalized embedding and the class of each labeled sample: SimMatch's labeled memory bank.

    USB ``semilearn/algorithms/simmatch/simmatch.py`` lines 108-112 (random unit rows, labels 0, until a
    sample is first seen) and 133-143: a seen sample's row becomes ``normalize(m * row + (1 - m) * z)``
    (``m = 0.7`` for the CIFAR-like data sets, lines 92-94; ``m = 0`` replaces it, USB's other data sets)
    and its label the sample's. A sample seen twice in one step keeps its last row (``write_last_``).

    Rows are addressed by slot ``0 .. K - 1``; :meth:`slots_of` turns a batch's ``index`` into slots
    through the sorted ``labeled_indices`` buffer. ``resize_`` makes it the size of a labeled split.
    """

    def __init__(self, feature_dim: int, momentum: float = 0.7, size: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"the bank momentum must lie in [0, 1), got {momentum}")
        self.feature_dim, self.momentum = feature_dim, momentum
        self.register_buffer("features", torch.zeros(0, feature_dim))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("labeled_indices", torch.zeros(0, dtype=torch.long))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))  # rows written at least once
        if size:
            self.resize_(torch.arange(size))

    def __len__(self) -> int:
        return len(self.labels)

    def resize_(self, labeled_indices: torch.Tensor) -> None:
        """A fresh bank with one row per labeled index: unit random rows (a fixed seed: every rank draws the
        same), label 0."""
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn(len(labeled_indices), self.feature_dim, generator=generator)
        device = self.features.device
        self.features = F.normalize(rows, dim=1).to(device)
        self.labels = torch.zeros(len(labeled_indices), dtype=torch.long, device=device)
        self.labeled_indices = labeled_indices.to(device=device, dtype=torch.long).sort().values
        self.seen = torch.zeros(len(labeled_indices), dtype=torch.bool, device=device)

    def slots_of(self, index: torch.Tensor) -> torch.Tensor:
        """The bank row of each labeled ``index``."""
        return torch.searchsorted(self.labeled_indices, index.to(self.labeled_indices.device))

    @torch.no_grad()
    def update_(self, slots: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Move the rows of ``slots`` towards ``features`` and set their labels (the commit)."""
        moved = F.normalize(self.momentum * self.features[slots] + (1.0 - self.momentum) * features.float(), dim=1)
        write_last_(self.features, slots, moved)
        write_last_(self.labels, slots, labels)
        self.seen[slots] = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("features", "labels", "labeled_indices", "seen"):  # a checkpoint's bank has its split's size
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def size_labeled_bank(bank: LabeledBank, facts: Any, method: str) -> None:
    """A row per labeled sample of the DataModule's split, unless the bank (a resumed run's) has them."""
    labeled = facts.labeled_indices if facts is not None else None
    if labeled is None:
        if len(bank) == 0:
            raise ValueError(f"{method} needs the labeled set: use a DataModule that publishes data_facts() "
                             f"with labeled_indices (every labelwise DataModule does) or pass num_labeled")
        return
    if not torch.equal(bank.labeled_indices.cpu(), labeled.sort().values.cpu()):
        bank.resize_(labeled)


class MarginalQueue(nn.Module):
    """The last ``length`` batch-mean predictions, for distribution alignment's ``p_model``.

    USB's ``DistAlignQueueHook`` (``semilearn/algorithms/hooks/dist_align.py`` lines 77-137), which CoMatch
    and SimMatch use with ``da_len = 32``: a queue of zero rows, the batch mean written at the pointer
    *before* aligning, and ``p_model`` the mean over all ``length`` rows, zero rows included.
    """

    def __init__(self, length: int, num_classes: int) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"the distribution-alignment queue length must be positive, got {length}")
        self.register_buffer("means", torch.zeros(length, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def marginal(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """``p_model`` once ``batch_mean`` is pushed; writes nothing."""
        means = self.means.clone()
        means[self.ptr] = batch_mean.to(means.dtype)
        return means.mean(dim=0)

    @torch.no_grad()
    def update_(self, batch_means: torch.Tensor) -> None:
        """Push each row (one per micro-batch of the step) (the commit)."""
        for row in batch_means:
            self.means[self.ptr] = row.to(self.means.dtype)
            self.ptr.copy_((self.ptr + 1) % len(self.means))

"""The training streams' sampler: a fixed number of steps per epoch, sharded across DDP ranks.

Every stream (labeled, unlabeled) draws ``steps`` *global* batches of ``world_size * batch_size``
indices per epoch, permutation after permutation of its dataset (sampling without replacement
within a pass), from a seed that all ranks share. Rank ``r`` yields positions
``r * batch_size .. (r + 1) * batch_size - 1`` of every global batch. So:

* the ranks' shards of a step are disjoint pieces of one global batch, and every rank yields the
  same number of batches (``steps``), which collectives such as ``all_gather`` need;
* ``W`` ranks with ``batch_size = b`` see exactly the batches of one process with
  ``batch_size = W * b``, in the same order (rank ``r`` holds the ``r``-th slice);
* an epoch is ``steps_per_epoch`` optimizer steps on any number of ranks.

The sampler subclasses ``DistributedSampler``, so Lightning leaves it in place
(``use_distributed_sampler`` swaps only other samplers). A plain ``RandomSampler(num_samples=...)``
would be replaced by a ``DistributedSampler`` over the dataset, which drops ``num_samples``:
the epoch shrinks to one pass over the data split across the ranks, and a labeled set smaller than
``world_size * batch_size`` yields no batch at all with ``drop_last``.

The seed is ``PL_GLOBAL_SEED`` (set by ``seed_everything``) when it is set, else a draw from
torch's global generator; either way rank 0's value is broadcast, so ranks started with different
seeds (e.g. ``seed_everything: true`` under SLURM) still share one permutation. Lightning calls
``set_epoch`` before every epoch, which draws the next epoch's permutation.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

#: stream ids, so the labeled and the unlabeled stream draw independent permutations
STREAMS = {"labeled": 0, "unlabeled": 1}


class StreamSampler(DistributedSampler):
    """Rank ``rank``'s indices of ``steps`` global batches of ``num_replicas * batch_size`` draws
    from ``range(size)``, one seeded permutation after another (see the module docstring).

    Args:
        size: length of the dataset.
        batch_size: indices per batch on one rank.
        steps: batches per epoch on every rank.
        seed: shared by all ranks; the permutation of an epoch depends on ``(seed, stream, epoch)``.
        stream: a name from ``STREAMS`` or any int, to decorrelate the streams of one run.
        num_replicas, rank: the process group's size and this process's rank.
    """

    def __init__(self, size: int, batch_size: int, steps: int, seed: int, stream: str | int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if size < 1:
            raise ValueError(f"StreamSampler needs a non-empty dataset, got size={size}")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be at least 1, got {batch_size} and {steps}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        # No super().__init__: it needs a dataset and sizes the shard as a split of one pass.
        self.size, self.batch_size, self.steps = size, batch_size, steps
        self.num_replicas, self.rank = num_replicas, rank
        self.seed, self.epoch, self.shuffle, self.drop_last = int(seed), 0, True, True
        self.stream = STREAMS.get(stream, stream) if isinstance(stream, str) else int(stream)
        self.num_samples = steps * batch_size
        self.total_size = self.num_samples * num_replicas

    def global_order(self) -> torch.Tensor:
        """All ranks' indices of the epoch, ``(steps, num_replicas * batch_size)``: row ``k`` is global batch ``k``."""
        state = np.random.SeedSequence([self.seed % 2**63, self.stream, self.epoch]).generate_state(1, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0]))
        passes = -(-self.total_size // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])
        return order[: self.total_size].view(self.steps, self.num_replicas * self.batch_size)

    def __iter__(self) -> Iterator[int]:
        mine = self.global_order().view(self.steps, self.num_replicas, self.batch_size)[:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples


def shared_seed(trainer) -> int:
    """The stream seed: ``PL_GLOBAL_SEED`` or a draw from torch's generator, broadcast from rank 0.

    Every rank must call this (it is a collective under DDP).
    """
    env = os.environ.get("PL_GLOBAL_SEED")
    seed = int(env) if env is not None else int(torch.randint(2**62, ()))
    if _world_and_rank(trainer)[0] > 1:
        seed = int(trainer.strategy.broadcast(seed, src=0))
    return seed


def _world_and_rank(trainer) -> tuple[int, int]:
    """``(world_size, global_rank)``; one process without a trainer (or a stand-in without them)."""
    return getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)

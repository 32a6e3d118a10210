"""Training streams whose order and randomness are a function of the position in training, so a run
resumed from a checkpoint (at an epoch boundary or mid-epoch) continues exactly as if it had never stopped.

Lightning restores weights, optimizer, schedulers and loop counters, but not random number
generators: on resume it re-seeds the global RNG (``seed_everything``, and ``reset_seed`` after the
sanity check), so a ``RandomSampler`` would replay epoch 0's order, and augmentations drawn from the
global RNG would differ. It also restarts a non-resumable loader from its first batch mid-epoch.
Here nothing depends on the history of the process:

* :class:`ResumableSampler` is the :class:`~datamodules.sampling.StreamSampler` (epoch ``e``'s
  permutations and rank shards from ``(seed, stream, e)``, ``set_epoch`` called by Lightning) that
  also yields one seed per drawn item.
* :class:`SeededItems` runs ``dataset[i]`` with torch's CPU RNG seeded by the item's seed and restores
  the RNG afterwards: per-item augmentation is the same in the main process and in any number of
  loader workers.
* :class:`ResumableLoader` counts the batches it has handed out. Its ``state_dict`` goes into every
  checkpoint (Lightning's loop state, and the DataModule's through :class:`ResumableStreams`); a
  loader restored mid-epoch skips the consumed batches by sampler position (no data is loaded for
  them). As it hands out batch ``b`` of epoch ``e`` it re-seeds torch's global RNG (CPU and
  accelerators) from ``(seed, e, b, rank)``, so the randomness of the step that uses the batch
  (augmentation on the device, dropout, a detector's box sampling) does not depend on what ran before.

A stream's seed is :func:`~datamodules.sampling.shared_seed` (``PL_GLOBAL_SEED`` or a draw from torch's
RNG, rank 0's on every rank), except in a resumed fit, which takes the checkpoint's.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import StreamSampler, _world_and_rank, shared_seed

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys: SplitMix64's finaliser chained over the keys (order matters)."""
    h = _GOLDEN
    for key in keys:
        h = ((h ^ (int(key) & _MASK64)) + _GOLDEN) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class ResumableSampler(StreamSampler):
    """A :class:`~datamodules.sampling.StreamSampler` (the same indices, rank shards and epoch
    permutations) that yields ``(item_seed, index)`` pairs and can start an epoch after its first draws.

    The item seeds come from a generator seeded by ``(seed, stream, epoch)`` and follow the global
    batch positions, so ``W`` ranks with batch ``b`` give each image the seed one process with
    batch ``W * b`` gives it.
    """

    _start = 0

    def skip(self, draws: int) -> None:
        """Start the next iteration after this process's first ``draws`` draws of the epoch."""
        self._start = draws

    def item_seeds(self) -> torch.Tensor:
        """All ranks' item seeds of the epoch, shaped like :meth:`global_order`."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, self.epoch))
        return torch.randint(0, 2**62, (self.steps, self.num_replicas * self.batch_size), generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        mine = [t.view(self.steps, self.num_replicas, self.batch_size)[:, self.rank].reshape(-1)[start:]
                for t in (self.item_seeds(), self.global_order())]
        return zip(*(t.tolist() for t in mine))

    def step_seed(self, batch: int) -> int:
        """The seed of the global RNG for batch ``batch`` of the current epoch (the same for every
        stream of the run, so a step that combines several streams gets one)."""
        return mix_seed(self.seed, self.epoch, batch, self.rank)


class SeededItems(Dataset):
    """``dataset`` indexed by ``(seed, index)``: the item is made with torch's CPU RNG seeded by
    ``seed`` (restored afterwards). A plain ``index`` gives the item unseeded; attributes are the
    wrapped dataset's. A dataset with ``__getitems__`` (a batch gathered in one op) is seeded once
    per batch, by its first item's seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[tuple[int, int]] | Sequence[int]) -> Any:
        gather = getattr(self.dataset, "__getitems__", None)
        if gather is None:
            return [self[key] for key in keys]
        if not isinstance(keys[0], tuple):  # plain indices (a sampler Lightning put in, e.g. overfit_batches)
            return gather(list(keys))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(keys[0][0])
            return gather([index for _, index in keys])


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning checkpoints.

    ``state_dict()`` holds the seed, the epoch and the batches handed out in it; after
    ``load_state_dict()`` the next iteration of that same epoch starts at the first batch not yet
    handed out. Each batch re-seeds torch's global RNG as it is handed out (see the module docstring).
    """

    _served = 0
    _resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # replaced (e.g. by overfit_batches): a plain loader
            yield from super().__iter__()
            return
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            skip = batches if epoch == sampler.epoch else 0
        sampler.skip(skip * self.batch_size)
        self._served = skip
        for batch in super().__iter__():
            torch.manual_seed(sampler.step_seed(self._served))
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.seed = int(state["seed"])
            self._resume = (int(state["epoch"]), int(state["batches"]))


def training_stream(dataset: Dataset, batch_size: int, steps_per_epoch: int, stream: str, seed: int,
                    collate_fn: Callable | None = None, num_workers: int = 0,
                    trainer: Any | None = None) -> ResumableLoader:
    """The loader of one training stream: ``steps_per_epoch`` full batches per epoch on this process
    (rank and world size from ``trainer``), resumable."""
    world, rank = _world_and_rank(trainer)
    sampler = ResumableSampler(len(dataset), batch_size, steps_per_epoch, seed, stream, num_replicas=world, rank=rank)
    return ResumableLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                           collate_fn=collate_fn, num_workers=num_workers, persistent_workers=num_workers > 0)


class ResumableStreams:
    """Mixin for a ``LightningDataModule`` (with ``steps_per_epoch``) that makes its training loaders with
    :meth:`training_stream`: their positions are also kept in the DataModule's ``state_dict``.

    Lightning hands a loader its saved state only if it builds the loader after restoring the loops;
    a ``configure_optimizers`` that reads ``trainer.estimated_stepping_batches`` (epoch-based
    training) builds it before, and the loader would silently restart its epoch. The DataModule's
    state is restored before ``configure_optimizers`` runs, so a loader made after that starts
    where the checkpoint left off either way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams: dict[str, ResumableLoader] = {}
        self._saved_streams: dict[str, dict[str, int]] = {}

    def training_stream(self, dataset: Dataset, batch_size: int, name: str, **kwargs: Any) -> ResumableLoader:
        saved = self._saved_streams.pop(name, {})
        # the checkpoint's seed on a resume; else shared_seed, a collective under DDP (every rank gets here)
        seed = int(saved["seed"]) if saved else shared_seed(self.trainer)
        loader = training_stream(dataset, batch_size, self.steps_per_epoch, name, seed, trainer=self.trainer, **kwargs)
        loader.load_state_dict(saved)
        self._streams[name] = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"training_streams": {name: loader.state_dict() for name, loader in self._streams.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # only a resumed fit continues the streams (not a fit after testing a checkpoint)
        if self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self._saved_streams = dict(state_dict.get("training_streams", {}))

"""Training streams whose order and randomness are a function of the position in training, so a run
resumed from a checkpoint (at an epoch boundary or mid-epoch) continues exactly as if it had never stopped.

Lightning restores weights, optimizer, schedulers and loop counters, but not random number
generators: on resume it re-seeds the global RNG (``seed_everything``, and ``reset_seed`` after the
sanity check), so a ``RandomSampler`` would replay epoch 0's order, and augmentations drawn from the
global RNG would differ. It also restarts a non-resumable loader from its first batch mid-epoch.
Here nothing depends on the history of the process:

* :class:`ResumableSampler` draws epoch ``e``'s order (permutation after permutation) and one seed
  per drawn item from a generator seeded by ``(seed, stream, e)``; Lightning calls ``set_epoch``.
* :class:`SeededItems` runs ``dataset[i]`` with torch's CPU RNG seeded by the item's seed and restores
  the RNG afterwards: per-item augmentation is the same in the main process and in any number of
  loader workers.
* :class:`ResumableLoader` counts the batches it has handed out. Its ``state_dict`` goes into every
  checkpoint (Lightning's loop state, and the DataModule's through :class:`ResumableStreams`); a
  loader restored mid-epoch skips the consumed batches by sampler position (no data is loaded for
  them). As it hands out batch ``b`` of epoch
  ``e`` it re-seeds torch's global RNG (CPU and accelerators) from ``(seed, e, b, rank)``, so the
  randomness of the step that uses the batch (augmentation on the device, dropout, a detector's
  box sampling) does not depend on what ran before.

A DataModule draws its streams' seed from torch's global RNG when it makes its first training
loader (so ``seed_everything``, the CLI's ``--seed_everything``, fixes it) and keeps it in its
``state_dict``: a resumed run continues with the seed of the run it resumes.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


def run_seed() -> int:
    """A seed drawn from torch's global RNG: fixed by ``torch.manual_seed`` / ``seed_everything``."""
    return int(torch.randint(0, 2**62, ()).item())


def _replicas() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """``(item_seed, index)`` pairs: ``num_samples`` draws per epoch and process, without replacement,
    one permutation of ``0 .. num_items - 1`` after another.

    With several processes the epoch's stream of ``num_samples * num_replicas`` draws is dealt out
    round-robin, so each process keeps ``num_samples`` per epoch (the epoch keeps its number of
    steps) and together they see every draw once. It subclasses ``DistributedSampler`` so that
    Lightning does not wrap it in another one.

    Args:
        num_items: size of the dataset.
        num_samples: draws per epoch on this process (``steps_per_epoch * batch_size``).
        seed: the stream's seed (default: drawn by :func:`run_seed`).
        stream: a name that makes this stream's draws independent of other streams of the same run.
        num_replicas, rank: processes and this one's rank (default: from ``torch.distributed``).
    """

    def __init__(self, num_items: int, num_samples: int, seed: int | None = None, stream: str = "train",
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_items < 1:
            raise ValueError(f"ResumableSampler needs at least one item to draw from, got num_items={num_items}")
        world, own = _replicas()
        super().__init__(range(num_items), num_replicas=num_replicas or world,
                         rank=own if rank is None else rank, shuffle=True,
                         seed=run_seed() if seed is None else seed, drop_last=True)
        self.num_items, self.num_samples, self.stream = num_items, num_samples, stream
        self.total_size = num_samples * self.num_replicas
        self._start = 0

    def skip(self, draws: int) -> None:
        """Start the next iteration after this process's first ``draws`` draws of the epoch."""
        self._start = draws

    def epoch_stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Epoch ``self.epoch``'s ``(item_seeds, indices)`` over all processes, in draw order."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, zlib.crc32(self.stream.encode()), self.epoch))
        passes = -(-self.total_size // self.num_items)
        order = torch.cat([torch.randperm(self.num_items, generator=generator) for _ in range(passes)])
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=generator)
        return seeds, order[:self.total_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seeds, order = self.epoch_stream()
        start, self._start = self.rank + self.num_replicas * self._start, 0
        return zip(seeds[start::self.num_replicas].tolist(), order[start::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

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


def training_stream(dataset: Dataset, batch_size: int, steps_per_epoch: int, stream: str, seed: int | None = None,
                    collate_fn: Callable | None = None, num_workers: int = 0) -> ResumableLoader:
    """The loader of one training stream: ``steps_per_epoch`` full batches per epoch, resumable."""
    sampler = ResumableSampler(len(dataset), steps_per_epoch * batch_size, seed=seed, stream=stream)
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
        self._stream_seed: int | None = None

    def training_stream(self, dataset: Dataset, batch_size: int, name: str, **kwargs: Any) -> ResumableLoader:
        if self._stream_seed is None:
            self._stream_seed = run_seed()
        loader = training_stream(dataset, batch_size, self.steps_per_epoch, name, seed=self._stream_seed, **kwargs)
        loader.load_state_dict(self._saved_streams.pop(name, {}))
        self._streams[name] = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"stream_seed": self._stream_seed,
                "training_streams": {name: loader.state_dict() for name, loader in self._streams.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # only a resumed fit continues the streams (not a fit after testing a checkpoint)
        if self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self._stream_seed = state_dict.get("stream_seed")
            self._saved_streams = dict(state_dict.get("training_streams", {}))

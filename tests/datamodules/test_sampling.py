"""The training streams' sampler: fixed steps per epoch, disjoint rank shards of one global batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import DigitsSSL
from datamodules.sampling import StreamSampler


def test_two_ranks_see_the_halves_of_the_one_process_batches():
    one = list(StreamSampler(30, batch_size=8, steps=5, seed=3, stream="unlabeled"))
    ranks = [list(StreamSampler(30, batch_size=4, steps=5, seed=3, stream="unlabeled", num_replicas=2, rank=r))
             for r in range(2)]
    assert len(one) == 40 and all(len(r) == 20 for r in ranks)
    for step in range(5):
        glued = ranks[0][4 * step:4 * step + 4] + ranks[1][4 * step:4 * step + 4]
        assert glued == one[8 * step:8 * step + 8]
    # permutation after permutation: the first 30 draws are each index once, the next 10 distinct
    assert sorted(one[:30]) == list(range(30)) and len(set(one[30:])) == 10


def test_epochs_and_streams_draw_other_permutations_and_the_seed_reproduces_them():
    sampler = StreamSampler(50, batch_size=10, steps=5, seed=0, stream="labeled")
    first = list(sampler)
    assert list(StreamSampler(50, batch_size=10, steps=5, seed=0, stream="labeled")) == first
    assert list(StreamSampler(50, batch_size=10, steps=5, seed=0, stream="unlabeled")) != first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(50))


def test_lightning_keeps_the_sampler_but_would_shrink_a_random_sampler_epoch():
    # What use_distributed_sampler does to a loader on 2 ranks (Lightning's own helper): a
    # RandomSampler(num_samples=steps * batch) becomes a DistributedSampler over the dataset, so
    # 40 labeled images with batch 32 give each rank 20 indices, and with drop_last no batch at all.
    dm = DigitsSSL(num_labeled=40, batch_size=32, steps_per_epoch=100, unlabeled_views=[])
    dm.setup("fit")
    loader = dm.train_dataloader().iterables["labeled"]
    assert isinstance(loader.sampler, StreamSampler) and isinstance(loader.sampler, DistributedSampler)
    assert len(loader) == 100  # Lightning's _requires_distributed_sampler is False for it
    plain = torch.utils.data.RandomSampler(loader.dataset, num_samples=100 * 32)
    swapped = _get_distributed_sampler(DataLoader(loader.dataset, sampler=plain), shuffle=True, overfit_batches=0,
                                       num_replicas=2, rank=0)
    assert len(swapped) == 20 and len(DataLoader(loader.dataset, batch_size=32, sampler=swapped, drop_last=True)) == 0


def test_ranks_share_rank_zeros_seed_from_seed_everything(monkeypatch):
    L.seed_everything(5)
    dm = DigitsSSL(num_labeled=50, batch_size=4, steps_per_epoch=3, unlabeled_views=[])
    dm.setup("fit")
    first = list(dm.train_dataloader().iterables["labeled"].sampler)
    torch.manual_seed(99)  # the global generator's state does not matter once PL_GLOBAL_SEED is set
    assert list(dm.train_dataloader().iterables["labeled"].sampler) == first


@pytest.mark.parametrize("bad", [dict(size=0), dict(batch_size=0), dict(rank=2)])
def test_bad_arguments_name_the_problem(bad):
    kwargs = dict(size=10, batch_size=2, steps=3, seed=0, num_replicas=2, rank=0) | bad
    with pytest.raises(ValueError, match="size|batch_size|rank"):
        StreamSampler(**kwargs)

"""Resumable training streams: order, per-item seeds, positions and the global RNG are functions of
(seed, stream, epoch, position), never of the process's history."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import Dataset

from datamodules import DigitsSSL, IndexedImages, SegmentationFolders
from datamodules.resumable import ResumableSampler, SeededItems, mix_seed, training_stream
from datamodules.sampling import StreamSampler


class RandomItems(Dataset):
    """Item i is (i, a draw from torch's global RNG); counts the items made."""

    def __init__(self, size: int) -> None:
        self.size, self.made = size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.made += 1
        return {"index": torch.tensor(i), "noise": torch.rand(3)}


def _batches(loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_the_streams_order_with_one_seed_per_item_set_by_seed_stream_epoch_and_position():
    sampler = ResumableSampler(10, batch_size=5, steps=5, seed=7, stream="labeled")
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(sampler)
    torch.manual_seed(456)
    assert list(sampler) == first
    assert [i for _, i in first] == list(StreamSampler(10, batch_size=5, steps=5, seed=7, stream="labeled"))
    seeds = [s for s, _ in first]
    assert len(set(seeds)) == 25 and all(0 <= s < 2**62 for s in seeds)
    sampler.set_epoch(1)
    assert [s for s, _ in sampler] != seeds
    assert [s for s, _ in ResumableSampler(10, batch_size=5, steps=5, seed=7, stream="unlabeled")] != seeds
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**70, -1) < 2**63


def test_ranks_get_the_seeds_one_process_gives_their_images():
    whole = list(ResumableSampler(7, batch_size=4, steps=3, seed=3))
    ranks = [list(ResumableSampler(7, batch_size=2, steps=3, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    for step in range(3):
        assert ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2] == whole[4 * step:4 * step + 4]


def test_a_loader_restored_mid_epoch_hands_out_exactly_the_remaining_batches_without_loading_the_others():
    data = RandomItems(10)
    loader = training_stream(data, batch_size=3, steps_per_epoch=4, stream="labeled", seed=5)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"seed": 5, "epoch": 2, "batches": 2}
    tail = list(iterator)
    after_tail = torch.rand(4)  # the global RNG after the last batch is a function of the position too

    fresh_data = RandomItems(10)
    restored = training_stream(fresh_data, batch_size=3, steps_per_epoch=4, stream="labeled", seed=0)
    restored.load_state_dict(state)
    torch.manual_seed(999)
    assert [b["index"].tolist() for b in _batches(restored, 2)] == [b["index"].tolist() for b in tail]
    assert torch.equal(torch.rand(4), after_tail)
    assert fresh_data.made == 6  # the two skipped batches were never made
    assert restored.state_dict() == {"seed": 5, "epoch": 2, "batches": 4}
    for a, b in zip(_batches(restored, 2)[2:], tail):  # the resume applies once; items are seeded
        assert torch.equal(a["noise"], b["noise"])


def test_a_saved_state_of_another_epoch_restores_the_seed_but_skips_nothing():
    loader = training_stream(RandomItems(10), batch_size=2, steps_per_epoch=3, stream="labeled", seed=0)
    loader.load_state_dict({"seed": 11, "epoch": 0, "batches": 3})  # epoch 0 finished
    assert loader.sampler.seed == 11 and len(_batches(loader, 1)) == 3


def test_seeded_items_restore_the_global_rng_and_forward_plain_indices_and_attributes():
    data = SeededItems(RandomItems(4))
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    a, b = data[(42, 1)], data[(42, 1)]
    assert torch.equal(a["noise"], b["noise"]) and not torch.equal(a["noise"], data[(43, 1)]["noise"])
    assert torch.equal(torch.rand(2), expected_next)
    assert int(data[3]["index"]) == 3 and data.made == 4 and data.size == 4
    gathered = SeededItems(IndexedImages(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5)))
    assert gathered.__getitems__([(7, 3), (8, 1)])["index"].tolist() == [3, 1]
    assert gathered.__getitems__([4, 0])["target"].tolist() == [4, 0]  # a sampler Lightning put in


def test_segmentation_crops_are_the_same_with_and_without_loader_workers(shared_data):
    def batches(workers: int) -> list:
        dm = SegmentationFolders(root=str(shared_data / "membrane"), num_labeled=4, num_test=2, crop_size=32,
                                 batch_size=2, uratio=1, steps_per_epoch=2, num_workers=workers,
                                 unlabeled_views=["weak", "strong"])
        dm.setup("fit")
        loader = dm.train_dataloader()
        for stream in loader.flattened:
            stream.sampler.seed = 0
        return [batch for batch, _, _ in loader]

    single, parallel = batches(0), batches(2)
    assert len(single) == len(parallel) == 2
    for a, b in zip(single, parallel):
        for part in ("labeled", "unlabeled"):
            for key, value in a[part].items():
                assert torch.equal(value, b[part][key]), (part, key)


def test_too_few_items_is_refused():
    with pytest.raises(ValueError, match="size=0"):
        ResumableSampler(0, batch_size=2, steps=2, seed=0)


def test_a_datamodule_restores_stream_positions_for_a_resumed_fit_only():
    state = {"training_streams": {"labeled": {"seed": 4, "epoch": 0, "batches": 1}}}
    for fn, restored in ((TrainerFn.FITTING, 1), (TrainerFn.TESTING, 0)):
        dm = DigitsSSL(num_labeled=50, batch_size=4, steps_per_epoch=2, unlabeled_views=[])
        dm.trainer = L.Trainer(logger=False)
        dm.trainer.state.fn = fn
        dm.load_state_dict(state)
        dm.setup("fit")
        loader = dm.train_dataloader().iterables["labeled"]
        assert len(list(loader)) == 2 - restored
        assert dm.state_dict()["training_streams"]["labeled"]["batches"] == 2
        assert (loader.sampler.seed == 4) == bool(restored)

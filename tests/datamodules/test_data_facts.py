"""The facts half of the model-data contract: what each DataModule publishes (``data_facts()``,
datamodules/facts.py) agrees with what its batches carry over one pass of each stream, and the model
receives the facts once in ``setup`` (lightning_modules/core/data_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import COCODetection, DigitsSSL, SegmentationFolders
from lightning_modules import FixMatch, FlexMatch
from tests.ssl_helpers import SMALL_NET, make_trainer

pytestmark = [pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]


def _one_pass(dm, stream: str) -> list[dict]:
    """The batches of ``stream`` up to the end of its first permutation (the last may run into the next)."""
    loader = dm.train_dataloader().iterables[stream]
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        seen += len(batch["index"])
        if seen >= len(loader.dataset):
            return batches
    raise AssertionError("the stream ended before one pass")


def _first_permutation(batches: list[dict], size: int) -> torch.Tensor:
    return torch.cat([b["index"] for b in batches])[:size]


@pytest.mark.parametrize("include_labeled", [True, False])
def test_digits_facts_are_what_the_streams_carry(include_labeled):
    dm = DigitsSSL(num_labeled=50, batch_size=10, uratio=3, steps_per_epoch=200,
                   include_labeled_in_unlabeled=include_labeled, unlabeled_views=["weak"])
    before = dm.data_facts()  # before the split: no split facts
    assert (before.num_classes, before.class_names) == (10, tuple(str(c) for c in range(10)))
    assert before.labeled_class_counts is None and before.unlabeled_indices is None and before.num_indices is None
    with pytest.raises(RuntimeError, match=r"labeled_class_counts\(\) needs the labeled/unlabeled split"):
        dm.labeled_class_counts()
    dm.setup("fit")
    facts = dm.data_facts()
    labeled = _one_pass(dm, "labeled")
    targets = torch.cat([b["target"] for b in labeled])
    assert torch.equal(facts.labeled_class_counts, torch.bincount(targets, minlength=10))
    assert facts.labeled_class_counts.tolist() == [5] * 10  # class-balanced
    torch.testing.assert_close(facts.labeled_marginal, torch.full((10,), 0.1))
    torch.testing.assert_close(dm.labeled_marginal(), facts.labeled_marginal)
    drawn = _first_permutation(_one_pass(dm, "unlabeled"), facts.num_unlabeled)
    assert torch.equal(drawn.sort().values, facts.unlabeled_indices)  # a pass draws each unlabeled index once
    assert facts.num_unlabeled == dm.num_unlabeled == len(facts.unlabeled_indices)
    labeled_indices = set(torch.cat([b["index"] for b in labeled]).tolist())
    assert (labeled_indices <= set(facts.unlabeled_indices.tolist())) == include_labeled
    assert facts.labeled_indices.tolist() == sorted(labeled_indices)  # a labeled pass draws each of them
    assert facts.num_indices == len(dm.unlabeled_dataset().images)  # every training image has an index
    assert facts.num_unlabeled == facts.num_indices - (0 if include_labeled else 50)


def test_segmentation_facts_count_labeled_pixels_as_the_mask_files_hold_them(shared_data):
    root = shared_data / "membrane"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} not found")
    dm = SegmentationFolders(root=str(root), num_labeled=4, num_test=5, batch_size=2, steps_per_epoch=1)
    assert dm.data_facts().labeled_class_counts is None and dm.data_facts().class_names is None
    dm.setup("fit")
    facts = dm.data_facts()
    masks = [np.asarray(Image.open(root / "label" / f"{dm.stems[i]}.png").convert("L"))
             for i in dm.split.labeled.tolist()]  # read again with PIL: binary masks are pixel > 127
    foreground = sum(int((m > 127).sum()) for m in masks)
    assert facts.labeled_class_counts.tolist() == [sum(m.size for m in masks) - foreground, foreground]
    assert facts.num_indices == 30 and facts.num_unlabeled == 30 - 5 - 4
    assert torch.equal(facts.unlabeled_indices, dm.split.unlabeled)
    assert torch.equal(facts.labeled_indices, dm.split.labeled)


def test_detection_facts_count_the_objects_the_labeled_stream_trains_on(shared_data):
    root = shared_data / "coco128"
    if not (root / "annotations").is_dir():
        pytest.skip(f"{root} not found")
    dm = COCODetection(str(root), num_labeled=40, num_test=16, batch_size=8, steps_per_epoch=10, hflip=False,
                       unlabeled_views=["weak"])
    assert dm.data_facts().class_names[:2] == ("background", "person")
    dm.setup("fit")
    facts = dm.data_facts()
    labels = torch.cat([t["labels"] for b in _one_pass(dm, "labeled") for t in b["target"]])
    assert torch.equal(facts.labeled_class_counts, torch.bincount(labels, minlength=dm.num_classes))
    assert facts.labeled_class_counts[0] == 0 and facts.num_indices == 128 and facts.num_unlabeled == 128 - 16 - 40
    unlabeled = _one_pass(dm, "unlabeled")
    assert torch.equal(_first_permutation(unlabeled, facts.num_unlabeled).sort().values, facts.unlabeled_indices)
    assert all([dm.image_ids[i] for i in b["index"].tolist()] == b["image_id"] for b in unlabeled)


def test_the_model_receives_the_facts_once_in_setup(one_thread):
    model = FlexMatch(**SMALL_NET)
    assert model.data_facts is None
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=1, include_labeled_in_unlabeled=False)
    make_trainer(max_steps=1).fit(model, dm)
    facts = model.data_facts
    assert facts.num_classes == 10 and torch.equal(facts.labeled_class_counts, dm.labeled_class_counts())
    assert torch.equal(facts.unlabeled_indices, dm.unlabeled_indices())
    # FlexMatch sized its memory from them: the labeled indices lie outside the unlabeled set
    assert len(model.memory) == facts.num_indices and (model.memory == -2).sum() == 50


def test_without_a_datamodule_there_are_no_facts_and_a_method_that_needs_one_says_which_argument(one_thread):
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=1, unlabeled_views=["weak", "strong"])
    dm.setup("fit")
    loader = dm.train_dataloader()
    model = FixMatch(**SMALL_NET)
    trainer = make_trainer(max_steps=1)
    model.on_after_batch_transfer = dm.on_after_batch_transfer  # bare loaders: the model makes the views
    trainer.fit(model, loader)
    assert model.data_facts is None and trainer.global_step == 1
    with pytest.raises(ValueError, match="FlexMatch needs the unlabeled set's size.*pass num_unlabeled"):
        make_trainer(max_steps=1).fit(FlexMatch(**SMALL_NET), loader)
    explicit = FlexMatch(num_unlabeled=len(dm.unlabeled_dataset().images), **SMALL_NET)  # a config that sets it
    explicit.on_after_batch_transfer = dm.on_after_batch_transfer
    make_trainer(max_steps=1).fit(explicit, loader)
    assert len(explicit.memory) == 1347

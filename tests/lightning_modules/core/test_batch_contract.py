"""The batch half of the model-data contract (lightning_modules/core/batch.py): every DataModule's batches,
on real data, follow it; the checker names what a batch that breaks it got wrong; the base checks the first
training batch of an epoch; view names are checked where they are given."""

from __future__ import annotations

import pytest
import torch

from datamodules import COCODetection, DigitsSSL, ImageFolderSSL, SegmentationFolders
from lightning_modules import FixMatch, Supervised
from lightning_modules.core.batch import (BatchContractError, check_evaluation_batch, check_training_batch,
                                          check_view_names, training_images)
from tests.ssl_helpers import SMALL_NET, make_trainer

pytestmark = [pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]
VIEWS = ("weak", "strong", "weak2")


def _membrane(shared_data):
    root = shared_data / "membrane"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} not found")
    return SegmentationFolders(root=str(root), num_labeled=6, num_test=5, batch_size=2, steps_per_epoch=1,
                               crop_size=64)


def _coco(shared_data):
    root = shared_data / "coco128"
    if not (root / "annotations").is_dir():
        pytest.skip(f"{root} not found")
    return COCODetection(str(root), num_labeled=40, num_test=4, batch_size=2, steps_per_epoch=1, min_size=96)


DATA = {
    "digits": (lambda request: DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=1), "classification"),
    "image_folder": (lambda request: ImageFolderSSL(root=str(request.getfixturevalue("cifar_folder")), num_labeled=50,
                                                    batch_size=4, uratio=2, steps_per_epoch=1), "classification"),
    "membrane": (lambda request: _membrane(request.getfixturevalue("shared_data")), "segmentation"),
    "coco128": (lambda request: _coco(request.getfixturevalue("shared_data")), "detection"),
}


@pytest.mark.parametrize("name", DATA)
def test_every_datamodule_makes_batches_of_the_contract(name, request):
    make, task = DATA[name]
    dm = make(request)
    dm.unlabeled_views = list(VIEWS)
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(raw, 0)
    check_training_batch(batch, task, VIEWS)
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    assert set(unlabeled) >= {"weak", "strong", "weak2", "target", "index"}
    # every index lies in the index space, the unlabeled ones among the unlabeled indices
    facts = dm.data_facts()
    assert 0 <= int(labeled["index"].min()) and int(labeled["index"].max()) < facts.num_indices
    assert set(unlabeled["index"].tolist()) <= set(facts.unlabeled_indices.tolist())
    # the BatchNorm pass sees the labeled images and each view, nothing else
    images = training_images(batch)
    assert len(images) == 4 and images[0] is labeled["image"] and images[1] is unlabeled["weak"]
    evaluation = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    check_evaluation_batch(evaluation, task)


def _digits_batch():
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=1, unlabeled_views=["weak", "strong"])
    dm.setup("fit")
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader()))[0], 0)


def test_the_checker_names_what_is_wrong():
    batch = _digits_batch()
    check_training_batch(batch, "classification", ("weak", "strong"))
    with pytest.raises(BatchContractError, match=r"batch\['unlabeled'\] lacks the view\(s\) \['strong2'\]"):
        check_training_batch(batch, "classification", ("weak", "strong2"))
    no_index = {"labeled": {k: v for k, v in batch["labeled"].items() if k != "index"}}
    with pytest.raises(BatchContractError, match=r"batch\['labeled'\] lacks \['index'\]"):
        check_training_batch(no_index, "classification")
    uint8 = {"labeled": dict(batch["labeled"], image=batch["labeled"]["image"].to(torch.uint8))}
    with pytest.raises(BatchContractError, match=r"\['image'\] must be a float tensor \(8, C, H, W\), got a uint8"):
        check_training_batch(uint8, "classification")
    with pytest.raises(BatchContractError, match=r"\['target'\] must be int64 class ids \(8, H, W\)"):
        check_training_batch(batch, "segmentation")  # per-image targets where per-pixel ones belong
    with pytest.raises(BatchContractError, match="a training batch is a dict"):
        check_training_batch(batch["labeled"], "classification")
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        check_training_batch(batch, "captioning")


def test_the_old_detection_names_are_pointed_to_their_new_ones():
    image = torch.rand(3, 32, 32)
    target = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])}
    old = {"images": [image], "targets": [target], "image_id": [9]}  # the detection batches before 2026-12
    with pytest.raises(BatchContractError, match=r"lacks \['image', 'target', 'index'\].*'images' is now 'image'; "
                                                 r"'targets' is now 'target'"):
        check_evaluation_batch(old, "detection")
    check_evaluation_batch({"image": [image], "target": [target], "index": torch.tensor([0])}, "detection")
    with pytest.raises(BatchContractError, match=r"\['target'\]\[0\] must hold 'boxes' \(n, 4\)"):
        check_evaluation_batch({"image": [image], "target": [{"labels": torch.tensor([1])}],
                                "index": torch.tensor([0])}, "detection")


class _OldDialect(DigitsSSL):
    """A DataModule of one's own that still names the labeled images ``images``."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "labeled" in batch:
            batch["labeled"]["images"] = batch["labeled"].pop("image")
        return batch


def test_training_on_a_batch_that_breaks_the_contract_fails_naming_the_key(one_thread):
    model = Supervised(**SMALL_NET)
    with pytest.raises(BatchContractError, match=r"batch\['labeled'\] lacks \['image'\].*'images' is now 'image'"):
        make_trainer(max_steps=1).fit(model, _OldDialect(num_labeled=50, batch_size=8, steps_per_epoch=1))


def test_a_view_override_without_a_view_the_method_needs_fails_before_the_loss(one_thread):
    # main: KeyError: 'strong' inside FixMatch's loss
    model = FixMatch(**SMALL_NET)
    data = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=1, unlabeled_views=["weak"])
    with pytest.raises(BatchContractError, match=r"lacks the view\(s\) \['strong'\] the method asks for"):
        make_trainer(max_steps=1).fit(model, data)


def test_view_names_are_checked_where_they_are_given():
    assert check_view_names(["weak", "strong2", "plain"]) == ("weak", "strong2", "plain")
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['strog'\]"):  # main: only at the first batch
        DigitsSSL(unlabeled_views=["weak", "strog"])


def test_segmentation_refuses_a_misspelt_view(shared_data):
    root = shared_data / "membrane"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} not found")
    # main: SegmentationFolders served a misspelt view as a weak view, silently
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['strog'\]"):
        SegmentationFolders(root=str(root), unlabeled_views=["weak", "strog"])

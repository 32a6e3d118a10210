"""SegmentationFolders on the real ISBI membrane slices: split, batch format, image/mask alignment
under augmentation (labeled and unlabeled targets), split files, bad input, and sliding-window inference."""

import json
import shutil

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import SegmentationFolders
from lightning_modules.segmentation.sliding_window import sliding_window_inference


@pytest.fixture(scope="module")
def membrane(shared_data):
    root = shared_data / "membrane"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} not found")
    return root


def _copy(membrane, root, stems, image_from="image"):
    """A small tree under ``root``: images (or, with image_from="label", the masks as images) and masks."""
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in stems:
        shutil.copy(membrane / image_from / f"{s}.png", root / "image" / f"{s}.png")
        shutil.copy(membrane / "label" / f"{s}.png", root / "label" / f"{s}.png")
    return root


def _first_batch(dm):
    raw, _, _ = next(iter(dm.train_dataloader()))
    return raw, dm.on_after_batch_transfer(raw, 0)


def test_split_counts_binary_masks_and_seeding(membrane):
    dm = SegmentationFolders(root=str(membrane), num_labeled=6, num_test=5, seed=0)
    # known before setup: train.py links them into the model when it instantiates both
    assert (dm.num_classes, dm.num_channels) == (2, 1)
    rgb = SegmentationFolders(root=str(membrane), mask_mode="index", num_classes=5, grayscale=False)
    assert (rgb.num_classes, rgb.num_channels) == (5, 3)
    dm.setup("fit")
    assert (dm.num_classes, dm.num_channels, len(dm.stems)) == (2, 1, 30)
    s = dm.split
    assert (len(s.labeled), len(s.unlabeled), len(s.test)) == (6, 19, 5)
    parts = [set(x.tolist()) for x in (s.labeled, s.unlabeled, s.test)]
    assert set.union(*parts) == set(range(30)) and sum(map(len, parts)) == 30
    assert all(set(torch.unique(m).tolist()) == {0, 1} for m in dm.masks)
    again = SegmentationFolders(root=str(membrane), num_labeled=6, seed=0)
    again.setup("fit")
    other = SegmentationFolders(root=str(membrane), num_labeled=6, seed=1)
    other.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip((s.labeled, s.test), (again.split.labeled, again.split.test)))
    assert not torch.equal(s.test, other.split.test)
    everything = SegmentationFolders(root=str(membrane))
    everything.setup("test")
    assert (len(everything.split.labeled), len(everything.split.unlabeled)) == (25, 0)


def test_training_and_eval_batch_format(membrane):
    dm = SegmentationFolders(root=str(membrane), num_labeled=6, crop_size=64, batch_size=2, uratio=3,
                             steps_per_epoch=4, unlabeled_views=["weak", "strong"])
    dm.setup("fit")
    raw, batch = _first_batch(dm)
    assert raw["labeled"]["image"].dtype == torch.uint8 and raw["unlabeled"]["strong"].dtype == torch.uint8
    labeled, unlabeled = batch["labeled"], batch["unlabeled"]
    assert labeled["image"].shape == (2, 1, 64, 64) and labeled["image"].dtype == torch.float32
    assert labeled["target"].shape == (2, 64, 64) and labeled["target"].dtype == torch.int64
    assert unlabeled["weak"].shape == unlabeled["strong"].shape == (6, 1, 64, 64)
    assert unlabeled["target"].shape == (6, 64, 64) and unlabeled["target"].dtype == torch.int64
    assert torch.equal(unlabeled["target"], raw["unlabeled"]["target"])  # class ids are not normalized
    assert set(labeled["index"].tolist()) <= set(dm.split.labeled.tolist())
    assert set(unlabeled["index"].tolist()) <= set(dm.split.unlabeled.tolist())
    loader = dm.train_dataloader()
    iter(loader)
    assert len(loader) == 4
    counts = torch.bincount(torch.cat([b["labeled"]["index"] for b, _, _ in dm.train_dataloader()]), minlength=30)
    # 8 draws from 6 labeled images: one whole permutation, then the start of the next
    assert counts.sum() == 8 and counts[dm.split.labeled].min() == 1 and counts.max() == 2
    dm.unlabeled_views = []
    assert set(dm.train_dataloader().iterables) == {"labeled"}
    test = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert test["image"].shape == (1, 1, 512, 512) and test["target"].shape == (1, 512, 512)
    assert int(test["index"][0]) == int(dm.split.test[0])


def test_image_and_mask_stay_aligned_under_augmentation(membrane, tmp_path):
    # images that are their own masks (255 * mask): any misalignment shows as a mismatch
    root = _copy(membrane, tmp_path / "self", range(8), image_from="label")
    dm = SegmentationFolders(root=str(root), num_test=1, num_labeled=3, crop_size=96, batch_size=4, uratio=2,
                             steps_per_epoch=6, unlabeled_views=["weak", "strong"])
    dm.setup("fit")
    for raw, _, _ in dm.train_dataloader():
        assert torch.equal(raw["labeled"]["image"][:, 0], (raw["labeled"]["target"] * 255).to(torch.uint8))
        weak, strong = raw["unlabeled"]["weak"].float(), raw["unlabeled"]["strong"].float()
        for i in range(len(weak)):  # the strong view is the same crop, photometrically changed
            same = torch.corrcoef(torch.stack([weak[i].flatten(), strong[i].flatten()]))[0, 1]
            other = torch.corrcoef(torch.stack([weak[i].flatten(), weak[i].flip(-1).flatten()]))[0, 1]
            assert same > 0.8 and same > other + 0.2
    # geometry really varies: crops of one image differ across draws (crop position, flips, rotations)
    crops = {tuple(dm.geometry(dm.masks[0][None])[0].flatten()[:64].tolist()) for _ in range(20)}
    assert len(crops) > 5


def test_unlabeled_target_follows_the_views_geometry_or_is_minus_one(membrane, tmp_path):
    # self-masking images again; images 6 and 7 lose their masks and join the unlabeled set
    root = _copy(membrane, tmp_path / "self", range(8), image_from="label")
    for s in (6, 7):
        (root / "label" / f"{s}.png").unlink()
    dm = SegmentationFolders(root=str(root), num_test=1, num_labeled=2, unlabeled_without_mask=True, crop_size=96,
                             batch_size=2, uratio=4, steps_per_epoch=6, unlabeled_views=["weak", "strong"])
    dm.setup("fit")
    without = {dm.stems.index("6"), dm.stems.index("7")}
    assert without <= set(dm.split.unlabeled.tolist()) and len(dm.split.unlabeled) == 5
    seen = set()
    for raw, _, _ in dm.train_dataloader():
        unlabeled = raw["unlabeled"]
        for index, weak, target in zip(unlabeled["index"].tolist(), unlabeled["weak"], unlabeled["target"]):
            seen.add(index in without)
            if index in without:
                assert target.shape == (96, 96) and bool((target == -1).all())
            else:
                assert torch.equal(weak[0], (target * 255).to(torch.uint8))
    assert seen == {True, False}


def test_split_file_written_to_log_dir_and_reused(membrane, tmp_path, one_thread):
    class Tiny(L.LightningModule):
        unlabeled_views = ()

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(1, 2, 1)

        def training_step(self, batch, _):
            assert set(batch) == {"labeled"}
            return F.cross_entropy(self.head(batch["labeled"]["image"]), batch["labeled"]["target"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SegmentationFolders(root=str(membrane), num_labeled=6, seed=3, crop_size=32, batch_size=2, steps_per_epoch=1)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(Tiny(), dm)
    assert dm.split_path == tmp_path / "lightning_logs" / "version_0" / "split.json"
    record = json.loads(dm.split_path.read_text())
    assert len(record["labeled"]) == 6 and set(record["test"]) == {dm.stems[i] for i in dm.split.test.tolist()}
    again = SegmentationFolders(root=str(membrane), seed=99, split_file=str(dm.split_path))
    again.setup("fit")
    assert torch.equal(again.split.labeled, dm.split.labeled) and torch.equal(again.split.test, dm.split.test)


# --- bad input: each a clear error naming the file ---------------------------------------------
def test_image_without_mask(membrane, tmp_path):
    root = _copy(membrane, tmp_path / "tree", range(6))
    (root / "label" / "4.png").unlink()
    with pytest.raises(ValueError, match=r"image .*image/4\.png has no mask .*unlabeled_without_mask=True"):
        SegmentationFolders(root=str(root), num_test=1).setup("fit")
    dm = SegmentationFolders(root=str(root), num_test=1, num_labeled=2, unlabeled_without_mask=True)
    dm.setup("fit")
    assert dm.stems.index("4") in dm.split.unlabeled.tolist() and len(dm.split.unlabeled) == 3


def test_mask_of_another_size_corrupt_image_and_class_out_of_range(membrane, tmp_path):
    from PIL import Image

    root = _copy(membrane, tmp_path / "size", range(4))
    Image.open(membrane / "label" / "2.png").resize((256, 200)).save(root / "label" / "2.png")
    with pytest.raises(ValueError, match=r"mask .*label/2\.png is 200x256 \(HxW\) but its image .*2\.png is 512x512"):
        SegmentationFolders(root=str(root), num_test=1).setup("fit")
    root = _copy(membrane, tmp_path / "corrupt", range(4))
    (root / "image" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot decode image .*image/1\.png"):
        SegmentationFolders(root=str(root), num_test=1).setup("fit")
    root = _copy(membrane, tmp_path / "index", range(4))
    with pytest.raises(ValueError, match=r"mask .*\.png holds class id 255, but num_classes=2 allows 0\.\.1"):
        SegmentationFolders(root=str(root), num_test=1, mask_mode="index", num_classes=2).setup("fit")
    dm = SegmentationFolders(root=str(root), num_test=1, mask_mode="index", num_classes=256)
    dm.setup("fit")
    assert set(torch.unique(dm.masks[0]).tolist()) == {0, 255}


# --- sliding-window inference ------------------------------------------------------------------
def _pointwise(x):
    return torch.cat([x, -2 * x, torch.sin(x)], dim=1)


@pytest.mark.parametrize("size", [(300, 200), (512, 512), (100, 90)])
@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_sliding_window_equals_the_whole_image_output(size, weighting):
    torch.manual_seed(0)
    image = torch.randn(2, 1, *size)
    calls = []
    stitched = sliding_window_inference(lambda t: calls.append(t.shape) or _pointwise(t), image, window=128,
                                        overlap=0.25, num_classes=3, weighting=weighting)
    assert stitched.shape == (2, 3, *size)
    torch.testing.assert_close(stitched, _pointwise(image), atol=1e-5, rtol=1e-5)
    assert all(shape[-2:] == (128, 128) for shape in calls)


def test_sliding_window_on_a_membrane_slice_with_a_convolution(membrane):
    from PIL import Image
    import numpy as np

    image = torch.from_numpy(np.array(Image.open(membrane / "image" / "0.png"))).float()[None, None] / 255
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        full, stitched = conv(image), sliding_window_inference(conv, image, window=256, overlap=0.5)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    # tile borders see zero padding; away from them the stitched logits are the whole-image ones
    assert (stitched - full)[inner].abs().median() < 1e-6
    with pytest.raises(ValueError, match="expected num_classes=3"):
        sliding_window_inference(conv, image, window=256, num_classes=3)

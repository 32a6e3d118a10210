"""DataModules on real data: batch structure, sizes, epoch length, views, split files, bad input."""

import shutil

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import CIFAR10SSL, DigitsSSL, ImageFolderSSL
from lightning_modules import FixMatch, Supervised


def _train_batch(dm, views=("weak", "strong")):
    dm.unlabeled_views = list(views)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    raw, _, _ = next(iter(loader))
    return raw, dm.on_after_batch_transfer(raw, 0), loader


def test_loader_yields_uint8_and_augmentation_gives_float_views():
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=3, steps_per_epoch=5)
    raw, batch, loader = _train_batch(dm)
    assert raw["labeled"]["image"].dtype == torch.uint8 and raw["unlabeled"]["image"].dtype == torch.uint8
    assert batch["labeled"]["image"].shape == (8, 1, 8, 8) and batch["labeled"]["image"].dtype == torch.float32
    assert batch["unlabeled"]["weak"].shape == batch["unlabeled"]["strong"].shape == (24, 1, 8, 8)
    assert not torch.equal(batch["unlabeled"]["weak"], batch["unlabeled"]["strong"])
    # Labeled images come from the labeled split, with their labels.
    train_targets = dm._train[1]
    assert set(raw["labeled"]["index"].tolist()) <= set(dm.split.labeled.tolist())
    assert torch.equal(raw["labeled"]["target"], train_targets[raw["labeled"]["index"]])
    # The epoch is defined in steps, not by the 50 labeled images.
    assert len(loader) == 5 and sum(1 for _ in loader) == 5


def test_epoch_length_in_steps_even_with_few_labels():
    dm = DigitsSSL(num_labeled=10, batch_size=16, uratio=7, steps_per_epoch=40)
    _, _, loader = _train_batch(dm)
    seen = [b["labeled"]["index"] for b, _, _ in loader]
    assert len(seen) == 40
    counts = torch.bincount(torch.cat(seen))
    assert set(torch.nonzero(counts).flatten().tolist()) == set(dm.split.labeled.tolist())
    assert counts[dm.split.labeled].min() == counts[dm.split.labeled].max() == 40 * 16 // 10  # every pass is a permutation


def test_supervised_gets_no_unlabeled_stream_and_views_follow_the_model():
    dm = DigitsSSL(num_labeled=50, batch_size=4, steps_per_epoch=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Supervised(num_classes=10, in_channels=1, network="wrn10_1"), dm)
    assert set(dm.train_dataloader().iterables) == {"labeled"}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(FixMatch(num_classes=10, in_channels=1, network="wrn10_1"), dm)
    assert set(dm.train_dataloader().iterables) == {"labeled", "unlabeled"}
    assert dm.requested_unlabeled_views() == ("weak", "strong")


def test_unlabeled_stream_includes_labeled_images_only_when_asked():
    dm = DigitsSSL(num_labeled=50, include_labeled_in_unlabeled=False)
    dm.setup("fit")
    assert not set(dm.unlabeled_dataset().indices.tolist()) & set(dm.split.labeled.tolist())
    dm = DigitsSSL(num_labeled=50)
    dm.setup("fit")
    assert len(dm.unlabeled_dataset()) == len(dm._train[1])


def test_split_written_to_log_dir_and_reloaded(tmp_path):
    dm = DigitsSSL(num_labeled=30, seed=7, batch_size=4, steps_per_epoch=1)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(FixMatch(num_classes=10, in_channels=1, network="wrn10_1"), dm)
    assert dm.split_path is not None and dm.split_path.parent == tmp_path / "lightning_logs" / "version_0"
    again = DigitsSSL(num_labeled=30, seed=123, split_file=str(dm.split_path))
    again.setup("fit")
    assert torch.equal(again.split.labeled, dm.split.labeled)


def test_image_folder_reads_real_cifar_tree(cifar_folder):
    dm = ImageFolderSSL(root=str(cifar_folder), num_labeled=50, batch_size=4, uratio=2, steps_per_epoch=2)
    assert dm.num_classes == 10 and dm.classes[0] == "airplane"
    raw, batch, _ = _train_batch(dm)
    assert dm._train[0].shape == (200, 3, 32, 32) and dm._train[0].dtype == torch.uint8
    assert batch["unlabeled"]["strong"].shape == (8, 3, 32, 32)
    dm.setup("test")
    assert dm._test[0].shape == (50, 3, 32, 32)



def test_image_folder_predicts_a_folder_decoded_and_resized_like_its_training_images(cifar_folder, tmp_path):
    """predict_root: the same JPEG decodes to the training pixels; a 64x64 copy is resized to 32x32."""
    from PIL import Image

    source = sorted((cifar_folder / "test" / "cat").iterdir())[0]
    (tmp_path / "new" / "big").mkdir(parents=True)
    shutil.copy(source, tmp_path / "new" / "cat.jpg")
    with Image.open(source) as pil:
        pil.resize((64, 64), Image.BICUBIC).save(tmp_path / "new" / "big" / "cat64.png")
    dm = ImageFolderSSL(root=str(cifar_folder), predict_root=str(tmp_path / "new"), eval_batch_size=8)
    dm.setup("predict")
    assert dm._test is None  # the test set is not read to predict a folder
    batch = next(iter(dm.predict_dataloader()))
    assert batch["file"] == ["big/cat64.png", "cat.jpg"] and batch["image"].shape == (2, 3, 32, 32)
    assert batch["target"].tolist() == [-1, -1] and dm.class_names[3] == "cat"
    dm_test = ImageFolderSSL(root=str(cifar_folder))
    dm_test.setup("test")
    files = [p for c in dm_test.classes for p in sorted((cifar_folder / "test" / c).iterdir())]
    assert torch.equal(batch["image"][1], dm_test._test[0][files.index(source)])


# --- bad input: each a clear error naming the problem --------------------------------------
def test_num_labeled_larger_than_data():
    with pytest.raises(ValueError, match="num_labeled=5000 is larger than the training set"):
        DigitsSSL(num_labeled=5000).setup("fit")


def test_per_class_count_that_cannot_be_met(cifar_folder, tmp_path):
    with pytest.raises(ValueError, match="multiple of 10"):
        DigitsSSL(num_labeled=55).setup("fit")
    root = tmp_path / "tree"
    shutil.copytree(cifar_folder, root)
    for f in sorted((root / "train" / "cat").iterdir())[5:]:
        f.unlink()
    with pytest.raises(ValueError, match=r"needs 10 labeled images per class, but class\(es\) \[3\] have only \[5\]"):
        ImageFolderSSL(root=str(root), num_labeled=100).setup("fit")


def test_missing_root_without_download(tmp_path):
    dm = CIFAR10SSL(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match="--data.download true"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        ImageFolderSSL(root=str(tmp_path / "nowhere"))


def test_empty_class_folder(cifar_folder, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(cifar_folder, root)
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"class folder .*train/cat holds no images"):
        ImageFolderSSL(root=str(root), num_labeled=50).setup("fit")


def test_mixed_sizes_and_corrupt_file(cifar_folder, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(cifar_folder, root)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode .*broken.jpg"):
        ImageFolderSSL(root=str(root), num_labeled=50).setup("fit")


def test_single_items_and_batches_agree():
    dm = DigitsSSL(num_labeled=50)
    dm.setup("fit")
    from datamodules import IndexedImages

    ds = IndexedImages(*dm._train, dm.split.labeled)
    batch = ds.__getitems__([3, 7])
    item = ds[7]
    assert item["image"].shape == (1, 8, 8) and torch.equal(batch["image"][1], item["image"])
    assert int(batch["index"][1]) == int(item["index"]) == int(dm.split.labeled[7])


def test_image_folder_decodes_grey_and_resizes_as_pil_and_torchvision(cifar_folder):
    """grayscale + image_size: Pillow's "L" conversion, then torchvision's antialiased bilinear resize."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    dm = ImageFolderSSL(root=str(cifar_folder), grayscale=True, image_size=16)
    dm.setup("test")
    assert dm._test[0].shape == (50, 1, 16, 16) and dm.num_channels == 1
    files = [p for c in dm.classes for p in sorted((cifar_folder / "test" / c).iterdir())]
    for i in (0, 17, 49):
        with Image.open(files[i]) as pil:
            grey = torch.from_numpy(np.asarray(pil.convert("L")).copy())[None]
        want = TF.resize(grey, [16, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert (dm._test[0][i].int() - want.int()).abs().max() <= 1, i

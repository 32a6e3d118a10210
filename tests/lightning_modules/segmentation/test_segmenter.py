"""Segmenter and its semi-supervised variants on the real ISBI membrane slices."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules import SegmentationFolders
from lightning_modules import SegFixMatch, SegMeanTeacher, Segmenter
from lightning_modules.segmentation.losses import SegmentationLoss
from lightning_modules.ssl.pi_model import softmax_mse
from lightning_modules.segmentation.overlays import overlays
from lightning_modules.ssl.losses import confident_pseudo_labels
from tests.ssl_helpers import make_trainer
from tests.wandb_records import config, history, offline_run_dir, run_records, saved_files
from train import cli_main

REPO = Path(__file__).resolve().parents[3]
SMALL = dict(network_kwargs={"encoder_name": "resnet18"}, ema_decay=0.9, log_images=0)


@pytest.fixture()
def membrane(shared_data) -> Path:
    return shared_data / "membrane"


def data(root: Path, **kwargs) -> SegmentationFolders:
    options = dict(num_labeled=6, num_test=2, crop_size=64, batch_size=2, uratio=1, steps_per_epoch=2)
    return SegmentationFolders(root=str(root), **{**options, **kwargs})


def one_batch(model, dm: SegmentationFolders):
    dm.unlabeled_views = list(model.unlabeled_views)
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))  # CombinedLoader yields (batch, batch_idx, loader_idx)
    return dm.on_after_batch_transfer(raw, 0)


@pytest.mark.parametrize("network", ["unet3plus", "refinenet", "lw_refinenet", "Unet"])
def test_every_network_trains_and_tests_with_dataset_level_metrics(membrane, network):
    torch.manual_seed(0)
    model = Segmenter(network=network, **SMALL)
    dm = data(membrane)
    trainer = make_trainer(max_steps=2, limit_test_batches=1)
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    for name in ("test/dice", "test/miou", "test/fwiou", "test/pixel_acc", "test/recall", "test/fg_iou"):
        assert 0.0 <= metrics[name] <= 1.0, name


def test_deep_supervision_loss_averages_every_side_output(membrane):
    torch.manual_seed(0)
    model = Segmenter(network="unet3plus", loss_terms={"ce": 1.0}, **SMALL)
    batch = one_batch(model, data(membrane))
    model.train()
    outputs = model.net(batch["labeled"]["image"])
    assert isinstance(outputs, list) and len(outputs) == 5  # four decoder stages and the deepest encoder map
    expected = sum(F.cross_entropy(o, batch["labeled"]["target"]) for o in outputs) / 5
    torch.testing.assert_close(model.labeled_loss(outputs, batch["labeled"]["target"]), expected)


def test_presence_loss_trains_the_classification_guided_module(membrane):
    model = Segmenter(network="unet3plus", presence_loss_weight=0.5, **{**SMALL, "network_kwargs": {
        "encoder_name": "resnet18", "cgm": True}})
    batch = one_batch(model, data(membrane))
    model.train()
    losses = model.compute_losses(batch)
    present = (batch["labeled"]["target"] > 0).flatten(1).any(1).long()
    torch.testing.assert_close(losses["presence_loss"], F.cross_entropy(model.net.last_presence, present))
    model.total_loss(losses).backward()
    assert all(p.grad is not None for p in model.net.classification_head.parameters())


@pytest.mark.parametrize("concat_forward", [True, False])
def test_presence_loss_scores_the_labeled_images_presence_however_views_are_forwarded(membrane, concat_forward):
    """SegFixMatch forwards labeled, weak and strong views; the presence loss must use the labeled
    images' logits, not those of the last forward (the strong view when views go one by one)."""
    model = SegFixMatch(network="unet3plus", concat_forward=concat_forward, **{**SMALL, "network_kwargs": {
        "encoder_name": "resnet18", "cgm": True}})
    batch = one_batch(model, data(membrane))
    batch["labeled"]["target"][0] = 0  # one labeled crop without foreground: flags (0, 1)
    present = (batch["labeled"]["target"] > 0).flatten(1).any(1).long()
    assert present.tolist() == [0, 1]
    model.train()
    views = [batch["labeled"]["image"], batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]]
    torch.manual_seed(0)  # the same dropout draws in the classification head for both passes
    model.net(torch.cat(views) if concat_forward else views[0])  # the labeled images come first either way
    expected = F.cross_entropy(model.net.last_presence[: len(present)], present)
    torch.manual_seed(0)
    losses = model.compute_losses(batch)
    torch.testing.assert_close(losses["presence_loss"], expected)
    last_view = F.cross_entropy(model.net.last_presence[-len(present):], present)
    assert not torch.allclose(losses["presence_loss"], last_view)  # the strong view's would be another number


def test_segfixmatch_masks_pixels_by_the_confidence_rule(membrane):
    torch.manual_seed(0)
    model = SegFixMatch(network="Unet", threshold=0.6, **SMALL)
    batch = one_batch(model, data(membrane))
    model.eval()  # BatchNorm from running statistics, so the weak view's logits can be recomputed alone
    losses = model.compute_losses(batch)
    with torch.no_grad():
        pseudo_labels, mask = confident_pseudo_labels(model.net(batch["unlabeled"]["weak"]), 0.6)
    assert mask.shape == batch["unlabeled"]["target"].shape  # one decision per pixel
    torch.testing.assert_close(losses["mask_ratio"], mask.mean())
    strong = model.net(batch["unlabeled"]["strong"])
    expected = (F.cross_entropy(strong, pseudo_labels, reduction="none") * mask).mean()
    torch.testing.assert_close(losses["unlabeled_loss"], expected)


def test_segmeanteacher_sends_unlabeled_gradient_to_the_student_only(membrane):
    torch.manual_seed(0)
    model = SegMeanTeacher(network="Unet", rampup_steps=0, **SMALL)
    batch = one_batch(model, data(membrane))
    model.train()
    losses = model.compute_losses(batch)
    losses["unlabeled_loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    assert all(p.grad is None for p in model.ema.module.parameters())


def test_segmeanteacher_with_unet3plus_targets_the_teachers_main_output(membrane):
    """UNet 3+ returns its deep-supervision list in training mode, where the teacher runs by default:
    the target must be the teacher's main output (``AttributeError: 'list' ... detach`` before), and
    its side heads, which nothing uses, must not run."""
    torch.manual_seed(0)
    model = SegMeanTeacher(network="unet3plus", rampup_steps=0, **SMALL)
    assert model.teacher_train_mode
    batch = one_batch(model, data(membrane))
    model.train()
    teacher = copy.deepcopy(model.teacher).train()  # batch statistics, as the teacher's forward uses them
    with torch.no_grad():
        teacher_main = teacher(batch["unlabeled"]["weak"])[0]
    side_head_calls = []
    for head in model.teacher.deep_supervision_heads:
        head.register_forward_hook(lambda *args: side_head_calls.append(1))
    losses = model.compute_losses(batch)
    assert side_head_calls == []
    student_main = model.net(torch.cat([batch["labeled"]["image"], batch["unlabeled"]["weak2"]]))[0]
    expected = softmax_mse(student_main[len(batch["labeled"]["image"]):], torch.softmax(teacher_main, dim=1))
    torch.testing.assert_close(losses["unlabeled_loss"], expected)
    assert isinstance(model.teacher.train()(batch["unlabeled"]["weak"]), list)  # side outputs are back afterwards


def test_segmentation_loss_is_zero_for_a_perfect_prediction_and_the_module_uses_it(membrane):
    model = Segmenter(network="Unet", loss_terms={"hybrid": 1.0}, **SMALL)
    assert isinstance(model.seg_loss, SegmentationLoss)
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[:, 16:48, 16:48] = 1
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert model.seg_loss(perfect, target) < 1e-3 < model.seg_loss(-perfect, target)


def test_overlays_colour_truth_green_prediction_red():
    image = torch.zeros(1, 1, 4, 4)
    image[..., 0, 0] = 1.0
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    prediction = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1, 1], prediction[0, 2, 2] = 1, 1
    out = overlays(image, target, prediction)
    assert out.shape == (1, 3, 4, 4) and out.min() >= 0 and out.max() <= 1
    assert out[0, 1, 1, 1] > out[0, 0, 1, 1]  # truth only: green dominates
    assert out[0, 0, 2, 2] > out[0, 1, 2, 2]  # prediction only: red dominates


def test_segmenter_runs_from_the_cli_with_wandb_offline_overlays(membrane, wandb_offline, one_thread):
    import wandb

    cli = cli_main(["fit", "--model", "Segmenter", "--model.network", "Unet",
                    "--model.network_kwargs", "{encoder_name: resnet18}", "--model.log_images", "2",
                    "--data", "SegmentationFolders", "--data.root", str(membrane), "--data.num_test", "2",
                    "--data.crop_size", "64", "--data.batch_size", "2", "--data.steps_per_epoch", "2",
                    "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                    "--config", str(REPO / "configs" / "loggers" / "wandb.yaml"),
                    "--trainer.logger.init_args.save_dir", str(wandb_offline / "runs"),
                    "--trainer.logger.init_args.offline", "true",
                    "--trainer.logger.init_args.project", "labelwise-tests",
                    "--trainer.enable_progress_bar", "false"])
    assert "test/miou" in cli.trainer.callback_metrics
    assert cli.model.hparams.in_channels == 1 and cli.model.hparams.num_classes == 2  # linked from the data
    iou = [float(cli.trainer.callback_metrics[f"test/iou_class{c}"]) for c in (0, 1)]
    log_dir = Path(cli.trainer.log_dir)
    wandb.finish()

    run_dir = offline_run_dir(wandb_offline / "runs")
    files, records = run_dir / "files", run_records(run_dir)
    logged = history(records)
    # one row from the sanity check, one from the validation epoch; each holds the first validation
    # batch's overlays, and that batch is one whole slice (eval_batch_size 1), though log_images is 2
    rows = logged["val/overlays"]
    assert [(row["_type"], row["count"]) for row in rows] == [("images/separated", 1)] * 2
    pictures = sorted((files / "media" / "images" / "val").glob("overlays_*.png"))
    assert len(pictures) == 2
    for picture in pictures:  # the membrane slice in grey, tinted: not the black of [0, 1] floats cast to uint8
        pixels = torch.from_numpy(np.asarray(Image.open(picture).convert("RGB")))
        assert pixels.shape == (512, 512, 3) and pixels.float().mean() > 50 and pixels.unique().numel() > 100
    assert {name for row in rows for name in row["filenames"]} <= saved_files(records)
    (table,) = logged["test/per_class"]
    per_class = json.loads((files / table["path"]).read_text())
    assert per_class["columns"] == ["class", "iou"]
    assert [row[0] for row in per_class["data"]] == [0, 1]
    assert [row[1] for row in per_class["data"]] == pytest.approx(iou)
    assert "miou" in dict(json.loads((files / logged["test/metrics"][0]["path"]).read_text())["data"])
    assert (files / "split.json").read_bytes() == (log_dir / "split.json").read_bytes()
    assert config(records)["cli"]["model"]["class_path"] == "lightning_modules.Segmenter"
    assert {"config.yaml", "split.json"} <= saved_files(records)

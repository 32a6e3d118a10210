"""Detector and UnbiasedTeacher on real COCO images (coco128), small and from scratch on CPU.

Batches are built here in the format of ``datamodules.COCODetection``: the first coco128 images,
resized to a shorter side of 160 pixels, with their non-crowd boxes and labels remapped to 1..K
over the categories present. Mask R-CNN targets use each box filled as its mask (a rectangle),
not the COCO polygons.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.ops import roi_pool

from lightning_modules.detection.overlays import draw_detections, log_detections
from lightning_modules.detection.networks import MultiScaleRoIMaxPool
from lightning_modules.detection.detector import Detector, detection_metric, map_summary, metric_inputs
from lightning_modules.detection.unbiased_teacher import UnbiasedTeacher, pseudo_labels
from tests.ssl_helpers import make_trainer
from tests.wandb_records import history, offline_run_dir, run_records

SHORT_SIDE = 160
SMALL = dict(network="fasterrcnn_mobilenet_v3_large_fpn", min_size=SHORT_SIDE, max_size=256, log_images=0,
             ema_decay=0.9)
MASK = dict(SMALL, network="maskrcnn_resnet50_fpn")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
LOSS_TERMS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="session")
def coco(shared_data):
    """(images, targets, num_classes) of the first 4 annotated coco128 images."""
    root = shared_data / "coco128"
    if not (root / "annotations" / "instances_train2017.json").exists():
        pytest.skip(f"{root} not found")
    meta = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    annotations: dict[int, list] = {}
    for a in meta["annotations"]:
        if not a["iscrowd"]:
            annotations.setdefault(a["image_id"], []).append(a)
    chosen = [im for im in sorted(meta["images"], key=lambda im: im["id"]) if im["id"] in annotations][:4]
    categories = sorted({a["category_id"] for im in chosen for a in annotations[im["id"]]})
    label_of = {c: i + 1 for i, c in enumerate(categories)}
    images, targets = [], []
    for im in chosen:
        image = decode_image(read_file(str(root / "train2017" / im["file_name"])), mode=ImageReadMode.RGB).float() / 255
        scale = SHORT_SIDE / min(image.shape[1:])
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True)[0].clamp(0, 1)
        boxes = torch.tensor([a["bbox"] for a in annotations[im["id"]]], dtype=torch.float32) * scale
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([label_of[a["category_id"]] for a in annotations[im["id"]]])
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= 2).all(dim=1)  # zero-area boxes raise in the model
        targets.append({"boxes": boxes[keep], "labels": labels[keep], "image_id": torch.tensor(im["id"]),
                        "masks": rectangle_masks(boxes[keep], image.shape[1:])})
        images.append(image)
    return images, targets, len(categories) + 1


def rectangle_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    masks = torch.zeros((len(boxes), *size), dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
        mask[y0:y1, x0:x1] = 1
    return masks


def train_batch(coco, n: int = 2, unlabeled: bool = False) -> dict:
    images, targets, _ = coco
    batch = {"labeled": {"image": images[:n], "target": targets[:n], "index": torch.arange(n)}}
    if unlabeled:  # "strong" is a photometric change of "weak": same geometry
        weak = images[n:2 * n]
        batch["unlabeled"] = {"weak": weak, "strong": [(0.8 * x + 0.1).clamp(0, 1) for x in weak],
                              "target": targets[n:2 * n], "index": torch.arange(n, 2 * n)}
    return batch


def test_faster_rcnn_train_step_gives_every_loss_term_finite(coco, one_thread):
    torch.manual_seed(0)
    model = Detector(num_classes=coco[2], **SMALL).train()
    losses = model.compute_losses(train_batch(coco))
    assert set(losses) == LOSS_TERMS | {"labeled_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["labeled_loss"], sum(losses[k] for k in LOSS_TERMS))
    model.total_loss(losses).backward()
    assert model.net.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_eval_returns_boxes_labels_scores_per_image(coco, one_thread):
    torch.manual_seed(0)
    model = Detector(num_classes=coco[2], roi_heads_kwargs={"score_thresh": 0.0}, **SMALL)
    images = coco[0][:2]
    detections = model.detect(images)
    assert len(detections) == 2 and model.net.training  # detect() restores the mode it found
    for item, image in zip(detections, images):
        assert item["boxes"].shape == (len(item["labels"]), 4) and len(item["boxes"]) > 0
        assert item["labels"].dtype == torch.int64 and (item["labels"] >= 1).all()
        assert ((item["scores"] >= 0) & (item["scores"] <= 1)).all()
        assert (item["boxes"][:, 2] <= image.shape[2]).all() and (item["boxes"][:, 3] <= image.shape[1]).all()


def test_mask_rcnn_trains_its_mask_head_and_predicts_boolean_masks(coco, one_thread):
    torch.manual_seed(0)
    model = Detector(num_classes=coco[2], roi_heads_kwargs={"score_thresh": 0.0}, **MASK).train()
    losses = model.compute_losses(train_batch(coco, n=1))
    assert set(losses) == LOSS_TERMS | {"loss_mask", "labeled_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    image = coco[0][0]
    raw = model.detect([image])[0]
    assert raw["masks"].shape == (len(raw["boxes"]), 1, *image.shape[1:]) and raw["masks"].is_floating_point()
    predicted = model.predict_step({"image": [image], "target": coco[1][:1], "index": torch.arange(1)}, 0)[0]
    assert predicted["masks"].dtype == torch.bool and predicted["masks"].shape[1:] == image.shape[1:]
    assert predicted["image_id"] == coco[1][0]["image_id"]


@pytest.mark.parametrize("roi_pool_kind", ["align", "pool"])
def test_both_roi_poolers_train_and_detect(coco, one_thread, roi_pool_kind):
    torch.manual_seed(0)
    model = Detector(num_classes=coco[2], roi_pool=roi_pool_kind, **SMALL).train()
    pooler = model.net.roi_heads.box_roi_pool
    assert type(pooler).__name__ == {"align": "MultiScaleRoIAlign", "pool": "MultiScaleRoIMaxPool"}[roi_pool_kind]
    losses = model.compute_losses(train_batch(coco, n=1))
    assert torch.isfinite(losses["labeled_loss"])
    assert len(model.detect(coco[0][:1])) == 1


def test_roi_max_pool_pools_each_box_from_its_fpn_level():
    torch.manual_seed(0)
    features = {"0": torch.randn(1, 4, 32, 32), "1": torch.randn(1, 4, 16, 16)}  # strides 4 and 8 of a 128 image
    small, large = torch.tensor([[8.0, 8.0, 28.0, 28.0]]), torch.tensor([[0.0, 0.0, 120.0, 120.0]])
    pooled = MultiScaleRoIMaxPool(["0", "1"], output_size=7)(features, [torch.cat([small, large])], [(128, 128)])
    # FPN rule: floor(4 + log2(sqrt(area) / 224)) -> level 0 (clamped to 2, the finest map) and level 3
    expected_small = roi_pool(features["0"], torch.cat([torch.zeros(1, 1), small], 1), 7, spatial_scale=0.25)
    expected_large = roi_pool(features["1"], torch.cat([torch.zeros(1, 1), large], 1), 7, spatial_scale=0.125)
    torch.testing.assert_close(pooled, torch.cat([expected_small, expected_large]))


@pytest.mark.parametrize("with_masks", [False, True])
def test_map_of_ground_truth_against_itself_is_one(coco, with_masks):
    targets = coco[1]
    metric = detection_metric(with_masks)
    predictions = [dict(t, scores=torch.ones(len(t["boxes"]))) for t in targets]
    metric.update(metric_inputs(predictions, with_masks), metric_inputs(targets, with_masks))
    summary = map_summary(metric.compute(), with_masks)
    labels = {int(label) for t in targets for label in t["labels"]}
    names = ["map", "map_50", "map_75"] + [f"ap_class{c}" for c in labels]
    names += [f"segm_{n}" for n in names] if with_masks else []
    for name in names:
        assert float(summary[name]) == pytest.approx(1.0), name


def test_crowd_regions_in_the_targets_are_not_counted_as_missed(coco):
    targets = coco[1][:1]
    predictions = [dict(targets[0], scores=torch.ones(len(targets[0]["boxes"])))]
    crowd_box = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    with_crowd = [dict(boxes=torch.cat([targets[0]["boxes"], crowd_box]),
                       labels=torch.cat([targets[0]["labels"], targets[0]["labels"][:1]]),
                       iscrowd=torch.tensor([0] * len(targets[0]["boxes"]) + [1]))]
    metric = detection_metric(False)
    metric.update(metric_inputs(predictions, False), metric_inputs(with_crowd, False))
    assert float(metric.compute()["map"]) == pytest.approx(1.0)  # the unmatched crowd box is ignored, as in COCO


def test_unbiased_teacher_defaults_are_the_papers():
    # The authors' configs/coco_supervision/faster_rcnn_R_50_FPN_sup1_run1.yaml lines 32-36: a 2000-step
    # burn-in (a random EMA teacher at threshold 0.7 would label everything background), lambda_u 4, EMA 0.9996.
    hp = UnbiasedTeacher(num_classes=3, **{k: v for k, v in SMALL.items() if k != "ema_decay"}).hparams
    assert (hp.burn_in_steps, hp.score_threshold, hp.unlabeled_loss_weight, hp.ema_decay) == (2000, 0.7, 4.0, 0.9996)
    assert (hp.lr, hp.weight_decay, hp.nesterov) == (0.01, 1e-4, False)  # Detector's: torchvision's reference recipe


def test_pseudo_labels_respect_the_score_threshold(coco, one_thread):
    torch.manual_seed(0)
    model = UnbiasedTeacher(num_classes=coco[2], roi_heads_kwargs={"score_thresh": 0.0}, **SMALL)
    detections = model.teacher.eval()(coco[0][2:4])
    scores = torch.cat([d["scores"] for d in detections])
    threshold = scores.median().item()
    kept = pseudo_labels(detections, threshold)
    assert sum(len(k["boxes"]) for k in kept) == int((scores >= threshold).sum()) > 0
    assert all((k["scores"] >= threshold).all() for k in kept)
    assert all(len(k["boxes"]) == 0 and k["boxes"].shape == (0, 4) for k in pseudo_labels(detections, 1.01))


def test_unbiased_teacher_trains_only_the_student_classifiers_on_pseudo_labels(coco, one_thread):
    torch.manual_seed(0)
    model = UnbiasedTeacher(num_classes=coco[2], score_threshold=0.05, roi_heads_kwargs={"score_thresh": 0.0},
                            burn_in_steps=0, **SMALL).train()
    losses = model.compute_losses(train_batch(coco, unlabeled=True))
    unlabeled_keys = {k for k in losses if k.startswith("unlabeled_")}
    assert unlabeled_keys == {"unlabeled_loss", "unlabeled_loss_classifier", "unlabeled_loss_objectness"}
    torch.testing.assert_close(losses["unlabeled_loss"],
                               losses["unlabeled_loss_classifier"] + losses["unlabeled_loss_objectness"])
    assert losses["pseudo_boxes_per_image"] > 0 and 0 <= losses["pseudo_label_precision"] <= 1
    losses["unlabeled_loss"].backward(retain_graph=True)
    net = model.net
    assert net.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert net.rpn.head.cls_logits.weight.grad.abs().sum() > 0
    assert net.roi_heads.box_predictor.bbox_pred.weight.grad is None  # box regression dropped
    assert net.rpn.head.bbox_pred.weight.grad is None
    model.total_loss(losses).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_images_without_pseudo_boxes_count_as_background_and_burn_in_skips_them(coco, one_thread):
    torch.manual_seed(0)
    model = UnbiasedTeacher(num_classes=coco[2], score_threshold=1.01, burn_in_steps=0, **SMALL).train()
    losses = model.compute_losses(train_batch(coco, unlabeled=True))
    assert losses["pseudo_boxes_per_image"] == 0 and "pseudo_label_precision" not in losses
    assert torch.isfinite(losses["unlabeled_loss"]) and losses["unlabeled_loss"] > 0
    burning_in = UnbiasedTeacher(num_classes=coco[2], burn_in_steps=5, **SMALL).train()
    assert "unlabeled_loss" not in burning_in.compute_losses(train_batch(coco, unlabeled=True))


def test_fit_and_test_through_the_trainer_log_map(coco, one_thread):
    torch.manual_seed(0)
    images, targets, num_classes = coco
    model = UnbiasedTeacher(num_classes=num_classes, score_threshold=0.05, burn_in_steps=1, **SMALL)
    train = [train_batch(coco, n=1, unlabeled=True)] * 2  # step 0 burn-in (supervised), step 1 semi-supervised
    evaluation = [{"image": images[:2], "target": targets[:2], "index": torch.arange(2)}]
    loader = lambda batches: DataLoader(batches, batch_size=None, collate_fn=lambda b: b)  # noqa: E731
    trainer = make_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, loader(train), loader(evaluation))
    assert {"train/loss_classifier", "train/unlabeled_loss", "val/map"} <= set(trainer.logged_metrics)
    assert model.ema.num_updates == 2
    metrics = trainer.test(model, loader(evaluation), verbose=False)[0]
    assert 0.0 <= metrics["test/map"] <= 1.0 and "test/map_50" in metrics
    predictions = trainer.predict(model, loader(evaluation))[0]
    assert len(predictions) == 2 and {"boxes", "labels", "scores", "image_id"} <= set(predictions[0])


def test_anchor_and_head_settings_reach_the_network(coco, one_thread):
    model = Detector(num_classes=coco[2], anchor_sizes=[[16, 48]] * 3, aspect_ratios=[1.0],
                     rpn_kwargs={"pre_nms_top_n_train": 300}, roi_heads_kwargs={"box_detections_per_img": 7},
                     **SMALL).train()
    assert model.net.rpn.head.cls_logits.out_channels == 2  # 2 sizes x 1 ratio per location
    assert model.net.rpn._pre_nms_top_n["training"] == 300 and model.net.roi_heads.detections_per_img == 7
    assert torch.isfinite(model.compute_losses(train_batch(coco, n=1))["labeled_loss"])
    with pytest.raises(ValueError, match="3 feature maps"):
        Detector(num_classes=coco[2], anchor_sizes=[[32]] * 5, **SMALL)


def test_unknown_network_and_foreign_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fasterrcnn_mobilenet_v3_large_fpn"):
        Detector(network="yolo", num_classes=3)
    source = Detector(num_classes=3, **SMALL)
    torch.save(source.net.state_dict(), tmp_path / "mobilenet.pt")
    copy = Detector(num_classes=3, weights_path=str(tmp_path / "mobilenet.pt"), **SMALL)
    torch.testing.assert_close(copy.net.state_dict(), source.net.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        Detector(num_classes=3, weights_path=str(tmp_path / "mobilenet.pt"), **dict(SMALL, network="fasterrcnn_resnet50_fpn"))


def test_drawn_detections_show_true_and_predicted_boxes(coco):
    image, target = coco[0][0], coco[1][0]
    prediction = {"boxes": target["boxes"][:1] + 3, "labels": target["labels"][:1], "scores": torch.tensor([0.9])}
    drawn = draw_detections(image, prediction, target)
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    x0, y0 = target["boxes"][0, :2].long().tolist()
    assert drawn[:, y0, x0 + 3].tolist() == [0, 255, 0]  # lime: the true box's top edge


def test_detections_log_to_an_offline_wandb_run(coco, wandb_offline):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    images, targets = coco[0][:2], coco[1][:2]
    predictions = [{"boxes": t["boxes"][:1] + 3, "labels": t["labels"][:1], "scores": torch.tensor([0.9])}
                   for t in targets]
    logger = WandbLogger(project="labelwise-tests", save_dir=str(wandb_offline), offline=True)
    log_detections(logger, images, predictions, targets, count=2, key="val/detections", step=7)
    wandb.finish()
    run_dir = offline_run_dir(wandb_offline)
    (row,) = history(run_records(run_dir))["val/detections"]
    assert row["_type"] == "images/separated" and row["count"] == 2
    for name, *drawn in zip(row["filenames"], images, predictions, targets):  # the pictures read back as drawn
        picture = decode_image(read_file(str(run_dir / "files" / name)), mode=ImageReadMode.RGB)
        assert torch.equal(picture, draw_detections(*drawn))


def test_mask_rcnn_runs_from_the_cli_on_membrane_cells(shared_data, tmp_path, one_thread):
    from benchmarks.membrane_cells_to_coco import write_membrane_cells_coco
    from train import cli_main

    cells = write_membrane_cells_coco(shared_data / "membrane", tmp_path / "cells")
    config = Path(__file__).resolve().parents[3] / "configs" / "maskrcnn_membrane_cells.yaml"
    cli = cli_main(["fit", "--config", str(config), "--data.root", str(cells), "--data.steps_per_epoch", "1",
                    "--data.batch_size", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                    "--trainer.limit_test_batches", "1", "--model.min_size", "256", "--model.max_size", "256",
                    "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false"])
    metrics = cli.trainer.callback_metrics
    assert cli.model.hparams.num_classes == 2  # background + cell, linked from the COCO json
    assert {"test/map", "test/segm_map"} <= set(metrics)

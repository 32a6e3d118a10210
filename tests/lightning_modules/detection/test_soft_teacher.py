"""SoftTeacher on real coco128 images (the batches of test_detector.py), and its two pieces of arithmetic
against plain-tensor computations that follow the authors' code (microsoft/SoftTeacher,
``ssod/models/soft_teacher.py``) in mmdetection's layout: background in the last class column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import SoftTeacher
from lightning_modules.detection.soft_teacher_losses import (background_weighted_cross_entropy, box_uncertainty,
                                                              jittered_boxes)
from tests.lightning_modules.detection.test_detector import SMALL, coco, train_batch  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
UNLABELED_TERMS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


def test_background_weighted_cross_entropy_matches_reference_soft_teacher_code():
    """``unsup_rcnn_cls_loss`` (lines 224-243): negatives' label weights <- the teacher's background score
    (``_score[:, -1]``), per-proposal weighted CE (mmdet's ``reduction_override="none"``), summed and divided by
    ``max(sum of label weights, 1)``."""
    g = torch.Generator().manual_seed(0)
    num_fg, n = 5, 64
    logits = torch.randn(n, num_fg + 1, generator=g) * 2  # ours: background in column 0
    labels = torch.where(torch.rand(n, generator=g) < 0.75, 0, torch.randint(1, num_fg + 1, (n,), generator=g))
    teacher_logits = torch.randn(n, num_fg + 1, generator=g) * 3
    # the authors' layout: foreground 0..K-1, background K (last)
    cls_score = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
    assigned_label = torch.where(labels == 0, num_fg, labels - 1)
    scores = torch.cat([teacher_logits[:, 1:], teacher_logits[:, :1]], dim=1).softmax(dim=1)
    label_weights = torch.ones(n)
    neg_inds = assigned_label == num_fg
    label_weights[neg_inds] = scores[:, -1][neg_inds]
    reference = (F.cross_entropy(cls_score, assigned_label, reduction="none") * label_weights).sum() \
        / max(label_weights.sum(), 1.0)
    ours = background_weighted_cross_entropy(logits, labels, teacher_logits.softmax(dim=1)[:, 0])
    torch.testing.assert_close(ours, reference)
    assert not torch.isclose(ours, F.cross_entropy(logits, labels))  # the weighting changed the plain mean
    # few, low-weighted proposals: the denominator is at least 1, as max(..., 1.0) there
    tiny = background_weighted_cross_entropy(logits[:2], torch.zeros(2, dtype=torch.long), torch.full((2,), 0.1))
    torch.testing.assert_close(tiny, 0.1 * F.cross_entropy(logits[:2], torch.zeros(2, dtype=torch.long),
                                                           reduction="sum"))


def test_box_jitter_and_reliability_selection_matches_reference_soft_teacher_code():
    """``aug_box`` (lines 464-484), ``compute_uncertainty_with_aug`` (lines 411-462) and the selection of
    ``unsup_rcnn_reg_loss`` (lines 270-276: ``filter_invalid`` keeps ``-mean(unc) > -0.02``)."""
    times, frac, num_fg = 10, 0.06, 3
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0, 0.95], [50.0, 50.0, 50.5, 90.0, 0.7], [0.0, 0.0, 300.0, 200.0, 0.6],
                        [5.0, 5.0, 45.0, 25.0, 0.99]])
    n = len(box)
    # aug_box, written out: the same normal draws as ours (one (times, n, 4) draw from the same generator)
    box_scale = (box[:, 2:4] - box[:, :2]).clamp(min=1)[:, None, :].expand(-1, 2, 2).reshape(-1, 4)
    offset = torch.randn(times, n, 4, generator=torch.Generator().manual_seed(3)) * (box_scale * frac)[None, ...]
    new_box = box.clone()[None, ...].expand(times, n, -1)
    auged = torch.cat([new_box[:, :, :4].clone() + offset, new_box[:, :, 4:]], dim=-1)
    ours = jittered_boxes(box[:, :4], times, frac, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, auged[..., :4])

    # the teacher's refined boxes of the flattened jitters, (times * n, 4 * K) in mmdet's layout; the spread
    # differs per box so that some pass the 0.02 threshold and some do not
    g = torch.Generator().manual_seed(1)
    spread = torch.tensor([0.2, 3.0, 1.0, 0.05])[None, :, None]
    refined_mm = (box[None, :, None, :4] + spread[..., None] * torch.randn(times, n, num_fg, 4, generator=g))
    refined_mm = refined_mm.reshape(times * n, 4 * num_fg)
    label = torch.tensor([0, 2, 1, 2])  # mmdet's class indices 0..K-1
    bboxes = refined_mm.reshape(times, -1, refined_mm.shape[-1])
    box_unc, bboxes = bboxes.std(dim=0), bboxes.mean(dim=0)
    bboxes = bboxes.reshape(n, num_fg, 4)[torch.arange(n), label]
    box_unc = box_unc.reshape(n, num_fg, 4)[torch.arange(n), label]
    wh = (bboxes[:, 2:4] - bboxes[:, :2]).clamp(min=1.0)
    box_unc = box_unc / wh[:, None, :].expand(-1, 2, 2).reshape(-1, 4)
    kept_reference = -box_unc.mean(dim=-1) > -0.02

    # ours: torchvision's layout, class 0 the background (a column that must not be read)
    background = torch.full((times, n, 1, 4), 1e4)
    refined = torch.cat([background, refined_mm.reshape(times, n, num_fg, 4)], dim=2)
    uncertainty = box_uncertainty(refined, label + 1)
    torch.testing.assert_close(uncertainty, box_unc.mean(dim=-1))
    assert torch.equal(uncertainty < 0.02, kept_reference)
    assert 0 < int(kept_reference.sum()) < n


@pytest.fixture()
def student_and_losses(coco, one_thread):
    """A SoftTeacher whose (random) teacher passes its boxes: thresholds at 0.05, every candidate reliable."""
    torch.manual_seed(0)
    model = SoftTeacher(num_classes=coco[2], score_threshold=0.05, box_score_threshold=0.05,
                        box_uncertainty_threshold=10.0, roi_heads_kwargs={"score_thresh": 0.0}, **SMALL).train()
    model.teacher.requires_grad_(True)  # would collect gradients if any path led back to it
    return model, model.compute_losses(train_batch(coco, unlabeled=True))


def test_soft_teacher_trains_every_student_head_and_no_gradient_reaches_the_teacher(student_and_losses):
    model, losses = student_and_losses
    assert {k.removeprefix("unlabeled_") for k in losses if k.startswith("unlabeled_")} == UNLABELED_TERMS | {"loss"}
    torch.testing.assert_close(losses["unlabeled_loss"], sum(losses[f"unlabeled_{k}"] for k in UNLABELED_TERMS))
    assert losses["pseudo_boxes_per_image"] > 0 and losses["reliable_boxes_per_image"] > 0
    assert all(torch.isfinite(v) for v in losses.values())
    losses["unlabeled_loss"].backward(retain_graph=True)
    net = model.net
    for weight in (net.roi_heads.box_predictor.cls_score.weight, net.roi_heads.box_predictor.bbox_pred.weight,
                   net.rpn.head.cls_logits.weight, net.rpn.head.bbox_pred.weight):
        assert weight.grad.abs().sum() > 0  # unlike Unbiased Teacher, the box terms train too
    model.total_loss(losses).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_unreliable_boxes_leave_the_box_regression_untaught(coco, one_thread):
    torch.manual_seed(0)
    model = SoftTeacher(num_classes=coco[2], score_threshold=0.05, box_score_threshold=0.05,
                        box_uncertainty_threshold=0.0, roi_heads_kwargs={"score_thresh": 0.0}, **SMALL).train()
    losses = model.compute_losses(train_batch(coco, unlabeled=True))
    assert losses["reliable_boxes_per_image"] == 0 and losses["pseudo_boxes_per_image"] > 0
    assert losses["unlabeled_loss_box_reg"] == 0  # every proposal is background for the regression
    assert losses["unlabeled_loss_classifier"] > 0


def test_soft_teacher_defaults_are_the_papers():
    # The authors' configs/soft_teacher/base.py lines 242-259: thresholds 0.9 / 0.5, uncertainty 0.02, 10 jitters
    # at 0.06, unsup_weight 4, MeanTeacher momentum 0.999 with warm_up=0 (min(0.999, 1 - 1/(t+1))).
    model = SoftTeacher(num_classes=3, **{k: v for k, v in SMALL.items() if k != "ema_decay"})
    hp = model.hparams
    assert (hp.score_threshold, hp.box_score_threshold, hp.box_uncertainty_threshold) == (0.9, 0.5, 0.02)
    assert (hp.jitter_times, hp.jitter_scale, hp.unlabeled_loss_weight, hp.burn_in_steps) == (10, 0.06, 4.0, 0)
    assert hp.ema_decay == 0.999 and model.ema.current_decay() == 0.0  # the first update copies the student
    model.ema.num_updates = 9
    assert model.ema.current_decay() == pytest.approx(1 - 1 / 10)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="fasterrcnn_"):
        SoftTeacher(num_classes=3, network="maskrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="jitter_times must be >= 2"):
        SoftTeacher(num_classes=3, jitter_times=1, **SMALL)
    with pytest.raises(ValueError, match="box_score_threshold"):
        SoftTeacher(num_classes=3, box_score_threshold=0.95, **SMALL)
    with pytest.raises(ValueError, match="^SoftTeacher needs ema_decay"):  # named as the user wrote it
        SoftTeacher(num_classes=3, **{**SMALL, "ema_decay": None})


def test_cli_fits_and_tests_soft_teacher_on_coco128(shared_data, tmp_path, one_thread):
    from train import cli_main

    cli = cli_main(["fit", "--config", str(REPO / "configs" / "soft_teacher_coco128.yaml"),
                    "--data.root", str(shared_data / "coco128"), "--data.steps_per_epoch", "2",
                    "--data.batch_size", "1", "--data.uratio", "1", "--trainer.max_epochs", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "1",
                    "--model.min_size", "160", "--model.max_size", "256", "--model.log_images", "0",
                    "--model.score_threshold", "0.05", "--model.box_score_threshold", "0.05",
                    "--model.roi_heads_kwargs", "{score_thresh: 0.0, detections_per_img: 20}",
                    "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                    "init_args": {"save_dir": str(tmp_path)}}),
                    "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert isinstance(cli.model, SoftTeacher) and cli.model.ema.num_updates == 2
    assert "test/map" in cli.trainer.callback_metrics
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row.get("train/unlabeled_loss_box_reg")]
    assert len(logged) == 2 and all(float(row["train/reliable_boxes_per_image"]) >= 0 for row in logged)

"""Detection mAP as the Detector logs it: crowded images (the membrane cells, 101-132 cells per
slice) scored on every detection the network keeps, COCO's 100 reported beside, checked against
torchmetrics with pycocotools; per-class AP named by category on coco128."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from benchmarks.membrane_cells_to_coco import write_membrane_cells_coco
from datamodules import COCODetection
from lightning_modules.detection.detector import Detector, detection_metric, map_summary, metric_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning")]
CELLS = dict(network="fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, log_images=0,
             roi_heads_kwargs={"detections_per_img": 300})  # configs/fasterrcnn_membrane_cells.yaml's limit


@pytest.fixture(scope="module")
def cells(shared_data, tmp_path_factory) -> COCODetection:
    """The membrane cells as COCO instances, with the seeded split of the benchmark (5 test slices)."""
    root = write_membrane_cells_coco(shared_data / "membrane", tmp_path_factory.mktemp("cells") / "cells")
    dm = COCODetection(str(root), annotation_file="annotations.json", image_dir="images", num_test=5, masks=True)
    dm.split = dm.draw_split()
    return dm


def test_cells_ground_truth_against_itself_scores_exactly_one(cells):
    model = Detector(**CELLS)
    metric = model.test_map
    assert metric.max_detection_thresholds == [10, 100, 300]
    targets = [cells.target(cells.image_ids[i]) for i in cells.split["test"].tolist()]
    assert max(len(t["boxes"]) for t in targets) > 100  # crowded: COCO's 100 cannot find them all
    predictions = [dict(t, scores=torch.linspace(1.0, 0.5, len(t["boxes"]))) for t in targets]
    metric.update(metric_inputs(predictions, False), metric_inputs(targets, False))
    summary = map_summary(metric.compute(), False, metric.max_detection_thresholds)
    for name in ("map", "map_50", "map_75", "mar_300", "ap_class1"):
        assert float(summary[name]) == 1.0, name
    assert float(summary["map_maxdets100"]) < 1.0 and float(summary["mar_100"]) < 1.0  # COCO's limit, beside


def test_cells_masks_of_ground_truth_against_themselves_score_exactly_one(cells):
    targets = [cells.target(cells.image_ids[i]) for i in cells.split["test"].tolist()[:2]]
    metric = detection_metric(True, max_detections=300)
    predictions = [dict(t, scores=torch.linspace(1.0, 0.5, len(t["boxes"]))) for t in targets]
    metric.update(metric_inputs(predictions, True), metric_inputs(targets, True))
    summary = map_summary(metric.compute(), True, metric.max_detection_thresholds)
    assert float(summary["map"]) == float(summary["segm_map"]) == float(summary["segm_mar_300"]) == 1.0


def test_cells_map_at_both_limits_matches_reference_torchmetrics(cells):
    """Imperfect detections (boxes moved by up to 4 pixels, random scores): our ``map`` is torchmetrics'
    at a 300 limit, ``map_maxdets100``/``mar_100`` its default (COCO's 1, 10, 100) run with the
    pycocotools backend, and our numbers are the same when our metric runs with pycocotools."""
    generator = torch.Generator().manual_seed(0)
    targets = [cells.target(cells.image_ids[i]) for i in cells.split["test"].tolist()]
    predictions = []
    for t in targets:
        shift = torch.randint(-4, 5, t["boxes"].shape, generator=generator).float()
        boxes = (t["boxes"] + shift).clamp(min=0)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        predictions.append({"boxes": boxes, "labels": t["labels"], "scores": torch.rand(len(boxes), generator=generator)})
    ours = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        metric = Detector(**CELLS, map_backend=backend).test_map
        metric.update(metric_inputs(predictions, False), metric_inputs(targets, False))
        ours[backend] = map_summary(metric.compute(), False, metric.max_detection_thresholds)
    reference = {}
    for backend, limits in (("faster_coco_eval", [1, 10, 300]), ("pycocotools", None)):
        metric = MeanAveragePrecision(backend=backend, max_detection_thresholds=limits)
        metric.warn_on_many_detections = False
        metric.update(predictions, metric_inputs(targets, False))
        reference[backend] = metric.compute()
    summary = ours["faster_coco_eval"]
    assert 0.1 < float(summary["map_maxdets100"]) < float(summary["map"]) < 0.9
    assert float(summary["map"]) == pytest.approx(float(reference["faster_coco_eval"]["map"]), abs=1e-6)
    assert float(summary["mar_300"]) == pytest.approx(float(reference["faster_coco_eval"]["mar_300"]), abs=1e-6)
    assert float(summary["map_maxdets100"]) == pytest.approx(float(reference["pycocotools"]["map"]), abs=1e-6)
    assert float(summary["mar_100"]) == pytest.approx(float(reference["pycocotools"]["mar_100"]), abs=1e-6)
    assert summary.keys() == ours["pycocotools"].keys()
    for name, value in summary.items():
        assert float(ours["pycocotools"][name]) == pytest.approx(float(value), abs=1e-6), name


def test_a_detector_keeping_at_most_100_detections_scores_as_coco_does(cells):
    model = Detector(**dict(CELLS, roi_heads_kwargs={"detections_per_img": 100}))
    assert model.test_map.max_detection_thresholds == [1, 10, 100] and not model.test_map.extended_summary


def test_cli_logs_per_class_ap_under_the_category_name_on_coco128(shared_data, tmp_path, one_thread):
    from train import cli_main

    config = Path(__file__).resolve().parents[3] / "configs" / "fasterrcnn_mobilenet_coco128.yaml"
    cli = cli_main(["fit", "--config", str(config), "--data.root", str(shared_data / "coco128"),
                    "--data.steps_per_epoch", "1", "--data.batch_size", "1", "--trainer.max_epochs", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "2",
                    "--model.min_size", "160", "--model.max_size", "256", "--model.log_images", "0",
                    "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    dm, logged = cli.datamodule, set(cli.trainer.callback_metrics)
    tested = [dm.target(dm.image_ids[i]) for i in dm.split["test"][:4].tolist()]  # 2 batches of 2
    names = {dm.class_names[label] for t in tested for label in t["labels"].tolist()}
    assert "person" in names and "test/ap_person" in logged
    expected = {"test/ap_" + name.replace(" ", "_") for name in names}  # coco128's names: letters and spaces
    assert expected <= logged and not [k for k in logged if "class" in k]

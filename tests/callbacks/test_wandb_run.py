"""WandbRun: the config, the split and the test-metric tables of a W&B run, read back from offline runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.wandb_run import metric_tables
from lightning_modules.core.class_keys import class_keys
from lightning_modules.detection.detector import detection_metric, map_summary
from lightning_modules.segmentation.metrics import SegmentationMetrics
from tests.wandb_records import config, history, offline_run_dir, run_records, saved_files
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
WANDB = str(REPO / "configs" / "loggers" / "wandb.yaml")


def test_segmentation_metrics_give_a_per_class_iou_table():
    metrics = SegmentationMetrics(2)
    target = torch.tensor([[[0, 0], [1, 1]]])
    metrics.update(torch.tensor([[[0, 1], [1, 1]]]), target)  # class 0: TP 1, FN 1; class 1: TP 2, FP 1
    logged = {f"test/{k}": v for k, v in metrics.compute().items()} | {"train/loss": torch.tensor(1.0)}
    tables = metric_tables(logged)
    columns, rows = tables["test/per_class"]
    assert columns == ["class", "iou"]
    assert rows == [[0, pytest.approx(1 / 2)], [1, pytest.approx(2 / 3)]]
    columns, rows = tables["test/metrics"]
    assert columns == ["metric", "value"]
    assert [name for name, _ in rows] == ["dice", "fg_dice", "fg_iou", "fwiou", "miou", "pixel_acc", "recall"]
    assert dict(rows)["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_detection_metrics_give_a_per_class_ap_table_with_category_names():
    metric = detection_metric(with_masks=False)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 90.0, 80.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    metric.update([{**target, "scores": torch.tensor([0.9, 0.8])}], [target])  # every box found exactly
    logged = {f"test/{k}": v for k, v in map_summary(metric.compute(), with_masks=False).items()}
    tables = metric_tables(logged, class_names=["background", "person", "bicycle"])
    assert tables["test/per_class"] == (["class", "name", "ap"], [[1, "person", 1.0], [2, "bicycle", 1.0]])
    assert dict(tables["test/metrics"][1])["map"] == 1.0


def test_detection_ap_named_by_category_fills_the_per_class_table():
    """Keys as the Detector logs them with a COCODetection (``ap_<name>``); a category named like an
    overall metric's suffix ("medium") stays apart from ``map_medium``."""
    names = ["background", "traffic light", "medium"]
    metric = detection_metric(with_masks=False)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 90.0, 80.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    metric.update([{**target, "scores": torch.tensor([0.9, 0.8])}], [target])
    summary = map_summary(metric.compute(), with_masks=False, label_keys=class_keys(names))
    logged = {f"test/{k}": v for k, v in summary.items()}
    assert {"test/ap_traffic_light", "test/ap_medium", "test/map_medium"} <= set(logged)
    tables = metric_tables(logged, class_names=names)
    assert tables["test/per_class"] == (["class", "name", "ap"], [[1, "traffic light", 1.0], [2, "medium", 1.0]])
    assert dict(tables["test/metrics"][1])["map_medium"] == 1.0


@pytest.mark.parametrize("recipe", ["supervised_full_cifar10.yaml", "unet_membrane.yaml"])
def test_wandb_fragment_adds_the_logger_and_keeps_the_recipe(recipe, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / recipe), "--config", WANDB, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    recipe_config = yaml.safe_load((REPO / "configs" / recipe).read_text())
    logger = printed["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert logger["init_args"]["project"] == "labelwise" and logger["init_args"]["offline"] is False
    assert printed["model"]["class_path"] == recipe_config["model"]["class_path"]
    for callback in recipe_config["trainer"].get("callbacks", []):  # the recipe's callbacks survive
        assert callback["class_path"] in [c["class_path"] for c in printed["trainer"]["callbacks"]]


def test_digits_fit_and_test_keep_config_split_and_metrics_table_in_the_offline_run(wandb_offline, one_thread):
    import wandb

    cli = cli_main(["fit", "--config", str(REPO / "configs" / "supervised_digits.yaml"), "--config", WANDB,
                    "--data.steps_per_epoch", "2", "--data.batch_size", "8", "--trainer.max_epochs", "1",
                    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.logger.init_args.save_dir", str(wandb_offline / "runs"),
                    "--trainer.logger.init_args.project", "labelwise-tests",
                    "--trainer.logger.init_args.name", "digits-2-steps"])
    run = cli.trainer.logger.experiment
    assert (run.project, run.name) == ("labelwise-tests", "digits-2-steps")  # from the config
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    log_dir = Path(cli.trainer.log_dir)
    wandb.finish()

    run_dir = offline_run_dir(wandb_offline / "runs")
    files, records = run_dir / "files", run_records(run_dir)
    # the config and the split, as copies in the run's files and registered for upload
    assert {"config.yaml", "split.json"} <= saved_files(records)
    assert yaml.safe_load((files / "config.yaml").read_text()) == yaml.safe_load((log_dir / "config.yaml").read_text())
    assert (files / "split.json").read_bytes() == (log_dir / "split.json").read_bytes()
    assert len(json.loads((files / "split.json").read_text())["labeled"]) == 50
    cli_config = config(records)["cli"]
    assert cli_config["model"]["class_path"] == "lightning_modules.Supervised"
    assert cli_config["data"]["init_args"]["steps_per_epoch"] == 2
    # the test-metrics table: logged in the history, its rows in the run's media
    (table,) = history(records)["test/metrics"]
    assert table["_type"] == "table-file"
    logged = json.loads((files / table["path"]).read_text())
    assert logged["columns"] == ["metric", "value"]
    assert dict(logged["data"])["acc"] == pytest.approx(accuracy)
    assert "test/per_class" not in history(records)  # classification logs no per-class values

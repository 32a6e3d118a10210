"""The task is composed, not inherited and switched off (issue 16; docs/design.md, "Tasks").

The core (``core/training_module.py``) imports no task; every module is given its task by ``build_task``;
``Detector`` and ``Segmenter`` carry no classification criterion or accuracy; no class switches a parent's
task off with ``uses_criterion`` / ``supports_rdrop``; and each task logs the names its module logged before
the task was composed (read from ``core/semi_supervised.py``, ``segmenter.py`` and ``detector.py`` at e813bc1).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score

import lightning_modules
from datamodules import DigitsSSL, SegmentationFolders
from lightning_modules import Detector, KDStudent, Segmenter, Supervised
from lightning_modules.classification.task import ClassificationTask
from lightning_modules.core.task import Task
from lightning_modules.core.training_module import TrainingModule
from lightning_modules.detection.task import DetectionTask
from lightning_modules.segmentation.task import SegmentationTask
from tests.lightning_modules.detection.test_detector import SMALL as DETECTOR, coco  # noqa: F401 (fixture)
from tests.ssl_helpers import make_trainer

REPO = Path(__file__).resolve().parents[3]
DIGITS = dict(network="wrn10_1", num_classes=10, in_channels=1, ema_decay=None)
SEGMENTER = dict(network="Unet", network_kwargs={"encoder_name": "resnet18"}, ema_decay=None, log_images=0)
TASKS = ("classification", "segmentation", "detection")


def test_core_imports_no_task_and_no_family():
    imported = set()
    for path in (REPO / "lightning_modules" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_modules."):
                imported.add(node.module.split(".")[1])
    assert imported == {"core"}


def test_no_class_switches_its_task_off_with_flags():
    for name in ("uses_criterion", "supports_rdrop"):
        assert not hasattr(TrainingModule, name)
        assert not [model for model in lightning_modules.MODELS if hasattr(getattr(lightning_modules, model), name)]


def test_detector_and_segmenter_carry_no_classification_criterion_or_accuracy(coco):  # noqa: F811
    detector = Detector(num_classes=coco[2], **DETECTOR)
    segmenter = Segmenter(**SEGMENTER)
    for model, task in ((detector, DetectionTask), (segmenter, SegmentationTask)):
        assert isinstance(model.task, task) and isinstance(model.task, Task)
        assert not hasattr(model, "criterion") and not hasattr(model, "multilabel")
        children = dict(model.named_children())  # (segmentation's pixel accuracy sits inside its metric collection)
        assert not {"criterion", "val_acc", "test_acc", "val_micro_f1", "test_micro_f1"} & set(children)
        assert not [m for m in children.values() if isinstance(m, (MulticlassAccuracy, MultilabelF1Score))]
        assert not [key for key in model.state_dict() if key.startswith("criterion.")]
        assert model.trainable_modules() == [model.net]
    assert detector.task.name == "detection" and segmenter.task.name == "segmentation"


def test_classifiers_are_given_the_classification_task(tmp_path):
    model = Supervised(criterion="online_label_smoothing", **DIGITS)
    assert isinstance(model.task, ClassificationTask) and model.criterion is model.task.criterion
    assert "criterion.soft_labels" in model.state_dict()  # the key checkpoints have always had
    teacher = tmp_path / "teacher.pt"
    torch.save(Supervised(**DIGITS).net.state_dict(), teacher)
    student = KDStudent(teacher=str(teacher), teacher_network="wrn10_1", image_size=8, **DIGITS)
    assert isinstance(student.task, ClassificationTask)  # a classifier: its CE is the criterion, it logs test/acc


def test_retired_arguments_of_old_segmenter_and_detector_checkpoints(coco):  # noqa: F811
    # hyper-parameters of a Segmenter checkpoint written before 2026-12-02 (LightningCLI passes them back)
    model = Segmenter(criterion="ce", criterion_kwargs=None, rdrop_weight=0.0, **SEGMENTER)
    assert "criterion" not in model.hparams and isinstance(model.task, SegmentationTask)
    with pytest.raises(ValueError, match="Segmenter has no criterion"):
        Segmenter(criterion="focal", **SEGMENTER)
    with pytest.raises(ValueError, match="Detector has no rdrop_weight"):
        Detector(num_classes=coco[2], rdrop_weight=1.0, **DETECTOR)


def _logged(trainer, model, dm_or_loader, stage: str) -> set[str]:
    run = trainer.validate if stage == "val" else trainer.test
    return set(run(model, dm_or_loader, verbose=False)[0])


@pytest.mark.parametrize("criterion,names", [("ce", ("loss", "acc")), ("bce", ("loss", "macro_f1", "micro_f1"))])
def test_the_classification_task_logs_what_the_base_logged(criterion, names, one_thread):
    model = Supervised(criterion=criterion, **DIGITS)
    dm = DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=1)
    trainer = make_trainer(limit_val_batches=1, limit_test_batches=1)
    for stage in ("val", "test"):
        expected = {f"{stage}/{name}" for name in names}
        assert set(model.task.logged_names(stage)) == expected
        assert _logged(trainer, model, dm, stage) == expected


def test_the_segmentation_task_logs_what_segmenter_logged(shared_data, one_thread):
    model = Segmenter(**SEGMENTER)
    dm = SegmentationFolders(root=str(shared_data / "membrane"), num_labeled=6, num_test=2, crop_size=64,
                             batch_size=2, steps_per_epoch=1)
    logged = _logged(make_trainer(limit_test_batches=1), model, dm, "test")
    metrics = {"loss", "miou", "fwiou", "dice", "pixel_acc", "recall", "fg_dice", "fg_iou", "iou_class0", "iou_class1"}
    assert logged == {f"test/{name}" for name in metrics}
    assert set(model.task.logged_names("test")) <= logged


def test_the_detection_task_logs_what_detector_logged(coco, one_thread):  # noqa: F811
    images, targets, num_classes = coco
    model = Detector(num_classes=num_classes, **DETECTOR)
    batches = [{"image": images[:2], "target": targets[:2], "index": torch.arange(2)}]
    logged = _logged(make_trainer(), model, DataLoader(batches, batch_size=None, collate_fn=lambda b: b), "test")
    assert set(model.task.logged_names("test")) == {"test/map"} <= logged
    # map_summary's names only (undefined values, -1, are left out): no classification loss or accuracy
    assert not logged & {"test/acc", "test/loss", "test/macro_f1"} and all(name.startswith("test/") for name in logged)

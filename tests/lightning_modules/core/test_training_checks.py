"""The base's checks during fit: a model of another class or channel count than its data is refused
before the first step, and a NaN or infinite loss stops training naming the loss term and the step.

Each method gets real data with one poisoned input or weight, through a real Trainer: the
error must name the term that went non-finite (and not the ones that stayed finite), the step,
and leave the weights as they were before that step (on the CPU the check runs before backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import DigitsSSL, SegmentationFolders
from lightning_modules import Detector, FixMatch, KDStudent, Segmenter, Supervised
from lightning_modules.core.training_checks import FiniteLossCheck, NonFiniteLossError
from tests.lightning_modules.detection import test_detector
from tests.ssl_helpers import SMALL_NET, make_trainer

coco = test_detector.coco  # the fixture: the first coco128 images, small


class PoisonedDigits(DigitsSSL):
    """Real digits whose training batch number ``step`` gets an infinite pixel in ``view``."""

    def __init__(self, view: str, step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison_view, self.poison_step, self.batches = view, step, 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "labeled" in batch:
            if self.batches == self.poison_step:
                part = "labeled" if self.poison_view == "image" else "unlabeled"
                batch[part][self.poison_view][0, 0, 0, 0] = float("inf")
            self.batches += 1
        return batch


def fit_until_error(model, data, max_steps=3) -> str:
    trainer = make_trainer(max_steps=max_steps)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, data)
    return str(info.value)


def all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("model_kwargs, match", [
    (dict(num_classes=5, in_channels=1), "num_classes=5 but DigitsSSL has num_classes=10: build the model with "
                                         "num_classes=10"),
    (dict(num_classes=10, in_channels=3), "in_channels=3 but DigitsSSL has num_channels=1"),
])
def test_a_model_of_another_class_or_channel_count_than_its_data_is_refused(model_kwargs, match):
    model = Supervised(network="wrn10_1", **model_kwargs)
    with pytest.raises(ValueError, match=match):
        make_trainer(max_steps=1).fit(model, DigitsSSL(batch_size=8, steps_per_epoch=1))


def test_nan_weight_names_the_labeled_loss_at_step_0(one_thread):
    torch.manual_seed(0)
    model = Supervised(**SMALL_NET, ema_decay=None)
    with torch.no_grad():
        model.net.fc.weight[0, 0] = float("nan")
    message = fit_until_error(model, DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=3))
    assert "training loss is nan at step 0 (epoch 0)" in message and "labeled_loss=nan" in message
    assert "gradient_clip_val" in message


def test_inf_in_the_strong_view_names_only_the_unlabeled_loss_at_its_step(one_thread):
    torch.manual_seed(0)
    model = FixMatch(**SMALL_NET, concat_forward=False, ema_decay=None)  # one forward per view
    data = PoisonedDigits("strong", step=1, num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    message = fit_until_error(model, data)
    assert "at step 1 (epoch 0)" in message and "unlabeled_loss=nan" in message
    assert "labeled_loss=" not in message.replace("unlabeled_loss=", "")
    assert all_finite(model.net)  # step 1 never reached backward: the step-1 weights are untouched


def test_nan_teacher_names_the_distillation_term(one_thread, tmp_path):
    torch.manual_seed(0)
    teacher = Supervised(**SMALL_NET).net
    with torch.no_grad():
        teacher.fc.bias[3] = float("nan")
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    model = KDStudent(teacher=str(path), teacher_network="wrn10_1", network="wrn10_1", num_classes=10,
                      in_channels=1, image_size=8, ema_decay=None)
    message = fit_until_error(model, DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=3))
    assert "kd_loss=nan" in message and "at step 0" in message
    assert "labeled_loss=" not in message


def test_inf_pixel_in_a_segmentation_batch_names_the_labeled_loss(shared_data, one_thread):
    torch.manual_seed(0)

    class PoisonedMembrane(SegmentationFolders):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            batch = super().on_after_batch_transfer(batch, dataloader_idx)
            if "labeled" in batch:
                batch["labeled"]["image"][0, 0, 5, 5] = float("inf")
            return batch

    model = Segmenter(network="Unet", network_kwargs={"encoder_name": "resnet18"}, ema_decay=None, log_images=0)
    data = PoisonedMembrane(root=str(shared_data / "membrane"), num_labeled=4, num_test=2, crop_size=64,
                            batch_size=2, steps_per_epoch=2)
    message = fit_until_error(model, data)
    assert "labeled_loss=nan" in message and "at step 0" in message


def test_detector_names_the_torchvision_term(coco, one_thread):
    torch.manual_seed(0)
    model = Detector(num_classes=coco[2], **{**test_detector.SMALL, "ema_decay": None})
    with torch.no_grad():
        model.net.roi_heads.box_predictor.cls_score.weight[1, 0] = float("nan")
    loader = DataLoader([test_detector.train_batch(coco, n=1)] * 2, batch_size=None, collate_fn=lambda b: b)
    message = fit_until_error(model, loader)
    assert "loss_classifier=nan" in message and "at step 0" in message
    assert "loss_objectness" not in message  # the RPN terms stayed finite


def test_overflow_of_a_weighted_sum_of_finite_terms_is_named_as_such():
    check = FiniteLossCheck()
    check(torch.tensor(1.5), {"labeled_loss": torch.tensor(1.5)}, step=0, epoch=0)  # finite: no error
    terms = {"labeled_loss": torch.tensor(1.0), "unlabeled_loss": torch.tensor(3e38), "mask_ratio": 0.5}
    with pytest.raises(NonFiniteLossError, match=r"is inf at step 7 \(epoch 2\); every term is finite "
                                                 r"\(labeled_loss, unlabeled_loss\)"):
        check(terms["unlabeled_loss"] * 10, terms, step=7, epoch=2)


def test_a_copy_of_the_check_starts_empty():
    check = FiniteLossCheck()
    check._pending.append(object())  # stands for a CUDA flag still in flight
    assert len(copy.deepcopy(check)._pending) == 0 and len(check._pending) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_check_does_not_wait_for_the_gpu_and_still_names_the_first_bad_step():
    check = FiniteLossCheck()
    big = torch.randn(4096, 4096, device="cuda")
    for step in range(3):
        torch.cuda.synchronize()
        slow = (big @ big).sum() * 0  # a loss the GPU needs milliseconds to finish
        loss = slow + (float("nan") if step == 1 else 1.0)
        check(loss, {"labeled_loss": loss}, step=step, epoch=0)
        if step == 1:
            assert len(check._pending) >= 1  # not read yet: the host did not wait for the GPU
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 0\).*labeled_loss=nan"):
        check.flush()
    assert not check._pending

"""configs/vid_cifar10.yaml's VID term on real CIFAR-10 images stays finite with an off-scale teacher (issue 19).

The timing run of benchmarks/recipe_times.py distilled from a teacher of a few steps: its BatchNorm statistics
were not yet estimated, so in eval mode its group outputs have mean squares in the thousands, and the VID term
with RepDistiller's fixed initial variance 5 (``distiller_zoo/VID.py:16,33-35``) diverged at step 5.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import yaml

from datamodules import ImageFolderSSL
from lightning_modules import KDStudent
from lightning_modules.classification.networks import build_network
from lightning_modules.distillation.probabilistic_losses import VIDRegressor
from tests.ssl_helpers import make_trainer

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "vid_cifar10.yaml"


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.vid, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.vid.append(float(trainer.callback_metrics["train/vid_loss"]))
        self.weights.append(max(float(p.detach().abs().max()) for p in pl_module.net.parameters()))


def test_vid_recipe_steps_stay_finite_with_an_untrained_teacher(cifar_folder, tmp_path):
    torch.manual_seed(0)
    teacher = build_network("wrn40_2", num_classes=10)  # eval-mode BatchNorm with its initial statistics
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    options = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]
    options.update(teacher=str(tmp_path / "teacher.pt"), teacher_network="wrn40_2")
    L.seed_everything(0)
    model = KDStudent(num_classes=10, **options)
    data = ImageFolderSSL(root=str(cifar_folder), num_labeled=None, batch_size=64, steps_per_epoch=6, seed=0)
    recorder = LossRecorder()
    make_trainer(max_steps=6, callbacks=[recorder]).fit(model, data)  # the finite-loss check stops a NaN step
    assert len(recorder.vid) == 6 and all(torch.isfinite(torch.tensor(recorder.vid)))
    assert max(recorder.vid) < 2 * recorder.vid[0]  # no blow-up (the old start: about 1,650, then 2.5e9 at step 4)
    assert max(recorder.weights) < 5.0  # the student's weights stay at their scale (old: 1.7e7 at step 4)
    assert all(bool(head.variance_initialized) for head in model.vid_heads)


def test_initial_variance_is_the_teachers_mean_square_and_survives_a_checkpoint():
    torch.manual_seed(0)
    head = VIDRegressor(8, 6, init_variance=None)
    teacher = 40.0 * torch.randn(4, 6, 5, 5)
    head.initialize_variance_(teacher)
    expected = teacher.pow(2).mean(dim=(0, 2, 3))  # the Gaussian's maximum-likelihood variance for mean 0
    torch.testing.assert_close(head.variance(), expected, rtol=1e-5, atol=1e-3)
    restored = VIDRegressor(8, 6, init_variance=None)
    restored.load_state_dict(head.state_dict())
    assert bool(restored.variance_initialized)
    torch.testing.assert_close(restored.variance(), head.variance())
    assert bool(VIDRegressor(8, 6).variance_initialized)  # a fixed start (RepDistiller's 5) needs no data

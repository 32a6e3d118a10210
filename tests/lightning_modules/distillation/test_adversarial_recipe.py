"""Adversarial KD stays finite at the KD table's learning rate (issue 19), on real digits.

The KD table's row (wrn10_1 from a trained wrn16_2, SGD lr 0.05 with Nesterov momentum) stopped with a NaN loss
at step 43: the discriminator, stepped like the student on raw logits, overshot with a growing swing, and the
student's term, whose gradient grows with the discriminator's slope, blew the student up. The same run on real
digits (the 30-step WRN-16-2 teacher of test_kd_student.py, the student at lr 0.05) shows the same mechanism:
with the old setting (logits at the student's lr) the loss is inf at step 40; with the default (the class
probabilities) the run stays finite and the discriminator's verdicts stay bounded.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks import FGM, PGD
from datamodules import DigitsSSL
from lightning_modules import KDStudent
from lightning_modules.core.training_checks import NonFiniteLossError
from tests.lightning_modules.distillation.test_kd_student import DIGITS, teacher_ckpt  # noqa: F401 (a fixture)
from tests.ssl_helpers import make_trainer

STEPS = 80


class Recorder(L.Callback):
    """Per step: the total loss, the discriminator's largest |logit| on the batch's student and teacher logits,
    and the norm of the student's gradient."""

    def __init__(self) -> None:
        self.losses, self.verdicts, self.gradients = [], [], []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad.norm() for p in module.net.parameters() if p.grad is not None]
        self.gradients.append(float(torch.stack(grads).norm()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        with torch.no_grad():
            images = batch["labeled"]["image"]
            both = torch.cat([module.net(images), module.teacher(images)])
            self.verdicts.append(float(module.discriminator(both).abs().max()))


def fit(teacher: str, tmp_path, **options) -> Recorder:
    L.seed_everything(0)
    model = KDStudent(teacher=teacher, network="wrn10_1", **DIGITS, lr=0.05, adversarial_weight=1.0, **options)
    recorder = Recorder()
    make_trainer(max_steps=STEPS, callbacks=[recorder], default_root_dir=tmp_path).fit(
        model, DigitsSSL(num_labeled=None, batch_size=32, steps_per_epoch=STEPS))
    return recorder


def test_discriminator_on_logits_at_the_students_lr_diverges(teacher_ckpt, tmp_path):  # noqa: F811
    """The mechanism, kept as an option: the discriminator's swing grows until the loss is not finite."""
    with pytest.raises(NonFiniteLossError, match="adversarial_loss"):
        fit(teacher_ckpt, tmp_path, discriminator_input="logits")


def test_adversarial_kd_defaults_stay_finite(teacher_ckpt, tmp_path):  # noqa: F811
    """The defaults (probabilities in, the student's lr) on the same run: finite, bounded, and still learning."""
    recorder = fit(teacher_ckpt, tmp_path)
    assert len(recorder.losses) == STEPS and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert max(recorder.verdicts) < 5.0  # the old setting: 63 at step 20, 3e37 at step 39
    assert max(recorder.gradients) < 20.0
    assert max(recorder.verdicts) > 0.2  # the discriminator is not inert: it tells the two apart somewhat


def test_discriminator_has_its_own_learning_rate_in_the_one_optimizer(teacher_ckpt):  # noqa: F811
    model = KDStudent(teacher=teacher_ckpt, network="wrn10_1", **DIGITS, lr=0.05, adversarial_weight=1.0,
                      discriminator_lr=0.01)
    groups = model.parameter_groups()
    own = {id(p) for p in model.discriminator.parameters()}
    assert {id(p) for g in groups if g.get("lr") == 0.01 for p in g["params"]} == own
    assert all("lr" not in g for g in groups if not own & {id(p) for p in g["params"]})
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for m in model.trainable_modules() for p in m.parameters())  # each once
    optimizer = model.build_optimizer()
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {rates[i] for i in own} == {0.01} and rates[id(next(model.net.parameters()))] == 0.05
    without = KDStudent(teacher=teacher_ckpt, network="wrn10_1", **DIGITS, lr=0.05, adversarial_weight=1.0)
    assert all(g["lr"] == 0.05 for g in without.build_optimizer().param_groups)  # None: the student's lr


@pytest.mark.parametrize("attack", [FGM(["stem"], epsilon=0.5), PGD(["stem"], epsilon=0.5, alpha=0.2, steps=2)],
                         ids=["FGM", "PGD"])
def test_fgm_pgd_and_ema_train_with_the_discriminator(teacher_ckpt, attack, tmp_path):  # noqa: F811
    """The extra passes recompute the one loss, the discriminator's term included, and the run still trains it."""
    L.seed_everything(0)
    model = KDStudent(teacher=teacher_ckpt, network="wrn10_1", **DIGITS, lr=0.05, adversarial_weight=1.0,
                      discriminator_lr=0.01, ema_decay=0.9)
    before = [p.detach().clone() for p in model.discriminator.parameters()]
    trainer = make_trainer(max_steps=4, callbacks=[attack], default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=None, batch_size=32, steps_per_epoch=4))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.discriminator.parameters()))
    assert torch.isfinite(trainer.callback_metrics["train/discriminator_loss"])
    assert model.ema.num_updates == 4  # one EMA update per optimizer step, extra passes or not


@pytest.mark.parametrize("options, message", [
    (dict(discriminator_lr=0.0), "discriminator_lr must be > 0"),
    (dict(discriminator_input="probs"), "discriminator_input must be one of"),
])
def test_bad_discriminator_options_are_refused(teacher_ckpt, options, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        KDStudent(teacher=teacher_ckpt, network="wrn10_1", **DIGITS, adversarial_weight=1.0, **options)

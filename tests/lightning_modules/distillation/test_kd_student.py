"""KDStudent: a frozen teacher from a real checkpoint, loss terms against their formulas, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import KDStudent, Supervised
from lightning_modules.distillation.losses import kd_loss
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer
from train import cli_main

DIGITS = dict(num_classes=10, in_channels=1, network_kwargs={"bn_momentum": 0.1}, image_size=8)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A WRN-16-2 teacher trained for 30 steps on real digits, saved by the Trainer."""
    torch.manual_seed(0)
    teacher = Supervised(**{**SMALL_NET, "network": "wrn16_2"}, ema_decay=0.9, lr=0.1)
    # Module-scoped, so it runs before the per-test chdir into tmp_path: give the Trainer its own
    # root, or its split.json lands in the directory pytest was started from.
    trainer = make_trainer(max_steps=30, default_root_dir=tmp_path_factory.mktemp("teacher_run"))
    trainer.fit(teacher, DigitsSSL(num_labeled=None, batch_size=32, steps_per_epoch=30))
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def student(teacher_ckpt: str, **kwargs) -> KDStudent:
    torch.manual_seed(1)
    return KDStudent(teacher=teacher_ckpt, network="wrn10_1", **{**DIGITS, **kwargs})


def test_teacher_is_the_checkpoints_ema_frozen_and_kept_in_eval(teacher_ckpt):
    model = student(teacher_ckpt)
    stored = torch.load(teacher_ckpt, weights_only=True)["ema"]["module"]
    assert all(torch.equal(v, stored[k]) for k, v in model.teacher.state_dict().items())
    model.train()
    assert not model.teacher.training and model.net.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_losses_match_the_formulas_and_only_the_student_gets_gradient(teacher_ckpt):
    model = student(teacher_ckpt, ce_weight=0.25, kd_weight=0.75, temperature=3.0)
    batch = digits_batch(model)
    model.train()
    losses = model.compute_losses(batch)
    images, targets = batch["labeled"]["image"], batch["labeled"]["target"]
    s, t = model.net(images), model.teacher(images)  # BatchNorm in train mode: same batch statistics
    p_t, log_p_s = torch.softmax(t / 3, dim=1), torch.log_softmax(s / 3, dim=1)
    expected_kd = 9 * (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean()
    torch.testing.assert_close(losses["kd_loss"], expected_kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["labeled_loss"], F.cross_entropy(s, targets), rtol=1e-4, atol=1e-6)
    loss = model.total_loss(losses)
    torch.testing.assert_close(loss, 0.25 * losses["labeled_loss"] + 0.75 * losses["kd_loss"])
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())


def test_fit_moves_the_student_and_never_the_teacher(teacher_ckpt):
    model = student(teacher_ckpt)
    before_teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    before_student = [p.detach().clone() for p in model.net.parameters()]
    make_trainer(max_steps=3).fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3))
    assert all(torch.equal(v, before_teacher[k]) for k, v in model.teacher.state_dict().items())  # BN stats too
    assert all(not torch.equal(a, b) for a, b in zip(before_student, model.net.parameters()))


def test_every_knowledge_kind_together_trains_and_its_connector_is_optimized(teacher_ckpt):
    # student groups.1 is (32, 4, 4) on 8x8 digits, teacher groups.2 is (128, 2, 2): a strided connector
    model = student(teacher_ckpt, hint_layers=[["groups.1", "groups.2"]], at_layers=[["groups.2", "groups.2"]],
                    rkd_distance_weight=25.0, rkd_angle_weight=50.0, sp_weight=3000.0, cskd_weight=1.0,
                    distill_unlabeled=True)
    connector_before = [p.detach().clone() for p in model.connectors.parameters()]
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=8, uratio=2, steps_per_epoch=2))
    logged = trainer.callback_metrics
    for term in ("kd", "hint", "at", "rkd_distance", "rkd_angle", "sp", "cskd"):
        assert torch.isfinite(logged[f"train/{term}_loss"]), term
    assert all(not torch.equal(a, b) for a, b in zip(connector_before, model.connectors.parameters()))


def test_unlabeled_images_join_the_distillation(teacher_ckpt):
    model = student(teacher_ckpt, distill_unlabeled=True)
    batch = digits_batch(model)
    model.eval()  # deterministic BatchNorm, so the formula can be recomputed
    losses = model.compute_losses(batch)
    images = torch.cat([batch["labeled"]["image"], batch["unlabeled"]["weak"]])
    torch.testing.assert_close(losses["kd_loss"], kd_loss(model.net(images), model.teacher(images), 4.0))


def test_self_distillation_from_a_checkpoint_of_the_same_architecture(teacher_ckpt):
    model = KDStudent(teacher=teacher_ckpt, network="wrn16_2", **DIGITS)  # Tf-KD self
    trainer = make_trainer(max_steps=2)
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=2))
    trainer.test(model, DigitsSSL(num_labeled=100, batch_size=16), verbose=False)
    assert 0.0 <= trainer.callback_metrics["test/teacher_acc"] <= 1.0


def test_teacher_of_other_classes_or_architecture_is_a_clear_error(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="num_classes=10, but the student has num_classes=5"):
        KDStudent(teacher=teacher_ckpt, **{**DIGITS, "num_classes": 5})
    with pytest.raises(ValueError, match="holds a 'wrn16_2' network, but teacher_network='wrn28_2'"):
        KDStudent(teacher=teacher_ckpt, teacher_network="wrn28_2", **DIGITS)
    plain = tmp_path / "teacher_state.pt"
    torch.save(Supervised(**SMALL_NET).net.state_dict(), plain)  # a wrn10_1 state_dict
    with pytest.raises(ValueError, match="do not fit a 'wrn16_2' network"):
        KDStudent(teacher=str(plain), teacher_network="wrn16_2", **DIGITS)
    with pytest.raises(ValueError, match="give teacher_network"):
        KDStudent(teacher=str(plain), **DIGITS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KDStudent(teacher=str(tmp_path / "missing.ckpt"), **DIGITS)
    # the right architecture loads from a plain state_dict too
    assert KDStudent(teacher=str(plain), teacher_network="wrn10_1", **DIGITS).teacher is not None


def test_kd_student_runs_from_the_cli(teacher_ckpt, tmp_path):
    cli = cli_main(["fit", "--model", "KDStudent", "--model.teacher", teacher_ckpt, "--model.network", "wrn10_1",
                    "--model.image_size", "8", "--model.hint_layers", "[[groups.2, groups.2]]",
                    "--data", "DigitsSSL", "--data.num_labeled", "100", "--data.batch_size", "16",
                    "--data.steps_per_epoch", "2", "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.log_every_n_steps", "1"])
    metrics = cli.trainer.callback_metrics
    assert "test/acc" in metrics and "test/teacher_acc" in metrics  # test_after_fit ran
    assert "train/hint_loss" in (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]


def test_rdrop_is_refused_with_a_clear_error(tmp_path):
    # KDStudent trains through its own compute_losses, which has no second dropout pass: rdrop_weight
    # used to be accepted and silently ignored.
    plain = tmp_path / "teacher_state.pt"
    torch.save(Supervised(**SMALL_NET).net.state_dict(), plain)
    with pytest.raises(ValueError, match=r"rdrop_weight=1.0 is not possible for KDStudent"):
        KDStudent(teacher=str(plain), teacher_network="wrn10_1", rdrop_weight=1.0, **DIGITS)
    assert KDStudent(teacher=str(plain), teacher_network="wrn10_1", rdrop_weight=0.0, **DIGITS).hparams.rdrop_weight == 0

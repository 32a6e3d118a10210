"""KDStudent with several teachers, adversarial distillation and feature-normalized KD (issue 19), on real digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import KDStudent
from lightning_modules.classification.networks import build_network
from lightning_modules.distillation.teacher_ensemble import TeacherEnsemble
from tests.lightning_modules.distillation.test_kd_student import DIGITS, teacher_ckpt  # noqa: F401 (a fixture)
from tests.ssl_helpers import digits_batch, make_trainer


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> str:
    """A plain state_dict (an untrained WRN-16-2), its classifier scaled so that its confidences spread."""
    torch.manual_seed(5)
    net = build_network("wrn16_2", num_classes=10, in_channels=1)
    with torch.no_grad():
        net.fc.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("second") / "teacher.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def student(teachers, **kwargs) -> KDStudent:
    torch.manual_seed(1)
    return KDStudent(teacher=teachers, network="wrn10_1", **{**DIGITS, "teacher_network": "wrn16_2", **kwargs})


@pytest.mark.parametrize("weighting", ["mean", "max_prob", "entropy"])
def test_multi_teacher_kd_matches_reference_mixture(weighting, teacher_ckpt, second_teacher):  # noqa: F811
    """softmax of the ensemble at T is sum_k w_k softmax(z_k / T); the KD term is T^2 KL(mixture || student)."""
    model = student([teacher_ckpt, second_teacher], teacher_weighting=weighting, temperature=3.0).eval()
    batch = digits_batch(model)
    images = batch["labeled"]["image"]
    losses = model.compute_losses(batch)
    with torch.no_grad():
        z = [teacher(images) for teacher in model.teacher]
        s = model.net(images)
    p = [zk.softmax(dim=1) for zk in z]
    if weighting == "mean":
        w = [torch.full((len(images),), 0.5)] * 2
    elif weighting == "max_prob":  # each teacher's top probability, normalised over the teachers
        top = [pk.max(dim=1).values for pk in p]
        w = [tk / (top[0] + top[1]) for tk in top]
    else:  # exp(-H_k) / sum_j exp(-H_j)
        e = [torch.exp((pk * pk.log()).sum(dim=1)) for pk in p]
        w = [ek / (e[0] + e[1]) for ek in e]
    mixture = w[0][:, None] * (z[0] / 3).softmax(dim=1) + w[1][:, None] * (z[1] / 3).softmax(dim=1)
    torch.testing.assert_close((model.teacher(images) / 3).softmax(dim=1), mixture, rtol=1e-4, atol=1e-6)
    expected = 9 * (mixture * (mixture.log() - (s / 3).log_softmax(dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(losses["kd_loss"], expected, rtol=1e-4, atol=1e-5)
    assert weighting == "mean" or not torch.allclose(w[0], w[0][0].expand_as(w[0]))  # weights differ per sample


def test_several_teachers_train_the_student_never_the_teachers(teacher_ckpt, second_teacher, tmp_path):  # noqa: F811
    # per-teacher feature pairs: the student's last group against each teacher's ("<k>.<path>")
    model = student([teacher_ckpt, second_teacher], teacher_weighting="entropy",
                    at_layers=[["groups.2", "0.groups.2"], ["groups.2", "1.groups.2"]])
    assert isinstance(model.teacher, TeacherEnsemble)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = make_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3))
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.teacher.state_dict().items())  # BatchNorm statistics too
    assert not model.teacher.training
    assert torch.isfinite(trainer.callback_metrics["train/at_loss"])
    keys = model.state_dict().keys()
    assert any(k.startswith("teacher.0.") for k in keys) and any(k.startswith("teacher.1.") for k in keys)


def test_one_teacher_keeps_its_checkpoint_keys(teacher_ckpt):  # noqa: F811
    alone, listed = student(teacher_ckpt), student([teacher_ckpt])
    assert list(alone.state_dict()) == list(listed.state_dict())
    assert any(k.startswith("teacher.groups.") for k in alone.state_dict())


def test_bad_teacher_options_are_clear_errors(teacher_ckpt, second_teacher):  # noqa: F811
    with pytest.raises(ValueError, match="teacher_weighting"):
        student([teacher_ckpt, second_teacher], teacher_weighting="vote")
    with pytest.raises(ValueError, match="one teacher"):
        student([teacher_ckpt, second_teacher], logit_loss="fnkd")
    with pytest.raises(ValueError, match="relation_layer"):
        student(teacher_ckpt, logit_loss="fnkd", relation_layer=["groups.2", "groups.2"])
    with pytest.raises(ValueError, match="adversarial_weight"):
        student(teacher_ckpt, adversarial_weight=-1.0)


def test_fnkd_matches_reference_norm_clipped_heads(teacher_ckpt):  # noqa: F811
    """aztc/FNKD models/symbol_Resnet_cifar.py:258-263: the head on f min(||f||, tau) / ||f||; the loss
    (train_gluon_script_cifar.py:476-496) is the soft cross-entropy of the teacher's on the student's, here as KL."""
    model = student(teacher_ckpt, logit_loss="fnkd", temperature=1.0,
                    logit_loss_kwargs={"feature_norm": 2.0}).eval()
    batch = digits_batch(model)
    images = batch["labeled"]["image"]
    losses = model.compute_losses(batch)
    with torch.no_grad():
        f_s, f_t = model.net.forward_features(images), model.teacher.forward_features(images)

        def clipped(f):
            norm = f.norm(dim=1, keepdim=True)
            return f / norm * torch.minimum(norm, torch.tensor(2.0))

        q_s = model.net.fc(clipped(f_s)).log_softmax(dim=1)
        p_t = model.teacher.fc(clipped(f_t)).softmax(dim=1)
    assert (f_t.norm(dim=1) > 2).any() and (f_s.norm(dim=1) != f_s.norm(dim=1)[0]).any()
    soft_ce, entropy = -(p_t * q_s).sum(dim=1).mean(), -(p_t * p_t.log()).sum(dim=1).mean()
    torch.testing.assert_close(losses["kd_loss"], soft_ce - entropy, rtol=1e-4, atol=1e-6)


def test_adversarial_losses_match_reference_and_reach_only_their_side(teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, adversarial_weight=0.5)
    batch = digits_batch(model)
    model.train()
    losses = model.compute_losses(batch)
    images = torch.cat([batch["labeled"]["image"]])
    first, second, last = (model.discriminator[k] for k in (0, 2, 4))

    def verdict(logits):  # the perceptron written out on the class probabilities (the default input)
        h = F.leaky_relu(F.linear(logits.softmax(dim=1), first.weight, first.bias), 0.2)
        return F.linear(F.leaky_relu(F.linear(h, second.weight, second.bias), 0.2), last.weight, last.bias)

    with torch.no_grad():  # BCE on logits written out: -log sigmoid(real) - log(1 - sigmoid(fake)); -log sigmoid(fake)
        real, fake = verdict(model.teacher(images)), verdict(model.net(images))
        expected_d = -(torch.sigmoid(real).log().mean() + (1 - torch.sigmoid(fake)).log().mean())
        expected_adv = -torch.sigmoid(fake).log().mean()
    torch.testing.assert_close(losses["discriminator_loss"], expected_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["adversarial_loss"], expected_adv, rtol=1e-4, atol=1e-5)
    disc, net = list(model.discriminator.parameters()), list(model.net.parameters())
    from_adv = torch.autograd.grad(losses["adversarial_loss"], disc + net, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_adv[:len(disc)])  # the student's term leaves the discriminator alone
    assert any(g is not None and g.abs().sum() > 0 for g in from_adv[len(disc):])
    from_d = torch.autograd.grad(losses["discriminator_loss"], disc + net, allow_unused=True, retain_graph=True)
    assert all(g is not None for g in from_d[:len(disc)]) and all(g is None for g in from_d[len(disc):])
    model.total_loss(losses).backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # nothing reaches the teacher


def test_adversarial_fit_trains_the_discriminator_with_the_student(teacher_ckpt, tmp_path):  # noqa: F811
    model = student(teacher_ckpt, adversarial_weight=1.0)
    before = [p.detach().clone() for p in model.discriminator.parameters()]
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = make_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.discriminator.parameters()))
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert torch.isfinite(trainer.callback_metrics["train/discriminator_loss"])

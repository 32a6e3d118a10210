"""Mean Teacher against the authors' formulation: the teacher's BatchNorm, the loss, its gradient, the EMA and the ramp."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules.ssl.mean_teacher import MeanTeacher
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer


def _reference_step(student, teacher, batch, weight):
    """One Mean Teacher loss in plain tensor arithmetic, on copies of the two networks.

    Tarvainen & Valpola, NeurIPS 2017, Eq. (1)-(2); CuriousAI/mean-teacher ``pytorch/main.py``: both
    networks in training mode (line 211-212, BatchNorm with the batch's statistics), the student on
    the labeled and unlabeled images in one forward (line 232), the teacher's output detached (line
    244), ``softmax_mse_loss`` (``pytorch/mean_teacher/losses.py`` lines 15-27: squared error of the
    softmaxes summed, divided by the classes and then by the batch). As in TorchSSL
    (``models/meanteacher/meanteacher.py`` lines 118-135) the teacher sees the other view of the
    unlabeled images and the consistency covers the unlabeled images.
    """
    student, teacher = copy.deepcopy(student).train(), copy.deepcopy(teacher).train()
    x, y = batch["labeled"]["image"], batch["labeled"]["target"]
    u_teacher, u_student = batch["unlabeled"]["weak"], batch["unlabeled"]["weak2"]
    logits = student(torch.cat([x, u_student]))
    labeled_logits, student_logits = logits[: len(x)], logits[len(x):]
    with torch.no_grad():
        teacher_logits = teacher(u_teacher)
    classes = student_logits.shape[1]
    supervised = -F.log_softmax(labeled_logits, dim=1).gather(1, y[:, None]).mean()
    consistency = ((F.softmax(student_logits, dim=1) - F.softmax(teacher_logits, dim=1)) ** 2).sum() / classes / len(u_student)
    total = supervised + weight * consistency
    total.backward()
    return {"labeled_loss": supervised, "unlabeled_loss": consistency, "total": total}, student


def test_meanteacher_matches_reference_loss_gradient_and_teacher_mode():
    torch.manual_seed(0)
    model = MeanTeacher(**SMALL_NET, ema_decay=0.9, rampup=None, unlabeled_loss_weight=50.0)
    batch = digits_batch(model, batch_size=16, uratio=2)
    # Move the student away from its EMA, so that teacher and student differ as in training.
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.net(torch.cat([batch["labeled"]["image"], batch["unlabeled"]["weak2"]]))  # and its BatchNorm statistics
    student, teacher = copy.deepcopy(model.net), copy.deepcopy(model.teacher)
    teacher_state = copy.deepcopy(model.teacher.state_dict())
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()
    expected, reference = _reference_step(student, teacher, batch, weight=50.0)
    for key in ("labeled_loss", "unlabeled_loss"):
        assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-5), key
    assert model.total_loss(losses).item() == pytest.approx(expected["total"].item(), rel=1e-5)
    for (name, p), q in zip(model.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    # The teacher's forward leaves no trace: weights, running statistics and mode as they were.
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
    assert not model.teacher.training and all(p.grad is None for p in model.teacher.parameters())


def test_meanteacher_teacher_in_eval_mode_on_request():
    # teacher_train_mode=False: the teacher normalizes with the running statistics it copies from the
    # student (the behaviour before issue 14, which collapsed on digits: docs/results.md).
    torch.manual_seed(0)
    model = MeanTeacher(**SMALL_NET, teacher_train_mode=False, rampup=None)
    batch = digits_batch(model)
    x, u_teacher, u_student = batch["labeled"]["image"], batch["unlabeled"]["weak"], batch["unlabeled"]["weak2"]
    with torch.no_grad():
        teacher = F.softmax(copy.deepcopy(model.teacher).eval()(u_teacher), dim=1)
        student = F.softmax(copy.deepcopy(model.net).train()(torch.cat([x, u_student]))[len(x):], dim=1)
    losses = model.compute_losses(batch)
    assert losses["unlabeled_loss"].item() == pytest.approx(((student - teacher) ** 2).mean().item(), rel=1e-5)


class _Recorder(L.Callback):
    """The student's weights and the logged losses after every optimizer step."""

    def __init__(self):
        self.students, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.students.append([p.detach().clone() for p in pl_module.net.parameters()])
        metrics = trainer.callback_metrics
        self.losses.append({k: metrics[f"train/{k}"].item() for k in ("loss", "labeled_loss", "unlabeled_loss")})


def test_meanteacher_matches_reference_teacher_average_and_ramp():
    # The teacher is the EMA of the student's weights after each step, theta'_t = d theta'_{t-1} +
    # (1 - d) theta_t (paper Eq. 2, main.py lines 189-193 with a fixed decay), and the step's loss is
    # L_s + lambda exp(-5 (1 - t/T)^2) L_u (mean_teacher/ramps.py lines 19-26, with t the step).
    torch.manual_seed(0)
    decay, weight, length, steps = 0.7, 50.0, 4, 5
    model = MeanTeacher(**SMALL_NET, ema_decay=decay, unlabeled_loss_weight=weight, rampup_steps=length)
    teacher = [p.detach().clone() for p in model.net.parameters()]  # theta'_0 = theta_0
    recorder = _Recorder()
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=steps)
    make_trainer(max_steps=steps, callbacks=[recorder]).fit(model, dm)
    assert len(recorder.students) == steps
    for t, (student, logged) in enumerate(zip(recorder.students, recorder.losses)):
        teacher = [decay * a + (1 - decay) * s for a, s in zip(teacher, student)]
        phase = 1.0 - min(t, length) / length
        expected = logged["labeled_loss"] + weight * math.exp(-5.0 * phase * phase) * logged["unlabeled_loss"]
        assert logged["loss"] == pytest.approx(expected, rel=1e-5), t
    for a, b in zip(model.teacher.parameters(), teacher):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""Pseudo-Label, Pi-model, Temporal Ensembling and Mean Teacher: losses, gradient paths, ramps, memory, teacher."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from tests.ssl_helpers import digits_batch as _digits_batch, make_trainer as _trainer
from lightning_modules.ssl.mean_teacher import MeanTeacher
from lightning_modules.ssl.pi_model import PiModel
from lightning_modules.ssl.pseudo_label import PseudoLabel
from lightning_modules.ssl.remixmatch import ReMixMatch
from lightning_modules.ssl.temporal_ensembling import TemporalEnsembling

SMALL = dict(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1})
METHODS = [PseudoLabel, PiModel, TemporalEnsembling, MeanTeacher]


class _LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_a_few_trainer_steps_give_finite_losses(cls):
    torch.manual_seed(0)
    model = cls(**SMALL, threshold=0.0) if cls is PseudoLabel else cls(**SMALL)
    recorder = _LossRecorder()
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=3)
    _trainer(max_epochs=1, callbacks=[recorder]).fit(model, dm)
    assert len(recorder.losses) == 3 and all(math.isfinite(x) for x in recorder.losses)
    assert model.ema.num_updates == 3
    if cls is TemporalEnsembling:
        assert len(model.ensemble) == len(dm.unlabeled_dataset().images)
        assert int(model.update_counts.sum()) == 3 * 8  # one update per sample drawn


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_unlabeled_term_sends_gradient_only_into_the_student(cls):
    torch.manual_seed(0)
    model = cls(**SMALL, threshold=0.0) if cls is PseudoLabel else cls(**SMALL)
    batch = _digits_batch(model)
    if cls is TemporalEnsembling:  # give every drawn sample a past prediction to agree with
        index = batch["unlabeled"]["index"]
        model.update_memory(index, torch.softmax(torch.randn(len(index), 10), dim=1))
        memory_before = model.ensemble.clone()
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    loss = model.compute_losses(batch)["unlabeled_loss"]
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.ema.module.parameters()))
    if cls is TemporalEnsembling:
        assert not model.ensemble.requires_grad and model.ensemble.grad is None
        assert torch.equal(model.ensemble, memory_before)  # the loss itself never writes the memory


def test_mean_teacher_gradient_comes_from_the_student_view_only():
    torch.manual_seed(0)
    model = MeanTeacher(**SMALL, concat_forward=False)
    batch = _digits_batch(model)
    for view in ("weak", "weak2"):
        batch["unlabeled"][view].requires_grad_(True)
    model.compute_losses(batch)["unlabeled_loss"].backward()
    assert batch["unlabeled"]["weak2"].grad.abs().sum() > 0  # student's own forward
    assert batch["unlabeled"]["weak"].grad is None  # teacher, under no_grad


def test_pseudo_label_loss_and_mask_follow_the_confidence_rule():
    model = PseudoLabel(num_classes=3, in_channels=1, network="wrn10_1", threshold=0.9)
    weak = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.2, 0.9], [0.0, 0.0, 4.0], [0.0, 3.0, 0.0]], requires_grad=True)
    # max softmax per row: 0.987, 0.38, 0.964, 0.910 -> rows 0, 2, 3 pass tau = 0.9
    probs = torch.softmax(weak.detach(), dim=1)
    expected_mask = (probs.max(1).values >= 0.9).float()
    assert expected_mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    out = model.unlabeled_loss({"weak": weak}, {"target": torch.tensor([0, 1, 1, -1])})
    expected = sum(-torch.log_softmax(weak.detach()[i], 0)[c] for i, c in [(0, 0), (2, 2), (3, 1)]) / 4
    assert out["unlabeled_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    assert out["pseudo_label_acc"].item() == pytest.approx(0.5)  # row 0 right, row 2 wrong, row 3 unknown
    # The gradient is that of CE towards a fixed target: softmax - onehot on the kept rows only.
    out["unlabeled_loss"].backward()
    onehot = F.one_hot(probs.argmax(1), 3).float()
    torch.testing.assert_close(weak.grad, (probs - onehot) * expected_mask[:, None] / 4)
    with pytest.raises(ValueError, match="threshold"):
        PseudoLabel(threshold=-0.1)


def test_pi_model_loss_is_the_softmax_mse_and_detaches_by_choice():
    a = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    expected = ((torch.softmax(a, 1) - torch.softmax(b, 1)) ** 2).sum() / 6
    model = PiModel(num_classes=3, in_channels=1, network="wrn10_1")
    loss = model.unlabeled_loss({"weak": a, "weak2": b}, {})["unlabeled_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad is None
    both = PiModel(num_classes=3, in_channels=1, network="wrn10_1", detach_target=False)
    both.unlabeled_loss({"weak": a, "weak2": b}, {})["unlabeled_loss"].backward()
    assert b.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, weight, ramp, steps", [
    (PseudoLabel, 1.0, "linear", 419_430),         # TorchSSL pseudolabel.py lines 286, 297
    (PiModel, 10.0, "sigmoid", 419_430),           # TorchSSL pimodel.py lines 286, 297; the paper's ramp shape
    (TemporalEnsembling, 2.4, "sigmoid", 279_620),  # Laine & Aila: 30 * 4000 / 50000 over 80 of 300 epochs
    (MeanTeacher, 50.0, "sigmoid", 419_430),       # TorchSSL meanteacher.py lines 292-293; the paper's ramp shape
    (ReMixMatch, 1.5, "linear", 16_384),           # USB remixmatch_cifar10_4000_0.yaml: 1/64 of 2^20 steps
], ids=lambda v: getattr(v, "__name__", None))
def test_default_weights_and_ramps_are_the_published_recipes(cls, weight, ramp, steps):
    # Explicit in each signature, so the command line gets them too (tests/test_cli.py compares both).
    hp = cls(**SMALL).hparams
    assert (hp.unlabeled_loss_weight, hp.rampup, hp.rampup_steps) == (weight, ramp, steps)


@pytest.mark.parametrize("cls,ramp", [(PseudoLabel, "linear"), (PiModel, "sigmoid"),
                                      (TemporalEnsembling, "sigmoid"), (MeanTeacher, "sigmoid")])
def test_unlabeled_weight_follows_the_ramp(cls, ramp):
    model = cls(num_classes=10, in_channels=1, network="wrn10_1", unlabeled_loss_weight=30.0, rampup_steps=100)
    assert model.hparams.rampup == ramp  # each method's default ramp
    trainer = _trainer(max_steps=1)
    model.trainer = trainer
    curve = {"sigmoid": lambda t: math.exp(-5 * (1 - t) ** 2), "linear": lambda t: t}[ramp]
    for step in (0, 25, 50, 100, 150):
        trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
        assert model.global_step == step
        assert model.unlabeled_weight() == pytest.approx(30.0 * curve(min(step / 100, 1.0)))


def test_temporal_ensemble_updates_only_seen_indices_with_bias_correction():
    model = TemporalEnsembling(num_classes=3, in_channels=1, network="wrn10_1", ensemble_momentum=0.6, memory_size=5)
    assert "ensemble" not in dict(model.named_buffers()) and len(list(model.named_buffers())) == len(list(model.net.buffers()))
    z1 = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    model.update_memory(torch.tensor([1, 3]), z1)
    z2 = torch.tensor([[0.6, 0.2, 0.2]])
    model.update_memory(torch.tensor([1]), z2)
    # by hand: Z1 = 0.4 z1 then Z1 = 0.6 * 0.4 z1 + 0.4 z2; Z3 = 0.4 z1[1]
    torch.testing.assert_close(model.ensemble[1], 0.24 * z1[0] + 0.4 * z2[0])
    torch.testing.assert_close(model.ensemble[3], 0.4 * z1[1])
    assert model.ensemble[[0, 2, 4]].abs().sum() == 0
    assert model.update_counts.tolist() == [0, 2, 0, 1, 0]
    targets, seen = model.ensemble_targets(torch.tensor([1, 3, 0]))
    torch.testing.assert_close(targets[0], (0.24 * z1[0] + 0.4 * z2[0]) / (1 - 0.6**2))
    torch.testing.assert_close(targets[1], z1[1])  # one update: the correction undoes the (1 - alpha)
    assert seen.tolist() == [1.0, 1.0, 0.0]
    # a repeated index in one batch (DDP padding) is one update with the mean prediction
    model.update_memory(torch.tensor([4, 4]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(model.ensemble[4], torch.tensor([0.2, 0.2, 0.0]))
    assert model.update_counts[4] == 1
    # the loss: softmax-MSE against the corrected targets, unseen samples count 0
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    out = model.unlabeled_loss({"weak": logits}, {"index": torch.tensor([1, 3, 0])})
    squared = ((torch.softmax(logits, 1)[:2] - targets[:2]) ** 2).mean(1)
    assert out["unlabeled_loss"].item() == pytest.approx(squared.sum().item() / 3, rel=1e-6)
    # the memory grows when a larger index appears
    model.update_memory(torch.tensor([7]), torch.tensor([[0.0, 0.0, 1.0]]))
    assert len(model.ensemble) == 8 and model.update_counts.tolist() == [0, 2, 0, 1, 1, 0, 0, 1]


def test_temporal_ensemble_memory_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TemporalEnsembling(**SMALL)
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=2)
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "te.ckpt")
    restored = TemporalEnsembling.load_from_checkpoint(tmp_path / "te.ckpt")
    assert torch.equal(restored.ensemble, model.ensemble) and torch.equal(restored.update_counts, model.update_counts)
    assert int(restored.update_counts.sum()) == 16


def test_mean_teacher_teacher_is_the_ema_and_follows_its_formula():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="ema_decay"):
        MeanTeacher(**SMALL, ema_decay=None)
    model = MeanTeacher(**SMALL, ema_decay=0.9)
    assert model.teacher is model.ema.module and not model.teacher.training
    assert all(not n.startswith("ema") for n, _ in model.named_parameters())
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=1)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    _trainer(max_epochs=1).fit(model, dm)
    assert model.ema.num_updates == 1
    for t, t0, s in zip(model.teacher.parameters(), teacher_before, model.net.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    changed = [not torch.equal(t0, s) for t0, s in zip(teacher_before, model.net.parameters())]
    assert any(changed)  # the student moved, so the formula is not trivially true
    # BatchNorm statistics are copied from the student, and the teacher stays in eval mode
    for tb, sb in zip(model.teacher.buffers(), model.net.buffers()):
        assert torch.equal(tb, sb)
    assert not model.teacher.training

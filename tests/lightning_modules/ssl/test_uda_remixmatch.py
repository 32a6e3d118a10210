"""UDA and ReMixMatch: training steps, gradient paths, TSA, confidence mask, distribution alignment, rotation."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from tests.ssl_helpers import digits_batch as _digits_batch, make_trainer as _trainer
from lightning_modules.ssl.remixmatch import ReMixMatch, rotate_batch
from lightning_modules.ssl.uda import UDA, tsa_threshold

NET = dict(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1})


class _Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items()})


# --- both methods -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: UDA(tsa="linear", **NET), lambda: ReMixMatch(**NET)], ids=["uda", "remixmatch"])
def test_a_few_trainer_steps_give_finite_losses(make):
    torch.manual_seed(0)
    model, record = make(), _Record()
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    _trainer(max_epochs=1, callbacks=[record]).fit(model, dm)
    assert len(record.losses) == 3
    for logged in record.losses:
        for key in ("train/loss", "train/labeled_loss", "train/unlabeled_loss"):
            assert math.isfinite(logged[key]), (key, logged)
    assert model.ema.num_updates == 3


@pytest.mark.parametrize("cls", [UDA, ReMixMatch])
def test_unlabeled_loss_sends_gradient_to_the_student_not_the_ema(cls):
    torch.manual_seed(0)
    model = cls(threshold=0.0, **NET) if cls is UDA else cls(**NET)
    batch = _digits_batch(model)
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    model.compute_losses(batch)["unlabeled_loss"].backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.ema.module.parameters()))


# --- UDA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,alpha", [
    ("linear", lambda t: t), ("log", lambda t: 1 - math.exp(-5 * t)), ("exp", lambda t: math.exp(5 * (t - 1)))])
def test_tsa_masks_labeled_examples_above_the_schedule(schedule, alpha, monkeypatch):
    model = UDA(tsa=schedule, num_classes=3, in_channels=1, network="wrn10_1")
    monkeypatch.setattr(UDA, "total_steps", lambda self: 100)
    # correct-class probabilities of the rows: 0.2119, 0.5761, 0.7870, 0.9094, 0.2703
    logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.2, 0.5]])
    targets = torch.tensor([0, 0, 0, 2, 1])
    correct = torch.softmax(logits, 1)[torch.arange(5), targets]
    kept = set()
    for step in (0, 30, 60, 100):
        monkeypatch.setattr(UDA, "global_step", property(lambda self: step))
        eta = alpha(step / 100) * (1 - 1 / 3) + 1 / 3
        assert model.tsa_threshold() == pytest.approx(eta) == pytest.approx(tsa_threshold(schedule, step, 100, 3))
        keep = correct <= eta
        per_example = F.cross_entropy(logits, targets, reduction="none")
        expected = per_example[keep].sum() / max(int(keep.sum()), 1)
        assert model.labeled_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
        assert model._tsa_kept.item() == pytest.approx(keep.float().mean().item())
        kept.add(int(keep.sum()))
    assert len(kept) > 1  # the schedule really moves the mask over the steps tried


def test_tsa_off_is_plain_cross_entropy_and_bad_schedule_is_refused():
    model = UDA(num_classes=3, in_channels=1, network="wrn10_1")
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(model.labeled_loss(logits, targets), F.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="tsa"):
        UDA(tsa="cosine")


def test_uda_mask_and_loss_follow_the_confidence_rule():
    model = UDA(num_classes=3, in_channels=1, network="wrn10_1")  # T = 0.4, tau = 0.8
    weak = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.2, 0.9], [0.0, 0.0, 2.5], [0.0, 1.0, 0.0]])
    strong = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    # untempered max softmax of the weak rows: 0.909, 0.38, 0.859, 0.576 -> rows 0 and 2 pass tau = 0.8
    out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": torch.tensor([0, 1, 1, -1])})
    assert out["mask_ratio"].item() == pytest.approx(0.5)
    q = torch.softmax(weak / 0.4, 1)
    kl = (q * (q.log() - torch.log_softmax(strong, 1))).sum(1)
    assert out["unlabeled_loss"].item() == pytest.approx((kl[0] + kl[2]).item() / 4, rel=1e-6)
    assert out["pseudo_label_acc"].item() == pytest.approx(0.5)  # row 0 right, row 2 wrong
    # the strong view gets gradient, the weak (target) side none
    weak_g, strong_g = weak.clone().requires_grad_(), strong.clone().requires_grad_()
    model.unlabeled_loss({"weak": weak_g, "strong": strong_g}, {"target": torch.zeros(4, dtype=torch.long)})["unlabeled_loss"].backward()
    assert weak_g.grad is None and strong_g.grad[[0, 2]].abs().sum() > 0 and strong_g.grad[[1, 3]].abs().sum() == 0


# --- ReMixMatch -----------------------------------------------------------------------------
def test_distribution_alignment_state_matches_a_hand_computation():
    model = ReMixMatch(num_classes=3, in_channels=1, network="wrn10_1", dist_align_window=2)
    model.da_target.copy_(torch.tensor([0.5, 0.25, 0.25]))
    batches = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
               torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),
               torch.tensor([[0.0, 3.0, 0.0], [0.5, 0.0, 0.0]])]
    means = [torch.softmax(b, 1).mean(0) for b in batches]
    for i, logits in enumerate(batches):
        guess = model.guess_labels(logits)
        model.step_state.commit()  # what the base does after the optimizer step
        p_model = torch.stack(means[max(0, i - 1): i + 1]).mean(0)  # the last two batches, this one included
        torch.testing.assert_close(model.model_marginal(), p_model)
        aligned = torch.softmax(logits, 1) * torch.tensor([0.5, 0.25, 0.25]) / p_model
        aligned = aligned / aligned.sum(1, keepdim=True)
        sharpened = aligned**2 / (aligned**2).sum(1, keepdim=True)  # T = 0.5
        torch.testing.assert_close(guess, sharpened)
        torch.testing.assert_close(guess.sum(1), torch.ones(2))
    assert int(model.da_count) == 3
    torch.testing.assert_close(model.da_history, torch.stack([means[2], means[1]]))  # ring buffer


def test_labeled_marginal_from_the_datamodule_optimizer_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ReMixMatch(**NET)
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=1, steps_per_epoch=2)
    trainer = _trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    counts = torch.bincount(dm._train[1][dm.split.labeled], minlength=10).float()
    torch.testing.assert_close(model.da_target, counts / counts.sum())
    assert int(model.da_count) == 2
    groups = trainer.optimizers[0].param_groups
    optimized = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    head = model.rotation_head  # optimized too, under the same weight-decay rule as the network
    assert optimized[id(head.weight)] > 0 and optimized[id(head.bias)] == 0
    assert len({g["lr"] for g in groups}) == 1 and groups[0]["lr"] < 0.03  # ... on the same schedule
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ReMixMatch.load_from_checkpoint(tmp_path / "m.ckpt")
    assert restored.hparams.dist_align_window == 128 and restored.hparams.unlabeled_loss_weight == 1.5
    for name in ("da_target", "da_history", "da_count"):
        assert torch.equal(getattr(restored, name), getattr(model, name))
    assert torch.equal(restored.rotation_head.weight, model.rotation_head.weight)
    assert ReMixMatch(dist_align_target="uniform", **NET).labeled_class_marginal().sum().item() == pytest.approx(1)


def test_guesses_sum_to_one_on_a_real_batch_and_rotation_sends_gradient_to_its_head():
    torch.manual_seed(0)
    model = ReMixMatch(**NET)
    batch = _digits_batch(model)
    guess = model.guess_labels(model.net(batch["unlabeled"]["weak"]))
    torch.testing.assert_close(guess.sum(1), torch.ones(len(guess)))
    losses = model.compute_losses(batch)
    assert all(torch.isfinite(losses[k]) for k in ("labeled_loss", "unlabeled_loss", "strong_loss", "rotation_loss"))
    losses["rotation_loss"].backward()
    assert model.rotation_head.weight.grad.abs().sum() > 0 and model.rotation_head.bias.grad.abs().sum() > 0
    assert model.net.fc.weight.grad is None or model.net.fc.weight.grad.abs().sum() == 0  # the class head is not used
    assert sum(p.grad.abs().sum() for p in model.net.groups.parameters() if p.grad is not None) > 0


def test_remixmatch_guess_leaves_batchnorm_statistics_and_the_step_moves_them_once():
    """The label guess runs without touching BatchNorm's running statistics (USB remixmatch.py lines
    120-130 freeze them); the step's one concatenated training forward moves them once."""
    torch.manual_seed(0)
    model = ReMixMatch(**NET)
    batch = _digits_batch(model, uratio=1)
    bns = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    reference = copy.deepcopy(model.net)
    torch.manual_seed(1)
    model.compute_losses(batch)
    assert all(int(m.num_batches_tracked) == 1 for m in bns)  # the guess forward counted no batch
    # The same step's training rows (same draws: lam, permutation, rotations) through the copy, once.
    x, (weak, strong, strong2) = batch["labeled"]["image"], (batch["unlabeled"][v] for v in ("weak", "strong", "strong2"))
    inputs = torch.cat([x, strong, strong2, weak])
    torch.manual_seed(1)
    lam = torch.distributions.Beta(torch.tensor(0.75), torch.tensor(0.75)).sample()
    lam, perm = torch.maximum(lam, 1 - lam), torch.randperm(len(inputs))
    rotations = torch.randint(0, 4, (len(strong),))
    rotated = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(strong, rotations)])
    with torch.no_grad():
        reference.forward_features(torch.cat([lam * inputs + (1 - lam) * inputs[perm], strong, rotated]))
    for a, b in zip(reference.buffers(), model.net.buffers()):
        torch.testing.assert_close(a, b)


def test_rotation_helper_and_networks_without_features():
    images = torch.arange(8.0).view(2, 1, 2, 2)
    rotated = rotate_batch(images, torch.tensor([0, 1]))
    assert torch.equal(rotated[0], images[0]) and torch.equal(rotated[1], torch.rot90(images[1], 1, dims=(-2, -1)))
    with pytest.raises(ValueError, match="forward_features"):
        ReMixMatch(num_classes=10, in_channels=3, network="resnet18")
    model = ReMixMatch(num_classes=10, in_channels=3, network="resnet18", rotation_loss_weight=0)
    assert model.rotation_head is None

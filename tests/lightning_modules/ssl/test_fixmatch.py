"""FixMatch and the semi-supervised base: loss formula, gradient paths, EMA evaluation, checkpoints."""

import math

import pytest
import torch

from datamodules import DigitsSSL
from tests.ssl_helpers import digits_batch as _digits_batch, make_trainer as _trainer
from lightning_modules import FixMatch, Supervised
from lightning_modules.core.optimization import cosine_with_warmup
from lightning_modules.ssl.losses import confident_pseudo_labels, masked_cross_entropy


def test_unlabeled_loss_matches_formula_on_hand_checked_tensors():
    model = FixMatch(num_classes=3, in_channels=1, network="wrn10_1", threshold=0.9)
    weak = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.2, 0.9], [0.0, 0.0, 4.0], [0.0, 3.0, 0.0]])
    strong = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    # max softmax of the weak rows: 0.987, 0.38, 0.964, 0.910 -> rows 0, 2, 3 pass tau = 0.9
    out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": torch.tensor([0, 1, 1, -1])})
    expected = sum(-torch.log_softmax(strong[i], 0)[c] for i, c in [(0, 0), (2, 2), (3, 1)]) / 4
    assert out["unlabeled_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    # Pseudo-label accuracy counts confident rows with a known target: row 0 right, row 2 wrong.
    assert out["pseudo_label_acc"].item() == pytest.approx(0.5)


def test_pseudo_labels_are_per_pixel_ready_and_detached():
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels, mask = confident_pseudo_labels(logits, threshold=0.5)
    assert labels.shape == mask.shape == (2, 5, 5) and not mask.requires_grad
    loss = masked_cross_entropy(torch.randn(2, 4, 5, 5), labels, mask)
    assert loss.ndim == 0


def test_unlabeled_loss_sends_gradient_to_the_student_only_through_the_strong_view():
    torch.manual_seed(0)
    model = FixMatch(num_classes=10, in_channels=1, network="wrn10_1", threshold=0.0, concat_forward=False)
    batch = _digits_batch(model)
    batch["unlabeled"]["weak"].requires_grad_(True)
    batch["unlabeled"]["strong"].requires_grad_(True)
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    model.compute_losses(batch)["unlabeled_loss"].backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.ema.module.parameters()))
    assert batch["unlabeled"]["strong"].grad.abs().sum() > 0
    assert batch["unlabeled"]["weak"].grad is None or batch["unlabeled"]["weak"].grad.abs().sum() == 0


def test_ema_is_not_a_submodule_and_tracks_the_student(tmp_path):
    model = FixMatch(num_classes=10, in_channels=1, network="wrn10_1", ema_decay=0.9)
    assert all(not n.startswith("ema") for n, _ in model.named_parameters())
    initial = [p.clone() for p in model.net.parameters()]
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = _trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert model.ema.num_updates == 3
    # After 3 updates every EMA weight lies between the initial and the current weights' span.
    for e, p0, p in zip(model.ema.module.parameters(), initial, model.net.parameters()):
        assert not torch.equal(e, p)
    # Checkpoints carry the EMA weights, and loading restores them exactly.
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = FixMatch.load_from_checkpoint(tmp_path / "m.ckpt")
    for a, b in zip(restored.ema.module.state_dict().values(), model.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert restored.ema.num_updates == 3


def test_validation_and_test_use_the_ema_weights():
    model = Supervised(num_classes=10, in_channels=1, network="wrn10_1", ema_decay=0.99)
    with torch.no_grad():  # make the two sets of weights predict differently
        for p in model.ema.module.parameters():
            p.add_(torch.randn_like(p))
    dm = DigitsSSL(num_labeled=50)
    result = _trainer().test(model, dm, verbose=False)[0]["test/acc"]
    images, targets = dm._test
    with torch.no_grad():
        logits = model.ema.module(dm.to_float(images))
        raw = model.net.eval()(dm.to_float(images))
    assert result == pytest.approx((logits.argmax(1) == targets).float().mean().item(), abs=1e-6)
    assert not torch.equal(logits.argmax(1), raw.argmax(1))


def test_cosine_schedule_and_weight_decay_groups():
    assert cosine_with_warmup(0, 100) == 1.0
    assert cosine_with_warmup(100, 100) == pytest.approx(math.cos(7 * math.pi / 16))
    assert cosine_with_warmup(4, 100, warmup=10) == pytest.approx(0.5)
    model = FixMatch(num_classes=10, in_channels=1, network="wrn10_1")
    trainer = _trainer(max_steps=10)
    model.trainer = trainer
    config = model.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert config["optimizer"].defaults["nesterov"]


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        FixMatch(threshold=1.5)


def test_shared_pieces_against_their_formulas():
    from lightning_modules.core.optimization import linear_rampup, sigmoid_rampup
    from lightning_modules.ssl.losses import distribution_alignment, mixup, sharpen

    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5)) and sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(20, 10) == 1.0 and linear_rampup(3, 10) == pytest.approx(0.3)
    p = torch.tensor([[0.6, 0.3, 0.1]])
    expected = p**2 / (p**2).sum()
    torch.testing.assert_close(sharpen(p, 0.5), expected)
    x, y = torch.arange(8.0).view(4, 2), torch.eye(4)
    mixed_x, mixed_y, lam = mixup(x, y, alpha=0.75, generator=torch.Generator().manual_seed(0))
    assert 0.5 <= lam <= 1 and torch.allclose(mixed_y.sum(1), torch.ones(4))
    aligned = distribution_alignment(p, torch.tensor([0.5, 0.25, 0.25]), torch.tensor([1 / 3] * 3))
    torch.testing.assert_close(aligned, (p * torch.tensor([2 / 3, 4 / 3, 4 / 3])) / (p * torch.tensor([2 / 3, 4 / 3, 4 / 3])).sum())


def test_unlabeled_weight_follows_the_ramp():
    model = FixMatch(num_classes=10, in_channels=1, network="wrn10_1", unlabeled_loss_weight=2.0,
                     rampup="sigmoid", rampup_steps=100)
    assert model.unlabeled_weight() == pytest.approx(2.0 * math.exp(-5))  # global_step 0 without a trainer
    with pytest.raises(ValueError, match="rampup"):
        FixMatch(rampup="cosine")

"""VAT and MixMatch: training runs, gradient paths, VAT's perturbation and BatchNorm, MixMatch's guess and mix."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from tests.ssl_helpers import digits_batch as _digits_batch, make_trainer as _trainer
from lightning_modules.core.batch_norm import frozen_buffers
from lightning_modules.ssl.mixmatch import MixMatch
from lightning_modules.ssl.vat import VAT

SMALL = dict(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1})


def _buffers(module):
    return [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("cls, weight", [(VAT, 0.3), (MixMatch, 75.0)])
def test_a_few_trainer_steps_give_finite_losses_and_the_weight_follows_the_linear_ramp(cls, weight):
    torch.manual_seed(0)
    model = cls(**SMALL, rampup_steps=10)
    assert model.unlabeled_weight() == 0.0  # linear ramp from 0 at step 0
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = _trainer(max_steps=3)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for key in ("train/labeled_loss", "train/unlabeled_loss", "train/loss"):
        assert math.isfinite(metrics[key].item()), key
    assert metrics["train/unlabeled_loss"].item() > 0
    assert model.global_step == 3
    assert model.unlabeled_weight() == pytest.approx(weight * 3 / 10)


def test_default_weights_and_ramps_are_the_published_ones():
    vat, mixmatch = VAT(**SMALL), MixMatch(**SMALL)
    assert (vat.hparams.unlabeled_loss_weight, vat.hparams.rampup, vat.hparams.rampup_steps) == (0.3, "linear", 419_430)
    assert (vat.eps, vat.xi, vat.power_iterations, vat.entropy_weight) == (6.0, 1e-6, 1, 0.06)
    assert (mixmatch.hparams.unlabeled_loss_weight, mixmatch.hparams.rampup, mixmatch.hparams.rampup_steps) == (75.0, "linear", 16_384)
    assert (mixmatch.temperature, mixmatch.mixup_alpha, mixmatch.unlabeled_views) == (0.5, 0.75, ("weak", "weak2"))


@pytest.mark.parametrize("cls", [VAT, MixMatch])
def test_unlabeled_loss_sends_gradient_to_the_student_and_none_to_the_ema(cls):
    torch.manual_seed(0)
    model = cls(**SMALL)
    batch = _digits_batch(model)
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    model.compute_losses(batch)["unlabeled_loss"].backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.ema.module.parameters()))


def test_vat_perturbation_has_norm_eps_per_sample_and_is_adversarial():
    torch.manual_seed(0)
    model = VAT(**SMALL, eps=0.5)
    batch = _digits_batch(model)
    losses = model.compute_losses(batch)
    norms = model.last_perturbation_norm
    assert norms.shape == (len(batch["unlabeled"]["weak"]),)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5), rtol=1e-4, atol=0)
    assert losses["perturbation_norm"].item() == pytest.approx(0.5, rel=1e-4)
    # The power-iteration direction moves the prediction more than random directions of the same norm.
    images = batch["unlabeled"]["weak"]
    with torch.no_grad(), frozen_buffers(model.net):
        clean = model.net(images)
        r_adv = model.adversarial_perturbation(images, clean)
        kl = lambda r: F.kl_div(F.log_softmax(model.net(images + r), 1), F.log_softmax(clean, 1),
                                reduction="batchmean", log_target=True).item()
        randoms = []
        for _ in range(5):
            r = torch.randn_like(images)
            randoms.append(kl(0.5 * r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1)))
    assert kl(r_adv) > max(randoms)


def test_vat_adversarial_passes_leave_batchnorm_running_stats_alone():
    torch.manual_seed(0)
    model = VAT(**SMALL)
    batch = _digits_batch(model)
    labeled, weak = batch["labeled"]["image"], batch["unlabeled"]["weak"]
    # Alone, the adversarial part (power iteration + perturbed forward) changes no buffer.
    with torch.no_grad():
        clean_logits = model.net(weak)
    before = _buffers(model.net)
    model.unlabeled_loss({"weak": clean_logits}, batch["unlabeled"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.net.buffers()))
    # The whole step moves the statistics exactly as one forward of the labeled batch alone does (USB, TorchSSL).
    reference = copy.deepcopy(model.net)
    with torch.no_grad():
        reference(labeled)
    model.compute_losses(batch)
    for a, b in zip(reference.buffers(), model.net.buffers()):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.net.buffers()))


def test_vat_entropy_term_is_added_unramped():
    torch.manual_seed(0)
    model = VAT(**SMALL, entropy_weight=0.5, rampup_steps=10)
    losses = {"labeled_loss": torch.tensor(1.0), "unlabeled_loss": torch.tensor(2.0), "entropy": torch.tensor(3.0)}
    assert model.total_loss(losses).item() == pytest.approx(1.0 + 0.0 * 2.0 + 0.5 * 3.0)
    assert VAT(**SMALL, entropy_weight=0.0, rampup=None).total_loss(losses).item() == pytest.approx(1.0 + 0.3 * 2.0)


def test_mixmatch_guess_is_the_sharpened_mean_over_views_without_gradient_or_bn_update():
    torch.manual_seed(0)
    model = MixMatch(**SMALL)
    batch = _digits_batch(model)
    views = [batch["unlabeled"]["weak"], batch["unlabeled"]["weak2"]]
    before = _buffers(model.net)
    guess = model.guess_labels(views)
    assert all(torch.equal(a, b) for a, b in zip(before, model.net.buffers()))
    assert not guess.requires_grad
    with torch.no_grad():  # by hand: one concatenated forward in training mode, mean, square, renormalize
        logits = copy.deepcopy(model.net)(torch.cat(views)).split([len(v) for v in views])
        mean = (torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2
        expected = mean**2 / (mean**2).sum(1, keepdim=True)
    torch.testing.assert_close(guess, expected)
    torch.testing.assert_close(guess.sum(1), torch.ones(len(guess)))
    assert (guess.max(1).values >= mean.max(1).values - 1e-6).all()  # sharper than the mean


def test_mixmatch_mix_keeps_the_labeled_and_unlabeled_split():
    torch.manual_seed(0)
    model = MixMatch(**SMALL)
    batch = _digits_batch(model, batch_size=8, uratio=2)
    labeled = batch["labeled"]
    mixed = model.mix(labeled, batch["unlabeled"])
    assert mixed["split"] == (8, 2 * 16)
    assert mixed["inputs"].shape[0] == mixed["targets"].shape[0] == 8 + 32
    assert not mixed["targets"].requires_grad
    torch.testing.assert_close(mixed["targets"].sum(1), torch.ones(40))
    lam = mixed["lam"].item()
    assert 0.5 <= lam <= 1.0
    # Row b of X' keeps at least lam' of its own labeled sample: the labeled rows stay in place.
    own = mixed["targets"][:8].gather(1, labeled["target"].view(-1, 1)).squeeze(1)
    assert (own >= lam - 1e-6).all()
    losses = model.compute_losses(batch)
    assert model.last_split == (8, 32)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert 0.5 <= losses["mixup_lambda"].item() <= 1.0


def test_mixmatch_separate_forwards_work_too():
    torch.manual_seed(0)
    model = MixMatch(**SMALL, concat_forward=False)
    losses = model.compute_losses(_digits_batch(model))
    assert torch.isfinite(losses["labeled_loss"]) and torch.isfinite(losses["unlabeled_loss"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="eps"):
        VAT(eps=0.0)
    with pytest.raises(ValueError, match="power_iterations"):
        VAT(power_iterations=0)
    with pytest.raises(ValueError, match="temperature"):
        MixMatch(temperature=0.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        MixMatch(mixup_alpha=-1.0)

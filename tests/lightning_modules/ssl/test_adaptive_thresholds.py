"""FlexMatch, FreeMatch and SoftMatch: state formulas by hand, gradient paths, training, checkpoints."""

import math

import pytest
import torch

from datamodules import DigitsSSL
from tests.ssl_helpers import digits_batch, make_trainer as _trainer
from lightning_modules.ssl.flexmatch import FlexMatch
from lightning_modules.ssl.freematch import FreeMatch
from lightning_modules.ssl.softmatch import SoftMatch
from lightning_modules.ssl.threshold_state import write_last_

NET = dict(network="wrn10_1", network_kwargs={"bn_momentum": 0.1})
STATE = {FlexMatch: ("memory",), FreeMatch: ("global_threshold", "class_model", "label_hist"),
         SoftMatch: ("conf_mean", "conf_var", "prob_mean")}
# max softmax 0.987 (class 0), 0.964 (class 2), 0.367 (class 0), 0.910 (class 1)
WEAK = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 4.0], [1.0, 0.9, 0.8], [0.0, 3.0, 0.0]])
STRONG = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
TARGET = torch.tensor([0, 2, 1, -1])


def _digits_batch(model, **kwargs):
    return digits_batch(model, return_datamodule=True, **kwargs)


def _expected_ce(rows_and_weights):
    return sum(w * -torch.log_softmax(STRONG[i], 0)[c] for i, c, w in rows_and_weights) / len(STRONG)


# --- hand computations -------------------------------------------------------------------
def test_flexmatch_thresholds_mask_and_memory_update_by_hand():
    model = FlexMatch(num_classes=3, in_channels=1, num_unlabeled=10, threshold=0.95, **NET)
    model.memory.copy_(torch.tensor([0, 0, 0, 1, 1, -1, -1, -1, -1, -2]))
    # sigma = (3, 2, 0), 4 unused (the -2 index is outside the unlabeled set): beta = (3, 2, 0) / 4
    beta = torch.tensor([0.75, 0.5, 0.0])
    expected = beta / (2 - beta) * 0.95
    torch.testing.assert_close(model.class_thresholds(), expected)
    model.threshold_warmup = False  # beta = sigma / max sigma = (1, 2/3, 0)
    torch.testing.assert_close(model.class_thresholds(), torch.tensor([1.0, 0.5, 0.0]) * 0.95)
    model.threshold_warmup = True

    batch = {"index": torch.tensor([5, 6, 0, 3]), "target": TARGET}
    out = model.unlabeled_loss({"weak": WEAK, "strong": STRONG}, batch)
    model.step_state.commit()  # what the base does after the optimizer step
    # T = (0.57, 0.317, 0): rows 0, 1, 3 pass; row 2 (0.367, class 0) does not
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    assert out["unlabeled_loss"].item() == pytest.approx(_expected_ce([(0, 0, 1), (1, 2, 1), (3, 1, 1)]).item(), rel=1e-6)
    assert out["pseudo_label_acc"].item() == pytest.approx(1.0)  # rows 0, 1 right; row 3 has no target
    # Only rows above tau = 0.95 (0 and 1) enter the memory; thresholds used were the old ones.
    assert model.memory.tolist() == [0, 0, 0, 1, 1, 0, 2, -1, -1, -2]


def test_write_last_keeps_the_last_of_repeated_indices():
    memory = torch.full((5,), -1)
    write_last_(memory, torch.tensor([3, 1, 3, 3, 0]), torch.tensor([7, 8, 9, 4, 2]))
    assert memory.tolist() == [2, 8, -1, 4, -1]


def test_freematch_state_after_one_update_and_its_losses_by_hand():
    model = FreeMatch(num_classes=3, in_channels=1, ema_momentum=0.9, fairness_weight=0.5, **NET)
    out = model.unlabeled_loss({"weak": WEAK, "strong": STRONG.clone().requires_grad_(True)}, {"target": TARGET})
    model.step_state.commit()
    probs = torch.softmax(WEAK, 1)
    conf, pred = probs.max(1)
    tau = 0.9 / 3 + 0.1 * conf.mean()
    p_tilde = 0.9 / 3 + 0.1 * probs.mean(0)
    h_tilde = 0.9 / 3 + 0.1 * torch.tensor([2.0, 1.0, 1.0]) / 4  # argmax: 0, 2, 0, 1
    torch.testing.assert_close(model.global_threshold, tau)
    torch.testing.assert_close(model.class_model, p_tilde)
    torch.testing.assert_close(model.label_hist, h_tilde)
    thresholds = p_tilde / p_tilde.max() * tau
    torch.testing.assert_close(model.class_thresholds(), thresholds)
    mask = (conf > thresholds[pred]).float()
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0]  # row 2: 0.367 < tau_1(0) = tau_1 = 0.381
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    assert out["unlabeled_loss"].item() == pytest.approx(_expected_ce([(0, 0, 1), (1, 2, 1), (3, 1, 1)]).item(), rel=1e-6)
    # fairness: a = SumNorm(p~/h~), b = SumNorm(mean Q / Hist(argmax Q)) over the masked rows 0, 1, 3
    q = torch.softmax(STRONG[[0, 1, 3]], 1)
    hist = torch.tensor([2.0, 0.0, 1.0]) / 3  # argmax: 0, 0 (tie), 2
    scaled = torch.where(hist > 0, q.mean(0) / hist, torch.zeros(3))
    a, b = p_tilde / h_tilde, scaled / scaled.sum()
    a = a / a.sum()
    assert out["fairness_loss"].item() == pytest.approx((a * torch.log(b + 1e-12)).sum().item(), rel=1e-5)
    total = model.total_loss({"labeled_loss": torch.tensor(1.0), **out})
    assert total.item() == pytest.approx(1.0 + out["unlabeled_loss"].item() + 0.5 * out["fairness_loss"].item(), rel=1e-6)


def test_freematch_masks_below_the_class_threshold_and_skips_fairness_without_samples():
    model = FreeMatch(num_classes=3, in_channels=1, ema_momentum=0.0, **NET)  # state = this batch
    flat = torch.zeros(4, 3)  # uniform: max prob 1/3 equals tau_t = 1/3, not above it
    out = model.unlabeled_loss({"weak": flat, "strong": STRONG}, {"target": TARGET})
    assert out["mask_ratio"].item() == 0.0 and out["unlabeled_loss"].item() == 0.0
    assert out["fairness_loss"].item() == 0.0


@pytest.mark.parametrize("uniform_alignment", [False, True])
def test_softmatch_mean_variance_and_weights_by_hand(uniform_alignment):
    model = SoftMatch(num_classes=3, in_channels=1, ema_momentum=0.9, n_sigma=2.0,
                      uniform_alignment=uniform_alignment, **NET)
    out = model.unlabeled_loss({"weak": WEAK, "strong": STRONG}, {"target": TARGET})
    model.step_state.commit()
    probs = torch.softmax(WEAK, 1)
    pred = probs.argmax(1)  # pseudo-labels from the raw probabilities, aligned or not
    if uniform_alignment:
        prob_mean = probs.mean(0)  # the first batch starts the class marginal
        torch.testing.assert_close(model.prob_mean, prob_mean)
        probs = probs / prob_mean / 3
        probs = probs / probs.sum(1, keepdim=True)
    conf = probs.max(1).values
    mu = 0.9 / 3 + 0.1 * conf.mean()
    var = 0.9 * 1.0 + 0.1 * conf.var(unbiased=True)
    torch.testing.assert_close(model.conf_mean, mu)
    torch.testing.assert_close(model.conf_var, var)
    weights = [1.0 if c >= mu else math.exp(-((c - mu) ** 2) / (2 * var / 4)) for c in conf.tolist()]
    torch.testing.assert_close(model.sample_weights(conf), torch.tensor(weights))
    assert any(w < 1 for w in weights) and any(w == 1 for w in weights)
    assert out["mask_ratio"].item() == pytest.approx(sum(weights) / 4, rel=1e-6)
    expected = _expected_ce([(i, int(pred[i]), weights[i]) for i in range(4)])
    assert out["unlabeled_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_softmatch_pseudo_labels_are_the_raw_argmax_not_the_aligned_one():
    """USB softmatch.py lines 92-98: the hard label comes from the raw weak-view logits; the
    aligned probabilities feed only the weights (line 90)."""
    model = SoftMatch(num_classes=3, in_channels=1, ema_momentum=0.0, **NET)  # E_t[q] = this batch's mean
    weak = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [1.0, 0.8, 0.0]])
    probs = torch.softmax(weak, 1)
    aligned = probs / probs.mean(0)
    assert aligned[3].argmax() == 1 and probs[3].argmax() == 0  # alignment flips row 3's argmax
    out = model.unlabeled_loss({"weak": weak, "strong": STRONG}, {"target": probs.argmax(1)})
    model.step_state.commit()
    assert out["mask_ratio"].item() > 0
    assert out["pseudo_label_acc"].item() == pytest.approx(1.0)  # every pseudo-label is the raw argmax
    per_row = -torch.log_softmax(STRONG, 1)[torch.arange(4), probs.argmax(1)]
    weights = model.sample_weights(aligned.div(aligned.sum(1, keepdim=True)).max(1).values)
    assert out["unlabeled_loss"].item() == pytest.approx((weights * per_row).mean().item(), rel=1e-5)


def test_softmatch_class_marginal_starts_from_the_first_batch():
    """USB hooks/dist_align.py lines 48-51: ``p_model`` is the first batch's mean, then an EMA."""
    model = SoftMatch(num_classes=3, in_channels=1, ema_momentum=0.9, **NET)
    first, second = torch.softmax(WEAK, 1), torch.softmax(STRONG, 1)
    model.unlabeled_loss({"weak": WEAK, "strong": STRONG}, {"target": TARGET})
    model.step_state.commit()
    torch.testing.assert_close(model.prob_mean, first.mean(0))
    model.unlabeled_loss({"weak": STRONG, "strong": WEAK}, {"target": TARGET})
    model.step_state.commit()
    torch.testing.assert_close(model.prob_mean, 0.9 * first.mean(0) + 0.1 * second.mean(0))


# --- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [FlexMatch, FreeMatch, SoftMatch])
def test_unlabeled_term_trains_the_student_only(method):
    torch.manual_seed(0)
    extra = {"num_unlabeled": 1347} if method is FlexMatch else {}  # DigitsSSL's 1,347 training images
    model = method(num_classes=10, in_channels=1, concat_forward=False, **NET, **extra)
    batch, _ = _digits_batch(model)
    batch["unlabeled"]["weak"].requires_grad_(True)
    batch["unlabeled"]["strong"].requires_grad_(True)
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    losses = model.compute_losses(batch)
    model.step_state.commit()
    unlabeled = losses["unlabeled_loss"] + losses.get("fairness_loss", 0.0)
    assert unlabeled.requires_grad and torch.isfinite(unlabeled)
    unlabeled.backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_before, model.ema.module.parameters()))
    for name in STATE[method]:
        state = getattr(model, name)
        assert not state.requires_grad and state.grad_fn is None and state.grad is None
    assert batch["unlabeled"]["strong"].grad.abs().sum() > 0
    assert batch["unlabeled"]["weak"].grad is None or batch["unlabeled"]["weak"].grad.abs().sum() == 0
    if method is FlexMatch:  # the forward pass recorded confident predictions, and nothing else
        assert ((model.memory >= -1) & (model.memory < 10)).all()


# --- training and checkpoints ------------------------------------------------------------
@pytest.mark.parametrize("method", [FlexMatch, FreeMatch, SoftMatch])
def test_a_few_steps_train_and_the_state_survives_a_checkpoint(method, tmp_path):
    torch.manual_seed(0)
    model = method(num_classes=10, in_channels=1, **NET)
    initial = {name: getattr(model, name).clone() for name in STATE[method]}
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3, include_labeled_in_unlabeled=False)
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert "train/unlabeled_loss" in logged and all(torch.isfinite(v) for v in logged.values())
    if method is FlexMatch:
        # sized from the DataModule: every training index, the 50 labeled ones outside the unlabeled set
        assert len(model.memory) == len(dm._train[0]) and (model.memory == -2).sum() == 50
        model.memory[torch.arange(0, 100)] = torch.arange(100) % 10  # make the saved state non-trivial
    else:
        assert any(not torch.equal(initial[n], getattr(model, n)) for n in STATE[method])
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = method.load_from_checkpoint(tmp_path / "m.ckpt")
    for name in STATE[method]:
        assert torch.equal(getattr(restored, name), getattr(model, name)), name
    assert type(restored) is method and restored.hparams == model.hparams


def test_flexmatch_needs_the_unlabeled_set_size():
    model = FlexMatch(num_classes=10, in_channels=1, **NET)
    with pytest.raises(ValueError, match="num_unlabeled"):
        model.trainer = _trainer()
        model._fresh_memory()


def test_flexmatch_resume_keeps_the_memory(tmp_path):
    model = FlexMatch(num_classes=10, in_channels=1, threshold=1.0, **NET)  # confidence never > 1: no updates
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=1)
    trainer = _trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    model.memory[:5] = torch.tensor([3, 1, 4, 1, 5])
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    resumed = FlexMatch(num_classes=10, in_channels=1, threshold=1.0, **NET)
    _trainer(max_epochs=2, default_root_dir=tmp_path).fit(resumed, dm, ckpt_path=tmp_path / "m.ckpt")
    assert resumed.memory[:5].tolist() == [3, 1, 4, 1, 5] and len(resumed.memory) == len(model.memory)


def test_state_updates_use_every_ranks_batch(monkeypatch):
    """With a stand-in two-rank gather, the update sees both ranks' samples (FlexMatch) or statistics."""
    other = iter([torch.tensor([7, 8]), torch.tensor([0.99, 0.2]), torch.tensor([2, 1])])
    model = FlexMatch(num_classes=3, in_channels=1, num_unlabeled=10, threshold=0.95, **NET)
    monkeypatch.setattr(model, "_trainer", type("T", (), {"world_size": 2})(), raising=False)
    monkeypatch.setattr(model, "all_gather", lambda t: torch.stack([t, next(other).to(t.dtype)]))
    model.update_memory(torch.tensor([1, 2]), torch.tensor([0.97, 0.5]), torch.tensor([0, 2]))  # the commit
    assert model.memory.tolist() == [-1, 0, -1, -1, -1, -1, -1, 2, -1, -1]  # rank 1's index 7 recorded too

    model = SoftMatch(num_classes=3, in_channels=1, ema_momentum=0.0, uniform_alignment=False, **NET)
    monkeypatch.setattr(model, "_trainer", type("T", (), {"world_size": 2})(), raising=False)
    monkeypatch.setattr(model, "all_gather", lambda t: torch.stack([t, t + 0.2]))
    # max-probabilities 0.4 and 0.6 here, 0.6 and 0.8 on the stand-in rank; the loss gathers the
    # probabilities (the state it uses includes every rank's batch) and proposes them for the commit
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.6, 0.2]])
    model.unlabeled_loss({"weak": probs.log(), "strong": STRONG[:2]}, {"target": TARGET[:2]})
    model.step_state.commit()
    torch.testing.assert_close(model.conf_mean, torch.tensor(0.6))  # mean of 0.4, 0.6, 0.6, 0.8
    torch.testing.assert_close(model.conf_var, torch.tensor([0.4, 0.6, 0.6, 0.8]).var())

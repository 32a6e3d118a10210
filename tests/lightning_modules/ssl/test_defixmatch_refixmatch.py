"""DeFixMatch and ReFixMatch against the authors' code (USB), in training, and the labeled views DeFixMatch asks for.

The reference tests feed the same logits (or the same real digits through a copy of the same network) to the
method's real loss and to a plain re-implementation of USB's ``train_step`` (cited per line), and compare the
losses. Nothing from ``lightning_modules`` computes an expected value.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import DeFixMatch, ReFixMatch
from lightning_modules.core.batch import BatchContractError, check_training_batch
from tests.ssl_helpers import SMALL_NET, make_trainer, spread_confidences


def _ce(logits, targets):  # USB core/criterions/cross_entropy.py lines 21-31, reduction='none'
    log_pred = F.log_softmax(logits, dim=-1)
    if logits.shape == targets.shape:
        return torch.sum(-targets * log_pred, dim=1)
    return F.nll_loss(log_pred, targets, reduction="none")


def _fixed_threshold_mask(probs, p_cutoff):  # USB algorithms/hooks/masking.py lines 48-57 (softmax_x_ulb=False)
    return probs.max(dim=-1)[0].ge(p_cutoff).to(probs.dtype)


def _usb_kl_consistency(logits, targets, mask):  # USB core/criterions/consistency.py lines 30-32 and 40
    loss = F.kl_div(F.log_softmax(logits / 0.5, dim=-1), F.softmax(targets / 0.5, dim=-1), reduction="none")
    return torch.sum(loss * (1.0 - mask).unsqueeze(-1).repeat(1, logits.shape[1]), dim=1).mean()


def _digits_step_batch(model, batch_size=8, uratio=2):
    """One training batch of real digits made as a Trainer would make it for ``model`` (its labeled views too)."""
    dm = DigitsSSL(num_labeled=50, batch_size=batch_size, uratio=uratio, steps_per_epoch=1,
                   unlabeled_views=list(model.unlabeled_views))
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(lightning_module=model)  # what requested_labeled_views reads
    return dm.on_after_batch_transfer(raw, 0)


def _spread(model):
    """An untrained net is unsure everywhere: larger head weights give a partial mask at a lower tau."""
    torch.manual_seed(0)
    return spread_confidences(model, bias=False)


# --- DeFixMatch -----------------------------------------------------------------------------
def test_defixmatch_matches_reference_train_step_on_digits():
    """Schmutz et al. 2023 (debiased FixMatch); USB ``algorithms/defixmatch/defixmatch.py`` lines 52-57
    (``use_cat``: one forward over x_lb, x_lb_s, x_ulb_w, x_ulb_s), 76 (the mean of the two labeled CEs),
    79-80 (softmax of the detached weak logits), 89-90 (fixed-threshold masks), 93-114 (hard pseudo-labels,
    masked CE over the batch on both batches) and 116 (``sup + lambda_u * (unsup - anti_unsup)``)."""
    torch.manual_seed(0)
    p_cutoff = 0.5
    model = _spread(DeFixMatch(threshold=p_cutoff, **SMALL_NET))
    batch = _digits_step_batch(model)
    net = copy.deepcopy(model.net)
    losses = model.compute_losses(batch)
    total = model.total_loss(losses)

    x_lb, x_lb_s, y_lb = batch["labeled"]["image"], batch["labeled"]["strong"], batch["labeled"]["target"]
    x_ulb_w, x_ulb_s = batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]
    num_lb = y_lb.shape[0]
    with torch.no_grad():
        logits = net(torch.cat((x_lb, x_lb_s, x_ulb_w, x_ulb_s)))
    logits_x_lb, logits_x_lb_s = logits[:2 * num_lb].chunk(2)
    logits_x_ulb_w, logits_x_ulb_s = logits[2 * num_lb:].chunk(2)
    sup_loss = 0.5 * (_ce(logits_x_lb, y_lb).mean() + _ce(logits_x_lb_s, y_lb).mean())
    probs_x_ulb_w, probs_x_lb = torch.softmax(logits_x_ulb_w, -1), torch.softmax(logits_x_lb, -1)
    mask, mask_lb = _fixed_threshold_mask(probs_x_ulb_w, p_cutoff), _fixed_threshold_mask(probs_x_lb, p_cutoff)
    unsup_loss = (_ce(logits_x_ulb_s, probs_x_ulb_w.argmax(-1)) * mask).mean()
    anti_unsup_loss = (_ce(logits_x_lb_s, probs_x_lb.argmax(-1)) * mask_lb).mean()
    assert 0 < mask.mean() < 1 and 0 < mask_lb.mean() < 1  # both masks keep some rows and drop others
    assert not torch.equal(x_lb, x_lb_s)  # the strong labeled view is a view of its own

    torch.testing.assert_close(losses["labeled_loss"], sup_loss)
    torch.testing.assert_close(losses["unlabeled_loss"], unsup_loss - anti_unsup_loss)
    torch.testing.assert_close(losses["labeled_mask_ratio"], mask_lb.mean())
    torch.testing.assert_close(total, sup_loss + 0.5 * (unsup_loss - anti_unsup_loss))  # USB's ulb_loss_ratio 0.5


def test_defixmatch_gets_its_strong_labeled_view_from_the_datamodule_in_training(tmp_path):
    """Through a Trainer on real digits: the labeled batch holds ``strong`` (the checker passed it) and the
    debiasing term is on (the labeled mask is not empty once the head is spread)."""
    seen = []

    class Record(DeFixMatch):
        def compute_losses(self, batch):
            seen.append(sorted(batch["labeled"]))
            return super().compute_losses(batch)

    model = _spread(Record(threshold=0.5, **SMALL_NET))
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3 and seen[0] == ["image", "index", "strong", "target"]
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert all(torch.isfinite(v) for v in logged.values()) and logged["train/labeled_mask_ratio"] > 0


def test_a_batch_without_the_labeled_views_asked_for_is_refused_naming_them():
    model = DeFixMatch(**SMALL_NET)
    batch = _digits_step_batch(model)
    check_training_batch(batch, "classification", model.unlabeled_views, model.labeled_views)
    del batch["labeled"]["strong"]
    with pytest.raises(BatchContractError, match=r"batch\['labeled'\] lacks the view\(s\) \['strong'\]"):
        check_training_batch(batch, "classification", model.unlabeled_views, model.labeled_views)
    with pytest.raises(ValueError, match="batch\\['labeled'\\]\\['strong'\\]"):
        model.compute_losses(batch)


# --- ReFixMatch -----------------------------------------------------------------------------
def test_refixmatch_matches_reference_over_fixed_logits():
    """Nguyen 2023; USB ``algorithms/refixmatch/refixmatch.py`` lines 76-103: mask and hard labels from the
    detached weak probabilities, masked CE, plus the KL of ``core/criterions/consistency.py`` lines 30-32 on
    ``1 - mask`` with the weak *probabilities* as its ``targets``; ``unsup + unsup_refix`` (lambda_u 1)."""
    g = torch.Generator().manual_seed(0)
    model = ReFixMatch(num_classes=5, threshold=0.6, kl_target="usb", in_channels=1, network="wrn10_1")
    for _ in range(3):
        weak, strong = torch.randn(32, 5, generator=g) * 3, torch.randn(32, 5, generator=g) * 3
        out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": weak.argmax(-1)})
        probs_x_ulb_w = torch.softmax(weak, dim=-1)
        mask = _fixed_threshold_mask(probs_x_ulb_w, 0.6)
        unsup_loss = (_ce(strong, probs_x_ulb_w.argmax(-1)) * mask).mean()
        unsup_loss_refix = _usb_kl_consistency(strong, probs_x_ulb_w, mask)
        assert 0 < mask.mean() < 1
        torch.testing.assert_close(out["unlabeled_loss"], unsup_loss + unsup_loss_refix)
        torch.testing.assert_close(out["low_confidence_loss"], unsup_loss_refix)
        torch.testing.assert_close(out["mask_ratio"], mask.mean())


def test_refixmatch_default_target_matches_reference_sharpened_weak_prediction():
    """The default is the sharpened weak prediction (the sharpening USB's ``refixmatch.py`` line 26 names),
    ``Sharpen(q, T) = q^(1/T) / sum q^(1/T)`` (MixMatch's sharpening, written out here on the probabilities),
    not USB's ``softmax(q / 0.5)`` of them
    (``consistency.py`` line 31), which flattens: on ``main`` the default was USB's and this test fails."""
    g = torch.Generator().manual_seed(2)
    model = ReFixMatch(num_classes=5, threshold=0.6, in_channels=1, network="wrn10_1")
    weak, strong = torch.randn(32, 5, generator=g) * 3, torch.randn(32, 5, generator=g) * 3
    q = torch.softmax(weak, dim=-1)
    sharpened = q ** 2 / (q ** 2).sum(dim=-1, keepdim=True)  # T = 0.5
    mask = (q.max(dim=-1).values >= 0.6).float()
    kl = (sharpened * (sharpened.log() - torch.log_softmax(strong / 0.5, dim=-1))).sum(dim=-1)
    out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": weak.argmax(-1)})
    assert model.kl_target == "sharpened" and 0 < mask.mean() < 1
    torch.testing.assert_close(out["low_confidence_loss"], (kl * (1 - mask)).mean())
    # USB's target on the same logits is flatter than the prediction itself, the sharpened one peakier
    top = lambda p: p.max(dim=-1).values.mean()  # noqa: E731
    assert top(torch.softmax(q / 0.5, dim=-1)) < top(q) < top(sharpened)


def test_refixmatch_sharpened_target_matches_reference_with_weak_logits():
    """``kl_target="sharpened"``: USB's same KL (``consistency.py`` lines 30-32) given the weak *logits* as
    ``targets``, i.e. ``softmax(weak / 0.5)``, the weak prediction sharpened with T = 0.5."""
    g = torch.Generator().manual_seed(1)
    model = ReFixMatch(num_classes=5, threshold=0.6, kl_target="sharpened", in_channels=1, network="wrn10_1")
    weak, strong = torch.randn(32, 5, generator=g) * 3, torch.randn(32, 5, generator=g) * 3
    out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": weak.argmax(-1)})
    mask = _fixed_threshold_mask(torch.softmax(weak, dim=-1), 0.6)
    torch.testing.assert_close(out["low_confidence_loss"], _usb_kl_consistency(strong, weak, mask))
    torch.testing.assert_close(out["unlabeled_loss"],
                               (_ce(strong, weak.argmax(-1)) * mask).mean() + _usb_kl_consistency(strong, weak, mask))


def test_refixmatch_matches_reference_train_step_on_digits():
    """The whole step through a real ``wrn10_1``: USB ``refixmatch.py`` lines 54-57 (one forward over labeled,
    weak and strong images), 73 (labeled CE) and 103 (``sup + lambda_u * unsup + lambda_u * unsup_refix``);
    the gradient reaches the network through both unlabeled terms."""
    torch.manual_seed(0)
    model = _spread(ReFixMatch(threshold=0.5, kl_target="usb", **SMALL_NET))
    batch = _digits_step_batch(model)
    net = copy.deepcopy(model.net)
    total = model.total_loss(model.compute_losses(batch))

    x_lb, y_lb = batch["labeled"]["image"], batch["labeled"]["target"]
    logits = net(torch.cat((x_lb, batch["unlabeled"]["weak"], batch["unlabeled"]["strong"])))
    logits_x_lb = logits[: len(x_lb)]
    logits_x_ulb_w, logits_x_ulb_s = logits[len(x_lb):].chunk(2)
    probs_x_ulb_w = torch.softmax(logits_x_ulb_w.detach(), dim=-1)
    mask = _fixed_threshold_mask(probs_x_ulb_w, 0.5)
    expected = (_ce(logits_x_lb, y_lb).mean() + (_ce(logits_x_ulb_s, probs_x_ulb_w.argmax(-1)) * mask).mean()
                + _usb_kl_consistency(logits_x_ulb_s, probs_x_ulb_w, mask))
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(total, expected)
    total.backward()
    expected.backward()
    torch.testing.assert_close(model.net.fc.weight.grad, net.fc.weight.grad)


def test_refixmatch_trains_a_few_steps(tmp_path):
    torch.manual_seed(0)
    model = ReFixMatch(**SMALL_NET)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3))
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert trainer.global_step == 3 and all(torch.isfinite(v) for v in logged.values())
    assert logged["train/low_confidence_loss"] > 0  # tau 0.95: an untrained net's samples all fall under it


@pytest.mark.parametrize("make, message", [
    (lambda: DeFixMatch(threshold=1.5, **SMALL_NET), "threshold must lie in"),
    (lambda: DeFixMatch(rdrop_weight=1.0, **SMALL_NET), "R-Drop"),
    (lambda: ReFixMatch(threshold=-0.1, **SMALL_NET), "threshold must lie in"),
    (lambda: ReFixMatch(kl_temperature=0.0, **SMALL_NET), "kl_temperature must be positive"),
    (lambda: ReFixMatch(kl_target="logits", **SMALL_NET), "kl_target must be 'usb'"),
])
def test_bad_arguments_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()

"""The base's criterion, R-Drop and multi-label options, on real digits through the Trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import FixMatch, MeanTeacher, MixMatch, Supervised
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer


def test_label_smoothing_is_the_labeled_loss_of_any_method():
    model = FixMatch(criterion="label_smoothing", criterion_kwargs={"smoothing": 0.2}, **SMALL_NET)
    batch = digits_batch(model)
    model.eval()
    logits = model.net(batch["labeled"]["image"])
    expected = F.cross_entropy(logits, batch["labeled"]["target"], label_smoothing=0.2)
    torch.testing.assert_close(model.compute_losses(batch)["labeled_loss"], expected)


def test_a_learnable_criterion_is_trained_with_the_network():
    model = Supervised(criterion="knowledge_refinery", **SMALL_NET)
    refinery = list(model.criterion.parameters())
    assert refinery
    before = [p.detach().clone() for p in refinery]
    make_trainer(max_steps=3).fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3))
    optimized = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in refinery)
    assert any(not torch.equal(a, b) for a, b in zip(before, refinery))


def test_online_label_smoothing_takes_its_soft_labels_at_the_epoch_end():
    model = Supervised(criterion="online_label_smoothing", **SMALL_NET)
    initial = model.criterion.soft_labels.clone()
    make_trainer(max_epochs=1).fit(model, DigitsSSL(num_labeled=None, batch_size=64, steps_per_epoch=10))
    soft_labels = model.criterion.soft_labels
    assert not torch.equal(initial, soft_labels)
    torch.testing.assert_close(soft_labels.sum(dim=1), torch.ones(10))


def test_rdrop_penalty_is_zero_without_dropout_and_positive_with_it():
    batch = None
    for dropout, positive in ((0.0, False), (0.3, True)):
        torch.manual_seed(0)
        model = Supervised(rdrop_weight=1.0, **{**SMALL_NET, "network_kwargs": {"dropout": dropout}})
        batch = batch or digits_batch(model)
        model.train()
        losses = model.compute_losses(batch)
        assert (losses["rdrop_loss"] > 1e-6) == positive
        torch.testing.assert_close(model.total_loss(losses), losses["labeled_loss"] + losses["rdrop_loss"])


def test_multilabel_criterion_switches_evaluation_to_f1():
    model = Supervised(criterion="sigmoid_f1", **SMALL_NET)
    trainer = make_trainer(max_steps=3)
    dm = DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    assert {"test/macro_f1", "test/micro_f1"} <= set(trainer.callback_metrics)
    prediction = trainer.predict(model, dm)[0]["prediction"]
    assert prediction.shape[1] == 10 and set(prediction.unique().tolist()) <= {0, 1}


def test_methods_that_cannot_take_the_options_refuse_them():
    with pytest.raises(ValueError, match="ignores criterion='focal'"):
        MixMatch(criterion="focal", **SMALL_NET)
    with pytest.raises(ValueError, match="R-Drop needs a method"):
        MeanTeacher(rdrop_weight=1.0, **SMALL_NET)
    with pytest.raises(ValueError, match="unknown criterion|valid"):
        Supervised(criterion="no_such_loss", **SMALL_NET)

"""DropMax: the loss and its gradients against the authors' TensorFlow code written out in plain torch, the mask's
keep rate, and training and evaluation on real digits through the Trainer."""

from __future__ import annotations

import pytest
import torch

from datamodules import DigitsSSL
from lightning_modules import Supervised
from lightning_modules.classification.criteria import build_criterion
from tests.ssl_helpers import SMALL_NET, make_trainer


def _authors_dropmax(o, ph, rh, y_onehot, u, tau=0.1):
    """github.com/haebeom-lee/dropmax, layers.py lines 4-11 and 29-65, lenet.py lines 34-58, run.py line 53."""
    log = lambda x: torch.log(x + 1e-20)  # noqa: E731 (layers.py line 5)
    logit = lambda x: log(x) - log(1 - x)  # noqa: E731
    is_y = y_onehot == 1
    qh = ph.detach() + rh  # tf.stop_gradient(ph) + rh
    p, r, q = torch.sigmoid(ph), torch.sigmoid(rh), torch.sigmoid(qh)
    z = torch.where(is_y, torch.ones_like(q), torch.sigmoid(1 / tau * (logit(q) + logit(u))))
    expo = (z + 1e-20) * torch.exp(o)
    cent = -torch.mean(log(torch.sum(expo * y_onehot, 1)) - log(torch.sum(expo, 1)))
    kl = torch.where(is_y, -log(p), q * (log(q) - log(p)) + (1 - q) * (log(1 - q) - log(1 - p))).mean(0).sum()
    aux = torch.where(is_y, -log(r), -log(1 - r)).mean(0).sum()
    neg_ent = (p * log(p) + (1 - p) * log(1 - p)).mean(0).sum()
    test_expo = (p + 1e-20) * torch.exp(o)
    test_cent = -torch.mean(log(torch.sum(test_expo * y_onehot, 1)) - log(torch.sum(test_expo, 1)))
    return cent + kl + aux + neg_ent, {"cent": cent, "kl": kl, "aux": aux, "neg_ent": neg_ent,
                                       "test_probs": test_expo / test_expo.sum(1, keepdim=True), "test_cent": test_cent}


def test_dropmax_matches_reference_authors_code():
    torch.manual_seed(0)
    criterion = build_criterion("dropmax", 5)
    with torch.no_grad():  # a trained-looking head instead of the zero start
        criterion.retain_head.weight.normal_(0, 0.7)
        criterion.retain_head.bias.normal_(0, 0.5)
    logits = torch.randn(6, 5, requires_grad=True)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    uniform = torch.rand(6, 5) * 0.9 + 0.05
    ours = criterion.terms(logits, targets, uniform)
    grads = torch.autograd.grad(ours["loss"], [logits, *criterion.parameters()])

    w, b = (t.detach().clone().requires_grad_() for t in (criterion.retain_head.weight, criterion.retain_head.bias))
    o = logits.detach().clone().requires_grad_()
    branches = o @ w.T + b  # the head: C -> 2C, retain logits first
    reference, parts = _authors_dropmax(o, branches[:, :5], branches[:, 5:], torch.eye(5)[targets], uniform)
    reference_grads = torch.autograd.grad(reference, [o, w, b])

    for name, key in (("masked_ce", "cent"), ("kl", "kl"), ("aux", "aux"), ("neg_entropy", "neg_ent")):
        torch.testing.assert_close(ours[name], parts[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["loss"], reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Test time: the expected retain p replaces the mask (lenet.py line 48, training=False).
    scores = criterion.class_scores(logits.detach())
    torch.testing.assert_close(torch.softmax(scores, 1), parts["test_probs"].detach())
    torch.testing.assert_close(torch.nn.functional.cross_entropy(scores, targets), parts["test_cent"].detach())


def test_dropmax_mask_keeps_each_non_target_class_with_its_posterior_probability():
    # logit(q) + logistic noise > 0 with probability q, so the relaxed mask is above 1/2 at rate q.
    criterion = build_criterion("dropmax", 4)
    q = torch.tensor([0.9, 0.5, 0.2, 0.05])
    with torch.no_grad():
        criterion.retain_head.bias[4:] = torch.logit(q)  # h_r; h_p = 0 at the zero start, so q = sigmoid(h_r)
    torch.manual_seed(1)
    n = 20000
    retain, aux = criterion.branch_logits(torch.zeros(n, 4))
    posterior = retain + aux
    u = torch.rand(n, 4)
    mask = torch.sigmoid((posterior + torch.log(u) - torch.log1p(-u)) / criterion.temperature)
    kept = (mask > 0.5).float().mean(0)
    # Binomial standard error is at most 0.0036 at n = 20000: 4 sigma is 0.015.
    torch.testing.assert_close(kept, q, atol=0.015, rtol=0)
    # The target class is never dropped: its mask is exactly 1 whatever its posterior.
    terms = criterion.terms(torch.zeros(3, 4), torch.tensor([3, 3, 3]), torch.full((3, 4), 1e-3))
    assert terms["masked_ce"] < 1e-3  # every non-target dropped (u tiny), the target alone keeps the mass


def test_dropmax_trains_its_head_with_the_network_and_evaluates_with_expected_retain():
    model = Supervised(criterion="dropmax", **SMALL_NET)
    head = list(model.criterion.parameters())
    before = [p.detach().clone() for p in head]
    data = DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3)
    trainer = make_trainer(max_steps=3, limit_val_batches=2)
    trainer.fit(model, data)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in head)
    assert any(not torch.equal(a, b) for a, b in zip(before, head))

    batch = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    model.eval()
    with torch.no_grad():
        predicted = model.task.predict(model, batch)
        logits = model.eval_net(batch["image"])
        p = torch.sigmoid(logits @ model.criterion.retain_head.weight[:10].T + model.criterion.retain_head.bias[:10])
        expected = (p + 1e-20) * torch.exp(logits)
    torch.testing.assert_close(predicted["probs"], expected / expected.sum(1, keepdim=True))
    assert not torch.allclose(predicted["probs"], torch.softmax(logits, 1))  # the retain head changes the scores


def test_dropmax_refuses_bad_options():
    with pytest.raises(ValueError, match="temperature=0"):
        build_criterion("dropmax", 10, temperature=0)
    with pytest.raises(ValueError, match="kl_weight=-1"):
        build_criterion("dropmax", 10, kl_weight=-1)
    with pytest.raises(ValueError, match="options are: temperature"):
        build_criterion("dropmax", 10, tau=0.1)

"""Deep Co-Training: one step against the paper's Eq. 2, 3, 6 as the authors' main.py computes them, in plain
tensors; the adversarial examples carry no gradient into their network; a real training run on digits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import DeepCoTraining
from lightning_modules.ssl.deep_co_training import fgsm
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer


def _authors_fgsm(net, x, y, eps):
    # advertorch GradientSignAttack(loss_fn=CrossEntropyLoss(reduction="sum"), clip +-inf), with the networks
    # in eval mode while it runs (AlanChou main.py lines 263-269 and 359-369).
    net.eval()
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), x)
    net.train()
    return (x + eps * grad.sign()).detach()


def test_deep_co_training_matches_reference():
    torch.manual_seed(0)
    cot_weight, dif_weight, eps = 10.0, 0.5, 0.05
    model = DeepCoTraining(**SMALL_NET, cot_weight=cot_weight, dif_weight=dif_weight, epsilon=eps, rampup=None)
    batch = digits_batch(model, batch_size=16, uratio=2)
    net1, net2 = copy.deepcopy(model.net), copy.deepcopy(model.peer)
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()

    x, y, u = batch["labeled"]["image"], batch["labeled"]["target"], batch["unlabeled"]["weak"]
    n, n_u = len(x), len(u)
    S, LS = (lambda z: torch.softmax(z, dim=1)), (lambda z: torch.log_softmax(z, dim=1))
    # One forward over labeled + unlabeled per network (our concat_forward; the authors forward them apart).
    logit1, logit2 = net1(torch.cat([x, u])), net2(torch.cat([x, u]))
    logit_S1, logit_U1, logit_S2, logit_U2 = logit1[:n], logit1[n:], logit2[:n], logit2[n:]
    # main.py lines 352-357 and 363-367: labels for labeled images, each network's own argmax for unlabeled.
    adv1 = _authors_fgsm(net1, torch.cat([x, u]), torch.cat([y, logit_U1.argmax(1)]), eps)
    adv2 = _authors_fgsm(net2, torch.cat([x, u]), torch.cat([y, logit_U2.argmax(1)]), eps)
    perturbed1, perturbed2 = net1(adv2), net2(adv1)  # lines 371-375: each network on the other's examples
    # lines 99-103: L_sup, the two mean CEs summed.
    loss_sup = F.cross_entropy(logit_S1, y) + F.cross_entropy(logit_S2, y)
    # lines 105-117: JS = H(mean p) - (H(p1) + H(p2)) / 2, summed and divided by the unlabeled batch size.
    a1 = 0.5 * (S(logit_U1) + S(logit_U2))
    loss_cot = (-torch.sum(a1 * torch.log(a1)) - 0.5 * (-torch.sum(S(logit_U1) * LS(logit_U1))
                                                         - torch.sum(S(logit_U2) * LS(logit_U2)))) / n_u
    # lines 120-136: -(a + b + c + d) / (labeled + unlabeled batch), targets not detached.
    a = torch.sum(S(logit_S2) * LS(perturbed1[:n]))
    b = torch.sum(S(logit_S1) * LS(perturbed2[:n]))
    c = torch.sum(S(logit_U2) * LS(perturbed1[n:]))
    d = torch.sum(S(logit_U1) * LS(perturbed2[n:]))
    loss_diff = -(a + b + c + d) / (n + n_u)
    (loss_sup + cot_weight * loss_cot + dif_weight * loss_diff).backward()  # line 387

    assert losses["labeled_loss"].item() == pytest.approx(loss_sup.item(), rel=1e-5)
    assert losses["cot_loss"].item() == pytest.approx(loss_cot.item(), rel=1e-4, abs=1e-7)
    assert losses["dif_loss"].item() == pytest.approx(loss_diff.item(), rel=1e-5)
    for ours, reference in ((model.net, net1), (model.peer, net2)):
        for grad, expected in zip((p.grad for p in ours.parameters()), (p.grad for p in reference.parameters())):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_adversarial_examples_carry_no_gradient_into_their_network():
    # Qiao et al. Sec. 3.2: g_i(x) is only an input of the other network (advertorch returns it detached).
    torch.manual_seed(0)
    model = DeepCoTraining(**SMALL_NET)
    batch = digits_batch(model, batch_size=8, uratio=2)
    images, targets = batch["labeled"]["image"], batch["labeled"]["target"]
    stats = copy.deepcopy(model.net.state_dict())
    adv = fgsm(model.net, images, targets, 0.1)
    assert not adv.requires_grad and adv.grad_fn is None
    assert all(p.grad is None for p in model.net.parameters())  # only the input's gradient was taken
    assert model.net.training  # train mode restored; BatchNorm statistics untouched (eval mode during FGSM)
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in stats.items())
    torch.testing.assert_close((adv - images).abs(), torch.full_like(images, 0.1))
    # In the step, the gradients equal those of the authors' code with the examples as constants:
    # test_deep_co_training_matches_reference.


def test_deep_co_training_trains_both_networks_on_digits_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = DeepCoTraining(**SMALL_NET, rampup=None)
    before = copy.deepcopy(model.state_dict())
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    after = model.state_dict()
    assert not torch.equal(before["net.fc.weight"], after["net.fc.weight"])
    assert not torch.equal(before["peer.fc.weight"], after["peer.fc.weight"])  # one optimizer over both
    assert not torch.equal(before["net.fc.weight"], before["peer.fc.weight"])  # differently initialized
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert {"test/acc", "test/net1_acc", "test/net2_acc", "test/average_acc"} <= set(metrics)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=-0.1), "must be >= 0"),
    (dict(criterion="focal"), "criterion"),
    (dict(rdrop_weight=1.0), "R-Drop"),
])
def test_deep_co_training_bad_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCoTraining(**SMALL_NET, **kwargs)

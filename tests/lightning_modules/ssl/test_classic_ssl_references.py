"""Pseudo-Label and the Pi-model: one step's losses and gradient against the published formulas in plain tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ssl.pi_model import PiModel
from lightning_modules.ssl.pseudo_label import PseudoLabel
from tests.ssl_helpers import SMALL_NET, digits_batch


def _step(model, batch):
    """The method's own step: losses, total (ramp off) and the student's gradient."""
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()
    return losses, [p.grad for p in model.net.parameters()]


def _assert_same_step(losses, grads, expected, reference_net):
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-8), key
    for grad, reference in zip(grads, reference_net.parameters()):
        torch.testing.assert_close(grad, reference.grad, rtol=1e-4, atol=1e-7)


def test_pseudolabel_matches_reference():
    # Lee 2013, Eq. (15)-(16) with a confidence threshold, as USB's semilearn/algorithms/pseudolabel/
    # pseudolabel.py lines 61-77 compute it: hard labels argmax p from the prediction's own logits (no
    # gradient through the label), CE masked where max p >= tau, averaged over the whole unlabeled batch.
    # One forward over labeled + unlabeled images (concat_forward, BatchNorm over both; USB forwards
    # them separately with BatchNorm frozen for the unlabeled pass).
    torch.manual_seed(0)
    threshold, weight = 0.15, 0.7  # a low tau so that, at initialization, some images pass and some do not
    model = PseudoLabel(**SMALL_NET, threshold=threshold, unlabeled_loss_weight=weight, rampup=None)
    batch = digits_batch(model, batch_size=16, uratio=2)
    net = copy.deepcopy(model.net)
    losses, grads = _step(model, batch)

    x, y, u = batch["labeled"]["image"], batch["labeled"]["target"], batch["unlabeled"]["weak"]
    logits = net(torch.cat([x, u]))
    labeled_logits, unlabeled_logits = logits[: len(x)], logits[len(x):]
    probs = torch.softmax(unlabeled_logits.detach(), dim=1)
    mask = (probs.max(dim=1).values >= threshold).float()
    assert 0 < mask.sum() < len(mask)
    supervised = -F.log_softmax(labeled_logits, dim=1).gather(1, y[:, None]).mean()
    hard = probs.argmax(dim=1, keepdim=True)
    unsupervised = (-F.log_softmax(unlabeled_logits, dim=1).gather(1, hard).squeeze(1) * mask).sum() / len(u)
    (supervised + weight * unsupervised).backward()
    expected = {"labeled_loss": supervised, "unlabeled_loss": unsupervised, "mask_ratio": mask.mean()}
    _assert_same_step(losses, grads, expected, net)


def test_pimodel_matches_reference():
    # Laine & Aila 2017, Algorithm 1: z = f(g(x)), z~ = f(g'(x)) two stochastic passes, loss
    # CE + w(t) 1/(C|B|) sum ||z - z~||^2 over softmax outputs; as TorchSSL/USB (semilearn/algorithms/
    # pimodel/pimodel.py lines 55-62) the second pass is the detached target. One concatenated forward
    # over the labeled batch and both views.
    torch.manual_seed(0)
    weight = 10.0
    model = PiModel(**SMALL_NET, unlabeled_loss_weight=weight, rampup=None)
    batch = digits_batch(model, batch_size=16, uratio=2)
    net = copy.deepcopy(model.net)
    losses, grads = _step(model, batch)

    x, y = batch["labeled"]["image"], batch["labeled"]["target"]
    u1, u2 = batch["unlabeled"]["weak"], batch["unlabeled"]["weak2"]
    logits = net(torch.cat([x, u1, u2]))
    labeled_logits, z, z_tilde = logits[: len(x)], logits[len(x): len(x) + len(u1)], logits[len(x) + len(u1):]
    supervised = -F.log_softmax(labeled_logits, dim=1).gather(1, y[:, None]).mean()
    classes = z.shape[1]
    consistency = ((F.softmax(z, dim=1) - F.softmax(z_tilde, dim=1).detach()) ** 2).sum() / (classes * len(u1))
    (supervised + weight * consistency).backward()
    _assert_same_step(losses, grads, {"labeled_loss": supervised, "unlabeled_loss": consistency}, net)

"""VAT's clean and perturbed passes, its random start, and its loss against the published formula."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ssl.vat import VAT
from tests.ssl_helpers import SMALL_NET, digits_batch


def _adversarial_inputs(model, batch, seed):
    """The input of the network's last forward in ``compute_losses`` (the adversarial pass) and the losses."""
    inputs = []
    hook = model.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    try:
        torch.manual_seed(seed)
        losses = model.compute_losses(batch)
    finally:
        hook.remove()
    return inputs[-1], losses


def test_vat_clean_and_perturbed_predictions_agree_at_zero_perturbation():
    # With eps -> 0 the unlabeled loss is KL(clean || net(u + 0)): zero when both passes normalize over
    # the same batch. The clean logits of a labeled + unlabeled forward gave 1.3e-3 here (issue 14 item 1).
    torch.manual_seed(0)
    model = VAT(**SMALL_NET, eps=1e-12)
    batch = digits_batch(model, batch_size=16, uratio=2)
    adversarial, losses = _adversarial_inputs(model, batch, seed=1)
    assert torch.equal(adversarial, batch["unlabeled"]["weak"])  # u + 1e-12 r rounds to u in float32
    assert losses["unlabeled_loss"].item() <= 1e-7


def test_vat_adversarial_direction_depends_on_the_random_start():
    # One power iteration from two random starts: a correct VAT gives different directions (cosine
    # 0.30 here, about 0.4 on WRN-28-2); when a BatchNorm mismatch dominates the finite difference,
    # every start gives the same direction (cosine 1.0 on the old code).
    torch.manual_seed(0)
    model = VAT(**SMALL_NET)
    batch = digits_batch(model, batch_size=16, uratio=2)
    weak = batch["unlabeled"]["weak"]
    first, _ = _adversarial_inputs(model, batch, seed=1)
    second, _ = _adversarial_inputs(model, batch, seed=2)
    r1, r2 = (first - weak).flatten(1), (second - weak).flatten(1)
    torch.testing.assert_close(r1.norm(dim=1), torch.full((len(r1),), 6.0), rtol=1e-4, atol=0)
    assert F.cosine_similarity(r1, r2).mean().item() < 0.8


def test_vat_refuses_concat_forward():
    with pytest.raises(ValueError, match="concat_forward"):
        VAT(**SMALL_NET, concat_forward=True)


def test_concat_forward_refusal_is_the_bases_and_names_the_method_and_the_fix():
    assert VAT.supports_concat_forward is False and VAT(**SMALL_NET).hparams.concat_forward is False
    with pytest.raises(ValueError, match="VAT cannot use concat_forward=True .* pass concat_forward=False"):
        VAT(**SMALL_NET, concat_forward=True)


def _reference_vat_step(net, batch, seed, xi, eps, vat_weight, entropy_weight, r_adv=None):
    """One VAT step in plain float64 tensor arithmetic, as the authors' and USB's code compute it.

    Miyato et al., TPAMI 2018, Eq. (8)-(13) (r_adv = eps g / ||g||_2, g the gradient of
    KL(p(y|x) || p(y|x + xi d)) at a random unit d); google-research/mixmatch ``vat.py`` lines 44-52
    and ``third_party/vat_utils.py`` lines 5-36; USB ``semilearn/algorithms/vat/vat.py`` lines 46-136:
    the labeled forward alone updates BatchNorm, the clean unlabeled forward, the power iteration and
    the adversarial forward run with BatchNorm frozen (USB ``core/utils/misc.py`` Bn_Controller,
    lines 105-131), and ``total = sup + lambda_u * lds + lambda_ent * entropy(clean)``.
    The loss and the gradient are taken at ``r_adv`` when given (else at the reference's own).
    """
    net = copy.deepcopy(net).double()
    x, y = batch["labeled"]["image"].double(), batch["labeled"]["target"]
    u = batch["unlabeled"]["weak"].double()
    sup = -F.log_softmax(net(x), dim=1).gather(1, y[:, None]).mean()
    saved = [b.clone() for b in net.buffers()]
    clean = net(u)
    q, log_q = torch.softmax(clean.detach(), dim=1), torch.log_softmax(clean.detach(), dim=1)

    def kl(logits):
        return (q * (log_q - torch.log_softmax(logits, dim=1))).sum(dim=1).mean()

    def unit(v):
        return v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.ndim - 1))

    torch.manual_seed(seed)  # the method draws its start with the global generator, first thing after the forwards
    d = (xi * unit(torch.randn(u.shape).double())).requires_grad_(True)
    (grad,) = torch.autograd.grad(kl(net(u + d)), d)
    reference_r = eps * unit(grad)
    lds = kl(net(u + (reference_r if r_adv is None else r_adv.double())))
    entropy = -(torch.softmax(clean, dim=1) * torch.log_softmax(clean, dim=1)).sum(dim=1).mean()
    total = sup + vat_weight * lds + entropy_weight * entropy
    total.backward()
    with torch.no_grad():  # after backward: BatchNorm's backward keeps the buffers it saw
        for buffer, value in zip(net.buffers(), saved):
            buffer.copy_(value)
    return {"labeled_loss": sup, "unlabeled_loss": lds, "entropy": entropy, "total": total, "r_adv": reference_r}, net


def test_vat_matches_reference_loss_gradient_and_batchnorm():
    # xi = 1e-3 rather than the recipe's 1e-6: at 1e-6 the float32 finite difference carries about 5 %
    # rounding noise (in the references too), which would hide a formula error behind a loose tolerance.
    torch.manual_seed(0)
    model = VAT(**SMALL_NET, xi=1e-3, rampup=None)
    batch = digits_batch(model, batch_size=16, uratio=2)
    start = copy.deepcopy(model.net)
    adversarial, losses = _adversarial_inputs(model, batch, seed=5)
    model.total_loss(losses).backward()
    r_adv = adversarial - batch["unlabeled"]["weak"]
    args = dict(seed=5, xi=1e-3, eps=6.0, vat_weight=0.3, entropy_weight=0.06)
    # The direction: the reference's own power iteration, in float64.
    expected, _ = _reference_vat_step(start, batch, **args)
    cosine = F.cosine_similarity(r_adv.flatten(1).double(), expected["r_adv"].flatten(1))
    assert cosine.min().item() > 0.9999
    for key in ("labeled_loss", "entropy"):  # independent of the direction
        assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-5), key
    # The direction-dependent terms, the loss's gradient and the BatchNorm statistics, at the method's own r_adv:
    # within the cosine above, the float32 direction's rounding (which differs between CPUs: 1.6e-4 of the
    # unlabeled loss on an AMD EPYC, under 1e-4 on the CPUs of earlier CI runs) moves the loss and
    # the gradient of a ReLU network by more than float32 arithmetic does, so they are compared at the same r_adv.
    at_same_r, reference = _reference_vat_step(start, batch, **args, r_adv=r_adv)
    assert losses["unlabeled_loss"].item() == pytest.approx(at_same_r["unlabeled_loss"].item(), rel=1e-5)
    assert losses["unlabeled_loss"].item() == pytest.approx(expected["unlabeled_loss"].item(), rel=1e-3)
    assert model.total_loss(losses).item() == pytest.approx(at_same_r["total"].item(), rel=1e-5)
    for (name, p), q in zip(model.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b.double(), c.to(torch.float64), rtol=1e-5, atol=1e-6, msg=name)

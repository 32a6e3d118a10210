"""Ladder Network and its Gamma model: one step against the paper's equations and the authors' Theano code in plain tensors, the
gradients and running statistics, a real training run on digits, and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import LadderGamma, LadderNetwork
from lightning_modules.ssl.ladder_gamma import batch_norm_noise
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer

SMALL_LADDER = dict(num_classes=10, in_channels=1, input_features=64, hidden_sizes=[40, 20],
                    denoising_weights=[1000.0, 10.0, 0.1, 0.1])


def _reference_step(ref, labeled, targets, unlabeled, noise_std, weights):
    """The ladder of CuriousAI/ladder ``ladder.py`` written out: encoder ``f`` (lines 334-415: z = W h,
    batch-normalized with the biased variance and eps 1e-10, + noise, + bias, ReLU, at the top
    softmax(c * (z + b))), decoder ``g`` 'gauss' (lines 458-494 and 569-590: u = BN(V z^ above) or
    BN(softmax output) at the top; mu = a1 sig(a2 u + a3) + a4 u + a5, v = a6 sig(a7 u + a8) + a9 u + a10,
    z^ = (z~ - mu) v + mu), the cost (lines 234-246 and 264-278: z^ normalized by the clean unlabeled batch's
    mean and variance above the input, squared error summed over units / units, mean over the batch,
    lambda-weighted, plus CE of the corrupted labeled output). Noise is drawn in the module's order (the
    corrupted labeled pass, then the corrupted unlabeled pass) from the same seed."""
    Ws = [w.weight for w in ref.net.weights]
    bs, c = list(ref.net.betas), ref.net.gamma

    def encoder(x, noise):
        h = x.flatten(1)
        h = h + noise * torch.randn_like(h) if noise else h
        zs, means, variances = [h], [], []
        for i, W in enumerate(Ws):
            z = h @ W.t()
            m, s = z.mean(0), ((z - z.mean(0)) ** 2).mean(0)
            z = (z - m) / torch.sqrt(s + 1e-10)
            z = z + noise * torch.randn_like(z) if noise else z
            zs.append(z)
            means.append(m)
            variances.append(s)
            h = torch.softmax(c * (z + bs[i]), dim=1) if i == len(Ws) - 1 else torch.clamp(z + bs[i], min=0)
        return zs, means, variances, h

    def bn(u):
        return (u - u.mean(0)) / torch.sqrt(((u - u.mean(0)) ** 2).mean(0) + 1e-10)

    _, _, _, noisy_labeled = encoder(labeled, noise_std)
    class_cost = -torch.log(noisy_labeled[torch.arange(len(targets)), targets]).mean()
    clean_zs, means, variances, _ = encoder(unlabeled, 0.0)
    noisy_zs, _, _, noisy_top = encoder(unlabeled, noise_std)
    top = len(Ws)
    estimate, costs = None, {}
    for i in range(top, -1, -1):
        u = bn(noisy_top) if i == top else bn(estimate @ ref.decoder.vertical[i].weight.t())
        a1, a2, a3, a4, a5, a6, a7, a8, a9, a10 = ref.decoder.combinators[i].a
        mu = a1 * torch.sigmoid(a2 * u + a3) + a4 * u + a5
        v = a6 * torch.sigmoid(a7 * u + a8) + a9 * u + a10
        estimate = (noisy_zs[i] - mu) * v + mu
        normed = estimate if i == 0 else (estimate - means[i - 1]) / torch.sqrt(variances[i - 1] + 1e-10)
        costs[i] = ((normed - clean_zs[i]) ** 2).sum(1).mean() / clean_zs[i].shape[1]
    denoising = sum(weights[i] * costs[i] for i in costs)
    return class_cost, denoising, costs, means


def _trained_looking_combinators(model):
    # The authors' initial combinator (a2 = a7 = 1, the rest 0: ladder.py lines 576-586) estimates z^ = 0,
    # so no gradient would reach the lateral and vertical paths in the first step.
    with torch.no_grad():
        for combinator in model.decoder.combinators:
            for a in combinator.a:
                a.add_(0.5 * torch.randn_like(a))


def test_ladder_matches_reference():
    torch.manual_seed(0)
    model = LadderNetwork(**SMALL_LADDER)
    batch = digits_batch(model, batch_size=16, uratio=2)
    _trained_looking_combinators(model)
    ref = copy.deepcopy(model)
    x, y, u = batch["labeled"]["image"], batch["labeled"]["target"], batch["unlabeled"]["plain"]

    torch.manual_seed(1)
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()
    torch.manual_seed(1)
    class_cost, denoising, costs, means = _reference_step(ref, x, y, u, 0.3, SMALL_LADDER["denoising_weights"])
    (class_cost + denoising).backward()

    assert losses["labeled_loss"].item() == pytest.approx(class_cost.item(), rel=1e-5)
    assert losses["unlabeled_loss"].item() == pytest.approx(denoising.item(), rel=1e-5)
    for layer, cost in costs.items():
        assert losses[f"denoising_cost_{layer}"].item() == pytest.approx(cost.item(), rel=1e-5), layer
    named = dict(ref.named_parameters())
    for name, parameter in model.named_parameters():  # float32 sums over lambda_0 = 1000: relative to the largest
        reference = named[name].grad
        assert (parameter.grad - reference).abs().max() <= 1e-5 * reference.abs().max() + 1e-7, name
    # Running statistics for evaluation come from the clean unlabeled pass (momentum 0.1 from 0).
    for norm, mean in zip(model.net.norms, means):
        torch.testing.assert_close(norm.running_mean, 0.1 * mean.detach(), rtol=1e-5, atol=1e-7)


def test_ladder_gradients_reach_decoder_from_unlabeled_images_only_and_prediction_is_clean():
    torch.manual_seed(0)
    model = LadderNetwork(**SMALL_LADDER)
    batch = digits_batch(model, batch_size=16, uratio=2)
    _trained_looking_combinators(model)
    losses = model.compute_losses(batch)
    losses["labeled_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.decoder.parameters())  # CE does not reach the decoder
    losses["unlabeled_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.vertical.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.net.weights.parameters())
    model.eval()  # the clean path with running statistics: no noise, the same prediction twice
    images = batch["labeled"]["image"]
    torch.testing.assert_close(model(images), model(images))
    zs, _, logits = model.net.encode(images)
    torch.testing.assert_close(zs[1], model.net.norms[0](images.flatten(1) @ model.net.weights[0].weight.t()))


def test_ladder_trains_on_digits_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = LadderNetwork(**SMALL_LADDER)
    before = copy.deepcopy(model.state_dict())
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    after = model.state_dict()
    for key in ("net.weights.0.weight", "net.gamma", "decoder.vertical.0.weight", "decoder.combinators.0.a.9"):
        assert not torch.equal(before[key], after[key]), key
    assert torch.isfinite(trainer.callback_metrics["train/unlabeled_loss"])
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.test(model, dm, verbose=False)[0]["test/acc"] >= 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(network="wrn28_2"), "network: mlp"),
    (dict(denoising_weights=[1.0, 2.0]), "one lambda per layer"),
    (dict(noise_std=-1.0), "noise_std must be >= 0"),
])
def test_ladder_bad_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LadderNetwork(**{**SMALL_LADDER, **kwargs})


def test_ladder_images_of_another_size_name_input_features():
    model = LadderNetwork(**{**SMALL_LADDER, "input_features": 784})
    with pytest.raises(ValueError, match="input_features"):
        model.net.encode(torch.zeros(4, 1, 8, 8))


def test_ladder_gamma_matches_reference():
    # Gamma model, Rasmus et al. Sec. 3 and CuriousAI/ladder (decoder spec 0-...-0-gauss): only the top g, its
    # cost (ladder.py lines 234-246) on the logits normalized by the clean unlabeled batch's statistics.
    # noise_std = 0 makes the corrupted pass the clean one, so the cost, the combinator and the gradients are
    # compared exactly; the noise itself: the next test.
    torch.manual_seed(0)
    model = LadderGamma(**SMALL_NET, noise_std=0.0)
    batch = digits_batch(model, batch_size=16, uratio=2)
    with torch.no_grad():
        for a in model.combinator.a:
            a.add_(0.5 * torch.randn_like(a))
    net, a = copy.deepcopy(model.net), [p.detach().clone().requires_grad_(True) for p in model.combinator.a]
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()

    x, y, u = batch["labeled"]["image"], batch["labeled"]["target"], batch["unlabeled"]["plain"]
    class_cost = F.cross_entropy(net(x), y)
    logits = net(u)
    m, s = logits.mean(0), ((logits - logits.mean(0)) ** 2).mean(0)
    z = (logits - m) / torch.sqrt(s + 1e-10)
    h = torch.softmax(logits, dim=1)
    v_u = (h - h.mean(0)) / torch.sqrt(((h - h.mean(0)) ** 2).mean(0) + 1e-10)
    mu = a[0] * torch.sigmoid(a[1] * v_u + a[2]) + a[3] * v_u + a[4]
    v = a[5] * torch.sigmoid(a[6] * v_u + a[7]) + a[8] * v_u + a[9]
    estimate = (z - mu) * v + mu
    cost = (((estimate - m) / torch.sqrt(s + 1e-10) - z) ** 2).sum(1).mean() / z.shape[1]
    (class_cost + 4.0 * cost).backward()

    assert losses["labeled_loss"].item() == pytest.approx(class_cost.item(), rel=1e-5)
    assert losses["unlabeled_loss"].item() == pytest.approx(cost.item(), rel=1e-5)
    for ours, reference in zip(model.combinator.a, a):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-6)
    for ours, reference in zip(model.net.parameters(), net.parameters()):
        assert (ours.grad - reference.grad).abs().max() <= 1e-5 * reference.grad.abs().max() + 1e-7


def test_ladder_gamma_corrupts_every_batchnorm_and_leaves_running_statistics_to_the_clean_pass():
    torch.manual_seed(0)
    model = LadderGamma(**SMALL_NET)
    batch = digits_batch(model, batch_size=16, uratio=2)
    images = batch["unlabeled"]["plain"]
    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with batch_norm_noise(model.net, 0.3) as found:
        assert found == len(norms) > 0
    before = copy.deepcopy(model.net.state_dict())
    first, second = model.corrupted_logits(images), model.corrupted_logits(images)
    assert not torch.allclose(first, second)  # fresh noise each pass
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())
    assert not model.net._forward_hooks and not any(m._forward_hooks for m in norms)  # hooks removed
    model.compute_losses(batch)
    assert not torch.equal(before[next(k for k in before if k.endswith("running_mean"))],
                           model.net.state_dict()[next(k for k in before if k.endswith("running_mean"))])


def test_ladder_gamma_trains_on_digits_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = LadderGamma(**SMALL_NET)
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3))
    assert trainer.global_step == 3 and isinstance(trainer.optimizers[0], torch.optim.Adam)
    for key in ("net.fc.weight", "combinator.a.9"):
        assert not torch.equal(before[key], model.state_dict()[key]), key

"""The fast-path options (core/fast_path.py) give the plain path's losses and gradients on the same batch.

One batch of real CIFAR-10 images (the shared JPEGs) with FixMatch's views, the same initial weights; each
option's losses, gradients and BatchNorm running statistics against the plain path's. Tolerances:
``channels_last`` and ``compile`` reorder float sums (losses 1e-5 and 1e-4, the gradient 1e-2 of its norm;
``channels_last`` also in float64, to 1e-10);
``no_grad_target_views`` with ``concat_forward=False`` runs the same kernels on the same batches (exact);
bf16 autocast keeps 8 bits of mantissa (losses within 2 %, gradients' cosine similarity above 0.99).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from datamodules.classification.augment import normalize, strong_augment, weak_augment
from lightning_modules import Detector, FixMatch, Supervised, SegFixMatch, VAT

CIFAR = dict(num_classes=10, in_channels=3, network="wrn10_1", network_kwargs={"bn_momentum": 0.1})
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture(scope="module")
def batch(cifar_images):
    """8 labeled (weak view) and 24 unlabeled (weak, strong) real CIFAR-10 images, seeded."""
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled = cifar_images[:8], cifar_images[8:32]
    view = lambda x: normalize(x, MEAN, STD)  # noqa: E731
    return {"labeled": {"image": view(weak_augment(labeled, generator=generator)), "target": torch.arange(8) % 10,
                        "index": torch.arange(8)},
            "unlabeled": {"weak": view(weak_augment(unlabeled, generator=generator)),
                          "strong": view(strong_augment(unlabeled, generator=generator)),
                          "target": torch.full((24,), -1), "index": torch.arange(8, 32)}}


def step(model, batch):
    """Losses, gradients and BatchNorm buffers of one training forward and backward."""
    model.train()
    model.zero_grad()
    losses = model.compute_losses(batch)
    model.total_loss(losses).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.net.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.net.named_buffers()}
    return {k: v.detach() for k, v in losses.items()}, grads, buffers


def pair(options, method=FixMatch, **kwargs):
    """A plain model and one with ``options``, with the same initial weights."""
    torch.manual_seed(0)
    plain = method(**CIFAR, threshold=0.0, **kwargs)  # threshold 0: every pseudo-label counts
    fast = method(**CIFAR, threshold=0.0, **kwargs, **options)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def assert_close(expected, actual, rtol, grad_rel):
    """Losses and BatchNorm buffers within ``rtol``; the whole gradient within ``grad_rel`` of its norm."""
    (losses, grads, buffers), (fast_losses, fast_grads, fast_buffers) = expected, actual
    assert losses.keys() == fast_losses.keys()
    for name in losses:
        torch.testing.assert_close(fast_losses[name], losses[name], rtol=rtol, atol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in buffers:
        torch.testing.assert_close(fast_buffers[name], buffers[name], rtol=rtol, atol=rtol)
    want = torch.cat([g.flatten() for g in grads.values()])
    got = torch.cat([fast_grads[name].flatten() for name in grads])
    assert (got - want).norm() <= grad_rel * want.norm(), float((got - want).norm() / want.norm())


def in_float64(model, batch):
    model.double()
    if model.ema is not None:
        model.ema.module.double()
    return {part: {k: v.double() if v.is_floating_point() else v for k, v in values.items()}
            for part, values in batch.items()}


def test_channels_last_computes_the_plain_step(batch, one_thread):
    """In float64 the same numbers (1e-10): the same function. In float32 the CPU's channels_last kernels
    round differently: on this step the gradient is 3.5e-3 of its norm from float64's, the contiguous path's
    6.4e-4 (BatchNorm's backward amplifies rounding); allowed 1e-2, losses and statistics 1e-5."""
    plain, fast = pair({"channels_last": True})
    assert next(p for p in fast.net.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    assert next(p for p in fast.ema.module.parameters() if p.ndim == 4).is_contiguous(
        memory_format=torch.channels_last)  # the EMA copy was made after the conversion
    assert_close(step(plain, batch), step(fast, batch), rtol=1e-5, grad_rel=1e-2)
    with torch.no_grad():  # evaluation goes through the same pre-hook
        images = batch["labeled"]["image"]
        torch.testing.assert_close(fast.net.eval()(images), plain.net.eval()(images), rtol=1e-4, atol=1e-4)
    plain, fast = pair({"channels_last": True})
    batch64 = in_float64(plain, batch)
    in_float64(fast, batch)
    assert_close(step(plain, batch64), step(fast, batch64), rtol=1e-10, grad_rel=1e-10)


def test_target_views_without_gradient_change_nothing_when_views_are_forwarded_apart(batch, one_thread):
    plain, fast = pair({"no_grad_target_views": True}, concat_forward=False)
    expected, actual = step(plain, batch), step(fast, batch)
    assert_close(expected, actual, rtol=0, grad_rel=0)  # same kernels, same batches, same order


def test_target_views_without_gradient_with_concat_forward_normalize_the_weak_view_alone(batch, one_thread):
    """With ``concat_forward`` (the default) the weak view's BatchNorm statistics become its own: different
    numbers (why the option is off by default), equal to forwarding the weak view alone and the rest together."""
    plain, fast = pair({"no_grad_target_views": True})
    reference = copy.deepcopy(plain.net).train()
    labeled, weak, strong = batch["labeled"]["image"], batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]
    logits = fast.forward_views([labeled, weak, strong], no_grad=[False, True, False])
    assert [x.requires_grad for x in logits] == [True, False, True]
    with torch.no_grad():
        weak_alone = reference(weak)
        rest = reference(torch.cat([labeled, strong])).split([8, 24])
    for got, want in zip(logits, [rest[0], weak_alone, rest[1]]):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    plain_weak = plain.forward_views([labeled, weak, strong])[1]
    assert not torch.allclose(plain_weak, logits[1], atol=1e-3)  # the whole step's statistics differ


def test_compile_gives_the_plain_losses_and_gradients(batch, one_thread):
    plain, fast = pair({"compile": True})
    expected, actual = step(plain, batch), step(fast, batch)
    assert_close(expected, actual, rtol=1e-4, grad_rel=1e-2)
    assert fast.fast_path._compiled is not None
    copied = copy.deepcopy(fast)  # the EMA callback deep-copies modules: the copy compiles its own network
    assert copied.fast_path._compiled is None and fast.fast_path._compiled is not None


def test_bf16_autocast_stays_within_bf16_tolerance(batch, one_thread):
    plain, fast = pair({})
    expected = step(plain, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = fast.compute_losses(batch)
        total = fast.total_loss(losses)
    fast.zero_grad()
    total.backward()
    for name, value in expected[0].items():
        torch.testing.assert_close(losses[name].float(), value, rtol=2e-2, atol=1e-2, msg=lambda m, name=name: f"{name}: {m}")
    got = torch.cat([p.grad.flatten() for p in fast.net.parameters()])
    want = torch.cat([g.flatten() for g in expected[1].values()])
    assert F.cosine_similarity(got, want, dim=0) > 0.99


def test_the_views_do_not_depend_on_the_options(one_thread):
    """Augmentation happens in the DataModule before the model sees a batch: the same seed gives the same
    views, and the channels_last copy the network gets holds the same values (statistics unchanged)."""
    data = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=1, unlabeled_views=["weak", "strong"])
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))[0]
    seen = []
    for options in ({}, {"channels_last": True, "no_grad_target_views": True}):
        model = FixMatch(num_classes=10, in_channels=1, network="wrn10_1", **options)
        inputs = []
        model.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
        torch.manual_seed(0)
        views = data.on_after_batch_transfer(raw, 0)
        with torch.no_grad():
            model.forward_views([views["labeled"]["image"], views["unlabeled"]["weak"], views["unlabeled"]["strong"]])
        seen.append((views, torch.cat(inputs)))
    (plain_views, plain_inputs), (fast_views, fast_inputs) = seen
    for name in ("weak", "strong"):
        assert torch.equal(plain_views["unlabeled"][name], fast_views["unlabeled"][name])
    assert torch.equal(plain_views["labeled"]["image"], fast_views["labeled"]["image"])
    assert fast_inputs.is_contiguous(memory_format=torch.channels_last) or fast_inputs.shape[1] == 1
    torch.testing.assert_close(fast_inputs.mean(dim=(0, 2, 3)), plain_inputs.mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_inputs.std(dim=(0, 2, 3)), plain_inputs.std(dim=(0, 2, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, options, match", [
    (FixMatch, {"compile": True, "compile_mode": "reduce-overhead"}, "captures CUDA graphs"),
    (FixMatch, {"compile_mode": "fast"}, "compile_mode must be one of"),
    (Supervised, {"no_grad_target_views": True}, "no view used only as a target"),
    (VAT, {"no_grad_target_views": True, "concat_forward": False}, "no view used only as a target"),
    (SegFixMatch, {"compile": True}, "forwards its views itself"),
    (Detector, {"compile": True}, "computes its own losses"),
])
def test_options_that_would_do_nothing_or_are_unsafe_are_refused(method, options, match):
    kwargs = dict(num_classes=2, in_channels=1, network="Unet", network_kwargs={"encoder_name": "resnet18"}) if method is SegFixMatch else CIFAR
    if method is Detector:
        kwargs = dict(num_classes=3, network="fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(ValueError, match=match):
        method(**kwargs, **options)

"""FixMatch, UDA, MixMatch and ReMixMatch against the authors' code, one training step each.

Each test runs the method's real ``compute_losses`` on a real digits batch through a real network,
then recomputes the step in plain tensor arithmetic, line by line after the authors' released code
(cited per line), from a copy of the network taken before the step. Nothing from
``lightning_modules.ssl.losses`` or the methods' helpers computes an expected value.

Where a method draws random numbers (mixup's ``lam`` and permutation, the rotations), the test seeds
the generator before the step and draws again, in the same order, for the reference.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import FixMatch, MixMatch, ReMixMatch, UDA
from tests.ssl_helpers import SMALL_NET, digits_batch, spread_confidences, step_and_reference_logits


def _soft_ce(logits, targets):  # USB core/criterions/cross_entropy.py lines 21-28
    return (-targets * F.log_softmax(logits, dim=-1)).sum(dim=1).mean()


def _draw_mixup(seed, alpha, n):
    """The step's mixup draw, as USB ``algorithms/utils/ops.py`` lines 48-63 takes it: one lam, biased to >= 0.5."""
    torch.manual_seed(seed)
    lam = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample()
    return torch.maximum(lam, 1 - lam), torch.randperm(n)


# --- FixMatch -------------------------------------------------------------------------------
def test_fixmatch_matches_reference_train_step():
    """Sohn et al. 2020, Eq. 2-4; USB ``algorithms/fixmatch/fixmatch.py`` lines 53-98 (``use_cat``),
    ``hooks/masking.py`` lines 47-57, ``hooks/pseudo_label.py`` lines 37-43,
    ``core/criterions/consistency.py`` lines 14-40; google-research/fixmatch ``fixmatch.py`` lines 99-118."""
    torch.manual_seed(0)
    model = spread_confidences(FixMatch(**SMALL_NET))  # tau = 0.95, lambda_u = 1
    batch = digits_batch(model, batch_size=8, uratio=2)
    losses, total, (logits_x, logits_w, logits_s) = step_and_reference_logits(model, batch)
    y = batch["labeled"]["target"]
    sup = F.nll_loss(F.log_softmax(logits_x, -1), y)
    max_probs, pseudo_label = torch.softmax(logits_w, -1).max(-1)
    mask = max_probs.ge(0.95).float()
    unsup = (F.nll_loss(F.log_softmax(logits_s, -1), pseudo_label, reduction="none") * mask).mean()
    assert 0 < mask.mean() < 1

    torch.testing.assert_close(losses["labeled_loss"], sup)
    torch.testing.assert_close(losses["unlabeled_loss"], unsup)
    torch.testing.assert_close(losses["mask_ratio"], mask.mean())
    torch.testing.assert_close(total, sup + 1.0 * unsup)


# --- UDA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tsa", [None, "exp"])
def test_uda_matches_reference_train_step(tsa):
    """Xie et al. 2020, Eq. 2 and TSA; google-research/uda ``image/main.py`` lines 316-333 (one
    forward over labeled, original and augmented images), 178-190 and 270-290 (TSA: drop a labeled
    example whose correct-class probability exceeds eta, average over the kept ones), 261-267 and
    352-385 (KL from the tempered original to the augmented prediction, confidence mask on the
    untempered one, mean over the batch)."""
    torch.manual_seed(0)
    model = spread_confidences(UDA(tsa=tsa, **SMALL_NET))  # T = 0.4, tau = 0.8, lambda_u = 1
    batch = digits_batch(model, batch_size=8, uratio=2)
    losses, total, (sup_logits, ori_logits, aug_logits) = step_and_reference_logits(model, batch)
    y = batch["labeled"]["target"]
    sup_loss = F.nll_loss(F.log_softmax(sup_logits, -1), y, reduction="none")
    if tsa is None:
        avg_sup_loss = sup_loss.mean()
    else:  # step 0 of the schedule (no trainer): coeff = exp((0 - 1) * 5), start 1/K, end 1
        eta = torch.exp(torch.tensor(-5.0)) * (1 - 1 / 10) + 1 / 10
        correct_label_probs = (F.one_hot(y, 10) * torch.softmax(sup_logits, -1)).sum(-1)
        loss_mask = 1 - (correct_label_probs > eta).float()
        assert 0 < loss_mask.mean() < 1
        avg_sup_loss = (sup_loss * loss_mask).sum() / torch.clamp(loss_mask.sum(), min=1)
    p = torch.softmax(ori_logits / 0.4, -1)
    kl = (p * (F.log_softmax(ori_logits / 0.4, -1) - F.log_softmax(aug_logits, -1))).sum(-1)
    loss_mask = (torch.softmax(ori_logits, -1).max(-1).values > 0.8).float()
    assert 0 < loss_mask.mean() < 1
    avg_unsup_loss = (kl * loss_mask).mean()

    torch.testing.assert_close(losses["labeled_loss"], avg_sup_loss)
    torch.testing.assert_close(losses["unlabeled_loss"], avg_unsup_loss)
    torch.testing.assert_close(total, avg_sup_loss + 1.0 * avg_unsup_loss)
    # USB (algorithms/uda/uda.py lines 92-101) trains the cross-entropy to the same soft targets:
    # the same gradient, a value larger by the masked targets' entropy. (Its TSA, lines 75-78, masks
    # by the largest probability over all classes and averages over all rows; we follow the official code.)
    usb_unsup = (-(p * F.log_softmax(aug_logits, -1)).sum(-1) * loss_mask).mean()
    entropy = (-(p * torch.log(p)).sum(-1) * loss_mask).mean()
    torch.testing.assert_close(losses["unlabeled_loss"], usb_unsup - entropy)


# --- MixMatch -------------------------------------------------------------------------------
@pytest.mark.parametrize("concat_forward", [False, True])
def test_mixmatch_matches_reference_train_step(concat_forward):
    """Berthelot et al. 2019, Algorithm 1 and Eq. 2-5; USB ``algorithms/mixmatch/mixmatch.py`` lines
    51-122 (guess from two views with BatchNorm frozen, sharpen, mix labeled and both views, CE on the
    labeled rows, MSE on the rest); google-research/mixmatch ``mixmatch.py`` lines 40-50 and 81-84.
    With ``mu = 1`` and ``concat_forward=False`` our forwards are USB's (one per view, one per
    labeled-size chunk of the mix); with ``concat_forward`` the reference forwards the same rows as one batch."""
    torch.manual_seed(0)
    model = MixMatch(concat_forward=concat_forward, unlabeled_loss_weight=75.0, rampup=None, **SMALL_NET)
    batch = digits_batch(model, batch_size=8, uratio=1)
    net = copy.deepcopy(model.net)
    torch.manual_seed(1)
    losses = model.compute_losses(batch)
    total = model.total_loss(losses)

    forward = (lambda xs: list(net(torch.cat(xs)).split([len(v) for v in xs]))) if concat_forward else \
        (lambda xs: [net(v) for v in xs])
    x_lb, y_lb = batch["labeled"]["image"], batch["labeled"]["target"]
    x_ulb_w, x_ulb_w2 = batch["unlabeled"]["weak"], batch["unlabeled"]["weak2"]
    num_lb = len(y_lb)
    with torch.no_grad():
        logits_w1, logits_w2 = forward([x_ulb_w, x_ulb_w2])
        avg_prob = (torch.softmax(logits_w1, -1) + torch.softmax(logits_w2, -1)) / 2
        sharpen = avg_prob ** (1 / 0.5)
        sharpen = sharpen / sharpen.sum(-1, keepdim=True)
        input_labels = torch.cat([F.one_hot(y_lb, 10).float(), sharpen, sharpen])
        inputs = torch.cat([x_lb, x_ulb_w, x_ulb_w2])
        lam, index = _draw_mixup(1, 0.75, len(inputs))
        mixed_x = lam * inputs + (1 - lam) * inputs[index]
        mixed_y = lam * input_labels + (1 - lam) * input_labels[index]
        logits = forward(list(mixed_x.split(num_lb)))
    logits_x, logits_u = logits[0], torch.cat(logits[1:])
    sup = _soft_ce(logits_x, mixed_y[:num_lb])
    unsup = F.mse_loss(torch.softmax(logits_u, -1), mixed_y[num_lb:], reduction="none").mean(1).mean()

    torch.testing.assert_close(losses["mixup_lambda"], lam)
    torch.testing.assert_close(losses["labeled_loss"], sup)
    torch.testing.assert_close(losses["unlabeled_loss"], unsup)
    torch.testing.assert_close(total, sup + 75.0 * unsup)


# --- ReMixMatch -----------------------------------------------------------------------------
@pytest.mark.parametrize("concat_forward", [False, True])
def test_remixmatch_matches_reference_train_step(concat_forward):
    """Berthelot et al. 2020, Algorithm 1 and Eq. 1-5; USB ``algorithms/remixmatch/remixmatch.py``
    lines 91-98 (target = labeled class distribution), 120-134 (guess on the weak view with BatchNorm
    frozen, aligned, sharpened), 137-152 (mix labeled, both strong views and the weak view), 153-198
    (CE on the mixed labeled rows, CE on the mixed unlabeled rows, CE of the first strong view to the
    guess, rotation CE on the rotated first strong view); ``hooks/dist_align.py`` lines 26-33 and
    48-49 (first step: ``p_model`` is this batch's mean); google-research/remixmatch
    ``remixmatch_no_cta.py`` lines 52-59, 93-126. Forwards as in the MixMatch test."""
    torch.manual_seed(0)
    # T 0.5, alpha 0.75, 1.5 / 0.5 / 0.5; no ramp, so step 0 carries the full weights
    model = ReMixMatch(concat_forward=concat_forward, rampup=None, **SMALL_NET)
    batch, dm = digits_batch(model, batch_size=8, uratio=1, return_datamodule=True)
    counts = torch.bincount(dm._train[1][dm.split.labeled], minlength=10).float()
    lb_class_dist = counts / counts.sum()
    model.da_target.copy_(lb_class_dist)  # what fit start reads from the DataModule
    net, rot_classifier = copy.deepcopy(model.net), copy.deepcopy(model.rotation_head)
    torch.manual_seed(1)
    losses = model.compute_losses(batch)
    total = model.total_loss(losses)

    x_lb, y_lb = batch["labeled"]["image"], batch["labeled"]["target"]
    x_ulb_w, x_ulb_s_0, x_ulb_s_1 = (batch["unlabeled"][v] for v in ("weak", "strong", "strong2"))
    num_lb = len(y_lb)
    with torch.no_grad():
        probs = torch.softmax(net(x_ulb_w), -1)
        p_model = probs.mean(0)
        prob_x_ulb = probs * (lb_class_dist + 1e-6) / (p_model + 1e-6)
        prob_x_ulb = prob_x_ulb / prob_x_ulb.sum(-1, keepdim=True)
        sharpen = prob_x_ulb ** (1 / 0.5)
        sharpen = sharpen / sharpen.sum(-1, keepdim=True)
        input_labels = torch.cat([F.one_hot(y_lb, 10).float(), sharpen, sharpen, sharpen])
        inputs = torch.cat([x_lb, x_ulb_s_0, x_ulb_s_1, x_ulb_w])
        lam, index = _draw_mixup(1, 0.75, len(inputs))
        rot_v = torch.randint(0, 4, (len(x_ulb_s_0),))
        x_ulb_s_0_rot = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x_ulb_s_0, rot_v)])
        mixed_x = lam * inputs + (1 - lam) * inputs[index]
        mixed_y = lam * input_labels + (1 - lam) * input_labels[index]
        chunks = list(mixed_x.split(num_lb)) + [x_ulb_s_0]
        if concat_forward:
            feat = net.forward_features(torch.cat(chunks + [x_ulb_s_0_rot]))
            class_feat, rot_feat = feat.split([len(mixed_x) + len(x_ulb_s_0), len(x_ulb_s_0_rot)])
            logits = list(net.fc(class_feat).split(num_lb))
        else:
            logits = [net(c) for c in chunks]
            rot_feat = net.forward_features(x_ulb_s_0_rot)
        logits_rot = rot_classifier(rot_feat)
    logits_x, logits_u, u1_logits = logits[0], torch.cat(logits[1:4]), logits[4]
    sup = _soft_ce(logits_x, mixed_y[:num_lb])
    unsup = _soft_ce(logits_u, mixed_y[num_lb:])
    u1 = _soft_ce(u1_logits, sharpen)
    rot = F.cross_entropy(logits_rot, rot_v)

    model.step_state.commit()  # what the base does after the optimizer step
    torch.testing.assert_close(model.model_marginal(), p_model)
    torch.testing.assert_close(losses["mixup_lambda"], lam)
    torch.testing.assert_close(losses["labeled_loss"], sup)
    torch.testing.assert_close(losses["unlabeled_loss"], unsup)
    torch.testing.assert_close(losses["strong_loss"], u1)
    torch.testing.assert_close(losses["rotation_loss"], rot)
    torch.testing.assert_close(total, sup + 0.5 * u1 + 1.5 * unsup + 0.5 * rot)

"""FlexMatch, FreeMatch and SoftMatch against the authors' code, their state stepped over several batches.

Each test feeds the same fixed weak/strong logits to the method's real ``unlabeled_loss`` and to a
plain re-implementation of the authors' recurrence (USB, cited per line), and compares the state and
the loss after every step. Nothing from ``lightning_modules`` computes an expected value.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import FlexMatch, FreeMatch, SoftMatch

NET = dict(in_channels=1, network="wrn10_1")


def _batches(num_classes, size, steps=3, scale=3.0, bias=0.0, seed=0):
    """Seeded weak and strong logits; ``bias`` favours class 0 so that the class marginal is skewed."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(num_classes)
    shift[0] = bias
    return [(torch.randn(size, num_classes, generator=g) * scale + shift,
             torch.randn(size, num_classes, generator=g) * scale) for _ in range(steps)]


def _ce(logits, labels):
    return F.nll_loss(F.log_softmax(logits, -1), labels, reduction="none")


# --- FlexMatch ------------------------------------------------------------------------------
class _FlexMatchThresholdingHook:
    """USB ``algorithms/flexmatch/utils.py`` lines 15-63, single process."""

    def __init__(self, ulb_dest_len, num_classes, thresh_warmup):
        self.ulb_dest_len, self.num_classes, self.thresh_warmup = ulb_dest_len, num_classes, thresh_warmup
        self.selected_label = torch.ones((ulb_dest_len,), dtype=torch.long) * -1
        self.classwise_acc = torch.zeros((num_classes,))

    def update(self):
        pseudo_counter = Counter(self.selected_label.tolist())
        if max(pseudo_counter.values()) < self.ulb_dest_len:
            if self.thresh_warmup:
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(pseudo_counter.values())
            else:
                wo_negative_one = {k: v for k, v in pseudo_counter.items() if k != -1}
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(wo_negative_one.values())

    def masking(self, probs_x_ulb, idx_ulb, p_cutoff):
        max_probs, max_idx = torch.max(probs_x_ulb, dim=-1)
        acc = self.classwise_acc[max_idx]
        mask = max_probs.ge(p_cutoff * (acc / (2.0 - acc))).float()  # the convex mapping
        select = max_probs.ge(p_cutoff)
        if idx_ulb[select].nelement() != 0:
            self.selected_label[idx_ulb[select]] = max_idx[select]
        self.update()
        return mask


@pytest.mark.parametrize("thresh_warmup", [True, False])
def test_flexmatch_matches_reference_over_four_steps(thresh_warmup):
    """Zhang et al. 2021, Eq. 6-11; USB ``algorithms/flexmatch/flexmatch.py`` lines 86-109 (mask from
    the weak view, hard pseudo-labels, masked CE averaged over the batch) and the hook above."""
    num_classes, ulb_dest_len, p_cutoff = 4, 10, 0.95
    model = FlexMatch(num_classes=num_classes, num_unlabeled=ulb_dest_len, threshold=p_cutoff,
                      threshold_warmup=thresh_warmup, **NET)
    hook = _FlexMatchThresholdingHook(ulb_dest_len, num_classes, thresh_warmup)
    g = torch.Generator().manual_seed(1)
    masks = []
    for weak, strong in _batches(num_classes, 10, steps=4, scale=4.0):
        idx_ulb = torch.randperm(ulb_dest_len, generator=g)  # every sample again: later steps overwrite
        out = model.unlabeled_loss({"weak": weak, "strong": strong},
                                   {"index": idx_ulb, "target": torch.full((10,), -1)})
        model.step_state.commit()  # what the base does after the optimizer step
        probs = torch.softmax(weak, -1)
        mask = hook.masking(probs, idx_ulb, p_cutoff)
        unsup = (_ce(strong, probs.argmax(-1)) * mask).mean()
        masks.append(mask)

        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["unlabeled_loss"], unsup)
        assert model.memory.tolist() == hook.selected_label.tolist()
        acc = hook.classwise_acc
        torch.testing.assert_close(model.class_thresholds(), p_cutoff * acc / (2.0 - acc))
    thresholds = model.class_thresholds()
    assert ((thresholds > 0) & (thresholds < p_cutoff)).any()  # the state really moved
    assert any(0 < m.mean() < 1 for m in masks)


# --- FreeMatch ------------------------------------------------------------------------------
def _entropy_loss(mask, logits_s, prob_model, label_hist):
    """USB ``algorithms/freematch/freematch.py`` lines 16-44."""
    logits_s = logits_s[mask.bool()]
    prob_s = logits_s.softmax(dim=-1)
    hist_s = torch.bincount(prob_s.argmax(-1), minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    inv = lambda v: torch.where(torch.isinf(1 / v), torch.zeros_like(v), 1 / v)
    mod_prob_model = prob_model * inv(label_hist)
    mod_prob_model = mod_prob_model / mod_prob_model.sum()
    mod_mean_prob_s = prob_s.mean(0) * inv(hist_s)
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum()
    return (mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)).sum()


def test_freematch_matches_reference_over_three_steps():
    """Wang et al. 2023, Eq. 5-12; USB ``algorithms/freematch/utils.py`` lines 14-66 (SAT: ``time_p``,
    ``p_model``, ``label_hist`` started at 1/C and updated before masking; ``use_quantile`` off as in
    its released configs) and ``freematch.py`` lines 96-118 (masked CE, fairness term when any row passes)."""
    num_classes, m, lambda_e = 4, 0.5, 0.01  # a short memory: the state follows the batches
    model = FreeMatch(num_classes=num_classes, ema_momentum=m, fairness_weight=lambda_e, **NET)
    p_model = torch.ones(num_classes) / num_classes
    label_hist = torch.ones(num_classes) / num_classes
    time_p = p_model.mean()
    for weak, strong in _batches(num_classes, 16, bias=1.0):
        out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": torch.full((16,), -1)})
        model.step_state.commit()
        probs_x_ulb = torch.softmax(weak, -1)
        max_probs, max_idx = probs_x_ulb.max(-1)
        time_p = time_p * m + (1 - m) * max_probs.mean()
        p_model = p_model * m + (1 - m) * probs_x_ulb.mean(0)
        hist = torch.bincount(max_idx, minlength=num_classes).float()
        label_hist = label_hist * m + (1 - m) * hist / hist.sum()
        mask = max_probs.ge(time_p * (p_model / p_model.max())[max_idx]).float()
        unsup = (_ce(strong, max_idx) * mask).mean()
        ent = _entropy_loss(mask, strong, p_model, label_hist) if mask.sum() > 0 else torch.tensor(0.0)
        assert 0 < mask.mean() < 1

        torch.testing.assert_close(model.global_threshold, time_p)
        torch.testing.assert_close(model.class_model, p_model)
        torch.testing.assert_close(model.label_hist, label_hist)
        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["unlabeled_loss"], unsup)
        torch.testing.assert_close(out["fairness_loss"], ent)
        sup = torch.tensor(0.7)
        total = model.total_loss({"labeled_loss": sup, **out})
        torch.testing.assert_close(total, sup + 1.0 * unsup + lambda_e * ent)


# --- SoftMatch ------------------------------------------------------------------------------
@pytest.mark.parametrize("uniform_alignment", [True, False])
def test_softmatch_matches_reference_over_three_steps(uniform_alignment):
    """Chen et al. 2023, Eq. 7-9 and uniform alignment (Sec. 3.3); USB ``algorithms/softmatch/softmatch.py``
    lines 83-104 (UA on the weak-view probabilities, weights from the aligned ones, hard pseudo-labels
    from the raw logits), ``hooks/dist_align.py`` lines 26-55 (``p_model`` starts as the first batch's
    mean, then an EMA; target uniform), ``softmatch/utils.py`` lines 23-40 and 53-77 (``mu_0 = 1/C``,
    ``var_0 = 1``, EMA of the batch mean and unbiased variance of the aligned max-probabilities, then
    the truncated Gaussian with standard deviation ``sqrt(var) / n_sigma``). USB always registers the
    alignment hook; without UA the reference skips that hook and is otherwise the same."""
    num_classes, m, n_sigma = 4, 0.5, 2  # a short memory: the state follows the batches
    model = SoftMatch(num_classes=num_classes, ema_momentum=m, n_sigma=n_sigma,
                      uniform_alignment=uniform_alignment, **NET)
    p_target = torch.ones(num_classes) / num_classes
    p_model = None
    prob_max_mu_t, prob_max_var_t = torch.tensor(1.0 / num_classes), torch.tensor(1.0)
    flipped, masks = 0, []
    for weak, strong in _batches(num_classes, 16, bias=1.5):
        raw_argmax = weak.argmax(-1)
        out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": raw_argmax})
        model.step_state.commit()
        probs_x_ulb_w = torch.softmax(weak, -1)
        if uniform_alignment:
            batch_mean = probs_x_ulb_w.mean(0)
            p_model = batch_mean if p_model is None else p_model * m + batch_mean * (1 - m)
            probs_x_ulb_w = probs_x_ulb_w * (p_target + 1e-6) / (p_model + 1e-6)
            probs_x_ulb_w = probs_x_ulb_w / probs_x_ulb_w.sum(-1, keepdim=True)
        max_probs, max_idx = probs_x_ulb_w.max(-1)
        prob_max_mu_t = m * prob_max_mu_t + (1 - m) * max_probs.mean()
        prob_max_var_t = m * prob_max_var_t + (1 - m) * max_probs.var(unbiased=True)
        mask = torch.exp(-(torch.clamp(max_probs - prob_max_mu_t, max=0.0) ** 2) / (2 * prob_max_var_t / n_sigma**2))
        pseudo_label = raw_argmax
        unsup = (_ce(strong, pseudo_label) * mask).mean()
        flipped += int((max_idx != pseudo_label).sum())
        masks.append(mask)

        if uniform_alignment:
            torch.testing.assert_close(model.prob_mean, p_model)
        torch.testing.assert_close(model.conf_mean, prob_max_mu_t)
        torch.testing.assert_close(model.conf_var, prob_max_var_t)
        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["unlabeled_loss"], unsup)
        torch.testing.assert_close(out["pseudo_label_acc"], torch.tensor(1.0))
    masks = torch.cat(masks)
    assert (masks < 1).any() and (masks == 1).any()  # both sides of the truncated Gaussian are used
    assert flipped > 0 or not uniform_alignment  # alignment changed some argmax: the pseudo-label rule is tested

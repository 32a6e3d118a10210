"""AdaMatch and Dash against the authors' code (USB), their state stepped over several batches, and in training.

The reference tests feed the same logits to the method's real loss and to a plain re-implementation of
USB's hooks (cited per line), and compare state, mask and loss after every step. Nothing from
``lightning_modules`` computes an expected value.
"""

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import AdaMatch, Dash
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer, spread_confidences, step_and_reference_logits

NET = dict(in_channels=1, network="wrn10_1")


def _logits(num_classes, size, steps, scale=3.0, bias=0.0, seed=0):
    """Seeded (labeled, weak, strong) logits; ``bias`` favours class 0 on the unlabeled views."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(num_classes)
    shift[0] = bias
    return [(torch.randn(size // 2, num_classes, generator=g) * scale,
             torch.randn(size, num_classes, generator=g) * scale + shift,
             torch.randn(size, num_classes, generator=g) * scale) for _ in range(steps)]


def _ce(logits, targets):  # USB core/criterions/cross_entropy.py lines 21-31, reduction='none'
    log_pred = F.log_softmax(logits, dim=-1)
    if logits.shape == targets.shape:
        return torch.sum(-targets * log_pred, dim=1)
    return F.nll_loss(log_pred, targets, reduction="none")


# --- AdaMatch -------------------------------------------------------------------------------
class _DistAlignEMAHook:
    """USB ``algorithms/hooks/dist_align.py`` lines 10-72 with ``p_target_type='model'``, single process."""

    def __init__(self, num_classes, m):
        self.m, self.p_target, self.p_model = m, torch.ones((num_classes,)) / num_classes, None

    def dist_align(self, probs_x_ulb, probs_x_lb):
        if self.p_model is None:
            self.p_model = torch.mean(probs_x_ulb, dim=0)
        else:
            self.p_model = self.p_model * self.m + torch.mean(probs_x_ulb, dim=0) * (1 - self.m)
        self.p_target = self.p_target * self.m + torch.mean(probs_x_lb, dim=0) * (1 - self.m)
        aligned = probs_x_ulb * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)


def test_adamatch_matches_reference_over_three_steps():
    """Berthelot et al. 2022 (relative threshold, distribution alignment); USB ``algorithms/adamatch/adamatch.py``
    lines 83-109 (softmax of the detached labeled and weak logits, alignment, mask, hard labels from the
    aligned probabilities, masked CE over the batch), ``adamatch/utils.py`` lines 29-32 and the hook above."""
    num_classes, m, p_cutoff = 4, 0.5, 0.95  # a short memory: the marginals follow the batches
    model = AdaMatch(num_classes=num_classes, threshold=p_cutoff, ema_momentum=m, **NET)
    hook = _DistAlignEMAHook(num_classes, m)
    flipped, masks = 0, []
    for logits_x_lb, logits_x_ulb_w, logits_x_ulb_s in _logits(num_classes, 16, steps=3, bias=1.5):
        out = model.unlabeled_loss({"labeled": logits_x_lb, "weak": logits_x_ulb_w, "strong": logits_x_ulb_s},
                                   {"target": logits_x_ulb_w.argmax(-1)})
        model.step_state.commit()  # what the base does after the optimizer step
        probs_x_lb = torch.softmax(logits_x_lb, dim=-1)
        probs_x_ulb_w = hook.dist_align(torch.softmax(logits_x_ulb_w, dim=-1), probs_x_lb)
        p_cutoff_t = probs_x_lb.max(dim=-1)[0].mean() * p_cutoff
        mask = probs_x_ulb_w.max(dim=-1)[0].ge(p_cutoff_t).float()
        pseudo_label = torch.argmax(probs_x_ulb_w, dim=-1)
        unsup = (_ce(logits_x_ulb_s, pseudo_label) * mask).mean()
        flipped += int((pseudo_label != logits_x_ulb_w.argmax(-1)).sum())
        masks.append(mask)

        torch.testing.assert_close(model.da_model_marginal, hook.p_model)
        torch.testing.assert_close(model.da_target_marginal, hook.p_target)
        torch.testing.assert_close(out["relative_threshold"], p_cutoff_t)
        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["unlabeled_loss"], unsup)
    masks = torch.cat(masks)
    assert 0 < masks.mean() < 1  # the relative threshold keeps some rows and drops others
    assert flipped > 0  # alignment changed some argmax: the pseudo-labels come from the aligned probabilities


def test_adamatch_matches_reference_train_step_on_digits():
    """The whole step through a real ``wrn10_1`` on real digits: USB ``adamatch.py`` lines 61-66 (``use_cat``:
    one forward over labeled, weak and strong images), 83 (labeled CE) and 109 (``sup + lambda_u * unsup``)."""
    torch.manual_seed(0)
    # a lower tau: an untrained network is unsure everywhere
    model = spread_confidences(AdaMatch(threshold=0.5, **SMALL_NET), bias=False)
    batch = digits_batch(model, batch_size=8, uratio=2)
    losses, total, (logits_x_lb, logits_x_ulb_w, logits_x_ulb_s) = step_and_reference_logits(model, batch)
    y = batch["labeled"]["target"]
    probs_x_lb, probs_x_ulb_w = torch.softmax(logits_x_lb, -1), torch.softmax(logits_x_ulb_w, -1)
    p_model, p_target = probs_x_ulb_w.mean(0), 0.999 * torch.ones(10) / 10 + 0.001 * probs_x_lb.mean(0)
    aligned = probs_x_ulb_w * (p_target + 1e-6) / (p_model + 1e-6)
    aligned = aligned / aligned.sum(-1, keepdim=True)
    mask = aligned.max(-1)[0].ge(probs_x_lb.max(-1)[0].mean() * 0.5).float()
    unsup = (_ce(logits_x_ulb_s, aligned.argmax(-1)) * mask).mean()
    sup = _ce(logits_x_lb, y).mean()
    assert 0 < mask.mean() < 1

    torch.testing.assert_close(losses["labeled_loss"], sup)
    torch.testing.assert_close(losses["unlabeled_loss"], unsup)
    torch.testing.assert_close(total, sup + 1.0 * unsup)


# --- Dash -----------------------------------------------------------------------------------
class _DashThresholdingHook:
    """USB ``algorithms/dash/utils.py`` lines 14-51, with ``algorithm.it`` counted from the end of the
    warm-up (``dash.py`` line 153) and ``10 * num_iter_per_epoch`` given as ``period``."""

    def __init__(self, rho_min, gamma, C, rho_init, period, T):
        self.rho_min, self.gamma, self.C, self.rho_init, self.period, self.T = rho_min, gamma, C, rho_init, period, T
        self.rho_update_cnt, self.rho, self.use_hard_label = 0, None, False

    def masking(self, it, logits_x_ulb):
        if it % self.period == 0:
            self.rho = max(self.C * (self.gamma ** -self.rho_update_cnt) * self.rho_init, self.rho_min)
            self.rho_update_cnt += 1
        self.use_hard_label = self.rho == self.rho_min
        if self.use_hard_label:
            pseudo_label = torch.argmax(logits_x_ulb, dim=-1)
        else:
            pseudo_label = torch.softmax(logits_x_ulb / self.T, dim=-1)
        return _ce(logits_x_ulb, pseudo_label).le(self.rho).float()


class _Dash(Dash):
    """Dash whose optimizer step is set by the test: the only input a Trainer would otherwise provide."""

    step = 0
    global_step = property(lambda self: self.step)


def test_dash_matches_reference_through_warmup_soft_and_hard_phases():
    """Xu et al. 2021, rho_t = C gamma^-(t-1) rho^ floored at rho_min; USB ``dash/utils.py`` lines 24-51 (the
    hook above) and ``dash/dash.py`` lines 182-197 (pseudo-labels soft with T until rho reaches rho_min, then
    hard; masked CE over the batch). ``rho_init`` given, as USB's evaluation loss would give it."""
    num_classes, warmup, period, rho_init = 4, 2, 2, 1.2
    model = _Dash(num_classes=num_classes, temperature=0.5, gamma=2.0, rho_scale=1.0001, rho_min=0.2,
                  supervised_warmup_steps=warmup, rho_update_steps=period, rho_init=rho_init, **NET)
    hook = _DashThresholdingHook(rho_min=0.2, gamma=2.0, C=1.0001, rho_init=rho_init, period=period, T=0.5)
    phases = set()
    for step, (_, weak, strong) in enumerate(_logits(num_classes, 32, steps=12, scale=2.0)):
        model.step = step
        out = model.unlabeled_loss({"weak": weak, "strong": strong}, {"target": weak.argmax(-1)})
        if step < warmup:  # USB trains on labeled batches only in its warm-up
            assert out["unlabeled_loss"].item() == 0 and out["mask_ratio"].item() == 0
            continue
        mask = hook.masking(step - warmup, weak)
        pseudo_label = weak.argmax(-1) if hook.use_hard_label else torch.softmax(weak / 0.5, dim=-1)
        unsup = (_ce(strong, pseudo_label) * mask).mean()
        phases.add((hook.use_hard_label, 0 < mask.mean().item() < 1))

        torch.testing.assert_close(out["rho"], torch.tensor(hook.rho, dtype=torch.float32))
        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["unlabeled_loss"], unsup)
    assert {(False, True), (True, True)} <= phases  # soft and hard phases, each with a partial mask somewhere


def test_dash_rho_hat_is_the_mean_labeled_loss_of_the_last_warmup_steps():
    """rho^ without ``rho_init``: the mean per-sample cross-entropy of the labeled batches of the last
    ``rho_window`` warm-up steps, computed here with ``F.cross_entropy`` on the same logits."""
    model = _Dash(num_classes=4, supervised_warmup_steps=4, rho_window=2, rho_update_steps=1, gamma=2.0,
                  rho_min=0.0, **NET)
    batches = [(torch.randn(6, 4) * 2, torch.randint(0, 4, (6,))) for _ in range(4)]
    for step, (logits, targets) in enumerate(batches):
        model.step = step
        model.labeled_loss(logits, targets)
        model.step_state.commit()
    expected = torch.cat([F.cross_entropy(x, y, reduction="none") for x, y in batches[2:]]).mean()
    torch.testing.assert_close(model.rho_hat(), expected)
    torch.testing.assert_close(model.rho(4), 1.0001 * expected)
    torch.testing.assert_close(model.rho(6), 1.0001 * expected / 4)
    assert int(model.rho_loss_count) == 12


# --- training, checkpoints, bad input -------------------------------------------------------
@pytest.mark.parametrize("method, kwargs, state", [
    (AdaMatch, {}, ("da_model_marginal", "da_target_marginal")),
    (Dash, dict(supervised_warmup_steps=2, rho_window=2, rho_update_steps=1), ("rho_loss_sum", "rho_loss_count")),
])
def test_a_few_steps_train_and_the_state_survives_a_checkpoint(method, kwargs, state, tmp_path):
    torch.manual_seed(0)
    model = method(**SMALL_NET, **kwargs)
    initial = {name: getattr(model, name).clone() for name in state}
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=4)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 4
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert "train/unlabeled_loss" in logged and all(torch.isfinite(v) for v in logged.values())
    assert all(not torch.equal(initial[n], getattr(model, n)) for n in state)
    if method is Dash:  # two warm-up steps of 8 labeled images made rho^, and the threshold is on
        assert int(model.rho_loss_count) == 16 and logged["train/rho"] > 0
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = method.load_from_checkpoint(tmp_path / "m.ckpt")
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(model, name))


@pytest.mark.parametrize("make, message", [
    (lambda: AdaMatch(threshold=1.5, **SMALL_NET), "threshold must lie in"),
    (lambda: AdaMatch(ema_momentum=1.0, **SMALL_NET), "ema_momentum must lie in"),
    (lambda: AdaMatch(rdrop_weight=1.0, **SMALL_NET), "R-Drop"),
    (lambda: Dash(supervised_warmup_steps=0, **SMALL_NET), "give supervised_warmup_steps > 0 or rho_init"),
    (lambda: Dash(gamma=0.5, **SMALL_NET), "gamma >= 1"),
    (lambda: Dash(rho_init=-1.0, **SMALL_NET), "rho_init must be a positive loss"),
])
def test_bad_arguments_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_adamatch_unlabeled_loss_without_labeled_logits_says_what_is_missing():
    model = AdaMatch(num_classes=3, **NET)
    with pytest.raises(ValueError, match="labeled batch's logits under 'labeled'"):
        model.unlabeled_loss({"weak": torch.zeros(2, 3), "strong": torch.zeros(2, 3)}, {"target": torch.zeros(2)})

"""MultiMatch against the authors' code (USB), its heads, and its errors.

The reference test feeds the same fixed weak/strong logits of three heads, over several steps and an epoch
boundary, to the method's real loss and to a plain re-implementation of USB's per-sample loops (cited per line of
``semilearn/algorithms/multimatch/multimatch.py``, ``multimatch/utils.py``, ``freematch/utils.py`` and
``flexmatch/utils.py``), and compares the losses and the state after every step. Nothing from
``lightning_modules`` computes an expected value. Where we decided to differ from USB (docs/ssl_references.md,
MultiMatch), the reference follows our reading and says so at the line.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import MultiMatch
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer

NUM_CLASSES, INDEX_SPACE = 4, 20
NET = dict(in_channels=1, network="wrn10_1")
OTHERS = [(0, 1, 2), (1, 0, 2), (2, 0, 1)]  # multimatch.py lines 107-112, utils.py line 132


class _USBMultiMatch:
    """USB's MultiMatch step for three heads, single process, as loops over samples."""

    def __init__(self, threshold_algo, smoothness, percentile, disagreement_weight, ema_p, p_cutoff=0.95):
        self.algo, self.s, self.pct, self.dw, self.m, self.p_cutoff = (threshold_algo, smoothness, percentile,
                                                                      disagreement_weight, ema_p, p_cutoff)
        self.apm = torch.zeros((3, INDEX_SPACE, NUM_CLASSES))  # utils.py line 37
        self.apm_cutoff = torch.zeros((3, NUM_CLASSES))  # line 40
        self.weak_labels = torch.ones((3, INDEX_SPACE)) * -1  # line 43
        self.p_model = [torch.ones(NUM_CLASSES) / NUM_CLASSES for _ in range(3)]  # freematch/utils.py lines 19-21
        self.time_p = [p.mean() for p in self.p_model]
        self.selected_label = [torch.ones(INDEX_SPACE, dtype=torch.long) * -1 for _ in range(3)]  # flexmatch 20-21
        self.classwise_acc = [torch.zeros(NUM_CLASSES) for _ in range(3)]

    def update(self, logits_x_ulb_w, idx_ulb, head_id, epoch):  # utils.py lines 57-67
        max_probs, pseudo_labels = torch.topk(logits_x_ulb_w, 2)
        for i, idx in enumerate(idx_ulb.tolist()):
            pm = logits_x_ulb_w[i] - max_probs[i][0]
            pm[pseudo_labels[i][0]] = max_probs[i][0] - max_probs[i][1]
            self.apm[head_id][idx] = pm * self.s / (1 + epoch) + self.apm[head_id][idx] * (1 - self.s / (1 + epoch))
            self.weak_labels[head_id][idx] = pseudo_labels[i][0]

    def freematch_masking(self, head, logits):  # freematch/utils.py lines 46-66 and 23-39 (no quantile, no clip)
        probs = torch.softmax(logits, dim=-1)
        max_probs, _ = torch.max(probs, dim=-1, keepdim=True)
        self.time_p[head] = self.time_p[head] * self.m + (1 - self.m) * max_probs.mean()
        self.p_model[head] = self.p_model[head] * self.m + (1 - self.m) * probs.mean(dim=0)
        max_probs, max_idx = probs.max(dim=-1)
        mod = self.p_model[head] / torch.max(self.p_model[head], dim=-1)[0]
        return max_probs.ge(self.time_p[head] * mod[max_idx]).float()

    def flexmatch_masking(self, head, logits, idx_ulb):  # flexmatch/utils.py lines 37-63 and 23-35 (warm-up)
        probs = torch.softmax(logits, dim=-1)  # multimatch.py line 90, algorithmbase.py line 271
        max_probs, max_idx = torch.max(probs, dim=-1)
        acc = self.classwise_acc[head]
        mask = max_probs.ge(self.p_cutoff * (acc[max_idx] / (2.0 - acc[max_idx]))).float()
        select = max_probs.ge(self.p_cutoff)
        if idx_ulb[select].nelement() != 0:
            self.selected_label[head][idx_ulb[select]] = max_idx[select]
        counter = Counter(self.selected_label[head].tolist())
        if max(counter.values()) < INDEX_SPACE:
            for c in range(NUM_CLASSES):
                acc[c] = counter[c] / max(counter.values())
        return mask

    def get_apm_label(self, epoch, idx, label1, label2, head_id, head_id1, head_id2):  # utils.py lines 71-124
        """``(label, check_apm_agreement(type))``: 1 agreement, 0 one valid label, -1 none (lines 16-24)."""
        if epoch == 0:
            return -1, -1
        apm_pass1 = self.apm[head_id1][idx][label1] >= self.apm_cutoff[head_id][label1]
        apm_pass2 = self.apm[head_id2][idx][label2] >= self.apm_cutoff[head_id][label2]
        if label1 == label2:
            if apm_pass1 and apm_pass2:
                return label1, 1  # HighConfAgreement
            elif apm_pass1 or apm_pass2:
                return label1, 0  # DiffConfAgreement
            return -1, -1
        if apm_pass1 and apm_pass2:
            return -1, -1  # HighConfDisagreement
        if apm_pass1:
            return label1, 0
        if apm_pass2:
            return label2, 0
        return -1, -1

    def step(self, weak, strong, idx_ulb, epoch):  # multimatch.py lines 135-153
        num_ulb = len(idx_ulb)
        pseudo_labels = [torch.max(weak[h], dim=-1)[1] for h in range(3)]  # lines 73-77, 150
        for head_id in range(3):  # lines 136-137: every head's APM before any label
            self.update(weak[head_id], idx_ulb, head_id, epoch)
        # Ours: each head's threshold hook moves once per step; USB calls it from both peers (lines 98-101)
        if self.algo == "freematch":
            masks = [self.freematch_masking(h, weak[h]) for h in range(3)]
        elif self.algo == "flexmatch":
            masks = [self.flexmatch_masking(h, weak[h], idx_ulb) for h in range(3)]
        else:
            masks = [torch.ones(num_ulb) for _ in range(3)]  # line 93
        losses, weights = [], []
        for head_id, head_id1, head_id2 in OTHERS:  # lines 103-132
            labels = torch.ones(num_ulb, dtype=torch.int64) * -1
            types_mask = torch.ones(num_ulb, dtype=torch.int64) * -1
            for i in range(num_ulb):
                labels[i], types_mask[i] = self.get_apm_label(epoch, idx_ulb[i], pseudo_labels[head_id1][i],
                                                              pseudo_labels[head_id2][i], head_id, head_id1, head_id2)
            auxiliary_mask = torch.maximum(masks[head_id1], masks[head_id2])  # line 101
            labels[labels == -1] = 0  # line 127
            samples_weights = (types_mask == 0) * self.dw + (types_mask == 1) * 1  # line 128
            final_weights = samples_weights * auxiliary_mask  # line 130
            losses.append((F.cross_entropy(strong[head_id], labels, reduction="none") * final_weights).mean())
            weights.append(final_weights)
        return sum(losses) / 3, torch.stack(weights)  # line 140

    def recalibrate(self, no_low=False, usb_break=False):  # utils.py lines 132-152
        for head_id, head_id1, head_id2 in OTHERS:
            for label in range(NUM_CLASSES):
                mask = self.weak_labels[head_id1] == self.weak_labels[head_id2]
                mask = mask & (self.weak_labels[head_id1] == label)
                if 1 not in mask:
                    self.apm_cutoff[head_id][label] = 0
                    if usb_break:
                        break  # USB's line 141, as written
                    continue  # our reading: the next class is still calibrated
                apm_set = torch.cat((self.apm[head_id1][mask][:, label], self.apm[head_id2][mask][:, label]), dim=0)
                if no_low:
                    self.apm_cutoff[head_id][label] = torch.quantile(apm_set.float(), self.pct)
                else:
                    self.apm_cutoff[head_id][label] = max(0, torch.quantile(apm_set.float(), self.pct))


def _steps(seed=0):
    """Fixed logits ``(3, n, C)`` of three heads that mostly agree (a shared part plus head noise), class 3 never
    predicted, over batches of overlapping indices (none repeated within a batch); epoch 0 then epoch 1."""
    g = torch.Generator().manual_seed(seed)
    indices = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11], [0, 1, 2, 3, 12, 13],
               [4, 5, 6, 7, 12, 13], [8, 9, 10, 11, 0, 1], [2, 3, 4, 5, 6, 7]]
    steps = []
    for k, idx in enumerate(indices):
        shared = torch.randn(len(idx), NUM_CLASSES, generator=g) * 2.0
        weak = shared + torch.randn(3, len(idx), NUM_CLASSES, generator=g) * 1.5
        weak[..., 3] -= 20.0
        strong = torch.randn(3, len(idx), NUM_CLASSES, generator=g) * 2.0
        steps.append((weak, strong, torch.tensor(idx), 0 if k < 3 else 1))
    return steps


@pytest.mark.parametrize("threshold_algo", ["freematch", "flexmatch", "none"])
def test_multimatch_matches_reference_over_steps_and_an_epoch_boundary(threshold_algo):
    options = dict(smoothness=0.997, percentile=0.25, disagreement_weight=3.0, ema_p=0.5, p_cutoff=0.6)
    model = MultiMatch(num_classes=NUM_CLASSES, apm_percentile=0.25, threshold_algo=threshold_algo, ema_momentum=0.5,
                       threshold=0.6, num_unlabeled=INDEX_SPACE, **NET)
    usb = _USBMultiMatch(threshold_algo, **options)
    seen_weights = set()
    for k, (weak, strong, idx, epoch) in enumerate(_steps()):
        if k == 3:  # the epoch boundary: USB's after_train_step at the epoch's end, ours before the next batch
            usb.recalibrate()
            model.recalibrate_cutoffs()
            torch.testing.assert_close(model.apm_cutoff, usb.apm_cutoff)
            assert (usb.apm_cutoff[:, :3] > 0).any() and (usb.apm_cutoff[:, 3] == 0).all()
        expected, weights = usb.step(weak, strong, idx, epoch)
        losses = model.multihead_loss(weak, strong, idx, epoch)
        model.step_state.commit()  # the optimizer step
        torch.testing.assert_close(losses["unlabeled_loss"], expected)
        torch.testing.assert_close(losses["mask_ratio"], (weights > 0).float().mean())
        torch.testing.assert_close(model.apm, usb.apm.transpose(0, 1))
        assert torch.equal(model.weak_labels, usb.weak_labels.T.long())
        if threshold_algo == "freematch":
            torch.testing.assert_close(model.head_threshold, torch.stack(usb.time_p))
            torch.testing.assert_close(model.head_class_model, torch.stack(usb.p_model))
        if threshold_algo == "flexmatch":
            assert torch.equal(model.head_memory, torch.stack(usb.selected_label, dim=1))
        seen_weights |= set(weights.flatten().tolist())
    assert {0.0, 1.0, 3.0} <= seen_weights, f"not every agreement case was exercised: {seen_weights}"


def test_usb_recalibration_break_leaves_later_classes_stale():
    """USB's loop stops at the first class no sample agrees on (utils.py line 141); ours goes on. On the same state
    the two differ exactly in the classes after it, for the heads that have such an empty class before another."""
    steps = _steps()
    for weak, _, _, _ in steps:  # class 0 is never predicted, so USB stops at once
        weak[..., 0] -= 40.0
    ours, usb = (_USBMultiMatch("none", 0.997, 0.25, 3.0, 0.5) for _ in range(2))
    for weak, strong, idx, epoch in steps[:3]:
        ours.step(weak, strong, idx, epoch)
        usb.step(weak, strong, idx, epoch)
    ours.recalibrate()
    usb.recalibrate(usb_break=True)
    assert (usb.apm_cutoff == 0).all() and (ours.apm_cutoff[:, 1:3] > 0).any()
    model = MultiMatch(num_classes=NUM_CLASSES, apm_percentile=0.25, threshold_algo="none", num_unlabeled=INDEX_SPACE,
                       **NET)
    for weak, strong, idx, epoch in steps[:3]:
        model.multihead_loss(weak, strong, idx, epoch)
        model.step_state.commit()
    model.recalibrate_cutoffs()
    torch.testing.assert_close(model.apm_cutoff, ours.apm_cutoff)


def test_gradients_reach_the_backbone_and_every_head():
    torch.manual_seed(0)
    model = MultiMatch(num_unlabeled=2000, **SMALL_NET)
    batch = digits_batch(model)
    unlabeled = batch["unlabeled"]
    views = torch.cat((unlabeled["weak"], unlabeled["strong"]))
    weak, strong = model.net(views, all_heads=True).chunk(2, dim=1)
    model.multihead_loss(weak, strong, unlabeled["index"], epoch=0)  # epoch 0: no pseudo-label, APM observed
    model.step_state.commit()
    weak, strong = model.net(views, all_heads=True).chunk(2, dim=1)
    losses = model.multihead_loss(weak, strong, unlabeled["index"], epoch=1)  # cutoffs 0: agreeing labels pass
    assert losses["mask_ratio"] > 0
    losses["unlabeled_loss"].backward()
    for h, head in enumerate(model.net.heads):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), f"head {h}"
    assert model.net.backbone.stem.weight.grad.abs().sum() > 0
    # the labeled loss is the sum of the heads' cross-entropies (USB average_losses False, lines 79-83)
    model.zero_grad()
    labeled = batch["labeled"]["image"]  # one forward over every view (concat_forward: BatchNorm sees them all)
    logits = model.net(torch.cat((labeled, views)), all_heads=True)[:, :len(labeled)]
    expected = sum(F.cross_entropy(x, batch["labeled"]["target"]) for x in logits)
    model.step_state.discard()
    torch.testing.assert_close(model.compute_losses(batch)["labeled_loss"], expected)


def test_prediction_is_the_mean_of_the_heads():
    torch.manual_seed(0)
    model = MultiMatch(**SMALL_NET).eval()
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        features = model.net.backbone.forward_features(images)
        heads = [head[2](F.gelu(head[0](features))) for head in model.net.heads]  # Linear-GELU-Linear
        assert not torch.allclose(heads[0], heads[1])
        torch.testing.assert_close(model(images), sum(heads) / 3)  # multimatch.py line 217
        assert model.net(images, all_heads=True).shape == (3, 5, 10)
    assert model.net.heads[0][0].out_features == model.net.backbone.num_features
    narrow = MultiMatch(narrow_heads=True, **SMALL_NET)  # USB adjust_clf_size
    assert narrow.net.heads[0][0].out_features == narrow.net.backbone.num_features // 3


@pytest.mark.parametrize("bad, match", [(dict(num_heads=2), "num_heads=3"), (dict(threshold_algo="softmatch"),
                                        "threshold_algo must be one of"), (dict(apm_percentile=5.0), "apm_percentile")])
def test_bad_arguments_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MultiMatch(**SMALL_NET, **bad)


@pytest.mark.parametrize("threshold_algo, recalibrate_every", [("freematch", 0), ("flexmatch", 0), ("none", 3)])
def test_trains_on_digits_and_recalibrates_from_the_committed_state(threshold_algo, recalibrate_every):
    torch.manual_seed(0)
    model = MultiMatch(threshold_algo=threshold_algo, recalibrate_every=recalibrate_every, threshold=0.12,
                       ema_momentum=0.5, **SMALL_NET)
    data = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=4)
    make_trainer(max_epochs=2).fit(model, data)
    facts = data.data_facts()
    assert model.apm.shape == (facts.num_indices, 3, 10)
    assert int(model.calibrated_at) == (1 if recalibrate_every == 0 else 6)  # epoch 1, or step 6 (of 8)
    outside = torch.ones(facts.num_indices, dtype=torch.bool)  # indices the unlabeled stream never draws
    outside[facts.unlabeled_indices] = False
    assert (model.weak_labels[~outside] >= 0).any() and (model.weak_labels[outside] == -1).all()
    assert model.apm_cutoff.sum() > 0, "the cutoffs were never recalibrated from agreeing heads: a vacuous test"
    if threshold_algo == "flexmatch":  # labeled-only indices are outside FlexMatch's counts
        assert (model.head_memory[outside] == -2).all() and (model.head_memory >= 0).any()

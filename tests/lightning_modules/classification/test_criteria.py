"""Criteria: each loss against its formula on hand-checked tensors, the registry and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MultilabelF1Score

from lightning_modules.classification.criteria import (
    CRITERIA,
    DisturbLabel,
    FocalLoss,
    KnowledgeRefinery,
    LabelSmoothing,
    MultiLabelBCE,
    OnlineLabelSmoothing,
    SigmoidF1,
    TfKDRegularization,
    TopKLoss,
    WeightedCrossEntropy,
    build_criterion,
    symmetric_kl,
)
from lightning_modules.core.step_state import StepState

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 4.0]])
TARGETS = torch.tensor([0, 2, 0, 2])
# Constructor options for criteria that cannot be built from num_classes alone.
REQUIRED = {"weighted_ce": {"class_counts": [5, 1, 2, 3, 9]}}


def _ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)


# ---- label regularization -------------------------------------------------------------------

def test_label_smoothing_matches_torch_and_its_targets_follow_the_formula():
    criterion = LabelSmoothing(num_classes=3, smoothing=0.2)
    expected = F.cross_entropy(LOGITS, TARGETS, label_smoothing=0.2)
    assert criterion(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    q = criterion.soft_targets(torch.tensor([1, 0]))
    assert torch.allclose(q, torch.tensor([[0.2 / 3, 0.8 + 0.2 / 3, 0.2 / 3], [0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3]]))
    assert torch.allclose(q.sum(1), torch.ones(2))


def test_online_label_smoothing_accumulates_correct_samples_and_refreshes_at_epoch_end():
    criterion = OnlineLabelSmoothing(num_classes=3, alpha=0.5, smoothing=0.3)
    initial = 0.7 * torch.eye(3) + 0.1
    assert torch.allclose(criterion.soft_labels, initial)
    # Rows 0, 1 and 3 are predicted correctly (classes 0, 2, 2); row 2 is not.
    loss = criterion(LOGITS, TARGETS)
    assert criterion.counts.sum() == 0  # the loss is pure: the owner proposes observe() and commits update_()
    criterion.update_(*criterion.observe(LOGITS, TARGETS))
    soft_ce = -(initial[TARGETS] * torch.log_softmax(LOGITS, 1)).sum(1).mean()
    assert loss.item() == pytest.approx((0.5 * F.cross_entropy(LOGITS, TARGETS) + 0.5 * soft_ce).item(), rel=1e-6)
    probs = LOGITS.softmax(1)
    assert torch.allclose(criterion.counts, torch.tensor([1.0, 0.0, 2.0]))
    assert torch.allclose(criterion.accumulated[0], probs[0])
    assert torch.allclose(criterion.accumulated[2], probs[1] + probs[3])
    criterion.update_(*criterion.observe(LOGITS[:1] * 2, TARGETS[:1]))  # a second correct class-0 sample
    criterion.epoch_end()
    assert torch.allclose(criterion.soft_labels[0], (probs[0] + (LOGITS[0] * 2).softmax(0)) / 2)
    assert torch.allclose(criterion.soft_labels[1], initial[1])  # no correct sample: row kept
    assert torch.allclose(criterion.soft_labels[2], (probs[1] + probs[3]) / 2)
    assert criterion.accumulated.abs().sum() == 0 and criterion.counts.sum() == 0
    assert {"soft_labels", "accumulated", "counts"} <= set(criterion.state_dict())


def test_online_label_smoothing_does_not_accumulate_in_eval_mode():
    criterion, step_state = OnlineLabelSmoothing(num_classes=3).eval(), StepState()
    step_state.observe(criterion, LOGITS, TARGETS)  # what the base does in labeled_loss
    step_state.commit()
    assert criterion.counts.sum() == 0 and criterion.accumulated.abs().sum() == 0


def test_disturb_label_is_ce_at_alpha_zero_and_in_eval_and_changes_c_minus_one_over_c_at_alpha_one():
    logits, targets = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    ce = F.cross_entropy(logits, targets)
    assert torch.equal(DisturbLabel(5, alpha=0.0)(logits, targets), ce)
    assert torch.equal(DisturbLabel(5, alpha=1.0).eval()(logits, targets), ce)

    # Logits that cost ~0 for label 0 and ~20 for any other label: loss / 20 is the fraction changed.
    torch.manual_seed(0)
    n, c = 20000, 5
    logits = torch.full((n, c), -20.0)
    logits[:, 0] = 0.0
    loss = DisturbLabel(c, alpha=1.0)(logits, torch.zeros(n, dtype=torch.long))
    assert loss.item() / 20.0 == pytest.approx((c - 1) / c, abs=0.01)


def test_tfkd_reg_with_weight_zero_is_cross_entropy():
    # The formula against the authors' code is in test_tfkd.py.
    assert torch.equal(TfKDRegularization(3, weight=0.0)(LOGITS, TARGETS), F.cross_entropy(LOGITS, TARGETS))


def test_knowledge_refinery_starts_near_one_hot_learns_its_residual_and_keeps_the_true_class_on_top():
    criterion = KnowledgeRefinery(num_classes=3, weight=0.5, temperature=2.0, margin=5.0)
    assert len(list(criterion.parameters())) == 1
    refined = criterion.refined_targets(TARGETS)
    near_one_hot = torch.tensor([1.0, math.exp(-5), math.exp(-5)]) / (1 + 2 * math.exp(-5))
    assert torch.allclose(refined[0], near_one_hot)
    logits = LOGITS.clone().requires_grad_(True)
    loss = criterion(logits, TARGETS)
    kl = (refined * (refined.log() - torch.log_softmax(LOGITS / 2.0, 1))).sum(1).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(LOGITS, TARGETS) + 0.5 * 4.0 * kl).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    assert criterion.residual.grad.abs().sum() > 0
    assert criterion.residual.grad.diagonal().abs().sum() == 0  # the true class's logit is fixed at the margin
    with torch.no_grad():
        criterion.residual.fill_(100.0)
    saturated = criterion.refined_targets(TARGETS)
    assert torch.equal(saturated.argmax(1), TARGETS)
    assert (saturated[0, 0] / saturated[0, 1]).item() == pytest.approx(math.exp(2.5), rel=1e-4)  # gap M / 2


def test_symmetric_kl_is_symmetric_zero_on_identical_inputs_and_matches_the_formula():
    a, b = LOGITS, LOGITS.flip(1)
    pa, pb = a.softmax(1), b.softmax(1)
    kl_ab, kl_ba = (pa * (pa / pb).log()).sum(1), (pb * (pb / pa).log()).sum(1)
    assert symmetric_kl(a, b).item() == pytest.approx((0.5 * (kl_ab + kl_ba)).mean().item(), rel=1e-5)
    assert symmetric_kl(a, b).item() == pytest.approx(symmetric_kl(b, a).item(), rel=1e-6)
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)


# ---- imbalance and hard examples -----------------------------------------------------------

def test_focal_loss_is_ce_at_gamma_zero_and_matches_a_hand_computed_example():
    ce = F.cross_entropy(LOGITS, TARGETS).item()
    assert FocalLoss(3, gamma=0.0)(LOGITS, TARGETS).item() == pytest.approx(ce, rel=1e-6)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]]))
    targets = torch.tensor([0, 1, 2])
    # p_t = 0.5, 0.8, 0.2; -alpha_y (1 - p_t)^2 log p_t
    expected = -(1.0 * 0.25 * math.log(0.5) + 2.0 * 0.04 * math.log(0.8) + 0.5 * 0.64 * math.log(0.2)) / 3
    assert FocalLoss(3, gamma=2.0, alpha=[1.0, 2.0, 0.5])(logits, targets).item() == pytest.approx(expected, rel=1e-5)
    confident = torch.tensor([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert FocalLoss(3)(confident, torch.tensor([0, 1])) < 0.01 * F.cross_entropy(confident, torch.tensor([0, 1]))


def test_top_k_loss_averages_the_hardest_ceil_k_n_samples():
    per_sample = sorted(_ce_rows(LOGITS, TARGETS).tolist(), reverse=True)
    assert TopKLoss(3, k=0.5)(LOGITS, TARGETS).item() == pytest.approx(sum(per_sample[:2]) / 2, rel=1e-6)
    assert TopKLoss(3, k=0.6)(LOGITS, TARGETS).item() == pytest.approx(sum(per_sample[:3]) / 3, rel=1e-6)  # ceil(2.4)
    ce = F.cross_entropy(LOGITS, TARGETS).item()
    assert TopKLoss(3, k=1.0)(LOGITS, TARGETS).item() == pytest.approx(ce, rel=1e-6)


def test_weighted_ce_matches_torch_for_explicit_inverse_frequency_and_effective_number_weights():
    w = [1.0, 3.0, 0.5]
    expected = F.cross_entropy(LOGITS, TARGETS, weight=torch.tensor(w))
    assert WeightedCrossEntropy(3, class_weights=w)(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    inverse = WeightedCrossEntropy(3, class_counts=[1, 2, 4]).class_weights
    assert torch.allclose(inverse, torch.tensor([1.0, 0.5, 0.25]) / (1.75 / 3))
    effective = WeightedCrossEntropy(3, class_counts=[1, 2, 4], beta=0.5).class_weights
    raw = torch.tensor([0.5 / 0.5, 0.5 / 0.75, 0.5 / 0.9375])
    assert torch.allclose(effective, raw / raw.mean())


def test_weighted_ce_weights_from_real_digit_label_counts():
    from sklearn.datasets import load_digits

    labels = torch.as_tensor(load_digits().target)[:300]
    counts = torch.bincount(labels, minlength=10)
    criterion = build_criterion("weighted_ce", 10, class_counts=counts.tolist())
    assert criterion.class_weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert criterion.class_weights.argmax() == counts.argmin() and criterion.class_weights.argmin() == counts.argmax()
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits, labels, weight=(1 / counts.double() / (1 / counts.double()).mean()).float())
    assert criterion(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


# ---- multi-label -----------------------------------------------------------------------------

MULTI_HOT = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_multilabel_bce_accepts_indices_and_multi_hot():
    bce = MultiLabelBCE(3, pos_weight=[1.0, 2.0, 0.5])
    expected = F.binary_cross_entropy_with_logits(LOGITS, MULTI_HOT.float(), pos_weight=torch.tensor([1.0, 2.0, 0.5]))
    assert bce(LOGITS, MULTI_HOT.float()).item() == pytest.approx(expected.item(), rel=1e-6)
    one_hot = F.binary_cross_entropy_with_logits(LOGITS, F.one_hot(TARGETS, 3).float())
    assert MultiLabelBCE(3)(LOGITS, TARGETS).item() == pytest.approx(one_hot.item(), rel=1e-6)


def test_sigmoid_f1_matches_soft_counts_and_torchmetrics_f1_when_saturated():
    s, y = torch.sigmoid(LOGITS), MULTI_HOT.float()
    tp, fp, fn = (s * y).sum(0), (s * (1 - y)).sum(0), ((1 - s) * y).sum(0)
    macro_f1 = (2 * tp / (2 * tp + fn + fp)).mean().item()
    assert SigmoidF1(3)(LOGITS, MULTI_HOT).item() == pytest.approx(1 - macro_f1, rel=1e-5)

    correct = 100.0 * MULTI_HOT - 50.0  # +-50: saturated, all right
    assert SigmoidF1(3)(correct, MULTI_HOT).item() == pytest.approx(0.0, abs=1e-6)
    assert MultilabelF1Score(3, average="macro")(correct, MULTI_HOT).item() == pytest.approx(1.0)
    wrong = correct.clone()
    wrong[0, 0], wrong[1, 2], wrong[3, 1] = -50.0, 50.0, 50.0
    for average in ("macro", "micro"):
        reference = MultilabelF1Score(3, average=average)(wrong, MULTI_HOT).item()
        assert reference < 0.9
        assert SigmoidF1(3, average=average)(wrong, MULTI_HOT).item() == pytest.approx(1 - reference, abs=1e-4)


# ---- registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CRITERIA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_criterion_returns_a_finite_float32_scalar_with_gradient(name, dtype):
    torch.manual_seed(0)
    criterion = build_criterion(name, 5, **REQUIRED.get(name, {}))
    assert criterion.multilabel == (name in ("bce", "sigmoid_f1"))
    logits = torch.randn(8, 5).to(dtype).requires_grad_(True)
    loss = criterion(logits, torch.randint(0, 5, (8,)))
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid names: .*focal.*label_smoothing"):
        build_criterion("fokal", 5)


@pytest.mark.parametrize(("name", "kwargs", "argument"), [
    ("label_smoothing", {"smoothing": 1.0}, "smoothing"),
    ("online_label_smoothing", {"smoothing": -0.1}, "smoothing"),
    ("focal", {"gamma": -1.0}, "gamma"),
    ("focal", {"alpha": [1.0, 2.0]}, "alpha"),
    ("ohem", {"k": 0.0}, "k="),
    ("ohem", {"k": 1.5}, "k="),
    ("weighted_ce", {"class_weights": [1.0] * 4}, "class_weights"),
    ("weighted_ce", {}, "exactly one"),
    ("weighted_ce", {"class_weights": [1.0] * 5, "class_counts": [1] * 5}, "exactly one"),
    ("weighted_ce", {"class_counts": [1] * 5, "beta": 1.0}, "beta"),
    ("disturb_label", {"alpha": 2.0}, "alpha"),
    ("tfkd_reg", {"correct_prob": 0.1}, "correct_prob"),
    ("sigmoid_f1", {"average": "weighted"}, "average"),
    ("focal", {"smoothing": 0.1}, "smoothing.*options are: gamma, alpha"),
])
def test_bad_options_raise_value_errors_naming_the_argument(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        build_criterion(name, 5, **kwargs)

"""Distillation losses against hand computations on tiny tensors, and the connectors' shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.distillation.losses import (
    ConvConnector,
    LinearConnector,
    attention_map,
    attention_transfer_loss,
    build_connector,
    category_structure_loss,
    hint_loss,
    kd_loss,
    mutual_learning_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)

SQRT2 = math.sqrt(2.0)


# ---- Hinton KD ---------------------------------------------------------------------------------


def test_kd_loss_hand_value_includes_t_squared_and_batchmean():
    # Row 0: teacher softmax([2 ln 3, 0] / 2) = [3/4, 1/4], student [1/2, 1/2]. Row 1: identical -> 0.
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]])
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    kl_row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(4.0 * kl_row0 / 2, rel=1e-5)


def test_kd_loss_matches_explicit_sum_formula():
    torch.manual_seed(0)
    student, teacher, t = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = torch.softmax(teacher / t, dim=1)
    explicit = t**2 * (p_t * (p_t.log() - torch.log_softmax(student / t, dim=1))).sum() / 5
    assert torch.allclose(kd_loss(student, teacher, temperature=t), explicit, atol=1e-6)


def test_kd_loss_zero_for_identical_logits_and_float32_under_bf16():
    logits = torch.randn(4, 6)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits.bfloat16(), logits.bfloat16()).dtype == torch.float32


# name -> (loss(student, teacher), student shape, teacher shape)
TEACHER_DETACH_CASES = {
    "kd": (lambda s, t: kd_loss(s, t), (4, 5), (4, 5)),
    "hint": (hint_loss, (2, 3, 4, 4), (2, 3, 4, 4)),
    "attention": (lambda s, t: attention_transfer_loss([s], [t]), (2, 3, 4, 4), (2, 5, 2, 2)),
    "rkd_distance": (rkd_distance_loss, (5, 3), (5, 7)),
    "rkd_angle": (rkd_angle_loss, (5, 3), (5, 7)),
    "similarity_preserving": (similarity_preserving_loss, (4, 3, 2, 2), (4, 6)),
    "category_structure": (
        lambda s, t: sum(category_structure_loss(s, t, torch.tensor([0, 0, 1, 2, -1]))),
        (5, 3),
        (5, 8),
    ),
}


@pytest.mark.parametrize("name", sorted(TEACHER_DETACH_CASES))
def test_gradient_reaches_student_never_teacher(name):
    loss_fn, student_shape, teacher_shape = TEACHER_DETACH_CASES[name]
    torch.manual_seed(1)
    student = torch.randn(student_shape, requires_grad=True)
    teacher = torch.randn(teacher_shape, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ---- FitNets connectors and hint -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [
        ((2, 8, 8, 8), (2, 16, 8, 8)),  # same size
        ((2, 8, 16, 16), (2, 16, 8, 8)),  # student 2x larger: strided conv
        ((2, 8, 4, 4), (2, 16, 8, 8)),  # teacher 2x larger: transposed conv
        ((2, 5), (2, 7)),  # flat features
    ],
)
def test_connector_maps_student_to_teacher_shape(student_shape, teacher_shape):
    student, teacher = torch.randn(student_shape, requires_grad=True), torch.randn(teacher_shape)
    connector = build_connector(student, teacher)
    assert isinstance(connector, LinearConnector if len(student_shape) == 2 else ConvConnector)
    loss = hint_loss(connector(student), teacher)
    loss.backward()
    assert student.grad is not None and all(p.grad is not None for p in connector.parameters())


def test_connector_rejects_non_integer_scale():
    with pytest.raises(ValueError, match=r"\(4, 5, 5\).*\(8, 3, 3\)"):
        ConvConnector((4, 5, 5), (8, 3, 3))
    with pytest.raises(ValueError, match="build_connector needs"):
        build_connector(torch.randn(2, 4), torch.randn(2, 4, 3, 3))


def test_connector_without_relu_can_output_negative_values():
    connector = ConvConnector((3, 4, 4), (3, 4, 4), relu=False)
    assert connector(torch.randn(4, 3, 4, 4)).min() < 0
    assert ConvConnector((3, 4, 4), (3, 4, 4))(torch.randn(4, 3, 4, 4)).min() >= 0


def test_hint_loss_hand_value_and_shape_error():
    assert hint_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="connector"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4))


# ---- Attention transfer --------------------------------------------------------------------------


def test_attention_map_hand_value_and_unit_norm():
    # Channels [1, 2] and [-1, 0] over a 1x2 map: mean_c f^2 = [1, 2], normalised by sqrt(5).
    feature = torch.tensor([[[[1.0, 2.0]], [[-1.0, 0.0]]]])
    assert torch.allclose(attention_map(feature), torch.tensor([[1.0, 2.0]]) / math.sqrt(5.0))
    maps = attention_map(torch.randn(3, 4, 5, 5))
    assert maps.shape == (3, 25) and torch.allclose(maps.norm(dim=1), torch.ones(3))


def test_attention_transfer_hand_value_summed_over_pairs():
    # Student map [1, 0], teacher map [0, 1]: mean of (1^2, 1^2) = 1 per pair, two pairs -> 2.
    student, teacher = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    assert attention_transfer_loss([student, student], [teacher, teacher]).item() == pytest.approx(2.0)
    same = torch.randn(2, 3, 4, 4)
    assert attention_transfer_loss([same], [same.clone()]).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_transfer_pools_the_larger_map():
    student, teacher = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    pooled = F.avg_pool2d(student.pow(2).mean(dim=1, keepdim=True), 2).flatten(1)
    expected = (F.normalize(pooled, dim=1) - attention_map(teacher)).pow(2).mean()
    assert torch.allclose(attention_transfer_loss([student], [teacher]), expected, atol=1e-6)
    assert torch.allclose(attention_transfer_loss([teacher], [student]), expected, atol=1e-6)


# ---- Relational KD -------------------------------------------------------------------------------


def test_rkd_distance_hand_value():
    # Distances 1, 2, 1 (mean 4/3) vs 1, 3, 2 (mean 2): psi differs by 0.25, 0, 0.25 -> Huber 1/32 each.
    student, teacher = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [1.0], [3.0]])
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(4 / 32 / 6, rel=1e-5)


def test_rkd_angle_hand_value():
    # Right angle at e0 of a right isosceles triangle vs three collinear points (cosines 1, -1, 1);
    # per apex the Huber terms are 0.5, 1/sqrt2 + 0.5 and 0.75 - 1/sqrt2, each for 2 of 12 triplets.
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0], [1.0], [2.0]])
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(2 * 1.75 / 12, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_zero_for_scaled_teacher_positive_otherwise(loss_fn):
    torch.manual_seed(2)
    student = torch.randn(6, 4, 2)  # flattened to (6, 8)
    scaled_and_padded = torch.cat([3 * student.flatten(1), torch.zeros(6, 3)], dim=1)  # other width
    assert loss_fn(student, scaled_and_padded).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(student, torch.randn(6, 5)).item() > 1e-4


# ---- Similarity preserving -----------------------------------------------------------------------


def test_similarity_preserving_hand_value_and_zero_for_identical():
    # G_s = I; G_t has rows [1, 1] / sqrt2: ||G_s - G_t||_F^2 / 4 = 1 - sqrt2 / 2.
    student, teacher = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(1 - SQRT2 / 2, rel=1e-5)
    same = torch.randn(4, 3, 2, 2)
    assert similarity_preserving_loss(same, same.clone()).item() == pytest.approx(0.0, abs=1e-7)


# ---- Category structure --------------------------------------------------------------------------


def test_category_structure_hand_value():
    # Student class 0 = {(1,0), (0,1)}, center (.5,.5); teacher class 0 = {(1,0), (1,0)}; class 1 = (-1,0).
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-2.0, 0.0]])
    intra, inter = category_structure_loss(student, teacher, torch.tensor([0, 0, 1]))
    # intra cosines (1/sqrt2, 1/sqrt2, 1) vs (1, 1, 1); inter off-diagonal -1/sqrt2 vs -1 (twice of 4).
    assert intra.item() == pytest.approx(2 * (1 - 1 / SQRT2) ** 2 / 3, rel=1e-5)
    assert inter.item() == pytest.approx(2 * (1 - 1 / SQRT2) ** 2 / 4, rel=1e-5)


def test_category_structure_zero_for_identical_and_dimension_free():
    torch.manual_seed(3)
    student, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rotation = torch.linalg.qr(torch.randn(6, 6)).Q[:4]  # orthonormal rows: cosines preserved, width 6
    for teacher in (student.clone(), 2.5 * student @ rotation):
        intra, inter = category_structure_loss(student, teacher, targets)
        assert intra.item() == pytest.approx(0.0, abs=1e-6) and inter.item() == pytest.approx(0.0, abs=1e-6)


def test_category_structure_ignores_unlabeled_samples():
    torch.manual_seed(4)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    targets = torch.tensor([0, 1, -1, 0, 1, -1])
    labeled = targets >= 0
    reference = category_structure_loss(student[labeled], teacher[labeled], targets[labeled])
    student[~labeled], teacher[~labeled] = 100.0, -100.0
    for got, want in zip(category_structure_loss(student, teacher, targets), reference):
        assert torch.allclose(got, want)


def test_category_structure_single_class_inter_is_connected_zero():
    student = torch.randn(4, 3, requires_grad=True)
    intra, inter = category_structure_loss(student, torch.randn(4, 3), torch.tensor([2, 2, -1, 2]))
    assert inter.item() == 0.0 and inter.requires_grad
    (intra + inter).backward()
    assert student.grad is not None
    none_labeled = category_structure_loss(student, torch.randn(4, 3), torch.full((4,), -1))
    assert all(loss.item() == 0.0 and loss.requires_grad for loss in none_labeled)


# ---- Deep mutual learning ------------------------------------------------------------------------


def test_mutual_learning_values_are_mean_kd_to_the_other_peers():
    torch.manual_seed(5)
    peers = [torch.randn(4, 3) for _ in range(3)]
    losses = mutual_learning_loss(peers, temperature=2.0)
    assert len(losses) == 3
    expected = (kd_loss(peers[1], peers[0], 2.0) + kd_loss(peers[1], peers[2], 2.0)) / 2
    assert torch.allclose(losses[1], expected)
    with pytest.raises(ValueError, match="at least 2"):
        mutual_learning_loss(peers[:1])


def test_mutual_learning_gradient_reaches_only_its_own_peer():
    torch.manual_seed(6)
    for k in range(3):
        peers = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
        mutual_learning_loss(peers)[k].backward()
        for j, peer in enumerate(peers):
            assert (peer.grad is not None) == (j == k)

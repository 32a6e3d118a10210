"""CRD against torchdistill 1.1.5's ``CRDLoss``; ReviewKD (not in torchdistill) against the authors' code written out.

torchdistill's ``CRDLoss`` (``torchdistill/losses/mid_level.py``, a refactor of HobbitLong/RepDistiller
``crd/criterion.py`` and ``crd/memory.py``) gets the same embeddings, memories, sample indices and negative
indices as ours; its loss, its ``Z`` and its in-place memory update must equal our loss and our committed update.
ReviewKD is dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py`` (``ABF`` lines 20-56, ``ReviewKD.forward``
lines 75-86, ``hcl`` lines 160-177) step by step in plain tensor ops, with our modules' weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import CRDLoss as TorchdistillCRD
from torchdistill.models.wrapper import Normalizer4CRD

from lightning_modules.distillation.crd import CRDLoss, draw_contrast_indices, nce_loss
from lightning_modules.distillation.reviewkd import ReviewFusion, hierarchical_context_loss


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- CRD ------------------------------------------------------------------------------------------


def _torchdistill(ours: CRDLoss, num_samples: int) -> TorchdistillCRD:
    reference = TorchdistillCRD("s", "empty", "t", input_size=ours.feat_dim, output_size=num_samples,
                                num_negative_samples=ours.nce_k, num_samples=num_samples,
                                temperature=ours.temperature, momentum=ours.momentum, eps=ours.eps)
    reference.memory_v1.copy_(ours.memory_student)  # v1: the student's memory (memory.py:65-70)
    reference.memory_v2.copy_(ours.memory_teacher)
    return reference


def _torchdistill_loss(reference: TorchdistillCRD, v_student, v_teacher, index, contrast) -> torch.Tensor:
    student_io = {"s": {"output": v_student}, "empty": {"input": {"pos_idx": index, "contrast_idx": contrast}}}
    return reference(student_io, {"t": {"output": v_teacher}})[0]  # RepDistiller returns a (1,) tensor


@pytest.mark.parametrize("nce_k", [5, 64])
def test_crd_loss_memory_and_normalizer_match_reference_torchdistill_over_two_steps(nce_k):
    torch.manual_seed(0)
    num_samples, batch = 40, 6
    ours = CRDLoss(student_dim=12, teacher_dim=20, num_samples=num_samples, feat_dim=8, nce_k=nce_k)
    reference = _torchdistill(ours, num_samples)
    for step, index in enumerate([torch.tensor([3, 17, 0, 39, 8, 21]), torch.tensor([17, 5, 6, 7, 30, 3])]):
        f_s, f_t = randn(batch, 12, seed=2 * step), randn(batch, 20, seed=2 * step + 1)
        loss, observation = ours(f_s, f_t, index, step)
        # the embedding is torchdistill's Normalizer4CRD around the same linear layers
        v_s, v_t = Normalizer4CRD(ours.embed_student.linear)(f_s), Normalizer4CRD(ours.embed_teacher.linear)(f_t)
        torch.testing.assert_close(observation[1], v_s.detach())
        torch.testing.assert_close(observation[2], v_t.detach())
        contrast = draw_contrast_indices(index, num_samples, nce_k, step, ours.seed)
        expected = _torchdistill_loss(reference, v_s, v_t, index, contrast)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=1e-5)
        ours.update_(*observation)  # the commit after the optimizer step
        torch.testing.assert_close(ours.normalizer.float(), reference.params[2:4], rtol=1e-5, atol=0)
        torch.testing.assert_close(ours.memory_student, reference.memory_v1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_teacher, reference.memory_v2, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.memory_student[17], _torchdistill(CRDLoss(12, 20, num_samples, 8), num_samples).memory_v1[17])


def test_crd_gradient_matches_reference_torchdistill():
    torch.manual_seed(1)
    ours = CRDLoss(student_dim=12, teacher_dim=20, num_samples=30, feat_dim=8, nce_k=16)
    reference = _torchdistill(ours, 30)
    index, f_s, f_t = torch.tensor([1, 4, 9, 2]), randn(4, 12, seed=5), randn(4, 20, seed=6)
    ours(f_s, f_t, index, 0)[0].backward()
    ours_grad = ours.embed_student.linear.weight.grad.clone()
    ours.zero_grad()
    contrast = draw_contrast_indices(index, 30, 16, 0)
    _torchdistill_loss(reference, ours.embed_student(f_s), ours.embed_teacher(f_t), index, contrast).backward()
    torch.testing.assert_close(ours_grad, ours.embed_student.linear.weight.grad, rtol=1e-4, atol=1e-6)


def test_nce_loss_matches_reference_repdistiller_contrast_loss_written_out():
    """RepDistiller crd/criterion.py:59-76 with n_data 1000, eps 1e-7, on positive scores."""
    x = randn(5, 11, seed=7).exp() / 50
    pn, m = 1 / 1000.0, 10
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
    log_d0 = torch.log(torch.full_like(x[:, 1:], m * pn) / (x[:, 1:] + m * pn + 1e-7))
    torch.testing.assert_close(nce_loss(x, 1000), -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0))[0] / 5)


def test_crd_negatives_depend_only_on_seed_step_and_sample():
    index = torch.tensor([4, 9, 4])
    drawn = draw_contrast_indices(index, 50, 100, step=3)
    assert drawn.shape == (3, 101) and torch.equal(drawn[:, 0], index)
    assert torch.equal(drawn[0], drawn[2])  # the same sample at the same step, wherever it sits in the batch
    assert torch.equal(draw_contrast_indices(index[1:2], 50, 100, step=3)[0], drawn[1])  # on another rank alone
    assert not torch.equal(draw_contrast_indices(index, 50, 100, step=4)[0], drawn[0])
    assert drawn[:, 1:].min() >= 0 and drawn[:, 1:].max() < 50
    counts = torch.bincount(draw_contrast_indices(torch.arange(200), 50, 500, step=0)[:, 1:].flatten(), minlength=50)
    assert counts.min() > 0.8 * 2000 and counts.max() < 1.2 * 2000  # uniform over the samples


# ---- ReviewKD -------------------------------------------------------------------------------------


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _authors_abf(level, x, y, shape, out_shape):
    """reviewkd.py:41-56 (training-mode BatchNorm written out); returns (y, x)."""
    n, _, h, w = x.shape
    x = _bn(F.conv2d(x, level.reduce[0].weight), level.reduce[1])
    if level.attention is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = torch.sigmoid(F.conv2d(torch.cat([x, y], dim=1), level.attention[0].weight, level.attention[0].bias))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return _bn(F.conv2d(x, level.output[0].weight, padding=1), level.output[1]), x


def _authors_hcl(fstudent, fteacher):
    """reviewkd.py:160-177."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            cnt /= 2.0
            loss += F.mse_loss(F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l)), reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


@pytest.mark.parametrize("teacher_sizes", [(16, 8, 4, 1), (32, 16, 8, 1)])
def test_review_fusion_and_hcl_match_reference_authors_code(teacher_sizes):
    """A ResNet8x4-like student (stages 16/32/64 channels at 16/8/4 px, pooled 64) against a teacher of other widths,
    as ``ReviewKD.forward`` (reviewkd.py:75-86): deepest first, each level fused with the previous residual."""
    torch.manual_seed(3)
    student_shapes = [(16, 16, 16), (32, 8, 8), (64, 4, 4), (64,)]
    teacher_channels = (24, 48, 96, 96)
    teacher_shapes = [(c, s, s) for c, s in zip(teacher_channels, teacher_sizes)]
    fusion = ReviewFusion(student_shapes, teacher_shapes).train()
    for level in fusion.levels:  # non-trivial BatchNorm affine parameters
        for bn in (level.reduce[1], level.output[1]):
            torch.nn.init.normal_(bn.weight)
            torch.nn.init.normal_(bn.bias)
    student = [randn(4, *s[:1], *(s[1:] or (1, 1)), seed=10 + k) for k, s in enumerate(student_shapes)]
    student[-1] = student[-1].flatten(1)  # the pooled feature arrives flat, as fc:input
    teacher = [randn(4, *s, seed=20 + k) for k, s in enumerate(teacher_shapes)]
    ours = fusion(student)
    # the authors': abfs reversed, shapes = the student's sizes, out_shapes = the teacher's
    x = [student[-1][:, :, None, None]] + student[-2::-1]
    shapes, out_shapes = [1, 4, 8, 16], list(teacher_sizes[::-1])
    levels = list(fusion.levels)[::-1]
    out, residual = _authors_abf(levels[0], x[0], None, shapes[0], out_shapes[0])
    expected = [out]
    for feature, level, shape, out_shape in zip(x[1:], levels[1:], shapes[1:], out_shapes[1:]):
        out, residual = _authors_abf(level, feature, residual, shape, out_shape)
        expected.insert(0, out)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hierarchical_context_loss(ours, teacher), _authors_hcl(expected, teacher),
                               rtol=1e-5, atol=1e-6)
    assert fusion.levels[0].reduce[0].out_channels == 64  # mid = min(512, deepest student width), reviewkd.py:69
    assert fusion.levels[-1].attention is None and all(level.attention is not None for level in fusion.levels[:-1])
